"""Sparse routers: each token picks K of E experts and a weight for each.

The router is one unit, projection included:

    logits = x W_router                                        (N, E)
    route, cache = router_forward(x, params, config, bias=, noise=)
    dx, grads = router_backward(dweights, cache, aux_grads)

`route` is a RouterOut: ids (N, K) best first, weights (N, K), the logits,
and what a kind adds (expert choice's token_ids (E, C), noisy top-K's
load_estimate (E,)). The ids are a discrete choice and carry no gradient;
they are held fixed, which is exact except where two scores tie.

    softmax_topk      p = softmax(z); the K largest p, renormalized (Mixtral)
    softmax_topk_raw  the same ids, weights p unrenormalized (DeepSeekMoE, DeepSeek-V2,
                      Qwen2-MoE; Switch at K = 1)
    switch            softmax_topk_raw with K = 1 (Switch Transformer)
    topk_softmax      softmax over the K largest logits (= softmax_topk)
    sigmoid_bias      s = sigmoid(z); ids = topK(s + bias) within the best groups,
                      weights r * s / sum s[ids] or r * s (DeepSeek-V3; the bias
                      steers selection only; r the routed scaling factor)
    noisy_topk        H = z + eps * softplus(x W_noise); topk_softmax on H, and
                      Shazeer et al.'s smooth load estimate (2017)
    expert_choice     each expert takes its C best tokens by softmax over
                      experts (Zhou et al. 2022)

Shape letters: N tokens, D width, E experts, K choices per token, C tokens per expert.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from moe_np import functional, lowp, validate
from moe_np.dispatch.plan import capacity as capacity_of


def top_k_indices(scores, k: int):
    """The k largest entries of each row, largest first; ties go to the lower index.
    scores: (N, E) -> (N, K) int64."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]           # (N, K)


def _check_logits(fn, logits, k):
    validate.ndim(fn, "logits", logits, 2)
    validate.top_k(fn, k, logits.shape[1])
    validate.finite(fn, "logits", logits)


def _scatter_rows(values, ids, num_experts: int):
    """out[n, ids[n, j]] = values[n, j].   (N, K) -> (N, E), zeros elsewhere."""
    out = np.zeros((len(ids), num_experts), dtype=values.dtype)        # (N, E)
    np.put_along_axis(out, ids, values, axis=1)
    return out


# -- top-K of the logits, then softmax over the K ------------------------------

class TopkSoftmaxCache(NamedTuple):
    softmax_cache: functional.SoftmaxCache   # of the softmax over the K selected logits
    ids: np.ndarray         # (N, K)
    num_experts: int


def topk_softmax_forward(logits, k: int):
    """ids = topK(logits), weights = softmax(logits[ids]).   (N, E) -> ids (N, K), weights (N, K)."""
    _check_logits("topk_softmax_forward", logits, k)
    ids = top_k_indices(logits, k)                                     # (N, K)
    weights, sm_cache = functional.softmax_forward(np.take_along_axis(logits, ids, axis=1))   # (N, K)
    return (ids, weights), TopkSoftmaxCache(sm_cache, ids, logits.shape[1])


def topk_softmax_backward(dweights, cache: TopkSoftmaxCache):
    """dlogits[ids] = softmax_backward(dweights); zero for unselected experts."""
    dsel = functional.softmax_backward(dweights, cache.softmax_cache)  # (N, K)
    return _scatter_rows(dsel, cache.ids, cache.num_experts)           # (N, E)


# -- softmax then top-K ------------------------------------------------------

class SoftmaxTopkCache(NamedTuple):
    softmax_cache: functional.SoftmaxCache   # of the softmax over all E experts
    ids: np.ndarray         # (N, K)


def softmax_topk_forward(logits, k: int, renormalize: bool = True):
    """ids = topK(p), weights = p[ids] (/ sum p[ids] if renormalize), p = softmax(logits).

    logits: (N, E) -> ids (N, K), weights (N, K).

    Renormalized, the softmax's normalizer over all E experts cancels:
    p_i / sum_{j in top-K} p_j = exp(z_i) / sum_{j in top-K} exp(z_j), so this
    *is* top-K-then-softmax, and we compute it that way: the unselected
    logits then get exactly zero gradient in floating point too. With
    K = 1 the renormalized weight is exactly 1, so the router gets no task
    gradient at all: Switch Transformer uses weights = p instead.
    """
    _check_logits("softmax_topk_forward", logits, k)
    if renormalize:
        return topk_softmax_forward(logits, k)
    p, sm_cache = functional.softmax_forward(logits)                   # (N, E)
    ids = top_k_indices(p, k)                                          # (N, K)
    weights = np.take_along_axis(p, ids, axis=1)                       # (N, K)
    return (ids, weights), SoftmaxTopkCache(sm_cache, ids)


