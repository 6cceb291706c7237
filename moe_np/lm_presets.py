"""Tiny language models shaped like three published MoE models, as LMConfigs.

    mixtral_lm(...)      Mixtral: 8 experts, top-2 renormalised softmax, GQA, RoPE theta 1e6
    qwen2_moe_lm(...)    Qwen1.5-MoE: fine-grained experts (16, top-4, raw probabilities, each
                         a quarter as wide) plus a sigmoid-gated shared expert; q/k/v biases
    deepseek_v3_lm(...)  DeepSeek-V3's router: sigmoid scores with a selection bias,
                         group-limited top-K, x 2.5, one shared expert; standard grouped-query
                         attention in place of DeepSeek's multi-head latent attention (MLA)

Each takes the sizes (vocab, model width, layers, context) and builds the MoE layer from
presets.py, where every routing setting is sourced; what is shrunk or left out is named
in the docstring. Overrides of any LMConfig field go through `**overrides`, and the MoE
layer's own fields through `moe=dict(...)`. `dense_baseline(config, match)` is the
same model with dense FFNs matched to the MoE blocks' active or total parameters.
"""
from __future__ import annotations

from dataclasses import fields, replace

from moe_np import presets
from moe_np.config import LMConfig
from moe_np.models import dense_width

_FIELDS = {f.name for f in fields(LMConfig)}


def _build(fn: str, base: dict, overrides: dict) -> LMConfig:
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise ValueError(f"{fn}: unknown override {unknown[0]!r}; the overrides are LMConfig fields "
                         f"({', '.join(sorted(_FIELDS))})")
    return LMConfig(**(base | overrides))


def mixtral_lm(vocab_size: int = 256, d_model: int = 128, num_layers: int = 4,
               context_length: int = 256, *, moe: dict | None = None, **overrides) -> LMConfig:
    """Mixtral 8x7B's shape at toy size.

    As Mixtral: every block MoE, 8 SwiGLU experts, top-2, weights renormalised, dropless,
    balance 0.02 K (presets.mixtral); grouped-query attention with 4 query heads per
    key/value head (32 / 8 in Mixtral); RoPE theta 1e6; RMSNorm eps 1e-5; untied head.
    Shrunk: the width, the layers, 4 heads, experts 2 D wide (Mixtral: 14336 / 4096 = 3.5 D).
    """
    layer = presets.mixtral(d_model, 8, 2 * d_model, **(moe or {}))
    base = dict(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=4,
                num_kv_heads=1, context_length=context_length, moe=layer,
                rope_theta=1e6,          # MixtralConfig rope_theta (config.json 1e6)
                rms_eps=1e-5,            # MixtralConfig rms_norm_eps
                tie_embeddings=False)    # tie_word_embeddings False
    return _build("mixtral_lm", base, overrides)


def qwen2_moe_lm(vocab_size: int = 256, d_model: int = 128, num_layers: int = 4,
                 context_length: int = 256, *, moe: dict | None = None, **overrides) -> LMConfig:
    """Qwen1.5-MoE-A2.7B's shape at toy size.

    As Qwen2-MoE: fine-grained routed experts (16 here, 60 there), top-4 of a softmax with
    raw (unrenormalised) weights, one shared expert 4 times as wide with a sigmoid gate,
    balance 0.001 K (presets.qwen2_moe); biases on q, k and v; RoPE theta 1e6; RMSNorm eps
    1e-6; untied head; every block MoE (decoder_sparse_step 1).
    Shrunk: routed experts D/2 wide (1408 / 2048 = 0.69 D there), 4 heads, and 2 key/value
    heads (Qwen1.5-MoE has 16 of each: plain multi-head attention).
    """
    layer = presets.qwen2_moe(d_model, 16, d_model // 2, **(moe or {}))
    base = dict(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=4,
                num_kv_heads=2, context_length=context_length, moe=layer,
                rope_theta=1e6,          # Qwen2MoeConfig rope_theta (Qwen1.5-MoE config.json)
                rms_eps=1e-6,            # Qwen2MoeConfig rms_norm_eps
                qkv_bias=True,           # Qwen2MoeAttention q/k/v_proj bias=True, o_proj none
                tie_embeddings=False)
    return _build("qwen2_moe_lm", base, overrides)


def deepseek_v3_lm(vocab_size: int = 256, d_model: int = 128, num_layers: int = 4,
                   context_length: int = 256, *, moe: dict | None = None, **overrides) -> LMConfig:
    """DeepSeek-V3's router in a toy model with standard attention.

    As DeepSeek-V3: sigmoid scores, selection bias updated by the loss-free rule (gamma
    1e-3), K experts chosen within the best groups, weights normalised and times 2.5, one
    shared expert (presets.deepseek_v3). Here 16 experts in 4 groups, 4 per token from the
    best 2 groups (256 in 8, 8 from 4 there).
    Left out: multi-head latent attention (MLA): the attention here is grouped-query with
    RoPE on whole heads; the first 3 dense blocks (first_k_dense_replace); multi-token
    prediction; the sequence-wise balance loss (alpha 1e-4; it needs a fixed sequence
    length, and decoding one token at a time has none).
    """
    layer = presets.deepseek_v3(d_model, 16, d_model // 2, **({"k": 4, "n_group": 4, "topk_group": 2,
                                                             "seq_aux_coef": 0.0} | (moe or {})))
    base = dict(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=4,
                num_kv_heads=2, context_length=context_length, moe=layer,
                rope_theta=10000.0,      # DeepseekV3Config rope_theta
                rms_eps=1e-6,            # DeepseekV3Config rms_norm_eps
                tie_embeddings=False)
    return _build("deepseek_v3_lm", base, overrides)


def dense_baseline(config: LMConfig, match: str = "active") -> LMConfig:
    """The same model with every block a dense SwiGLU whose width matches an MoE block's
    active (router + K routed + shared experts) or total (all experts) parameters
    (models.dense_width)."""
    if config.moe is None:
        raise ValueError("dense_baseline: config has no MoE blocks (moe=None)")
    return replace(config, moe=None, d_ffn=dense_width(config.moe, match))


LM_PRESETS = {"mixtral": mixtral_lm, "qwen2_moe": qwen2_moe_lm, "deepseek_v3": deepseek_v3_lm}
