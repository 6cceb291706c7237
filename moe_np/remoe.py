"""ReMoE: a ReLU router whose sparsity an adaptive L1 penalty steers (Wang, Zhu and Chen, 2024).

    logits     a = x W_router                                       (N, E)
    weights    w = relu(a)                                           (N, E)
    experts    y_n = sum over e with w_ne > 0 of w_ne f_e(x_n)       (N, D)
    penalty    aux = lambda * l1,   l1 = (1/N) sum_n sum_e w_ne      scalar  (w >= 0, so |w| = w)
    controller lambda <- lambda * alpha ** sign(target - sparsity)    after every training step
               sparsity = fraction of the N*E weights that are 0;  target = 1 - K/E

An expert is active for a token exactly when its weight is positive, so a
token may use any number of experts, 0 to E; the controller only steers the
average toward K (the paper's rule, with alpha = 1.2 and lambda_0 = 1e-8:
too few zeros and lambda grows, too many and it shrinks, so the penalty
pushes the sparsity to its target). Nothing is discrete but relu itself:
the output is continuous in every weight, and the only kink is relu at 0.

The router has no bias, as in the paper, so expert e is active on a
half-space through the origin, x w_e > 0. On inputs centred at 0 that holds
for about half the tokens whatever the norm of w_e: the penalty can then
only shrink the router, not sparsify it, and lambda grows without bound.
A transformer's hidden states are far from centred; synthetic inputs need
an offset (or a constant feature) for the controller to have a lever.

Each expert runs on its active tokens only. In the terms of the dispatch
spec (dispatch/plan.py), every token lists all E experts, ids[n] = (0, 1,
..., E-1), the ReLU pattern is the eligibility mask (w > 0), and there is
no capacity: the plan lays the active (token, expert) pairs out
expert-contiguously (`active_plan`, tested equal to the spec's plan), and
the reference strategy's gather, ragged experts and combine, SparseMoE's
own, run them; a row's weight is w[n, e], read through the plan's flat
index into w. Inactive pairs own no row: they cost nothing, add exactly
0 to y and receive exactly 0 gradient (relu' = 0 there anyway).

Shape letters: N tokens, D width, H expert hidden width, E experts, M active pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from moe_np import validate
from moe_np.dispatch import reference
from moe_np.dispatch.plan import Plan
from moe_np.experts import EXPERTS, expert_kind, init_experts
from moe_np.layer import Layer, RoutingStats

ALPHA = 1.2          # the controller's step factor (the paper's default)
L1_INIT = 1e-8       # lambda_0 (the paper's default)


@dataclass(frozen=True, kw_only=True)
class ReMoEConfig:
    """A ReMoE layer: E experts, about K of them active per token on average."""
    d_model: int                 # D
    num_experts: int             # E
    d_hidden: int                # H
    k: int = 2                   # target active experts per token: target sparsity 1 - K/E
    expert: str = "mlp"          # mlp (ReLU) | swiglu
    alpha: float = ALPHA         # lambda *= alpha ** sign(target - sparsity), alpha > 1
    l1_init: float = L1_INIT     # lambda before the first step
    router_scale: float = 0.1    # std of the initial router weights

    def __post_init__(self):
        own = "ReMoEConfig"
        validate.sizes(own, d_model=self.d_model, num_experts=self.num_experts,
                       d_hidden=self.d_hidden, k=self.k)
        validate.top_k(own, self.k, self.num_experts)
        validate.one_of(own, "expert", self.expert, EXPERTS)
        if not self.alpha > 1:
            raise ValueError(f"{own}: alpha must be > 1, got alpha={self.alpha}")
        validate.positive(own, "l1_init", self.l1_init)
        validate.positive(own, "router_scale", self.router_scale)

    @property
    def target_sparsity(self) -> float:
        """1 - K/E: the fraction of zero weights when K of E experts are active."""
        return 1.0 - self.k / self.num_experts


class ReMoECache(NamedTuple):
    x: np.ndarray              # (N, D)
    w_router: np.ndarray       # (D, E)
    logits: np.ndarray         # (N, E) x W_router (for the routing statistics)
    weights: np.ndarray        # (N, E) relu(x W_router)
    active: np.ndarray         # (N, E) bool, weights > 0: the relu pattern
    plan: Plan                 # the active pairs, expert-contiguous (M rows)
    gather_cache: tuple
    experts_cache: tuple       # experts.RaggedCache
    combine_cache: tuple
    l1_coef: float             # lambda used by this forward


def _check_input(x, params: dict, kind: str, l1_coef: float) -> None:
    fn = "remoe_forward"
    validate.non_negative(fn, "l1_coef", l1_coef)
    num_experts = validate.routed_input(fn, x, params, "w_router", expert_kind(kind).names)
    w_router = params["w_router"]
    if w_router.shape != (x.shape[1], num_experts):
        raise ValueError(f"{fn}: w_router must have shape (D, E) = {(x.shape[1], num_experts)}, "
                         f"got {w_router.shape}")


def active_plan(active) -> Plan:
    """The expert-contiguous plan of the active pairs.   active (N, E) bool -> Plan with M rows.

    Expert e's rows are its active tokens in token order: exactly the plan
    dispatch.plan.plan_token_choice makes for ids[n] = (0, ..., E-1) with
    eligible = active and no capacity (the spec), written out directly
    because here the counting sort is just a transpose."""
    n, e = active.shape
    experts_of_row, rows_token = np.nonzero(active.T)                  # (M,) each, expert-major
    offsets = np.zeros(e + 1, dtype=np.int64)                          # (E+1,)
    np.cumsum(active.sum(axis=0), out=offsets[1:])
    rows_weight = rows_token * e + experts_of_row                      # (M,) into weights.ravel()
    token_rows = np.full((n, e), -1, dtype=np.int64)                   # (N, E)
    token_rows[rows_token, experts_of_row] = np.arange(len(rows_token))
    return Plan(rows_token.astype(np.int64), rows_weight.astype(np.int64), offsets, token_rows,
                None, 0)


def remoe_forward(x, params: dict, kind: str = "mlp", l1_coef: float = 0.0):
    """(y (N, D), aux float), ReMoECache.

    y_n = sum over active e of relu(x W_router)_ne f_e(x_n);  aux = l1_coef * mean_n sum_e w_ne.
    params: w_router (D, E) and the stacked expert weights of `kind` (E, ...).
    """
    _check_input(x, params, kind, l1_coef)
    w_router = params["w_router"]
    logits = x @ w_router                                              # (N, E)
    active = logits > 0                                                # (N, E) bool
    weights = np.maximum(logits, 0)                                    # (N, E)
    plan = active_plan(active)
    x_sorted, gather_cache = reference.gather_forward(x, plan)         # (M, D)
    y_sorted, experts_cache = reference.experts_forward(x_sorted, params, kind, plan)   # (M, D)
    y, combine_cache = reference.combine_forward(y_sorted, weights, plan)   # (N, D)
    aux = float(l1_coef) * float(weights.sum()) / len(x)
    return (y, aux), ReMoECache(x, w_router, logits, weights, active, plan, gather_cache, experts_cache,
                                combine_cache, float(l1_coef))


def remoe_backward(dout, cache: ReMoECache):
    """(dy (N, D), daux scalar) -> dx (N, D), grads (w_router and the expert weights).

    da = (dL/dw + daux * lambda / N) * [a > 0]: the combine's weight gradient
    plus the L1 term's (1/N per entry), through relu."""
    dy, daux = dout
    dy_sorted, dweights = reference.combine_backward(dy, cache.combine_cache)   # (M, D), (N, E)
    dx_sorted, grads = reference.experts_backward(dy_sorted, cache.experts_cache)
    dx = reference.gather_backward(dx_sorted, cache.gather_cache)      # (N, D)
    l1_grad = float(daux) * cache.l1_coef / len(cache.x)               # python float: keeps dtype
    da = (dweights + l1_grad) * cache.active                           # (N, E)
    grads["w_router"] = cache.x.T @ da                                 # (D, E)
    dx += da @ cache.w_router.T                                        # (N, D)
    return dx, grads


