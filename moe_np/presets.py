"""Presets: the routing settings of five published MoE models as SparseConfigs.

    switch(D, E, H)       Switch Transformer   top-1, raw probability, capacity 1.25, balance 1e-2
    gshard(D, E, H)       GShard               top-2 renormalised, capacity 2N/E, balance 1e-2
    mixtral(D, E, H)      Mixtral 8x7B         top-2 renormalised, dropless, SwiGLU
    qwen2_moe(D, E, H)    Qwen1.5-MoE-A2.7B    top-4 raw, dropless, sigmoid-gated shared expert
    deepseek_v3(D, E, H)  DeepSeek-V3          sigmoid + selection bias, 8 of 256 in 4 of 8 groups,
                                               x 2.5, one shared expert, sequence-wise loss

Each function takes the sizes (d_model D, num_experts E, d_hidden H) and
keyword overrides of any SparseConfig field; everything else is the
model's own setting, read from one table, MODELS: per model, its settings
grouped by the column of the side-by-side table they fill, each group with
its source, written once. Where moe_np cannot say exactly what a model does,
the docstring names the difference and the preset takes the closest setting.

Two conventions differ from HF's code and are converted here, not copied:
HF's Mixtral/Qwen2 balance loss divides the expert counts by N where
moe_np divides by N K (balance.balance_loss_forward), so HF's coefficient
a becomes balance_coef = a K; and HF pools that loss over all layers while
moe_np adds one per layer.

`preset_table()` lays the presets side by side, one row per model, every
cell a Cell(value, source) whose value is read from the preset's config and
whose source is the table's.
"""
from __future__ import annotations

from dataclasses import fields
from typing import NamedTuple

from moe_np.config import SparseConfig

_FIELDS = {f.name for f in fields(SparseConfig)}


class Times(NamedTuple):
    """A setting proportional to another field of the final config: factor x config[field]."""
    field: str
    factor: float


class Model(NamedTuple):
    """One published model: its name, its paper or release, and its settings by table column
    (plus "experts", which the table does not show): column -> (SparseConfig fields, source)."""
    model: str
    paper: str
    settings: dict


COLUMNS = ("model", "router", "K", "normalisation", "capacity", "aux losses", "shared experts",
           "scaling")
NONE = ({}, "none in the paper")

