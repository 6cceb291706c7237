"""A Rosetta to HF transformers: a sparse-MoE block's state dict and config <-> SparseMoE.

    layer = from_hf(arch, state_dict, config, *, seq_len=None)
    state_dict, config = to_hf(arch, layer, style="fused")

arch is "mixtral", "qwen2_moe", "deepseek_v3" or "switch_transformers";
state_dict is the MoE block's own state_dict() (keys relative to the block:
"gate.weight", not "model.layers.3.mlp.gate.weight") as NumPy arrays, and
config is the HF config's fields as a plain dict. Nothing here imports
torch or transformers.

Names and layouts (E experts, D = hidden_size, H = the expert's
intermediate size). nn.Linear stores its weight (out, in) and computes
x W^T; moe_np stores (in, out) and computes x @ W, so every matrix is
transposed on the way through:

    moe_np                  HF (fused: recent releases)       HF (per_expert: older releases)
    w_router (D, E)         gate.weight (E, D)                 gate.weight (E, D)
    w_gate (E, D, H)        experts.gate_up_proj[:, :H] (E, 2H, D)   experts.{e}.w1 | gate_proj (H, D)
    w_up (E, D, H)          experts.gate_up_proj[:, H:]        experts.{e}.w3 | up_proj (H, D)
    w_down (E, H, D)        experts.down_proj (E, D, H)        experts.{e}.w2 | down_proj (D, H)
    selection_bias (E,)     gate.e_score_correction_bias (E,)  (DeepSeek-V3, a buffer)
    shared_w_* (S, ., .)    Qwen2: shared_expert.{gate,up,down}_proj; DeepSeek-V3:
                            shared_experts.* with the S experts side by side (width S H)
    w_shared_gate (D, 1)    shared_expert_gate.weight (1, D)   (Qwen2)
    w1, w2 (E, D, H), (E, H, D)   Switch: router.classifier.weight (E, D),
                            experts.expert_{e}.wi.weight (H, D), experts.expert_{e}.wo.weight (D, H)

Mixtral's per-expert names: w1 is the gate, w3 the up projection, w2 the
down projection. Switch's experts have no biases: from_hf sets b1 = b2 = 0
and to_hf refuses a layer whose biases are not zero.

In float64 a layer built here computes HF's forward to rounding, with
one exception: HF computes the router in float32 even in a float64 model
(Mixtral `router_logits.float()`, Qwen2 `softmax(dtype=torch.float)`,
DeepSeek-V3 casts its input and weight, Switch `router_dtype`), so its
routing weights carry float32 rounding (~1e-7 relative) that moe_np's do not.
Smaller differences, named where they arise: DeepSeek-V3 adds 1e-20 to the
weights' denominator and masks ineligible groups with 0 where moe_np uses
-inf (the same choice while biased scores are positive); Switch's dropped
tokens leave HF 4.x's block as p * x (the input, scaled), moe_np's as 0.
"""
from __future__ import annotations

import numpy as np

from moe_np import dispatch
from moe_np.config import SparseConfig
from moe_np.sparse import SparseMoE

ARCHS = ("mixtral", "qwen2_moe", "deepseek_v3", "switch_transformers")
STYLES = ("fused", "per_expert")
SWIGLU_NAMES = {"mixtral": ("w1", "w3", "w2"),               # gate, up, down
                "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
                "deepseek_v3": ("gate_proj", "up_proj", "down_proj")}
SHARED_PREFIX = {"qwen2_moe": "shared_expert.", "deepseek_v3": "shared_experts."}
REQUIRED = object()   # a config field with no default

