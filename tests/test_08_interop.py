"""Chapter 8: the presets of five published models, and the Rosetta to HF transformers.

The HF-style state dicts are built here, from HF's key names and shapes, and the reference
forwards are written here from the formulas of HF's modeling_mixtral.py, modeling_qwen2_moe.py,
modeling_deepseek_v3.py and modeling_switch_transformers.py (x W^T for every nn.Linear), in
float64 throughout. No torch, no transformers.
"""
from dataclasses import replace
from itertools import product

import numpy as np
import pytest

from moe_np import SparseConfig, SparseMoE, interop, presets

MIXTRAL = dict(hidden_size=5, intermediate_size=6, num_local_experts=4, num_experts_per_tok=2,
               router_aux_loss_coef=0.02, vocab_size=32000)            # vocab_size: ignored
QWEN2 = dict(hidden_size=5, moe_intermediate_size=4, num_experts=6, num_experts_per_tok=3,
             shared_expert_intermediate_size=7, norm_topk_prob=False, router_aux_loss_coef=0.001)
DEEPSEEK = dict(hidden_size=5, moe_intermediate_size=4, n_routed_experts=8, num_experts_per_tok=3,
                n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                n_shared_experts=2)
SWITCH = dict(d_model=5, d_ff=6, num_experts=4, expert_capacity=2, router_jitter_noise=0.01,
              router_aux_loss_coef=0.001, router_z_loss_coef=0.001)
CONFIGS = {"mixtral": MIXTRAL, "qwen2_moe": QWEN2, "deepseek_v3": DEEPSEEK,
           "switch_transformers": SWITCH}
NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
         "deepseek_v3": ("gate_proj", "up_proj", "down_proj")}          # gate, up, down
CASES = [(a, s) for a, s in product(CONFIGS, ("fused", "per_expert"))
         if not (a == "switch_transformers" and s == "fused")]
SEQ_LEN = 6                                                           # Switch: tokens per sequence


# -- HF-style state dicts, by HF's names and shapes ------------------------------------------

def swiglu_experts(style, names, e, d, h, w):
    if style == "fused":
        return {"experts.gate_up_proj": w(e, 2 * h, d), "experts.down_proj": w(e, d, h)}
    gate, up, down = names
    return {f"experts.{i}.{n}.weight": w(*shape) for i in range(e)
            for n, shape in ((gate, (h, d)), (up, (h, d)), (down, (d, h)))}


def mlp_keys(prefix, d, width, w):
    return {prefix + "gate_proj.weight": w(width, d), prefix + "up_proj.weight": w(width, d),
            prefix + "down_proj.weight": w(d, width)}


