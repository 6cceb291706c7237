"""The two exchanges of an expert-parallel layer, forward and backward, as a pure pair.

    forward   gather rows at home -> Alltoallv -> owners' local experts -> Alltoallv back
              -> combine at home                                    x (N, D) -> y (N, D)
    backward  combine's backward at home -> Alltoallv the rows of dy -> the experts' backward
              -> Alltoallv the rows of dx back -> gather's backward at home

`plan_exchange` builds the RoutePlan first: the home plan, the counts (an
Alltoall), each row's [local expert, claim] (an Alltoallv), and, under a
capacity, the owners' keep/drop answer (an Alltoallv back). After it, every
rank knows the size of every message of both exchanges.

The rows of an expert are put in one process's order before its GEMMs
(parallel/plan.py), and each token's rows come home into the same places of
the home buffer as they would hold in one process's buffer: so the experts,
the combine and the gather's backward run the very same operations, and the
result is bit for bit one process's. Shape letters: N tokens of this rank,
D width, K choices, M rows it sends, I rows it receives, Q ranks (E/Q experts
each).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from moe_np import dispatch, lowp
from moe_np.experts import ragged_experts_backward, ragged_experts_forward
from moe_np.parallel import plan as ep_plan
from moe_np.parallel.exchange import Wire, exchange_counts, exchange_rows


class RoutePlan(NamedTuple):
    """Who sends which rows to whom; known to both sides before any row moves."""
    home: dispatch.Plan          # this rank's kept assignments, expert-contiguous, M rows
    send_rows: np.ndarray        # (Q,) rows this rank sends to each rank
    recv_rows: np.ndarray        # (Q,) rows it receives from each rank
    arrival: ep_plan.Arrival     # received rows -> this rank's experts' buffer (I rows)


def _route_plan(home, layout, recv_rows, arrival) -> RoutePlan:
    send_rows = ep_plan.rows_per_expert(home, layout).sum(axis=1)     # (Q,)
    return RoutePlan(home, send_rows, np.asarray(recv_rows, dtype=np.int64), arrival)


def exchange_claims(home, claims, layout: ep_plan.Layout, wire: Wire):
    """The counts (Alltoall), then each row's [local expert, claim] (Alltoallv).
    -> RoutePlan without arrival yet, the received claims (I, 2)."""
    counts_in = exchange_counts(wire, ep_plan.rows_per_expert(home, layout))   # (Q, E/Q)
    plan = _route_plan(home, layout, counts_in.sum(axis=1), None)
    return plan, exchange_rows(wire, claims, plan.send_rows, plan.recv_rows, "meta")   # (I, 2)


def plan_expert_choice_exchange(token_ids, lo: int, hi: int, layout: ep_plan.Layout,
                                wire: Wire) -> RoutePlan:
    """Expert choice: the choice was made on all tokens (every rank alike), so nothing is
    dropped at the owners: counts, claims (c, the place in the expert's choice), arrival."""
    home, claims = ep_plan.expert_choice_home(token_ids, lo, hi, layout)
    plan, claims_in = exchange_claims(home, claims, layout, wire)
    return plan._replace(arrival=ep_plan.arrange(claims_in, layout.local))


def plan_exchange(ids, pos, eligible, cap, layout: ep_plan.Layout, num_tokens_all: int,
                  wire: Wire) -> RoutePlan:
    """Counts first, then the claims, then (with a capacity) the owners' verdicts.

    ids (N, K); pos (N,) the tokens' places in the global claiming order;
    eligible (N, K) bool; cap: the capacity per expert decided at the owners
    (None: dropless, or capacity already folded into eligible)."""
    order = ep_plan.local_order(pos)                                   # (N,)
    home = ep_plan.home_plan(ids, layout.num_experts, order, eligible)
    claims = ep_plan.row_claims(home, layout, ids.shape[1], pos, num_tokens_all)   # (M, 2)
    plan, claims_in = exchange_claims(home, claims, layout, wire)      # (I, 2)
    arrival = ep_plan.arrange(claims_in, layout.local)
    if cap is None:
        return plan._replace(arrival=arrival)
    keep_in = ep_plan.keep_first(arrival, cap)                         # (I,) received order
    keep_home = exchange_rows(wire, keep_in.astype(np.uint8), plan.recv_rows, plan.send_rows,
                              "meta").astype(bool)                     # (M,)
    home = ep_plan.home_plan(ids, layout.num_experts, order,
                             ep_plan.drop_rows(eligible, home, keep_home))
    recv_rows = ep_plan.kept_per_sender(keep_in, plan.recv_rows)       # (Q,)
    return _route_plan(home, layout, recv_rows, ep_plan.arrange(claims_in[keep_in], layout.local))


class ExchangeCache(NamedTuple):
    gather_cache: tuple      # the strategy's gather cache (home side)
    x_buf: np.ndarray        # (I, D) the rows this rank's experts ran on, in their order
    experts_cache: tuple     # experts.RaggedCache of this rank's experts (owner side)
    combine_cache: tuple     # the strategy's combine cache (home side)
    padded: np.ndarray | None   # (I,) where each buffer row sits in the padded buffer, or None


def lone_rows(offsets, counts_all):
    """Local experts with one row here but more in the whole batch (other data-parallel
    replicas hold the rest).   offsets (E/Q+1,), counts_all (E/Q,) -> (E/Q,) bool."""
    return (np.diff(offsets) == 1) & (counts_all > 1)                 # (E/Q,)


def local_experts_forward(x_buf, params: dict, config, offsets, lone=None):
    """This rank's experts on their rows, as one process runs them (lowp's GEMM in low
    precision). x_buf (I, D) -> y_buf (I, D), RaggedCache, padded.

    A one-row segment goes through BLAS's matrix-vector product, whose sum
    order differs from the matrix-matrix product one process used for that
    expert's several rows. So an expert in `lone` (E/Q,) bool gets its row
    twice (a 2-row segment, the same bits as in any taller product); padded
    (I,) says where each row sits, and the copy is dropped."""
    gemm, pointwise = lowp.gemm_for(config.precision), dispatch.pointwise_for(config.dispatch)
    if lone is None or not lone.any():
        return (*ragged_experts_forward(x_buf, params, config.expert, offsets, gemm=gemm,
                                        pointwise=pointwise), None)
    extra = np.repeat(lone, np.diff(offsets))                         # (I,) rows to duplicate
    take = np.repeat(np.arange(len(x_buf)), 1 + extra)                # (I_p,)
    padded = np.cumsum(1 + extra) - 1 - extra                         # (I,) first copy of each
    offsets_p = offsets + np.concatenate([[0], np.cumsum(lone)])      # (E/Q+1,)
    y_p, cache = ragged_experts_forward(x_buf[take], params, config.expert, offsets_p, gemm=gemm,
                                        pointwise=pointwise)
    return y_p[padded], cache, padded


def local_experts_backward(dy_buf, cache, padded):
    """The experts' backward on their rows (the padding's copies get zero gradient).
    dy_buf (I, D) -> dx_buf (I, D), grads."""
    if padded is None:
        return ragged_experts_backward(dy_buf, cache)
    dy_p = np.zeros((int(cache.offsets[-1]), dy_buf.shape[1]), dtype=dy_buf.dtype)   # (I_p, D)
    dy_p[padded] = dy_buf
    dx_p, grads = ragged_experts_backward(dy_p, cache)
    return dx_p[padded], grads


def _unsort(buf, perm):
    """Back to received order: out[perm[i]] = buf[i].   (I, D) -> (I, D)."""
    out = np.empty_like(buf)                                           # (I, D)
    out[perm] = buf
    return out


def exchange_forward(x, weights, route: RoutePlan, params: dict, config, wire: Wire, lone=None):
    """y[n] = sum over token n's kept rows of w * f_e(x[n]), the experts living on other ranks.
    x (N, D), weights (N, K) -> y (N, D), ExchangeCache. lone: see local_experts_forward."""
    strategy = dispatch.get_strategy(config.dispatch)
    x_send, gather_cache = strategy.gather_forward(x, route.home)      # (M, D)
    x_in = exchange_rows(wire, x_send, route.send_rows, route.recv_rows)   # (I, D)
    x_buf = x_in[route.arrival.perm]                                   # (I, D) one process's order
    y_buf, experts_cache, padded = local_experts_forward(x_buf, params, config,
                                                         route.arrival.offsets, lone)
    y_home = exchange_rows(wire, _unsort(y_buf, route.arrival.perm), route.recv_rows,
                           route.send_rows)                            # (M, D)
    y, combine_cache = strategy.combine_forward(y_home, weights, route.home)   # (N, D)
    return y, ExchangeCache(gather_cache, x_buf, experts_cache, combine_cache, padded)


def exchange_backward(dy, route: RoutePlan, cache: ExchangeCache, config, wire: Wire):
    """dy (N, D) -> dx (N, D) through the experts, dweights (N, K), this rank's expert grads,
    and dy_buf (I, D) (the rows of dy its experts saw, for a data-parallel reduction)."""
    strategy = dispatch.get_strategy(config.dispatch)
    dy_home, dweights = strategy.combine_backward(dy, cache.combine_cache)   # (M, D), (N, K)
    dy_home = lowp.round_output(dy_home, config.precision, out=dy_home)   # named step, in place
    dy_in = exchange_rows(wire, dy_home, route.send_rows, route.recv_rows)   # (I, D)
    dy_buf = dy_in[route.arrival.perm]                                 # (I, D)
    dx_buf, grads = local_experts_backward(dy_buf, cache.experts_cache, cache.padded)
    dx_home = exchange_rows(wire, _unsort(dx_buf, route.arrival.perm), route.recv_rows,
                            route.send_rows)                           # (M, D)
    dx = strategy.gather_backward(dx_home, cache.gather_cache)         # (N, D)
    return dx, dweights, grads, dy_buf
