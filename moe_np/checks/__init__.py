"""The registered gradient checks, one module per chapter.

Importing this package fills `moe_np.gradcheck.REGISTRY`; the CLI
(`python -m moe_np gradcheck`) and the tests both run the same checks.
"""
from moe_np.checks import basics, dense, sparse  # noqa: F401
