"""Chapter 4: routers, capacity and drop policies, balancing losses, SparseMoE."""
import math
from dataclasses import replace

import numpy as np
import pytest

from moe_np import functional, balance, dispatch, losses, routers
from moe_np.checks.sparse import SPARSE_CASES, sparse_case_inputs
from moe_np.gradcheck import numerical_grad
from moe_np.config import DenseConfig, SparseConfig
from moe_np.dense import dense_moe_backward, dense_moe_forward
from moe_np.dispatch import plan as plan_mod, reference
from moe_np.sparse import SparseMoE, init_sparse_params, sparse_moe_backward, \
    sparse_moe_forward

from conftest import assert_check_passes, checks_of


@pytest.mark.parametrize("name", checks_of(4))
def test_registered_sparse_check_passes(name):
    assert_check_passes(name, seeds=(0, 1))


def test_every_router_and_loss_is_registered():
    names = set(checks_of(4))
    for n in ("router:softmax_topk", "router:topk_softmax", "router:sigmoid_bias",
              "router:noisy_topk", "router:expert_choice", "aux:balance", "aux:z_loss",
              "aux:cv_squared", "aux:importance"):
        assert n in names
    assert {f"sparse_moe[{c}]" for c in SPARSE_CASES} <= names


@pytest.mark.parametrize("case", [c for c in SPARSE_CASES if "cap0.75" in c])
def test_capacity_cases_really_drop(case):
    config, x, params = sparse_case_inputs(case, np.random.default_rng(0))
    (_, _), cache = sparse_moe_forward(x, params, config, rng=11, noise=None, bias=np.zeros(3))
    assert cache.plan.num_dropped > 0


# -- routers -----------------------------------------------------------------------

def test_k1_with_renormalisation_gives_the_router_exactly_zero_gradient(rng):
    logits = rng.standard_normal((6, 4))                             # (N, E)
    (ids, w), cache = routers.softmax_topk_forward(logits, 1, renormalize=True)
    assert np.array_equal(w, np.ones((6, 1)))
    dw = rng.standard_normal((6, 1))
    assert np.array_equal(routers.softmax_topk_backward(dw, cache), np.zeros((6, 4)))
    f = lambda: routers.softmax_topk_forward(logits, 1, renormalize=True)[0][1]
    assert np.array_equal(numerical_grad(f, logits, dw), np.zeros((6, 4)))
    # Switch's choice, w = p, does pass gradient
    (_, _), cache = routers.softmax_topk_forward(logits, 1, renormalize=False)
    assert np.abs(routers.softmax_topk_backward(dw, cache)).max() > 1e-3


def test_renormalised_softmax_topk_is_topk_softmax(rng):
    logits = 3 * rng.standard_normal((7, 5))                         # (N, E)
    p = functional.softmax_forward(logits)[0]
    (ids, w), _ = routers.softmax_topk_forward(logits, 2)
    literal = np.take_along_axis(p, ids, 1) / np.take_along_axis(p, ids, 1).sum(1, keepdims=True)
    assert np.allclose(w, literal, rtol=1e-14, atol=1e-16)
    (ids2, w2), _ = routers.topk_softmax_forward(logits, 2)
    assert np.array_equal(ids, ids2) and np.array_equal(w, w2)


def test_unselected_experts_get_exactly_zero_gradient(rng):
    logits = rng.standard_normal((6, 5))
    for fwd, bwd in [(routers.topk_softmax_forward, routers.topk_softmax_backward),
                     (routers.sigmoid_topk_forward, routers.sigmoid_topk_backward)]:
        (ids, w), cache = fwd(logits, 2)
        d = bwd(rng.standard_normal(w.shape), cache)
        selected = np.zeros_like(logits, bool); np.put_along_axis(selected, ids, True, 1)
        assert np.all(d[~selected] == 0)


def test_top_k_indices_best_first_ties_to_lower_index():
    assert routers.top_k_indices(np.array([[1.0, 3.0, 3.0, 2.0]]), 3).tolist() == [[1, 2, 3]]


def test_sigmoid_bias_changes_selection_not_weights():
    logits = np.array([[2.0, 1.0, 0.0]])
    (ids, w), _ = routers.sigmoid_topk_forward(logits, 1)
    (ids_b, w_b), _ = routers.sigmoid_topk_forward(logits, 1, bias=np.array([0.0, 0.0, 5.0]))
    assert ids.tolist() == [[0]] and ids_b.tolist() == [[2]]
    (ids2, w2), _ = routers.sigmoid_topk_forward(logits, 2, bias=np.array([0.0, 0.1, 0.0]))
    (ids3, w3), _ = routers.sigmoid_topk_forward(logits, 2)
    assert np.array_equal(np.sort(ids2), np.sort(ids3))
    s = 1 / (1 + np.exp(-logits[0, :2]))
    assert np.allclose(np.sort(w2[0]), np.sort(s / s.sum()))


