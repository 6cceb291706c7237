"""Chapter 8: differentiable routers (ReMoE, Soft MoE) and sparse upcycling. Checks, known values, wiring."""
import numpy as np
import pytest

from moe_np import SparseConfig
from moe_np.checks.differentiable import CHECKS, remoe_inputs
from moe_np.dispatch.plan import plan_token_choice
from moe_np.experts import init_experts
from moe_np.gradcheck import check_pair
from moe_np.models import FFN, MLP
from moe_np.optim import SGD, Adam
from moe_np.remoe import ReMoE, ReMoEConfig, active_plan, remoe_backward, remoe_forward, \
    remoe_selection, update_l1_coef
from moe_np.soft import SoftMoE, SoftMoEConfig, soft_moe_forward
from moe_np.upcycle import expert_spread, upcycle

from conftest import assert_check_passes, checks_of

D, E, H = 4, 3, 5


@pytest.mark.parametrize("name", CHECKS)
def test_registered_check_passes(name):
    assert name in checks_of(8)
    assert_check_passes(name, seeds=(0, 1))


def test_the_guard_sees_a_router_logit_at_the_kink():
    """Token 0's logit for expert 0 put 1e-4 above 0: an x step of h = 1e-3 switches the expert
    off, and the check must refuse rather than report a number. (SwiGLU experts have no kink of
    their own, so only the router's active pattern can raise.)"""
    x, params = remoe_inputs(np.random.default_rng(0), "swiglu")
    w0 = params["w_router"][:, 0]
    x[0] -= (x[0] @ w0 - 1e-4) * w0 / (w0 @ w0)                        # x[0] . w0 = 1e-4
    forward = lambda x, **p: remoe_forward(x, p, "swiglu", 0.3)
    backward = lambda dout, cache: {"x": remoe_backward(dout, cache)[0]}
    pick = lambda x, **p: remoe_selection(forward(x, **p)[1])
    with pytest.raises(ValueError, match="selection changed"):
        check_pair("remoe", forward, backward, {"x": x} | params, wrt=["x"], selection=pick)


def relu_expert(params, e, x):
    """Expert e of a stacked ReLU MLP on rows x, written out."""
    return np.maximum(x @ params["w1"][e] + params["b1"][e], 0) @ params["w2"][e] + params["b2"][e]


def float_arrays(obj):
    """Every float ndarray in a (nested) cache."""
    if isinstance(obj, np.ndarray):
        return [obj] if np.issubdtype(obj.dtype, np.floating) else []
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [a for v in obj for a in float_arrays(v)]
    return []


# -- Soft MoE -----------------------------------------------------------------------------------

def soft_layer(num_slots=2, expert="mlp", dtype=np.float64):
    return SoftMoE(SoftMoEConfig(d_model=D, num_experts=E, d_hidden=H, num_slots=num_slots,
                                 expert=expert), seed=0, dtype=dtype)


def test_soft_dispatch_columns_and_combine_rows_sum_to_one():
    layer = soft_layer()
    layer.forward(3 * np.random.default_rng(0).standard_normal((7, D)))
    s = layer.stats
    assert s.dispatch.shape == s.combine.shape == (7, E * 2)
    assert np.allclose(s.dispatch.sum(axis=0), 1, rtol=0, atol=1e-14)   # over tokens, per slot
    assert np.allclose(s.combine.sum(axis=1), 1, rtol=0, atol=1e-14)    # over slots, per token
    assert not np.allclose(s.dispatch.sum(axis=1), 1)                  # not the other way round


def test_soft_with_zero_phi_every_slot_is_the_token_mean():
    """One slot per expert, Phi = 0: dispatch is 1/N, each slot is mean(x), combine is 1/E, so every
    token gets (1/E) sum_e f_e(mean x)."""
    layer = soft_layer(num_slots=1)
    layer.params["phi"][...] = 0
    x = np.random.default_rng(1).standard_normal((6, D))
    y = layer.forward(x)
    assert np.allclose(layer.stats.dispatch, 1 / 6, rtol=1e-15)
    mean = x.mean(axis=0, keepdims=True)                               # (1, D)
    expected = sum(relu_expert(layer.params, e, mean) for e in range(E)) / E   # (1, D)
    assert np.allclose(y, np.repeat(expected, 6, axis=0), rtol=1e-13, atol=1e-15)


