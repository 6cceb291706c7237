"""Auxiliary losses that keep a sparse router healthy, and the loss-free bias update.

Shape letters: N tokens, E experts, K experts per token.

    balance_loss   E * sum_i f_i P_i        (Switch Transformer, GShard)
    seq_mean_balance_loss   the same per sequence, averaged (HF Switch's grouping)
    z_loss         mean_n logsumexp(z_n)^2  (ST-MoE)
    cv_squared     Var(v) / mean(v)^2       (Shazeer et al.'s importance and load losses)
    importance     sum of gate weights each expert receives
    update_selection_bias   DeepSeek-V3's auxiliary-loss-free balancing

`aux_forward(route, config)` assembles the layer's auxiliary loss from the
config (coefficients applied) and `aux_backward` returns an AuxGrads: what
the losses send to the router's logits, weights and load estimate.
"""
from __future__ import annotations

import numpy as np

from typing import NamedTuple

from moe_np import functional, validate


def expert_counts(ids, num_experts: int):
    """How many of the N*K assignments chose each expert.   ids (N, K) -> (E,) int."""
    return np.bincount(np.asarray(ids).ravel(), minlength=num_experts)


def balance_loss_forward(probs, ids):
    """loss = E * sum_i f_i P_i.

    probs: (N, E) the router's softmax over *all* E experts (not the top-K
    weights, not renormalised); ids: (N, K) the top-K choices, counted
    before any capacity drop. f_i = (assignments to i) / (N K), so sum f = 1;
    P_i = mean_n probs[n, i]. f carries no gradient (it is a count).

    Under this normalisation the loss is 1 at perfect balance (f_i = P_i =
    1/E) and at most E / K: a token picks an expert at most once, so
    f_i <= 1/K and sum_i f_i P_i <= 1/K. Collapse reaches it (every token
    picks the same K experts and puts all its probability on them): E for
    K = 1, E / 2 for K = 2. 1 is not a lower bound; the loss dips below it
    when the counts and the mean probabilities disagree. Dividing by N
    instead of N K (sum f = K, as Mixtral-style code does) multiplies the
    loss by K: K at perfect balance, E at collapse.
    cache (f, N).
    """
    validate.ndim("balance_loss_forward", "probs", probs, 2)
    validate.ndim("balance_loss_forward", "ids", ids, 2)
    n, e = probs.shape
    if ids.shape[0] != n:
        raise ValueError(f"balance_loss_forward: probs has N={n} rows but ids has {ids.shape[0]}")
    f = (expert_counts(ids, e) / ids.size).astype(probs.dtype)       # (E,) sums to 1
    p_mean = probs.mean(axis=0)                                       # (E,)
    return e * np.sum(f * p_mean), (f, n)


def balance_loss_backward(dloss, cache):
    """dprobs[n, i] = dloss * E f_i / N.   -> (N, E)."""
    f, n = cache
    return np.broadcast_to(dloss * len(f) * f / n, (n, len(f))).copy()   # (N, E)


def seq_mean_balance_loss_forward(probs, ids, seq_len: int):
    """The balance loss of each sequence, averaged over the B sequences of the batch:

        L = mean_b E sum_i f_bi P_bi,   f_bi = #{(t, k) : t in b, ids_tk = i} / (T K),
        P_bi = mean_{t in b} probs[t, i]

    HF's Switch Transformers computes its load_balancing_loss_func this way:
    the means run over each sequence (its "group") first. With B = 1 it is
    balance_loss_forward; with B > 1 a sequence that favours one expert is
    penalised even when another sequence favours a different one, where the
    pooled loss (balance_scope "batch") sees a balanced batch.
    probs: (N, E) the softmax over all E experts; ids: (N, K); N = B T with
    T = seq_len. f is a count (no gradient). cache (f (B, E), T).
    """
    validate.ndim("seq_mean_balance_loss_forward", "probs", probs, 2)
    validate.ndim("seq_mean_balance_loss_forward", "ids", ids, 2)
    n, e = probs.shape
    if ids.shape[0] != n or seq_len < 1 or n % seq_len:
        raise ValueError(f"seq_mean_balance_loss_forward: probs has N={n} rows and ids "
                         f"{ids.shape[0]}; both must split into sequences of seq_len={seq_len}")
    b, k = n // seq_len, ids.shape[1]
    seq_of = np.repeat(np.arange(b), seq_len * k)                      # (N*K,) sequence of each choice
    counts = np.bincount(seq_of * e + ids.ravel(), minlength=b * e).reshape(b, e)   # (B, E)
    f = (counts / (seq_len * k)).astype(probs.dtype)                   # (B, E) each row sums to 1
    p_mean = probs.reshape(b, seq_len, e).mean(axis=1)                 # (B, E)
    return e * np.mean(np.sum(f * p_mean, axis=1)), (f, seq_len)


