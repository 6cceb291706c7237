"""A Rosetta to HF transformers: a sparse-MoE block's state dict and config <-> SparseMoE.

    layer = from_hf(arch, state_dict, config, *, seq_len=None)
    state_dict, config = to_hf(arch, layer, style=None)

arch is "mixtral", "qwen2_moe", "deepseek_v3" or "switch_transformers";
state_dict is the MoE block's own state_dict() (keys relative to the block:
"gate.weight", not "model.layers.3.mlp.gate.weight") as NumPy arrays, and
config is the HF config's fields as a plain dict. Nothing here imports
torch or transformers.

Every difference between the architectures is a row of ARCH (an Arch):
key names, layouts, config fields and the SparseConfig settings they set.
from_hf and to_hf read the row and have no per-model branch; a new
architecture is a new row.

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
    shared_w_* (U, ., .)    Qwen2: shared_expert.{gate,up,down}_proj; DeepSeek-V3:
                            shared_experts.* with the U experts side by side (width U H)
    w_shared_gate (D, 1)    shared_expert_gate.weight (1, D)   (Qwen2)
    w1, w2 (E, D, H), (E, H, D)   Switch: router.classifier.weight (E, D),
                            experts.expert_{e}.wi.weight (H, D), experts.expert_{e}.wo.weight (D, H)

Mixtral's w1 is the gate, w3 the up, w2 the down projection. Switch's
experts have no biases: from_hf sets b1 = b2 = 0, to_hf refuses non-zero
ones. to_hf writes each architecture's own layout unless told: fused for
the SwiGLU models (current releases), per-expert for Switch (its only one).

Two conventions are converted, not copied. HF's balance loss counts a
token's K choices over N tokens (K at balance), moe_np's over N K (1 at
balance), so HF's router_aux_loss_coef a is balance_coef = a K (Switch has
K = 1). Switch's load_balancing_loss_func takes its means within each
sequence and averages the per-sequence losses (every release), so from_hf
sets balance_scope="sequence" for it and its aux loss is HF's.

In float64 a layer built here computes HF's forward to rounding, with
one exception: HF computes the router in float32 even in a float64 model
(Mixtral `router_logits.float()`, Qwen2 `softmax(dtype=torch.float)`,
DeepSeek-V3 casts its input and weight, Switch `router_dtype`), so its
routing weights carry float32 rounding (~1e-7 relative) that moe_np's do
not. Smaller differences, each with the transformers releases it describes:

  DeepSeek-V3   every release adds 1e-20 to the weights' denominator. 4.x
                masks the ineligible groups' scores with 0 before the top-K
                (what moe_np's -inf picks while biased scores are positive);
                current releases (5.x) mask with -inf, as moe_np does.
  Switch        4.x before PR #37123 (spring 2025) returns p * x for a dropped
                token (its input, scaled); releases since return 0, as moe_np.
                5.0's refactor handed the router (N, D), so its slot count ran
                over a length-1 axis and dropped nothing, until PR #48421 (2026)
                counted per sequence again. 4.x's balance loss counts a dropped
                token as expert 0 (the argmax of its all-zero mask row); moe_np
                counts each choice before capacity: equal when nothing drops.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from moe_np import dispatch
from moe_np.config import SparseConfig
from moe_np.interop.fields import REQUIRED, hf_value
from moe_np.sparse import SparseMoE

STYLES = ("fused", "per_expert")


class Field(NamedTuple):
    """One HF config field."""
    kind: str              # size | flag | coef | str: what a valid value is
    default: object        # HF's class default, or REQUIRED (fields that change the forward)
    target: str | None     # the SparseConfig field it sets; None: checked (ARCH.refused), not kept


class Arch(NamedTuple):
    """One HF architecture: everything from_hf and to_hf need to know about it."""
    fields: dict                  # HF config field -> Field, in the order they are checked
    fixed: dict                   # SparseConfig settings the HF block always has
    refused: dict                 # HF field -> (the one value moe_np can represent, why)
    routers: tuple                # moe_np routers that compute what the HF router does
    router_key: str               # the router's nn.Linear weight, (E, D)
    experts: dict                 # moe_np expert matrix -> HF per-expert key ({e}: the expert)
    fused: tuple | None           # HF's fused (gate_up, down) keys; None: never fused
    own_style: str                # the layout to_hf writes unless told
    shared_prefix: str | None = None     # the shared experts' one MLP (U side by side), or None
    shared_count: str | None = None      # HF field counting them; None: exactly one (if shared_prefix)
    shared_gate_key: str | None = None   # a sigmoid gate on the shared output (Qwen2), or None
    bias_key: str | None = None          # the selection-bias buffer (DeepSeek-V3), or None
    zero_params: tuple = ()              # moe_np parameters HF lacks: 0 on import, must be 0 on export


def _swiglu_fields(width: str, experts: str) -> dict:
    """The fields every SwiGLU block here has, under its own names."""
    return {"hidden_size": Field("size", REQUIRED, "d_model"), width: Field("size", REQUIRED, "d_hidden"),
            experts: Field("size", REQUIRED, "num_experts"), "num_experts_per_tok": Field("size", REQUIRED, "k")}


SILU = {"hidden_act": ("silu", "cannot be represented: moe_np's SwiGLU experts need 'silu'")}
SWIGLU_FUSED = ("experts.gate_up_proj", "experts.down_proj")
PROJ = {"w_gate": "experts.{e}.gate_proj.weight", "w_up": "experts.{e}.up_proj.weight",
        "w_down": "experts.{e}.down_proj.weight"}

ARCH = {
    "mixtral": Arch(
        fields=_swiglu_fields("intermediate_size", "num_local_experts")
        | {"hidden_act": Field("str", "silu", None),
           "router_aux_loss_coef": Field("coef", 0.001, "balance_coef"),
           "router_jitter_noise": Field("coef", 0.0, None)},
        fixed={"expert": "swiglu", "router": "softmax_topk", "balance_scope": "batch"},
        refused=SILU | {"router_jitter_noise": (0.0, "scales the input of the router and the experts; "
                                                     "moe_np's jitter reaches the router only")},
        routers=("softmax_topk", "topk_softmax"), router_key="gate.weight",
        experts={"w_gate": "experts.{e}.w1.weight", "w_up": "experts.{e}.w3.weight",
                 "w_down": "experts.{e}.w2.weight"},
        fused=SWIGLU_FUSED, own_style="fused"),
    "qwen2_moe": Arch(
        fields=_swiglu_fields("moe_intermediate_size", "num_experts")
        | {"shared_expert_intermediate_size": Field("size", REQUIRED, "d_hidden_shared"),
           "norm_topk_prob": Field("flag", REQUIRED, "router"),
           "hidden_act": Field("str", "silu", None),
           "router_aux_loss_coef": Field("coef", 0.001, "balance_coef")},
        fixed={"expert": "swiglu", "num_shared": 1, "shared_gate": True, "balance_scope": "batch"},
        refused=SILU, routers=("softmax_topk", "topk_softmax", "softmax_topk_raw"),
        router_key="gate.weight", experts=PROJ, fused=SWIGLU_FUSED, own_style="fused",
        shared_prefix="shared_expert.", shared_gate_key="shared_expert_gate.weight"),
    "deepseek_v3": Arch(
        fields=_swiglu_fields("moe_intermediate_size", "n_routed_experts")
        | {"n_group": Field("size", REQUIRED, "n_group"), "topk_group": Field("size", REQUIRED, "topk_group"),
           "norm_topk_prob": Field("flag", REQUIRED, "norm_topk_prob"),
           "routed_scaling_factor": Field("coef", REQUIRED, "routed_scaling_factor"),
           "n_shared_experts": Field("size", REQUIRED, "num_shared"),
           "hidden_act": Field("str", "silu", None)},
        fixed={"expert": "swiglu", "router": "sigmoid_bias"},
        refused=SILU, routers=("sigmoid_bias",), router_key="gate.weight", experts=PROJ,
        fused=SWIGLU_FUSED, own_style="fused", shared_prefix="shared_experts.",
        shared_count="n_shared_experts", bias_key="gate.e_score_correction_bias"),
    "switch_transformers": Arch(
        fields={"d_model": Field("size", REQUIRED, "d_model"), "d_ff": Field("size", REQUIRED, "d_hidden"),
                "num_experts": Field("size", REQUIRED, "num_experts"),
                "expert_capacity": Field("size", REQUIRED, "capacity_factor"),
                "router_bias": Field("flag", False, None), "dense_act_fn": Field("str", "relu", None),
                "router_jitter_noise": Field("coef", 0.01, "jitter"),
                "router_aux_loss_coef": Field("coef", 0.001, "balance_coef"),
                "router_z_loss_coef": Field("coef", 0.001, "z_coef")},
        fixed={"expert": "mlp", "router": "switch", "k": 1, "capacity_scope": "sequence",
               "drop_policy": "position", "balance_scope": "sequence"},
        refused={"dense_act_fn": ("relu", "cannot be represented: moe_np's ReLU experts need 'relu'"),
                 "router_bias": (False, "cannot be represented: moe_np's router has no bias")},
        routers=("switch",), router_key="router.classifier.weight",
        experts={"w1": "experts.expert_{e}.wi.weight", "w2": "experts.expert_{e}.wo.weight"},
        fused=None, own_style="per_expert", zero_params=("b1", "b2")),
}
ARCHS = tuple(ARCH)
SHAPE_TARGETS = ("d_model", "d_hidden", "num_experts", "d_hidden_shared", "num_shared")
PER_EXPERT_SHAPE = {"w_gate": "DH", "w_up": "DH", "w_down": "HD", "w1": "DH", "w2": "HD"}   # moe_np's (in, out)
WHY = {"expert": "the HF experts' kind", "router": "the HF router", "num_shared": "the HF block's shared experts",
       "shared_gate": "Qwen2's sigmoid gate", "drop_policy": "HF fills slots in token order",
       "capacity_scope": "HF counts a fixed expert_capacity per sequence; set capacity_scope='sequence' and seq_len",
       "k": "the HF router's choices per token", "balance_scope": "HF's balance loss: pooled over the "
       "batch (Mixtral, Qwen2), averaged over sequences (Switch)"}


def _check_arch(fn: str, arch) -> Arch:
    if arch not in ARCH:
        raise ValueError(f"{fn}: arch must be one of {ARCHS}, got {arch!r}")
    return ARCH[arch]


def _check_style(fn: str, arch: str, style) -> str:
    """style, or the architecture's own layout for None; ValueError for a layout it never had."""
    row = ARCH[arch]
    if style is None:
        return row.own_style
    if style not in STYLES:
        raise ValueError(f"{fn}: style must be one of {STYLES} (or None: {arch}'s own), got {style!r}")
    if style == "fused" and row.fused is None:
        raise ValueError(f"{fn}: {arch} has only the per-expert layout "
                         f"({', '.join(row.experts.values())}), got style={style!r}")
    return style