# HF config fields each arch reads: name -> (kind, default). Fields that change the forward
# are required; training-only ones default to the HF class's default.
CONFIG_FIELDS = {
    "mixtral": {"hidden_size": ("size", REQUIRED), "intermediate_size": ("size", REQUIRED),
                "num_local_experts": ("size", REQUIRED), "num_experts_per_tok": ("size", REQUIRED),
                "hidden_act": ("str", "silu"), "router_aux_loss_coef": ("coef", 0.001),
                "router_jitter_noise": ("coef", 0.0)},
    "qwen2_moe": {"hidden_size": ("size", REQUIRED), "moe_intermediate_size": ("size", REQUIRED),
                  "num_experts": ("size", REQUIRED), "num_experts_per_tok": ("size", REQUIRED),
                  "shared_expert_intermediate_size": ("size", REQUIRED),
                  "norm_topk_prob": ("flag", REQUIRED), "hidden_act": ("str", "silu"),
                  "router_aux_loss_coef": ("coef", 0.001)},
    "deepseek_v3": {"hidden_size": ("size", REQUIRED), "moe_intermediate_size": ("size", REQUIRED),
                    "n_routed_experts": ("size", REQUIRED), "num_experts_per_tok": ("size", REQUIRED),
                    "n_group": ("size", REQUIRED), "topk_group": ("size", REQUIRED),
                    "norm_topk_prob": ("flag", REQUIRED), "routed_scaling_factor": ("coef", REQUIRED),
                    "n_shared_experts": ("size", REQUIRED), "hidden_act": ("str", "silu")},
    "switch_transformers": {"d_model": ("size", REQUIRED), "d_ff": ("size", REQUIRED),
                            "num_experts": ("size", REQUIRED), "expert_capacity": ("size", REQUIRED),
                            "router_bias": ("flag", False), "dense_act_fn": ("str", "relu"),
                            "router_jitter_noise": ("coef", 0.01), "router_aux_loss_coef": ("coef", 0.001),
                            "router_z_loss_coef": ("coef", 0.001)},
}


def _check_arch(fn: str, arch) -> None:
    if arch not in ARCHS:
        raise ValueError(f"{fn}: arch must be one of {ARCHS}, got {arch!r}")


def _field(arch: str, config: dict, name: str):
    """config[name] (or its HF default), checked against its kind."""
    kind, default = CONFIG_FIELDS[arch][name]
    if name not in config:
        if default is REQUIRED:
            raise ValueError(f"from_hf: {arch} config is missing the field {name!r}")
        return default
    value = config[name]
    ok = {"size": isinstance(value, int) and not isinstance(value, bool) and value >= 1,
          "flag": isinstance(value, bool),
          "coef": isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
          "str": isinstance(value, str)}[kind]
    if not ok:
        need = {"size": "an integer >= 1", "flag": "a bool", "coef": "a number >= 0", "str": "a string"}
        raise ValueError(f"from_hf: {arch} config field {name!r} must be {need[kind]}, got {value!r}")
    return value


def _read_config(arch: str, config: dict) -> dict:
    """The fields `arch` needs from an HF config dict, validated, HF defaults filled in.
    Other fields (vocab_size, attention sizes, ...) are ignored."""
    if not isinstance(config, dict):
        raise ValueError(f"from_hf: config must be a dict of HF config fields, got {type(config).__name__}")
    hf = {name: _field(arch, config, name) for name in CONFIG_FIELDS[arch]}
    act_name = "dense_act_fn" if arch == "switch_transformers" else "hidden_act"
    want = "relu" if arch == "switch_transformers" else "silu"
    if hf[act_name] != want:
        raise ValueError(f"from_hf: {arch} {act_name}={hf[act_name]!r} cannot be represented: moe_np's "
                         f"{'ReLU' if want == 'relu' else 'SwiGLU'} experts need {want!r}")
    return hf


# -- HF config -> SparseConfig -------------------------------------------------------------

def _mixtral_config(hf: dict) -> SparseConfig:
    if hf["router_jitter_noise"]:
        raise ValueError(f"from_hf: mixtral router_jitter_noise={hf['router_jitter_noise']} scales the "
                         "input of the router and the experts; moe_np's jitter reaches the router only")
    k = hf["num_experts_per_tok"]
    return SparseConfig(d_model=hf["hidden_size"], num_experts=hf["num_local_experts"],
                        d_hidden=hf["intermediate_size"], expert="swiglu", router="softmax_topk", k=k,
                        balance_coef=hf["router_aux_loss_coef"] * k)   # HF's loss is K x moe_np's