def seq_mean_balance_loss_backward(dloss, cache):
    """dprobs[t, i] = dloss E f_b(t)i / (B T), b(t) the sequence of token t.   -> (N, E)."""
    f, seq_len = cache
    b, e = f.shape
    return np.repeat(dloss * e * f / (b * seq_len), seq_len, axis=0)   # (N, E)


def global_balance_loss_forward(probs_list, ids_list):
    """The balance loss over a global batch of micro-batches (Qwen's global-batch balancing):

        L = E * sum_i f_i P_i,  f_i = (assignments to i in all micro-batches) / (N K),
        P_i = mean of probs[:, i] over all N tokens of all micro-batches.

    Counts are accumulated before the loss, so the value and every
    micro-batch's gradient are the same however the batch is split.
    probs_list: list of (N_b, E); ids_list: list of (N_b, K). cache (f, sizes, N).
    """
    if len(probs_list) != len(ids_list) or not probs_list:
        raise ValueError(f"global_balance_loss_forward: give as many probs as ids arrays (>= 1), "
                         f"got {len(probs_list)} and {len(ids_list)}")
    e = probs_list[0].shape[1]
    counts = sum(expert_counts(ids, e) for ids in ids_list)           # (E,) over the global batch
    f = (counts / sum(ids.size for ids in ids_list)).astype(probs_list[0].dtype)   # (E,)
    n = sum(len(p) for p in probs_list)
    p_mean = sum(p.sum(axis=0) for p in probs_list) / n               # (E,)
    return e * np.sum(f * p_mean), (f, [len(p) for p in probs_list], n)


def global_balance_loss_backward(dloss, cache):
    """Each micro-batch: dprobs[n, i] = dloss E f_i / N (N the global token count)."""
    f, sizes, n = cache
    row = dloss * len(f) * f / n                                      # (E,)
    return [np.broadcast_to(row, (size, len(f))).copy() for size in sizes]   # [(N_b, E)]


def z_loss_forward(logits):
    """loss = mean_n logsumexp(logits_n)^2; (log E)^2 for all-zero logits.   (N, E) -> scalar.
    It pulls the logits' scale down, which keeps the router's softmax in a
    range where rounding does not hurt. cache (lse, softmax)."""
    validate.ndim("z_loss_forward", "logits", logits, 2)
    lse = functional.logsumexp(logits)                                    # (N,)
    p = np.exp(logits - lse[:, None])                                 # (N, E)
    return np.mean(lse**2), (lse, p)


def z_loss_backward(dloss, cache):
    """dlogits = dloss * 2 lse_n softmax(logits_n) / N."""
    lse, p = cache
    return dloss * 2.0 * lse[:, None] * p / len(lse)                  # (N, E)


def cv_squared_forward(v):
    """Var(v) / mean(v)^2 (population variance): 0 when all entries are equal.   (E,) -> scalar."""
    validate.ndim("cv_squared_forward", "v", v, 1)
    m = v.mean()
    if not m > 0:
        raise ValueError(f"cv_squared_forward: mean(v) must be > 0, got {m}")
    return np.mean((v - m) ** 2) / m**2, (v, m)


def cv_squared_backward(dloss, cache):
    """With q = mean(v^2): L = q / m^2 - 1, dL/dv_i = 2 v_i / (E m^2) - 2 q / (E m^3)."""
    v, m = cache
    q = np.mean(v**2)
    return dloss * (2.0 * v / m**2 - 2.0 * q / m**3) / len(v)        # (E,)


