"""How the sparse layer's parts are wired, pinned through the public layer API.

The gradient checks prove each pair; these tests catch a pair fed the wrong
input, a wrong entry in the router table, a default that drifted, or
stochastic behaviour leaking into evaluation. Each docstring names the
deliberate breakage it was seen to catch.
"""
import math

import numpy as np
import pytest

from moe_np import DenseConfig, SparseConfig, SparseMoE, functional, layers
from moe_np.balance import cv_squared_forward

D, E, H = 5, 4, 6


def layer_for(router, seed=0, **fields):
    k = 1 if router == "switch" else fields.pop("k", 2)
    return SparseMoE(SparseConfig(d_model=D, num_experts=E, d_hidden=H, router=router, k=k,
                                  **fields), seed=seed)


def tokens(n=24, seed=0):
    return np.random.default_rng(seed).standard_normal((n, D))


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


# -- the auxiliary loss equals coefficient times its definition -----------------------------

@pytest.mark.parametrize("router", ["softmax_topk", "softmax_topk_raw", "switch", "topk_softmax"])
def test_balance_loss_is_computed_from_all_e_probabilities_and_the_top_k_ids(router):
    """Caught: the balance loss fed the top-K weights instead of softmax over all E experts;
    f counted after capacity drops instead of before."""
    layer = layer_for(router, balance_coef=0.7, capacity_factor=0.5).eval()
    x = tokens()
    layer.forward(x)
    logits = x @ layer.params["w_router"]                           # (N, E)
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :layer.config.k]   # (N, K)
    f = np.bincount(ids.ravel(), minlength=E) / ids.size            # (E,) before any drop
    expected = 0.7 * E * np.sum(f * softmax(logits).mean(axis=0))
    assert layer.stats.num_dropped > 0
    assert layer.aux == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_bias", "noisy_topk", "expert_choice"])
def test_z_loss_is_computed_from_the_clean_router_logits(router):
    """Caught: the z-loss fed the noisy logits H (noisy_topk) or the probabilities."""
    fields = {"capacity_factor": 1.0} if router == "expert_choice" else {}
    layer = layer_for(router, z_coef=0.3, **fields)                 # training: noise is drawn
    x = tokens()
    layer.forward(x)
    logits = x @ layer.params["w_router"]
    lse = np.log(np.exp(logits).sum(axis=1))                        # (N,)
    assert layer.aux == pytest.approx(0.3 * np.mean(lse**2), rel=1e-12)


def test_cv_loss_is_importance_plus_load_estimate():
    """Caught: the load CV^2 computed on hard counts instead of the smooth load estimate."""
    layer = layer_for("noisy_topk", cv_coef=0.2).eval()             # eval: no noise, H = logits
    x = tokens()
    layer.forward(x)
    logits = x @ layer.params["w_router"]                           # (N, E)
    std = np.log1p(np.exp(x @ layer.params["w_noise"]))             # (N, E)
    order = np.argsort(-logits, axis=1, kind="stable")
    weights = softmax(np.take_along_axis(logits, order[:, :2], 1))  # (N, K)
    importance = np.zeros(E)
    np.add.at(importance, order[:, :2], weights)
    load = np.zeros(E)
    for n in range(len(x)):
        for i in range(E):
            others = np.delete(logits[n], i)
            thr = np.sort(others)[::-1][1]                          # K-th largest excluding i
            load[i] += 0.5 * (1 + math.erf((logits[n, i] - thr) / std[n, i] / math.sqrt(2)))
    expected = 0.2 * (cv_squared_forward(importance)[0] + cv_squared_forward(load)[0])
    assert layer.aux == pytest.approx(expected, rel=1e-10)


# -- each router kind's observable contract -----------------------------------------------

def test_switch_weight_is_the_probability_and_the_router_learns_from_the_task():
    """Caught: 'switch' mapped to the renormalised router (weight 1, no task gradient)."""
    layer = layer_for("switch").eval()
    x = tokens()
    layer.forward(x)
    p = softmax(x @ layer.params["w_router"])
    ids = layer.stats.ids
    assert np.allclose(layer.stats.weights, np.take_along_axis(p, ids, 1), rtol=1e-13)
    layer.backward(np.cos(layer.forward(x)))
    assert np.abs(layer.grads["w_router"]).max() > 1e-4             # aux is off: task gradient only