def _qwen2_config(hf: dict) -> SparseConfig:
    k = hf["num_experts_per_tok"]
    return SparseConfig(d_model=hf["hidden_size"], num_experts=hf["num_experts"],
                        d_hidden=hf["moe_intermediate_size"], expert="swiglu", k=k,
                        router="softmax_topk" if hf["norm_topk_prob"] else "softmax_topk_raw",
                        num_shared=1, shared_gate=True,
                        d_hidden_shared=hf["shared_expert_intermediate_size"],
                        balance_coef=hf["router_aux_loss_coef"] * k)


def _deepseek_config(hf: dict) -> SparseConfig:
    return SparseConfig(d_model=hf["hidden_size"], num_experts=hf["n_routed_experts"],
                        d_hidden=hf["moe_intermediate_size"], expert="swiglu", router="sigmoid_bias",
                        k=hf["num_experts_per_tok"], n_group=hf["n_group"], topk_group=hf["topk_group"],
                        norm_topk_prob=hf["norm_topk_prob"],
                        routed_scaling_factor=float(hf["routed_scaling_factor"]),
                        num_shared=hf["n_shared_experts"])


def capacity_factor_for(capacity: int, num_experts: int, seq_len: int) -> float:
    """The factor f whose capacity at seq_len tokens, K = 1, is exactly `capacity`:
    ceil(f T / E) = C. f = C E / T, nudged down while rounding would give C + 1."""
    factor = capacity * num_experts / seq_len
    while dispatch.capacity(seq_len, num_experts, 1, factor) > capacity:
        factor = float(np.nextafter(factor, 0.0))
    return factor


def _switch_config(hf: dict, seq_len) -> SparseConfig:
    if hf["router_bias"]:
        raise ValueError("from_hf: switch_transformers router_bias=True cannot be represented: "
                         "moe_np's router has no bias")
    if seq_len is None:
        raise ValueError(f"from_hf: switch_transformers gives each expert expert_capacity="
                         f"{hf['expert_capacity']} slots per sequence; pass seq_len=T, the sequence "
                         "length of the inputs, so capacity is counted per sequence")
    e, cap = hf["num_experts"], hf["expert_capacity"]
    return SparseConfig(d_model=hf["d_model"], num_experts=e, d_hidden=hf["d_ff"], expert="mlp",
                        router="switch", k=1, capacity_factor=capacity_factor_for(cap, e, seq_len),
                        capacity_scope="sequence", seq_len=seq_len, drop_policy="position",
                        jitter=float(hf["router_jitter_noise"]),
                        balance_coef=hf["router_aux_loss_coef"], z_coef=hf["router_z_loss_coef"])


def _sparse_config(arch: str, config: dict, seq_len: int | None = None) -> SparseConfig:
    """The SparseConfig of an HF config dict (seq_len: switch_transformers only)."""
    hf = _read_config(arch, config)
    if seq_len is not None and arch != "switch_transformers":
        raise ValueError(f"from_hf: seq_len={seq_len} is only used for switch_transformers' "
                         f"per-sequence capacity; {arch} has no capacity")
    build = {"mixtral": _mixtral_config, "qwen2_moe": _qwen2_config, "deepseek_v3": _deepseek_config,
             "switch_transformers": lambda hf: _switch_config(hf, seq_len)}[arch]
    try:
        return build(hf)
    except ValueError as err:
        if str(err).startswith("from_hf"):
            raise
        raise ValueError(f"from_hf: the {arch} config does not fit moe_np: {err}") from err


# -- the HF layout: keys and shapes ---------------------------------------------------------

def _sizes_note(arch: str, config: dict) -> str:
    """Which config fields fix the shapes, e.g. 'num_local_experts=4, hidden_size=5, ...'."""
    names = [n for n, (kind, _) in CONFIG_FIELDS[arch].items() if kind == "size"
             and n not in ("num_experts_per_tok", "n_group", "topk_group", "expert_capacity")]
    return ", ".join(f"{n}={config.get(n)}" for n in names)