MODELS = {
    "switch": Model("Switch Transformer", "Fedus, Zoph, Shazeer 2021, Switch Transformers", {
        "router": (dict(router="switch"), "Sec. 2.1"),          # softmax over E, top-1, y = p_i(x) E_i(x)
        "K": (dict(k=1), "Sec. 2.1"),
        "normalisation": ({}, "Sec. 2.1, y = p_i(x) E_i(x)"),
        "capacity": (dict(capacity_factor=1.25, drop_policy="position"),   # slots in token order
                     "Sec. 2.2; factor from Table 1"),
        "aux losses": (dict(balance_coef=1e-2, jitter=1e-2),
                       "Sec. 2.2 (alpha = 1e-2); jitter: HF router_jitter_noise default"),
        "shared experts": NONE, "scaling": NONE,
        "experts": (dict(expert="mlp"), "T5 FFN, ReLU (HF dense_act_fn default 'relu')")}),
    "gshard": Model("GShard", "Lepikhin et al. 2020, GShard", {
        "router": (dict(router="softmax_topk"), "Sec. 2.2, Algorithm 1"),
        "K": (dict(k=2), "Sec. 2.2 (top-2 gating)"),
        "normalisation": ({}, "Algorithm 1: g1, g2 / (g1 + g2)"),
        "capacity": (dict(capacity_factor=1.0, drop_policy="position"),    # C = 2N/E = 1.0 x K N / E
                     "Sec. 2.2 (C = 2N/E); Algorithm 1: top-1 slots first"),
        "aux losses": (dict(balance_coef=1e-2), "Algorithm 1 l_aux; k = 1e-2 borrowed from Switch"),
        "shared experts": NONE, "scaling": NONE,
        "experts": (dict(expert="mlp"), "Sec. 2.2, eq. (2): FFN_e(x) = wo_e ReLU(wi_e x)")}),
    "mixtral": Model("Mixtral 8x7B", "Jiang et al. 2024, Mixtral of Experts", {
        "router": (dict(router="softmax_topk"), "paper Sec. 2.1; HF MixtralTopKRouter"),
        "K": (dict(k=2), "config.json num_experts_per_tok"),
        "normalisation": ({}, "Softmax(TopK(x W_g)): paper Sec. 2.1"),
        "capacity": (dict(capacity_factor=None), "HF MixtralSparseMoeBlock: no dropped tokens"),
        "aux losses": (dict(balance_coef=Times("k", 0.02)), "config.json router_aux_loss_coef 0.02, x K"),
        "shared experts": ({}, "none"), "scaling": ({}, "none"),
        "experts": (dict(expert="swiglu"), "paper Sec. 2.1; w1 gate, w3 up, w2 down")}),
    "qwen2_moe": Model("Qwen1.5-MoE-A2.7B", "Qwen team 2024; HF Qwen2MoeConfig", {
        "router": (dict(router="softmax_topk_raw"), "HF Qwen2MoeTopKRouter"),
        "K": (dict(k=4), "HF Qwen2MoeConfig num_experts_per_tok"),
        "normalisation": ({}, "HF Qwen2MoeConfig norm_topk_prob = False"),
        "capacity": (dict(capacity_factor=None), "HF Qwen2MoeSparseMoeBlock: every token computed"),
        "aux losses": (dict(balance_coef=Times("k", 0.001)), "HF router_aux_loss_coef 0.001, x K"),
        "shared experts": (dict(num_shared=1, d_hidden_shared=Times("d_hidden", 4), shared_gate=True),
                           "HF shared_expert (5632 = 4 x 1408) and shared_expert_gate"),
        "scaling": ({}, "none"),
        "experts": (dict(expert="swiglu"), "HF Qwen2MoeMLP: down(silu(gate x) * up x)")}),
    "deepseek_v3": Model("DeepSeek-V3", "DeepSeek-AI 2024, DeepSeek-V3 Technical Report", {
        "router": (dict(router="sigmoid_bias", n_group=8, topk_group=4), "Sec. 2.1.2; HF n_group, topk_group"),
        "K": (dict(k=8), "Sec. 4.2"),
        "normalisation": (dict(norm_topk_prob=True), "Sec. 2.1.2; HF norm_topk_prob = True"),
        "capacity": (dict(capacity_factor=None), "Sec. 2.1.2: no token dropping"),
        "aux losses": (dict(bias_gamma=1e-3, bias_update="sign", seq_aux_coef=1e-4),
                       "Sec. 4.2: gamma = 0.001, alpha = 0.0001"),
        "shared experts": (dict(num_shared=1), "Sec. 4.2; HF n_shared_experts = 1"),
        "scaling": (dict(routed_scaling_factor=2.5), "HF routed_scaling_factor default"),
        "experts": (dict(expert="swiglu"), "HF DeepseekV3MLP: down(silu(gate x) * up x)")}),
}


def _build(fn: str, sizes: dict, overrides: dict) -> SparseConfig:
    """SparseConfig of the model's settings, the sizes and the overrides (which win); a Times
    setting is resolved against the final config. Unknown override names are refused by name."""
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise ValueError(f"{fn}: unknown override {unknown[0]!r}; the overrides are SparseConfig "
                         f"fields ({', '.join(sorted(_FIELDS))})")
    base = sizes | {k: v for group, _ in MODELS[fn].settings.values() for k, v in group.items()}
    final = base | overrides
    resolved = {k: v.factor * final[v.field] if isinstance(v, Times) else v for k, v in base.items()}
    return SparseConfig(**(resolved | overrides))