def test_normal_cdf_known_values():
    assert functional.normal_cdf(0.0) == 0.5
    assert functional.normal_cdf(1.0) == pytest.approx(0.8413447460685429, abs=1e-15)
    z = np.linspace(-6, 6, 25)
    assert np.allclose(functional.normal_cdf(-z), 1 - functional.normal_cdf(z), atol=1e-15)
    assert math.erf(1.0) == pytest.approx(0.8427007929497149, abs=1e-16)


def test_noisy_load_is_the_probability_of_staying_selected(rng):
    """Monte Carlo: redraw one noise entry; the selection frequency matches Phi(z)."""
    x, wg, wn = rng.standard_normal((1, 3)), rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    noise = rng.standard_normal((1, 4))
    (ids, w, load), _ = routers.noisy_topk_forward(x @ wg, x, wn, noise, 2)
    draws = np.random.default_rng(5).standard_normal(20000)
    for i in range(4):
        hits = 0
        for eps in draws[:4000]:
            trial = noise.copy(); trial[0, i] = eps
            hits += i in routers.noisy_topk_forward(x @ wg, x, wn, trial, 2)[0][0][0]
        assert hits / 4000 == pytest.approx(load[i], abs=0.03)


def test_expert_choice_gives_every_expert_exactly_c_tokens(rng):
    logits = rng.standard_normal((10, 3))
    (tokens, w), _ = routers.expert_choice_forward(logits, 4)
    p = functional.softmax_forward(logits)[0]
    assert tokens.shape == (3, 4)
    for e in range(3):
        assert set(tokens[e]) == set(np.argsort(-p[:, e])[:4])
        assert np.allclose(w[e], p[tokens[e], e])


# -- capacity and drop policies -------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    ((8, 4, 2, 1.0), 4),          # K N / E = 4
    ((10, 4, 1, 1.25), 4),        # ceil(3.125)
    ((10, 4, 1, 1.0, 4), 4),      # min_capacity wins
    ((100, 8, 2, 1.25), 32),      # ceil(31.25)
    ((0, 4, 2, 1.0, 2), 2),
])
def test_capacity_formula(args, expected):
    assert dispatch.capacity(*args) == expected


def test_first_choices_win_over_second_choices():
    ids = np.array([[1, 0],    # token 0: second choice is expert 0
                    [0, 1]])   # token 1: first choice is expert 0
    slot, counts = plan_mod.assign_slots(ids, 2, 1, np.arange(2))
    assert slot.tolist() == [[0, -1], [0, -1]]      # token 1's first choice took expert 0's slot
    assert counts.tolist() == [1, 1]


def test_drop_policies_pick_different_tokens_but_drop_as_many():
    ids = np.zeros((6, 1), int)                                       # all six want expert 0
    weights = np.array([[0.2], [0.9], [0.5], [0.95], [0.1], [0.6]])
    kept = {}
    for policy in dispatch.POLICIES:
        order = dispatch.token_order(weights, policy, rng=3)
        slot, _ = plan_mod.assign_slots(ids, 1, 3, order)
        kept[policy] = set(np.flatnonzero(slot[:, 0] >= 0))
        assert len(kept[policy]) == 3
    assert kept["position"] == {0, 1, 2}
    assert kept["priority"] == {1, 3, 5}
    order_again = dispatch.token_order(weights, "random", rng=3)
    assert np.array_equal(order_again, dispatch.token_order(weights, "random", rng=3))


def test_priority_orders_second_choices_by_the_top_weight():
    """Priority claims every rank in the order of the token's *top* weight, so with
    renormalised top-2 weights it can drop the heavier second choice: here position drops
    token 1's second choice (0.1), priority drops token 0's (0.4). Fails if priority ordered
    each rank by that rank's own weight."""
    ids = np.array([[1, 2], [0, 2]])                                 # both second choices want expert 2
    weights = np.array([[0.6, 0.4], [0.9, 0.1]])
    dropped = {}
    for policy in ("position", "priority"):
        slot, _ = plan_mod.assign_slots(ids, 3, 1, dispatch.token_order(weights, policy))
        dropped[policy] = float(weights[slot < 0].sum())
    assert dropped == {"position": pytest.approx(0.1), "priority": pytest.approx(0.4)}