def importance_forward(w, ids, num_experts: int):
    """importance_i = sum of the gate weights token-expert pairs give expert i.
    w, ids: (N, K) -> (E,). cache (ids)."""
    validate.same_shape("importance_forward", "w", w, "ids", ids)
    out = np.bincount(ids.ravel(), weights=w.ravel(), minlength=num_experts)   # (E,)
    return out.astype(w.dtype), ids


def importance_backward(dimp, ids):
    """dw[n, k] = dimp[ids[n, k]]."""
    return dimp[ids]                                                  # (N, K)


def update_selection_bias(bias, ids, gamma: float, centred: bool = False):
    """DeepSeek-V3's auxiliary-loss-free balancing, one step:

        b_i <- b_i + gamma * sign(mean_j counts_j - counts_i)

    counts_i = assignments to expert i in this batch (ids: (N, K)).
    Overloaded experts get a lower selection bias, idle ones a higher; the
    bias is used for choosing experts only (routers.sigmoid_topk_forward),
    never for their weights, so the task gradient is untouched. centred
    subtracts the mean of the sign terms, so the biases keep summing to the
    same value and cannot drift together. Returns a new array.
    """
    validate.positive("update_selection_bias", "gamma", gamma)
    counts = expert_counts(ids, len(bias))                            # (E,)
    sign = np.sign(counts.mean() - counts)                            # (E,)
    if centred:
        sign = sign - sign.mean()
    return bias + (gamma * sign).astype(bias.dtype)                   # (E,) in the bias's dtype


def seq_balance_loss_forward(scores, ids, seq_len: int):
    """DeepSeek-V3's sequence-wise balance loss, averaged over the B sequences of the batch:

        L = mean_b sum_i f_bi P_bi,   f_bi = E / (K T) * #{t in b : i in ids_t},
        P_bi = mean_{t in b} s_ti / sum_j s_tj

    scores: (N, E) the unbiased sigmoid scores; ids: (N, K); N = B T with
    T = seq_len. 1 at perfect balance within every sequence, E / K when
    every token of a sequence picks the same K experts with all the score.
    f is a count (no gradient). cache (f, scores, total, normalized, T).
    """
    validate.ndim("seq_balance_loss_forward", "scores", scores, 2)
    n, e = scores.shape
    if seq_len < 1 or n % seq_len:
        raise ValueError(f"seq_balance_loss_forward: N={n} tokens do not split into sequences "
                         f"of seq_len={seq_len}")
    b, k = n // seq_len, ids.shape[1]
    seq_of = np.repeat(np.arange(b), seq_len * k)                      # (N*K,) sequence of each choice
    counts = np.bincount(seq_of * e + ids.ravel(), minlength=b * e).reshape(b, e)   # (B, E)
    f = (counts * (e / (k * seq_len))).astype(scores.dtype)            # (B, E)
    total = scores.sum(axis=1, keepdims=True)                          # (N, 1)
    normalized = scores / total                                        # (N, E)
    p = normalized.reshape(b, seq_len, e).mean(axis=1)                 # (B, E)
    return np.mean(np.sum(f * p, axis=1)), (f, normalized, total, seq_len)


def seq_balance_loss_backward(dloss, cache):
    """dP_bi = dloss f_bi / B; dnormalized_ti = dP_b(t)i / T;
    dscores = (dnormalized - <dnormalized, normalized>) / total.   -> (N, E)."""
    f, normalized, total, seq_len = cache
    dp = dloss * f / len(f)                                            # (B, E)
    dnorm = np.repeat(dp, seq_len, axis=0) / seq_len                   # (N, E)
    inner = np.sum(dnorm * normalized, axis=1, keepdims=True)          # (N, 1)
    return (dnorm - inner) / total                                     # (N, E)


# -- the layer's auxiliary loss, assembled from the config ------------------------

class AuxCache(NamedTuple):
    config: object           # the SparseConfig (coefficients)
    balance: tuple | None    # (softmax cache, balance cache)
    z: tuple | None          # z-loss cache
    cv: tuple | None         # (importance cache, CV^2(importance) cache, CV^2(load) cache)
    seq: tuple | None        # (sigmoid scores, sequence-wise loss cache)
    mask: np.ndarray | None  # (N,) bool: the real tokens the losses saw, or None (all)


