"""Chapter 2: softmax, temperature and the three gates."""
import numpy as np
import pytest

from moe_np import functional, gates, layers, losses
from moe_np.gradcheck import check_gradient, numerical_grad, rel_error

from conftest import assert_check_passes, checks_of

GATE_CHECKS = ["softmax_gate", "mlp_gate", "per_dim_gate", "gate_dropout"]


def test_every_gate_is_registered_for_chapter_2():
    assert set(GATE_CHECKS) == set(checks_of(2))


@pytest.mark.parametrize("name", checks_of(2))
def test_registered_gate_check_passes(name):
    assert_check_passes(name, seeds=(0, 1, 2))


def test_softmax_is_invariant_to_adding_a_constant(rng):
    z = rng.standard_normal((6, 5))                                # (N, E)
    p = functional.softmax_forward(z)[0]
    for c in (-300.0, 1e-3, 57.0, 700.0):
        assert np.allclose(functional.softmax_forward(z + c)[0], p, rtol=1e-12, atol=1e-15)


def test_softmax_of_huge_logits_is_finite_and_exact():
    p = functional.softmax_forward(np.array([[1000.0, -1000.0], [-1000.0, 1000.0]]))[0]
    assert np.array_equal(p, [[1.0, 0.0], [0.0, 1.0]])
    dz = functional.softmax_backward(np.array([[0.3, -2.0], [1.0, 4.0]]),
                                 functional.softmax_forward(np.array([[1000.0, -1000.0], [-1000.0, 1000.0]]))[1])
    assert np.all(np.isfinite(dz))


def test_vjp_equals_the_explicit_jacobian_product(rng):
    z, g = rng.standard_normal(6), rng.standard_normal(6)          # (E,), (E,)
    p, cache = functional.softmax_forward(z, temperature=0.6)
    jacobian = (np.diag(p) - np.outer(p, p)) / 0.6                 # (E, E)
    assert np.allclose(functional.softmax_backward(g, cache), jacobian.T @ g, rtol=1e-12, atol=1e-15)


def test_temperature_limits():
    z = np.array([1.0, 3.0, 2.0])
    cold = functional.softmax_forward(z, temperature=1e-3)[0]
    hot = functional.softmax_forward(z, temperature=1e6)[0]
    assert np.allclose(cold, [0, 1, 0]) and np.allclose(hot, 1 / 3, atol=1e-5)


def test_gradient_of_summed_softmax_is_zero(rng):
    """Why an all-ones upstream gradient proves nothing about softmax backward."""
    z = rng.standard_normal((4, 5))
    _, cache = functional.softmax_forward(z)
    assert np.abs(functional.softmax_backward(np.ones((4, 5)), cache)).max() < 1e-15
    numeric = numerical_grad(lambda: functional.softmax_forward(z)[0], z, np.ones((4, 5)))
    assert np.abs(numeric).max() < 1e-10


def test_gates_produce_distributions(rng):
    x = rng.standard_normal((7, 4))                                # (N, D)
    g = gates.softmax_gate_forward(x, rng.standard_normal((4, 3)), rng.standard_normal(3))[0]
    assert g.shape == (7, 3) and np.allclose(g.sum(1), 1) and np.all(g > 0)
    g = gates.mlp_gate_forward(x, rng.standard_normal((4, 5)), rng.standard_normal(5),
                               rng.standard_normal((5, 3)), rng.standard_normal(3))[0]
    assert g.shape == (7, 3) and np.allclose(g.sum(1), 1)
    g = gates.per_dim_gate_forward(x, rng.standard_normal((4, 12)), rng.standard_normal(12),
                                   num_experts=3)[0]
    assert g.shape == (7, 3, 4) and np.allclose(g.sum(1), 1)