def test_dropless_keeps_everything(rng):
    ids = routers.top_k_indices(rng.standard_normal((20, 4)), 2)
    slot, counts = plan_mod.assign_slots(ids, 4, None, np.arange(20))
    assert np.all(slot >= 0) and counts.sum() == 40


def test_plan_gather_combine_match_loops(rng):
    ids = routers.top_k_indices(rng.standard_normal((9, 4)), 2)      # (N, K)
    w = rng.uniform(size=(9, 2))
    slot, _ = plan_mod.assign_slots(ids, 4, 3, np.arange(9))
    plan = plan_mod.plan_token_choice(ids, 4, 3, np.arange(9))
    x = rng.standard_normal((9, 5))
    xs, _ = reference.gather_forward(x, plan)
    y_sorted = rng.standard_normal(xs.shape)
    y, _ = reference.combine_forward(y_sorted, w, plan)
    expected = np.zeros((9, 5))
    for m, (tok, widx) in enumerate(zip(plan.rows_token, plan.rows_weight)):
        n, k = divmod(widx, 2)
        assert n == tok and slot[n, k] >= 0
        assert np.array_equal(xs[m], x[n])
        expected[n] += w[n, k] * y_sorted[m]
    assert np.allclose(y, expected)
    assert plan.num_dropped == int((slot < 0).sum()) > 0
    for n in range(9):   # token_rows is the inverse map: each token's rows, -1 where dropped
        for k in range(2):
            row = plan.token_rows[n, k]
            assert (row < 0) == (slot[n, k] < 0) and (row < 0 or plan.rows_weight[row] == 2 * n + k)
    for e in range(4):   # segments are expert-contiguous and in slot order
        seg = plan.rows_weight[plan.offsets[e]:plan.offsets[e + 1]]
        assert np.all(ids.ravel()[seg] == e) and np.all(np.diff(slot.ravel()[seg]) == 1)


# -- balancing losses -------------------------------------------------------------------

def _balance_per_token(probs, ids):
    """E sum_i (c_i / N) P_i, written out: the Mixtral-style counts (they sum to K)."""
    n, e = probs.shape
    return e * np.sum(np.bincount(ids.ravel(), minlength=e) / n * probs.mean(axis=0))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_balance_loss_bounds_under_both_normalisations(k):
    """Counts over N K: 1 at perfect balance, E / K at collapse; counts over N: K and E.
    Fails if balance_loss_forward divides the counts by N (it then returns K and E) or
    forgets the factor E (1/E and 1/K)."""
    e, n = 8, 64
    uniform = np.full((n, e), 1 / e)                                 # (N, E)
    balanced_ids = (np.arange(n)[:, None] + np.arange(k)) % e        # every expert N K / E times
    onehot = np.zeros((n, e)); onehot[:, 0] = 1.0                    # all probability on expert 0
    collapsed_ids = np.tile(np.arange(k), (n, 1))                    # every token picks 0..K-1
    assert balance.balance_loss_forward(uniform, balanced_ids)[0] == pytest.approx(1.0, abs=1e-14)
    assert balance.balance_loss_forward(onehot, collapsed_ids)[0] == pytest.approx(e / k, abs=1e-14)
    assert _balance_per_token(uniform, balanced_ids) == pytest.approx(k, abs=1e-14)
    assert _balance_per_token(onehot, collapsed_ids) == pytest.approx(e, abs=1e-14)
    # GShard counts first choices only: 1 and E whatever K is
    assert balance.balance_loss_forward(onehot, collapsed_ids[:, :1])[0] == pytest.approx(e)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_balance_loss_never_exceeds_e_over_k(k, rng):
    """f_i <= 1/K and sum_i P_i = 1 bound the loss by E / K for any routing; the per-token
    form is exactly K times it. Fails if the counts are divided by N."""
    for trial in range(20):
        probs = functional.softmax_forward(4 * rng.standard_normal((50, 8)))[0]   # (N, E)
        ids = routers.top_k_indices(probs, k)
        value = balance.balance_loss_forward(probs, ids)[0]
        assert value <= 8 / k + 1e-12
        assert _balance_per_token(probs, ids) == pytest.approx(k * value, rel=1e-13)


