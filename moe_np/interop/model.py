"""A Rosetta for whole models: HF's MixtralForCausalLM / Qwen2MoeForCausalLM <-> MoETransformer.

    model = from_hf_model(arch, state_dict, config)
    state_dict, config = to_hf_model(arch, model, style="fused")

arch is "mixtral" or "qwen2_moe"; state_dict is the *causal LM's* own state_dict() as
NumPy arrays (full keys: "model.layers.3.self_attn.q_proj.weight", ...), config the HF
config's fields as a plain dict. Each MoE block goes through interop.from_hf / to_hf
(chapter 8's block mapping); this module adds everything around it. nn.Linear stores
(out, in), moe_np (in, out): every projection is transposed; embeddings and norms are not.

    moe_np                       HF key (i = the layer)                          transposed
    embed.weight (V, D)          model.embed_tokens.weight (V, D)                no
    block{i}.attn.wq (D, A F)    model.layers.{i}.self_attn.q_proj.weight        yes
    block{i}.attn.wk, wv (D, P F) ... k_proj.weight, v_proj.weight (P F, D)      yes
    block{i}.attn.wo (A F, D)    model.layers.{i}.self_attn.o_proj.weight        yes
    block{i}.attn.bq, bk, bv     ... q_proj.bias, k_proj.bias, v_proj.bias       (Qwen2 only)
    block{i}.attn_norm.weight    model.layers.{i}.input_layernorm.weight         no
    block{i}.ffn_norm.weight     model.layers.{i}.post_attention_layernorm.weight no
    block{i}.ffn.*  (MoE)        model.layers.{i}.<moe prefix><interop's block keys>
    block{i}.ffn.w_gate, w_up, w_down (dense, Qwen2)  model.layers.{i}.mlp.{gate,up,down}_proj.weight  yes
    norm.weight (D,)             model.norm.weight                               no
    head.weight (D, V)           lm_head.weight (V, D)   (absent or equal to embed_tokens when tied)  yes

The MoE prefix is "mlp." except for Mixtral's per-expert layout (releases before the
fused experts), whose block was "block_sparse_moe.". RoPE needs no mapping: moe_np pairs
dimension i with i + F/2 as HF's rotate_half does. Differences of the forward, all
rounding: whatever the model's dtype, HF forms RoPE's angles, RMSNorm's mean square, the
attention softmax and the router's softmax in float32 (moe_np computes in the model's
dtype, and forms RoPE's angles in float64). Measured against transformers 5.25 (torch
2.13, eager attention and experts) in float64 at d_model 32, 3 layers, 12 positions:
logits differ by at most 1.4e-6 to 2.2e-6 (logits up to about 3.5); with those four
float32 steps patched to float64 in HF, by at most 6e-15.
"""
from __future__ import annotations

import numpy as np

from moe_np.interop import blocks as interop, fields
from moe_np.config import LMConfig
from moe_np.sparse import SparseMoE
from moe_np.transformer import MoETransformer

LM_ARCHS = ("mixtral", "qwen2_moe")
MOE_PREFIX = {("mixtral", "fused"): "mlp.", ("mixtral", "per_expert"): "block_sparse_moe.",
              ("qwen2_moe", "fused"): "mlp.", ("qwen2_moe", "per_expert"): "mlp."}
LAYER_KEYS = (("self_attn.q_proj.weight", "attn.wq", True), ("self_attn.k_proj.weight", "attn.wk", True),
              ("self_attn.v_proj.weight", "attn.wv", True), ("self_attn.o_proj.weight", "attn.wo", True),
              ("input_layernorm.weight", "attn_norm.weight", False),
              ("post_attention_layernorm.weight", "ffn_norm.weight", False))
BIAS_KEYS = (("self_attn.q_proj.bias", "attn.bq", False), ("self_attn.k_proj.bias", "attn.bk", False),
             ("self_attn.v_proj.bias", "attn.bv", False))
DENSE_KEYS = (("mlp.gate_proj.weight", "ffn.w_gate", True), ("mlp.up_proj.weight", "ffn.w_up", True),
              ("mlp.down_proj.weight", "ffn.w_down", True))
