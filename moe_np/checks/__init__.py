"""The registered gradient checks, one module per chapter.

Importing this package fills the registry; the CLI (`python -m moe_np
gradcheck`) and the tests run the same checks.
"""
from moe_np.checks import basics, dense, differentiable, dispatch, lm, routing, sparse  # noqa: F401
from moe_np.checks.registry import REGISTRY, checks_of, register, run_checks  # noqa: F401
