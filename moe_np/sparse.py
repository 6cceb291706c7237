"""SparseMoE: route each token to K of E experts, under a capacity, and combine.

    route    logits = x W_router; ids, weights = router(logits)    (N, E), (N, K)
    plan     slots under capacity C (drop policy) -> expert order   Plan
    gather   x_disp = x in expert-contiguous rows                   (M, D)
    experts  y_disp[seg e] = f_e(x_disp[seg e])                     (M, D)
    combine  y = sum over a token's rows of weight * y_disp          (N, D)
    shared   y += sum_u f_u(x), every token, weight 1               (N, D)   U shared experts
    aux      a_bal * balance + a_z * z_loss + a_cv * CV^2 terms     scalar

Forward returns (y, aux); backward takes (dy, daux) and returns (dx, grads).
The router gets gradient through the weights of the experts it selected
(and through the auxiliary losses); the ids themselves carry none. How the
rows move (gather, experts, combine) is the dispatch strategy's business,
chosen by `SparseConfig.dispatch`; every strategy computes the same numbers.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from moe_np import balance, dispatch, functional, lowp, routers, validate
from moe_np.config import SparseConfig
from moe_np.experts import expert_kind, experts_selection, init_experts, ragged_experts_forward
from moe_np.layer import Layer, RoutingStats


class SparseCache(NamedTuple):
    """What a SparseMoE forward keeps for its backward (and for inspection)."""
    config: SparseConfig
    params: dict
    route: routers.RouterOut
    router_cache: routers.RouterCache
    plan: dispatch.Plan
    gather_cache: tuple
    experts_cache: tuple
    combine_cache: tuple
    shared_cache: tuple | None
    aux_cache: balance.AuxCache
    jitter: np.ndarray | None     # (N, D) the router's multiplicative input noise, or None


def make_plan(route: routers.RouterOut, config: SparseConfig, strategy, rng=None,
              mask=None) -> dispatch.Plan:
    """Capacity, the drop policy's claiming order, and the strategy's plan.

    mask (N,) bool: padding tokens (False) take part in nothing. With
    capacity_scope "sequence", each sequence of seq_len tokens has its own
    C slots per expert; the plan then keeps exactly the assignments that won
    a slot in their sequence, in the usual expert-contiguous order.
    """
    if route.token_ids is not None:
        return dispatch.plan_expert_choice(route.token_ids, len(route.logits))
    n, k = route.ids.shape
    e = config.num_experts
    active = n if mask is None else int(mask.sum())
    eligible = None if mask is None else np.repeat(mask[:, None], k, axis=1)   # (N, K)
    order = dispatch.token_order(route.weights, config.drop_policy, rng)   # (N,)
    cap = None
    if config.capacity_factor is not None:
        scope = config.seq_len if config.capacity_scope == "sequence" else active
        cap = dispatch.capacity(scope, e, k, config.capacity_factor, config.min_capacity)
    seq_len = config.seq_len if config.capacity_scope == "sequence" else None
    extra = {name: v for name, v in (("eligible", eligible), ("seq_len", seq_len)) if v is not None}
    plan = strategy.plan_token_choice(route.ids, e, cap, order, **extra)
    return plan._replace(capacity=cap, num_dropped=active * k - len(plan.rows_token))


class SharedCache(NamedTuple):
    experts_cache: tuple          # the stacked shared experts' cache
    x: np.ndarray                 # (N, D)
    y_shared: np.ndarray          # (N, D) sum of the shared experts' outputs, before the gate
    gate: np.ndarray | None       # (N, 1) sigmoid(x w_shared_gate), or None (ungated)


def shared_experts_forward(x, params: dict, config: SparseConfig):
    """sum_u f_u(x) over the U shared experts, times sigmoid(x w_shared_gate) when gated
    (Qwen2-MoE); None if there are none.   x (N, D) -> (N, D)."""
    if not config.num_shared:
        return None, None
    kind = expert_kind(config.expert)
    y_each, cache = kind.forward(x, *(params["shared_" + k] for k in kind.names))   # (U, N, D)
    y_shared = y_each.sum(axis=0)                                      # (N, D)
    if not config.shared_gate:
        return y_shared, SharedCache(cache, x, y_shared, None)
    gate = functional.sigmoid(x @ params["w_shared_gate"])             # (N, 1)
    return gate * y_shared, SharedCache(cache, x, y_shared, gate)


def shared_experts_backward(dy, cache: SharedCache, params: dict, config: SparseConfig):
    """Every shared expert receives the full upstream gradient (times the gate).   -> dx, grads."""
    kind = expert_kind(config.expert)
    grads, dx_gate = {}, None
    if cache.gate is not None:
        dz = np.sum(dy * cache.y_shared, axis=1, keepdims=True) * cache.gate * (1 - cache.gate)  # (N, 1)
        grads["w_shared_gate"] = cache.x.T @ dz                        # (D, 1)
        dx_gate = dz @ params["w_shared_gate"].T                       # (N, D)
        dy = cache.gate * dy                                           # (N, D)
    dy_each = np.broadcast_to(dy, (config.num_shared,) + dy.shape)     # (U, N, D)
    dx, *g = kind.backward(dy_each, cache.experts_cache)
    grads |= {"shared_" + k: v for k, v in zip(kind.names, g)}
    return (dx if dx_gate is None else dx + dx_gate), grads


def _check_input(x, params: dict, config: SparseConfig, mask=None) -> None:
    validate.ndim("sparse_moe_forward", "x", x, 2)
    if config.seq_len is not None and len(x) % config.seq_len:
        raise ValueError(f"sparse_moe_forward: x has N={len(x)} tokens, not a multiple of "
                         f"seq_len={config.seq_len}")
    if mask is not None:
        validate.shape("sparse_moe_forward", "mask", mask, (len(x),))
        if np.asarray(mask).dtype != bool:
            raise ValueError(f"sparse_moe_forward: mask must be bool, got {np.asarray(mask).dtype}")
        per_sequence = config.seq_aux_coef or config.balance_scope == "sequence"
        if config.router in ("noisy_topk", "expert_choice") or per_sequence or config.cv_coef:
            raise ValueError(f"sparse_moe_forward: a token mask is supported for the softmax and "
                             f"sigmoid_bias routers without cv or sequence-wise losses, "
                             f"got router={config.router!r}, balance_scope={config.balance_scope!r}")
    dtype = params["w_router"].dtype
    validate.param_dtype("sparse_moe_forward", "x", x, dtype)
    if config.precision.compute != "fp32" and dtype != np.float32:
        raise ValueError(f"sparse_moe_forward: precision.compute={config.precision.compute!r} "
                         f"simulates low precision on float32 arrays, got {dtype}")
    if config.router != "expert_choice":
        validate.top_k("sparse_moe_forward", config.k, config.num_experts)


def sparse_moe_forward(x, params: dict, config: SparseConfig, *, bias=None, noise=None, rng=None,
                       jitter=None, mask=None):
    """(y (N, D), aux float), SparseCache.

    bias: (E,) selection bias (sigmoid_bias). noise: (N, E) standard-normal
    draws (noisy_topk; None: no noise, as at evaluation). rng: a Generator
    or seed for the random drop policy. jitter: (N, D) multiplicative noise
    on the router's input only (Switch), None at evaluation. mask: (N,)
    bool, False for padding tokens: they take no slot, get no routed output
    and add nothing to counts or to the auxiliary loss.
    """
    _check_input(x, params, config, mask)
    strategy = dispatch.get_strategy(config.dispatch)
    if jitter is not None:
        validate.same_shape("sparse_moe_forward", "jitter", jitter, "x", x)
    x_router = x if jitter is None else x * jitter                     # (N, D)
    route, router_cache = routers.router_forward(x_router, params, config, bias=bias, noise=noise)
    plan = make_plan(route, config, strategy, rng, mask)
    x_disp, gather_cache = strategy.gather_forward(x, plan)            # (M, D) or (E, C, D)
    y_disp, experts_cache = _experts_forward(strategy, x_disp, params, config, plan, x)
    del x_disp                        # not kept: the experts' backward gathers its rows again
    y, combine_cache = strategy.combine_forward(y_disp, route.weights, plan)   # (N, D)
    y_shared, shared_cache = shared_experts_forward(x, params, config)
    if y_shared is not None:
        y += y_shared                                                  # (N, D)
    y = lowp.round_output(y, config.precision, out=y)                  # named step: the output, in place
    aux, aux_cache = _aux_forward(route, config, mask)
    return (y, aux), SparseCache(config, params, route, router_cache, plan, gather_cache, experts_cache,
                                 combine_cache, shared_cache, aux_cache, jitter)


def _aux_forward(route, config: SparseConfig, mask):
    """The auxiliary loss over the real tokens; a batch with none has aux 0 and no gradient
    (each loss is a mean over tokens, and a mean over no token is not a number)."""
    if mask is not None and not mask.any():
        return 0.0, balance.AuxCache(config, None, None, None, None, mask)
    return balance.aux_forward(route, config, mask, seq_len=config.seq_len)   # per-sequence losses


def sparse_moe_backward(dout, cache: SparseCache):
    """(dy (N, D), daux scalar) -> dx (N, D), grads (one array per parameter)."""
    dy, daux = dout
    strategy = dispatch.get_strategy(cache.config.dispatch)
    dy_disp, dweights = strategy.combine_backward(dy, cache.combine_cache)   # as y_disp, as weights
    dy_disp = lowp.round_output(dy_disp, cache.config.precision, out=dy_disp)   # named step, in place
    dx_disp, grads = strategy.experts_backward(dy_disp, cache.experts_cache, overwrite=True)
    del dy_disp                       # ragged: dx_disp was written over it
    dx = strategy.gather_backward(dx_disp, cache.gather_cache)         # (N, D)
    del dx_disp                       # freed before the shared experts' and the router's backward
    if cache.shared_cache is not None:
        dx_shared, shared_grads = shared_experts_backward(dy, cache.shared_cache, cache.params,
                                                          cache.config)
        dx += dx_shared
        grads |= shared_grads
    aux_grads = balance.aux_backward(daux, cache.aux_cache)
    dx_router, router_grads = routers.router_backward(dweights, cache.router_cache, aux_grads)
    dx += dx_router if cache.jitter is None else dx_router * cache.jitter   # (N, D)
    return lowp.round_output(dx, cache.config.precision, out=dx), grads | router_grads


def _experts_forward(strategy, x_disp, params: dict, config: SparseConfig, plan, x):
    """The experts on the dispatched rows: the strategy's own path in fp32; in low precision
    the ragged pair with lowp's GEMM (operands rounded, float32 sums, output rounded). The
    cache keeps x and the plan's rows, not x_disp (a ragged backward gathers them again)."""
    if config.precision.compute == "fp32":
        return strategy.experts_forward(x_disp, params, config.expert, plan, x=x)
    return ragged_experts_forward(x_disp, params, config.expert, plan.offsets,
                                  gemm=lowp.gemm_for(config.precision), source=(x, plan.rows_token),
                                  pointwise=dispatch.pointwise_for(config.dispatch))