def test_soft_against_a_loop_over_slots():
    layer = soft_layer(num_slots=2)
    p = layer.params
    x = np.random.default_rng(2).standard_normal((5, D))
    logits = x @ p["phi"]
    disp = np.exp(logits) / np.exp(logits).sum(axis=0)
    comb = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y_slot = [relu_expert(p, j // 2, sum(disp[n, j] * x[n] for n in range(5))) for j in range(E * 2)]
    expected = np.array([sum(comb[n, j] * y_slot[j] for j in range(E * 2)) for n in range(5)])
    assert np.allclose(layer.forward(x), expected, rtol=1e-12)


def test_soft_moe_is_not_causal():
    """Changing the last token changes the first token's output: every slot mixes every token."""
    layer = soft_layer()
    x = np.random.default_rng(3).standard_normal((6, D))
    y = layer.forward(x)
    x2 = x.copy()
    x2[-1] += 1.0
    assert np.abs(layer.forward(x2)[0] - y[0]).max() > 1e-4


# -- ReMoE --------------------------------------------------------------------------------------

def remoe_layer(k=1, num_experts=E, dtype=np.float64, **fields):
    return ReMoE(ReMoEConfig(d_model=D, num_experts=num_experts, d_hidden=H, k=k, **fields),
                 seed=0, dtype=dtype)


def test_remoe_with_every_router_logit_negative_outputs_exactly_zero():
    layer = remoe_layer()
    layer.params["w_router"][...] = -np.abs(layer.params["w_router"]) - 0.1
    layer.params["b2"][...] = 1.0                                      # an expert that ran would show
    x = np.abs(np.random.default_rng(0).standard_normal((5, D)))       # x W_router < 0 everywhere
    y = layer.forward(x)
    assert not y.any() and layer.aux == 0.0
    assert not layer.stats.active.any() and layer.stats.sparsity == 1.0
    dx = layer.backward(np.random.default_rng(1).standard_normal(y.shape))
    assert not dx.any() and not any(g.any() for g in layer.grads.values())


def test_remoe_output_and_each_expert_runs_on_its_active_tokens_only():
    layer = remoe_layer(num_experts=4)
    p = layer.params
    p["w_router"] *= 10
    x = np.random.default_rng(4).standard_normal((9, D))
    y = layer.forward(x)
    w = np.maximum(x @ p["w_router"], 0)                               # (N, E)
    expected = sum(w[:, [e]] * relu_expert(p, e, x) for e in range(4))
    assert np.allclose(y, expected, rtol=1e-12)
    active = w > 0
    assert 0 < active.sum() < active.size
    assert np.array_equal(layer.stats.counts, active.sum(axis=0))      # rows per expert
    assert np.array_equal(layer.stats.active, active.sum(axis=1))      # experts per token
    assert layer.stats.sparsity == pytest.approx(1 - active.mean())
    assert layer.stats.l1 == pytest.approx(w.sum() / 9)


def test_active_plan_is_the_dispatch_spec_with_the_relu_pattern_as_eligibility():
    active = np.random.default_rng(7).random((9, 4)) < 0.4             # (N, E), some rows empty
    active[:, 2] = False                                               # an expert with no token
    ids = np.tile(np.arange(4), (9, 1))
    spec = plan_token_choice(ids, 4, None, np.arange(9), eligible=active)
    mine = active_plan(active)
    for field in ("rows_token", "rows_weight", "offsets", "token_rows"):
        assert np.array_equal(getattr(mine, field), getattr(spec, field)), field
    assert mine.num_dropped == spec.num_dropped == 0 and mine.capacity is None


def test_controller_rule_steps_in_the_right_direction():
    """Too few zeros (sparsity under target): lambda grows by alpha; too many: it shrinks."""
    assert update_l1_coef(1.0, sparsity=0.2, target=0.75, alpha=1.2) == pytest.approx(1.2)
    assert update_l1_coef(1.0, sparsity=0.9, target=0.75, alpha=1.2) == pytest.approx(1 / 1.2)
    assert update_l1_coef(1.0, sparsity=0.75, target=0.75, alpha=1.2) == 1.0


def test_layer_controller_uses_this_forward_and_steps_after_it():
    x = np.random.default_rng(5).standard_normal((40, D))
    sparse_target = remoe_layer(k=1, l1_init=0.5)                      # target sparsity 2/3 > ~1/2
    sparse_target.forward(x)
    assert sparse_target.stats.sparsity < 2 / 3
    assert sparse_target.aux == pytest.approx(0.5 * sparse_target.stats.l1)   # the old lambda
    assert float(sparse_target.buffers["l1_coef"]) == pytest.approx(0.5 * 1.2)
    dense_target = remoe_layer(k=E, l1_init=0.5)                       # target sparsity 0 < ~1/2
    dense_target.forward(x)
    assert float(dense_target.buffers["l1_coef"]) == pytest.approx(0.5 / 1.2)


def test_evaluation_freezes_the_controller():
    layer = remoe_layer(l1_init=0.5).eval()
    x = np.random.default_rng(6).standard_normal((20, D))
    y = layer.forward(x)
    assert float(layer.buffers["l1_coef"]) == 0.5
    assert np.array_equal(layer.forward(x), y)
    layer.train().forward(x)
    assert float(layer.buffers["l1_coef"]) != 0.5


def test_state_dict_carries_lambda():
    a, b = remoe_layer(l1_init=0.5), remoe_layer(l1_init=0.1)
    x = np.random.default_rng(8).standard_normal((12, D))
    a.forward(x)
    b.load_state_dict(a.state_dict())
    assert float(b.buffers["l1_coef"]) == float(a.buffers["l1_coef"]) != 0.5
    assert np.array_equal(a.forward(x), b.forward(x)) and a.aux == b.aux


def test_l1_controller_drives_the_active_count_to_the_target():
    """E = 8, K = 2: about half the experts are active at the start (the router's half-spaces),
    and the controller brings the average down to about 2 (inputs offset from 0, see remoe.py)."""
    rng = np.random.default_rng(0)
    layer = ReMoE(ReMoEConfig(d_model=6, num_experts=8, d_hidden=8, k=2, l1_init=1e-3), seed=0)
    opt = Adam(layer.params, lr=1e-2)
    w_task = rng.standard_normal((6, 6))
    active = []
    for _ in range(300):
        x = rng.standard_normal((64, 6)) + 1.0
        y = layer.forward(x)
        layer.backward((y - np.tanh(x @ w_task)) / len(x))
        opt.step(layer.grads)
        active.append(layer.stats.active.mean())
    assert active[0] > 3.5
    assert abs(np.mean(active[-50:]) - 2.0) < 0.3


# -- sparse upcycling ---------------------------------------------------------------------------

def trained_mlp(seed=1, dtype=np.float64):
    """An MLP whose biases are not zero, as after training."""
    mlp = MLP(D, H, D, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    for v in mlp.params.values():
        v += (0.3 * rng.standard_normal(v.shape)).astype(dtype)
    return mlp


def upcycle_config(**fields):
    return SparseConfig(**(dict(d_model=D, num_experts=4, d_hidden=H, router="softmax_topk", k=2)
                           | fields))


@pytest.mark.parametrize("fields", [dict(), dict(router="topk_softmax"), dict(router="sigmoid_bias"),
                                    dict(k=1), dict(capacity_factor=4.0)])
def test_upcycled_layer_equals_the_dense_ffn(fields):
    """Weights summing to 1 per token and no drop: sum_k w_k f(x) = f(x)."""
    mlp = trained_mlp()
    layer = upcycle(mlp.params, upcycle_config(**fields), seed=3)
    x = np.random.default_rng(0).standard_normal((16, D))
    y = layer.forward(x)
    assert layer.stats.num_dropped == 0
    assert np.allclose(y, mlp.forward(x), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("fields", [dict(router="softmax_topk_raw"), dict(capacity_factor=0.5)])
def test_upcycled_equality_needs_unit_weights_and_no_drops(fields):
    mlp = trained_mlp()
    layer = upcycle(mlp.params, upcycle_config(**fields), seed=3)
    x = np.random.default_rng(0).standard_normal((16, D))
    assert not np.allclose(layer.forward(x), mlp.forward(x), rtol=1e-6)


def test_upcycle_keeps_the_dtype_and_takes_an_ffn():
    ffn = FFN(D, H, seed=2, dtype=np.float32)
    layer = upcycle(ffn.params, upcycle_config(), seed=0)
    x = np.random.default_rng(1).standard_normal((8, D)).astype(np.float32)
    y = layer.forward(x)
    assert layer.dtype == y.dtype == np.float32
    assert np.allclose(y, ffn.forward(x), rtol=1e-5, atol=1e-6)
    assert np.array_equal(layer.params["w1"][3], ffn.params["w1"][0])


def test_expert_spread_is_zero_after_upcycling_and_grows_in_training():
    mlp = trained_mlp()
    layer = upcycle(mlp.params, upcycle_config(router_scale=1.0), seed=3)
    assert expert_spread(layer.params) == 0.0
    opt = SGD(layer.params, lr=0.05)
    rng = np.random.default_rng(0)
    w_task = rng.standard_normal((D, D))
    spread = []
    for _ in range(20):
        x = rng.standard_normal((32, D))
        y = layer.forward(x)
        layer.backward((y - np.sin(x @ w_task)) / len(x))
        opt.step(layer.grads)
        spread.append(expert_spread(layer.params))
    assert 0 < spread[0] < spread[4] < spread[-1]


def test_expert_spread_resolves_a_tiny_difference():
    """Two experts 1e-9 apart (relative): a |a|^2 + |b|^2 - 2ab formula would lose it to rounding."""
    rng = np.random.default_rng(0)
    base = trained_mlp().params                                       # w1 (D, H), b1 (H,), ...
    params = {k: np.stack([v, v]) for k, v in base.items()}           # E = 2 identical experts
    delta = {k: 1e-9 * rng.standard_normal(v.shape) for k, v in base.items()}
    for k in params:
        params[k][1] += delta[k]
    flat = lambda d: np.concatenate([d[k].ravel() for k in ("w1", "b1", "w2", "b2")])
    norms = [np.linalg.norm(flat({k: v[e] for k, v in params.items()})) for e in (0, 1)]
    assert expert_spread(params) == pytest.approx(np.linalg.norm(flat(delta)) / np.mean(norms), rel=1e-5)


def test_expert_spread_of_independent_experts_is_about_sqrt_2():
    params = init_experts("mlp", 16, 32, 32, np.random.default_rng(0))
    assert expert_spread(params) == pytest.approx(np.sqrt(2), rel=0.05)


# -- dtypes and bad input -----------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda dt: remoe_layer(dtype=dt, expert="swiglu"),
                                  lambda dt: remoe_layer(dtype=dt), lambda dt: soft_layer(dtype=dt),
                                  lambda dt: soft_layer(dtype=dt, expert="swiglu")])
def test_float32_in_float32_out(make):
    layer = make(np.float32)
    x = np.random.default_rng(0).standard_normal((9, D)).astype(np.float32)
    y = layer.forward(x)
    dx = layer.backward(np.full_like(y, 0.5), aux_scale=np.float64(1.0))
    assert y.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in layer.grads.values())
    assert all(b.dtype == np.float32 for b in layer.buffers.values())
    cached = float_arrays(tuple(layer._cache))
    assert cached and all(a.dtype == np.float32 for a in cached), {a.dtype for a in cached}


@pytest.mark.parametrize("call, message", [
    (lambda: remoe_layer(dtype=np.float32).forward(np.zeros((3, D))),
     "x is float64 but the parameters are float32"),
    (lambda: remoe_layer().forward(np.zeros((3, D + 1))), r"w_router must have shape \(D, E\) = \(5, 3\)"),
    (lambda: remoe_forward(np.zeros((3, D)), {"w_router": np.zeros((D, E))}),
     r"params is missing \['b1', 'b2', 'w1', 'w2'\]"),
    (lambda: remoe_forward(np.zeros((3, D)), remoe_layer().params, l1_coef=-0.1),
     "l1_coef must be >= 0, got -0.1"),
    (lambda: remoe_layer().forward(np.zeros((0, D))), r"at least one token, got shape \(0, 4\)"),
    (lambda: soft_layer(dtype=np.float32).forward(np.zeros((3, D))),
     "x is float64 but the parameters are float32"),
    (lambda: soft_moe_forward(np.zeros((3, D)), soft_layer().params | {"phi": np.zeros((D, 7))}),
     r"phi must have shape \(D, E\*S\) with D=4 and a multiple of E=3 columns, got \(4, 7\)"),
    (lambda: soft_layer().forward(np.zeros(D)), r"x must have 2 dimensions, got shape \(4,\)"),
    (lambda: ReMoEConfig(d_model=D, num_experts=3, d_hidden=H, k=4), "k=4 exceeds num_experts=3"),
    (lambda: ReMoEConfig(d_model=D, num_experts=3, d_hidden=H, alpha=1.0),
     "alpha must be > 1, got alpha=1.0"),
    (lambda: SoftMoEConfig(d_model=D, num_experts=3, d_hidden=H, num_slots=0),
     "num_slots must be an integer >= 1, got 0"),
    (lambda: upcycle(MLP(D, H, D).params, upcycle_config(expert="swiglu")),
     "config.expert must be 'mlp'.*got 'swiglu'"),
    (lambda: upcycle(MLP(D, H, D).params, upcycle_config(num_shared=1)),
     "config.num_shared must be 0.*got 1"),
    (lambda: upcycle(MLP(D, H + 1, D).params, upcycle_config()),
     r"mlp_params\['w1'\] has shape \(4, 6\) but the config \(d_model=4, d_hidden=5\) needs \(4, 5\)"),
    (lambda: upcycle({"w1": np.zeros((D, H))}, upcycle_config()), r"must hold \['w1', 'b1', 'w2', 'b2'\]"),
    (lambda: expert_spread(FFN(D, H).params), "needs at least 2 experts, got E=1"),
])
def test_bad_input_names_the_argument_and_values(call, message):
    with pytest.raises(ValueError, match=message):
        call()