def softmax_topk_backward(dweights, cache):
    """Renormalized: as topk_softmax. Raw: dlogits = softmax_backward(scatter(dweights))."""
    if isinstance(cache, TopkSoftmaxCache):
        return topk_softmax_backward(dweights, cache)
    num_experts = cache.softmax_cache.p.shape[1]
    return functional.softmax_backward(_scatter_rows(dweights, cache.ids, num_experts),
                                       cache.softmax_cache)            # (N, E)


# -- sigmoid scores with a selection-only bias (DeepSeek-V3) -------------------

class SigmoidTopkCache(NamedTuple):
    s: np.ndarray           # (N, E) sigmoid(logits)
    ids: np.ndarray         # (N, K)
    weights: np.ndarray     # (N, K)
    total: np.ndarray | None  # (N, 1) sum of the selected s, or None when not normalized
    scale: float            # routed_scaling_factor


def group_limited_mask(scores, n_group: int, topk_group: int):
    """Which experts stay eligible under group-limited routing (DeepSeek-V3).

    The E experts form n_group groups of E / n_group; a group's score is the
    sum of its two best scores (its best one if it has a single expert); only
    the topk_group best groups stay eligible.   scores (N, E) -> (N, E) bool.
    """
    n, e = scores.shape
    grouped = scores.reshape(n, n_group, e // n_group)                 # (N, G, E/G)
    best_two = -np.sort(-grouped, axis=2)[:, :, :2]                    # (N, G, <=2)
    group_score = best_two.sum(axis=2)                                 # (N, G)
    keep = top_k_indices(group_score, topk_group)                      # (N, topk_group)
    eligible = np.zeros((n, n_group), dtype=bool)                      # (N, G)
    np.put_along_axis(eligible, keep, True, axis=1)
    return np.repeat(eligible, e // n_group, axis=1)                   # (N, E)


def check_groups(fn, num_experts: int, k: int, n_group: int, topk_group: int) -> None:
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"{fn}: n_group={n_group} must divide num_experts={num_experts}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"{fn}: topk_group={topk_group} must be in [1, n_group={n_group}]")
    if k > topk_group * (num_experts // n_group):
        raise ValueError(f"{fn}: k={k} exceeds the {topk_group * (num_experts // n_group)} experts "
                         f"in the eligible groups (topk_group={topk_group} of n_group={n_group})")


def sigmoid_topk_forward(logits, k: int, bias=None, *, n_group: int = 1, topk_group: int = 1,
                         normalize: bool = True, scale: float = 1.0):
    """s = sigmoid(logits); ids = topK(s + bias) among eligible groups;
    weights = scale * s[ids] / sum s[ids]  (or scale * s[ids] unnormalized).

    logits: (N, E), bias: (E,) or None -> ids (N, K), weights (N, K). The
    bias only steers which experts are chosen (and which groups stay
    eligible); it never enters the weights, so it gets no gradient and is
    updated by `balance.update_selection_bias`. n_group = topk_group = 1 is
    plain top-K.
    """
    _check_logits("sigmoid_topk_forward", logits, k)
    check_groups("sigmoid_topk_forward", logits.shape[1], k, n_group, topk_group)
    s = functional.sigmoid(logits)                                     # (N, E)
    if bias is not None:
        validate.shape("sigmoid_topk_forward", "bias", bias, (logits.shape[1],))
    biased = s if bias is None else s + bias                           # (N, E) for selection only
    if n_group > 1:
        biased = np.where(group_limited_mask(biased, n_group, topk_group), biased, -np.inf)
    ids = top_k_indices(biased, k)                                     # (N, K)
    picked = np.take_along_axis(s, ids, axis=1)                        # (N, K)
    total = picked.sum(axis=1, keepdims=True) if normalize else None   # (N, 1)
    weights = scale * (picked / total if normalize else picked)        # (N, K)
    return (ids, weights), SigmoidTopkCache(s, ids, weights, total, scale)


def sigmoid_topk_backward(dweights, cache: SigmoidTopkCache):
    """Normalized: ds = scale (dw - <dw, w / scale>) / sum s; unnormalized: ds = scale dw;
    then dlogits = scatter(ds) * s (1 - s)."""
    s, ids, weights, total, scale = cache
    if total is None:
        ds = scale * dweights                                          # (N, K)
    else:
        ds = scale * (dweights - np.sum(dweights * weights, axis=1, keepdims=True) / scale) / total
    return _scatter_rows(ds, ids, s.shape[1]) * s * (1 - s)            # (N, E)


# -- noisy top-K gating (Shazeer et al. 2017) ----------------------------------

class NoisyTopkCache(NamedTuple):
    x: np.ndarray           # (N, D)
    w_noise: np.ndarray     # (D, E)
    noise: np.ndarray       # (N, E) the standard-normal draws
    raw: np.ndarray         # (N, E) x W_noise
    std: np.ndarray         # (N, E) softplus(raw)
    top_cache: TopkSoftmaxCache
    thr_index: np.ndarray   # (N, E) which entry of H is each expert's threshold
    z: np.ndarray           # (N, E) (clean - thr) / std


def noisy_topk_forward(logits, x, w_noise, noise, k: int):
    """Noisy top-K gating with the differentiable load estimate.

        std = softplus(x W_noise),  H = logits + noise * std               (N, E)
        ids = topK(H),  weights = softmax(H[ids])                           (N, K)
        load_estimate_i = sum_n Phi((logits[n, i] - thr[n, i]) / std[n, i]) (E,)

    thr[n, i] is the K-th largest of H[n] not counting entry i: the (K+1)-th
    largest if i is among the top K, else the K-th. Phi(.) is then the
    probability, over a fresh draw of noise[n, i] alone, that expert i is
    still selected: a smooth stand-in for the count of tokens per expert.
    logits: (N, E) the clean x W_router; noise: (N, E), passed in so the
    function is deterministic. Requires K < E. -> (ids, weights, load_estimate), cache.
    """
    validate.ndim("noisy_topk_forward", "x", x, 2)
    validate.shape("noisy_topk_forward", "w_noise", w_noise, (x.shape[1], logits.shape[1]))
    validate.same_shape("noisy_topk_forward", "noise", noise, "logits", logits)
    if k >= logits.shape[1]:
        raise ValueError(f"noisy_topk_forward: k={k} must be < num_experts={logits.shape[1]} "
                         "for the load estimate (an expert outside the top K must exist)")
    raw = x @ w_noise                                                  # (N, E)
    std = functional.softplus(raw)                                     # (N, E)
    noisy = logits + noise * std                                       # (N, E)
    (ids, weights), top_cache = topk_softmax_forward(noisy, k)         # (N, K), (N, K)
    order = np.argsort(-noisy, axis=1, kind="stable")                  # (N, E)
    in_top = np.zeros(noisy.shape, dtype=bool)                         # (N, E)
    np.put_along_axis(in_top, ids, True, axis=1)
    thr_index = np.where(in_top, order[:, [k]], order[:, [k - 1]])     # (N, E)
    thr = np.take_along_axis(noisy, thr_index, axis=1)                 # (N, E)
    z = (logits - thr) / std                                           # (N, E)
    load_estimate = functional.normal_cdf(z).sum(axis=0)               # (E,)
    cache = NoisyTopkCache(x, w_noise, noise, raw, std, top_cache, thr_index, z)
    return (ids, weights, load_estimate), cache


def noisy_topk_backward(dout, cache: NoisyTopkCache):
    """(dweights (N, K), dload (E,)) -> dlogits (N, E), dx (N, D) via W_noise, dW_noise (D, E)."""
    dweights, dload = dout
    c = cache
    dnoisy = topk_softmax_backward(dweights, c.top_cache)              # (N, E) from the weights
    dz = dload[None, :] * functional.normal_pdf(c.z)                   # (N, E)
    dlogits = dnoisy + dz / c.std                                      # (N, E)
    dstd = dnoisy * c.noise - dz * c.z / c.std                         # (N, E)
    dnoisy_thr = np.zeros_like(dnoisy)                                 # (N, E) through thr = H[thr_index]
    np.add.at(dnoisy_thr, (np.arange(len(c.x))[:, None], c.thr_index), -dz / c.std)
    dlogits += dnoisy_thr                                              # H = logits + noise * std
    dstd += dnoisy_thr * c.noise
    draw = dstd * functional.sigmoid(c.raw)                            # (N, E) softplus' = sigmoid
    return dlogits, draw @ c.w_noise.T, c.x.T @ draw


# -- expert choice (Zhou et al. 2022) ------------------------------------------

class ExpertChoiceCache(NamedTuple):
    softmax_cache: functional.SoftmaxCache   # softmax over experts, (N, E)
    token_ids: np.ndarray   # (E, C)


def expert_choice_forward(logits, capacity: int):
    """p = softmax(logits) over experts; expert e takes the C tokens with the largest p[:, e].

    logits: (N, E) -> token_ids (E, C) int, weights (E, C) = p[token_ids, e].
    A token may be taken by several experts or by none.
    """
    validate.ndim("expert_choice_forward", "logits", logits, 2)
    validate.finite("expert_choice_forward", "logits", logits)
    if not 1 <= capacity <= logits.shape[0]:
        raise ValueError(f"expert_choice_forward: capacity must be in [1, N={logits.shape[0]}], "
                         f"got {capacity}")
    p, sm_cache = functional.softmax_forward(logits)                   # (N, E)
    token_ids = top_k_indices(p.T, capacity)                           # (E, C)
    weights = np.take_along_axis(p.T, token_ids, axis=1)               # (E, C)
    return (token_ids, weights), ExpertChoiceCache(sm_cache, token_ids)


def expert_choice_backward(dweights, cache: ExpertChoiceCache):
    """dlogits = softmax_backward(dp), dp[token_ids[e, c], e] = dweights[e, c]."""
    num_tokens = cache.softmax_cache.p.shape[0]
    dp_t = _scatter_rows(dweights, cache.token_ids, num_tokens)        # (E, N)
    return functional.softmax_backward(dp_t.T, cache.softmax_cache)    # (N, E)


# -- the router unit: projection, selection, weights ----------------------------

class RouterOut(NamedTuple):
    """What a router decided for one batch."""
    ids: np.ndarray | None            # (N, K) chosen experts, best first (None for expert choice)
    weights: np.ndarray               # (N, K) routing weights; expert choice: (E, C)
    logits: np.ndarray                # (N, E) x W_router, before any noise
    token_ids: np.ndarray | None      # (E, C) expert choice: the tokens each expert took
    load_estimate: np.ndarray | None  # (E,) noisy_topk: the smooth load estimate


class RouteExtras(NamedTuple):
    """Inputs some router kinds need beyond the logits."""
    x: np.ndarray                     # (N, D)
    params: dict                      # w_noise for noisy_topk
    bias: np.ndarray | None           # (E,) selection bias for sigmoid_bias
    noise: np.ndarray | None          # (N, E) standard-normal draws for noisy_topk (None: none)


class RouterCache(NamedTuple):
    kind: str
    x: np.ndarray                     # (N, D)
    w_router: np.ndarray              # (D, E)
    select_cache: tuple               # the selection pair's own cache


def _select_topk(renormalize: bool):
    def select(logits, config, extras):
        (ids, weights), cache = softmax_topk_forward(logits, config.k, renormalize)
        return RouterOut(ids, weights, logits, None, None), cache
    return select


def _select_topk_softmax(logits, config, extras):
    (ids, weights), cache = topk_softmax_forward(logits, config.k)
    return RouterOut(ids, weights, logits, None, None), cache


def _select_sigmoid_bias(logits, config, extras):
    (ids, weights), cache = sigmoid_topk_forward(
        logits, config.k, extras.bias, n_group=config.n_group, topk_group=config.topk_group,
        normalize=config.norm_topk_prob, scale=config.routed_scaling_factor)
    return RouterOut(ids, weights, logits, None, None), cache


def _select_noisy(logits, config, extras):
    noise = np.zeros_like(logits) if extras.noise is None else extras.noise   # (N, E)
    (ids, weights, load), cache = noisy_topk_forward(logits, extras.x, extras.params["w_noise"],
                                                     noise, config.k)
    return RouterOut(ids, weights, logits, None, load), cache


def _select_expert_choice(logits, config, extras):
    n, e = logits.shape
    cap = min(capacity_of(n, e, 1, config.capacity_factor, config.min_capacity), n)
    (token_ids, weights), cache = expert_choice_forward(logits, cap)   # (E, C), (E, C)
    return RouterOut(None, weights, logits, token_ids, None), cache


def _logits_only(backward):
    """A selection backward that only reaches the logits: (dlogits, no dx, no extra grads)."""
    return lambda dweights, dload, cache: (backward(dweights, cache), None, {})


def _noisy_backward(dweights, dload, cache):
    dload = np.zeros_like(cache.std[0]) if dload is None else dload    # (E,)
    dlogits, dx, dw_noise = noisy_topk_backward((dweights, dload), cache)
    return dlogits, dx, {"w_noise": dw_noise}


class RouterKind(NamedTuple):
    select: Callable      # (logits, config, extras) -> RouterOut, select_cache
    backward: Callable    # (dweights, dload, select_cache) -> dlogits, dx or None, {extra grads}
    extra_params: tuple   # parameters beyond w_router
    softmax: bool         # scores are softmax(logits): the balance loss's P_i is defined


ROUTERS = {
    "softmax_topk": RouterKind(_select_topk(True), _logits_only(softmax_topk_backward), (), True),
    "softmax_topk_raw": RouterKind(_select_topk(False), _logits_only(softmax_topk_backward), (),
                                   True),
    "switch": RouterKind(_select_topk(False), _logits_only(softmax_topk_backward), (), True),
    "topk_softmax": RouterKind(_select_topk_softmax, _logits_only(topk_softmax_backward), (), True),
    "sigmoid_bias": RouterKind(_select_sigmoid_bias, _logits_only(sigmoid_topk_backward), (), False),
    "noisy_topk": RouterKind(_select_noisy, _noisy_backward, ("w_noise",), False),
    "expert_choice": RouterKind(_select_expert_choice, _logits_only(expert_choice_backward), (),
                                False),
}


def router_forward(x, params: dict, config, *, bias=None, noise=None):
    """logits = x W_router, then the kind's selection.   x (N, D) -> RouterOut, RouterCache.

    bias: (E,) selection bias (sigmoid_bias); noise: (N, E) draws (noisy_topk,
    None at evaluation). config: a SparseConfig (router, k, capacity).
    """
    w_router = params["w_router"]                                      # (D, E)
    validate.ndim("router_forward", "x", x, 2)
    validate.shape("router_forward", "w_router", w_router, (x.shape[1], config.num_experts))
    if config.precision.compute == "fp32":
        # in low precision an overflow upstream is the loss scaler's event, not an input error
        validate.finite("router_forward", "x", x)
    if noise is not None:
        validate.shape("router_forward", "noise", noise, (len(x), config.num_experts))
    logits = _project(x, w_router, config.precision)                   # (N, E)
    out, select_cache = ROUTERS[config.router].select(logits, config,
                                                      RouteExtras(x, params, bias, noise))
    return out, RouterCache(config.router, x, w_router, select_cache)


def _project(x, w_router, precision):
    """x W_router in float32, or rounded like the experts when precision.router is "compute"
    (the backward treats the rounding as identity, as mixed-precision training does)."""
    if precision.router == "compute":
        return lowp.gemm_for(precision)(x, w_router)                   # (N, E)
    return x @ w_router                                                # (N, E)


def router_backward(dweights, cache: RouterCache, aux_grads=None):
    """-> dx (N, D), grads {w_router, and w_noise for noisy_topk}.

    dweights: (N, K) (or (E, C)) from the combine; aux_grads: a
    balance.AuxGrads (gradients the auxiliary losses send to the logits,
    the weights and the load estimate), or None.
    """
    dlogits_aux, dweights_aux, dload = aux_grads if aux_grads is not None else (None, None, None)
    if dweights_aux is not None:
        dweights = dweights + dweights_aux                             # (N, K)
    dlogits, dx_extra, grads = ROUTERS[cache.kind].backward(dweights, dload, cache.select_cache)
    if dlogits_aux is not None:
        dlogits = dlogits + dlogits_aux                                # (N, E)
    grads["w_router"] = cache.x.T @ dlogits                            # (D, E)
    dx = dlogits @ cache.w_router.T                                    # (N, D)
    return (dx if dx_extra is None else dx + dx_extra), grads


def router_selection(cache: RouterCache) -> tuple:
    """Every discrete choice the router made (for the kink guard of gradient checks)."""
    c = cache.select_cache
    if isinstance(c, NoisyTopkCache):
        return (c.top_cache.ids, c.thr_index)
    if isinstance(c, ExpertChoiceCache):
        return (c.token_ids,)
    return (c.ids,)


def init_router(config, rng, dtype=np.float64) -> dict:
    """Small random router weights (routing starts near uniform): w_router (D, E) [, w_noise]."""
    shape = (config.d_model, config.num_experts)
    params = {"w_router": (config.router_scale * rng.standard_normal(shape)).astype(dtype)}
    if config.router == "noisy_topk":
        params["w_noise"] = (config.router_scale * rng.standard_normal(shape)).astype(dtype)
    return params
