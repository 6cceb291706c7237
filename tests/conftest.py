"""Shared test helpers."""
import numpy as np
import pytest

from moe_np.checks import REGISTRY, checks_of  # importing fills the registry


def assert_check_passes(name, seeds=(0, 1)):
    """Run registered check `name` under several seeds; every row must pass."""
    for seed in seeds:
        rows = REGISTRY[name].run(seed)
        assert rows, f"check {name} produced no rows"
        for row in rows:
            assert row.passed, f"{row.name} wrt {row.wrt}: check_error {row.check_error:.2e} (seed {seed})"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