def test_renormalised_top1_gets_no_task_gradient():
    layer = layer_for("softmax_topk", k=1).eval()
    x = tokens()
    y = layer.forward(x)
    assert np.array_equal(layer.stats.weights, np.ones((len(x), 1)))
    layer.backward(np.cos(y))
    assert not layer.grads["w_router"].any()


@pytest.mark.parametrize("router, check", [
    ("softmax_topk", lambda p, s, ids, w: np.allclose(w, np.take_along_axis(p, ids, 1)
                                                      / np.take_along_axis(p, ids, 1).sum(1, keepdims=True))),
    ("softmax_topk_raw", lambda p, s, ids, w: np.allclose(w, np.take_along_axis(p, ids, 1))),
    ("topk_softmax", lambda p, s, ids, w: np.allclose(w, softmax(np.take_along_axis(np.log(p), ids, 1)))),
    ("sigmoid_bias", lambda p, s, ids, w: np.allclose(w, np.take_along_axis(s, ids, 1)
                                                      / np.take_along_axis(s, ids, 1).sum(1, keepdims=True))),
])
def test_router_table_weights(router, check):
    """Caught: raw and renormalised routers swapped in the router table."""
    layer = layer_for(router).eval()
    x = tokens()
    layer.forward(x)
    logits = x @ layer.params["w_router"]
    ids, w = layer.stats.ids, layer.stats.weights
    assert np.array_equal(ids, np.argsort(-logits, axis=1, kind="stable")[:, :2])
    assert check(softmax(logits), 1 / (1 + np.exp(-logits)), ids, w)


@pytest.mark.parametrize("n, factor", [(24, 1.0), (10, 1.25), (7, 2.0)])
def test_expert_choice_fills_every_expert_with_exactly_c_tokens(n, factor):
    """Caught: expert choice's capacity computed with K (= 2 by default) as for token choice."""
    layer = layer_for("expert_choice", capacity_factor=factor)
    layer.forward(tokens(n))
    c = min(math.ceil(factor * n / E), n)
    assert np.array_equal(layer.stats.counts, np.full(E, c)) and layer.stats.weights.shape == (E, c)


def test_token_choice_capacity_uses_k():
    layer = layer_for("softmax_topk", capacity_factor=1.0)           # C = ceil(1.0 * 2 * 24 / 4) = 12
    layer.forward(tokens(24))
    assert layer.stats.counts.max() <= 12 and layer._cache.plan.capacity == 12


# -- training against evaluation --------------------------------------------------------------

def _state(layer):
    return {k: v.copy() for k, v in layer.state_dict().items()}


def _unchanged(before, layer):
    return all(np.array_equal(v, layer.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("router, fields", [
    ("noisy_topk", {}),
    ("softmax_topk", {"drop_policy": "random", "capacity_factor": 0.5}),
    ("sigmoid_bias", {"bias_gamma": 0.01}),
])
def test_evaluation_is_deterministic_and_changes_no_state(router, fields):
    """Caught: noise drawn in eval; the random drop order drawn in eval; the bias updated in eval."""
    layer = layer_for(router, **fields).eval()
    x = tokens()
    before = _state(layer)
    assert np.array_equal(layer.forward(x), layer.forward(x))
    assert _unchanged(before, layer)
    layer.train()
    layer.forward(x)
    assert not _unchanged(before, layer)                              # training does move state


def test_random_drop_order_is_fresh_each_training_step_and_reproducible():
    """Caught: one fixed permutation reused for every training forward."""
    def kept_rows(seed, steps=3):
        layer = layer_for("softmax_topk", seed=seed, drop_policy="random", capacity_factor=0.5)
        x = tokens(40)
        return [layer.forward(x) is not None and layer._cache.plan.rows_token.copy() for _ in range(steps)]
    a, b = kept_rows(0), kept_rows(0)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))           # same seed, same drops
    assert not np.array_equal(a[0], a[1])                            # a fresh permutation per step