def hf_layout(arch: str, config: SparseConfig, style: str = "fused") -> dict:
    """key -> shape of the HF block's state dict for this layer config and style."""
    _check_arch("hf_layout", arch)
    _check_style("hf_layout", arch, style)
    e, d, h = config.num_experts, config.d_model, config.d_hidden
    if arch == "switch_transformers":
        keys = {"router.classifier.weight": (e, d)}
        for i in range(e):
            keys |= {f"experts.expert_{i}.wi.weight": (h, d), f"experts.expert_{i}.wo.weight": (d, h)}
        return keys
    keys = {"gate.weight": (e, d)}
    if style == "fused":
        keys |= {"experts.gate_up_proj": (e, 2 * h, d), "experts.down_proj": (e, d, h)}
    else:
        gate, up, down = SWIGLU_NAMES[arch]
        for i in range(e):
            keys |= {f"experts.{i}.{gate}.weight": (h, d), f"experts.{i}.{up}.weight": (h, d),
                     f"experts.{i}.{down}.weight": (d, h)}
    if arch == "deepseek_v3":
        keys["gate.e_score_correction_bias"] = (e,)
    if arch in SHARED_PREFIX:
        width = config.num_shared * (config.d_hidden_shared or h)
        p = SHARED_PREFIX[arch]
        keys |= {p + "gate_proj.weight": (width, d), p + "up_proj.weight": (width, d),
                 p + "down_proj.weight": (d, width)}
    if arch == "qwen2_moe":
        keys["shared_expert_gate.weight"] = (1, d)
    return keys


def _check_style(fn: str, arch: str, style) -> None:
    if style not in STYLES:
        raise ValueError(f"{fn}: style must be one of {STYLES}, got {style!r}")
    if arch == "switch_transformers" and style != "per_expert":
        raise ValueError(f"{fn}: switch_transformers has only the per-expert layout "
                         f"(experts.expert_{{e}}.wi/wo), got style={style!r}")


def _style_of(arch: str, state_dict: dict) -> str:
    if arch == "switch_transformers":
        return "per_expert"
    return "fused" if {"experts.gate_up_proj", "experts.down_proj"} & set(state_dict) else "per_expert"


def _check_state_dict(arch: str, state_dict: dict, expected: dict, note: str) -> np.dtype:
    """Every expected key present with its shape, no other key, one float dtype; -> that dtype.
    note: the config fields the shapes come from (named in a shape error)."""
    if not isinstance(state_dict, dict):
        raise ValueError(f"from_hf: state_dict must be a dict of arrays, got {type(state_dict).__name__}")
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise ValueError(f"from_hf: {arch} state_dict is missing key {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise ValueError(f"from_hf: {arch} state_dict has unexpected key {unexpected[0]!r}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    dtypes = {}
    for key, shape in expected.items():
        value = np.asarray(state_dict[key])
        if value.shape != shape:
            raise ValueError(f"from_hf: {arch} key {key!r} has shape {value.shape}, expected {shape} "
                             f"from the config ({note})")
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"from_hf: {arch} key {key!r} must be a float array, got {value.dtype}")
        dtypes.setdefault(value.dtype, key)
    if len(dtypes) > 1:
        (a, key_a), (b, key_b) = list(dtypes.items())[:2]
        raise ValueError(f"from_hf: one dtype for every array, got {key_a!r} {a} and {key_b!r} {b}")
    return next(iter(dtypes))


# -- arrays: HF -> moe_np -------------------------------------------------------------------

def _t(a):
    """Swap the last two axes, contiguous: nn.Linear's (out, in) <-> moe_np's (in, out)."""
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


