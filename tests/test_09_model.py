"""Chapter 9: the language model's layers, the model, its KV cache, presets and bad input."""
import numpy as np
import pytest

from moe_np import attention as att
from moe_np import lm_presets
from moe_np.config import LMConfig, SparseConfig
from moe_np.functional import softmax_forward
from moe_np.transformer import IGNORE_ID, MoETransformer, lm_loss_backward, lm_loss_forward

from conftest import REGISTRY, assert_check_passes, checks_of

PAIR_CHECKS = [n for n in checks_of(9) if n.startswith("lm:") and not n.startswith("lm:model")]
MODEL_CHECKS = [n for n in checks_of(9) if n.startswith("lm:model")]


@pytest.mark.parametrize("name", PAIR_CHECKS)
def test_registered_pair_check_passes(name):
    """Two seeds for the small pairs, one for the attention pairs (`gradcheck --seed S` runs others)."""
    assert_check_passes(name, seeds=(0,) if name.startswith("lm:att") else (0, 1))


@pytest.mark.parametrize("name", MODEL_CHECKS)
def test_whole_model_check_passes_for_every_parameter(name):
    from moe_np.checks.lm import tiny_model
    rows = REGISTRY[name].run(0)
    assert all(r.passed for r in rows), [(r.wrt, r.check_error) for r in rows if not r.passed]
    assert {r.wrt for r in rows} == set(tiny_model(name[len("lm:model["):-1], 0).params)


def test_chapter_9_checks_cover_every_pair():
    assert {"lm:embedding", "lm:rms_norm", "lm:rope", "lm:attend", "lm:attention", "lm:swiglu_ffn",
            "lm:head_and_loss"} <= set(PAIR_CHECKS)
    assert len(MODEL_CHECKS) == 2
    wrt = {r.wrt for r in REGISTRY["lm:attention"].run(0)}
    assert wrt == {"x", "wq", "wk", "wv", "wo", "bq", "bk", "bv"}


def small_config(**overrides) -> LMConfig:
    moe = SparseConfig(d_model=16, num_experts=4, d_hidden=8, expert="swiglu", k=2, balance_coef=0.1,
                       z_coef=0.01)
    base = dict(vocab_size=13, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                context_length=12, moe=moe, moe_every=2, d_ffn=12, qkv_bias=True)
    return LMConfig(**(base | overrides))


def random_ids(shape, vocab=13, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


# -- behaviour ---------------------------------------------------------------------------------

def test_changing_a_later_token_never_changes_earlier_logits():
    model = MoETransformer(small_config(moe_every=1), seed=3).eval()
    ids = random_ids((2, 10))
    base = model.forward(ids)
    for t in (0, 3, 8):
        changed = ids.copy()
        changed[:, t + 1] = (changed[:, t + 1] + 5) % 13
        logits = model.forward(changed)
        np.testing.assert_allclose(logits[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-12)
        assert not np.allclose(logits[:, t + 1], base[:, t + 1])


def test_rope_keeps_the_dot_product_of_a_shifted_pair():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 1, 8))                           # one head, one position each
    dots = []
    for shift in (0, 5, 11):
        cq, sq = att.rope_tables(1, 8, 100.0, np.float64, start=7 + shift)   # q at position 7
        ck, sk = att.rope_tables(1, 8, 100.0, np.float64, start=2 + shift)   # k at position 2
        dots.append(float(np.sum(att.rope_forward(q, cq, sq)[0] * att.rope_forward(k, ck, sk)[0])))
    np.testing.assert_allclose(dots, dots[0], rtol=1e-12)
    cq, sq = att.rope_tables(1, 8, 100.0, np.float64, start=8)         # a different distance
    assert abs(float(np.sum(att.rope_forward(q, cq, sq)[0] * att.rope_forward(k, ck, sk)[0]))
               - dots[0]) > 1e-6


def test_rope_pairs_dimension_i_with_i_plus_half():
    """HF's rotate_half layout: y = x cos + cat(-x2, x1) sin, angles t theta^(-2i/F) repeated."""
    x = np.arange(1.0, 9.0).reshape(1, 1, 1, 8)
    cos, sin = att.rope_tables(1, 8, 10000.0, np.float64, start=3)
    angles = 3 * 10000.0 ** (-np.arange(0, 8, 2) / 8)
    full_cos, full_sin = np.tile(np.cos(angles), 2), np.tile(np.sin(angles), 2)
    rotated = np.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
    np.testing.assert_allclose(att.rope_forward(x, cos, sin)[0], x * full_cos + rotated * full_sin,
                               rtol=1e-14)


