"""Chapter 9's checks: the language model's pairs, and the whole model end to end.

Embedding, RMSNorm, RoPE, grouped-query attention (alone, with a KV-cache offset,
and as the whole sublayer with q/k/v biases), the dense SwiGLU FFN, the head and the
token cross-entropy with ignored positions are smooth: no guard. The whole model
routes tokens, so its check passes a selection (every MoE block's router choices
and dispatch rows) and redraws while a +-h step would cross a top-K kink. Its
output is (logits, aux): the auxiliary losses' gradient is checked through the
aux_scale of backward. Sizes are tiny and mutually distinct.
"""
from __future__ import annotations

import numpy as np

from moe_np import attention as att
from moe_np import transformer as tf
from moe_np.checks.registry import register
from moe_np.checks.sparse import until_stable
from moe_np.config import LMConfig, SparseConfig
from moe_np.gradcheck import check_pair
from moe_np.sparse import SparseMoE, sparse_moe_selection

B, T, D, A, P, F, V = 2, 5, 7, 4, 2, 4, 9   # sequences, positions, width, heads, kv heads, head width, vocab


@register("lm:embedding", chapter=9)
def _embedding(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V - 2, (B, T))                                # (B, T) repeats, two unused rows
    fwd = lambda table: att.embedding_forward(ids, table)
    return check_pair("lm:embedding", fwd, att.embedding_backward,
                      {"table": rng.standard_normal((V, D))}, seed=seed)


@register("lm:rms_norm", chapter=9)
def _rms_norm(seed):
    rng = np.random.default_rng(seed)
    inputs = {"x": rng.standard_normal((B, T, D)), "w": 1.0 + 0.3 * rng.standard_normal(D)}
    fwd = lambda x, w: att.rms_norm_forward(x, w, 1e-5)
    return check_pair("lm:rms_norm", fwd, att.rms_norm_backward, inputs, seed=seed)


@register("lm:rope", chapter=9)
def _rope(seed):
    rng = np.random.default_rng(seed)
    cos, sin = att.rope_tables(T, F, 100.0, np.float64, start=3)       # (T, F/2) each
    fwd = lambda x: att.rope_forward(x, cos, sin)
    return check_pair("lm:rope", fwd, att.rope_backward, {"x": rng.standard_normal((B, A, T, F))},
                      seed=seed)


@register("lm:attend", chapter=9)
def _attend(seed):
    """Causal grouped-query attention in query blocks of 2 positions: L = T, and 3 new queries
    over 5 cached keys (L = 8). (One block, as at the default size, is the model check's path.)"""
    rows = []
    for t, length, block in ((T, T, 2), (3, 8, 2)):
        rng = np.random.default_rng(seed)
        inputs = {"q": rng.standard_normal((B, A, t, F)), "k": rng.standard_normal((B, P, length, F)),
                  "v": rng.standard_normal((B, P, length, F))}
        fwd = lambda q, k, v: att.attend_forward(q, k, v, block=block)
        rows += check_pair(f"lm:attend(T={t},L={length},block={min(block, t)})", fwd,
                           att.attend_backward, inputs, seed=seed)
    return rows


def attention_params(rng, d=D, heads=A, kv_heads=P, f=F, bias=True) -> dict:
    """Random attention parameters (biases when asked), float64."""
    params = {"wq": rng.standard_normal((d, heads * f)) / np.sqrt(d),          # (D, A F)
              "wk": rng.standard_normal((d, kv_heads * f)) / np.sqrt(d),       # (D, P F)
              "wv": rng.standard_normal((d, kv_heads * f)) / np.sqrt(d),       # (D, P F)
              "wo": rng.standard_normal((heads * f, d)) / np.sqrt(heads * f)}  # (A F, D)
    if bias:
        params |= {"bq": rng.standard_normal(heads * f), "bk": rng.standard_normal(kv_heads * f),
                   "bv": rng.standard_normal(kv_heads * f)}
    return params


@register("lm:attention", chapter=9)
def _attention(seed):
    """The sublayer (projections with biases, RoPE on q and k, GQA, output) wrt x and every weight."""
    rng = np.random.default_rng(seed)
    cos, sin = att.rope_tables(T, F, 10.0, np.float64)                 # (T, F/2) each
    inputs = {"x": rng.standard_normal((B, T, D))} | attention_params(rng)
    fwd = lambda x, **p: att.attention_forward(x, p, A, P, cos, sin)

    def bwd(dy, cache):
        dx, grads = att.attention_backward(dy, cache, {k: v for k, v in inputs.items() if k != "x"})
        return {"x": dx} | grads
    return check_pair("lm:attention(GQA,qkv bias)", fwd, bwd, inputs, seed=seed)