def _routed_from_hf(arch: str, sd: dict, style: str, config: SparseConfig) -> dict:
    """The routed experts' parameters, stacked over experts."""
    e, h = config.num_experts, config.d_hidden
    stack = lambda fmt: np.stack([np.asarray(sd[fmt.format(i)]) for i in range(e)])   # (E, out, in)
    if arch == "switch_transformers":
        w1 = _t(stack("experts.expert_{}.wi.weight"))                  # (E, D, H)
        w2 = _t(stack("experts.expert_{}.wo.weight"))                  # (E, H, D)
        return {"w1": w1, "b1": np.zeros((e, h), w1.dtype), "w2": w2,
                "b2": np.zeros((e, config.d_model), w1.dtype)}
    if style == "fused":
        gate_up = np.asarray(sd["experts.gate_up_proj"])               # (E, 2H, D): gate rows, then up
        return {"w_gate": _t(gate_up[:, :h]), "w_up": _t(gate_up[:, h:]),   # (E, D, H) each
                "w_down": _t(sd["experts.down_proj"])}                 # (E, H, D)
    gate, up, down = SWIGLU_NAMES[arch]
    return {"w_gate": _t(stack(f"experts.{{}}.{gate}.weight")),       # (E, D, H)
            "w_up": _t(stack(f"experts.{{}}.{up}.weight")),           # (E, D, H)
            "w_down": _t(stack(f"experts.{{}}.{down}.weight"))}       # (E, H, D)


def _shared_from_hf(arch: str, sd: dict, config: SparseConfig) -> dict:
    """HF's one shared MLP of width S Hs -> S stacked shared experts of width Hs."""
    s, d = config.num_shared, config.d_model
    hs = config.d_hidden_shared or config.d_hidden
    p = SHARED_PREFIX[arch]
    params = {"shared_w_gate": _t(np.asarray(sd[p + "gate_proj.weight"]).reshape(s, hs, d)),   # (S, D, Hs)
              "shared_w_up": _t(np.asarray(sd[p + "up_proj.weight"]).reshape(s, hs, d)),       # (S, D, Hs)
              "shared_w_down": _t(sd[p + "down_proj.weight"]).reshape(s, hs, d)}               # (S, Hs, D)
    if arch == "qwen2_moe":
        params["w_shared_gate"] = _t(sd["shared_expert_gate.weight"])  # (D, 1)
    return params


def from_hf(arch: str, state_dict: dict, config: dict, *, seq_len: int | None = None) -> SparseMoE:
    """A SparseMoE computing what the HF block computes, in the state dict's dtype.

    arch: one of ARCHS. state_dict: the block's own HF keys -> arrays, in
    either layout (fused or per-expert, detected from the keys). config: the
    HF config's fields (see CONFIG_FIELDS). seq_len: tokens per sequence,
    required for switch_transformers, whose expert_capacity counts slots per
    sequence (HF 4.x; a later refactor passes (N, D) to its router, so the
    running count there spans a length-1 axis and nothing is dropped).
    Everything is checked before the layer is built.
    """
    _check_arch("from_hf", arch)
    sparse = _sparse_config(arch, config, seq_len)
    style = _style_of(arch, state_dict) if isinstance(state_dict, dict) else "fused"
    expected = hf_layout(arch, sparse, style)
    dtype = _check_state_dict(arch, state_dict, expected, _sizes_note(arch, config))
    router_key = "router.classifier.weight" if arch == "switch_transformers" else "gate.weight"
    params = {"w_router": _t(state_dict[router_key])}                  # (D, E)
    params |= _routed_from_hf(arch, state_dict, style, sparse)
    if arch in SHARED_PREFIX:
        params |= _shared_from_hf(arch, state_dict, sparse)
    layer = SparseMoE(sparse, seed=0, dtype=dtype)
    state = layer.state_dict() | params
    if arch == "deepseek_v3":
        state["selection_bias"] = np.array(state_dict["gate.e_score_correction_bias"])   # (E,)
    layer.load_state_dict(state)
    return layer


# -- moe_np -> HF -----------------------------------------------------------------------------

def _require(arch: str, name: str, value, allowed, why: str) -> None:
    if value not in allowed:
        raise ValueError(f"to_hf: {arch} cannot represent {name}={value!r} ({why})")