class AuxGrads(NamedTuple):
    """Gradients the auxiliary losses send into the router (None where a loss is off)."""
    dlogits: np.ndarray | None    # (N, E)
    dweights: np.ndarray | None   # (N, K)
    dload: np.ndarray | None      # (E,) onto the load estimate


def aux_forward(route, config, mask=None, seq_len: int | None = None):
    """aux = a_bal * balance(softmax(logits), ids) + a_z * z(logits)
           + a_cv * (CV^2(importance) + CV^2(load_estimate))
           + a_seq * seq_balance(sigmoid(logits), ids),        a float; cache AuxCache.

    route: a routers.RouterOut; config: a SparseConfig (which validated that
    each loss has the router it needs). mask (N,) bool: only real tokens count.
    seq_len: tokens per sequence of this batch, for the losses counted per
    sequence (seq_aux_coef, balance_scope "sequence"); None means
    config.seq_len. With balance_scope "sequence" the balance loss is the mean
    of the per-sequence losses ("batch" pools every token instead)."""
    if mask is not None:
        route = route._replace(ids=route.ids[mask], weights=route.weights[mask],
                               logits=route.logits[mask])
    seq_len = config.seq_len if seq_len is None else seq_len
    aux, bal, z, cv, seq = 0.0, None, None, None, None
    if config.balance_coef:
        probs, sm_cache = functional.softmax_forward(route.logits)    # (N, E) all E experts
        if config.balance_scope == "sequence":
            value, b_cache = seq_mean_balance_loss_forward(probs, route.ids, seq_len)
        else:
            value, b_cache = balance_loss_forward(probs, route.ids)
        aux, bal = aux + config.balance_coef * float(value), (sm_cache, b_cache)
    if config.z_coef:
        value, z = z_loss_forward(route.logits)
        aux += config.z_coef * float(value)
    if config.cv_coef:
        imp, i_cache = importance_forward(route.weights, route.ids, config.num_experts)   # (E,)
        cv_imp, ci_cache = cv_squared_forward(imp)
        cv_load, cl_cache = cv_squared_forward(route.load_estimate)
        aux, cv = aux + config.cv_coef * float(cv_imp + cv_load), (i_cache, ci_cache, cl_cache)
    if config.seq_aux_coef:
        scores = functional.sigmoid(route.logits)                      # (N, E) unbiased
        value, s_cache = seq_balance_loss_forward(scores, route.ids, seq_len)
        aux, seq = aux + config.seq_aux_coef * float(value), (scores, s_cache)
    return aux, AuxCache(config, bal, z, cv, seq, mask)


def aux_backward(daux: float, cache: AuxCache) -> AuxGrads:
    """Each loss's gradient times its coefficient and daux (the upstream scale)."""
    c = cache.config
    parts = []                                                         # gradients on the logits
    if cache.balance is not None:
        sm_cache, b_cache = cache.balance
        backward = seq_mean_balance_loss_backward if c.balance_scope == "sequence" else \
            balance_loss_backward
        dprobs = backward(daux * c.balance_coef, b_cache)                 # (N, E)
        parts.append(functional.softmax_backward(dprobs, sm_cache))
    if cache.z is not None:
        parts.append(z_loss_backward(daux * c.z_coef, cache.z))           # (N, E)
    if cache.seq is not None:
        scores, s_cache = cache.seq
        dscores = seq_balance_loss_backward(daux * c.seq_aux_coef, s_cache)   # (N, E)
        parts.append(dscores * scores * (1 - scores))                     # through the sigmoid
    dweights = dload = None
    if cache.cv is not None:
        i_cache, ci_cache, cl_cache = cache.cv
        dweights = importance_backward(cv_squared_backward(daux * c.cv_coef, ci_cache), i_cache)
        dload = cv_squared_backward(daux * c.cv_coef, cl_cache)           # (E,)
    dlogits = sum(parts[1:], parts[0]) if parts else None
    if dlogits is not None and cache.mask is not None:
        full = np.zeros((len(cache.mask), dlogits.shape[1]), dtype=dlogits.dtype)   # (N, E)
        full[cache.mask] = dlogits
        dlogits = full
    return AuxGrads(dlogits, dweights, dload)