def test_router_noise_only_while_training():
    layer = layer_for("noisy_topk")
    x = tokens()
    assert not np.array_equal(layer.forward(x), layer.forward(x))
    layer.eval()
    clean = layer.forward(x)
    logits = x @ layer.params["w_router"]
    assert np.array_equal(layer.stats.ids, np.argsort(-logits, axis=1, kind="stable")[:, :2])
    assert np.array_equal(clean, layer.forward(x))


# -- defaults that change behaviour ----------------------------------------------------------

def test_defaults_are_pinned():
    """Caught: a default temperature of 0.5, a router init scale of 1.0, dispatch defaulting to einsum."""
    c = SparseConfig(d_model=D, num_experts=E, d_hidden=H)
    assert (c.router, c.k, c.capacity_factor, c.drop_policy, c.expert, c.num_shared) == \
        ("softmax_topk", 2, None, "position", "mlp", 0)
    assert c.balance_coef == c.z_coef == c.cv_coef == c.bias_gamma == 0.0
    assert c.router_scale == 0.1 and c.precision.compute == "fp32" and c.precision.router == "fp32"
    d = DenseConfig(d_model=D, num_experts=E, d_hidden=H)
    assert (d.gate, d.expert, d.temperature, d.gate_dropout, d.router_scale) == \
        ("softmax", "mlp", 1.0, 0.0, 0.1)
    big = SparseMoE(SparseConfig(d_model=400, num_experts=50, d_hidden=8), seed=0)
    assert big.params["w_router"].std() == pytest.approx(0.1, rel=0.02)
    assert big.params["w1"].std() == pytest.approx(math.sqrt(2 / 400), rel=0.02)   # He init
    assert not big.params["b1"].any() and not big.params["b2"].any()


# -- edge cases ------------------------------------------------------------------------------------

def test_a_single_expert_is_a_plain_ffn():
    layer = SparseMoE(SparseConfig(d_model=D, num_experts=1, d_hidden=H, k=1, balance_coef=1.0), seed=0)
    x = tokens()
    y = layer.forward(x)
    p = layer.params
    expected = np.maximum(x @ p["w1"][0] + p["b1"][0], 0) @ p["w2"][0] + p["b2"][0]
    assert np.allclose(y, expected, rtol=1e-13) and layer.aux == pytest.approx(1.0)


def test_cv_squared_of_a_zero_mean_vector_is_refused():
    with pytest.raises(ValueError, match=r"mean\(v\) must be > 0"):
        cv_squared_forward(np.zeros(4))


def test_linear_and_softmax_accept_extra_leading_axes():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    y, cache = layers.linear_forward(x, w, b)
    assert np.allclose(y[1, 2], x[1, 2] @ w + b)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = layers.linear_backward(dy, cache)
    assert dx.shape == x.shape and np.allclose(dw, x.reshape(-1, 4).T @ dy.reshape(-1, 5))
    p = functional.softmax_forward(x)[0]
    assert np.allclose(p.sum(axis=-1), 1.0)


def test_sparse_layer_lets_its_last_cache_go_as_a_forward_begins_but_keeps_it_on_bad_input(
        monkeypatch):
    """The last step's arrays (h, y_sorted, ...) are freed before this step makes its own, so
    the two never coexist; an input the layer refuses leaves the cache, and its backward, as
    they were."""
    import weakref
    from moe_np import sparse
    config = SparseConfig(d_model=6, num_experts=4, d_hidden=8, k=2)
    layer, twin = SparseMoE(config, seed=2), SparseMoE(config, seed=2)
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((10, 6)), rng.standard_normal((10, 6))     # (N, D) each
    layer.forward(x), twin.forward(x)
    hidden = weakref.ref(layer._cache.experts_cache.hidden[0])             # (M, H) of that step
    with pytest.raises(ValueError, match="x"):
        layer.forward(x.astype(np.float32))                                # a float64 layer
    assert hidden() is not None
    assert np.array_equal(layer.backward(dy), twin.backward(dy))
    seen, inner = [], sparse.sparse_moe_forward
    monkeypatch.setattr(sparse, "sparse_moe_forward", lambda *a, **k: (seen.append(hidden()), inner(*a, **k))[1])
    layer.forward(x)
    assert seen == [None]
