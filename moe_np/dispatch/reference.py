"""The "numpy" dispatch strategy: the reference, in plain fancy indexing.

    gather   x (N, D)        -> x_sorted (M, D)   x_sorted[m] = x[rows_token[m]]
    experts  x_sorted (M, D) -> y_sorted (M, D)   expert e on rows offsets[e]:offsets[e+1]
    combine  y_sorted (M, D) -> y (N, D)          y[n] = sum of w_m y_sorted[m] over n's rows

A dropped assignment owns no row, so it adds exactly 0 to y and gets
exactly 0 gradient. Every faster strategy is tested against this one.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from moe_np import experts
from moe_np.dispatch.plan import Plan, check_buffer, check_weights, plan_token_choice  # noqa: F401

LAYOUT = "ragged"


class GatherCache(NamedTuple):
    num_tokens: int      # N, rows of the input
    plan: Plan


class CombineCache(NamedTuple):
    y_sorted: np.ndarray     # (M, D) the experts' outputs, kept for the weight gradient
    w_rows: np.ndarray       # (M,) each row's routing weight
    weights_shape: tuple     # (N, K) or (E, C)
    plan: Plan


def gather_forward(x, plan: Plan):
    """x_sorted[m] = x[rows_token[m]].   x (N, D) -> (M, D)."""
    check_buffer("gather_forward", "x", x, plan, rows=plan.token_rows.shape[0])
    return x[plan.rows_token], GatherCache(len(x), plan)               # (M, D)


def gather_backward(dx_sorted, cache: GatherCache):
    """dx[n] = sum of dx_sorted over the rows that came from token n.   -> (N, D)."""
    check_buffer("gather_backward", "dx_sorted", dx_sorted, cache.plan)
    dx = np.zeros((cache.num_tokens, dx_sorted.shape[1]), dtype=dx_sorted.dtype)   # (N, D)
    np.add.at(dx, cache.plan.rows_token, dx_sorted)
    return dx


def combine_forward(y_sorted, weights, plan: Plan):
    """y[n] = sum over token n's rows m of w_m y_sorted[m].   (M, D), (N, K) or (E, C) -> (N, D)."""
    check_buffer("combine_forward", "y_sorted", y_sorted, plan)
    check_weights("combine_forward", weights, plan, y_sorted.dtype)
    w_rows = weights.ravel()[plan.rows_weight]                         # (M,)
    n = plan.token_rows.shape[0]
    y = np.zeros((n, y_sorted.shape[1]), dtype=y_sorted.dtype)         # (N, D)
    np.add.at(y, plan.rows_token, w_rows[:, None] * y_sorted)
    return y, CombineCache(y_sorted, w_rows, weights.shape, plan)


def combine_backward(dy, cache: CombineCache):
    """-> dy_sorted (M, D) = w_m dy[token_m];  dweights (as weights), 0 where dropped."""
    plan = cache.plan
    check_buffer("combine_backward", "dy", dy, plan, rows=plan.token_rows.shape[0])
    dy_rows = dy[plan.rows_token]                                      # (M, D)
    dweights = np.zeros(int(np.prod(cache.weights_shape)), dtype=dy.dtype)   # (N*K,)
    dweights[plan.rows_weight] = np.sum(dy_rows * cache.y_sorted, axis=1)
    return cache.w_rows[:, None] * dy_rows, dweights.reshape(cache.weights_shape)


def experts_forward(x_sorted, params: dict, kind: str, plan: Plan, x=None):
    """Each expert on its own contiguous rows (see experts.ragged_experts_forward). Given x, the
    input x_sorted was gathered from, the cache keeps x and the plan's rows instead of x_sorted."""
    source = None if x is None else (x, plan.rows_token)
    return experts.ragged_experts_forward(x_sorted, params, kind, plan.offsets, source=source)


def experts_backward(dy_sorted, cache, overwrite: bool = False):
    """-> dx_sorted (M, D), grads; overwrite=True writes dx_sorted over dy_sorted."""
    return experts.ragged_experts_backward(dy_sorted, cache, overwrite)


def experts_selection(cache):
    return experts.ragged_experts_selection(cache)
