"""Chapter 8: the routers of current models. Known values, scope of the statistics, wiring."""
import numpy as np
import pytest

from moe_np import SparseConfig, SparseMoE, balance, routers
from moe_np.dispatch import plan as plan_mod

from conftest import REGISTRY, assert_check_passes, checks_of

ROUTING_CHECKS = [n for n in checks_of(8) if REGISTRY[n].run.__module__ == "moe_np.checks.routing"]


@pytest.mark.parametrize("name", ROUTING_CHECKS)
def test_registered_chapter_8_check_passes(name):
    assert_check_passes(name, seeds=(0, 1))


def test_chapter_8_checks_cover_the_new_pairs():
    assert {"router:sigmoid_groups", "aux:seq_balance", "aux:global_balance", "aux:seq_mean_balance",
            "sparse_moe[deepseek_v3]", "sparse_moe[qwen2_moe]", "sparse_moe[switch-like,balance per sequence]",
            "sparse_moe[masked,capacity per sequence]"} <= set(checks_of(8))


# -- DeepSeek-V3 -------------------------------------------------------------------------------

def test_group_limited_selection_known_value():
    """Group scores are the sum of each group's two best scores; only the best group is eligible,
    so the best single expert (in a weaker group) is not chosen."""
    s = np.array([[0.95, 0.10, 0.60, 0.55]])                          # groups {0,1}: 1.05, {2,3}: 1.15
    eligible = routers.group_limited_mask(s, n_group=2, topk_group=1)
    assert eligible.tolist() == [[False, False, True, True]]
    logits = np.log(s / (1 - s))                                      # sigmoid(logits) = s
    (ids, w), _ = routers.sigmoid_topk_forward(logits, 2, n_group=2, topk_group=1)
    assert ids.tolist() == [[2, 3]]
    (ids_all, _), _ = routers.sigmoid_topk_forward(logits, 2)
    assert ids_all.tolist() == [[0, 2]]                               # without groups: the best two


def test_unnormalized_weights_times_the_scaling_factor():
    logits = np.array([[1.0, -0.5, 0.3, 2.0]])
    s = 1 / (1 + np.exp(-logits[0]))
    (ids, w), _ = routers.sigmoid_topk_forward(logits, 2, normalize=False, scale=2.5)
    assert ids.tolist() == [[3, 0]] and np.allclose(w[0], 2.5 * s[[3, 0]])
    (_, w_n), _ = routers.sigmoid_topk_forward(logits, 2, scale=2.5)
    assert np.allclose(w_n[0], 2.5 * s[[3, 0]] / s[[3, 0]].sum())


def test_sequence_wise_loss_known_values():
    """1 at perfect balance within each sequence, E / K when a sequence sends everything to K experts."""
    e, k, t = 4, 2, 4
    uniform = np.full((2 * t, e), 0.5)
    balanced = np.array([[i % e, (i + 1) % e] for i in range(t)] * 2)   # each expert twice per sequence
    assert balance.seq_balance_loss_forward(uniform, balanced, t)[0] == pytest.approx(1.0)
    collapsed = np.zeros((2 * t, e)) + 1e-12
    collapsed[:, :2] = 1.0
    ids = np.tile([0, 1], (2 * t, 1))
    assert balance.seq_balance_loss_forward(collapsed, ids, t)[0] == pytest.approx(e / k)


def test_sequence_wise_loss_sees_imbalance_that_the_batch_hides():
    """Sequence 0 uses experts 0, 1 only and sequence 1 experts 2, 3 only: balanced over the batch,
    imbalanced within each sequence."""
    e, k, t = 4, 2, 4
    scores = np.full((2 * t, e), 0.5)
    ids = np.array([[0, 1]] * t + [[2, 3]] * t)
    assert balance.seq_balance_loss_forward(scores, ids, t)[0] == pytest.approx(1.0)   # P uniform
    skewed = scores.copy(); skewed[:t, :2] = 2.0; skewed[t:, 2:] = 2.0
    seq = balance.seq_balance_loss_forward(skewed, ids, t)[0]
    p_batch = (skewed / skewed.sum(1, keepdims=True)).mean(0)
    batch = e * np.sum(balance.expert_counts(ids, e) / ids.size * p_batch)
    assert batch == pytest.approx(1.0) and seq == pytest.approx(2 * 0.4 * 2) and seq > 1.5