def test_balance_loss_can_dip_below_one():
    """1 is the value at balance, not a lower bound: 3 tokens pick expert 0 with p = 0.51,
    one picks expert 1 with p = 0.99. f = (3/4, 1/4), P = (0.385, 0.615), L = 2 f.P = 0.885."""
    probs = np.array([[0.51, 0.49]] * 3 + [[0.01, 0.99]])
    ids = probs.argmax(axis=1)[:, None]
    assert balance.balance_loss_forward(probs, ids)[0] == pytest.approx(0.885, abs=1e-12)


def test_z_loss_of_zero_logits_is_log_e_squared():
    assert balance.z_loss_forward(np.zeros((5, 6)))[0] == pytest.approx(np.log(6) ** 2)


def test_z_loss_gradient_is_two_lse_times_softmax_over_n(rng):
    """dL_z/dz[n, j] = 2 lse_n p[n, j] / N (the chapter's derivation), times the upstream
    scalar. Fails if the factor 2, the 1/N or the lse factor is dropped."""
    logits = 2 * rng.standard_normal((7, 5))                         # (N, E)
    value, cache = balance.z_loss_forward(logits)
    lse = np.log(np.exp(logits).sum(axis=1))                         # (N,)
    p = np.exp(logits - lse[:, None])                                # (N, E)
    assert value == pytest.approx(np.mean(lse**2), rel=1e-13)
    expected = 0.3 * 2 * lse[:, None] * p / 7                        # (N, E)
    assert np.allclose(balance.z_loss_backward(0.3, cache), expected, rtol=1e-12, atol=1e-15)


def test_z_loss_is_zero_when_the_logits_are_log_probabilities(rng):
    """The minimum of the z-loss is lse = 0, i.e. logits = log p, not zero logits."""
    logp = np.log(functional.softmax_forward(rng.standard_normal((6, 4)))[0])   # (N, E)
    value, cache = balance.z_loss_forward(logp)
    assert value < 1e-28
    assert np.abs(balance.z_loss_backward(1.0, cache)).max() < 1e-14


def test_cv_squared_known_answers():
    assert balance.cv_squared_forward(np.full(4, 2.5))[0] == 0.0
    assert balance.cv_squared_forward(np.array([0.0, 0.0, 0.0, 4.0]))[0] == pytest.approx(3.0)


def test_selection_bias_update_moves_toward_balance():
    ids = np.array([[0], [0], [0], [1]])                             # loads 3, 1, 0
    b = balance.update_selection_bias(np.zeros(3), ids, gamma=0.01)
    assert b.tolist() == [-0.01, 0.01, 0.01]


# -- the sparse layer ----------------------------------------------------------------------

@pytest.mark.parametrize("router", ["softmax_topk", "softmax_topk_raw"])
@pytest.mark.parametrize("expert", ["mlp", "swiglu"])
def test_k_equals_e_without_capacity_is_the_dense_moe(router, expert, rng):
    config = SparseConfig(d_model=4, num_experts=3, d_hidden=6, router=router, k=3, expert=expert,
                          router_scale=1.0)
    params = init_sparse_params(config, rng)
    x = rng.standard_normal((7, 4))
    (y, _), cache = sparse_moe_forward(x, params, config)
    dense = {"b_router": np.zeros(3)} | params
    dense_config = DenseConfig(d_model=4, num_experts=3, d_hidden=6, expert=expert)
    y_dense, dense_cache = dense_moe_forward(x, dense, dense_config)
    assert np.allclose(y, y_dense, rtol=1e-13, atol=1e-14)
    dy = rng.standard_normal(y.shape)
    dx, grads = sparse_moe_backward((dy, 0.0), cache)
    dx_d, grads_d = dense_moe_backward(dy, dense_cache)
    assert np.allclose(dx, dx_d, rtol=1e-12, atol=1e-13)
    assert np.allclose(grads["w_router"], grads_d["w_router"], rtol=1e-12, atol=1e-13)


def test_a_dropped_token_gets_exactly_zero_and_gives_zero_gradient(rng):
    config = SparseConfig(d_model=4, num_experts=2, d_hidden=5, router="softmax_topk", k=1,
                          capacity_factor=0.25, router_scale=1.0)              # C = 1
    params = init_sparse_params(config, rng)
    x = rng.standard_normal((6, 4))
    (y, _), cache = sparse_moe_forward(x, params, config)
    plan = cache.plan
    dropped_tokens = np.setdiff1d(np.arange(6), plan.rows_token)
    experts_used = len(np.unique(cache.route.ids))                   # each keeps C = 1 token
    assert plan.num_dropped == len(dropped_tokens) == 6 - experts_used >= 4
    assert np.array_equal(y[dropped_tokens], np.zeros((len(dropped_tokens), 4)))
    dy = rng.standard_normal(y.shape)
    dx, _ = sparse_moe_backward((dy, 0.0), cache)
    dy_sorted, dw = dispatch.get_strategy(config.dispatch).combine_backward(dy, cache.combine_cache)
    assert np.all(dw[dropped_tokens] == 0)
    # no expert saw the token and its (renormalised, K = 1) weight is constant: no path to the loss
    assert np.array_equal(dx[dropped_tokens], np.zeros((len(dropped_tokens), 4)))


