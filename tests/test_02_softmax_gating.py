"""Chapter 2: softmax, temperature and the three gates."""
import numpy as np
import pytest

from moe_np import functional, gates, losses
from moe_np.gradcheck import numerical_grad, rel_error

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
