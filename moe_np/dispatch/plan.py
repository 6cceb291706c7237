"""The dispatch plan: capacity, drop policies, slots, and the expert-order permutation.

This module is the *specification* every dispatch strategy reproduces bit
for bit. Token-choice routing gives ids (N, K): token n's r-th choice is
expert ids[n, r]. The plan decides which of the N*K assignments are kept
and where each kept one sits in the expert-contiguous buffer:

    1. Visit the assignments rank-major: every first choice (r = 0) before
       any second choice, and within a rank the tokens in `order`
       (drop policy: position, priority or random).
    2. Expert e's j-th visited assignment takes slot j if j < C, else it is
       dropped (C = capacity; None means dropless). Assignments marked not
       eligible (padding tokens) are not visited at all. With a capacity per
       sequence, j counts the visitors of (sequence, expert) instead, and a
       kept assignment takes the next free slot of its expert.
    3. offsets = [0, cumsum(kept per expert)]; a kept assignment of expert e
       in slot j goes to row offsets[e] + j.

That is one stable counting sort by expert id: no comparison sort needed,
O(N K) work. Shape letters: N tokens, E experts, K choices per token,
C capacity per expert, M kept assignments (rows of the buffer), R = K for
token choice or E for expert choice (the most rows one token can own).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from moe_np import validate

POLICIES = ("position", "priority", "random")


class Plan(NamedTuple):
    """Where every kept assignment goes, in expert-contiguous order."""
    rows_token: np.ndarray    # (M,) int64: the token each buffer row comes from
    rows_weight: np.ndarray   # (M,) int64: flat index of its routing weight (into weights.ravel())
    offsets: np.ndarray       # (E+1,) int64: expert e owns rows offsets[e]:offsets[e+1]
    token_rows: np.ndarray    # (N, R) int64: the rows token n owns, -1 where none
    capacity: int | None      # C, or None when dropless
    num_dropped: int          # assignments that found no slot

    @property
    def counts(self) -> np.ndarray:
        """Kept assignments per expert.   (E,) int64."""
        return np.diff(self.offsets)


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


def token_order(weights, policy: str, rng=None):
    """The order in which tokens claim slots, applied within each choice rank.

    position: token order 0..N-1 (later tokens are dropped first)
    priority: by the token's top routing weight, highest first (batch-
              prioritised routing: confident tokens keep their expert)
    random:   a random permutation from rng (a Generator or a seed)
    weights: (N, K) -> (N,) int64.
    """
    n = len(weights)
    if policy == "position":
        return np.arange(n, dtype=np.int64)                            # (N,)
    if policy == "priority":
        return np.argsort(-weights[:, 0], kind="stable").astype(np.int64)   # (N,)
    if policy == "random":
        return np.random.default_rng(rng).permutation(n).astype(np.int64)   # (N,)
    raise ValueError(f"token_order: policy must be one of {POLICIES}, got {policy!r}")


def check_routing(fn: str, ids, num_experts: int, order=None) -> None:
    """Validate ids (N, K) int in [0, E) with distinct entries per row, and order (N,) a permutation.

    Every strategy calls this before any kernel runs: a bad id would
    otherwise index out of bounds inside compiled code."""
    validate.ndim(fn, "ids", ids, 2)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{fn}: ids must be integers, got dtype {ids.dtype}")
    if num_experts < 1:
        raise ValueError(f"{fn}: num_experts must be >= 1, got {num_experts}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"{fn}: expert ids must lie in [0, {num_experts}), "
                         f"got min {ids.min()} max {ids.max()}")
    if order is not None:
        n = ids.shape[0]
        validate.shape(fn, "order", order, (n,))
        if not np.array_equal(np.sort(order), np.arange(n)):
            raise ValueError(f"{fn}: order must be a permutation of 0..{n - 1}")


def assign_slots(ids, num_experts: int, cap: int | None, order, eligible=None):
    """slot[n, r] = the slot assignment (n, r) takes in expert ids[n, r]'s buffer, -1 if dropped.

    Rank-major, tokens in `order` within a rank (the spec above), written
    with NumPy sorts: the readable reference, not the fast path. eligible
    (N, K) bool, if given, leaves some assignments out entirely (padding
    tokens, or assignments a per-sequence capacity already dropped): they
    claim nothing and get slot -1.
    ids: (N, K), order: (N,) -> slot (N, K) int64, counts (E,) kept per expert.
    """
    n, k = ids.shape
    slot = np.full((n, k), -1, dtype=np.int64)                         # (N, K)
    counts = np.zeros(num_experts, dtype=np.int64)                     # (E,)
    for rank in range(k):
        claim = order if eligible is None else order[eligible[order, rank]]   # (N_r,) claiming order
        experts_here = ids[claim, rank]                                # (N_r,)
        by_expert = np.argsort(experts_here, kind="stable")            # (N_r,) grouped, order kept
        grouped = experts_here[by_expert]                              # (N_r,)
        first = np.searchsorted(grouped, grouped, side="left")         # (N_r,) start of each group
        position = counts[grouped] + np.arange(len(claim)) - first     # (N_r,) slot if kept
        keep = position < cap if cap is not None else np.ones(len(claim), bool)   # (N_r,)
        slot[claim[by_expert[keep]], rank] = position[keep]
        counts += np.bincount(grouped[keep], minlength=num_experts)
    return slot, counts


def plan_from_slots(slot, ids, counts, cap: int | None, num_eligible: int | None = None) -> Plan:
    """Token-choice plan from the slots: row = offsets[expert] + slot.   slot, ids: (N, K).
    num_dropped counts eligible assignments without a slot (all N*K by default)."""
    n, k = ids.shape
    flat = np.flatnonzero(slot >= 0)                                   # (M,) into (N, K).ravel()
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)   # (E+1,)
    rows = offsets[ids.ravel()[flat]] + slot.ravel()[flat]             # (M,) row of each kept one
    rows_weight = np.empty(flat.size, dtype=np.int64)                  # (M,)
    rows_weight[rows] = flat
    token_rows = np.full(n * k, -1, dtype=np.int64)                    # (N*K,)
    token_rows[flat] = rows
    eligible = slot.size if num_eligible is None else num_eligible
    return Plan(rows_weight // k, rows_weight, offsets, token_rows.reshape(n, k), cap,
                int(eligible - flat.size))


def plan_token_choice(ids, num_experts: int, cap: int | None, order, eligible=None,
                      seq_len: int | None = None) -> Plan:
    """The reference plan for token-choice routing (validated).   ids (N, K), order (N,),
    eligible (N, K) bool or None (every assignment takes part). seq_len: capacity counted
    per sequence of seq_len tokens (each has its own cap slots per expert), or None (one
    capacity for the batch). num_dropped counts the eligible assignments left without a row."""
    check_routing("plan_token_choice", ids, num_experts, order)
    if eligible is not None:
        check_eligible("plan_token_choice", eligible, ids.shape)
    num_eligible = None if eligible is None else int(eligible.sum())
    if seq_len is not None:
        check_seq_len("plan_token_choice", seq_len, len(ids))
        eligible = sequence_capacity_eligible(ids, num_experts, cap, order, seq_len, eligible)
        plan = plan_token_choice(ids, num_experts, None, order, eligible)
        dropped = (ids.size if num_eligible is None else num_eligible) - len(plan.rows_token)
        return plan._replace(capacity=cap, num_dropped=dropped)
    slot, counts = assign_slots(ids, num_experts, cap, order, eligible)   # (N, K), (E,)
    return plan_from_slots(slot, ids, counts, cap, num_eligible)


def check_seq_len(fn: str, seq_len, num_tokens: int) -> None:
    """seq_len: a positive integer that divides the number of tokens."""
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1 or num_tokens % seq_len:
        raise ValueError(f"{fn}: seq_len must be a positive integer dividing N={num_tokens}, "
                         f"got {seq_len!r}")


def check_eligible(fn: str, eligible, shape) -> None:
    """eligible: a bool array shaped like ids."""
    if not isinstance(eligible, np.ndarray) or eligible.dtype != bool:
        raise ValueError(f"{fn}: eligible must be a bool array, got "
                         f"{getattr(eligible, 'dtype', type(eligible).__name__)}")
    validate.shape(fn, "eligible", eligible, shape)


def sequence_capacity_eligible(ids, num_experts: int, cap: int, order, seq_len: int,
                               eligible=None):
    """Capacity counted per sequence: each sequence of seq_len tokens has its own C slots per
    expert. Returns which assignments keep a slot, (N, K) bool: treat (sequence, expert) as one
    'virtual expert' and run the same rank-major slot assignment over them."""
    n = ids.shape[0]
    if n % seq_len:
        raise ValueError(f"sequence_capacity_eligible: N={n} tokens do not split into sequences "
                         f"of seq_len={seq_len}")
    virtual = (np.arange(n) // seq_len)[:, None] * num_experts + ids   # (N, K)
    slot, _ = assign_slots(virtual, (n // seq_len) * num_experts, cap, order, eligible)
    return slot >= 0                                                   # (N, K)


def plan_expert_choice(token_ids, num_tokens: int) -> Plan:
    """Expert-choice plan: expert e's rows are its C chosen tokens, in its order.

    token_ids (E, C): distinct tokens per expert. token_rows is (N, E):
    token n's row for expert e, -1 if e did not choose it."""
    check_routing("plan_expert_choice", token_ids, num_tokens)
    e, c = token_ids.shape
    rows = np.arange(e * c, dtype=np.int64)                            # (E*C,)
    token_rows = np.full((num_tokens, e), -1, dtype=np.int64)          # (N, E)
    token_rows[token_ids.ravel(), rows // c] = rows
    offsets = np.arange(e + 1, dtype=np.int64) * c                    # (E+1,)
    return Plan(token_ids.ravel().astype(np.int64), rows, offsets, token_rows, c, 0)


def check_buffer(fn: str, name: str, a, plan: Plan, rows: int | None = None) -> None:
    """A float (rows, D) array in C order, with rows = M unless given: the boundary check
    every strategy runs before gathering, combining or their backward passes."""
    validate.ndim(fn, name, a, 2)
    if a.dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"{fn}: {name} must be float16, float32 or float64, got {a.dtype}")
    want = len(plan.rows_token) if rows is None else rows
    if a.shape[0] != want:
        raise ValueError(f"{fn}: {name} has {a.shape[0]} rows but the plan needs {want}")


def check_weights(fn: str, weights, plan: Plan, dtype) -> None:
    """Routing weights that match the plan: as many entries as it indexes, in the data's dtype."""
    n, r = plan.token_rows.shape
    if weights.ndim != 2 or (weights.shape[0] not in (n, len(plan.offsets) - 1)):
        raise ValueError(f"{fn}: weights of shape {weights.shape} do not match a plan for "
                         f"N={n} tokens and E={len(plan.offsets) - 1} experts")
    if len(plan.rows_weight) and plan.rows_weight.max() >= weights.size:
        raise ValueError(f"{fn}: the plan indexes weight {plan.rows_weight.max()} but weights "
                         f"has only {weights.size} entries (a plan from another batch?)")
    if weights.dtype != dtype:
        raise ValueError(f"{fn}: weights are {weights.dtype} but the data is {dtype}")
