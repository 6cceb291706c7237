"""Sparse routers: each token picks K of E experts and a weight for each.

Every router is a forward/backward pair. Forward returns the chosen expert
ids (N, K), int, best first, and their weights (N, K); backward maps a
gradient on the weights to a gradient on the scores that made them. The ids
are a discrete choice and carry no gradient: they are held fixed, which is
exact everywhere except on the measure-zero set where two scores tie.

    softmax_topk    p = softmax(z); keep the K largest p; renormalise or not
                    (renormalised, it equals topk_softmax exactly)
                    (Mixtral: renormalise; Switch: K = 1, weight = p)
    topk_softmax    keep the K largest logits, softmax over those K only
    sigmoid_topk    s = sigmoid(z); select by s + bias (bias for selection
                    only); weights s / sum of selected s   (DeepSeek-V3)
    noisy_topk      H = x Wg + eps * softplus(x Wn); topk_softmax on H; plus
                    Shazeer et al.'s smooth load estimate        (2017)
    expert_choice   each expert takes its C best tokens       (Zhou et al. 2022)

Shape letters: N tokens, E experts, K experts per token, C tokens per expert.
"""
from __future__ import annotations

import math

import numpy as np

from moe_np import layers, losses, validate


def top_k_indices(scores, k: int):
    """The k largest entries of each row, largest first; ties go to the lower index.
    scores: (N, E) -> (N, K) int."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]        # (N, K)


def _check_logits(fn, logits, k):
    validate.ndim(fn, "logits", logits, 2)
    validate.top_k(fn, k, logits.shape[1])
    validate.finite(fn, "logits", logits)


def _scatter_rows(values, ids, num_experts):
    """out[n, ids[n, j]] = values[n, j].   (N, K) -> (N, E), zeros elsewhere."""
    out = np.zeros((len(ids), num_experts))                          # (N, E)
    np.put_along_axis(out, ids, values, axis=1)
    return out


def _renormalise_backward(dw, w, total):
    """For w = s / sum(s) over the selected entries: ds = (dw - <dw, w>) / sum(s)."""
    return (dw - np.sum(dw * w, axis=1, keepdims=True)) / total     # (N, K)


# -- softmax then top-K ------------------------------------------------------

def softmax_topk_forward(logits, k: int, renormalize: bool = True):
    """ids = topK(p), w = p[ids] (/ sum p[ids] if renormalize), p = softmax(logits).

    logits: (N, E) -> ids (N, K), w (N, K).

    With renormalize (Mixtral) the softmax's normaliser over all E experts
    cancels: p_i / sum_{j in top-K} p_j = exp(z_i) / sum_{j in top-K} exp(z_j),
    so this *is* top-K-then-softmax, and we compute it that way. Then the
    weights do not depend on the unselected logits even in floating point,
    and those logits get exactly zero gradient, as the mathematics says.
    With K = 1 the weight is exactly 1 for every token, so the router gets
    no gradient from the task loss at all: Switch Transformer uses w = p.
    """
    _check_logits("softmax_topk_forward", logits, k)
    if renormalize:
        (ids, w), cache = topk_softmax_forward(logits, k)              # (N, K), (N, K)
        return (ids, w), ("renormalized", cache)
    p, sm_cache = losses.softmax_forward(logits)                      # (N, E)
    ids = top_k_indices(p, k)                                         # (N, K)
    w = np.take_along_axis(p, ids, axis=1)                            # (N, K)
    return (ids, w), ("raw", (sm_cache, ids))


def softmax_topk_backward(dw, cache):
    """Renormalised: as topk_softmax. Raw: dlogits = softmax_backward(scatter(dw)).
    dw (N, K) -> (N, E)."""
    kind, inner = cache
    if kind == "renormalized":
        return topk_softmax_backward(dw, inner)
    sm_cache, ids = inner
    return losses.softmax_backward(_scatter_rows(dw, ids, sm_cache[0].shape[1]), sm_cache)


# -- top-K of the logits, then softmax over the K ------------------------------

def topk_softmax_forward(logits, k: int):
    """ids = topK(logits), w = softmax(logits[ids]).   (N, E) -> ids (N, K), w (N, K)."""
    _check_logits("topk_softmax_forward", logits, k)
    ids = top_k_indices(logits, k)                                    # (N, K)
    w, sm_cache = losses.softmax_forward(np.take_along_axis(logits, ids, axis=1))   # (N, K)
    return (ids, w), (sm_cache, ids, logits.shape[1])


def topk_softmax_backward(dw, cache):
    """dlogits[ids] = softmax_backward(dw); zero for unselected experts."""
    sm_cache, ids, num_experts = cache
    return _scatter_rows(losses.softmax_backward(dw, sm_cache), ids, num_experts)


# -- sigmoid scores with a selection-only bias (DeepSeek-V3) -------------------

def sigmoid_topk_forward(logits, k: int, bias=None):
    """s = sigmoid(logits); ids = topK(s + bias); w = s[ids] / sum s[ids].

    logits: (N, E), bias: (E,) or None -> ids (N, K), w (N, K). The bias
    only steers which experts are chosen; it never enters the weights, so
    it gets no gradient and is updated by `balance.update_selection_bias`.
    """
    _check_logits("sigmoid_topk_forward", logits, k)
    bias = np.zeros(logits.shape[1]) if bias is None else np.asarray(bias, dtype=float)
    validate.shape("sigmoid_topk_forward", "bias", bias, (logits.shape[1],))
    s = layers.sigmoid(logits)                                        # (N, E)
    ids = top_k_indices(s + bias, k)                                  # (N, K)
    picked = np.take_along_axis(s, ids, axis=1)                       # (N, K)
    total = picked.sum(axis=1, keepdims=True)                         # (N, 1)
    w = picked / total                                                # (N, K)
    return (ids, w), (s, ids, w, total)


def sigmoid_topk_backward(dw, cache):
    """dlogits = scatter((dw - <dw, w>) / sum s) * s (1 - s)."""
    s, ids, w, total = cache
    ds = _scatter_rows(_renormalise_backward(dw, w, total), ids, s.shape[1])   # (N, E)
    return ds * s * (1.0 - s)


# -- noisy top-K gating (Shazeer et al. 2017) ----------------------------------

_erf = np.frompyfunc(math.erf, 1, 1)


def normal_cdf(z):
    """Phi(z) = (1 + erf(z / sqrt 2)) / 2, with math.erf (exact to float64) elementwise."""
    return 0.5 * (1.0 + np.asarray(_erf(np.asarray(z, dtype=float) / math.sqrt(2.0)), dtype=float))


def normal_pdf(z):
    """phi(z) = exp(-z^2 / 2) / sqrt(2 pi)."""
    return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def softplus(x):
    """log(1 + exp(x)), stable for large |x|."""
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def noisy_topk_forward(x, w_gate, w_noise, noise, k: int):
    """Noisy top-K gating with the differentiable load estimate.

        clean = x Wg,  std = softplus(x Wn),  H = clean + noise * std     (N, E)
        ids = topK(H),  w = softmax(H[ids])                                (N, K)
        load_i = sum_n Phi((clean[n, i] - thr[n, i]) / std[n, i])          (E,)

    thr[n, i] is the K-th largest of H[n] not counting entry i: the (K+1)-th
    largest if i is among the top K, else the K-th. Phi(.) is then the
    probability, over a fresh draw of noise[n, i] alone, that expert i is
    still selected: a smooth stand-in for the count of tokens per expert.
    noise: (N, E) standard-normal draws, passed in so the function is
    deterministic. x: (N, D), Wg, Wn: (D, E). Requires K < E.
    -> (ids, w, load), cache.
    """
    validate.ndim("noisy_topk_forward", "x", x, 2)
    validate.ndim("noisy_topk_forward", "w_gate", w_gate, 2)
    if w_gate.shape[0] != x.shape[1]:
        raise ValueError(f"noisy_topk_forward: x has D={x.shape[1]} but w_gate has D={w_gate.shape[0]}")
    validate.same_shape("noisy_topk_forward", "w_gate", w_gate, "w_noise", w_noise)
    validate.shape("noisy_topk_forward", "noise", noise, (x.shape[0], w_gate.shape[1]))
    num_experts = w_gate.shape[1]
    validate.top_k("noisy_topk_forward", k, num_experts)
    if k == num_experts:
        raise ValueError(f"noisy_topk_forward: k={k} must be < num_experts={num_experts} "
                         "for the load estimate (an expert outside the top K must exist)")
    clean = x @ w_gate                                                # (N, E)
    raw = x @ w_noise                                                 # (N, E)
    std = softplus(raw)                                               # (N, E)
    noisy = clean + noise * std                                       # (N, E)
    (ids, w), top_cache = topk_softmax_forward(noisy, k)              # (N, K), (N, K)
    order = np.argsort(-noisy, axis=1, kind="stable")                 # (N, E)
    in_top = np.zeros(noisy.shape, dtype=bool)                        # (N, E)
    np.put_along_axis(in_top, ids, True, axis=1)
    thr_index = np.where(in_top, order[:, [k]], order[:, [k - 1]])    # (N, E) which entry is thr
    thr = np.take_along_axis(noisy, thr_index, axis=1)                # (N, E)
    z = (clean - thr) / std                                           # (N, E)
    load = normal_cdf(z).sum(axis=0)                                  # (E,)
    cache = (x, w_gate, w_noise, noise, raw, std, top_cache, thr_index, z)
    return (ids, w, load), cache


def noisy_topk_backward(dout, cache):
    """(dw (N, K), dload (E,)) -> dx (N, D), dWg (D, E), dWn (D, E)."""
    dw, dload = dout
    x, w_gate, w_noise, noise, raw, std, top_cache, thr_index, z = cache
    dnoisy = topk_softmax_backward(dw, top_cache)                     # (N, E) from the weights
    dz = dload[None, :] * normal_pdf(z)                               # (N, E) dload/dz
    dclean = dnoisy + dz / std                                        # (N, E)
    dstd = dnoisy * noise - dz * z / std                              # (N, E)
    dthr = -dz / std                                                  # (N, E) on H[n, thr_index]
    dnoisy_thr = np.zeros_like(dnoisy)                                # (N, E)
    np.add.at(dnoisy_thr, (np.arange(len(x))[:, None], thr_index), dthr)
    dclean += dnoisy_thr                                              # H = clean + noise * std
    dstd += dnoisy_thr * noise
    draw = dstd * layers.sigmoid(raw)                                 # (N, E) softplus' = sigmoid
    dx = dclean @ w_gate.T + draw @ w_noise.T                         # (N, D)
    return dx, x.T @ dclean, x.T @ draw


# -- expert choice (Zhou et al. 2022) ------------------------------------------

def expert_choice_forward(logits, capacity: int):
    """p = softmax(logits) over experts; expert e takes the C tokens with the largest p[:, e].

    logits: (N, E) -> token_ids (E, C) int, w (E, C) = p[token_ids, e].
    A token may be taken by several experts or by none.
    """
    validate.ndim("expert_choice_forward", "logits", logits, 2)
    validate.finite("expert_choice_forward", "logits", logits)
    if not 1 <= capacity <= logits.shape[0]:
        raise ValueError(f"expert_choice_forward: capacity must be in [1, N={logits.shape[0]}], "
                         f"got {capacity}")
    p, sm_cache = losses.softmax_forward(logits)                      # (N, E)
    token_ids = top_k_indices(p.T, capacity)                          # (E, C)
    w = np.take_along_axis(p.T, token_ids, axis=1)                    # (E, C)
    return (token_ids, w), (sm_cache, token_ids)


def expert_choice_backward(dw, cache):
    """dlogits = softmax_backward(dp), dp[token_ids[e, c], e] = dw[e, c]."""
    sm_cache, token_ids = cache
    dp_t = _scatter_rows(dw, token_ids, sm_cache[0].shape[0])         # (E, N)
    return losses.softmax_backward(dp_t.T, sm_cache)
