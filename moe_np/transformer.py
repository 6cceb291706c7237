"""The decoder-only MoE language model: pre-norm blocks of causal attention and an FFN.

    x_0 = W_emb[ids]                                              (B, T, D)
    block i:  h = x + attention(rms_norm(x))                      (B, T, D)
              x' = h + ffn(rms_norm(h))      ffn: SparseMoE or a dense SwiGLU, on (B T, D) rows
    logits = rms_norm(x_L) W_head           W_head = W_emb^T when tied     (B, T, V)
    loss = mean over real positions of -log softmax(logits)[target]   (IGNORE_ID positions skipped)

    model = MoETransformer(LMConfig(...), seed=0, dtype=np.float32)
    logits = model.forward(ids)              ids (B, T) ints -> (B, T, V); model.aux, routing_stats()
    model.backward(dlogits, aux_scale=1.0)   fills model.grads (the MoE blocks' aux gradient
                                             enters times aux_scale); returns None (ids have none)
    logits, kv = model.prefill(ids)          the prompt, with a KV cache     (B, T, V)
    logits, kv = model.decode_step(ids, kv)  the next positions over the cache (B, T', V)

Shape letters (README glossary): B sequences, T positions, L key positions, A query
heads, P key/value heads, F head width, D model width, V vocabulary, N = B T tokens.

Every part is a Layer (layer.py): `params`/`grads` are flat dicts over the children
("block0.attn.wq", "block1.ffn.w_router", ...), the very arrays of the parts, so an
optimizer over model.params trains them; state_dict() covers parameters, buffers and
random streams. The dtype is the parameters'; float32 stays float32 everywhere.
Padding goes at the end of a sequence (right padding): a causal query never sees the
positions after it, so padding needs no attention mask; pass mask (B, T) (False at
padding) and the MoE blocks route no padding token, and IGNORE_ID targets add no loss.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from moe_np import layers, validate
from moe_np.attention import (attention_backward, attention_decode, attention_forward, check_ids,
                              embedding_backward, embedding_forward, rms_norm_backward,
                              rms_norm_forward, rope_tables)
from moe_np.config import LMConfig
from moe_np.experts import expert_kind
from moe_np.functional import log_softmax_forward
from moe_np.layer import Layer
from moe_np.sparse import SparseMoE, sparse_moe_forward

IGNORE_ID = -100        # a target that adds no loss (HF's ignore_index)


# -- pure pairs: the head and the loss --------------------------------------------------------

def lm_head_forward(h, w):
    """logits = h W.   h (B, T, D), w (D, V) (a tied head passes W_emb.T) -> (B, T, V)."""
    d, v = w.shape
    logits = (h.reshape(-1, d) @ w).reshape(h.shape[:-1] + (v,))   # (B, T, V)
    return logits, (h, w)


def lm_head_backward(dlogits, cache):
    """-> dh (B, T, D), dw (D, V)."""
    h, w = cache
    d, v = w.shape
    h2, dl2 = h.reshape(-1, d), dlogits.reshape(-1, v)             # (N, D), (N, V)
    return (dl2 @ w.T).reshape(h.shape), h2.T @ dl2                # (B, T, D), (D, V)


class LMLossCache(NamedTuple):
    p: np.ndarray          # (N, V) softmax of the logits
    targets: np.ndarray    # (N,) target ids (0 at ignored positions)
    valid: np.ndarray      # (N,) bool, positions that count
    shape: tuple           # (B, T, V) of the logits


def lm_loss_forward(logits, targets, ignore_id: int = IGNORE_ID):
    """loss = mean over positions with targets != ignore_id of -log softmax(logits)[target].

    logits (B, T, V), targets (B, T) ints in [0, V) or ignore_id -> a scalar of the logits'
    dtype (0 when no position counts)."""
    validate.ndim("lm_loss_forward", "logits", logits, 3)
    targets = np.asarray(targets)
    validate.shape("lm_loss_forward", "targets", targets, logits.shape[:2])
    v = logits.shape[-1]
    valid = (targets != ignore_id).reshape(-1)                     # (N,)
    check_ids("lm_loss_forward", np.where(targets == ignore_id, 0, targets), v, "targets")
    logp, (p, _) = log_softmax_forward(logits.reshape(-1, v))      # (N, V)
    tgt = np.where(valid, targets.reshape(-1), 0)                  # (N,)
    picked = logp[np.arange(len(tgt)), tgt]                        # (N,)
    loss = -picked[valid].sum() / max(int(valid.sum()), 1)
    return logits.dtype.type(loss), LMLossCache(p, tgt, valid, logits.shape)


def lm_loss_backward(dloss, cache: LMLossCache):
    """dlogits = dloss (softmax - onehot(target)) / count at real positions, 0 elsewhere."""
    p, tgt, valid, shape = cache
    dlogits = p.copy()                                             # (N, V)
    dlogits[np.arange(len(tgt)), tgt] -= 1
    dlogits *= (np.asarray(dloss, dtype=p.dtype) / max(int(valid.sum()), 1)) * valid[:, None]
    return dlogits.reshape(shape)                                  # (B, T, V)


# -- the parts as layers ------------------------------------------------------------------------

def _normal(rng, shape, std, dtype):
    return (rng.standard_normal(shape) * std).astype(dtype)


class Embedding(Layer):
    """x = W_emb[ids].   ids (B, T) -> x (B, T, D);  weight (V, D) ~ Normal(0, 0.02^2)."""

    def __init__(self, vocab_size: int, d_model: int, *, seed: int = 0, dtype=np.float64):
        super().__init__(dtype)
        self.params = {"weight": _normal(np.random.default_rng(seed), (vocab_size, d_model), 0.02,
                                         self.dtype)}             # (V, D)
        self.init_grads()

    def forward(self, ids):
        x, self._cache = embedding_forward(ids, self.params["weight"])
        return x                                                   # (B, T, D)

    def backward(self, dx, aux_scale: float = 1.0):
        """Fills grads["weight"] (V, D); returns None (token ids have no gradient)."""
        self.check_backward(dx, aux_scale)
        self.set_grads({"weight": embedding_backward(dx, self._cache)})


class RMSNorm(Layer):
    """y = x / sqrt(mean(x^2) + eps) * weight.   x (..., D) -> y (..., D); weight (D,) = 1."""

    def __init__(self, d_model: int, eps: float, *, dtype=np.float64):
        super().__init__(dtype)
        validate.positive("RMSNorm", "eps", eps)
        self.eps = eps
        self.params = {"weight": np.ones(d_model, dtype=self.dtype)}   # (D,)
        self.init_grads()

    def forward(self, x):
        y, self._cache = rms_norm_forward(x, self.params["weight"], self.eps)
        return y

    def backward(self, dy, aux_scale: float = 1.0):
        self.check_backward(dy, aux_scale)
        dx, dw = rms_norm_backward(dy, self._cache)
        self.set_grads({"weight": dw})
        return dx


class Attention(Layer):
    """Causal grouped-query self-attention with RoPE.   x (B, T, D) -> y (B, T, D).

    wq (D, A F), wk, wv (D, P F) ~ Normal(0, 1/D); wo (A F, D) ~ Normal(0, 1/(2 layers A F));
    with qkv_bias, bq (A F,), bk, bv (P F,) = 0. rope: (cos, sin) tables (context, F/2)."""

    def __init__(self, config: LMConfig, rope, *, seed: int = 0, dtype=np.float64):
        super().__init__(dtype)
        c, rng = config, np.random.default_rng(seed)
        d, f = c.d_model, c.head_dim
        self.heads, self.rope = (c.num_heads, c.num_kv_heads), rope
        self.params = {"wq": _normal(rng, (d, c.num_heads * f), d ** -0.5, self.dtype),       # (D, A F)
                       "wk": _normal(rng, (d, c.num_kv_heads * f), d ** -0.5, self.dtype),    # (D, P F)
                       "wv": _normal(rng, (d, c.num_kv_heads * f), d ** -0.5, self.dtype),    # (D, P F)
                       "wo": _normal(rng, (c.num_heads * f, d), (2 * c.num_layers * d) ** -0.5,
                                     self.dtype)}                                             # (A F, D)
        if c.qkv_bias:
            self.params |= {"b" + n: np.zeros(self.params["w" + n].shape[1], dtype=self.dtype)
                            for n in "qkv"}                        # (A F,), (P F,), (P F,)
        self.init_grads()

    def forward(self, x):
        t = x.shape[1]
        cos, sin = (table[:t] for table in self.rope)              # (T, F/2) each
        y, self._cache = attention_forward(x, self.params, *self.heads, cos, sin)
        return y                                                   # (B, T, D)

    def backward(self, dy, aux_scale: float = 1.0):
        self.check_backward(dy, aux_scale)
        dx, grads = attention_backward(dy, self._cache, self.params)
        self.set_grads(grads)
        return dx                                                  # (B, T, D)

    def decode(self, x, keys, values, start: int):
        """attention_decode at positions start.. (no state of the layer changes)."""
        cos, sin = (table[start:start + x.shape[1]] for table in self.rope)   # (T, F/2) each
        return attention_decode(x, self.params, *self.heads, cos, sin, keys, values, start)


class SwiGLU(Layer):
    """The dense FFN: y = (silu(x Wg) * (x Wu)) Wd.   x (N, D) -> y (N, D), hidden width H.

    w_gate, w_up (D, H) ~ Normal(0, 1/D), w_down (H, D) ~ Normal(0, 1/(2 layers H))."""

    def __init__(self, d_model: int, d_hidden: int, num_layers: int = 1, *, seed: int = 0,
                 dtype=np.float64):
        super().__init__(dtype)
        rng, d, h = np.random.default_rng(seed), d_model, d_hidden
        self.params = {"w_gate": _normal(rng, (d, h), d ** -0.5, self.dtype),                 # (D, H)
                       "w_up": _normal(rng, (d, h), d ** -0.5, self.dtype),                   # (D, H)
                       "w_down": _normal(rng, (h, d), (2 * num_layers * h) ** -0.5, self.dtype)}   # (H, D)
        self.init_grads()

    def forward(self, x, mask=None):
        """mask is accepted for the block's one FFN signature (a dense FFN routes nothing)."""
        y, self._cache = swiglu_ffn_forward(x, self.params)
        return y                                                   # (N, D)

    def backward(self, dy, aux_scale: float = 1.0):
        self.check_backward(dy, aux_scale)
        dx, grads = swiglu_ffn_backward(dy, self._cache)
        self.set_grads(grads)
        return dx                                                  # (N, D)


