"""Attention's parts as forward/backward pairs: token embedding, RMSNorm, rotary
position embedding (RoPE) and causal self-attention with grouped-query heads.

    embedding   x[b, t] = W_emb[ids[b, t]]                         gather; backward scatter-adds
    rms_norm    y = x / sqrt(mean(x^2) + eps) * w                  over the last axis
    rope        (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)     x1, x2 the halves of a head
    attend      p = softmax(q k^T / sqrt(F) + causal mask),  o = p v
    attention   q = rope(x Wq + bq), k = rope(x Wk + bk), v = x Wv + bv,  y = merge(attend) Wo
    attention_decode   the same for new positions over a KV cache (generation; no backward)

Shape letters (README glossary): B sequences, T positions of this call, L key positions
(T, or T plus the positions already in a KV cache), A query heads, P key/value heads
(A/P query heads share one), F head width (D = A F), D model width, V vocabulary.

RoPE uses HF transformers' layout (rotate_half): dimension i of a head pairs with
dimension i + F/2, both turned by the angle t theta^(-2i/F). That is the layout of
Llama, Mixtral and Qwen2 checkpoints, so their q_proj / k_proj weights load unchanged;
the original paper (and GPT-J) pair neighbours (2i, 2i+1) instead.
Query head a reads key/value head a // (A/P), as HF's repeat_kv does; the keys and
values are never copied A/P times: the A/P query heads of a group are stacked into
one (A/P T, F) matrix and multiply their group's keys in one GEMM. Queries go in blocks
of QUERY_BLOCK positions, each block over only the keys it may see, so causal attention
computes a little over half of the (T, L) scores.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from moe_np import compiled, functional, validate


def check_ids(fn: str, ids, vocab_size: int, name: str = "ids") -> None:
    """ids: a 2-D integer array with every entry in [0, vocab_size)."""
    ids = np.asarray(ids)
    validate.ndim(fn, name, ids, 2)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{fn}: {name} must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids.min() if ids.min() < 0 else ids.max()
        raise ValueError(f"{fn}: {name} must lie in [0, vocab_size={vocab_size}), got {int(bad)}")


# -- token embedding ---------------------------------------------------------------------

class EmbeddingCache(NamedTuple):
    ids: np.ndarray       # (B, T) the token ids looked up
    num_rows: int         # V, rows of the table


def embedding_forward(ids, table):
    """x[b, t] = table[ids[b, t]].   ids (B, T) ints in [0, V), table (V, D) -> x (B, T, D)."""
    validate.ndim("embedding_forward", "table", table, 2)
    check_ids("embedding_forward", ids, table.shape[0])
    x = table[ids]                                                 # (B, T, D)
    return x, EmbeddingCache(np.asarray(ids), table.shape[0])


def embedding_backward(dx, cache: EmbeddingCache):
    """dtable[v] = sum of dx over the positions holding token v (a scatter-add).   -> (V, D)."""
    d = dx.shape[-1]
    dtable = np.zeros((cache.num_rows, d), dtype=dx.dtype)         # (V, D)
    ids, rows = cache.ids.reshape(-1), dx.reshape(-1, d)            # (B T,), (B T, D)
    kernels = _kernels(dx, contiguous=False)
    if kernels:                                                    # the same sums, in the same order
        return kernels.scatter_add(rows, ids, dtable)
    np.add.at(dtable, ids, rows)                                   # repeated ids add up
    return dtable


# -- RMSNorm ------------------------------------------------------------------------------

class RMSNormCache(NamedTuple):
    xhat: np.ndarray      # (..., D) x / rms(x)
    rinv: np.ndarray      # (..., 1) 1 / sqrt(mean(x^2) + eps)
    w: np.ndarray         # (D,) the learned scale


def rms_norm_forward(x, w, eps: float):
    """y = x / sqrt(mean(x^2, last axis) + eps) * w.   x (..., D), w (D,) -> y (..., D)."""
    validate.ndim("rms_norm_forward", "w", w, 1)
    if np.shape(x)[-1:] != w.shape:
        raise ValueError(f"rms_norm_forward: x has D={np.shape(x)[-1:]} but w has shape {w.shape}")
    validate.positive("rms_norm_forward", "eps", eps)
    eps = float(eps)                        # a Python float: x's dtype whatever eps came as
    kernels = _kernels(x, w)
    if kernels and x.ndim >= 2:
        y, xhat, rinv = kernels.rms_norm(x, w, eps)                # (..., D), (..., D), (..., 1)
        return y, RMSNormCache(xhat, rinv, w)
    return rms_norm_numpy(x, w, eps)


def rms_norm_numpy(x, w, eps: float):
    """rms_norm_forward in NumPy (the twin of attention_kernels.rms_norm): -> y, cache."""
    rinv = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)   # (..., 1)
    xhat = x * rinv                                                # (..., D)
    return xhat * w, RMSNormCache(xhat, rinv, w)


def _kernels(*arrays, contiguous: bool = True):
    """attention_kernels when they are loaded (compiled.load) and take these arrays as they
    are: non-empty, float32 or float64 of one dtype, C-contiguous if asked. Else None: the
    twin runs."""
    kernels = compiled.load("attention_kernels")
    if kernels is None or not all(isinstance(a, np.ndarray) and a.dtype == arrays[0].dtype
                                  and a.dtype in kernels.DTYPES and a.size for a in arrays):
        return None
    return kernels if all(a.flags.c_contiguous for a in arrays) or not contiguous else None


def rms_norm_backward(dy, cache: RMSNormCache):
    """g = dy w;  dx = (g - xhat mean(g xhat)) / rms;  dw = sum dy xhat.   -> dx (..., D), dw (D,)."""
    kernels = _kernels(dy, *cache)
    if kernels and dy.ndim >= 2 and dy.shape == cache.xhat.shape and dy.shape[-1] >= 2:
        return kernels.rms_norm_grad(dy, *cache)
    return rms_norm_grad_numpy(dy, cache)


def rms_norm_grad_numpy(dy, cache: RMSNormCache):
    """rms_norm_backward in NumPy (the twin of attention_kernels.rms_norm_grad)."""
    xhat, rinv, w = cache
    d = w.shape[0]
    t = dy * xhat                                                  # (..., D) work buffer
    dw = t.reshape(-1, d).sum(axis=0)                              # (D,)
    g = dy * w                                                     # (..., D), becomes dx
    mu = np.mean(np.multiply(g, xhat, out=t), axis=-1, keepdims=True)   # (..., 1)
    g -= np.multiply(xhat, mu, out=t)                              # g - xhat mean(g xhat)
    g *= rinv                                                      # dx, in place
    return g, dw


# -- rotary position embedding --------------------------------------------------------------

def rope_tables(num_positions: int, head_dim: int, theta: float, dtype, start: int = 0):
    """cos, sin of the angles (start + t) theta^(-2i/F), i < F/2.   -> two (T, F/2) arrays.

    The angles are formed in float64 and rounded once to dtype (HF forms them
    in float32 whatever the model's dtype, a 1e-7 relative difference)."""
    if not isinstance(head_dim, (int, np.integer)) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"rope_tables: RoPE turns pairs of dimensions, so head_dim must be even "
                         f"and >= 2, got head_dim={head_dim}")
    validate.positive("rope_tables", "theta", theta)
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)   # (F/2,)
    angles = np.arange(start, start + num_positions, dtype=np.float64)[:, None] * inv_freq   # (T, F/2)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def _check_rope(fn: str, x, cos, sin) -> None:
    validate.same_shape(fn, "cos", cos, "sin", sin)
    if np.ndim(x) < 2 or x.shape[-1] != 2 * cos.shape[-1] or x.shape[-2] != cos.shape[0]:
        raise ValueError(f"{fn}: x must end in (T, F) = ({cos.shape[0]}, {2 * cos.shape[-1]}) to match "
                         f"cos (T, F/2), got x {np.shape(x)}")