def test_shared_experts_add_to_every_token(rng):
    config = SparseConfig(d_model=4, num_experts=2, d_hidden=5, num_shared=2, router="softmax_topk",
                          k=1, capacity_factor=0.25)
    params = init_sparse_params(config, rng)
    x = rng.standard_normal((6, 4))
    (y, _), cache = sparse_moe_forward(x, params, config)
    routed = {k: v for k, v in params.items() if not k.startswith("shared_")}
    (y_routed, _), _ = sparse_moe_forward(x, routed, replace(config, num_shared=0))
    from moe_np.experts import mlp_experts_forward
    shared = mlp_experts_forward(x, *(params["shared_" + k] for k in ("w1", "b1", "w2", "b2")))[0]
    assert np.allclose(y, y_routed + shared.sum(0))


def test_shared_expert_gets_the_full_upstream_gradient_of_every_token(rng):
    """Under capacity drops, the shared expert's gradients are those of the expert alone fed
    every token's dy (weight 1, nothing dropped), and a dropped token's output is the shared
    expert's. Fails if the shared path is scaled by the routing weights or masked by the plan."""
    from moe_np.experts import mlp_experts_backward, mlp_experts_forward
    config = SparseConfig(d_model=4, num_experts=3, d_hidden=5, num_shared=1, router="switch",
                          k=1, capacity_factor=0.5)
    params = init_sparse_params(config, rng)
    x, dy = rng.standard_normal((12, 4)), rng.standard_normal((12, 4))
    (y, _), cache = sparse_moe_forward(x, params, config)
    _, grads = sparse_moe_backward((dy, 0.0), cache)
    names = ("w1", "b1", "w2", "b2")
    y_alone, alone_cache = mlp_experts_forward(x, *(params["shared_" + k] for k in names))
    expected = mlp_experts_backward(dy[None], alone_cache)[1:]
    for name, g in zip(names, expected):
        assert np.allclose(grads["shared_" + name], g, rtol=1e-13, atol=1e-15)
    lost = np.flatnonzero(cache.plan.token_rows[:, 0] < 0)
    assert len(lost) > 0
    assert np.array_equal(y[lost], y_alone[0][lost])


def test_sparse_layer_trains_and_reports_drops(rng):
    from moe_np import data
    from moe_np.optim import Adam
    from moe_np.training import fit
    x, y, _ = data.make_regions(800, seed=1)
    layer = SparseMoE(SparseConfig(d_model=2, num_experts=4, d_hidden=8, k=2, capacity_factor=1.25,
                                   balance_coef=0.01), seed=0)
    hist = fit(layer, x, y, losses.mse_forward, losses.mse_backward, Adam(layer.params, 1e-2),
               steps=150, batch_size=64)
    assert np.mean(hist[-20:]) < 0.5 * np.mean(hist[:5])
    assert layer.stats.num_dropped >= 0 and layer.stats.counts.sum() <= 128


def test_sigmoid_layer_updates_its_bias_toward_balance(rng):
    layer = SparseMoE(SparseConfig(d_model=4, num_experts=4, d_hidden=5, router="sigmoid_bias", k=1,
                                   bias_gamma=0.01), seed=0)
    layer.params["w_router"][:, 0] += 3.0                            # expert 0 overloaded
    x = np.abs(rng.standard_normal((64, 4)))
    for _ in range(30):
        layer.forward(x)
    bias = layer.buffers["selection_bias"]
    assert bias[0] < 0 and bias[1:].max() > 0


