"""ExpertParallelMoE: SparseMoE with its routed experts spread over the ranks of an MPI world.

    route    every rank routes its own N tokens (router replicated)     ids, weights (N, K)
    plan     counts (Alltoall), claims (Alltoallv), capacity verdicts   RoutePlan
    dispatch rows to the ranks that own their experts (Alltoallv)       (M, D) -> (I, D)
    experts  each rank's E / ep experts on their rows                 (I, D)
    return   the results back home (Alltoallv)                          (I, D) -> (M, D)
    combine  at home, each token's rows in one process's order          (N, D)
    shared   replicated shared experts on the rank's own tokens         (N, D)
    aux      on the gathered routing of all Z tokens (same on every rank)

Expert choice (each expert takes its C best tokens of the whole batch) gathers the
logits and chooses alike on every rank; it needs dp = 1 and grad_sync="gather".

Backward mirrors it: the rows of dy go out, the rows of dx come back, the
expert gradients stay with their owners (summed over data-parallel
replicas), and the replicated parameters' gradients are reduced over the
world. grad_sync chooses how: "gather" gathers the pieces (x, dy and the
routing weights' gradient) and computes each replicated gradient as one
process does, bit for bit; "allreduce" sums every rank's partial gradient
with MPI_Allreduce, which is what a framework does: far fewer bytes, equal
to one process up to the order of a sum.

With the same parameters and the same global batch, the forward, the aux
loss, dx and (with "gather") every gradient equal one-process SparseMoE's
bit for bit: capacity is global per expert (within each expert-parallel
group) as in one process; a per-source-rank capacity is the one-process
layer with capacity_scope="sequence" and seq_len = tokens per rank
(`per_rank_capacity`). Shape letters: N tokens of this rank, Z of all
ranks, D width, E experts, K choices, M rows sent, I rows received.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from moe_np import balance, dispatch, functional, lowp, routers, validate
from moe_np.config import SparseConfig
from moe_np.dispatch.plan import sequence_capacity_eligible
from moe_np.experts import expert_kind, ragged_experts_backward
from moe_np.layer import Layer, RoutingStats
from moe_np.parallel import alltoall, groups as ep_groups, plan as ep_plan
from moe_np.parallel.exchange import Traffic, Wire, gather_columns, gather_rows, sum_everywhere
from moe_np.sparse import (init_sparse_params, routing_draws, shared_experts_backward,
                           shared_experts_forward)

GRAD_SYNCS = ("gather", "allreduce")
OWNER = "ExpertParallelMoE"


class Draws(NamedTuple):
    """One process's random draws for all Z tokens (every rank draws the same)."""
    noise: np.ndarray | None     # (Z, E) noisy_topk's standard-normal draws
    drop_seed: int | None        # the random drop policy's seed
    jitter: np.ndarray | None    # (Z, D) the router's input noise
    bias: np.ndarray | None      # (E,) the selection bias this forward used


class Span(NamedTuple):
    """This rank's tokens in the global batch: rows lo:hi of Z, in world-rank order."""
    lo: int
    hi: int
    total: int                   # Z
    sizes: np.ndarray            # (dp*ep,) tokens of every world rank


class Seen(NamedTuple):
    """What every rank sees of all Z tokens' routing (gathered only when something needs it)."""
    ids: np.ndarray | None       # (Z, K) for the aux loss and the selection-bias update
    weights: np.ndarray | None   # (Z, K) for the aux loss (importance)
    logits: np.ndarray | None    # (Z, E) for the aux loss
    load: np.ndarray | None      # (E,) noisy_topk's load estimate over all tokens
    mask: np.ndarray | None      # (Z,) real tokens, None when every token is real
    top: np.ndarray | None       # (Z, 1) each token's top weight (the priority drop policy)


class EPCache(NamedTuple):
    x: np.ndarray                # (N, D)
    span: Span
    draws: Draws
    route: routers.RouterOut     # this rank's routing
    router_cache: routers.RouterCache
    plan: alltoall.RoutePlan
    exchange: alltoall.ExchangeCache
    shared_cache: tuple | None
    aux_cache: balance.AuxCache | None   # on all Z tokens, None when there is no aux loss