def rope_forward(x, cos, sin):
    """y = x cos + rotate_half(x) sin:  (x1, x2) -> (x1 c - x2 s, x2 c + x1 s).

    x (..., T, F), cos/sin (T, F/2) -> y (..., T, F).   cache (cos, sin)."""
    _check_rope("rope_forward", x, cos, sin)
    return _rotate(x, cos, sin, transpose=False), (cos, sin)


def rope_backward(dy, cache):
    """The transpose rotation: dx = dy cos + rotate_half^T(dy sin),
    (g1, g2) -> (g1 c + g2 s, g2 c - g1 s).   -> dx (..., T, F)."""
    cos, sin = cache
    return _rotate(dy, cos, sin, transpose=True)


def _rotate(x, cos, sin, transpose: bool):
    """RoPE's rotation of x (..., T, F) or its transpose: one compiled pass for a float32 /
    float64 (B, H, T, F), any strides, with tables of its dtype (attention_kernels.rope),
    else rope_numpy."""
    kernels = _kernels(x, cos, sin, contiguous=False)
    if kernels and x.ndim == 4:
        return kernels.rope(x, cos, sin, transpose)
    return rope_numpy(x, cos, sin, transpose)


def rope_numpy(x, cos, sin, transpose: bool = False):
    """The rotation in NumPy, the twin of attention_kernels.rope (any leading axes, any
    dtypes).   (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), transposed (x1 c + x2 s, x2 c - x1 s)."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half:]                          # (..., T, F/2) each
    y = np.empty_like(x)                                           # (..., T, F)
    if transpose:
        y[..., :half] = x1 * cos + x2 * sin
        y[..., half:] = x2 * cos - x1 * sin
    else:
        y[..., :half] = x1 * cos - x2 * sin
        y[..., half:] = x2 * cos + x1 * sin
    return y


# -- causal grouped-query attention -----------------------------------------------------------

def causal_mask(num_queries: int, num_keys: int) -> np.ndarray:
    """(T, L) bool: query t (absolute position L - T + t) sees key s when s <= L - T + t."""
    if num_keys < num_queries:
        raise ValueError(f"causal_mask: num_keys={num_keys} < num_queries={num_queries}")
    offset = num_keys - num_queries
    return np.arange(num_keys)[None, :] <= offset + np.arange(num_queries)[:, None]   # (T, L)


QUERY_BLOCK = 32     # query positions per block: a block skips the keys no query in it may see


class AttendBlock(NamedTuple):
    """One block j of query positions [lo, hi): it attends over keys [0, end)."""
    lo: int
    hi: int
    end: int              # L_j = L - T + hi: the keys block j's last query sees
    p: np.ndarray         # (B, P, A/P T_j, L_j) probabilities (0 where masked), T_j = hi - lo
    softmax: tuple        # the softmax's own cache (p, its axis, temperature sqrt(F))


class AttendCache(NamedTuple):
    q: np.ndarray         # (B, P, A/P, T, F) queries, grouped by the key/value head they read
    k: np.ndarray         # (B, P, L, F)
    v: np.ndarray         # (B, P, L, F)
    blocks: list          # AttendBlock per block of query positions


def query_blocks(num_queries: int, num_keys: int, block: int) -> list[tuple[int, int, int]]:
    """[(lo, hi, end)]: query positions [lo, hi) see keys [0, end), end = L - T + hi."""
    offset = num_keys - num_queries
    return [(lo, min(lo + block, num_queries), offset + min(lo + block, num_queries))
            for lo in range(0, num_queries, block)]


def attend_forward(q, k, v, block: int = QUERY_BLOCK):
    """o = softmax(q k^T / sqrt(F) + mask) v, causal; query head a reads kv head a // (A/P).

    q (B, A, T, F), k, v (B, P, L, F), L >= T (the last T keys are the queries' own
    positions) -> o (B, A, T, F). Masked scores are -inf, so their probability is 0; the
    1/sqrt(F) is the softmax's temperature sqrt(F), applied in the same pass. Queries go
    in blocks of `block` positions, each over only the keys it may see: causal attention
    then computes about half of the (T, L) scores, and every result is the same."""
    b, a, t, f = q.shape
    g, length = k.shape[1], k.shape[2]
    if a % g or k.shape != (b, g, length, f) or v.shape != k.shape or length < t:
        raise ValueError(f"attend_forward: q {q.shape} needs k and v (B, P, L, F) with P dividing "
                         f"A={a} and L >= T={t}, got k {k.shape}, v {v.shape}")
    r, temperature = a // g, float(f) ** 0.5                       # a Python float: keeps the dtype
    q5 = q.reshape(b, g, r, t, f)                                  # (B, P, A/P, T, F)
    o5 = np.empty_like(q5)                                         # (B, P, A/P, T, F)
    blocks = []
    for lo, hi, end in query_blocks(t, length, block):
        qb = q5[:, :, :, lo:hi].reshape(b, g, r * (hi - lo), f)    # (B, P, A/P T_j, F)
        s = qb @ np.swapaxes(k[:, :, :end], -1, -2)                # (B, P, A/P T_j, L_j)
        p = _causal_softmax(s, temperature, hi - lo)               # as s
        o5[:, :, :, lo:hi] = (p @ v[:, :, :end]).reshape(b, g, r, hi - lo, f)
        blocks.append(AttendBlock(lo, hi, end, p, functional.SoftmaxCache(p, -1, temperature)))
    return o5.reshape(b, a, t, f), AttendCache(q5, k, v, blocks)


def _causal_softmax(s, temperature: float, queries: int):
    """The masked softmax of a block's scores s (..., A/P T_j, L_j), whose rows cycle through
    its T_j = queries positions: compiled for float32 / float64 (attention_kernels, written
    over s), else causal_softmax_numpy."""
    kernels = _kernels(s)
    if kernels:
        return kernels.causal_softmax(s, temperature, queries)
    return causal_softmax_numpy(s, temperature, queries)


def causal_softmax_numpy(s, temperature: float, queries: int):
    """The twin of attention_kernels.causal_softmax: -inf written where causal_mask hides a
    key (in s), then functional.softmax_forward (a new array).   s (..., L) -> p."""
    keys = s.shape[-1]
    s = np.ascontiguousarray(s)                                    # so that the reshape is a view
    np.copyto(s.reshape(-1, queries, keys), -np.inf, where=~causal_mask(queries, keys))
    return functional.softmax_forward(s, temperature=temperature)[0]


def _softmax_grad(dp, cache):
    """functional.softmax_backward, compiled and written over dp for float32 / float64 (the
    twin otherwise)."""
    kernels = _kernels(dp, cache.p)
    if kernels and cache.axis in (-1, dp.ndim - 1) and dp.shape == cache.p.shape \
            and not np.may_share_memory(dp, cache.p):
        return kernels.softmax_grad(dp, cache.p, cache.temperature)
    return functional.softmax_backward(dp, cache)


def attend_backward(do, cache: AttendCache):
    """-> dq (B, A, T, F), dk (B, P, L, F), dv (B, P, L, F); a group's heads' dk, dv add up,
    and so do the blocks' (each block adds into the keys it saw)."""
    q5, k, v, blocks = cache
    b, g, r, t, f = q5.shape
    do5 = do.reshape(q5.shape)                                     # (B, P, A/P, T, F)
    dq5 = np.empty_like(q5)                                        # (B, P, A/P, T, F)
    dk, dv = np.zeros_like(k), np.zeros_like(v)                    # (B, P, L, F) each, summed into
    for lo, hi, end, p, softmax_cache in blocks:
        dob = do5[:, :, :, lo:hi].reshape(b, g, r * (hi - lo), f)  # (B, P, A/P T_j, F)
        qb = q5[:, :, :, lo:hi].reshape(dob.shape)                 # (B, P, A/P T_j, F)
        dv[:, :, :end] += np.swapaxes(p, -1, -2) @ dob             # (B, P, L_j, F)
        dp = dob @ np.swapaxes(v[:, :, :end], -1, -2)              # (B, P, A/P T_j, L_j)
        ds = _softmax_grad(dp, softmax_cache)                      # as dp, includes the 1/sqrt(F)
        dq5[:, :, :, lo:hi] = (ds @ k[:, :, :end]).reshape(b, g, r, hi - lo, f)
        dk[:, :, :end] += np.swapaxes(ds, -1, -2) @ qb             # (B, P, L_j, F)
    return dq5.reshape(do.shape), dk, dv