def remoe_selection(cache: ReMoECache) -> tuple:
    """Every discrete choice of a forward: the router's relu pattern and the experts' own."""
    return (cache.active,) + reference.experts_selection(cache.experts_cache)


def update_l1_coef(l1_coef, sparsity: float, target: float, alpha: float = ALPHA):
    """lambda * alpha ** sign(target - sparsity): up when too few weights are 0, down when too many."""
    return l1_coef * alpha ** float(np.sign(target - sparsity))


class ReMoEStats(NamedTuple):
    """What one forward's ReLU router did."""
    active: np.ndarray     # (N,) int: active experts per token
    sparsity: float        # fraction of the N*E weights that are 0
    counts: np.ndarray     # (E,) int: tokens each expert ran on
    l1: float              # mean_n sum_e w_ne, before the coefficient
    weights: np.ndarray    # (N, E) relu(x W_router)


def remoe_stats(cache: ReMoECache) -> ReMoEStats:
    active = cache.active.sum(axis=1)                                  # (N,)
    l1 = float(cache.weights.sum()) / len(cache.x)
    return ReMoEStats(active, 1.0 - float(cache.active.mean()), cache.plan.counts, l1,
                      cache.weights)


def init_remoe_params(config: ReMoEConfig, rng, dtype=np.float64) -> dict:
    """Router (D, E): normal with std router_scale; experts as in experts.init_experts."""
    w_router = (config.router_scale * rng.standard_normal(
        (config.d_model, config.num_experts))).astype(dtype)           # (D, E)
    return {"w_router": w_router} | init_experts(config.expert, config.num_experts,
                                                  config.d_model, config.d_hidden, rng, dtype)