def test_softmax_gate_backward_by_hand(rng):
    x, w, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    g, cache = gates.softmax_gate_forward(x, w, b, temperature=2.0)
    dg = rng.standard_normal(g.shape)
    dlogits = g * (dg - (dg * g).sum(1, keepdims=True)) / 2.0
    dx, dw, db = gates.softmax_gate_backward(dg, cache)
    assert rel_error(dx, dlogits @ w.T) < 1e-12 and rel_error(dw, x.T @ dlogits) < 1e-12
    assert rel_error(db, dlogits.sum(0)) < 1e-12


@pytest.mark.parametrize("call, message", [
    (lambda: gates.softmax_gate_forward(np.zeros((3, 5)), np.zeros((4, 2)), np.zeros(2)),
     "x has D=5 but the gate weight has D=4"),
    (lambda: gates.softmax_gate_forward(np.zeros((3, 4)), np.zeros((4, 2)), np.zeros(2), temperature=0),
     "temperature must be > 0, got 0"),
    (lambda: gates.softmax_gate_forward(np.zeros((3, 4)), np.zeros((4, 2)), np.zeros(2), temperature=-1.0),
     "temperature must be > 0"),
    (lambda: gates.mlp_gate_forward(np.zeros(4), np.zeros((4, 2)), np.zeros(2), np.zeros((2, 3)), np.zeros(3)),
     "x must have 2 dimensions"),
    (lambda: gates.per_dim_gate_forward(np.zeros((3, 4)), np.zeros((4, 10)), np.zeros(10), num_experts=3),
     "10 columns do not split into num_experts=3"),
])
def test_bad_gate_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- the four plausible softmax-backward mistakes of the chapter ----------------------

T = 0.5
SOFTMAX_BACKWARDS = {
    "correct": lambda dp, p: p * (dp - (dp * p).sum(-1, keepdims=True)) / T,
    "forgot_temperature": lambda dp, p: p * (dp - (dp * p).sum(-1, keepdims=True)),
    "plain_mean": lambda dp, p: p * (dp - dp.mean(-1, keepdims=True)) / T,
    "no_sum_term": lambda dp, p: p * dp / T,
    "log_softmax_rule": lambda dp, p: (dp - p * dp.sum(-1, keepdims=True)) / T,
}


@pytest.mark.parametrize("name", SOFTMAX_BACKWARDS)
def test_softmax_backward_mistakes_fail_with_a_random_upstream(name, rng):
    z = rng.standard_normal((6, 4))                                # (N, E)
    p = functional.softmax_forward(z, temperature=T)[0]            # (N, E)
    f = lambda: functional.softmax_forward(z, temperature=T)[0]
    dp = rng.standard_normal(z.shape)                              # (N, E)
    row = check_gradient(f, z, dp, SOFTMAX_BACKWARDS[name](dp, p))
    if name == "correct":
        assert row.passed
    else:
        assert not row.passed and row.check_error > 1e-2           # 1e5 times the pass mark


@pytest.mark.parametrize("name, fooled", [("forgot_temperature", True), ("plain_mean", True),
                                          ("no_sum_term", False), ("log_softmax_rule", False)])
def test_all_ones_upstream_hides_exactly_the_missing_factor_and_the_wrong_mean(name, fooled, rng):
    z = rng.standard_normal((6, 4))                                # (N, E)
    p = functional.softmax_forward(z, temperature=T)[0]            # (N, E)
    ones = np.ones_like(z)
    row = check_gradient(lambda: functional.softmax_forward(z, temperature=T)[0], z, ones,
                         SOFTMAX_BACKWARDS[name](ones, p))
    assert row.passed == fooled


# -- the per-dimension gate -------------------------------------------------------------

def test_per_dim_gate_weight_columns_are_expert_major(rng):
    """Column e*D + d of W gives the logit of expert e for output dimension d."""
    x, w, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 12)), rng.standard_normal(12)
    g, _ = gates.per_dim_gate_forward(x, w, b, num_experts=3)       # (N, E, D)
    logits = (x @ w + b).reshape(5, 3, 4)                          # (N, E, D)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.allclose(g, expected, rtol=1e-12, atol=0)


