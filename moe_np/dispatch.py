"""Capacity, slot assignment under drop policies, and the permutation to expert order.

The data path of a sparse layer, in plain NumPy (the reference for any
faster kernel):

    ids, weights (N, K) --assign_slots--> slot (N, K), -1 where dropped
                        --plan_from_slots--> Plan: rows in expert-contiguous order
    x (N, D) --gather_forward--> x_sorted (M, D), M = assignments kept
    experts run on each expert's contiguous segment of x_sorted
    y_sorted (M, D) --scatter_forward(weights)--> y (N, D); dropped assignments add 0

Shape letters: N tokens, D width, E experts, K choices per token, C capacity,
M kept assignments (rows of the permuted batch).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from moe_np import validate

POLICIES = ("position", "priority", "random")


def capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float,
             min_capacity: int = 0) -> int:
    """C = max(min_capacity, ceil(capacity_factor * K * N / E)).

    K * N / E is each expert's share of the assignments under perfect
    balance; the factor leaves headroom. Switch Transformer (K = 1) uses
    capacity_factor * N / E; GShard's top-2 uses 2N/E scaled by its factor;
    DeepSpeed-MoE takes ceil(...) and a floor min_capacity (4 by default).
    """
    validate.positive("capacity", "capacity_factor", capacity_factor)
    if num_tokens < 0 or num_experts < 1 or k < 1 or min_capacity < 0:
        raise ValueError(f"capacity: need num_tokens >= 0, num_experts >= 1, k >= 1, "
                         f"min_capacity >= 0; got {num_tokens}, {num_experts}, {k}, {min_capacity}")
    return max(int(min_capacity), math.ceil(capacity_factor * k * num_tokens / num_experts))


def token_order(weights, policy: str, seed=None):
    """The order in which tokens claim slots, applied within each choice rank.

    position: token order 0..N-1 (later tokens are dropped first)
    priority: by the token's top router weight, highest first (batch-
              prioritised routing: confident tokens keep their expert)
    random:   a seeded random permutation
    weights: (N, K) -> (N,) int.
    """
    n = len(weights)
    if policy == "position":
        return np.arange(n)
    if policy == "priority":
        return np.argsort(-weights[:, 0], kind="stable")               # (N,)
    if policy == "random":
        return np.random.default_rng(seed).permutation(n)              # (N,)
    raise ValueError(f"token_order: policy must be one of {POLICIES}, got {policy!r}")


def assign_slots(ids, num_experts: int, cap: int | None, order):
    """slot[n, k] = position of assignment (n, k) in expert ids[n, k]'s buffer, -1 if dropped.

    All first choices claim slots before any second choice (rank-major), and
    within a rank tokens go in `order`. cap None means dropless.
    ids: (N, K), order: (N,) -> slot (N, K) int, counts (E,) kept per expert.
    """
    n, k = ids.shape
    slot = np.full((n, k), -1)                                         # (N, K)
    counts = np.zeros(num_experts, dtype=np.int64)                     # (E,)
    for rank in range(k):
        experts_here = ids[order, rank]                                # (N,) in claiming order
        by_expert = np.argsort(experts_here, kind="stable")            # (N,) grouped, order kept
        grouped = experts_here[by_expert]                              # (N,)
        first = np.searchsorted(grouped, grouped, side="left")         # (N,) start of each group
        position = counts[grouped] + np.arange(n) - first              # (N,) slot if kept
        keep = position < cap if cap is not None else np.ones(n, bool)  # (N,)
        slot[order[by_expert[keep]], rank] = position[keep]
        counts += np.bincount(grouped[keep], minlength=num_experts)
    return slot, counts


class Plan(NamedTuple):
    """Where every kept assignment goes, in expert-contiguous order."""
    rows_token: np.ndarray    # (M,) which token each permuted row comes from
    rows_weight: np.ndarray   # (M,) flat index of its weight (into weights.ravel())
    offsets: np.ndarray       # (E+1,) expert e owns rows offsets[e]:offsets[e+1]
    num_dropped: int          # assignments that found no slot


def plan_from_slots(slot, ids, num_experts: int) -> Plan:
    """Token-choice plan: rows sorted by (expert, slot). slot, ids: (N, K)."""
    kept = slot >= 0                                                   # (N, K)
    flat = np.flatnonzero(kept)                                        # (M,) into (N, K).ravel()
    experts_kept = ids.ravel()[flat]                                   # (M,)
    order = np.lexsort((slot.ravel()[flat], experts_kept))             # (M,) by expert, then slot
    counts = np.bincount(experts_kept, minlength=num_experts)          # (E,)
    offsets = np.concatenate([[0], np.cumsum(counts)])                 # (E+1,)
    k = ids.shape[1]
    return Plan(flat[order] // k, flat[order], offsets, int(slot.size - flat.size))


def plan_expert_choice(token_ids) -> Plan:
    """Expert-choice plan: expert e's rows are its C chosen tokens. token_ids (E, C)."""
    e, c = token_ids.shape
    return Plan(token_ids.ravel(), np.arange(e * c), np.arange(e + 1) * c, 0)


def gather_forward(x, plan: Plan):
    """x_sorted[m] = x[rows_token[m]].   x (N, D) -> (M, D)."""
    return x[plan.rows_token], (len(x), plan)


def gather_backward(dx_sorted, cache):
    """dx[n] = sum of dx_sorted over the rows that came from token n.   -> (N, D)."""
    n, plan = cache
    dx = np.zeros((n, dx_sorted.shape[1]))                             # (N, D)
    np.add.at(dx, plan.rows_token, dx_sorted)
    return dx


def scatter_forward(y_sorted, weights, plan: Plan, num_tokens: int):
    """y[n] = sum over kept rows m of token n of weights[m's entry] * y_sorted[m].

    y_sorted: (M, D), weights: (N, K) or (E, C) -> y: (N, D). A dropped
    assignment has no row, so it adds exactly 0 and gets exactly 0 gradient.
    """
    w_rows = weights.ravel()[plan.rows_weight]                         # (M,)
    y = np.zeros((num_tokens, y_sorted.shape[1]))                      # (N, D)
    np.add.at(y, plan.rows_token, w_rows[:, None] * y_sorted)
    return y, (y_sorted, w_rows, weights.shape, plan)


def scatter_backward(dy, cache):
    """-> dy_sorted (M, D) = w_m dy[token_m];  dweights (as weights), 0 where dropped."""
    y_sorted, w_rows, weights_shape, plan = cache
    dy_rows = dy[plan.rows_token]                                      # (M, D)
    dweights = np.zeros(int(np.prod(weights_shape)))                   # (N*K,)
    dweights[plan.rows_weight] = np.sum(dy_rows * y_sorted, axis=1)
    return w_rows[:, None] * dy_rows, dweights.reshape(weights_shape)
