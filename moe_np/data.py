"""Synthetic tasks generated in code (nothing is downloaded).

Shape letters: N samples, D input width, V classes.
"""
from __future__ import annotations

import numpy as np


def make_blobs(n: int, dim: int = 10, classes: int = 10, spread: float = 1.0,
               seed: int = 0):
    """Gaussian blobs: class c is a cloud of width `spread` around a random centre.

    Returns x (N, D) float64 and labels (N,) int64 in [0, classes). Draw
    train and test rows in one call and cut them with `split`, so both
    share the same centres.
    """
    if n < 1 or dim < 1 or classes < 1:
        raise ValueError(f"make_blobs: n, dim, classes must be >= 1, got {n}, {dim}, {classes}")
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.standard_normal((classes, dim))   # (V, D)
    labels = rng.integers(0, classes, n)                  # (N,)
    x = centres[labels] + spread * rng.standard_normal((n, dim))   # (N, D)
    return x, labels


def split(x, y, train_fraction: float = 0.8):
    """First train_fraction of the rows for training, the rest for testing."""
    cut = int(round(train_fraction * len(x)))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


# ---------------------------------------------------------------------------
# The regions task of chapter 3: a plane split into regions with their own rules.

REGION_RULES = (
    # (A (2, 2), b (2,)): y = tanh(x @ A + b) inside the region
    (np.array([[1.5, 0.0], [0.0, -1.5]]), np.array([0.5, 0.0])),
    (np.array([[0.0, 2.0], [2.0, 0.0]]), np.array([-0.5, 0.5])),
    (np.array([[-1.5, 1.0], [0.5, 1.5]]), np.array([0.0, -0.5])),
    (np.array([[1.0, -2.0], [-1.0, -1.0]]), np.array([0.5, 0.5])),
)


def region_of(x):
    """The true region of each point: the quadrant of the plane.   x (N, 2) -> (N,) in 0..3.

    0: x0 >= 0, x1 >= 0;  1: x0 < 0, x1 >= 0;  2: x0 < 0, x1 < 0;  3: x0 >= 0, x1 < 0.
    """
    right = x[:, 0] >= 0                                  # (N,)
    top = x[:, 1] >= 0                                    # (N,)
    return np.where(top, np.where(right, 0, 1), np.where(right, 3, 2))


def make_regions(n: int, noise: float = 0.05, seed: int = 0):
    """Points uniform in [-1, 1]^2; each region applies its own rule y = tanh(x A_r + b_r).

    Returns x (N, 2), y (N, 2) and the true region (N,). The rules disagree at
    the boundaries, so one smooth function fits the whole plane badly while a
    mixture of simple experts, one per region, fits it well.
    """
    if n < 1:
        raise ValueError(f"make_regions: n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (n, 2))                    # (N, 2)
    region = region_of(x)                                 # (N,)
    y = np.empty_like(x)                                  # (N, 2)
    for r, (a, b) in enumerate(REGION_RULES):
        inside = region == r                              # (N,)
        y[inside] = np.tanh(x[inside] @ a + b)
    y += noise * rng.standard_normal(y.shape)             # (N, 2)
    return x, y, region
