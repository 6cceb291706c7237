"""Argument checks for the API boundary: clear ValueErrors before any work.

Every public function and config validates its inputs here, so a reader
sees `linear_forward: x has D=5 but w has D=4` instead of a broadcasting
error raised from deep inside NumPy. Each check raises ValueError naming
the function (or config), the argument and the value it got:

    one_of       a name from a registry       integer      an int >= a minimum
    sizes        integers >= 1 (by keyword)
    positive     > 0                          non_negative >= 0
    probability  in [0, 1)                    float_dtype  a floating-point dtype
    ndim, shape, same_shape, finite           arrays
    param_dtype  an input in the parameters' dtype
    top_k        1 <= k <= num_experts
    routed_input x and the parameters of a layer with one router matrix (ReMoE, Soft MoE)
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


def one_of(fn: str, name: str, value, allowed) -> None:
    """Require value in allowed (a registry's keys or a tuple of names)."""
    if value not in allowed:
        raise ValueError(f"{fn}: {name} must be one of {tuple(allowed)}, got {value!r}")


def integer(fn: str, name: str, value, minimum: int = 1) -> None:
    """Require an integer (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an integer >= {minimum}, got {value!r}")


def sizes(fn: str, **values) -> None:
    """Require every keyword to be an integer >= 1 (widths, counts of experts or slots)."""
    for name, value in values.items():
        integer(fn, name, value)


def non_negative(fn: str, name: str, value: float) -> None:
    """Require value >= 0 (NaN fails)."""
    if not value >= 0:
        raise ValueError(f"{fn}: {name} must be >= 0, got {value}")


def float_dtype(fn: str, dtype) -> np.dtype:
    """Require a floating-point dtype; -> np.dtype(dtype)."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"{fn}: dtype must be a floating-point dtype, got {dtype!r}") from None
    if not np.issubdtype(dt, np.floating):
        raise ValueError(f"{fn}: dtype must be a floating-point dtype, got {dt}")
    return dt


def probability(fn: str, name: str, p: float) -> None:
    """Require 0 <= p < 1 (a dropout rate)."""
    if not (0.0 <= p < 1.0):
        raise ValueError(f"{fn}: {name} must be in [0, 1), got {p}")


def positive(fn: str, name: str, value: float) -> None:
    """Require value > 0."""
    if not value > 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value}")


def param_dtype(fn: str, name: str, a, dtype) -> None:
    """Require a.dtype == dtype, the parameters' (no silent cast between precisions)."""
    if np.asarray(a).dtype != dtype:
        raise ValueError(f"{fn}: {name} is {np.asarray(a).dtype} but the parameters are "
                         f"{np.dtype(dtype)}; convert one of them")


def finite(fn: str, name: str, a) -> None:
    """Require every entry of a to be finite."""
    if not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise ValueError(f"{fn}: {name} has {bad} non-finite entries")


def top_k(fn: str, k: int, num_experts: int) -> None:
    """Require 1 <= k <= num_experts."""
    integer(fn, "k", k)
    if k > num_experts:
        raise ValueError(f"{fn}: k={k} exceeds num_experts={num_experts}")


def routed_input(fn: str, x, params: dict, router: str, expert_names) -> int:
    """The input check of the layers whose router is one weight matrix over stacked experts
    (ReMoE, Soft MoE): params holds `router` and every expert weight; x is (N, D) with
    N >= 1; params[router] is 2-D with x's dtype.   -> E, the number of experts."""
    missing = sorted({router, *expert_names} - set(params))
    if missing:
        raise ValueError(f"{fn}: params is missing {missing}")
    ndim(fn, "x", x, 2)
    if len(x) == 0:
        raise ValueError(f"{fn}: x must hold at least one token, got shape {np.shape(x)}")
    ndim(fn, router, params[router], 2)
    param_dtype(fn, "x", x, params[router].dtype)
    return params[expert_names[0]].shape[0]