# LMConfig field <- HF config field (kind, default): the fields around the MoE blocks
LM_FIELDS = {"vocab_size": ("vocab_size", "size", None), "d_model": ("hidden_size", "size", None),
             "num_layers": ("num_hidden_layers", "size", None),
             "num_heads": ("num_attention_heads", "size", None),
             "num_kv_heads": ("num_key_value_heads", "size", None),
             "context_length": ("max_position_embeddings", "size", None),
             "rms_eps": ("rms_norm_eps", "number", 1e-6),
             "tie_embeddings": ("tie_word_embeddings", "flag", False)}


def _check_arch(fn: str, arch) -> None:
    if arch not in LM_ARCHS:
        raise ValueError(f"{fn}: arch must be one of {LM_ARCHS}, got {arch!r}")


def _hf_field(config: dict, name: str, kind: str, default):
    """config[name] checked against its kind (fields.KINDS); default None: it must be there."""
    return fields.hf_value("from_hf_model: config", config, name, kind,
                           fields.REQUIRED if default is None else default)


def rope_theta_of(config: dict) -> float:
    """rope_theta, at the top level (HF 4.x) or in rope_parameters (HF 5); default rope only."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type", "default")) != "default":
        raise ValueError(f"from_hf_model: RoPE scaling {params!r} cannot be represented "
                         "(moe_np's RoPE is the default one)")
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(_hf_field({"rope_theta": theta}, "rope_theta", "number", None))


def _check_attention(arch: str, config: dict, lm: dict) -> None:
    """Attention settings moe_np does not have: a sliding window, another head_dim, dropout."""
    window = config.get("sliding_window")
    use_window = config.get("use_sliding_window", arch == "mixtral")
    if use_window and window is not None and window < lm["context_length"]:
        raise ValueError(f"from_hf_model: sliding_window={window} < max_position_embeddings="
                         f"{lm['context_length']} cannot be represented (moe_np's attention is full)")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * lm["num_heads"] != lm["d_model"]:
        raise ValueError(f"from_hf_model: head_dim={head_dim} differs from hidden_size / "
                         f"num_attention_heads = {lm['d_model']} / {lm['num_heads']}")
    kinds = set(config.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(f"from_hf_model: layer_types {sorted(kinds)} cannot be represented "
                         "(moe_np's attention is full attention in every layer)")
    if config.get("attention_dropout", 0.0):
        raise ValueError(f"from_hf_model: attention_dropout={config['attention_dropout']} cannot be "
                         "represented (moe_np's attention has no dropout)")


def _moe_every(arch: str, config: dict, num_layers: int) -> tuple[int, int | None]:
    """(moe_every, d_ffn): Mixtral is MoE everywhere; Qwen2 by decoder_sparse_step."""
    if arch == "mixtral":
        return 1, None
    step = _hf_field(config, "decoder_sparse_step", "size", 1)
    dense_only = list(config.get("mlp_only_layers") or [])
    if dense_only:
        raise ValueError(f"from_hf_model: mlp_only_layers={dense_only} cannot be represented "
                         "(moe_np makes block i dense by decoder_sparse_step alone)")
    dense = any((i + 1) % step for i in range(num_layers))
    return step, (_hf_field(config, "intermediate_size", "size", None) if dense else None)


def lm_config_from_hf(arch: str, config: dict, moe) -> LMConfig:
    """The LMConfig of an HF causal-LM config dict (moe: the blocks' SparseConfig)."""
    if not isinstance(config, dict):
        raise ValueError(f"from_hf_model: config must be a dict of HF config fields, "
                         f"got {type(config).__name__}")
    lm = {mine: _hf_field(config, name, kind, default)
          for mine, (name, kind, default) in LM_FIELDS.items()}
    _check_attention(arch, config, lm)
    moe_every, d_ffn = _moe_every(arch, config, lm["num_layers"])
    qkv_bias = _hf_field(config, "qkv_bias", "flag", True) if arch == "qwen2_moe" else False
    return LMConfig(**lm, moe=moe, moe_every=moe_every, d_ffn=d_ffn, rope_theta=rope_theta_of(config),
                    qkv_bias=qkv_bias)


def key_map(arch: str, config: LMConfig) -> dict:
    """HF key -> (moe_np parameter, transposed?) for everything but the MoE blocks' own keys."""
    names = {"model.embed_tokens.weight": ("embed.weight", False), "model.norm.weight": ("norm.weight", False)}
    if not config.tie_embeddings:
        names["lm_head.weight"] = ("head.weight", True)
    for i in range(config.num_layers):
        rows = LAYER_KEYS + (BIAS_KEYS if config.qkv_bias else ()) + (() if config.is_moe(i) else DENSE_KEYS)
        names |= {f"model.layers.{i}.{hf}": (f"block{i}.{mine}", t) for hf, mine, t in rows}
    return names


def _style_of(state_dict: dict) -> str:
    return "fused" if any(k.endswith("experts.gate_up_proj") for k in state_dict) else "per_expert"


def _moe_layers(arch: str, config: dict) -> list[int]:
    num_layers = _hf_field(config, "num_hidden_layers", "size", None)
    step = _moe_every(arch, config, num_layers)[0]
    return [i for i in range(num_layers) if (i + 1) % step == 0]


def _blocks_from_hf(arch: str, state_dict: dict, config: dict, style: str) -> dict:
    """layer -> SparseMoE built by interop.from_hf from that layer's keys (prefix removed)."""
    blocks = {}
    for i in _moe_layers(arch, config):
        prefix = f"model.layers.{i}.{MOE_PREFIX[arch, style]}"
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        try:
            blocks[i] = interop.from_hf(arch, own, config)
        except ValueError as err:
            raise ValueError(f"from_hf_model: layer {i} (keys {prefix}*): {err}") from err
    return blocks


def _one_float_dtype(state_dict: dict) -> np.dtype:
    """The one float dtype of every array (a mix, or integers, raise naming a key)."""
    first = next(iter(state_dict))
    dtype = np.asarray(state_dict[first]).dtype
    for key, value in state_dict.items():
        if np.asarray(value).dtype != dtype or not np.issubdtype(dtype, np.floating):
            raise ValueError(f"from_hf_model: every array must have one float dtype; key {key!r} is "
                             f"{np.asarray(value).dtype}, key {first!r} is {dtype}")
    return dtype


def _check_keys(state_dict: dict, names: dict, model: MoETransformer, moe_prefixes: list) -> None:
    """Every key of `names` present with its shape; no key outside names and the MoE blocks'
    prefixes (interop.from_hf has checked those strictly)."""
    for hf, (mine, transposed) in names.items():
        if hf not in state_dict:
            raise ValueError(f"from_hf_model: state_dict is missing key {hf!r}")
        want = model.params[mine].shape[::-1] if transposed else model.params[mine].shape
        got = np.shape(state_dict[hf])
        if got != want:
            raise ValueError(f"from_hf_model: key {hf!r} has shape {got}, expected {want} from the config")
    for key in sorted(state_dict):
        if key not in names and not key.startswith(tuple(moe_prefixes)):
            raise ValueError(f"from_hf_model: state_dict has unexpected key {key!r}")


def from_hf_model(arch: str, state_dict: dict, config: dict) -> MoETransformer:
    """A MoETransformer computing what HF's causal LM computes, in the state dict's dtype.

    Strict: a missing, unexpected or mis-shaped key raises ValueError naming it, and
    nothing is returned. A tied model's lm_head.weight may be left out or must equal
    model.embed_tokens.weight."""
    _check_arch("from_hf_model", arch)
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError("from_hf_model: state_dict must be a non-empty dict of arrays")
    dtype = _one_float_dtype(state_dict)
    style = _style_of(state_dict)
    blocks = _blocks_from_hf(arch, state_dict, config, style)
    lm = lm_config_from_hf(arch, config, next(iter(blocks.values())).config if blocks else None)
    sd = _tied_head(lm, state_dict)
    model = MoETransformer(lm, dtype=dtype)
    names = key_map(arch, lm)
    _check_keys(sd, names, model, [f"model.layers.{i}.{MOE_PREFIX[arch, style]}" for i in blocks])
    state = model.state_dict()
    state |= {mine: np.asarray(sd[hf]).T if t else np.asarray(sd[hf]) for hf, (mine, t) in names.items()}
    for i, layer in blocks.items():
        state |= {f"block{i}.ffn.{k}": v for k, v in layer.state_dict().items() if not k.startswith("rng.")}
    model.load_state_dict(state)
    return model


def _tied_head(lm: LMConfig, state_dict: dict) -> dict:
    """A tied model's state dict without lm_head.weight (which must then equal the embedding)."""
    if not lm.tie_embeddings or "lm_head.weight" not in state_dict:
        return state_dict
    if not np.array_equal(state_dict["lm_head.weight"], state_dict.get("model.embed_tokens.weight")):
        raise ValueError("from_hf_model: tie_word_embeddings=True but lm_head.weight differs from "
                         "model.embed_tokens.weight")
    return {k: v for k, v in state_dict.items() if k != "lm_head.weight"}


# -- moe_np -> HF --------------------------------------------------------------------------------

def _check_representable(arch: str, model: MoETransformer) -> None:
    """Settings the HF class has no field for; interop.to_hf checks the MoE blocks themselves."""
    c = model.config
    if c.moe is None:
        raise ValueError(f"to_hf_model: {arch} has MoE blocks; this model has none (moe=None)")
    if c.qkv_bias and arch == "mixtral":
        raise ValueError("to_hf_model: mixtral cannot represent qkv_bias=True (its q/k/v projections "
                         "have no bias)")
    if arch == "mixtral" and c.moe_every != 1:
        raise ValueError(f"to_hf_model: mixtral cannot represent moe_every={c.moe_every} "
                         "(every Mixtral block is MoE)")


def hf_config_of(arch: str, c: LMConfig) -> dict:
    """The HF causal-LM config fields around the MoE blocks (interop.to_hf adds the blocks')."""
    out = {"vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.num_layers,
           "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
           "head_dim": c.head_dim, "max_position_embeddings": c.context_length,
           "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta,
           "tie_word_embeddings": c.tie_embeddings, "attention_dropout": 0.0}
    if arch == "mixtral":
        return out | {"sliding_window": None}
    return out | {"decoder_sparse_step": c.moe_every, "mlp_only_layers": [], "qkv_bias": c.qkv_bias,
                  "intermediate_size": c.d_ffn or c.moe.d_hidden, "use_sliding_window": False}


def to_hf_model(arch: str, model: MoETransformer, style: str = "fused") -> tuple[dict, dict]:
    """(state_dict, config): the HF causal LM's full keys -> arrays (copies, the model's dtype)
    and its config fields, for a model HF can represent (else ValueError naming the setting).
    style: the MoE blocks' layout, "fused" (recent releases) or "per_expert" (older ones;
    Mixtral's block is then "block_sparse_moe.")."""
    _check_arch("to_hf_model", arch)
    if not isinstance(model, MoETransformer):
        raise ValueError(f"to_hf_model: model must be a MoETransformer, got {type(model).__name__}")
    if style not in interop.STYLES:
        raise ValueError(f"to_hf_model: style must be one of {interop.STYLES}, got {style!r}")
    _check_representable(arch, model)
    sd = {hf: (model.params[mine].T if t else model.params[mine]).copy()
          for hf, (mine, t) in key_map(arch, model.config).items()}
    config = hf_config_of(arch, model.config)
    for i, block in enumerate(model.blocks):
        if isinstance(block.ffn, SparseMoE):
            try:
                block_sd, block_config = interop.to_hf(arch, block.ffn, style)
            except ValueError as err:
                raise ValueError(f"to_hf_model: block {i}: {err}") from err
            sd |= {f"model.layers.{i}.{MOE_PREFIX[arch, style]}{k}": v for k, v in block_sd.items()}
            config |= block_config
    return sd, config
