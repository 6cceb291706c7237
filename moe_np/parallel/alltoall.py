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
D width, K choices, M rows it sends, I rows it receives, P ranks, L experts
per rank.
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
    send_rows: np.ndarray        # (P,) rows this rank sends to each rank
    recv_rows: np.ndarray        # (P,) rows it receives from each rank
    arrival: ep_plan.Arrival     # received rows -> this rank's experts' buffer (I rows)


def _route_plan(home, layout, recv_rows, arrival) -> RoutePlan:
    send_rows = ep_plan.rows_per_expert(home, layout).sum(axis=1)     # (P,)
    return RoutePlan(home, send_rows, np.asarray(recv_rows, dtype=np.int64), arrival)


def plan_exchange(ids, pos, eligible, cap, layout: ep_plan.Layout, num_tokens_all: int,
                  wire: Wire) -> RoutePlan:
    """Counts first, then the claims, then (with a capacity) the owners' verdicts.

    ids (N, K); pos (N,) the tokens' places in the global claiming order;
    eligible (N, K) bool; cap: the capacity per expert decided at the owners
    (None: dropless, or capacity already folded into eligible)."""
    order = ep_plan.local_order(pos)                                   # (N,)
    home = ep_plan.home_plan(ids, layout.num_experts, order, eligible)
    counts_in = exchange_counts(wire, ep_plan.rows_per_expert(home, layout))   # (P, L)
    plan = _route_plan(home, layout, counts_in.sum(axis=1), None)
    claims = ep_plan.row_claims(home, layout, ids.shape[1], pos, num_tokens_all)   # (M, 2)
    claims_in = exchange_rows(wire, claims, plan.send_rows, plan.recv_rows, "meta")   # (I, 2)
    arrival = ep_plan.arrange(claims_in, layout.local)
    if cap is None:
        return plan._replace(arrival=arrival)
    keep_in = ep_plan.keep_first(arrival, cap)                         # (I,) received order
    keep_home = exchange_rows(wire, keep_in.astype(np.uint8), plan.recv_rows, plan.send_rows,
                              "meta").astype(bool)                     # (M,)
    home = ep_plan.home_plan(ids, layout.num_experts, order,
                             ep_plan.drop_rows(eligible, home, keep_home))
    recv_rows = ep_plan.kept_per_sender(keep_in, plan.recv_rows)       # (P,)
    return _route_plan(home, layout, recv_rows, ep_plan.arrange(claims_in[keep_in], layout.local))


class ExchangeCache(NamedTuple):
    gather_cache: tuple      # the strategy's gather cache (home side)
    experts_cache: tuple     # experts.RaggedCache of this rank's experts (owner side)
    combine_cache: tuple     # the strategy's combine cache (home side)


def local_experts_forward(x_buf, params: dict, config, offsets):
    """This rank's experts on their rows, as one process runs them (lowp's GEMM in low precision).
    x_buf (I, D) -> y_buf (I, D), RaggedCache."""
    gemm = lowp.gemm_for(config.precision)
    return ragged_experts_forward(x_buf, params, config.expert, offsets, gemm=gemm)


def _unsort(buf, perm):
    """Back to received order: out[perm[i]] = buf[i].   (I, D) -> (I, D)."""
    out = np.empty_like(buf)                                           # (I, D)
    out[perm] = buf
    return out


def exchange_forward(x, weights, route: RoutePlan, params: dict, config, wire: Wire):
    """y[n] = sum over token n's kept rows of w * f_e(x[n]), the experts living on other ranks.
    x (N, D), weights (N, K) -> y (N, D), ExchangeCache."""
    strategy = dispatch.get_strategy(config.dispatch)
    x_send, gather_cache = strategy.gather_forward(x, route.home)      # (M, D)
    x_in = exchange_rows(wire, x_send, route.send_rows, route.recv_rows)   # (I, D)
    y_buf, experts_cache = local_experts_forward(x_in[route.arrival.perm], params, config,
                                                 route.arrival.offsets)   # (I, D)
    y_home = exchange_rows(wire, _unsort(y_buf, route.arrival.perm), route.recv_rows,
                           route.send_rows)                            # (M, D)
    y, combine_cache = strategy.combine_forward(y_home, weights, route.home)   # (N, D)
    return y, ExchangeCache(gather_cache, experts_cache, combine_cache)


def exchange_backward(dy, route: RoutePlan, cache: ExchangeCache, config, wire: Wire):
    """dy (N, D) -> dx (N, D) through the experts, dweights (N, K), this rank's expert grads,
    and dy_buf (I, D) (the rows of dy its experts saw, for a data-parallel reduction)."""
    strategy = dispatch.get_strategy(config.dispatch)
    dy_home, dweights = strategy.combine_backward(dy, cache.combine_cache)   # (M, D), (N, K)
    dy_home = lowp.round_output(dy_home, config.precision)             # named step, as one process
    dy_in = exchange_rows(wire, dy_home, route.send_rows, route.recv_rows)   # (I, D)
    dy_buf = dy_in[route.arrival.perm]                                 # (I, D)
    dx_buf, grads = ragged_experts_backward(dy_buf, cache.experts_cache)   # (I, D)
    dx_home = exchange_rows(wire, _unsort(dx_buf, route.arrival.perm), route.recv_rows,
                            route.send_rows)                           # (M, D)
    dx = strategy.gather_backward(dx_home, cache.gather_cache)         # (N, D)
    return dx, dweights, grads, dy_buf