def hf_state_dict(arch, style, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    w = lambda *shape: (0.5 * rng.standard_normal(shape)).astype(dtype)
    c = CONFIGS[arch]
    if arch == "switch_transformers":
        e, d, h = c["num_experts"], c["d_model"], c["d_ff"]
        sd = {"router.classifier.weight": w(e, d)}
        for i in range(e):
            sd |= {f"experts.expert_{i}.wi.weight": w(h, d), f"experts.expert_{i}.wo.weight": w(d, h)}
        return sd
    d = c["hidden_size"]
    if arch == "mixtral":
        return {"gate.weight": w(c["num_local_experts"], d)} | swiglu_experts(
            style, NAMES[arch], c["num_local_experts"], d, c["intermediate_size"], w)
    e, h = (c["num_experts"], c["moe_intermediate_size"]) if arch == "qwen2_moe" else \
        (c["n_routed_experts"], c["moe_intermediate_size"])
    sd = {"gate.weight": w(e, d)} | swiglu_experts(style, NAMES[arch], e, d, h, w)
    if arch == "qwen2_moe":
        return sd | mlp_keys("shared_expert.", d, c["shared_expert_intermediate_size"], w) \
            | {"shared_expert_gate.weight": w(1, d)}
    bias = rng.uniform(0.0, 0.3, e).astype(dtype)    # >= 0: HF's masked_fill(0.0) picks as -inf would
    return sd | {"gate.e_score_correction_bias": bias} | mlp_keys("shared_experts.", d, h * c["n_shared_experts"], w)


# -- HF's forwards, from its formulas --------------------------------------------------------

def linear(x, weight):
    return x @ weight.T                                               # nn.Linear, no bias


def softmax(z):
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def silu(z):
    return z * sigmoid(z)


def mlp(sd, prefix, x):
    """Qwen2MoeMLP / DeepseekV3MLP: down_proj(act(gate_proj(x)) * up_proj(x))."""
    return linear(silu(linear(x, sd[prefix + "gate_proj.weight"])) * linear(x, sd[prefix + "up_proj.weight"]),
                  sd[prefix + "down_proj.weight"])


def expert(sd, arch, style, e, x):
    """Routed expert e on rows x. Fused: gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1)."""
    if style == "fused":
        gate, up = np.split(linear(x, sd["experts.gate_up_proj"][e]), 2, axis=-1)
        return linear(silu(gate) * up, sd["experts.down_proj"][e])
    gate, up, down = NAMES[arch]
    return linear(silu(linear(x, sd[f"experts.{e}.{gate}.weight"])) * linear(x, sd[f"experts.{e}.{up}.weight"]),
                  sd[f"experts.{e}.{down}.weight"])


def combine(sd, arch, style, x, ids, weights):
    """final[n] += weights[n, j] * expert_{ids[n, j]}(x[n]): the index_add_ loop."""
    out = np.zeros_like(x)
    for e in np.unique(ids):
        token, slot = np.nonzero(ids == e)
        out[token] += expert(sd, arch, style, e, x[token]) * weights[token, slot, None]
    return out


def top_k(scores, k):
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def hf_mixtral(sd, style, x, c=MIXTRAL, router_dtype=np.float64):
    """MixtralTopKRouter: softmax over all, top-k, divide by their sum; router_dtype float32 is
    what HF's `router_logits.float()` does."""
    probs = softmax(linear(x, sd["gate.weight"]).astype(router_dtype))
    ids = top_k(probs, c["num_experts_per_tok"])
    top = np.take_along_axis(probs, ids, axis=1)
    return combine(sd, "mixtral", style, x, ids, (top / top.sum(1, keepdims=True)).astype(x.dtype))


def hf_qwen2(sd, style, x, c=QWEN2):
    """Qwen2MoeTopKRouter (renormalised only if norm_topk_prob) + sigmoid-gated shared expert."""
    probs = softmax(linear(x, sd["gate.weight"]))
    ids = top_k(probs, c["num_experts_per_tok"])
    top = np.take_along_axis(probs, ids, axis=1)
    if c["norm_topk_prob"]:
        top = top / top.sum(1, keepdims=True)
    shared = sigmoid(linear(x, sd["shared_expert_gate.weight"])) * mlp(sd, "shared_expert.", x)
    return combine(sd, "qwen2_moe", style, x, ids, top) + shared


def hf_deepseek_ids(sd, x, c=DEEPSEEK):
    """DeepseekV3 route_tokens_to_experts: sigmoid, + bias for choice, group = sum of its top 2,
    keep topk_group groups, masked_fill(0.0) elsewhere, top-k."""
    scores = sigmoid(linear(x, sd["gate.weight"]))
    choice = scores + sd["gate.e_score_correction_bias"]
    n, e = choice.shape
    g = c["n_group"]
    group_scores = np.sort(choice.reshape(n, g, e // g), axis=2)[:, :, -2:].sum(axis=2)
    group_mask = np.zeros((n, g))
    np.put_along_axis(group_mask, top_k(group_scores, c["topk_group"]), 1.0, axis=1)
    score_mask = np.repeat(group_mask, e // g, axis=1).astype(bool)
    return scores, top_k(np.where(score_mask, choice, 0.0), c["num_experts_per_tok"])


def hf_deepseek(sd, style, x, c=DEEPSEEK):
    scores, ids = hf_deepseek_ids(sd, x, c)
    weights = np.take_along_axis(scores, ids, axis=1)
    if c["norm_topk_prob"]:
        weights = weights / (weights.sum(1, keepdims=True) + 1e-20)
    weights = weights * c["routed_scaling_factor"]
    return combine(sd, "deepseek_v3", style, x, ids, weights) + mlp(sd, "shared_experts.", x)


def hf_switch(sd, x, c=SWITCH, seq_len=SEQ_LEN):
    """SwitchTransformersSparseMLP (transformers 4.x before PR #37123): argmax of the softmax,
    capacity counted by a cumsum over each sequence, dropped tokens keep their input;
    output = p_max * next_states. Returns (y (N, D), kept (N,) bool)."""
    x3 = x.reshape(-1, seq_len, x.shape[1])                           # (B, T, D)
    probs = softmax(linear(x3, sd["router.classifier.weight"]))         # (B, T, E)
    onehot = np.eye(c["num_experts"])[probs.argmax(-1)]                # (B, T, E)
    mask = onehot * (np.cumsum(onehot, axis=1) <= c["expert_capacity"])
    next_states = x3.copy()
    for e in range(c["num_experts"]):
        sel = mask[:, :, e].astype(bool)
        hidden = np.maximum(linear(x3[sel], sd[f"experts.expert_{e}.wi.weight"]), 0)
        next_states[sel] = linear(hidden, sd[f"experts.expert_{e}.wo.weight"])
    y = probs.max(-1, keepdims=True) * next_states
    return y.reshape(x.shape), mask.any(-1).reshape(-1)


def hf_switch_aux(sd, x, c=SWITCH, seq_len=SEQ_LEN, count_dropped_as_zero=True):
    """router_aux_loss_coef * load_balancing_loss_func + router_z_loss_coef * router_z_loss_func
    (transformers 4.x): per sequence ("group"), the fraction of tokens per expert times the mean
    probability, averaged over sequences and experts, times E^2. The expert index is the argmax of
    the capacity-masked one-hot, so a dropped token counts as expert 0 (count_dropped_as_zero)."""
    logits = linear(x.reshape(-1, seq_len, x.shape[1]), sd["router.classifier.weight"])   # (B, T, E)
    probs, e = softmax(logits), c["num_experts"]
    onehot = np.eye(e)[probs.argmax(-1)]                               # (B, T, E)
    if count_dropped_as_zero:
        onehot = np.eye(e)[(onehot * (np.cumsum(onehot, axis=1) <= c["expert_capacity"])).argmax(-1)]
    balance = np.mean(onehot.mean(axis=1) * probs.mean(axis=1)) * e**2
    lse = np.log(np.exp(logits).sum(-1))                               # (B, T)
    return c["router_aux_loss_coef"] * balance + c["router_z_loss_coef"] * np.mean(lse**2)


HF_FORWARD = {"mixtral": hf_mixtral, "qwen2_moe": hf_qwen2, "deepseek_v3": hf_deepseek}


def build(arch, style, **kw):
    sd = hf_state_dict(arch, style, **kw)
    extra = {"seq_len": SEQ_LEN} if arch == "switch_transformers" else {}
    return sd, interop.from_hf(arch, sd, CONFIGS[arch], **extra)


def tokens(n=12, d=5, seed=1):
    return np.random.default_rng(seed).standard_normal((n, d))


# -- round trips -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch, style", CASES)
def test_from_hf_then_to_hf_returns_every_key_bit_for_bit(arch, style):
    sd, layer = build(arch, style)
    back, config = interop.to_hf(arch, layer, style)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].flags.c_contiguous
        assert np.array_equal(back[key], value), key
    given = {k: v for k, v in CONFIGS[arch].items() if k != "vocab_size"}
    assert {k: config[k] for k in given} == pytest.approx(given, rel=1e-15)


def test_round_trip_keeps_float32_and_the_config_defaults():
    sd, layer = build("qwen2_moe", "per_expert", dtype=np.float32)
    assert layer.dtype == np.float32 and layer.params["w_router"].dtype == np.float32
    back, config = interop.to_hf("qwen2_moe", layer, "per_expert")
    assert all(np.array_equal(back[k], sd[k]) and back[k].dtype == np.float32 for k in sd)
    _, defaults = interop.to_hf("mixtral", interop.from_hf("mixtral", hf_state_dict("mixtral", "fused"),
                                                            {**MIXTRAL, "router_aux_loss_coef": 0.001}))
    assert defaults["router_aux_loss_coef"] == 0.001 and defaults["hidden_act"] == "silu"


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_the_two_layouts_hold_the_same_weights(arch):
    """fused -> layer -> per_expert -> layer: the same parameters (gate rows first in gate_up_proj)."""
    _, fused = build(arch, "fused")
    per_expert, _ = interop.to_hf(arch, fused, "per_expert")
    again = interop.from_hf(arch, per_expert, CONFIGS[arch])
    assert all(np.array_equal(fused.params[k], again.params[k]) for k in fused.params)
    gate, _, _ = NAMES[arch]
    h = fused.config.d_hidden
    fused_sd, _ = interop.to_hf(arch, fused, "fused")
    assert np.array_equal(fused_sd["experts.gate_up_proj"][1, :h], per_expert[f"experts.1.{gate}.weight"])


def test_moe_np_stores_the_transpose_of_nn_linear():
    sd, layer = build("mixtral", "per_expert")
    assert np.array_equal(layer.params["w_router"], sd["gate.weight"].T)          # (D, E) vs (E, D)
    assert np.array_equal(layer.params["w_gate"][2], sd["experts.2.w1.weight"].T)  # w1 is the gate
    assert np.array_equal(layer.params["w_up"][2], sd["experts.2.w3.weight"].T)    # w3 the up projection
    assert np.array_equal(layer.params["w_down"][2], sd["experts.2.w2.weight"].T)  # w2 the down projection


# -- the same forward as HF -----------------------------------------------------------------

@pytest.mark.parametrize("arch, style", [c for c in CASES if c[0] != "switch_transformers"])
def test_layer_computes_hf_forward(arch, style):
    sd, layer = build(arch, style)
    x = tokens()
    np.testing.assert_allclose(layer.eval().forward(x), HF_FORWARD[arch](sd, style, x), rtol=1e-12, atol=1e-13)


def test_deepseek_bias_and_groups_change_the_choice_being_compared():
    """The forward test above would not notice a lost bias or group limit unless they changed the
    experts chosen on its tokens: they do, and the layer chose what HF chose."""
    sd, layer = build("deepseek_v3", "fused")
    x = tokens()
    _, ids = hf_deepseek_ids(sd, x)
    unbiased = hf_deepseek_ids(sd | {"gate.e_score_correction_bias": np.zeros(8)}, x)[1]
    ungrouped = hf_deepseek_ids(sd, x, DEEPSEEK | {"n_group": 1, "topk_group": 1})[1]
    assert not np.array_equal(np.sort(ids), np.sort(unbiased))
    assert not np.array_equal(np.sort(ids), np.sort(ungrouped))
    layer.eval().forward(x)
    assert np.array_equal(np.sort(layer.stats.ids), np.sort(ids))


def test_switch_layer_computes_hf_forward_and_drops_the_same_tokens():
    """Capacity 2 per expert per sequence of 6 tokens. transformers 4.x before PR #37123 returns
    p * x for a dropped token (its input, scaled); moe_np's block returns 0 there, as later
    releases do: the one documented difference."""
    sd, layer = build("switch_transformers", "per_expert")
    x = tokens()
    y_hf, kept = hf_switch(sd, x)
    y = layer.eval().forward(x)
    assert 0 < (~kept).sum() < len(x)                                  # the case has drops
    assert np.array_equal(layer._cache.plan.token_rows[:, 0] >= 0, kept)
    np.testing.assert_allclose(y[kept], y_hf[kept], rtol=1e-12, atol=1e-13)
    p_max = softmax(linear(x, sd["router.classifier.weight"])).max(1, keepdims=True)
    assert not y[~kept].any() and np.allclose(y_hf[~kept], p_max[~kept] * x[~kept], rtol=1e-14)


def test_switch_aux_loss_is_hf_mean_of_per_sequence_losses():
    """Two sequences of 6 tokens: from_hf picks balance_scope="sequence", and the layer's aux is
    HF's balance + z loss; pooled over the batch it would not be. With drops, 4.x counts a dropped
    token as expert 0, moe_np every token's own choice: equal once HF counts choices before capacity."""
    no_drops = SWITCH | {"expert_capacity": SEQ_LEN}
    sd = hf_state_dict("switch_transformers", "per_expert")
    layer = interop.from_hf("switch_transformers", sd, no_drops, seq_len=SEQ_LEN).eval()
    x = tokens()
    layer.forward(x)
    assert layer.config.balance_scope == "sequence" and layer.stats.num_dropped == 0
    assert layer.aux == pytest.approx(hf_switch_aux(sd, x, no_drops), rel=1e-13)
    pooled = SparseMoE(replace(layer.config, balance_scope="batch"))
    pooled.load_state_dict(layer.state_dict())
    pooled.eval().forward(x)
    assert abs(pooled.aux - layer.aux) > 1e-6
    _, dropping = build("switch_transformers", "per_expert")
    dropping.eval().forward(x)
    assert dropping.stats.num_dropped > 0
    assert dropping.aux == pytest.approx(hf_switch_aux(sd, x, count_dropped_as_zero=False), rel=1e-13)
    assert abs(dropping.aux - hf_switch_aux(sd, x)) > 1e-6


def test_to_hf_writes_each_architecture_s_own_layout_by_default():
    """Switch has only per-expert keys; the SwiGLU models' own (current) layout is fused."""
    sd, switch = build("switch_transformers", "per_expert")
    back, _ = interop.to_hf("switch_transformers", switch)
    assert sorted(back) == sorted(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
    assert sorted(interop.hf_layout("switch_transformers", switch.config)) == sorted(sd)
    fused_sd, mixtral = build("mixtral", "fused")
    assert sorted(interop.to_hf("mixtral", mixtral)[0]) == sorted(fused_sd)


def test_router_in_float32_is_the_only_difference_from_hf():
    """HF's Mixtral router calls router_logits.float(): with it, the outputs differ at float32's
    rounding; without it, at float64's."""
    sd, layer = build("mixtral", "fused")
    x = tokens(n=32)
    y = layer.eval().forward(x)
    err64 = np.abs(y - hf_mixtral(sd, "fused", x)).max()
    err32 = np.abs(y - hf_mixtral(sd, "fused", x, router_dtype=np.float32)).max()
    assert err64 < 1e-13 and 1e-10 < err32 < 1e-5


def test_config_fields_reach_the_layer():
    _, qwen = build("qwen2_moe", "fused")
    c = qwen.config
    assert (c.router, c.k, c.num_shared, c.shared_gate, c.d_hidden_shared) == ("softmax_topk_raw", 3, 1, True, 7)
    assert c.balance_coef == pytest.approx(0.001 * 3)                 # HF's loss is K x moe_np's
    normed = interop.from_hf("qwen2_moe", hf_state_dict("qwen2_moe", "fused"), QWEN2 | {"norm_topk_prob": True})
    assert normed.config.router == "softmax_topk"
    _, ds = build("deepseek_v3", "fused")
    c = ds.config
    assert (c.router, c.n_group, c.topk_group, c.routed_scaling_factor, c.num_shared) == ("sigmoid_bias", 4, 2, 2.5, 2)
    _, sw = build("switch_transformers", "per_expert")
    c = sw.config
    assert (c.router, c.capacity_scope, c.seq_len, c.jitter, c.z_coef) == ("switch", "sequence", 6, 0.01, 0.001)
    assert interop.dispatch.capacity(6, 4, 1, c.capacity_factor, c.min_capacity) == 2


@pytest.mark.parametrize("cap, e, t", [(2, 4, 6), (64, 8, 512), (1, 3, 187), (1, 5, 147), (1, 128, 7)])
def test_capacity_factor_for_gives_back_the_capacity(cap, e, t):
    """(1, 3, 187), (1, 5, 147): C E / T itself rounds up to C + 1 there."""
    f = interop.capacity_factor_for(cap, e, t)
    assert interop.dispatch.capacity(t, e, 1, f) == cap


# -- presets ----------------------------------------------------------------------------------

PINNED = {
    "switch": dict(router="switch", k=1, expert="mlp", capacity_factor=1.25, drop_policy="position",
                   balance_coef=1e-2, z_coef=0.0, jitter=1e-2, num_shared=0),
    "gshard": dict(router="softmax_topk", k=2, expert="mlp", capacity_factor=1.0, drop_policy="position",
                   balance_coef=1e-2, num_shared=0),
    "mixtral": dict(router="softmax_topk", k=2, expert="swiglu", capacity_factor=None, balance_coef=0.04,
                    num_shared=0, jitter=0.0),
    "qwen2_moe": dict(router="softmax_topk_raw", k=4, expert="swiglu", capacity_factor=None,
                      balance_coef=0.004, num_shared=1, d_hidden_shared=128, shared_gate=True),
    "deepseek_v3": dict(router="sigmoid_bias", k=8, n_group=8, topk_group=4, norm_topk_prob=True,
                        routed_scaling_factor=2.5, expert="swiglu", capacity_factor=None, num_shared=1,
                        d_hidden_shared=None, shared_gate=False, bias_gamma=1e-3, bias_update="sign",
                        seq_aux_coef=1e-4, seq_len=64),
}


@pytest.mark.parametrize("name", PINNED)
def test_preset_settings(name):
    extra = {"seq_len": 64} if name == "deepseek_v3" else {}
    config = presets.PRESETS[name](16, 16, 32, **extra)
    assert {k: getattr(config, k) for k in PINNED[name]} == PINNED[name]
    assert (config.d_model, config.num_experts, config.d_hidden) == (16, 16, 32)
    SparseMoE(config).forward(tokens(n=64, d=16))                    # each preset runs


def test_preset_overrides_and_k_scaled_balance():
    assert presets.switch(8, 4, 16, capacity_factor=2.0).capacity_factor == 2.0
    assert presets.mixtral(8, 4, 16, k=1).balance_coef == pytest.approx(0.02)
    assert presets.qwen2_moe(8, 4, 16, balance_coef=0.0).balance_coef == 0.0
    assert presets.deepseek_v3(8, 16, 16, seq_aux_coef=0.0).seq_len is None


def test_preset_table_reads_the_configs_and_sources_every_cell():
    rows = presets.preset_table()
    assert [r["model"].value for r in rows] == ["Switch Transformer", "GShard", "Mixtral 8x7B",
                                                "Qwen1.5-MoE-A2.7B", "DeepSeek-V3"]
    assert all(list(r) == list(presets.COLUMNS) and all(cell.source for cell in r.values()) for r in rows)
    switch, gshard, mixtral, qwen, deepseek = rows
    assert switch["K"].value == "1" and switch["capacity"].value.startswith("C = ceil(1.25")
    assert mixtral["capacity"].value == "dropless" and gshard["normalisation"].value.startswith("renormalised")
    assert qwen["shared experts"].value == "1 of width 4 H, sigmoid gate"
    assert deepseek["scaling"].value == "x 2.5" and "best 4 of 8 groups" in deepseek["router"].value
    changed = presets.preset_row("mixtral", presets.mixtral(16, 16, 32, capacity_factor=1.5))
    assert changed["capacity"].value.startswith("C = ceil(1.5")


@pytest.mark.parametrize("call, message", [
    (lambda: presets.switch(8, 4, 16, capcity_factor=1.0), "switch: unknown override 'capcity_factor'"),
    (lambda: presets.deepseek_v3(8, 16, 16), "deepseek_v3: the sequence-wise balance loss"),
    (lambda: presets.deepseek_v3(8, 8, 16, seq_len=4), "k=8 exceeds the 4 experts in the eligible groups"),
    (lambda: presets.preset_row("llama", presets.gshard(8, 4, 16)), "preset_row: name must be one of"),
])
def test_bad_preset_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- bad input --------------------------------------------------------------------------------

def _without(sd, key):
    return {k: v for k, v in sd.items() if k != key}


SD = hf_state_dict("mixtral", "fused")
SD_PER = hf_state_dict("mixtral", "per_expert")


@pytest.mark.parametrize("arch, sd, config, message", [
    ("llama", SD, MIXTRAL, "from_hf: arch must be one of"),
    ("mixtral", _without(SD, "experts.down_proj"), MIXTRAL, "missing key 'experts.down_proj'"),
    ("mixtral", _without(SD_PER, "experts.3.w3.weight"), MIXTRAL, "missing key 'experts.3.w3.weight'"),
    ("mixtral", SD | {"experts.bias": np.zeros(4)}, MIXTRAL, "unexpected key 'experts.bias'"),
    ("mixtral", SD | {"gate.weight": np.zeros((4, 6))}, MIXTRAL,
     r"key 'gate.weight' has shape \(4, 6\), expected \(4, 5\)"),
    ("mixtral", SD, MIXTRAL | {"intermediate_size": 7}, r"'experts.gate_up_proj' has shape \(4, 12, 5\), "
     r"expected \(4, 14, 5\) from the config \(.*intermediate_size=7"),
    ("mixtral", SD_PER, MIXTRAL | {"num_local_experts": 5}, "missing key 'experts.4.w1.weight'"),
    ("mixtral", SD, MIXTRAL | {"num_local_experts": 3}, r"has shape \(4, 5\), expected \(3, 5\).*num_local_experts=3"),
    ("mixtral", SD | {"gate.weight": SD["gate.weight"].astype(np.float32)}, MIXTRAL, "one dtype for every array"),
    ("mixtral", SD | {"gate.weight": np.zeros((4, 5), int)}, MIXTRAL, "'gate.weight' must be a float array"),
    ("mixtral", [SD], MIXTRAL, "state_dict must be a dict"),
    ("mixtral", SD, _without(MIXTRAL, "num_experts_per_tok"), "missing the field 'num_experts_per_tok'"),
    ("mixtral", SD, MIXTRAL | {"hidden_size": "5"}, "'hidden_size' must be an integer >= 1, got '5'"),
    ("mixtral", SD, MIXTRAL | {"hidden_size": 0}, "'hidden_size' must be an integer >= 1, got 0"),
    ("mixtral", SD, MIXTRAL | {"hidden_size": True}, "'hidden_size' must be an integer >= 1, got True"),
    ("mixtral", SD, MIXTRAL | {"num_experts_per_tok": 5}, "config does not fit moe_np.*k=5 exceeds num_experts=4"),
    ("mixtral", SD, MIXTRAL | {"hidden_act": "gelu"}, "hidden_act='gelu' cannot be represented"),
    ("mixtral", SD, MIXTRAL | {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1 scales the input"),
    ("qwen2_moe", hf_state_dict("qwen2_moe", "fused"), _without(QWEN2, "norm_topk_prob"),
     "missing the field 'norm_topk_prob'"),
    ("deepseek_v3", hf_state_dict("deepseek_v3", "fused"), DEEPSEEK | {"topk_group": 5},
     r"topk_group=5 must be in \[1, n_group=4\]"),
    ("deepseek_v3", _without(hf_state_dict("deepseek_v3", "fused"), "gate.e_score_correction_bias"), DEEPSEEK,
     "missing key 'gate.e_score_correction_bias'"),
    ("switch_transformers", hf_state_dict("switch_transformers", "per_expert"), SWITCH,
     "pass seq_len=T"),
    ("switch_transformers", hf_state_dict("switch_transformers", "per_expert"), SWITCH | {"router_bias": True},
     "router_bias=True cannot be represented"),
    ("switch_transformers", hf_state_dict("switch_transformers", "per_expert"),
     SWITCH | {"dense_act_fn": "gated-gelu"}, "dense_act_fn='gated-gelu' cannot be represented"),
])
def test_bad_from_hf_input_is_refused_before_anything_is_built(arch, sd, config, message, monkeypatch):
    def no_layer(*args, **kw):
        raise AssertionError("a layer was built before the input was checked")
    monkeypatch.setattr(interop.blocks, "SparseMoE", no_layer)
    with pytest.raises(ValueError, match=message):
        interop.from_hf(arch, sd, config)


def test_seq_len_only_for_switch():
    with pytest.raises(ValueError, match="seq_len=8 is only used for switch_transformers"):
        interop.from_hf("mixtral", SD, MIXTRAL, seq_len=8)


def _layer(**fields):
    base = dict(d_model=5, num_experts=4, d_hidden=6, expert="swiglu", router="softmax_topk", k=2)
    return SparseMoE(SparseConfig(**(base | fields)))


def _switch_layer():
    return build("switch_transformers", "per_expert")[1]


@pytest.mark.parametrize("arch, make, style, message", [
    ("llama", _layer, "fused", "to_hf: arch must be one of"),
    ("mixtral", _layer, "stacked", "to_hf: style must be one of"),
    ("switch_transformers", _switch_layer, "fused", "switch_transformers has only the per-expert layout"),
    ("mixtral", lambda: _layer(capacity_factor=1.25), "fused", "cannot represent capacity_factor=1.25"),
    ("mixtral", lambda: _layer(expert="mlp"), "fused", "cannot represent expert='mlp'"),
    ("mixtral", lambda: _layer(z_coef=1e-3), "fused", "no config field for z_coef=0.001"),
    ("mixtral", lambda: _layer(jitter=0.1), "fused", "cannot represent jitter=0.1"),
    ("mixtral", lambda: _layer(num_shared=1), "fused", "cannot represent num_shared=1"),
    ("qwen2_moe", lambda: _layer(num_shared=1), "fused", "cannot represent shared_gate=False"),
    ("deepseek_v3", lambda: _layer(), "fused", "cannot represent router='softmax_topk'"),
    ("deepseek_v3", lambda: SparseMoE(presets.deepseek_v3(5, 16, 6, seq_len=4)), "fused",
     "no config field for seq_aux_coef=0.0001"),
    ("deepseek_v3", lambda: _layer(router="sigmoid_bias", num_shared=1, d_hidden_shared=3), "fused",
     "cannot represent d_hidden_shared=3"),
    ("switch_transformers", lambda: SparseMoE(presets.switch(5, 4, 6)), "per_expert",
     "cannot represent capacity_scope='batch'"),
    ("mixtral", lambda: "not a layer", "fused", "layer must be a SparseMoE, got str"),
])
def test_bad_to_hf_input(arch, make, style, message):
    with pytest.raises(ValueError, match=message):
        interop.to_hf(arch, make(), style)


def test_switch_experts_with_biases_cannot_be_exported():
    layer = _switch_layer()
    layer.params["b2"][1, 3] = 0.5
    with pytest.raises(ValueError, match="experts have no biases, but b2 has 1 non-zero entries"):
        interop.to_hf("switch_transformers", layer, "per_expert")