def switch(d_model: int, num_experts: int, d_hidden: int, **overrides) -> SparseConfig:
    """Switch Transformer (Fedus, Zoph and Shazeer, 2021).

    Exact: top-1 of a softmax over all experts, weighted by the raw
    probability; ReLU experts; capacity factor 1.25 with overflow dropped in
    token order; balance loss 1e-2; multiplicative router jitter 1e-2.
    Not exact: Switch counts capacity per group of tokens (HF: per
    sequence); the preset counts it per call; pass capacity_scope="sequence"
    and seq_len for HF's rule. moe_np's ReLU experts carry biases (start at
    zero), Switch's have none. No z-loss: that came later with ST-MoE
    (Zoph et al. 2022, c_z = 1e-3); add z_coef=1e-3 for it.
    """
    return _build("switch", dict(d_model=d_model, num_experts=num_experts, d_hidden=d_hidden), overrides)


def gshard(d_model: int, num_experts: int, d_hidden: int, **overrides) -> SparseConfig:
    """GShard (Lepikhin et al., 2020), top-2 gating.

    Exact: softmax over all experts, the two best, weights g1, g2 divided by
    g1 + g2; ReLU experts; capacity C = 2N/E (factor 1 at K = 2), first
    choices claim slots before second choices, each in token order.
    Not exact: GShard sends a token to its second expert only with
    probability proportional to g2 (random routing); moe_np always sends it.
    GShard's c_e counts first choices only, moe_np's f counts both. Capacity
    is per local group of S tokens in GShard, per call here. The loss
    multiplier k of L = l_nll + k l_aux is a hyper-parameter in the paper;
    1e-2 is Switch's alpha for the same loss, not a GShard-stated value.
    """
    return _build("gshard", dict(d_model=d_model, num_experts=num_experts, d_hidden=d_hidden), overrides)


def mixtral(d_model: int, num_experts: int, d_hidden: int, **overrides) -> SparseConfig:
    """Mixtral 8x7B (Jiang et al., 2024).

    Exact: softmax over all experts, top-2, renormalised (equal to the
    paper's Softmax(TopK(x W_g))); SwiGLU experts; no capacity, no drops.
    The balance loss: mistralai/Mixtral-8x7B-v0.1 ships
    router_aux_loss_coef = 0.02 (HF's class default is 0.001); HF's loss is
    K times moe_np's, so balance_coef = 0.02 K. Not exact: HF pools the loss
    over all layers' logits. HF's router_jitter_noise (default 0) scales the
    input of the router *and* the experts; moe_np's jitter reaches the
    router only, so it stays 0 here.
    """
    return _build("mixtral", dict(d_model=d_model, num_experts=num_experts, d_hidden=d_hidden), overrides)


def qwen2_moe(d_model: int, num_experts: int, d_hidden: int, **overrides) -> SparseConfig:
    """Qwen1.5-MoE-A2.7B, HF's Qwen2MoeConfig defaults (60 experts, top-4, H = 1408).

    Exact: softmax over all experts, top-4, raw probabilities
    (norm_topk_prob = False); SwiGLU experts; dropless; one shared SwiGLU
    expert of width 4 H (shared_expert_intermediate_size 5632 = 4 x 1408),
    its output times sigmoid(x w_shared_gate); balance loss
    router_aux_loss_coef 0.001, times K = 4 for moe_np's f (see mixtral).
    Not exact: HF pools the balance loss over all layers.
    """
    return _build("qwen2_moe", dict(d_model=d_model, num_experts=num_experts, d_hidden=d_hidden), overrides)


def deepseek_v3(d_model: int, num_experts: int, d_hidden: int, **overrides) -> SparseConfig:
    """DeepSeek-V3 (DeepSeek-AI, 2024; HF DeepseekV3Config defaults).

    Exact: sigmoid scores; a selection-only bias updated by
    b_i += gamma sign(mean load - load_i) with gamma = 1e-3; 8 routed experts
    chosen within the 4 best of 8 groups (a group scores the sum of its two
    best biased scores); weights s / sum s over the 8, times 2.5; one shared
    SwiGLU expert as wide as a routed one; no token dropping; the
    complementary sequence-wise balance loss with alpha = 1e-4. That loss is
    defined per sequence, so pass seq_len=T (DeepSeek-V3 pre-trains at
    T = 4096) or seq_aux_coef=0.0.
    Not exact: the paper updates the bias once per training step, moe_np on
    every training forward; gamma drops to 0 for the last 500B tokens.
    Groups are the paper's nodes (at most M = 4 nodes per token); E must be
    divisible by n_group = 8, and K = 8 needs at least 2 experts per group.
    """
    if overrides.get("seq_aux_coef", 1e-4) and overrides.get("seq_len") is None:
        raise ValueError("deepseek_v3: the sequence-wise balance loss (alpha = 1e-4) is computed per "
                         "sequence; pass seq_len=T, or seq_aux_coef=0.0 to leave it out")
    return _build("deepseek_v3", dict(d_model=d_model, num_experts=num_experts, d_hidden=d_hidden), overrides)