def _check_common(arch: str, c: SparseConfig) -> None:
    """Settings no HF block here has a field for (training-only ones included)."""
    if c.capacity_factor is not None and arch != "switch_transformers":
        raise ValueError(f"to_hf: {arch} cannot represent capacity_factor={c.capacity_factor} "
                         "(HF's block is dropless)")
    for name in ("z_coef", "seq_aux_coef", "bias_gamma", "cv_coef"):
        if getattr(c, name) and not (arch == "switch_transformers" and name == "z_coef"):
            raise ValueError(f"to_hf: {arch} has no config field for {name}={getattr(c, name)}; build the "
                             f"layer from dataclasses.replace(config, {name}=0.0) and load its state dict")
    if c.jitter and arch != "switch_transformers":
        raise ValueError(f"to_hf: {arch} cannot represent jitter={c.jitter} (moe_np jitters the router's "
                         "input only; HF Mixtral jitters the experts' input too, Qwen2/DeepSeek-V3 not at all)")


def _check_representable(arch: str, layer: SparseMoE) -> None:
    c = layer.config
    _check_common(arch, c)
    swiglu = arch != "switch_transformers"
    _require(arch, "expert", c.expert, ("swiglu",) if swiglu else ("mlp",), "the HF experts' kind")
    routers = {"mixtral": ("softmax_topk", "topk_softmax"),
               "qwen2_moe": ("softmax_topk", "topk_softmax", "softmax_topk_raw"),
               "deepseek_v3": ("sigmoid_bias",), "switch_transformers": ("switch",)}[arch]
    _require(arch, "router", c.router, routers, "the HF router")
    if arch == "deepseek_v3":
        if c.num_shared < 1:
            raise ValueError("to_hf: deepseek_v3 cannot represent num_shared=0 (HF's block always has "
                             "shared_experts)")
        _require(arch, "d_hidden_shared", c.d_hidden_shared, (None, c.d_hidden),
                 "HF's shared width is n_shared_experts x moe_intermediate_size")
    else:
        _require(arch, "num_shared", c.num_shared, (int(arch == "qwen2_moe"),),
                 "the HF block's shared experts")
    _require(arch, "shared_gate", c.shared_gate, (arch == "qwen2_moe",), "Qwen2's sigmoid gate")
    if not swiglu:
        _check_switch(layer)


def _check_switch(layer: SparseMoE) -> None:
    c, arch = layer.config, "switch_transformers"
    _require(arch, "capacity_scope", c.capacity_scope, ("sequence",),
             "HF counts a fixed expert_capacity per sequence; set capacity_scope='sequence' and seq_len")
    _require(arch, "drop_policy", c.drop_policy, ("position",), "HF fills slots in token order")
    for name in ("b1", "b2"):
        if np.any(layer.params[name]):
            raise ValueError(f"to_hf: switch_transformers experts have no biases, but {name} has "
                             f"{np.count_nonzero(layer.params[name])} non-zero entries")


def _hf_config(arch: str, c: SparseConfig) -> dict:
    """The HF config fields of CONFIG_FIELDS[arch], from a layer's config."""
    if arch == "switch_transformers":
        cap = dispatch.capacity(c.seq_len, c.num_experts, 1, c.capacity_factor, c.min_capacity)
        return {"d_model": c.d_model, "d_ff": c.d_hidden, "num_experts": c.num_experts,
                "expert_capacity": cap, "router_bias": False, "dense_act_fn": "relu",
                "router_jitter_noise": c.jitter, "router_aux_loss_coef": c.balance_coef,
                "router_z_loss_coef": c.z_coef}
    common = {"hidden_size": c.d_model, "num_experts_per_tok": c.k, "hidden_act": "silu"}
    if arch == "mixtral":
        return common | {"intermediate_size": c.d_hidden, "num_local_experts": c.num_experts,
                         "router_aux_loss_coef": c.balance_coef / c.k, "router_jitter_noise": 0.0}
    if arch == "qwen2_moe":
        return common | {"moe_intermediate_size": c.d_hidden, "num_experts": c.num_experts,
                         "shared_expert_intermediate_size": c.d_hidden_shared or c.d_hidden,
                         "norm_topk_prob": c.router != "softmax_topk_raw",
                         "router_aux_loss_coef": c.balance_coef / c.k}
    return common | {"moe_intermediate_size": c.d_hidden, "n_routed_experts": c.num_experts,
                     "n_group": c.n_group, "topk_group": c.topk_group, "norm_topk_prob": c.norm_topk_prob,
                     "routed_scaling_factor": c.routed_scaling_factor, "n_shared_experts": c.num_shared}