def swiglu_ffn_forward(x, params: dict):
    """y = (silu(x Wg) * (x Wu)) Wd.   x (N, D) -> y (N, D).   cache (x, u, glu cache, params)."""
    a, b = x @ params["w_gate"], x @ params["w_up"]                # (N, H) each
    u, glu_cache = layers.swiglu_forward(a, b)                     # (N, H)
    return u @ params["w_down"], (x, u, glu_cache, params)


def swiglu_ffn_backward(dy, cache):
    """-> dx (N, D), grads {w_gate (D, H), w_up (D, H), w_down (H, D)}."""
    x, u, glu_cache, p = cache
    da, db = layers.swiglu_backward(dy @ p["w_down"].T, glu_cache)   # (N, H) each
    grads = {"w_gate": x.T @ da, "w_up": x.T @ db, "w_down": u.T @ dy}
    return da @ p["w_gate"].T + db @ p["w_up"].T, grads           # (N, D)


def _flat(children: dict, what: str) -> dict:
    """The children's params (or grads) as one dict "<child>.<name>" (the same arrays)."""
    return {f"{n}.{k}": v for n, m in children.items() for k, v in getattr(m, what).items()}


class DecoderBlock(Layer):
    """x -> h = x + attn(attn_norm(x)) -> h + ffn(ffn_norm(h)).   x (B, T, D) -> (B, T, D).

    Children "attn_norm", "attn", "ffn_norm", "ffn" (a SparseMoE or a SwiGLU)."""

    def __init__(self, config: LMConfig, layer: int, rope, *, seed: int = 0, dtype=np.float64):
        super().__init__(dtype)
        c = config
        seeds = [int(s) for s in np.random.default_rng(seed).integers(0, 2**31 - 2, 2)]
        self.attn_norm = RMSNorm(c.d_model, c.rms_eps, dtype=dtype)
        self.attn = Attention(c, rope, seed=seeds[0], dtype=dtype)
        self.ffn_norm = RMSNorm(c.d_model, c.rms_eps, dtype=dtype)
        self.ffn = (SparseMoE(c.moe, seed=seeds[1], dtype=dtype) if c.is_moe(layer)
                    else SwiGLU(c.d_model, c.d_ffn, c.num_layers, seed=seeds[1], dtype=dtype))
        self.params = _flat(self.children(), "params")
        self.grads = _flat(self.children(), "grads")

    def children(self) -> dict:
        return {"attn_norm": self.attn_norm, "attn": self.attn, "ffn_norm": self.ffn_norm,
                "ffn": self.ffn}

    def forward(self, x, mask=None):
        """x (B, T, D), mask (B, T) bool or None -> (B, T, D)."""
        b, t, d = x.shape
        h = x + self.attn.forward(self.attn_norm.forward(x))      # (B, T, D)
        rows = self.ffn_norm.forward(h).reshape(b * t, d)          # (N, D)
        y = self.ffn.forward(rows, mask=None if mask is None else mask.reshape(-1))   # (N, D)
        self._cache = x.shape
        return h + y.reshape(b, t, d)                              # (B, T, D)

    def backward(self, dy, aux_scale: float = 1.0):
        aux_scale = self.check_backward(dy, aux_scale)
        b, t, d = self._cache
        drows = self.ffn.backward(dy.reshape(b * t, d), aux_scale=float(aux_scale))   # (N, D)
        dh = dy + self.ffn_norm.backward(drows.reshape(b, t, d))   # (B, T, D)
        dx = dh + self.attn_norm.backward(self.attn.backward(dh))  # (B, T, D)
        self.grads = _flat(self.children(), "grads")
        return dx

    def decode(self, x, keys, values, start: int):
        """The block at positions start.. over a KV cache, in evaluation semantics (no noise,
        no state change).   x (B, T, D) -> (B, T, D)."""
        b, t, d = x.shape
        p = self.attn_norm.params["weight"], self.ffn_norm.params["weight"]
        eps = self.attn_norm.eps
        h = x + self.attn.decode(rms_norm_forward(x, p[0], eps)[0], keys, values, start)
        rows = rms_norm_forward(h, p[1], eps)[0].reshape(b * t, d)  # (N, D)
        if isinstance(self.ffn, SparseMoE):
            (y, _), _ = sparse_moe_forward(rows, self.ffn.params, self.ffn.config,
                                           bias=self.ffn.buffers.get("selection_bias"), rng=0)
        else:
            y, _ = swiglu_ffn_forward(rows, self.ffn.params)       # (N, D)
        return h + y.reshape(b, t, d)                              # (B, T, D)


