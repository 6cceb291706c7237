"""SparseMoE: route each token to K of E experts, under a capacity, and combine.

    logits = x Wr                                  (N, E)   router scores
    ids, w = router(logits)                        (N, K)   choices and weights
    slot   = assign_slots(ids, C, drop policy)     (N, K)   -1 where dropped
    x_sorted = gather(x)                           (M, D)   expert-contiguous
    y_sorted[seg e] = f_e(x_sorted[seg e])         (M, D)   one matmul chain per expert
    y = scatter(w * y_sorted) + sum_s shared_s(x)  (N, D)
    aux = a_bal * balance + a_z * z_loss + a_cv * (CV^2(importance) + CV^2(load))

Forward returns (y, aux); backward takes (dy, daux) and returns (dx, grads).
The router gets gradient through the weights of the experts it selected
(and through the auxiliary losses); the ids themselves carry none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from moe_np import balance, dispatch, losses, routers, validate
from moe_np.experts import EXPERTS, init_experts

ROUTERS = {
    # name: (forward(logits, k, bias), backward)
    "softmax_topk": (lambda z, k, b: routers.softmax_topk_forward(z, k, renormalize=True),
                     routers.softmax_topk_backward),
    "softmax_topk_raw": (lambda z, k, b: routers.softmax_topk_forward(z, k, renormalize=False),
                         routers.softmax_topk_backward),
    "switch": (lambda z, k, b: routers.softmax_topk_forward(z, 1, renormalize=False),
               routers.softmax_topk_backward),
    "topk_softmax": (lambda z, k, b: routers.topk_softmax_forward(z, k),
                     routers.topk_softmax_backward),
    "sigmoid_bias": (lambda z, k, b: routers.sigmoid_topk_forward(z, k, b),
                     routers.sigmoid_topk_backward),
}
ALL_ROUTERS = tuple(ROUTERS) + ("noisy_topk", "expert_choice")
SOFTMAX_ROUTERS = ("softmax_topk", "softmax_topk_raw", "switch", "topk_softmax")


@dataclass(frozen=True)
class SparseConfig:
    """How a sparse layer routes.

    capacity_factor None means dropless. For expert_choice, k is unused and
    each expert takes C = ceil(capacity_factor * N / E) tokens. balance_coef
    needs a softmax router, cv_coef the noisy_topk router.
    """
    router: str = "softmax_topk"
    k: int = 2
    capacity_factor: float | None = None
    min_capacity: int = 0
    drop_policy: str = "position"
    expert: str = "mlp"
    balance_coef: float = 0.0      # Switch/GShard balance loss (softmax routers)
    z_coef: float = 0.0            # router z-loss
    cv_coef: float = 0.0           # importance + load CV^2 (noisy_topk)

    def __post_init__(self):
        if self.router not in ALL_ROUTERS:
            raise ValueError(f"SparseConfig: router must be one of {ALL_ROUTERS}, got {self.router!r}")
        if self.expert not in EXPERTS:
            raise ValueError(f"SparseConfig: expert must be one of {sorted(EXPERTS)}, got {self.expert!r}")
        if self.drop_policy not in dispatch.POLICIES:
            raise ValueError(f"SparseConfig: drop_policy must be one of {dispatch.POLICIES}, "
                             f"got {self.drop_policy!r}")
        if not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"SparseConfig: k must be an integer >= 1, got k={self.k}")
        if self.capacity_factor is not None:
            validate.positive("SparseConfig", "capacity_factor", self.capacity_factor)
        elif self.router == "expert_choice":
            raise ValueError("SparseConfig: expert_choice needs a capacity_factor "
                             "(each expert takes C = ceil(capacity_factor * N / E) tokens)")
        for name in ("balance_coef", "z_coef", "cv_coef", "min_capacity"):
            if getattr(self, name) < 0:
                raise ValueError(f"SparseConfig: {name} must be >= 0, got {getattr(self, name)}")
        if self.router == "switch" and self.k != 1:
            raise ValueError(f"SparseConfig: the switch router sends each token to one expert, got k={self.k}")
        if self.balance_coef and self.router not in SOFTMAX_ROUTERS:
            raise ValueError(f"SparseConfig: balance_coef needs a softmax router {SOFTMAX_ROUTERS} "
                             f"(its P_i is the mean softmax probability), got router={self.router!r}")
        if self.cv_coef and self.router != "noisy_topk":
            raise ValueError(f"SparseConfig: cv_coef (importance and load CV^2) needs router="
                             f"'noisy_topk', got {self.router!r}")


class SparseCache(NamedTuple):
    """What a SparseMoE forward keeps for its backward (and for inspection)."""
    x: np.ndarray            # (N, D) the input
    params: dict
    config: SparseConfig
    router_cache: tuple      # the router's own cache
    gather_cache: tuple      # (N, plan)
    segments_cache: tuple    # (expert kind, offsets, one expert cache per segment)
    scatter_cache: tuple
    shared_cache: tuple | None
    aux_caches: dict         # name -> cache, for each auxiliary loss in use
    stats: dict              # ids, weights, plan, counts, num_dropped, logits


def _segments_forward(x_sorted, params, expert: str, offsets):
    """Run expert e on rows offsets[e]:offsets[e+1].   (M, D) -> (M, D)."""
    fwd, _, names = EXPERTS[expert]
    y_sorted = np.zeros_like(x_sorted)                                 # (M, D)
    caches = []
    for e in range(len(offsets) - 1):
        lo, hi = offsets[e], offsets[e + 1]
        if hi == lo:
            caches.append(None)
            continue
        y_e, cache = fwd(x_sorted[lo:hi], *(params[k][e:e + 1] for k in names))   # (1, M_e, D)
        y_sorted[lo:hi] = y_e[0]
        caches.append(cache)
    return y_sorted, (expert, offsets, caches)


def _segments_backward(dy_sorted, cache, params):
    """-> dx_sorted (M, D), grads for the stacked expert weights (zero for idle experts)."""
    expert, offsets, caches = cache
    _, bwd, names = EXPERTS[expert]
    dx_sorted = np.zeros_like(dy_sorted)                               # (M, D)
    grads = {k: np.zeros_like(params[k]) for k in names}
    for e, c in enumerate(caches):
        if c is None:
            continue
        lo, hi = offsets[e], offsets[e + 1]
        dx_e, *g = bwd(dy_sorted[None, lo:hi], c)                      # (M_e, D), (1, ...)
        dx_sorted[lo:hi] = dx_e
        for k, g_k in zip(names, g):
            grads[k][e] = g_k[0]
    return dx_sorted, grads


def _shared_names(expert: str):
    return ["shared_" + k for k in EXPERTS[expert][2]]


def sparse_moe_forward(x, params: dict, config: SparseConfig, noise=None, bias=None, seed=None):
    """(y (N, D), aux scalar), cache.

    noise: (N, E) standard-normal draws for noisy_topk (None: no noise, as at
    evaluation). bias: (E,) selection bias for sigmoid_bias. seed: for the
    random drop policy. The cache's `stats` hold ids, counts and drops.
    """
    validate.ndim("sparse_moe_forward", "x", x, 2)
    n, d = x.shape
    exp_names = EXPERTS[config.expert][2]
    num_experts = params[exp_names[0]].shape[0]
    w_router = params["router_w"]                                      # (D, E)
    validate.shape("sparse_moe_forward", "router_w", w_router, (d, num_experts))
    validate.finite("sparse_moe_forward", "x", x)
    if config.router != "expert_choice":
        validate.top_k("sparse_moe_forward", config.k, num_experts)
    kind = config.router

    # 1. route
    logits = x @ w_router                                              # (N, E)
    if kind == "noisy_topk":
        noise = np.zeros((n, num_experts)) if noise is None else noise
        (ids, w, load), r_cache = routers.noisy_topk_forward(x, w_router, params["noise_w"], noise,
                                                              config.k)
    elif kind == "expert_choice":
        c = dispatch.capacity(n, num_experts, 1, config.capacity_factor, config.min_capacity)
        (token_ids, w), r_cache = routers.expert_choice_forward(logits, min(c, n))   # (E, C)
    else:
        (ids, w), r_cache = ROUTERS[kind][0](logits, config.k, bias)   # (N, K), (N, K)

    # 2. plan: which assignments are kept, in expert-contiguous order
    if kind == "expert_choice":
        plan = dispatch.plan_expert_choice(token_ids)
        ids = None
    else:
        cap = None if config.capacity_factor is None else dispatch.capacity(
            n, num_experts, ids.shape[1], config.capacity_factor, config.min_capacity)
        order = dispatch.token_order(w, config.drop_policy, seed)      # (N,)
        slot, _ = dispatch.assign_slots(ids, num_experts, cap, order)  # (N, K)
        plan = dispatch.plan_from_slots(slot, ids, num_experts)

    # 3. experts on their segments, then the weighted combine
    x_sorted, g_cache = dispatch.gather_forward(x, plan)               # (M, D)
    y_sorted, seg_cache = _segments_forward(x_sorted, params, config.expert, plan.offsets)  # (M, D)
    y, s_cache = dispatch.scatter_forward(y_sorted, w, plan, n)        # (N, D)

    # 4. shared experts see every token with weight 1
    sh_cache = None
    if _shared_names(config.expert)[0] in params:
        fwd = EXPERTS[config.expert][0]
        y_shared, sh_cache = fwd(x, *(params[k] for k in _shared_names(config.expert)))  # (S, N, D)
        y = y + y_shared.sum(axis=0)                                   # (N, D)

    # 5. auxiliary losses
    aux, aux_caches = 0.0, {}
    if config.balance_coef:
        probs, sm_cache = losses.softmax_forward(logits)               # (N, E) all E experts
        value, b_cache = balance.balance_loss_forward(probs, ids)
        aux += config.balance_coef * value
        aux_caches["balance"] = (sm_cache, b_cache)
    if config.z_coef:
        value, z_cache = balance.z_loss_forward(logits)
        aux += config.z_coef * value
        aux_caches["z"] = z_cache
    if config.cv_coef:
        imp, i_cache = balance.importance_forward(w, ids, num_experts)  # (E,)
        cv_imp, ci_cache = balance.cv_squared_forward(imp)
        cv_load, cl_cache = balance.cv_squared_forward(load)
        aux += config.cv_coef * (cv_imp + cv_load)
        aux_caches["cv"] = (i_cache, ci_cache, cl_cache)

    stats = {"ids": ids, "weights": w, "plan": plan, "num_dropped": plan.num_dropped,
             "counts": np.diff(plan.offsets), "logits": logits}
    cache = SparseCache(x, params, config, r_cache, g_cache, seg_cache, s_cache, sh_cache,
                        aux_caches, stats)
    return (y, aux), cache


def sparse_moe_backward(dout, cache: SparseCache):
    """(dy (N, D), daux scalar) -> dx (N, D), grads (one array per parameter)."""
    dy, daux = dout
    x, params, config, r_cache, g_cache, seg_cache, s_cache, sh_cache, aux_caches, _ = cache
    dy_sorted, dw = dispatch.scatter_backward(dy, s_cache)             # (M, D), as w
    dx_sorted, grads = _segments_backward(dy_sorted, seg_cache, params)  # (M, D)
    dx = dispatch.gather_backward(dx_sorted, g_cache)                  # (N, D)

    if sh_cache is not None:
        names = _shared_names(config.expert)
        dy_shared = np.broadcast_to(dy, (params[names[0]].shape[0],) + dy.shape)   # (S, N, D)
        dx_sh, *g_sh = EXPERTS[config.expert][1](dy_shared, sh_cache)
        dx = dx + dx_sh
        grads |= dict(zip(names, g_sh))

    dlogits = np.zeros((len(x), params["router_w"].shape[1]))          # (N, E)
    if "balance" in aux_caches:
        sm_cache, b_cache = aux_caches["balance"]
        dprobs = balance.balance_loss_backward(daux * config.balance_coef, b_cache)   # (N, E)
        dlogits += losses.softmax_backward(dprobs, sm_cache)
    if "z" in aux_caches:
        dlogits += balance.z_loss_backward(daux * config.z_coef, aux_caches["z"])

    if config.router == "noisy_topk":
        dload = np.zeros(params["router_w"].shape[1])                  # (E,)
        if "cv" in aux_caches:
            i_cache, ci_cache, cl_cache = aux_caches["cv"]
            dimp = balance.cv_squared_backward(daux * config.cv_coef, ci_cache)   # (E,)
            dw = dw + balance.importance_backward(dimp, i_cache)
            dload = balance.cv_squared_backward(daux * config.cv_coef, cl_cache)
        dx_r, dw_router, dw_noise = routers.noisy_topk_backward((dw, dload), r_cache)
        grads["noise_w"] = dw_noise
        dw_router = dw_router + x.T @ dlogits                          # z-loss on the clean logits
        dx = dx + dx_r + dlogits @ params["router_w"].T
    else:
        if config.router == "expert_choice":
            dlogits += routers.expert_choice_backward(dw, r_cache)
        else:
            dlogits += ROUTERS[config.router][1](dw, r_cache)
        dw_router = x.T @ dlogits                                      # (D, E)
        dx = dx + dlogits @ params["router_w"].T                       # (N, D)
    grads["router_w"] = dw_router
    return dx, grads


def init_sparse_params(config: SparseConfig, d_model: int, num_experts: int, d_hidden: int,
                       rng, num_shared: int = 0, router_scale: float = 0.1) -> dict:
    """Router weights (small, so routing starts near uniform), experts, shared experts."""
    params = {"router_w": router_scale * rng.standard_normal((d_model, num_experts))}   # (D, E)
    if config.router == "noisy_topk":
        params["noise_w"] = router_scale * rng.standard_normal((d_model, num_experts))  # (D, E)
    params |= init_experts(config.expert, num_experts, d_model, d_hidden, rng)
    if num_shared:
        shared = init_experts(config.expert, num_shared, d_model, d_hidden, rng)
        params |= {"shared_" + k: v for k, v in shared.items()}
    return params


class SparseMoE:
    """A sparse MoE layer for `train.fit`: forward(x) -> y, backward(dy) -> dx.

    The auxiliary loss of the last forward is in `aux`; backward adds its
    gradient (scaled by 1). `stats` holds the last routing: ids, counts per
    expert, assignments dropped. With the sigmoid_bias router and
    bias_gamma > 0, every training forward nudges the selection bias by
    DeepSeek-V3's loss-free rule.
    """

    def __init__(self, d_model: int, num_experts: int, d_hidden: int, config: SparseConfig,
                 num_shared: int = 0, bias_gamma: float = 0.0, seed: int = 0):
        if num_experts < 1:
            raise ValueError(f"SparseMoE: num_experts must be >= 1, got {num_experts}")
        if config.router != "expert_choice":
            validate.top_k("SparseMoE", config.k, num_experts)
        if bias_gamma < 0 or (bias_gamma > 0 and config.router != "sigmoid_bias"):
            raise ValueError(f"SparseMoE: bias_gamma={bias_gamma} must be >= 0 and needs "
                             f"router='sigmoid_bias', got {config.router!r}")
        rng = np.random.default_rng(seed)
        self.config, self.num_experts, self.bias_gamma = config, num_experts, bias_gamma
        self.params = init_sparse_params(config, d_model, num_experts, d_hidden, rng, num_shared)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.bias = np.zeros(num_experts)                              # (E,) selection only
        self.training = True
        self._rng = np.random.default_rng(seed + 1)
        self._cache, self.aux, self.stats = None, 0.0, {}

    def num_params(self) -> int:
        return sum(p.size for p in self.params.values())

    def forward(self, x):
        noise = None
        if self.training and self.config.router == "noisy_topk":
            noise = self._rng.standard_normal((len(x), self.num_experts))   # (N, E)
        seed = int(self._rng.integers(2**31)) if self.config.drop_policy == "random" else None
        (y, self.aux), self._cache = sparse_moe_forward(x, self.params, self.config, noise=noise,
                                                        bias=self.bias, seed=seed)
        self.stats = self._cache.stats
        if self.training and self.bias_gamma > 0 and self.stats["ids"] is not None:
            self.bias = balance.update_selection_bias(self.bias, self.stats["ids"], self.bias_gamma)
        return y                                                       # (N, D)

    def backward(self, dy):
        dx, self.grads = sparse_moe_backward((dy, 1.0), self._cache)
        return dx