# -- HF config -> SparseConfig -------------------------------------------------------------

def _field(arch: str, config: dict, name: str):
    """config[name] (or its HF default), checked against its kind."""
    kind, default, _ = ARCH[arch].fields[name]
    return hf_value(f"from_hf: {arch} config", config, name, kind, default)


def _read_config(arch: str, config: dict) -> dict:
    """The fields `arch` needs from an HF config dict, validated, HF defaults filled in, and
    every refused field at the one value moe_np represents. Other fields are ignored."""
    if not isinstance(config, dict):
        raise ValueError(f"from_hf: config must be a dict of HF config fields, got {type(config).__name__}")
    hf = {name: _field(arch, config, name) for name in ARCH[arch].fields}
    for name, (only, why) in ARCH[arch].refused.items():
        if hf[name] != only:
            raise ValueError(f"from_hf: {arch} {name}={hf[name]!r} {why}")
    return hf


def capacity_factor_for(capacity: int, num_experts: int, seq_len: int) -> float:
    """The factor f whose capacity at seq_len tokens, K = 1, is exactly `capacity`:
    ceil(f T / E) = C. f = C E / T, nudged down while rounding would give C + 1."""
    factor = capacity * num_experts / seq_len
    while dispatch.capacity(seq_len, num_experts, 1, factor) > capacity:
        factor = float(np.nextafter(factor, 0.0))
    return factor