def plain_multi_head(x, params, heads):
    """Reference: one head at a time, the softmax of a masked score matrix, no grouping."""
    b, t, d = x.shape
    q, k, v = (x @ params[w] + params["b" + w[1]] for w in ("wq", "wk", "wv"))   # (B, T, A F)
    f = q.shape[-1] // heads
    cos, sin = att.rope_tables(t, f, 10000.0, np.float64)
    out = []
    for h in range(heads):
        cut = slice(h * f, (h + 1) * f)
        qh, kh = (att.rope_forward(z[:, :, cut], cos, sin)[0] for z in (q, k))     # (B, T, F)
        s = qh @ np.swapaxes(kh, 1, 2) / np.sqrt(f)                    # (B, T, T)
        s = np.where(np.tril(np.ones((t, t), dtype=bool)), s, -np.inf)
        out.append(softmax_forward(s)[0] @ v[:, :, cut])               # (B, T, F)
    return np.concatenate(out, axis=-1) @ params["wo"]                 # (B, T, D)


def test_gqa_with_as_many_kv_heads_as_heads_is_plain_multi_head_attention():
    from moe_np.checks.lm import attention_params
    rng = np.random.default_rng(1)
    params = attention_params(rng, d=6, heads=3, kv_heads=3, f=4)
    x = rng.standard_normal((2, 5, 6))
    cos, sin = att.rope_tables(5, 4, 10000.0, np.float64)
    y, _ = att.attention_forward(x, params, 3, 3, cos, sin)
    np.testing.assert_allclose(y, plain_multi_head(x, params, 3), rtol=1e-12, atol=1e-12)


def test_grouped_heads_equal_multi_head_with_repeated_keys_and_values():
    """Query head a reads kv head a // (A/P): GQA equals MHA whose k/v weights repeat each group."""
    from moe_np.checks.lm import attention_params
    rng = np.random.default_rng(2)
    params = attention_params(rng, d=6, heads=4, kv_heads=2, f=4)
    x = rng.standard_normal((2, 5, 6))
    cos, sin = att.rope_tables(5, 4, 10000.0, np.float64)
    y, _ = att.attention_forward(x, params, 4, 2, cos, sin)
    repeat = lambda w: np.repeat(w.reshape(*w.shape[:-1], 2, 4), 2, axis=-2).reshape(*w.shape[:-1], 16)
    mha = params | {n: repeat(params[n]) for n in ("wk", "wv", "bk", "bv")}
    np.testing.assert_allclose(y, plain_multi_head(x, mha, 4), rtol=1e-12, atol=1e-12)


def test_query_blocks_change_nothing():
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((2, 4, 7, 4)), *rng.standard_normal((2, 2, 2, 10, 4))
    whole, _ = att.attend_forward(q, k, v, block=64)
    for block in (1, 3):
        np.testing.assert_allclose(att.attend_forward(q, k, v, block=block)[0], whole, rtol=1e-13, atol=1e-13)
    assert [b[:3] for b in att.attend_forward(q, k, v, block=3)[1].blocks] == [(0, 3, 6), (3, 6, 9), (6, 7, 10)]


@pytest.mark.parametrize("preset", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_kv_cached_decoding_gives_the_full_forward_logits(preset):
    config = lm_presets.LM_PRESETS[preset](vocab_size=11, d_model=16, num_layers=2, context_length=10)
    model = MoETransformer(config, seed=1).eval()
    ids = random_ids((3, 9), vocab=11, seed=4)
    full = model.forward(ids)                                          # (B, T, V)
    logits, kv = model.prefill(ids[:, :4])
    pieces = [logits]
    for t in range(4, 7):
        logits, kv = model.decode_step(ids[:, t:t + 1], kv)
        pieces.append(logits)
    logits, kv = model.decode_step(ids[:, 7:9], kv)                    # two positions at once
    pieces.append(logits)
    assert kv.length == 9
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-11, atol=1e-11)


def test_decoding_past_the_context_is_refused():
    model = MoETransformer(small_config(), seed=0)
    _, kv = model.prefill(random_ids((1, 12)))
    with pytest.raises(ValueError, match="sequence length 13 exceeds context_length=12"):
        model.decode_step(random_ids((1, 1)), kv)