def per_rank_capacity(config: SparseConfig, tokens_per_rank: int) -> SparseConfig:
    """The config whose capacity counts per source rank (each rank's tokens have their own C
    slots per expert, as GShard-style frameworks do): in one process it is capacity per
    sequence of tokens_per_rank tokens, and ExpertParallelMoE decides it locally."""
    return dataclasses.replace(config, capacity_scope="sequence", seq_len=tokens_per_rank)


def one_process_twin(config: SparseConfig, dp: int, tokens_per_group: int) -> SparseConfig:
    """The SparseMoE config that computes what ExpertParallelMoE(config, ..., dp=dp) computes on
    the same global batch. Capacity is counted within each expert-parallel group (the tokens
    never leave it); with dp > 1 that is, in one process, capacity per sequence of the group's
    tokens_per_group tokens (groups hold consecutive blocks of the batch, in world-rank order)."""
    if dp == 1 or config.capacity_factor is None or config.capacity_scope == "sequence":
        return config
    if config.seq_len is not None:
        raise ValueError(f"one_process_twin: with dp={dp}, capacity per expert-parallel group is "
                         f"one process's capacity per sequence, but seq_len={config.seq_len} "
                         f"already means something else here; use capacity_scope='sequence'")
    return per_rank_capacity(config, tokens_per_group)


def node_limited(config: SparseConfig, num_nodes: int, max_nodes: int) -> SparseConfig:
    """DeepSeek-V3's node-limited routing as chapter 8's group-limited routing: one expert group
    per node (experts are laid out node by node), each token's experts within max_nodes groups."""
    if config.router != "sigmoid_bias":
        raise ValueError(f"node_limited: group-limited routing needs router='sigmoid_bias', "
                         f"got {config.router!r}")
    return dataclasses.replace(config, n_group=num_nodes, topk_group=max_nodes)


def _check_config(config, grad_sync: str, dtype) -> None:
    if not isinstance(config, SparseConfig):
        raise ValueError(f"{OWNER}: config must be a SparseConfig, got {type(config).__name__}")
    if config.precision.compute != "fp32" and dtype != np.float32:
        raise ValueError(f"{OWNER}: config.precision.compute={config.precision.compute!r} "
                         f"simulates low precision on float32 arrays, but dtype={dtype}")
    validate.one_of(OWNER, "grad_sync", grad_sync, GRAD_SYNCS)
    if config.dispatch == "einsum":
        raise ValueError(f"{OWNER}: dispatch='einsum' uses the padded (E, C, D) layout; expert "
                         f"parallelism moves ragged rows, use 'numba' or 'numpy'")
    if config.router == "expert_choice" and grad_sync != "gather":
        raise ValueError(f"{OWNER}: router='expert_choice' chooses tokens over the whole batch; "
                         f"its gradient is computed on the gathered batch: use grad_sync='gather'")


def _sizes(world_size: int, ep: int | None, dp: int | None) -> tuple[int, int]:
    """(ep, dp) from what was given, the missing one from the world size (0 when it does not
    divide: check_layout then says so); neither given: the whole world is one EP group."""
    if ep is None:
        ep = world_size // (dp or 1) if world_size % (dp or 1) == 0 else 0
    if dp is None:
        dp = world_size // ep if ep and world_size % ep == 0 else 0
    return ep, dp