class ReMoE(Layer):
    """A ReMoE layer: forward(x) -> y, backward(dy, aux_scale) -> dx.

    After a forward, `aux` is lambda * l1 (a float), `stats` a ReMoEStats and
    `routing_stats()` a RoutingStats with ids None (a token uses any number
    of experts), weights (N, E) and nothing dropped.
    The buffer `l1_coef` is lambda; in training mode every forward, after
    computing its aux with the current lambda, steps lambda by the controller
    rule using this forward's sparsity. Evaluation changes nothing.
    """

    def __init__(self, config: ReMoEConfig, *, seed: int = 0, dtype=np.float64):
        super().__init__(dtype)
        if not isinstance(config, ReMoEConfig):
            raise ValueError(f"ReMoE: config must be a ReMoEConfig, got {type(config).__name__}")
        validate.integer("ReMoE", "seed", seed, minimum=0)
        self.config = config
        self.params = init_remoe_params(config, np.random.default_rng(seed), self.dtype)
        self.init_grads()
        self.buffers["l1_coef"] = np.array(config.l1_init, dtype=self.dtype)   # () lambda

    def forward(self, x):
        """x (N, D) -> y (N, D)."""
        lam = float(self.buffers["l1_coef"])
        (y, self._aux), self._cache = remoe_forward(x, self.params, self.config.expert, lam)
        self.stats = remoe_stats(self._cache)
        if self.training:
            c = self.config
            self.buffers["l1_coef"][...] = update_l1_coef(lam, self.stats.sparsity,
                                                          c.target_sparsity, c.alpha)
        return y                                                       # (N, D)

    def backward(self, dy, aux_scale: float = 1.0):
        """dx (N, D); the L1 gradient enters times aux_scale (a loss scaler passes its scale)."""
        aux_scale = self.check_backward(dy, aux_scale)
        dx, grads = remoe_backward((dy, aux_scale), self._cache)
        self.set_grads(grads)
        return dx                                                      # (N, D)

    def own_routing_stats(self) -> RoutingStats | None:
        """The last forward's routing as a RoutingStats: ids None, weights (N, E), no drops."""
        if self._cache is None:
            return None
        c = self._cache
        return RoutingStats(None, c.weights, c.plan.counts, 0, c.logits)