def test_float32_in_float32_everywhere():
    model = MoETransformer(small_config(tie_embeddings=True), seed=0, dtype=np.float32)
    ids = random_ids((2, 8))
    logits = model.forward(ids)
    loss, cache = lm_loss_forward(logits, ids)
    model.backward(lm_loss_backward(1.0, cache), aux_scale=np.float64(2.0))
    assert logits.dtype == np.float32 and np.asarray(loss).dtype == np.float32
    assert {v.dtype for v in model.params.values()} == {np.dtype(np.float32)}
    assert {v.dtype for v in model.grads.values()} == {np.dtype(np.float32)}
    logits, kv = model.prefill(ids)
    assert logits.dtype == np.float32 and {k.dtype for k in kv.keys + kv.values} == {np.dtype(np.float32)}
    attn = model.blocks[0].attn._cache
    assert {attn.x.dtype, attn.ctx.dtype, attn.attend.blocks[0].p.dtype, attn.rope[0].dtype} == {np.dtype(np.float32)}


def test_loss_ignores_padding_and_knows_its_value():
    logits = np.zeros((2, 3, 5))                                       # uniform: loss log 5
    targets = np.array([[1, 2, IGNORE_ID], [0, IGNORE_ID, IGNORE_ID]])
    loss, cache = lm_loss_forward(logits, targets)
    assert loss == pytest.approx(np.log(5))
    dlogits = lm_loss_backward(1.0, cache)
    assert np.all(dlogits[0, 2] == 0) and np.all(dlogits[1, 1:] == 0)
    np.testing.assert_allclose(dlogits[0, 0], (np.full(5, 0.2) - np.eye(5)[1]) / 3)
    logits[0, 2] = 100.0                                               # an ignored position
    assert lm_loss_forward(logits, targets)[0] == pytest.approx(np.log(5))


def test_bad_targets_are_refused():
    with pytest.raises(ValueError, match="targets must lie in \\[0, vocab_size=5\\), got 7"):
        lm_loss_forward(np.zeros((1, 2, 5)), np.array([[1, 7]]))
    with pytest.raises(ValueError, match="targets must have shape \\(1, 2\\)"):
        lm_loss_forward(np.zeros((1, 2, 5)), np.array([1, 2]))


def test_embedding_backward_adds_repeated_tokens():
    table = np.arange(12.0, dtype=np.float32).reshape(4, 3)
    ids = np.array([[2, 0, 2]])
    x, cache = att.embedding_forward(ids, table)
    dtable = att.embedding_backward(np.ones((1, 3, 3), dtype=np.float32), cache)
    assert dtable.dtype == np.float32
    np.testing.assert_array_equal(dtable, [[1, 1, 1], [0, 0, 0], [2, 2, 2], [0, 0, 0]])


def test_aux_and_routing_stats_come_from_every_moe_block():
    model = MoETransformer(small_config(num_layers=4), seed=0)
    model.forward(random_ids((2, 6)))
    names = [name for name, _ in model.routing_stats()]
    assert names == ["block1.ffn", "block3.ffn"]
    assert model.aux == pytest.approx(model.blocks[1].ffn.aux + model.blocks[3].ffn.aux)
    assert model.aux > 0


def test_padding_is_routed_nowhere_and_changes_no_real_logit():
    model = MoETransformer(small_config(moe_every=1), seed=0, dtype=np.float32).eval()
    ids = random_ids((2, 6))
    mask = np.array([[True] * 6, [True] * 4 + [False] * 2])
    logits = model.forward(ids, mask)
    counts = [stats.counts.sum() for _, stats in model.routing_stats()]
    assert counts == [10 * 2, 10 * 2]                                  # real tokens x K, per block
    other = ids.copy()
    other[1, 4:] = (other[1, 4:] + 3) % 13
    np.testing.assert_array_equal(model.forward(other, mask)[:, :4], logits[:, :4])
    np.testing.assert_array_equal(model.forward(other, mask)[0], logits[0])