# -- the attention sublayer: projections, RoPE, attend, output ---------------------------------

class AttentionCache(NamedTuple):
    x: np.ndarray         # (B, T, D) the input
    ctx: np.ndarray       # (B T, A F) the heads' outputs side by side (Wo's input)
    attend: AttendCache
    rope: tuple           # (cos, sin), each (T, F/2)
    num_heads: int        # A
    has_bias: bool        # q, k, v projections with biases (Qwen2)


def _project(x, params: dict, num_heads: int, num_kv_heads: int):
    """q (B, A, T, F), k, v (B, P, T, F) = x Wq + bq, x Wk + bk, x Wv + bv, split into heads."""
    b, t, d = x.shape
    x2 = x.reshape(b * t, d)                                       # (B T, D): one 2-D GEMM each
    out = []
    for name, heads in (("q", num_heads), ("k", num_kv_heads), ("v", num_kv_heads)):
        z = x2 @ params["w" + name]                                # (B T, heads F)
        if "b" + name in params:
            z += params["b" + name]
        out.append(z.reshape(b, t, heads, -1).transpose(0, 2, 1, 3))   # (B, heads, T, F)
    return out


def check_heads(fn: str, params: dict, d_model: int, num_heads: int, num_kv_heads: int) -> int:
    """The head width F, after checking the heads and every projection's shape."""
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{fn}: {name} must be an integer >= 1, got {value!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{fn}: num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    f = params["wq"].shape[1] // num_heads
    want = {"wq": (d_model, num_heads * f), "wk": (d_model, num_kv_heads * f),
            "wv": (d_model, num_kv_heads * f), "wo": (num_heads * f, d_model),
            "bq": (num_heads * f,), "bk": (num_kv_heads * f,), "bv": (num_kv_heads * f,)}
    for name, shape in want.items():
        if name in params or name[0] == "w":
            validate.shape(fn, name, params.get(name), shape)
    return f


def attention_forward(x, params: dict, num_heads: int, num_kv_heads: int, cos, sin):
    """y = attend(rope(q), rope(k), v) Wo, causal.   x (B, T, D), cos/sin (T, F/2) -> y (B, T, D).

    params: wq (D, A F), wk, wv (D, P F), wo (A F, D), and with a qkv bias bq (A F,),
    bk, bv (P F,). Without a KV cache the keys are the queries' own positions (L = T)."""
    validate.ndim("attention_forward", "x", x, 3)
    b, t, d = x.shape
    check_heads("attention_forward", params, d, num_heads, num_kv_heads)
    q, k, v = _project(x, params, num_heads, num_kv_heads)          # (B, A, T, F), (B, P, T, F) x2
    q, rope_cache = rope_forward(q, cos, sin)                      # (B, A, T, F)
    k, _ = rope_forward(k, cos, sin)                               # (B, P, T, F)
    o, attend_cache = attend_forward(q, k, v)                      # (B, A, T, F)
    ctx = o.transpose(0, 2, 1, 3).reshape(b * t, -1)               # (B T, A F)
    y = (ctx @ params["wo"]).reshape(b, t, d)                      # (B, T, D)
    return y, AttentionCache(x, ctx, attend_cache, rope_cache, num_heads, "bq" in params)


def attention_backward(dy, cache: AttentionCache, params: dict):
    """-> dx (B, T, D), grads {wq, wk, wv, wo[, bq, bk, bv]}."""
    x, ctx, attend_cache, rope_cache, a, has_bias = cache
    b, t, d = x.shape
    dy2 = dy.reshape(b * t, d)                                     # (B T, D)
    grads = {"wo": ctx.T @ dy2}                                    # (A F, D)
    dctx = dy2 @ params["wo"].T                                    # (B T, A F)
    do = dctx.reshape(b, t, a, -1).transpose(0, 2, 1, 3)           # (B, A, T, F)
    dq, dk, dv = attend_backward(do, attend_cache)                 # (B, A, T, F), (B, P, T, F) x2
    dq, dk = rope_backward(dq, rope_cache), rope_backward(dk, rope_cache)
    x2 = x.reshape(b * t, d)                                       # (B T, D)
    dx = np.zeros_like(x2)                                         # (B T, D)
    for name, dz in (("q", dq), ("k", dk), ("v", dv)):
        dz2 = dz.transpose(0, 2, 1, 3).reshape(b * t, -1)          # (B T, heads F)
        grads["w" + name] = x2.T @ dz2                             # (D, heads F)
        if has_bias:
            grads["b" + name] = dz2.sum(axis=0)                    # (heads F,)
        dx += dz2 @ params["w" + name].T                           # (B T, D)
    return dx.reshape(b, t, d), grads


def attention_decode(x, params: dict, num_heads: int, num_kv_heads: int, cos, sin,
                     keys, values, start: int):
    """Attention of T new positions start..start+T-1 over everything cached before them.

    x (B, T, D); cos/sin (T, F/2) for those positions; keys, values (B, P, L_max, F)
    preallocated buffers holding positions [0, start). The new keys and values are
    written into the buffers at [start, start + T) in place, and the queries attend
    over [0, start + T): O(start + T) work per new position, not O((start + T)^2).
    -> y (B, T, D), the same numbers a full forward gives at those positions."""
    b, t, d = x.shape
    check_heads("attention_decode", params, d, num_heads, num_kv_heads)
    if start + t > keys.shape[2]:
        raise ValueError(f"attention_decode: positions up to {start + t} exceed the cache's "
                         f"{keys.shape[2]}")
    q, k, v = _project(x, params, num_heads, num_kv_heads)          # (B, A, T, F), (B, P, T, F) x2
    keys[:, :, start:start + t] = rope_forward(k, cos, sin)[0]     # (B, P, T, F)
    values[:, :, start:start + t] = v
    o, _ = attend_forward(rope_forward(q, cos, sin)[0], keys[:, :, :start + t],
                          values[:, :, :start + t])                # (B, A, T, F)
    return o.transpose(0, 2, 1, 3).reshape(b, t, -1) @ params["wo"]   # (B, T, D)