def _routed_to_hf(arch: str, p: dict, style: str) -> dict:
    """The routed experts' HF keys (inverse of _routed_from_hf)."""
    if arch == "switch_transformers":
        return {key: w for i in range(len(p["w1"]))
                for key, w in ((f"experts.expert_{i}.wi.weight", _t(p["w1"][i])),    # (H, D)
                               (f"experts.expert_{i}.wo.weight", _t(p["w2"][i])))}   # (D, H)
    if style == "fused":
        return {"experts.gate_up_proj": _t(np.concatenate([p["w_gate"], p["w_up"]], axis=2)),   # (E, 2H, D)
                "experts.down_proj": _t(p["w_down"])}                  # (E, D, H)
    gate, up, down = SWIGLU_NAMES[arch]
    out = {}
    for i in range(len(p["w_gate"])):
        out |= {f"experts.{i}.{gate}.weight": _t(p["w_gate"][i]),    # (H, D)
                f"experts.{i}.{up}.weight": _t(p["w_up"][i]),        # (H, D)
                f"experts.{i}.{down}.weight": _t(p["w_down"][i])}    # (D, H)
    return out


def _shared_to_hf(arch: str, p: dict) -> dict:
    """S stacked shared experts -> HF's one shared MLP of width S Hs (inverse of _shared_from_hf)."""
    s, d, hs = p["shared_w_gate"].shape
    pre = SHARED_PREFIX[arch]
    out = {pre + "gate_proj.weight": _t(p["shared_w_gate"]).reshape(s * hs, d),   # (S Hs, D)
           pre + "up_proj.weight": _t(p["shared_w_up"]).reshape(s * hs, d),       # (S Hs, D)
           pre + "down_proj.weight": _t(p["shared_w_down"].reshape(s * hs, d))}   # (D, S Hs)
    if arch == "qwen2_moe":
        out["shared_expert_gate.weight"] = _t(p["w_shared_gate"])     # (1, D)
    return out


def to_hf(arch: str, layer: SparseMoE, style: str = "fused") -> tuple[dict, dict]:
    """(state_dict, config): the HF block's keys -> arrays (copies, the layer's dtype) and
    the HF config fields, for a layer HF can represent; ValueError naming the first setting
    it cannot. style: "fused" (experts.gate_up_proj / down_proj) or "per_expert";
    switch_transformers has only the per-expert layout. The dispatch strategy and the
    PrecisionConfig say how moe_np computes, not what; they are not exported.
    """
    _check_arch("to_hf", arch)
    _check_style("to_hf", arch, style)
    if not isinstance(layer, SparseMoE):
        raise ValueError(f"to_hf: layer must be a SparseMoE, got {type(layer).__name__}")
    _check_representable(arch, layer)
    p = layer.params
    router_key = "router.classifier.weight" if arch == "switch_transformers" else "gate.weight"
    sd = {router_key: _t(p["w_router"])}                               # (E, D)
    sd |= _routed_to_hf(arch, p, style)
    if arch in SHARED_PREFIX:
        sd |= _shared_to_hf(arch, p)
    if arch == "deepseek_v3":
        sd["gate.e_score_correction_bias"] = layer.buffers["selection_bias"].copy()   # (E,)
    return sd, _hf_config(arch, layer.config)