def test_aux_scale_scales_only_the_auxiliary_gradient():
    model = MoETransformer(small_config(), seed=0)
    ids = random_ids((2, 6))
    zero = np.zeros_like(model.forward(ids))
    model.backward(zero, aux_scale=1.0)
    once = {k: v.copy() for k, v in model.grads.items()}
    model.backward(zero, aux_scale=2.5)
    assert np.abs(once["block1.ffn.w_router"]).max() > 0
    for key, value in model.grads.items():
        np.testing.assert_allclose(value, 2.5 * once[key], rtol=1e-9, atol=1e-15)


def test_tied_head_is_the_embedding_and_gets_both_gradients():
    tied = MoETransformer(small_config(tie_embeddings=True), seed=0)
    untied = MoETransformer(small_config(), seed=0)
    assert not any(k.startswith("head.") for k in tied.state_dict())
    for key, value in tied.params.items():
        untied.params[key][...] = value
    untied.params["head.weight"][...] = tied.params["embed.weight"].T
    ids = random_ids((2, 6))
    for model in (tied, untied):
        loss, cache = lm_loss_forward(model.forward(ids), ids)
        model.backward(lm_loss_backward(1.0, cache))
    np.testing.assert_allclose(tied.grads["embed.weight"],
                               untied.grads["embed.weight"] + untied.grads["head.weight"].T, rtol=1e-12)


def test_state_dict_round_trip_and_optimizer_binding():
    model = MoETransformer(small_config(), seed=0)
    other = MoETransformer(small_config(), seed=5)
    bound = other.params["block0.attn.wq"]
    other.load_state_dict(model.state_dict())
    assert other.params["block0.attn.wq"] is bound
    ids = random_ids((2, 6))
    np.testing.assert_array_equal(other.forward(ids), model.forward(ids))


def test_presets_have_their_models_shapes():
    mixtral, qwen, deepseek = (fn(vocab_size=64, d_model=64) for fn in lm_presets.LM_PRESETS.values())
    assert (mixtral.moe.num_experts, mixtral.moe.k, mixtral.moe.router) == (8, 2, "softmax_topk")
    assert mixtral.num_heads // mixtral.num_kv_heads == 4 and mixtral.rope_theta == 1e6
    assert qwen.moe.shared_gate and qwen.moe.num_shared == 1 and qwen.qkv_bias
    assert qwen.moe.d_hidden < mixtral.moe.d_hidden and qwen.moe.router == "softmax_topk_raw"
    assert deepseek.moe.router == "sigmoid_bias" and deepseek.moe.n_group > 1
    dense = lm_presets.dense_baseline(mixtral, "active")
    sizes = [MoETransformer(c).active_params() for c in (mixtral, dense)]
    assert dense.moe is None and abs(sizes[0] - sizes[1]) / sizes[0] < 0.01


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ids, message", [
    (np.array([[1, 13]]), "ids must lie in \\[0, vocab_size=13\\), got 13"),
    (np.array([[-1, 2]]), "ids must lie in \\[0, vocab_size=13\\), got -1"),
    (np.zeros((1, 13), dtype=int), "sequence length 13 exceeds context_length=12"),
    (np.zeros((1, 0), dtype=int), "ids has no positions"),
    (np.zeros((1, 3)), "ids must be integers, got float64"),
])
def test_bad_ids_are_refused(ids, message):
    model = MoETransformer(small_config(), seed=0)
    with pytest.raises(ValueError, match=message):
        model.forward(ids)


@pytest.mark.parametrize("fields, message", [
    (dict(num_kv_heads=3), "num_kv_heads=3 must divide num_heads=4"),
    (dict(d_model=12, moe=None), "RoPE needs an even head dim, got head_dim=d_model/num_heads=3"),
    (dict(d_model=18), "num_heads=4 must divide d_model=18"),
    (dict(moe_every=1, d_ffn=None, moe=None), "d_ffn is needed for the dense blocks"),
    (dict(moe=SparseConfig(d_model=8, num_experts=4, d_hidden=8)), "moe.d_model=8 differs from d_model=16"),
])
def test_bad_config_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        small_config(**fields)


def test_bad_heads_and_head_dim_in_the_pairs():
    from moe_np.checks.lm import attention_params
    params = attention_params(np.random.default_rng(0), d=6, heads=4, kv_heads=2, f=4)
    cos, sin = att.rope_tables(5, 4, 10000.0, np.float64)
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        att.attention_forward(np.zeros((1, 5, 6)), params, 4, 3, cos, sin)
    with pytest.raises(ValueError, match="head_dim must be even and >= 2, got head_dim=5"):
        att.rope_tables(5, 5, 10000.0, np.float64)


