"""Shared test helpers."""
import numpy as np
import pytest

import moe_np.checks  # noqa: F401  (importing fills the registry)
from moe_np.gradcheck import REGISTRY


def registered(prefixes):
    """Names of registered checks starting with any of prefixes."""
    return [name for name in REGISTRY if name.startswith(tuple(prefixes))]


def assert_check_passes(name, seeds=(0, 1)):
    """Run registered check `name` under several seeds; every row must pass."""
    for seed in seeds:
        rows = REGISTRY[name](seed)
        assert rows, f"check {name} produced no rows"
        for row in rows:
            assert row.passed, f"{row.name} wrt {row.wrt}: rel_error {row.rel_error:.2e} (seed {seed})"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