def sparse_moe_selection(cache: SparseCache) -> tuple:
    """Every discrete choice one forward made: router choices, the plan's rows, ReLU patterns."""
    strategy = dispatch.get_strategy(cache.config.dispatch)
    shared = () if cache.shared_cache is None else \
        experts_selection(cache.config.expert, cache.shared_cache.experts_cache)
    return (routers.router_selection(cache.router_cache) + (cache.plan.rows_token, cache.plan.rows_weight)
            + tuple(strategy.experts_selection(cache.experts_cache)) + shared)


def routing_stats(cache: SparseCache) -> RoutingStats:
    route, plan = cache.route, cache.plan
    return RoutingStats(route.ids, route.weights, plan.counts, plan.num_dropped, route.logits)


def init_sparse_params(config: SparseConfig, rng, dtype=np.float64) -> dict:
    """Router weights (small: routing starts near uniform), experts, shared experts, in dtype."""
    params = routers.init_router(config, rng, dtype)
    params |= init_experts(config.expert, config.num_experts, config.d_model, config.d_hidden,
                           rng, dtype)
    if config.num_shared:
        width = config.d_hidden_shared or config.d_hidden
        shared = init_experts(config.expert, config.num_shared, config.d_model, width, rng, dtype)
        params |= {"shared_" + k: v for k, v in shared.items()}
    if config.shared_gate:
        params["w_shared_gate"] = (config.router_scale * rng.standard_normal(
            (config.d_model, 1))).astype(dtype)                        # (D, 1)
    return params