# -- the whole-model HF Rosetta -----------------------------------------------------------------

from moe_np import interop  # noqa: E402

HF_CONFIGS = {
    "mixtral": {"vocab_size": 11, "hidden_size": 8, "intermediate_size": 6, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 9,
                "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                "tie_word_embeddings": False, "num_local_experts": 4, "num_experts_per_tok": 2,
                "router_aux_loss_coef": 0.02, "sliding_window": None},
    "qwen2_moe": {"vocab_size": 11, "hidden_size": 8, "intermediate_size": 10, "moe_intermediate_size": 3,
                  "shared_expert_intermediate_size": 5, "num_hidden_layers": 3, "num_attention_heads": 2,
                  "num_key_value_heads": 1, "max_position_embeddings": 9, "rms_norm_eps": 1e-6,
                  "rope_theta": 10000.0, "tie_word_embeddings": False, "num_experts": 5,
                  "num_experts_per_tok": 2, "norm_topk_prob": False, "decoder_sparse_step": 2,
                  "mlp_only_layers": [], "qkv_bias": True, "use_sliding_window": False},
}


def hf_arrays(arch, config, style="fused", seed=0):
    """A causal LM's state dict with HF's own names and shapes, random float64 values."""
    c, rng = config, np.random.default_rng(seed)
    d, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    f = d // heads
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,),
              "lm_head.weight": (c["vocab_size"], d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (heads * f, d), p + "self_attn.k_proj.weight": (kv * f, d),
                   p + "self_attn.v_proj.weight": (kv * f, d), p + "self_attn.o_proj.weight": (d, heads * f),
                   p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
        if arch == "qwen2_moe":
            shapes |= {p + "self_attn.q_proj.bias": (heads * f,), p + "self_attn.k_proj.bias": (kv * f,),
                       p + "self_attn.v_proj.bias": (kv * f,)}
        shapes |= hf_ffn_shapes(arch, c, i, style)
    return {k: rng.standard_normal(s) * (0.3 if len(s) == 2 else 1.0) + (1.0 if len(s) == 1 else 0.0)
            for k, s in shapes.items()}


def hf_ffn_shapes(arch, c, i, style):
    d, p = c["hidden_size"], f"model.layers.{i}.mlp."
    if arch == "qwen2_moe" and (i + 1) % c["decoder_sparse_step"]:
        w = c["intermediate_size"]
        return {p + "gate_proj.weight": (w, d), p + "up_proj.weight": (w, d), p + "down_proj.weight": (d, w)}
    e = c.get("num_local_experts", c.get("num_experts"))
    h = c.get("moe_intermediate_size", c["intermediate_size"])
    if style == "per_expert":                                          # releases before fused experts
        p = f"model.layers.{i}.block_sparse_moe." if arch == "mixtral" else p
        gate, up, down = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        shapes = {p + "gate.weight": (e, d)}
        for j in range(e):
            shapes |= {p + f"experts.{j}.{gate}.weight": (h, d), p + f"experts.{j}.{up}.weight": (h, d),
                       p + f"experts.{j}.{down}.weight": (d, h)}
    else:
        shapes = {p + "gate.weight": (e, d), p + "experts.gate_up_proj": (e, 2 * h, d),
                  p + "experts.down_proj": (e, d, h)}
    if arch == "qwen2_moe":
        s = c["shared_expert_intermediate_size"]
        shapes |= {p + "shared_expert.gate_proj.weight": (s, d), p + "shared_expert.up_proj.weight": (s, d),
                   p + "shared_expert.down_proj.weight": (d, s), p + "shared_expert_gate.weight": (1, d)}
    return shapes


def hf_reference_logits(arch, sd, c, ids):
    """A NumPy transcription of HF's causal-LM forward (eager attention, fused experts), float64."""
    silu = lambda z: z / (1 + np.exp(-z))
    norm = lambda x, w: w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c["rms_norm_eps"])
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    d = c["hidden_size"]
    f, t = d // heads, ids.shape[1]
    theta = c.get("rope_theta") or c["rope_parameters"]["rope_theta"]
    freqs = np.arange(t)[:, None] * theta ** (-np.arange(0, f, 2) / f)
    cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))
    rot = lambda z: z * cos + np.concatenate([-z[..., f // 2:], z[..., :f // 2]], -1) * sin
    x = sd["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, sd[p + "input_layernorm.weight"])
        q, k, v = (h @ sd[p + f"self_attn.{n}_proj.weight"].T + sd.get(p + f"self_attn.{n}_proj.bias", 0)
                   for n in "qkv")
        q = rot(q.reshape(*ids.shape, heads, f).transpose(0, 2, 1, 3))
        k, v = (z.reshape(*ids.shape, kv, f).transpose(0, 2, 1, 3).repeat(heads // kv, axis=1) for z in (k, v))
        s = q @ rot(k).transpose(0, 1, 3, 2) / np.sqrt(f)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        o = (a / a.sum(-1, keepdims=True)) @ v
        x = x + o.transpose(0, 2, 1, 3).reshape(*ids.shape, d) @ sd[p + "self_attn.o_proj.weight"].T
        x = x + hf_reference_ffn(arch, sd, c, i, norm(x, sd[p + "post_attention_layernorm.weight"]), silu)
    return norm(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def hf_reference_ffn(arch, sd, c, i, h, silu):
    p = f"model.layers.{i}.mlp."
    mlp = lambda z, q: (silu(z @ sd[q + "gate_proj.weight"].T) * (z @ sd[q + "up_proj.weight"].T)) \
        @ sd[q + "down_proj.weight"].T
    if p + "gate.weight" not in sd:
        return mlp(h, p)
    logits = h @ sd[p + "gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, -1)[..., :c["num_experts_per_tok"]]
    w = np.take_along_axis(probs, top, -1)
    if arch == "mixtral" or c["norm_topk_prob"]:
        w = w / w.sum(-1, keepdims=True)
    hh = c.get("moe_intermediate_size", c["intermediate_size"])
    out = np.zeros_like(h)
    for e in range(sd[p + "gate.weight"].shape[0]):
        gu, down = sd[p + "experts.gate_up_proj"][e], sd[p + "experts.down_proj"][e]
        y = (silu(h @ gu[:hh].T) * (h @ gu[hh:].T)) @ down.T
        out += y * np.where(top == e, w, 0).sum(-1, keepdims=True)
    if arch == "qwen2_moe":
        gate = 1 / (1 + np.exp(-(h @ sd[p + "shared_expert_gate.weight"].T)))
        out += gate * mlp(h, p + "shared_expert.")
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_from_hf_model_computes_hf_logits(arch):
    config = HF_CONFIGS[arch]
    sd = hf_arrays(arch, config)
    model = interop.from_hf_model(arch, sd, config)
    ids = random_ids((2, 7), vocab=11, seed=2)
    np.testing.assert_allclose(model.forward(ids), hf_reference_logits(arch, sd, config, ids),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch, style", [("mixtral", "fused"), ("mixtral", "per_expert"),
                                         ("qwen2_moe", "fused"), ("qwen2_moe", "per_expert")])
def test_hf_model_round_trip_is_bit_for_bit(arch, style):
    config = HF_CONFIGS[arch]
    sd = hf_arrays(arch, config, style)
    model = interop.from_hf_model(arch, sd, config)
    back, back_config = interop.to_hf_model(arch, model, style)
    assert set(back) == set(sd)
    for key in sd:
        assert back[key].shape == sd[key].shape and np.array_equal(back[key], sd[key]), key
    again = interop.from_hf_model(arch, back, back_config)
    assert all(np.array_equal(again.params[k], model.params[k]) for k in model.params)
    np.testing.assert_array_equal(model.params["block0.attn.wq"], sd["model.layers.0.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(model.params["embed.weight"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(model.params["head.weight"], sd["lm_head.weight"].T)


def test_tied_hf_model_has_no_head_key():
    config = HF_CONFIGS["mixtral"] | {"tie_word_embeddings": True}
    sd = hf_arrays("mixtral", config)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].copy()
    model = interop.from_hf_model("mixtral", sd, config)
    back, _ = interop.to_hf_model("mixtral", model)
    assert "lm_head.weight" not in back and model.head is None
    sd["lm_head.weight"][0, 0] += 1.0
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        interop.from_hf_model("mixtral", sd, config)


def _mis_shape(sd, key):
    sd[key] = sd[key][..., :-1]


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"), "missing key 'model.layers.1.self_attn.k_proj.weight'"),
    (lambda sd: sd.pop("model.norm.weight"), "missing key 'model.norm.weight'"),
    (lambda sd: sd.update({"model.layers.0.self_attn.rotary.inv_freq": np.ones(2)}),
     "unexpected key 'model.layers.0.self_attn.rotary.inv_freq'"),
    (lambda sd: sd.update({"model.layers.5.input_layernorm.weight": np.ones(8)}),
     "unexpected key 'model.layers.5.input_layernorm.weight'"),
    (lambda sd: _mis_shape(sd, "model.layers.0.self_attn.q_proj.bias"),
     "key 'model.layers.0.self_attn.q_proj.bias' has shape \\(7,\\), expected \\(8,\\)"),
    (lambda sd: sd.pop("model.layers.1.mlp.shared_expert_gate.weight"),
     "layer 1 \\(keys model.layers.1.mlp.\\*\\).*missing key 'shared_expert_gate.weight'"),
    (lambda sd: _mis_shape(sd, "model.layers.1.mlp.experts.down_proj"),
     "layer 1 .*'experts.down_proj' has shape"),
    (lambda sd: sd.update({"model.layers.0.mlp.gate.weight": np.ones((5, 8))}),
     "unexpected key 'model.layers.0.mlp.gate.weight'"),
])
def test_a_bad_hf_state_dict_names_the_key(change, message):
    sd = hf_arrays("qwen2_moe", HF_CONFIGS["qwen2_moe"])
    change(sd)
    with pytest.raises(ValueError, match=message):
        interop.from_hf_model("qwen2_moe", sd, HF_CONFIGS["qwen2_moe"])


@pytest.mark.parametrize("fields, message", [
    (dict(sliding_window=4), "sliding_window=4 < max_position_embeddings=9 cannot be represented"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "RoPE scaling"),
    (dict(num_key_value_heads=3), "num_kv_heads=3 must divide num_heads=2"),
    (dict(head_dim=2), "head_dim=2 differs from hidden_size / num_attention_heads"),
    (dict(num_hidden_layers=0), "from_hf_model: config field 'num_hidden_layers' must be an integer >= 1, got 0"),
    (dict(rms_norm_eps=0.0), "from_hf_model: config field 'rms_norm_eps' must be a number > 0, got 0.0"),
    (dict(tie_word_embeddings=1), "from_hf_model: config field 'tie_word_embeddings' must be a bool, got 1"),
])
def test_a_bad_hf_config_is_refused(fields, message):
    config = HF_CONFIGS["mixtral"] | fields
    with pytest.raises(ValueError, match=message):
        interop.from_hf_model("mixtral", hf_arrays("mixtral", HF_CONFIGS["mixtral"]), config)


def test_to_hf_model_refuses_what_hf_cannot_hold():
    dense_first = MoETransformer(lm_presets.mixtral_lm(vocab_size=11, d_model=16, num_layers=2,
                                                      context_length=8, moe_every=2, d_ffn=8))
    with pytest.raises(ValueError, match="mixtral cannot represent moe_every=2"):
        interop.to_hf_model("mixtral", dense_first)
    with pytest.raises(ValueError, match="arch must be one of"):
        interop.to_hf_model("deepseek_v3", dense_first)


def test_rms_norm_backward_leaves_its_inputs_and_matches_the_formula():
    """The backward reuses one work buffer of its own: dy and the cache stay as they were, and
    dx, dw equal the formula written with temporaries, to the bit, in float32."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)             # (B, T, D)
    w = rng.standard_normal(8).astype(np.float32)                     # (D,)
    dy = rng.standard_normal((2, 3, 8)).astype(np.float32)            # (B, T, D)
    _, cache = att.rms_norm_forward(x, w, 1e-5)
    dy0, xhat0 = dy.copy(), cache.xhat.copy()
    dx, dw = att.rms_norm_backward(dy, cache)
    assert np.array_equal(dy, dy0) and np.array_equal(cache.xhat, xhat0)
    g = dy0 * w                                                       # (B, T, D)
    assert np.array_equal(dx, cache.rinv * (g - xhat0 * np.mean(g * xhat0, axis=-1, keepdims=True)))
    assert np.array_equal(dw, (dy0 * xhat0).reshape(-1, 8).sum(axis=0))
    assert dx.dtype == dw.dtype == np.float32