class ExpertParallelMoE(Layer):
    """A sparse MoE layer over an MPI world (see the module docstring).

    ExpertParallelMoE(config, comm, seed=0, dtype=np.float64, ep=None, dp=None,
    ranks_per_node=None, grad_sync="gather"). Every rank builds it with the
    same arguments; the parameters are SparseMoE(config, seed=seed)'s, the
    routed experts split over the ep ranks of each expert-parallel group.
    `params` holds the replicated router and shared experts whole and this
    rank's E / ep experts under the usual names ((E/Q, ...) arrays); `gather_params()`
    and `gather_grads()` give the whole set on every rank.
    """

    def __init__(self, config: SparseConfig, comm, *, seed: int = 0, dtype=np.float64,
                 ep: int | None = None, dp: int | None = None, ranks_per_node: int | None = None,
                 grad_sync: str = "gather"):
        super().__init__(dtype)
        _check_config(config, grad_sync, self.dtype)
        validate.integer(OWNER, "seed", seed, minimum=0)
        world_size = comm.Get_size()
        ep, dp = _sizes(world_size, ep, dp)
        ep_plan.check_layout(OWNER, config.num_experts, ep, dp, world_size)
        if config.router == "expert_choice" and dp > 1:
            raise ep_groups.AgreedError(f"{OWNER}: expert choice picks from the whole batch, "
                                        f"which data-parallel groups split; got dp={dp}")
        ep_groups.check_agreement(comm, OWNER, ep_groups.describe(
            config, seed=seed, dtype=str(self.dtype), ep=ep, dp=dp, grad_sync=grad_sync,
            ranks_per_node=ranks_per_node))
        self.config, self.grad_sync = config, grad_sync
        self.groups = ep_groups.make_groups(comm, ep, dp, ranks_per_node)
        self.layout = ep_plan.Layout(config.num_experts, ep)
        self.traffic = Traffic(world_size, comm.Get_rank())
        self.params = self._local_params(init_sparse_params(config, np.random.default_rng(seed),
                                                            self.dtype))
        self.init_grads()
        if config.router == "sigmoid_bias":
            self.buffers["selection_bias"] = np.zeros(config.num_experts, dtype=self.dtype)   # (E,)
        self.rngs["routing"] = np.random.default_rng(seed + 1)

    # -- where things live --------------------------------------------------------------

    def _expert_names(self) -> tuple:
        return expert_kind(self.config.expert).names

    def _local_params(self, full: dict) -> dict:
        """Replicated parameters whole; routed experts: this rank's E / ep of them (copies)."""
        lo = self.layout.first_expert(self.groups.ep_rank)
        hi = lo + self.layout.local
        return {k: (v[lo:hi].copy() if k in self._expert_names() else v) for k, v in full.items()}

    def wire(self, which: str = "ep") -> Wire:
        """The expert-parallel group, the data-parallel group, or the world, with the ledger."""
        g = self.groups
        comm, ranks = {"ep": (g.ep_comm, g.ep_ranks), "dp": (g.dp_comm, g.dp_ranks),
                       "world": (g.world, g.world_ranks)}[which]
        return Wire(comm, ranks, self.traffic)

    def gather_params(self) -> dict:
        """Every parameter whole, on every rank (experts gathered over the EP group)."""
        return self._gather_experts(self.params)

    def gather_grads(self) -> dict:
        return self._gather_experts(self.grads)

    def _gather_experts(self, arrays: dict) -> dict:
        g = self.groups
        return {k: (np.concatenate(g.ep_comm.allgather(v)) if k in self._expert_names() else v)
                for k, v in arrays.items()}

    def load_params(self, full: dict) -> None:
        """Set every parameter from a whole set (as SparseMoE.params holds it)."""
        for k, v in self._local_params(full).items():
            self.params[k][...] = v

    # -- forward ------------------------------------------------------------------------

    def _check_input(self, x, mask) -> None:
        fn, c = f"{OWNER}.forward", self.config
        validate.ndim(fn, "x", x, 2)
        if x.shape[1] != c.d_model or x.dtype != self.dtype:
            raise ValueError(f"{fn}: x must be ({len(x)}, D={c.d_model}) {self.dtype}, got "
                             f"{x.shape} {x.dtype}")
        if c.seq_len is not None and len(x) % c.seq_len:
            raise ValueError(f"{fn}: this rank's N={len(x)} tokens are not whole sequences of "
                             f"seq_len={c.seq_len} (a sequence may not straddle ranks)")
        if mask is not None:
            validate.shape(fn, "mask", mask, (len(x),))
            if np.asarray(mask).dtype != bool:
                raise ValueError(f"{fn}: mask must be bool, got {np.asarray(mask).dtype}")
            if c.router in ("noisy_topk", "expert_choice") or c.cv_coef or c.seq_aux_coef:
                raise ValueError(f"{fn}: a token mask is supported for the softmax and "
                                 f"sigmoid_bias routers without cv or sequence-wise losses")
        if c.precision.compute == "fp32":
            validate.finite(fn, "x", x)

    def _span(self, n: int) -> Span:
        sizes = np.asarray(self.groups.world.allgather(n), dtype=np.int64)   # (dp*ep,)
        lo = int(sizes[:self.groups.world.Get_rank()].sum())
        return Span(lo, lo + n, int(sizes.sum()), sizes)

    def _draws(self, total: int) -> Draws:
        """SparseMoE's draws for all Z tokens, in its order (noise, drop seed, jitter)."""
        noise, drop_seed, jitter = routing_draws(self.config, self.rngs["routing"], self.training,
                                                 total, self.dtype)     # (Z, E), seed, (Z, D)
        bias = self.buffers.get("selection_bias")
        return Draws(noise, drop_seed, jitter, None if bias is None else bias.copy())

    def _route(self, x, span: Span, draws: Draws):
        """The replicated router on this rank's tokens (its rows of the draws)."""
        rows = slice(span.lo, span.hi)
        x_router = x if draws.jitter is None else x * draws.jitter[rows]   # (N, D)
        noise = None if draws.noise is None else draws.noise[rows]     # (N, E)
        return routers.router_forward(x_router, self.params, self.config, bias=draws.bias,
                                      noise=noise)

    def forward(self, x, mask=None):
        """x (N, D), this rank's tokens -> y (N, D); mask (N,) bool marks real tokens."""
        self._check_input(x, mask)
        c = self.config
        span = self._span(len(x))
        draws = self._draws(span.total)
        route, router_cache, seen, plan, dropped = self._routing(x, mask, span, draws)
        self._aux, aux_cache = self._aux_forward(seen)
        y, exchange_cache = alltoall.exchange_forward(x, route.weights, plan, self.params, c,
                                                      self.wire("ep"), self._lone(plan))   # (N, D)
        y_shared, shared_cache = shared_experts_forward(x, self.params, c)
        if y_shared is not None:
            y += y_shared                                              # (N, D)
        y = lowp.round_output(y, c.precision, out=y)                   # named step, in place
        self._cache = EPCache(x, span, draws, route, router_cache, plan, exchange_cache,
                              shared_cache, aux_cache)
        self._after_forward(route, plan, dropped, seen)
        return y                                                       # (N, D)

    def _routing(self, x, mask, span: Span, draws: Draws):
        """Route, gather what every rank must see, plan the exchange.
        -> route, router cache (None for expert choice), Seen, RoutePlan, assignments dropped."""
        if self.config.router == "expert_choice":
            return self._expert_choice_routing(x, span)
        route, router_cache = self._route(x, span, draws)
        mask = np.ones(len(x), dtype=bool) if mask is None else mask   # (N,)
        seen = self._gather_routing(route, router_cache, mask, span)
        return (route, router_cache, seen) + self._plan(route, mask, span, draws, seen)

    def _expert_choice_routing(self, x, span: Span):
        """Expert choice picks tokens over the whole batch: each rank projects its own tokens,
        the logits are gathered, and every rank makes the same choice on all of them."""
        c = self.config
        w_router = self.params["w_router"]                             # (D, E)
        logits = (lowp.gemm_for(c.precision)(x, w_router) if c.precision.router == "compute"
                  else x @ w_router)                                   # (N, E) as router_forward
        logits_all = gather_columns(self.wire("world"), {"logits": logits}, "aux",
                                    span.sizes)["logits"]              # (Z, E)
        route, _ = routers.ROUTERS["expert_choice"].select(logits_all, c, None)
        plan = alltoall.plan_expert_choice_exchange(route.token_ids, span.lo, span.hi,
                                                    self.layout, self.wire("ep"))
        return route, None, Seen(None, None, logits_all, None, None, None), plan, 0

    def _gather_routing(self, route, router_cache, mask, span: Span) -> Seen:
        """Gather over the world, in one Allgatherv, what the aux loss, the bias update and the
        priority order need of every token (each piece only if something uses it)."""
        c = self.config
        aux_on = bool(c.balance_coef or c.z_coef or c.cv_coef or c.seq_aux_coef)
        need_ids = aux_on or (self.training and c.bias_gamma > 0)
        wanted = {"ids": (need_ids, route.ids), "weights": (aux_on, route.weights),
                  "logits": (aux_on, route.logits), "mask": (need_ids, mask),
                  "top": (c.drop_policy == "priority", route.weights[:, :1]),
                  "z": (aux_on and route.load_estimate is not None,
                        getattr(router_cache.select_cache, "z", None))}
        got = gather_columns(self.wire("world"), {k: v for k, (on, v) in wanted.items() if on},
                             "aux", span.sizes)
        load = None
        if "z" in got:
            load = functional.normal_cdf(got["z"]).sum(axis=0)         # (E,) as one process sums
        mask_all = got.get("mask")                                     # (Z,) bool
        if mask_all is not None and mask_all.all():
            mask_all = None
        return Seen(got.get("ids"), got.get("weights"), got.get("logits"), load, mask_all,
                    got.get("top"))

    def _aux_forward(self, seen: Seen):
        """The aux loss of all Z tokens, computed alike on every rank (0.0 and no cache if off)."""
        if seen.logits is None or (seen.mask is not None and not seen.mask.any()):
            return 0.0, None
        route_all = routers.RouterOut(seen.ids, seen.weights, seen.logits, None, seen.load)
        return balance.aux_forward(route_all, self.config, seen.mask, seq_len=self.config.seq_len)

    def _plan(self, route, mask, span: Span, draws: Draws, seen: Seen):
        """The claiming order of all Z tokens, eligibility and capacity, then plan_exchange."""
        c = self.config
        top = seen.top if seen.top is not None else np.zeros((span.total, 1), self.dtype)   # (Z, 1)
        order_all = dispatch.token_order(top, c.drop_policy, draws.drop_seed)   # (Z,)
        pos = ep_plan.claim_positions(order_all)[span.lo:span.hi]     # (N,)
        eligible = np.repeat(mask[:, None], c.k, axis=1)               # (N, K)
        cap = None
        if c.capacity_factor is not None and c.capacity_scope == "sequence":
            seq_cap = dispatch.capacity(c.seq_len, c.num_experts, c.k, c.capacity_factor,
                                        c.min_capacity)
            eligible = sequence_capacity_eligible(route.ids, c.num_experts, seq_cap,
                                                  ep_plan.local_order(pos), c.seq_len, eligible)
        elif c.capacity_factor is not None:
            active = sum_everywhere(self.wire("ep"), np.array([mask.sum()], dtype=np.int64), "meta")
            cap = dispatch.capacity(int(active[0]), c.num_experts, c.k, c.capacity_factor,
                                    c.min_capacity)
        plan = alltoall.plan_exchange(route.ids, pos, eligible, cap, self.layout, span.total,
                                      self.wire("ep"))
        return plan, int(mask.sum()) * c.k - len(plan.home.rows_token)

    def _lone(self, plan):
        """With data-parallel replicas: this rank's experts that got one row here but more in
        the whole batch (alltoall.local_experts_forward runs them as two)."""
        if self.groups.dp == 1:
            return None
        counts_all = sum_everywhere(self.wire("dp"), np.diff(plan.arrival.offsets), "meta")   # (E/Q,)
        return alltoall.lone_rows(plan.arrival.offsets, counts_all)

    def _after_forward(self, route, plan, dropped: int, seen: Seen) -> None:
        """Statistics of all tokens (counts and drops summed over the world); the bias step."""
        c, world = self.config, self.wire("world")
        both = sum_everywhere(world, np.append(plan.home.counts, dropped), "aux")   # (E+1,) int64
        counts, total_dropped = both[:-1], int(both[-1])               # (E,), scalar
        self.stats = RoutingStats(route.ids, route.weights, counts, total_dropped, route.logits)
        if self.training and c.bias_gamma > 0:
            bias = self.buffers["selection_bias"]
            ids = seen.ids if seen.mask is None else seen.ids[seen.mask]   # real tokens only
            bias[...] = balance.update_selection_bias(bias, ids, c.bias_gamma,
                                                      centred=c.bias_update == "centred")

    # -- backward -----------------------------------------------------------------------

    def backward(self, dy, aux_scale: float = 1.0):
        """dy (N, D) for this rank's tokens -> dx (N, D); fills grads (experts: this rank's)."""
        aux_scale = self.check_backward(dy, aux_scale)
        c, cache = self.config, self._cache
        dx, dweights, expert_grads, dy_buf = alltoall.exchange_backward(
            dy, cache.plan, cache.exchange, c, self.wire("ep"))        # (N, D), (N, K)
        if self.groups.dp > 1:
            expert_grads = self._sync_expert_grads(expert_grads, cache, dy_buf)
        if self.grad_sync == "gather":
            dx_shared, dx_router, grads = self._replicated_backward_gathered(dy, dweights,
                                                                         aux_scale, cache)
        else:
            dx_shared, dx_router, grads = self._replicated_backward_local(dy, dweights,
                                                                      aux_scale, cache)
        if dx_shared is not None:
            dx += dx_shared                                            # (N, D)
        dx += dx_router                                                # (N, D)
        self.set_grads(expert_grads | grads)
        return lowp.round_output(dx, c.precision, out=dx)              # (N, D) in place

    def _replicated_backward_gathered(self, dy, dweights, aux_scale, cache: EPCache):
        """Gather x, dy and dweights of all Z tokens and run the router's and the shared
        experts' backward on them exactly as one process does; keep this rank's rows of dx."""
        c, world, d = self.config, self.wire("world"), cache.draws
        rows = slice(cache.span.lo, cache.span.hi)
        choice = c.router == "expert_choice"          # dweights (E, C): one rank owns each entry
        pieces = {"x": cache.x} | ({} if choice else {"dweights": dweights})
        if cache.shared_cache is not None:
            pieces["dy"] = dy
        got = gather_columns(world, pieces, "grads", cache.span.sizes)
        x_all = got["x"]                                               # (Z, D)
        dweights_all = sum_everywhere(world, dweights) if choice else got["dweights"]   # (Z, K)
        x_router = x_all if d.jitter is None else x_all * d.jitter     # (Z, D)
        _, router_cache = routers.router_forward(x_router, self.params, c, bias=d.bias,
                                                 noise=d.noise)       # recomputed, same bits
        aux_grads = None if cache.aux_cache is None else balance.aux_backward(aux_scale,
                                                                          cache.aux_cache)
        dx_router, grads = routers.router_backward(dweights_all, router_cache, aux_grads)
        dx_router = dx_router[rows] if d.jitter is None else dx_router[rows] * d.jitter[rows]
        if cache.shared_cache is None:
            return None, dx_router, grads
        _, shared_cache = shared_experts_forward(x_all, self.params, c)
        dx_shared, shared_grads = shared_experts_backward(got["dy"], shared_cache, self.params, c)
        return dx_shared[rows], dx_router, grads | shared_grads

    def _replicated_backward_local(self, dy, dweights, aux_scale, cache: EPCache):
        """Each rank's partial gradients of the replicated parameters, summed by Allreduce."""
        c, d = self.config, cache.draws
        rows = slice(cache.span.lo, cache.span.hi)
        aux_grads = None
        if cache.aux_cache is not None:
            g = balance.aux_backward(aux_scale, cache.aux_cache)       # on all Z tokens
            aux_grads = balance.AuxGrads(None if g.dlogits is None else g.dlogits[rows],
                                         None if g.dweights is None else g.dweights[rows],
                                         g.dload)
        dx_router, grads = routers.router_backward(dweights, cache.router_cache, aux_grads)
        if d.jitter is not None:
            dx_router = dx_router * d.jitter[rows]                     # (N, D)
        dx_shared = None
        if cache.shared_cache is not None:
            dx_shared, shared_grads = shared_experts_backward(dy, cache.shared_cache,
                                                              self.params, c)
            grads |= shared_grads
        world = self.wire("world")
        return dx_shared, dx_router, {k: sum_everywhere(world, v) for k, v in grads.items()}

    def _sync_expert_grads(self, grads: dict, cache: EPCache, dy_buf):
        """The data-parallel replicas of these experts: "allreduce" sums their gradients;
        "gather" gathers their rows (x, dy and claims), merges them into one process's
        order and runs the experts' backward once on all of them."""
        wire = self.wire("dp")
        if self.grad_sync == "allreduce":
            return {k: sum_everywhere(wire, v) for k, v in grads.items()}
        arrival = cache.plan.arrival
        sizes = wire.comm.allgather(len(dy_buf))                       # (dp,) rows of each replica
        claims = gather_rows(wire, arrival.claims, "grads", sizes)     # (I_all, 2)
        x_buf = gather_rows(wire, cache.exchange.x_buf, "grads", sizes)   # (I_all, D)
        dy_all = gather_rows(wire, dy_buf, "grads", sizes)             # (I_all, D)
        merged = ep_plan.arrange(claims, self.layout.local)
        _, experts_cache, _ = alltoall.local_experts_forward(x_buf[merged.perm], self.params,
                                                             self.config, merged.offsets)
        return ragged_experts_backward(dy_all[merged.perm], experts_cache)[1]
