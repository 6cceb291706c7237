"""The expert-parallel plan: which rows each rank sends to whom, and where they land.

Q ranks share E experts, E / Q each: rank p owns experts p E/Q .. (p + 1) E/Q - 1.
One process's dispatch buffer is expert-contiguous (dispatch/plan.py), so
it splits into Q contiguous pieces, piece p holding the rows of rank p's
experts. A rank builds that buffer for its own N tokens (the *home plan*)
and sends piece p to rank p.

The order of rows inside an expert decides the bits of its weight
gradient (a sum over its rows), so the owner puts the rows it receives
back into the order one process would have used: expert by expert, and
within an expert by the *claim* of each row,

    claim = r * Z + pos(token),

r the choice rank (every first choice before any second choice, as the
plan's rank-major visit) and pos the token's place in the global claiming
order of the drop policy over all Z tokens. The claim is also what decides
capacity: expert e keeps its C rows of smallest claim, exactly the
assignments one process keeps.

Shape letters: N tokens of this rank, Z tokens of all ranks, K choices, E
experts, Q ranks (E/Q experts each), M rows this rank sends, I rows it
receives, C capacity per expert.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from moe_np.dispatch.plan import Plan, plan_token_choice
from moe_np.parallel.groups import AgreedError


class Layout(NamedTuple):
    """Where experts live: rank p of the Q-rank group owns E / Q of them."""
    num_experts: int     # E
    ranks: int           # Q

    @property
    def local(self) -> int:
        """E / Q, experts per rank."""
        return self.num_experts // self.ranks

    def first_expert(self, rank: int) -> int:
        return rank * self.local


def check_layout(fn: str, num_experts: int, ep: int, dp: int, world_size: int) -> None:
    """E divisible by the expert-parallel size, and dp * ep = the world size: checked on
    every rank from what each rank knows alone, before any communication."""
    if ep < 1 or dp < 1 or dp * ep != world_size:
        raise AgreedError(f"{fn}: dp * ep must equal the world size; got dp={dp}, ep={ep}, "
                         f"world size {world_size}")
    if num_experts % ep:
        raise AgreedError(f"{fn}: num_experts={num_experts} is not divisible by the "
                         f"expert-parallel size ep={ep}; each rank must hold E / ep experts")


def claim_positions(order):
    """pos[t] = the place of token t in the claiming order.   order (Z,) -> pos (Z,) int64."""
    pos = np.empty(len(order), dtype=np.int64)                         # (Z,)
    pos[order] = np.arange(len(order), dtype=np.int64)
    return pos


def local_order(pos):
    """This rank's tokens in the global claiming order.   pos (N,) -> order (N,) int64."""
    return np.argsort(pos, kind="stable").astype(np.int64)             # (N,)


def home_plan(ids, num_experts: int, order, eligible) -> Plan:
    """The expert-contiguous buffer of this rank's eligible assignments (no capacity here:
    capacity is decided by the owners, or already folded into `eligible`).
    ids (N, K), order (N,), eligible (N, K) bool -> Plan over M rows."""
    return plan_token_choice(ids, num_experts, None, order, eligible)


def rows_per_expert(plan: Plan, layout: Layout):
    """Rows this rank sends to each rank's each expert.   -> (Q, E/Q) int64."""
    return plan.counts.reshape(layout.ranks, layout.local)             # (Q, E/Q)


def row_claims(plan: Plan, layout: Layout, k: int, pos, num_tokens_all: int):
    """[local expert, claim] of every row of the home plan, in buffer order.
    pos (N,) claiming positions of this rank's tokens -> (M, 2) int64."""
    experts = np.repeat(np.arange(layout.num_experts, dtype=np.int64), plan.counts)   # (M,)
    choice = plan.rows_weight % k                                      # (M,) the rank r
    claim = choice * num_tokens_all + pos[plan.rows_token]             # (M,)
    return np.stack([experts % layout.local, claim], axis=1)           # (M, 2)


class Arrival(NamedTuple):
    """How received rows become one expert-contiguous buffer in one process's order."""
    perm: np.ndarray      # (I,) buffer row i is received row perm[i]
    offsets: np.ndarray   # (E/Q+1,) local expert j owns buffer rows offsets[j]:offsets[j+1]
    claims: np.ndarray    # (I, 2) [local expert, claim] of each buffer row


def arrange(claims, local: int) -> Arrival:
    """Sort received rows by (local expert, claim).   claims (I, 2) -> Arrival."""
    perm = np.lexsort((claims[:, 1], claims[:, 0])).astype(np.int64)   # (I,)
    counts = np.bincount(claims[:, 0], minlength=local)                # (E/Q,)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)   # (E/Q+1,)
    return Arrival(perm, offsets, claims[perm])


def keep_first(arrival: Arrival, cap: int):
    """Capacity at the owner: each expert keeps its cap rows of smallest claim.
    -> keep (I,) bool, in *received* order (to be sent back to the senders)."""
    counts = np.diff(arrival.offsets)                                  # (E/Q,)
    place = np.arange(len(arrival.perm)) - np.repeat(arrival.offsets[:-1], counts)   # (I,)
    keep = np.empty(len(arrival.perm), dtype=bool)                     # (I,)
    keep[arrival.perm] = place < cap
    return keep


def kept_per_sender(keep, recv_rows):
    """How many received rows each sender keeps.   keep (I,), recv_rows (Q,) -> (Q,) int64."""
    ends = np.cumsum(np.concatenate([[0], keep.astype(np.int64)]))     # (I+1,)
    bounds = np.concatenate([[0], np.cumsum(recv_rows)]).astype(np.int64)   # (Q+1,)
    return ends[bounds[1:]] - ends[bounds[:-1]]                        # (Q,)


def drop_rows(eligible, plan: Plan, keep):
    """eligible with the assignments of the rows not kept switched off.
    eligible (N, K) bool, keep (M,) bool per home-plan row -> (N, K) bool."""
    out = eligible.copy()                                              # (N, K)
    out.ravel()[plan.rows_weight[~keep]] = False
    return out


def expert_choice_home(token_ids, lo: int, hi: int, layout: Layout):
    """Expert choice: each expert took C tokens of the whole batch (token_ids (E, C), known to
    every rank); this rank's rows are its own tokens among them, expert by expert, each expert's
    in its choice order c, as plan_expert_choice orders them. -> home Plan over M rows and the
    rows' [local expert, claim = c] (M, 2)."""
    e, c = token_ids.shape
    mine = (token_ids >= lo) & (token_ids < hi)                        # (E, C)
    flat = np.flatnonzero(mine.ravel()).astype(np.int64)               # (M,) e-major, then c
    rows_token = token_ids.ravel()[flat].astype(np.int64) - lo         # (M,)
    token_rows = np.full((hi - lo, e), -1, dtype=np.int64)             # (N, E)
    token_rows[rows_token, flat // c] = np.arange(len(flat))
    offsets = np.concatenate([[0], np.cumsum(mine.sum(axis=1))]).astype(np.int64)   # (E+1,)
    claims = np.stack([(flat // c) % layout.local, flat % c], axis=1)  # (M, 2)
    return Plan(rows_token, flat, offsets, token_rows, c, 0), claims