def _from_hf_value(target: str, value, fields: dict, seq_len):
    """An HF config value as the SparseConfig field `target` holds it (the converted ones)."""
    if target == "balance_coef":          # HF's loss is K times moe_np's
        return value * fields["k"]
    if target == "router":                # Qwen2's norm_topk_prob: renormalised or raw weights
        return "softmax_topk" if value else "softmax_topk_raw"
    if target == "capacity_factor":       # expert_capacity slots per sequence of seq_len tokens
        return capacity_factor_for(value, fields["num_experts"], seq_len)
    return value


def _sparse_config(arch: str, config: dict, seq_len: int | None = None) -> SparseConfig:
    """The SparseConfig of an HF config dict (seq_len: where capacity counts per sequence)."""
    row = ARCH[arch]
    hf = _read_config(arch, config)
    capacity = next((n for n, f in row.fields.items() if f.target == "capacity_factor"), None)
    if capacity is None and seq_len is not None:
        raise ValueError(f"from_hf: seq_len={seq_len} is only used for switch_transformers' "
                         f"per-sequence capacity; {arch} has no capacity")
    if capacity is not None and seq_len is None:
        raise ValueError(f"from_hf: {arch} gives each expert {capacity}={hf[capacity]} slots per "
                         "sequence; pass seq_len=T, the sequence length of the inputs, so capacity "
                         "is counted per sequence")
    plain = {f.target: hf[n] for n, f in row.fields.items() if f.target}
    fields = dict(row.fixed) | ({"seq_len": seq_len} if capacity else {}) | plain
    fields |= {t: _from_hf_value(t, v, fields, seq_len) for t, v in plain.items()}
    try:
        return SparseConfig(**fields)
    except ValueError as err:
        raise ValueError(f"from_hf: the {arch} config does not fit moe_np: {err}") from err