def test_centred_bias_update_keeps_the_sum():
    ids = np.array([[0], [0], [0], [1]])                              # counts 3, 1, 0, 0
    plain = balance.update_selection_bias(np.zeros(4), ids, 0.01)
    centred = balance.update_selection_bias(np.zeros(4), ids, 0.01, centred=True)
    assert plain.sum() == pytest.approx(0.01) and centred.sum() == pytest.approx(0.0, abs=1e-15)
    assert np.allclose(centred - plain, -plain.mean())


def test_layer_uses_the_centred_rule():
    config = SparseConfig(d_model=4, num_experts=4, d_hidden=3, router="sigmoid_bias", k=1,
                          bias_gamma=0.01, bias_update="centred")
    layer = SparseMoE(config, seed=0)
    layer.forward(np.random.default_rng(0).standard_normal((9, 4)))
    assert layer.buffers["selection_bias"].sum() == pytest.approx(0.0, abs=1e-15)


# -- Qwen2-MoE's gated shared expert ----------------------------------------------------------------

def test_shared_expert_gate_and_width():
    config = SparseConfig(d_model=4, num_experts=3, d_hidden=5, router="softmax_topk_raw", k=2,
                          num_shared=1, shared_gate=True, d_hidden_shared=7)
    layer = SparseMoE(config, seed=0).eval()
    p = layer.params
    assert p["shared_w1"].shape == (1, 4, 7) and p["w_shared_gate"].shape == (4, 1)
    x = np.random.default_rng(1).standard_normal((6, 4))
    y = layer.forward(x)
    routed = SparseMoE(SparseConfig(d_model=4, num_experts=3, d_hidden=5, router="softmax_topk_raw",
                                    k=2), seed=5).eval()
    routed.load_state_dict({k: v for k, v in layer.state_dict().items()
                            if not k.startswith(("shared", "w_shared"))})
    shared = np.maximum(x @ p["shared_w1"][0] + p["shared_b1"][0], 0) @ p["shared_w2"][0] + p["shared_b2"][0]
    gate = 1 / (1 + np.exp(-(x @ p["w_shared_gate"])))
    assert np.allclose(y, routed.forward(x) + gate * shared, rtol=1e-12)


# -- the scope of the statistics -------------------------------------------------------------------

def _layer(**fields):
    base = dict(d_model=4, num_experts=4, d_hidden=5, router="softmax_topk", k=2, balance_coef=1.0,
                z_coef=0.1, capacity_factor=1.0)
    return SparseMoE(SparseConfig(**(base | fields)), seed=0)


