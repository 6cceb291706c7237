"""Argument checks for the API boundary: clear ValueErrors before any work.

Every public forward function validates its inputs here, so a reader sees
`linear_forward: x has D=5 but w has D=4` instead of a broadcasting error
raised from deep inside NumPy.
"""
from __future__ import annotations

import numpy as np


def ndim(fn: str, name: str, a, n: int) -> None:
    """Require a.ndim == n."""
    if np.ndim(a) != n:
        raise ValueError(f"{fn}: {name} must have {n} dimensions, got shape {np.shape(a)}")


def shape(fn: str, name: str, a, expected: tuple) -> None:
    """Require a.shape == expected."""
    if np.shape(a) != tuple(expected):
        raise ValueError(f"{fn}: {name} must have shape {tuple(expected)}, got {np.shape(a)}")


def same_shape(fn: str, name_a: str, a, name_b: str, b) -> None:
    """Require a.shape == b.shape."""
    if np.shape(a) != np.shape(b):
        raise ValueError(f"{fn}: {name_a} has shape {np.shape(a)} but "
                         f"{name_b} has shape {np.shape(b)}")


def probability(fn: str, name: str, p: float) -> None:
    """Require 0 <= p < 1 (a dropout rate)."""
    if not (0.0 <= p < 1.0):
        raise ValueError(f"{fn}: {name} must be in [0, 1), got {p}")


def positive(fn: str, name: str, value: float) -> None:
    """Require value > 0."""
    if not value > 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value}")


def finite(fn: str, name: str, a) -> None:
    """Require every entry of a to be finite."""
    if not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise ValueError(f"{fn}: {name} has {bad} non-finite entries")


def top_k(fn: str, k: int, num_experts: int) -> None:
    """Require 1 <= k <= num_experts."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{fn}: k must be an integer >= 1, got k={k}")
    if k > num_experts:
        raise ValueError(f"{fn}: k={k} exceeds num_experts={num_experts}")