class KVCache(NamedTuple):
    """Keys and values of every block for the positions decoded so far."""
    keys: list             # per block: (B, P, context, F), positions [0, length) filled
    values: list           # per block: (B, P, context, F)
    length: int            # positions filled


class MoETransformer(Layer):
    """The language model (see the module docstring).   ids (B, T) -> logits (B, T, V).

    Children: "embed", "block0".."block{L-1}", "norm", and "head" (weight (D, V) ~
    Normal(0, 1/D)) unless the head is tied to the embedding."""

    def __init__(self, config: LMConfig, *, seed: int = 0, dtype=np.float64):
        super().__init__(dtype)
        if not isinstance(config, LMConfig):
            raise ValueError(f"MoETransformer: config must be an LMConfig, got {type(config).__name__}")
        validate.integer("MoETransformer", "seed", seed, minimum=0)
        c = self.config = config
        seeds = [int(s) for s in np.random.default_rng(seed).integers(0, 2**31 - 2, c.num_layers + 2)]
        self.rope = rope_tables(c.context_length, c.head_dim, c.rope_theta, self.dtype)   # (ctx, F/2) x2
        self.embed = Embedding(c.vocab_size, c.d_model, seed=seeds[0], dtype=dtype)
        self.blocks = [DecoderBlock(c, i, self.rope, seed=s, dtype=dtype)
                       for i, s in enumerate(seeds[2:])]
        self.norm = RMSNorm(c.d_model, c.rms_eps, dtype=dtype)
        self.head = None if c.tie_embeddings else LMHead(c.d_model, c.vocab_size, seed=seeds[1],
                                                         dtype=dtype)
        self.params = _flat(self.children(), "params")
        self.grads = _flat(self.children(), "grads")

    def children(self) -> dict:
        kids = {"embed": self.embed} | {f"block{i}": b for i, b in enumerate(self.blocks)}
        return kids | {"norm": self.norm} | ({} if self.head is None else {"head": self.head})

    def head_weight(self):
        """W_head (D, V): the head's own, or the embedding table transposed (a view) when tied."""
        return self.embed.params["weight"].T if self.head is None else self.head.params["weight"]

    def check_input(self, fn: str, ids, start: int = 0) -> None:
        """ids (B, T): integers in [0, V), 1 <= T, start + T <= context_length."""
        check_ids(fn, ids, self.config.vocab_size)
        t = np.shape(ids)[1]
        if t < 1:
            raise ValueError(f"{fn}: ids has no positions (shape {np.shape(ids)})")
        if start + t > self.config.context_length:
            raise ValueError(f"{fn}: sequence length {start + t} exceeds context_length="
                             f"{self.config.context_length}")

    def forward(self, ids, mask=None):
        """ids (B, T) -> logits (B, T, V); mask (B, T) bool, False at (right) padding."""
        self.check_input("MoETransformer.forward", ids)
        if mask is not None:
            mask = np.asarray(mask)
            validate.shape("MoETransformer.forward", "mask", mask, np.shape(ids))
        x = self.embed.forward(ids)                                # (B, T, D)
        for block in self.blocks:
            x = block.forward(x, mask)                             # (B, T, D)
        logits, self._cache = lm_head_forward(self.norm.forward(x), self.head_weight())
        return logits                                              # (B, T, V)

    def backward(self, dlogits, aux_scale: float = 1.0):
        """Fills grads (a tied table gets the head's and the embedding's gradients summed)."""
        aux_scale = self.check_backward(dlogits, aux_scale)
        aux_scale = float(aux_scale)        # a NumPy float64 scale would upcast float32 gradients
        dh, dw = lm_head_backward(dlogits, self._cache)            # (B, T, D), (D, V)
        dx = self.norm.backward(dh)                                # (B, T, D)
        for block in reversed(self.blocks):
            dx = block.backward(dx, aux_scale=aux_scale)           # (B, T, D)
        self.embed.backward(dx)
        if self.head is None:
            self.embed.grads["weight"] += dw.T                     # (V, D)
        else:
            self.head.set_grads({"weight": dw})
        self.grads = _flat(self.children(), "grads")

    def new_cache(self, batch: int) -> KVCache:
        """An empty KV cache: zeros (B, P, context, F) per block, length 0."""
        c = self.config
        shape = (batch, c.num_kv_heads, c.context_length, c.head_dim)
        return KVCache([np.zeros(shape, dtype=self.dtype) for _ in self.blocks],
                       [np.zeros(shape, dtype=self.dtype) for _ in self.blocks], 0)

    def prefill(self, ids):
        """The prompt's logits and a KV cache holding it.   ids (B, T) -> (B, T, V), KVCache."""
        self.check_input("MoETransformer.prefill", ids)
        return self.decode_step(ids, self.new_cache(np.shape(ids)[0]))

    def decode_step(self, ids, cache: KVCache):
        """Logits of the next positions given the cached ones.   ids (B, T') -> (B, T', V), KVCache.

        The cache's buffers are written in place; the returned KVCache has length + T'.
        Evaluation semantics (no router noise, jitter or state change) whatever the mode."""
        self.check_input("MoETransformer.decode_step", ids, cache.length)
        if np.shape(ids)[0] != cache.keys[0].shape[0]:
            raise ValueError(f"MoETransformer.decode_step: ids has batch {np.shape(ids)[0]} but the "
                             f"cache holds {cache.keys[0].shape[0]} sequences")
        x = embedding_forward(ids, self.embed.params["weight"])[0]  # (B, T', D)
        for block, keys, values in zip(self.blocks, cache.keys, cache.values):
            x = block.decode(x, keys, values, cache.length)        # (B, T', D)
        h = rms_norm_forward(x, self.norm.params["weight"], self.norm.eps)[0]   # (B, T', D)
        logits = h @ self.head_weight()                            # (B, T', V)
        return logits, cache._replace(length=cache.length + np.shape(ids)[1])

    def active_params(self) -> int:
        """Parameters one token uses: routed experts count K/E of their size."""
        total = self.num_params()
        for block in self.blocks:
            if isinstance(block.ffn, SparseMoE):
                c = block.ffn.config
                routed = sum(block.ffn.params[k].size for k in expert_kind(c.expert).names)
                total -= routed * (1.0 - c.k / c.num_experts)
        return int(round(total))


class LMHead(Layer):
    """An untied head: logits = h W.   h (B, T, D) -> (B, T, V);  weight (D, V) ~ Normal(0, 1/D)."""

    def __init__(self, d_model: int, vocab_size: int, *, seed: int = 0, dtype=np.float64):
        super().__init__(dtype)
        self.params = {"weight": _normal(np.random.default_rng(seed), (d_model, vocab_size),
                                         d_model ** -0.5, self.dtype)}   # (D, V)
        self.init_grads()

    def forward(self, h):
        logits, self._cache = lm_head_forward(h, self.params["weight"])
        return logits                                              # (B, T, V)

    def backward(self, dlogits, aux_scale: float = 1.0):
        self.check_backward(dlogits, aux_scale)
        dh, dw = lm_head_backward(dlogits, self._cache)
        self.set_grads({"weight": dw})
        return dh                                                  # (B, T, D)