def test_per_dim_gate_backward_by_hand(rng):
    x, w, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 12)), rng.standard_normal(12)
    g, cache = gates.per_dim_gate_forward(x, w, b, num_experts=3, temperature=1.3)   # (N, E, D)
    dg = rng.standard_normal(g.shape)                              # (N, E, D)
    dlogits = (g * (dg - (dg * g).sum(axis=1, keepdims=True)) / 1.3).reshape(5, 12)  # (N, E*D)
    dx, dw, db = gates.per_dim_gate_backward(dg, cache)
    assert dw.shape == (4, 12)
    for mine, ref in ((dx, dlogits @ w.T), (dw, x.T @ dlogits), (db, dlogits.sum(axis=0))):
        assert np.allclose(mine, ref, rtol=1e-12, atol=1e-14)


# -- gate dropout: sums to one in expectation only ------------------------------------------

def test_gate_dropout_sums_to_one_only_in_expectation():
    rho, g = 0.3, np.array([0.6, 0.3, 0.1])                        # rate, (E,)
    draws = layers.dropout_forward(np.tile(g, (40000, 1)), rho, seed=11)[0]   # (40000, E)
    sums = draws.sum(axis=1)                                       # (40000,)
    std = np.sqrt(rho / (1 - rho) * np.sum(g**2))                  # 0.444
    assert abs(sums.mean() - 1) < 4 * std / np.sqrt(len(sums))     # unbiased
    assert abs(sums.std() - std) < 0.01
    assert sums.max() == pytest.approx(1 / (1 - rho))              # nothing dropped
    assert abs(np.mean(sums == 0) - rho**3) < 0.005                # everything dropped
    assert np.allclose(draws.mean(axis=0), g, atol=0.01)           # each weight unbiased


def test_softmax_caches_are_read_by_field_name():
    """The caches are NamedTuples: a caller (a router, Soft MoE, attention) names what it reads."""
    z = np.random.default_rng(0).standard_normal((3, 4))
    p, cache = functional.softmax_forward(z, axis=0, temperature=2.0)
    assert isinstance(cache, functional.SoftmaxCache)
    assert cache.p is p and cache.axis == 0 and cache.temperature == 2.0
    y, log_cache = functional.log_softmax_forward(z, axis=1)
    assert isinstance(log_cache, functional.LogSoftmaxCache) and log_cache.axis == 1
    assert np.allclose(log_cache.p, np.exp(y), rtol=0, atol=0)
    g = np.cos(z)                                                      # (3, 4)
    by_field = functional.softmax_backward(g, functional.SoftmaxCache(p=p, axis=0, temperature=2.0))
    assert np.array_equal(functional.softmax_backward(g, cache), by_field)


def test_softmax_and_logsumexp_leave_their_inputs_as_they_were():
    """They build their results in arrays of their own (in place there): the caller's logits,
    upstream gradient and cached probabilities stay as they were, and the results equal the
    textbook formulas written out with temporaries, to the bit."""
    rng = np.random.default_rng(7)
    z = rng.standard_normal((5, 6)).astype(np.float32)                # (N, E)
    dp = rng.standard_normal((5, 6)).astype(np.float32)               # (N, E)
    z0, dp0 = z.copy(), dp.copy()
    p, cache = functional.softmax_forward(z, temperature=0.7)
    p0 = p.copy()
    dz = functional.softmax_backward(dp, cache)
    lse = functional.logsumexp(z)
    assert np.array_equal(z, z0) and np.array_equal(dp, dp0) and np.array_equal(cache.p, p0)
    s = z / 0.7                                                       # (N, E) the textbook forms
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    assert np.array_equal(p, e / e.sum(axis=-1, keepdims=True))
    assert np.array_equal(dz, p0 * (dp0 - np.sum(dp0 * p0, axis=-1, keepdims=True)) / 0.7)
    m = z0.max(axis=-1, keepdims=True)
    assert np.array_equal(lse, np.squeeze(m, -1) + np.log(np.exp(z0 - m).sum(axis=-1)))
    assert p.dtype == dz.dtype == lse.dtype == np.float32