def routing_draws(config: SparseConfig, stream, training: bool, num_tokens: int, dtype):
    """Router noise (noisy_topk), the random drop order's seed and the router jitter, in
    this order from `stream`: drawn only in training (evaluation uses a fixed drop order
    and no noise). The expert-parallel layer draws through this too, so both agree bit for bit.
    -> (noise (N, E) | None, drop_seed | None, jitter (N, D) | None)"""
    c = config
    noise = drop_seed = jitter = None
    if training and c.router == "noisy_topk":
        noise = stream.standard_normal((num_tokens, c.num_experts)).astype(dtype)   # (N, E)
    if c.drop_policy == "random":
        drop_seed = int(stream.integers(2**31)) if training else 0
    if training and c.jitter:
        jitter = stream.uniform(1 - c.jitter, 1 + c.jitter,
                                (num_tokens, c.d_model)).astype(dtype)              # (N, D)
    return noise, drop_seed, jitter


class SparseMoE(Layer):
    """A sparse MoE layer (the protocol of layer.py): forward(x) -> y, backward(dy, aux_scale) -> dx.

    After a forward, `aux` is its auxiliary loss (a float, coefficients
    applied) and `stats` its RoutingStats. backward(dy, aux_scale) adds the
    auxiliary-loss gradient times aux_scale (a loss scaler passes its scale).
    Training mode draws router noise and the random drop order from the
    layer's own stream and, with bias_gamma > 0, nudges the selection bias
    (a buffer) by DeepSeek-V3's loss-free rule; evaluation does neither.
    """

    def __init__(self, config: SparseConfig, *, seed: int = 0, dtype=np.float64):
        super().__init__(dtype)
        if not isinstance(config, SparseConfig):
            raise ValueError(f"SparseMoE: config must be a SparseConfig, got {type(config).__name__}")
        validate.integer("SparseMoE", "seed", seed, minimum=0)
        if config.precision.compute != "fp32" and self.dtype != np.float32:
            raise ValueError(f"SparseMoE: config.precision.compute={config.precision.compute!r} "
                             f"simulates low precision on float32 arrays, but dtype={self.dtype}; "
                             f"build the layer with dtype=np.float32 or use compute='fp32'")
        self.config = config
        self.params = init_sparse_params(config, np.random.default_rng(seed), self.dtype)
        self.init_grads()
        if config.router == "sigmoid_bias":
            self.buffers["selection_bias"] = np.zeros(config.num_experts, dtype=self.dtype)   # (E,)
        self.rngs["routing"] = np.random.default_rng(seed + 1)

    def _draws(self, num_tokens: int):
        return routing_draws(self.config, self.rngs["routing"], self.training, num_tokens, self.dtype)

    def forward(self, x, mask=None):
        """x (N, D) -> y (N, D); mask (N,) bool marks real tokens (None: all)."""
        _check_input(x, self.params, self.config, mask)   # refused input keeps the last cache
        self._cache = None            # the last step's h, y_sorted, ... go before this step's come
        noise, drop_seed, jitter = self._draws(len(x))
        (y, self._aux), self._cache = sparse_moe_forward(
            x, self.params, self.config, bias=self.buffers.get("selection_bias"), noise=noise,
            rng=drop_seed, jitter=jitter, mask=mask)
        self.stats = routing_stats(self._cache)
        c = self.config
        if self.training and c.bias_gamma > 0:
            bias = self.buffers["selection_bias"]
            ids = self.stats.ids if mask is None else self.stats.ids[mask]   # real tokens only
            bias[...] = balance.update_selection_bias(bias, ids, c.bias_gamma,
                                                      centred=c.bias_update == "centred")
        return y                                                       # (N, D)

    def backward(self, dy, aux_scale: float = 1.0):
        aux_scale = self.check_backward(dy, aux_scale)
        dx, grads = sparse_moe_backward((dy, aux_scale), self._cache)
        self.set_grads(grads)
        return dx                                                      # (N, D)