# -- the HF layout: keys and shapes ---------------------------------------------------------

def _sizes_note(arch: str, config: dict) -> str:
    """Which config fields fix the shapes, e.g. 'num_local_experts=4, hidden_size=5, ...'."""
    names = [n for n, f in ARCH[arch].fields.items() if f.kind == "size" and f.target in SHAPE_TARGETS]
    return ", ".join(f"{n}={config.get(n)}" for n in names)


def hf_layout(arch: str, config: SparseConfig, style: str | None = None) -> dict:
    """key -> shape of the HF block's state dict for this layer config and style
    (None: the architecture's own layout)."""
    row = _check_arch("hf_layout", arch)
    style = _check_style("hf_layout", arch, style)
    e, d, h = config.num_experts, config.d_model, config.d_hidden
    size = {"D": d, "H": h}
    keys = {row.router_key: (e, d)}
    if style == "fused":
        keys |= {row.fused[0]: (e, 2 * h, d), row.fused[1]: (e, d, h)}
    else:
        for i in range(e):
            keys |= {key.format(e=i): tuple(size[a] for a in reversed(PER_EXPERT_SHAPE[name]))
                     for name, key in row.experts.items()}             # nn.Linear's (out, in)
    if row.bias_key:
        keys[row.bias_key] = (e,)
    if row.shared_prefix:
        width = config.num_shared * (config.d_hidden_shared or h)
        p = row.shared_prefix
        keys |= {p + "gate_proj.weight": (width, d), p + "up_proj.weight": (width, d),
                 p + "down_proj.weight": (d, width)}
    if row.shared_gate_key:
        keys[row.shared_gate_key] = (1, d)
    return keys


def _check_state_dict(arch: str, state_dict: dict, expected: dict, note: str) -> np.dtype:
    """Every expected key present with its shape, no other key, one float dtype; -> that dtype.
    note: the config fields the shapes come from (named in a shape error)."""
    if not isinstance(state_dict, dict):
        raise ValueError(f"from_hf: state_dict must be a dict of arrays, got {type(state_dict).__name__}")
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(set(state_dict) - set(expected))
    for keys, what in ((missing, "is missing key"), (unexpected, "has unexpected key")):
        if keys:
            raise ValueError(f"from_hf: {arch} state_dict {what} {keys[0]!r}"
                             + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""))
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


def _routed_from_hf(row: Arch, sd: dict, style: str, config: SparseConfig) -> dict:
    """The routed experts' parameters, stacked over experts."""
    if style == "fused":
        h = config.d_hidden
        gate_up = np.asarray(sd[row.fused[0]])                         # (E, 2H, D): gate rows, then up
        return {"w_gate": _t(gate_up[:, :h]), "w_up": _t(gate_up[:, h:]),   # (E, D, H) each
                "w_down": _t(sd[row.fused[1]])}                        # (E, H, D)
    stack = lambda key: np.stack([np.asarray(sd[key.format(e=i)]) for i in range(config.num_experts)])
    return {name: _t(stack(key)) for name, key in row.experts.items()}   # (E, in, out) each