# -- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: routers.softmax_topk_forward(np.zeros((2, 3)), 4), "k=4 exceeds num_experts=3"),
    (lambda: routers.topk_softmax_forward(np.zeros((2, 3)), 0), "k must be an integer >= 1, got 0"),
    (lambda: routers.sigmoid_topk_forward(np.array([[0.0, np.nan]]), 1), "logits has 1 non-finite"),
    (lambda: routers.softmax_topk_forward(np.array([[np.inf, 0.0]]), 1), "logits has 1 non-finite"),
    (lambda: routers.sigmoid_topk_forward(np.zeros((2, 3)), 1, bias=np.zeros(2)), "bias must have shape"),
    (lambda: routers.softmax_topk_forward(np.zeros(3), 1), "logits must have 2 dimensions"),
    (lambda: routers.expert_choice_forward(np.zeros((4, 2)), 5), r"capacity must be in \[1, N=4\], got 5"),
    (lambda: routers.noisy_topk_forward(np.zeros((2, 2)), np.zeros((2, 3)), np.zeros((3, 2)),
                                        np.zeros((2, 2)), 2), "k=2 must be < num_experts=2"),
    (lambda: routers.noisy_topk_forward(np.zeros((2, 2)), np.zeros((2, 4)), np.zeros((3, 2)),
                                        np.zeros((2, 2)), 1), r"w_noise must have shape \(4, 2\)"),
    (lambda: dispatch.capacity(8, 4, 2, 0.0), "capacity_factor must be > 0, got 0.0"),
    (lambda: dispatch.capacity(8, 4, 2, -1.0), "capacity_factor must be > 0"),
    (lambda: cfg(capacity_factor=0.0), "capacity_factor must be > 0"),
    (lambda: cfg(k=0), "k must be an integer >= 1, got 0"),
    (lambda: cfg(router="hash"), "router must be one of"),
    (lambda: cfg(drop_policy="lifo"), "drop_policy must be one of"),
    (lambda: cfg(dispatch="cuda"), "dispatch must be one of"),
    (lambda: cfg(router="expert_choice"), "expert_choice needs a capacity_factor"),
    (lambda: cfg(router="switch", k=2), "one expert, got k=2"),
    (lambda: cfg(router="sigmoid_bias", balance_coef=0.1), "balance_coef needs a softmax router"),
    (lambda: cfg(router="softmax_topk", cv_coef=0.1), "cv_coef .* needs router='noisy_topk'"),
    (lambda: cfg(bias_gamma=0.1), "needs router='sigmoid_bias'"),
    (lambda: cfg(num_experts=2, k=3), "k=3 exceeds num_experts=2"),
    (lambda: cfg(num_experts=0), "num_experts must be an integer >= 1, got 0"),
    (lambda: SparseMoE(cfg()).forward(np.zeros((2, 5))), r"w_router must have shape \(5, 3\)"),
    (lambda: SparseMoE(cfg()).forward(np.full((2, 4), np.nan)), "x has 8 non-finite"),
    (lambda: SparseMoE(cfg()).forward(np.zeros((2, 4), np.float32)), "x is float32 but the parameters are float64"),
    (lambda: balance.balance_loss_forward(np.zeros((3, 2)), np.zeros((4, 1), int)), "probs has N=3 rows but ids has 4"),
])
def test_bad_sparse_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- the checks can fail ---------------------------------------------------------------

def cfg(**fields):
    """A small SparseConfig (D=4, E=3, H=5) with some fields changed."""
    return SparseConfig(**({"d_model": 4, "num_experts": 3, "d_hidden": 5} | fields))


def _weights_only(logits, k, renormalize=False):
    (ids, w), cache = routers.softmax_topk_forward(logits, k, renormalize)
    return w, cache


def test_the_guard_refuses_a_check_that_straddles_a_top_k_kink():
    from moe_np.gradcheck import check_pair
    logits = np.array([[1.0, 1.0 + 1e-4, -0.5], [0.3, -1.0, 2.0]])  # experts 0 and 1 nearly tie
    with pytest.raises(ValueError, match="selection changed"):
        check_pair("near tie", _weights_only, routers.softmax_topk_backward, {"logits": logits},
                   static={"k": 1}, selection=lambda logits, k: routers.top_k_indices(logits, k))


def test_a_router_backward_that_skips_the_softmax_fails_its_check(rng):
    from moe_np.gradcheck import check_pair
    from moe_np.checks.sparse import separated_logits

    def backward_without_softmax(dw, cache):
        out = np.zeros(cache.softmax_cache[0].shape)
        np.put_along_axis(out, cache.ids, dw, axis=1)                   # bug: treats w as the logits
        return out

    rows = check_pair("broken router", _weights_only, backward_without_softmax,
                      {"logits": separated_logits(rng)}, static={"k": 2},
                      selection=lambda logits, k: routers.top_k_indices(logits, k))
    assert not rows[0].passed and rows[0].rel_error > 1e-2