@register("lm:swiglu_ffn", chapter=9)
def _swiglu_ffn(seed):
    rng = np.random.default_rng(seed)
    h = 6
    inputs = {"x": rng.standard_normal((B * T, D)), "w_gate": rng.standard_normal((D, h)),
              "w_up": rng.standard_normal((D, h)), "w_down": rng.standard_normal((h, D))}
    fwd = lambda x, **p: tf.swiglu_ffn_forward(x, p)

    def bwd(dy, cache):
        dx, grads = tf.swiglu_ffn_backward(dy, cache)
        return {"x": dx} | grads
    return check_pair("lm:swiglu_ffn", fwd, bwd, inputs, seed=seed)


@register("lm:head_and_loss", chapter=9)
def _head_and_loss(seed):
    """The head (wrt h and W) and the token cross-entropy with IGNORE_ID positions (wrt logits)."""
    rng = np.random.default_rng(seed)
    rows = check_pair("lm:head", tf.lm_head_forward, tf.lm_head_backward,
                      {"h": rng.standard_normal((B, T, D)), "w": rng.standard_normal((D, V))},
                      seed=seed)
    targets = rng.integers(0, V, (B, T))                               # (B, T)
    targets[0, -2:] = targets[1, 0] = tf.IGNORE_ID
    fwd = lambda logits: tf.lm_loss_forward(logits, targets)
    return rows + check_pair("lm:loss(ignore id)", fwd, tf.lm_loss_backward,
                             {"logits": 2.0 * rng.standard_normal((B, T, V))}, seed=seed)


MODEL_CASES = {
    # block 0 dense, block 1 Mixtral-like MoE; GQA, qkv biases, untied head, aux losses
    "gqa,bias,dense+moe": dict(moe_every=2, d_ffn=3, qkv_bias=True, tie_embeddings=False,
                               moe=dict(k=2, balance_coef=0.3, z_coef=0.05)),
    # one block, Qwen2-like MoE with a gated shared expert, tied head, right padding masked
    "tied,shared expert,mask": dict(num_layers=1, num_kv_heads=2, tie_embeddings=True,
                                    moe=dict(k=2, router="softmax_topk_raw", num_shared=1,
                                             shared_gate=True, d_hidden_shared=3, balance_coef=0.3)),
}


def tiny_model(name: str, seed: int) -> tf.MoETransformer:
    """A float64 model of the case, in eval mode, with every parameter randomised."""
    case = dict(MODEL_CASES[name])
    moe = SparseConfig(d_model=4, num_experts=3, d_hidden=2, expert="swiglu", router_scale=1.0,
                       dispatch="numpy", **case.pop("moe"))
    config = LMConfig(vocab_size=5, d_model=4, num_layers=case.pop("num_layers", 2), num_heads=2,
                      num_kv_heads=case.pop("num_kv_heads", 1), context_length=6, moe=moe,
                      rope_theta=10.0, **case)
    model = tf.MoETransformer(config, seed=seed).eval()
    rng = np.random.default_rng(seed + 1)
    for value in model.params.values():
        value += 0.3 * rng.standard_normal(value.shape)                # norms, biases away from 1 / 0
    return model


def model_check(name: str, seed: int):
    """(logits, aux) of the whole model wrt every parameter; aux's gradient through aux_scale."""
    def rows(rng):
        model = tiny_model(name, int(rng.integers(2**20)))
        ids = rng.integers(0, 5, (2, 4))                               # (B, T)
        mask = None if "mask" not in name else np.array([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=bool)

        def forward(**params):
            for key, value in params.items():
                model.params[key][...] = value
            logits = model.forward(ids, mask)                          # (B, T, V)
            return (logits, np.array(model.aux)), None

        def backward(dout, cache):
            model.backward(dout[0], aux_scale=float(dout[1]))
            return dict(model.grads)

        def pick(**params):
            return tuple(sparse_moe_selection(b.ffn._cache) for b in model.blocks
                         if isinstance(b.ffn, SparseMoE))
        return check_pair(f"lm:model[{name}]", forward, backward, dict(model.params), seed=seed,
                          selection=pick)
    return until_stable(rows, seed, tries=40)


for _name in MODEL_CASES:
    register(f"lm:model[{_name}]", chapter=9)(lambda seed, c=_name: model_check(c, seed))