def test_padding_tokens_change_nothing():
    """Adding masked tokens leaves the outputs of the real tokens, the counts, the loss and every
    gradient unchanged (capacity is computed from the real tokens)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 4))
    pad = np.vstack([x, 5 * rng.standard_normal((6, 4))])             # 6 padding tokens
    mask = np.arange(16) < 10
    a, b = _layer(), _layer()
    ya, yb = a.forward(x), b.forward(pad, mask=mask)
    assert np.allclose(ya, yb[:10], rtol=1e-13) and not yb[10:].any()
    assert np.array_equal(a.stats.counts, b.stats.counts) and a.stats.num_dropped == b.stats.num_dropped
    assert a.aux == pytest.approx(b.aux, rel=1e-13)
    dy = rng.standard_normal((16, 4))
    a.backward(dy[:10]), b.backward(dy * mask[:, None])
    assert all(np.allclose(a.grads[k], b.grads[k], rtol=1e-12, atol=1e-14) for k in a.grads)


def test_capacity_per_sequence_against_per_batch():
    """Two sequences; sequence 0 sends every token to expert 0. Per batch, expert 0's slots go to
    the first tokens of the batch; per sequence, each sequence keeps its own C slots."""
    ids = np.array([[0, 1]] * 4 + [[0, 2]] * 4)                       # (N=8, K=2), T = 4
    order = np.arange(8)
    cap_seq = 2                                                       # per sequence
    keep = plan_mod.sequence_capacity_eligible(ids, 4, cap_seq, order, seq_len=4)
    assert keep[:, 0].tolist() == [True, True, False, False, True, True, False, False]
    batch = plan_mod.plan_token_choice(ids, 4, 4, order)              # per batch: C = 4
    assert (batch.token_rows[:, 0] >= 0).tolist() == [True] * 4 + [False] * 4


def test_layer_capacity_per_sequence():
    layer = _layer(capacity_scope="sequence", seq_len=4, capacity_factor=0.5)   # C = ceil(.5*2*4/4) = 1
    x = np.random.default_rng(0).standard_normal((12, 4))
    layer.forward(x)
    plan = layer._cache.plan
    ids = layer.stats.ids
    for seq in range(3):
        rows = [plan.token_rows[t, r] for t in range(4 * seq, 4 * seq + 4) for r in range(2)]
        kept = [ids[t, r] for t in range(4 * seq, 4 * seq + 4) for r in range(2)
                if plan.token_rows[t, r] >= 0]
        assert len(kept) == len(set(kept))                            # at most C = 1 per expert
        assert len([r for r in rows if r >= 0]) == len(set(ids[4 * seq:4 * seq + 4].ravel()))
    assert plan.capacity == 1 and layer.stats.num_dropped == 24 - len(plan.rows_token)


def test_global_batch_balance_does_not_depend_on_the_split():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((12, 4))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ids = routers.top_k_indices(probs, 2)
    whole, cache = balance.global_balance_loss_forward([probs], [ids])
    assert whole == pytest.approx(balance.balance_loss_forward(probs, ids)[0], rel=1e-14)
    grads_whole = balance.global_balance_loss_backward(1.0, cache)[0]
    for cuts in ([4], [3, 7], [1, 2, 9]):
        parts = np.split(np.arange(12), cuts)
        value, c = balance.global_balance_loss_forward([probs[i] for i in parts], [ids[i] for i in parts])
        grads = np.vstack(balance.global_balance_loss_backward(1.0, c))
        assert value == pytest.approx(whole, rel=1e-14) and np.allclose(grads, grads_whole, rtol=1e-14)
    # the per-micro-batch average of local losses is not the global loss
    local = np.mean([balance.balance_loss_forward(probs[i], ids[i])[0] for i in np.split(np.arange(12), 4)])
    assert abs(local - whole) > 1e-3


PER_SEQUENCE = {   # the losses counted per sequence, as each model defines them
    "deepseek_v3 sequence-wise loss": dict(router="sigmoid_bias", k=2, seq_aux_coef=0.5),
    "switch balance per sequence": dict(router="switch", k=1, balance_coef=1.0, balance_scope="sequence"),
}


@pytest.mark.parametrize("name", PER_SEQUENCE)
def test_per_sequence_aux_of_two_sequences_is_the_mean_of_each_alone(name):
    """The layer hands its seq_len to the loss: the aux of two sequences (and its gradient) is
    the mean of each sequence's alone, and differs from the loss of one 12-token sequence."""
    config = SparseConfig(d_model=4, num_experts=4, d_hidden=5, seq_len=6, **PER_SEQUENCE[name])
    layer = SparseMoE(config, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((12, 4))             # (N, D): B = 2 sequences
    aux, router_grad = [], []
    for part in (x, x[:6], x[6:]):
        layer.forward(part)
        layer.backward(np.zeros_like(part))                           # only the aux's gradient
        aux.append(layer.aux), router_grad.append(layer.grads["w_router"].copy())
    assert aux[0] == pytest.approx((aux[1] + aux[2]) / 2, rel=1e-13)
    assert np.allclose(router_grad[0], (router_grad[1] + router_grad[2]) / 2, rtol=1e-12, atol=1e-15)
    whole = SparseMoE(SparseConfig(d_model=4, num_experts=4, d_hidden=5, seq_len=12, **PER_SEQUENCE[name]),
                      seed=0).eval()
    whole.forward(x)
    assert abs(whole.aux - aux[0]) > 1e-4 * aux[0]


def test_per_sequence_balance_loss_known_value():
    """Sequence 0 sends all to expert 0, sequence 1 all to expert 1. Pooled, the batch looks
    balanced (f = P = 1/2: loss 1); per sequence, each sequence has collapsed: E f P = 2 x 0.9."""
    probs = np.array([[0.5, 0.5]] * 4)                                # (N=4, E=2), T = 2
    ids = np.array([[0], [0], [1], [1]])                              # (N, K=1)
    pooled = balance.balance_loss_forward(probs, ids)[0]
    per_seq = balance.seq_mean_balance_loss_forward(probs, ids, 2)[0]
    assert pooled == pytest.approx(1.0) and per_seq == pytest.approx(1.0)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    assert balance.balance_loss_forward(probs, ids)[0] == pytest.approx(1.0)     # f = P = 1/2 overall
    assert balance.seq_mean_balance_loss_forward(probs, ids, 2)[0] == pytest.approx(1.8)   # 2 * 0.9


def test_padding_leaves_the_selection_bias_alone():
    """DeepSeek-V3's loss-free bias counts real tokens only: padding that all picks the same
    experts would otherwise pull their bias down."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 4))
    pad = np.vstack([x, np.repeat(3 * rng.standard_normal((1, 4)), 8, axis=0)])   # 8 identical pads
    mask = np.arange(18) < 10
    a, b = (_layer(router="sigmoid_bias", balance_coef=0.0, bias_gamma=0.01) for _ in range(2))
    for _ in range(3):
        ya, yb = a.forward(x), b.forward(pad, mask=mask)
    assert np.allclose(ya, yb[:10], rtol=1e-13) and np.array_equal(a.stats.counts, b.stats.counts)
    assert a.buffers["selection_bias"].any()
    assert np.array_equal(a.buffers["selection_bias"], b.buffers["selection_bias"])


# -- sparse upcycling ------------------------------------------------------------------------------

def test_upcycled_router_tells_the_identical_experts_apart():
    """The experts start as identical copies; only the router differs between them. Its columns
    must differ too, or every token scores every expert alike, all pick the same K, and the
    copies never receive different gradients."""
    from moe_np.models import MLP
    from moe_np.upcycle import upcycle
    mlp = MLP(4, 5, 4, seed=1)
    layer = upcycle(mlp.params, SparseConfig(d_model=4, num_experts=4, d_hidden=5, k=2), seed=3)
    w = layer.params["w_router"]                                      # (D, E)
    assert all(not np.allclose(w[:, i], w[:, j]) for i in range(4) for j in range(i + 1, 4))
    layer.forward(np.random.default_rng(0).standard_normal((40, 4)))
    assert np.count_nonzero(layer.stats.counts) == 4                  # every copy gets tokens
    assert len({tuple(sorted(row)) for row in layer.stats.ids}) > 1  # tokens choose differently


# -- router jitter --------------------------------------------------------------------------------

def test_jitter_only_while_training_and_only_on_the_router():
    layer = _layer(jitter=0.2, capacity_factor=None)
    x = np.random.default_rng(0).standard_normal((30, 4))
    layer.eval()
    clean = layer.forward(x)
    assert np.array_equal(clean, layer.forward(x))
    layer.train()
    noisy_logits = [layer.forward(x) is not None and layer.stats.logits for _ in range(2)]
    assert not np.array_equal(noisy_logits[0], noisy_logits[1])
    assert not np.array_equal(noisy_logits[0], x @ layer.params["w_router"])


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    (dict(n_group=2, topk_group=3), r"topk_group=3 must be in \[1, n_group=2\]"),
    (dict(n_group=3), "n_group=3 must divide num_experts=4"),
    (dict(n_group=4, topk_group=1, k=2), "k=2 exceeds the 1 experts in the eligible groups"),
    (dict(router="softmax_topk", n_group=2), "n_group=2 needs router='sigmoid_bias'"),
    (dict(seq_aux_coef=0.1), "seq_aux_coef=0.1 needs seq_len"),
    (dict(capacity_scope="sequence"), "capacity_scope='sequence' needs seq_len"),
    (dict(shared_gate=True), "need num_shared >= 1"),
    (dict(jitter=1.5), r"jitter must be in \[0, 1\)"),
    (dict(bias_update="median"), "bias_update must be one of"),
])
def test_bad_current_router_config(fields, message):
    base = dict(d_model=4, num_experts=4, d_hidden=3, router="sigmoid_bias", k=1)
    with pytest.raises(ValueError, match=message):
        SparseConfig(**(base | fields))


def test_bad_mask_and_sequence_length():
    layer = _layer(seq_len=4, capacity_scope="sequence")
    with pytest.raises(ValueError, match="N=6 tokens, not a multiple of seq_len=4"):
        layer.forward(np.zeros((6, 4)))
    with pytest.raises(ValueError, match=r"mask must have shape \(8,\)"):
        layer.forward(np.zeros((8, 4)), mask=np.ones(7, bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        layer.forward(np.zeros((8, 4)), mask=np.ones(8))