PRESETS = {"switch": switch, "gshard": gshard, "mixtral": mixtral, "qwen2_moe": qwen2_moe,
           "deepseek_v3": deepseek_v3}


# -- the side-by-side table ----------------------------------------------------------------

class Cell(NamedTuple):
    value: str     # what the preset's config says, in words
    source: str    # where the setting comes from


def _router_words(c: SparseConfig) -> str:
    if c.router == "sigmoid_bias":
        groups = f", top-{c.k} within the best {c.topk_group} of {c.n_group} groups" if c.n_group > 1 else ""
        return f"sigmoid + selection bias{groups} ({c.router})"
    return f"softmax over E, top-{c.k} ({c.router})"


def _normalisation_words(c: SparseConfig) -> str:
    if c.router == "sigmoid_bias":
        return "s / sum of the K selected s" if c.norm_topk_prob else "raw sigmoid score"
    if c.router in ("softmax_topk", "topk_softmax"):
        return "renormalised over the K selected"
    return "raw softmax probability"


def _capacity_words(c: SparseConfig) -> str:
    if c.capacity_factor is None:
        return "dropless"
    return f"C = ceil({c.capacity_factor:g} K N / E), drop by {c.drop_policy}"


def _aux_words(c: SparseConfig) -> str:
    terms = [(c.balance_coef, "balance"), (c.z_coef, "z"), (c.seq_aux_coef, "sequence-wise"),
             (c.bias_gamma, "bias step"), (c.jitter, "jitter")]
    said = [f"{name} {value:g}" for value, name in terms if value]
    return ", ".join(said) or "none"


def _shared_words(c: SparseConfig) -> str:
    if not c.num_shared:
        return "none"
    ratio = (c.d_hidden_shared or c.d_hidden) / c.d_hidden
    width = "H" if ratio == 1 else f"{ratio:g} H"
    return f"{c.num_shared} of width {width}" + (", sigmoid gate" if c.shared_gate else "")


def preset_row(name: str, config: SparseConfig) -> dict:
    """One table row: column -> Cell(value, source), values read from `config`."""
    if name not in PRESETS:
        raise ValueError(f"preset_row: name must be one of {tuple(PRESETS)}, got {name!r}")
    values = {"model": MODELS[name].model, "router": _router_words(config), "K": str(config.k),
              "normalisation": _normalisation_words(config), "capacity": _capacity_words(config),
              "aux losses": _aux_words(config), "shared experts": _shared_words(config),
              "scaling": f"x {config.routed_scaling_factor:g}"}
    sources = {"model": MODELS[name].paper} | {col: MODELS[name].settings[col][1] for col in COLUMNS[1:]}
    return {col: Cell(values[col], sources[col]) for col in COLUMNS}


def preset_table() -> list[dict]:
    """Every preset side by side: a list of rows, each column -> Cell(value, source).

    Built at nominal sizes D = 16, E = 16, H = 32 (seq_len 64 for
    DeepSeek-V3's sequence-wise loss); no column depends on them.
    """
    sizes = dict(d_model=16, num_experts=16, d_hidden=32)
    configs = {name: fn(**sizes, **({"seq_len": 64} if name == "deepseek_v3" else {}))
               for name, fn in PRESETS.items()}
    return [preset_row(name, config) for name, config in configs.items()]