def _shared_from_hf(row: Arch, sd: dict, config: SparseConfig) -> dict:
    """HF's one shared MLP of width U Hs -> U stacked shared experts of width Hs."""
    s, d = config.num_shared, config.d_model
    hs = config.d_hidden_shared or config.d_hidden
    p = row.shared_prefix
    params = {"shared_w_gate": _t(np.asarray(sd[p + "gate_proj.weight"]).reshape(s, hs, d)),   # (U, D, Hs)
              "shared_w_up": _t(np.asarray(sd[p + "up_proj.weight"]).reshape(s, hs, d)),       # (U, D, Hs)
              "shared_w_down": _t(sd[p + "down_proj.weight"]).reshape(s, hs, d)}               # (U, Hs, D)
    if row.shared_gate_key:
        params["w_shared_gate"] = _t(sd[row.shared_gate_key])          # (D, 1)
    return params


def from_hf(arch: str, state_dict: dict, config: dict, *, seq_len: int | None = None) -> SparseMoE:
    """A SparseMoE computing what the HF block computes, in the state dict's dtype.

    arch: one of ARCHS. state_dict: the block's own HF keys -> arrays, in
    either layout (fused or per-expert, detected from the keys). config: the
    HF config's fields (ARCH[arch].fields). seq_len: tokens per sequence,
    required for switch_transformers, whose expert_capacity counts slots per
    sequence and whose balance loss averages per-sequence losses (see the
    module docstring for the releases that count otherwise).
    Everything is checked before the layer is built.
    """
    row = _check_arch("from_hf", arch)
    sparse = _sparse_config(arch, config, seq_len)
    style = row.own_style                                              # (a non-dict is refused below)
    if isinstance(state_dict, dict):
        style = "fused" if row.fused and set(row.fused) & set(state_dict) else "per_expert"
    expected = hf_layout(arch, sparse, style)
    dtype = _check_state_dict(arch, state_dict, expected, _sizes_note(arch, config))
    params = {"w_router": _t(state_dict[row.router_key])}             # (D, E)
    params |= _routed_from_hf(row, state_dict, style, sparse)
    if row.shared_prefix:
        params |= _shared_from_hf(row, state_dict, sparse)
    layer = SparseMoE(sparse, seed=0, dtype=dtype)
    state = layer.state_dict() | params
    state |= {name: np.zeros_like(state[name]) for name in row.zero_params}
    if row.bias_key:
        state["selection_bias"] = np.array(state_dict[row.bias_key])   # (E,)
    layer.load_state_dict(state)
    return layer


# -- moe_np -> HF -----------------------------------------------------------------------------

def _require(arch: str, name: str, value, allowed, why: str) -> None:
    if value not in allowed:
        raise ValueError(f"to_hf: {arch} cannot represent {name}={value!r} ({why})")


def _check_unmapped(arch: str, c: SparseConfig) -> None:
    """Settings this HF block has no config field for (training-only ones included)."""
    targets = {f.target for f in ARCH[arch].fields.values()}
    if c.capacity_factor is not None and "capacity_factor" not in targets:
        raise ValueError(f"to_hf: {arch} cannot represent capacity_factor={c.capacity_factor} "
                         "(HF's block is dropless)")
    for name in ("z_coef", "seq_aux_coef", "bias_gamma", "cv_coef"):
        if getattr(c, name) and name not in targets:
            raise ValueError(f"to_hf: {arch} has no config field for {name}={getattr(c, name)}; build the "
                             f"layer from dataclasses.replace(config, {name}=0.0) and load its state dict")
    if c.jitter and "jitter" not in targets:
        raise ValueError(f"to_hf: {arch} cannot represent jitter={c.jitter} (moe_np jitters the router's "
                         "input only; HF Mixtral jitters the experts' input too, Qwen2/DeepSeek-V3 not at all)")


def _check_shared(arch: str, row: Arch, c: SparseConfig) -> None:
    """The shared experts HF's block has: none, exactly one (of its own width), or a count."""
    if row.shared_count is None:
        _require(arch, "num_shared", c.num_shared, (int(row.shared_prefix is not None),), WHY["num_shared"])
    else:
        if c.num_shared < 1:
            raise ValueError(f"to_hf: {arch} cannot represent num_shared=0 (HF's block always has "
                             f"{row.shared_prefix.rstrip('.')})")
        _require(arch, "d_hidden_shared", c.d_hidden_shared, (None, c.d_hidden),
                 f"HF's shared width is {row.shared_count} x the routed experts' width")
    _require(arch, "shared_gate", c.shared_gate, (row.shared_gate_key is not None,), WHY["shared_gate"])


def _check_representable(arch: str, layer: SparseMoE) -> None:
    row, c = ARCH[arch], layer.config
    _check_unmapped(arch, c)
    _require(arch, "expert", c.expert, (row.fixed["expert"],), WHY["expert"])
    _require(arch, "router", c.router, row.routers, WHY["router"])
    _check_shared(arch, row, c)
    for name in ("k", "capacity_scope", "drop_policy", "balance_scope"):
        if name in row.fixed and (name != "balance_scope" or c.balance_coef):
            _require(arch, name, getattr(c, name), (row.fixed[name],), WHY[name])
    for name in row.zero_params:
        if np.any(layer.params[name]):
            raise ValueError(f"to_hf: {arch} experts have no biases, but {name} has "
                             f"{np.count_nonzero(layer.params[name])} non-zero entries")


def _to_hf_value(target: str, c: SparseConfig):
    """The SparseConfig field `target` as the HF config holds it (inverse of _from_hf_value)."""
    if target == "balance_coef":
        return c.balance_coef / c.k
    if target == "router":
        return c.router != "softmax_topk_raw"
    if target == "capacity_factor":
        return dispatch.capacity(c.seq_len, c.num_experts, 1, c.capacity_factor, c.min_capacity)
    if target == "d_hidden_shared":
        return c.d_hidden_shared or c.d_hidden
    return getattr(c, target)


def _hf_config(arch: str, c: SparseConfig) -> dict:
    """The HF config fields of the row, from a layer's config."""
    row = ARCH[arch]
    return {name: (_to_hf_value(f.target, c) if f.target else row.refused[name][0])
            for name, f in row.fields.items()}


def _routed_to_hf(row: Arch, p: dict, style: str) -> dict:
    """The routed experts' HF keys (inverse of _routed_from_hf)."""
    if style == "fused":
        return {row.fused[0]: _t(np.concatenate([p["w_gate"], p["w_up"]], axis=2)),   # (E, 2H, D)
                row.fused[1]: _t(p["w_down"])}                         # (E, D, H)
    e = len(p[next(iter(row.experts))])
    return {key.format(e=i): _t(p[name][i]) for i in range(e)          # (out, in) each
            for name, key in row.experts.items()}


def _shared_to_hf(row: Arch, p: dict) -> dict:
    """U stacked shared experts -> HF's one shared MLP of width U Hs (inverse of _shared_from_hf)."""
    s, d, hs = p["shared_w_gate"].shape
    pre = row.shared_prefix
    out = {pre + "gate_proj.weight": _t(p["shared_w_gate"]).reshape(s * hs, d),   # (U Hs, D)
           pre + "up_proj.weight": _t(p["shared_w_up"]).reshape(s * hs, d),       # (U Hs, D)
           pre + "down_proj.weight": _t(p["shared_w_down"].reshape(s * hs, d))}   # (D, U Hs)
    if row.shared_gate_key:
        out[row.shared_gate_key] = _t(p["w_shared_gate"])             # (1, D)
    return out


def to_hf(arch: str, layer: SparseMoE, style: str | None = None) -> tuple[dict, dict]:
    """(state_dict, config): the HF block's keys -> arrays (copies, the layer's dtype) and
    the HF config fields, for a layer HF can represent; ValueError naming the first setting
    it cannot. style: "fused" (experts.gate_up_proj / down_proj), "per_expert", or None for
    the architecture's own (fused for the SwiGLU models, per-expert for Switch). The
    dispatch strategy and the PrecisionConfig say how moe_np computes, not what; they are
    not exported.
    """
    row = _check_arch("to_hf", arch)
    style = _check_style("to_hf", arch, style)
    if not isinstance(layer, SparseMoE):
        raise ValueError(f"to_hf: layer must be a SparseMoE, got {type(layer).__name__}")
    _check_representable(arch, layer)
    p = layer.params
    sd = {row.router_key: _t(p["w_router"])}                           # (E, D)
    sd |= _routed_to_hf(row, p, style)
    if row.shared_prefix:
        sd |= _shared_to_hf(row, p)
    if row.bias_key:
        sd[row.bias_key] = layer.buffers["selection_bias"].copy()      # (E,)
    return sd, _hf_config(arch, layer.config)
