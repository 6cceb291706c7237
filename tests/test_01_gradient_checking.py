"""Chapter 1: the gradient-check harness, the layers and losses, the CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest

from moe_np import functional, layers, losses
from moe_np import gradcheck
from moe_np.gradcheck import TOLERANCE, check_error, check_gradient, check_pair, compare, \
    finite_difference, numerical_grad, rel_error, rounding_floor
from moe_np.models import MLP
from moe_np.optim import SGD, Adam
from moe_np.training import fit
from moe_np import data

from conftest import assert_check_passes, checks_of

CHAPTER_1 = ["linear", "relu", "gelu", "silu", "swiglu", "dropout",
             "softmax", "log_softmax", "cross_entropy", "mse"]


def test_every_layer_and_loss_is_registered_for_chapter_1():
    assert set(CHAPTER_1) == set(checks_of(1))


@pytest.mark.parametrize("name", checks_of(1))
def test_registered_check_passes(name):
    assert_check_passes(name, seeds=(0, 1, 2))


# -- the harness itself --------------------------------------------------------

def test_rel_error_known_values():
    assert rel_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert rel_error([1.0], [3.0]) == pytest.approx(0.5)          # |1-3| / (1+3)
    assert rel_error([0.0], [1e-10]) == pytest.approx(1e-2)       # floor 1e-8 in the denominator
    with pytest.raises(ValueError, match="shapes differ"):
        rel_error(np.zeros(2), np.zeros(3))


def test_numerical_grad_of_a_known_function(rng):
    x = rng.standard_normal((3, 4))                                # (3, 4)
    before = x.copy()
    dout = rng.standard_normal((3, 4))                             # (3, 4)
    grad = numerical_grad(lambda: np.sin(x), x, dout)
    assert rel_error(grad, np.cos(x) * dout) < 1e-9
    assert np.array_equal(x, before)                                # every entry restored


def test_numerical_grad_restores_x_even_when_the_guard_raises(rng):
    x = np.array([0.5, 1e-5, -0.7])
    before = x.copy()
    with pytest.raises(ValueError, match="selection changed"):
        numerical_grad(lambda: np.maximum(x, 0), x, np.ones(3), selection=lambda: x > 0)
    assert np.array_equal(x, before)


def test_check_error_known_values():
    floor = 1e-12                                                  # floor / TOLERANCE = 1e-5
    assert check_error([1.0, 2.0], [1.0, 2.0], floor) == 0.0
    assert check_error([1.0], [3.0], floor) == pytest.approx(0.5)  # large: |a-n| / (|a|+|n|)
    assert check_error([1e-7], [1e-7 + 1e-13], floor) == pytest.approx(1e-8)   # tiny: 1e-13 / 1e-5
    # per-entry floors: an error of twice its floor reads 2 * TOLERANCE, whatever the entry's size
    assert check_error([0.0, 5.0], [2e-12, 5.0], [1e-12, 1e-9]) == pytest.approx(2 * TOLERANCE)
    with pytest.raises(ValueError, match="shapes differ"):
        check_error(np.zeros(2), np.zeros(3), floor)
    with pytest.raises(ValueError, match="floor must be > 0"):
        check_error(np.zeros(2), np.zeros(2), 0.0)


def test_rounding_floor_is_6_6_c_eps_s_over_h():
    out, dout = np.array([2.0, -3.0]), np.array([1.0, 2.0])       # S = |2*1| + |-3*2| = 8
    assert gradcheck.ROUNDING_GAIN == pytest.approx(6.6)           # (16 * 6 + 3) / 15
    expected = 6.6 * gradcheck.ROUNDING_C * gradcheck.EPS * 8 / 1e-3
    assert rounding_floor(out, dout, 1e-3) == pytest.approx(expected)
    assert rounding_floor((out, out), (dout, dout), 1e-3) == pytest.approx(2 * expected)


def test_truncation_bar_measures_the_h4_error_and_covers_what_is_left():
    """With a large step, truncation dominates rounding. For sin, R(h/2)'s error is
    h^4 cos(x) / 7680; the bar |R(h) - R(h/2)| / 15 must measure it, and the
    estimate, which subtracts it, must be far closer than the bar."""
    x = np.array([0.3, 1.0, -2.0])
    fd = finite_difference(lambda: np.sin(x), x, np.ones(3), h=0.2)
    assert np.allclose(fd.truncation, 0.2**4 * np.abs(np.cos(x)) / 7680, rtol=0.02)
    assert np.all(np.abs(fd.grad - np.cos(x)) < fd.truncation / 100)


def _confident_cross_entropy(seed=3):
    """Logits of scale 3: some classes get p ~ 1e-5, so their gradient entries p / N are ~1e-6."""
    rng = np.random.default_rng(seed)
    z, labels = 3 * rng.standard_normal((5, 7)), rng.integers(0, 7, 5)   # (N, V), (N,)
    _, cache = losses.cross_entropy_forward(z, labels)
    return z, labels, cache


def test_check_error_has_no_false_alarm_where_rel_error_has_one():
    z, labels, cache = _confident_cross_entropy()
    row = check_gradient(lambda: losses.cross_entropy_forward(z, labels)[0], z, 1.0,
                         losses.cross_entropy_backward(1.0, cache))
    assert row.rel_error > TOLERANCE                               # rel_error cries wolf
    assert row.passed and row.check_error < TOLERANCE              # check_error does not
    assert row.abs_error < row.floor


def test_floor_does_not_depend_on_the_gradient_being_judged():
    z, labels, cache = _confident_cross_entropy()
    f = lambda: losses.cross_entropy_forward(z, labels)[0]
    right = losses.cross_entropy_backward(1.0, cache)
    assert check_gradient(f, z, 1.0, right).floor == check_gradient(f, z, 1.0, 2 * right).floor


# -- wrong backwards must fail, by orders of magnitude ------------------------------
# Each was run against the checker and fails with check_error >= 0.1; the bar
# below is 1000 times the pass mark.

CLEAR_FAIL = 1e3 * TOLERANCE


def test_checker_reports_a_bug_confined_to_the_tiny_entries():
    """A 0.1% error on only the entries below 1e-5 (the ones the floor is for) still fails."""
    z, labels, cache = _confident_cross_entropy()
    right = losses.cross_entropy_backward(1.0, cache)              # (N, V)
    wrong = np.where(np.abs(right) < 1e-5, 1.001 * right, right)   # (N, V)
    row = check_gradient(lambda: losses.cross_entropy_forward(z, labels)[0], z, 1.0, wrong)
    assert not row.passed and row.check_error > 10 * TOLERANCE


def _softmax_backward_without_sum_term(dp, cache):
    p, axis, temperature = cache
    return p * dp / temperature                                    # bug: drops - sum(dp * p)


def test_checker_reports_a_softmax_backward_without_the_subtraction(rng):
    rows = check_pair("broken softmax", functional.softmax_forward,
                      _softmax_backward_without_sum_term, {"z": rng.standard_normal((5, 7))})
    assert not rows[0].passed and rows[0].check_error > CLEAR_FAIL


def test_checker_reports_a_transposed_weight_gradient(rng):
    # A square weight, so the transposed gradient has the right shape and only
    # the values can give it away.
    def backward_with_transposed_dw(dy, cache):
        dx, dw, db = layers.linear_backward(dy, cache)
        return dx, dw.T, db
    rows = check_pair("broken linear", layers.linear_forward, backward_with_transposed_dw,
                      {"x": rng.standard_normal((5, 4)), "w": rng.standard_normal((4, 4)),
                       "b": rng.standard_normal(4)})
    by_wrt = {r.wrt: r for r in rows}
    assert by_wrt["x"].passed and by_wrt["b"].passed
    assert not by_wrt["w"].passed and by_wrt["w"].check_error > CLEAR_FAIL


def test_checker_reports_a_cross_entropy_backward_missing_1_over_n(rng):
    def backward_without_mean(dloss, cache):
        return losses.cross_entropy_backward(dloss, cache) * len(cache[1])   # bug: sum, not mean
    rows = check_pair("broken cross_entropy", losses.cross_entropy_forward, backward_without_mean,
                      {"logits": rng.standard_normal((5, 7))},
                      static={"labels": rng.integers(0, 7, 5)})
    assert not rows[0].passed and rows[0].check_error > CLEAR_FAIL


def _two_layer_forward(x, w1, b1, w2, b2):
    a, c1 = layers.linear_forward(x, w1, b1)                       # (N, H)
    h, c2 = layers.relu_forward(a)                                 # (N, H)
    y, c3 = layers.linear_forward(h, w2, b2)                       # (N, V)
    return y, (c1, c2, c3)


def test_checker_reports_a_dropped_relu_mask(rng):
    def backward_without_mask(dy, cache):
        c1, _, c3 = cache
        dh, dw2, db2 = layers.linear_backward(dy, c3)              # (N, H), (H, V), (V,)
        dx, dw1, db1 = layers.linear_backward(dh, c1)              # bug: dh, not dh * [a > 0]
        return dx, dw1, db1, dw2, db2
    inputs = {"x": rng.standard_normal((5, 4)), "w1": rng.standard_normal((4, 6)),
              "b1": rng.standard_normal(6), "w2": rng.standard_normal((6, 3)),
              "b2": rng.standard_normal(3)}
    pattern = lambda x, w1, b1, **_: x @ w1 + b1 > 0
    rows = {r.wrt: r for r in check_pair("broken two-layer", _two_layer_forward,
                                         backward_without_mask, inputs, selection=pattern)}
    assert rows["w2"].passed and rows["b2"].passed                 # above the ReLU: right
    for key in ("x", "w1", "b1"):                                  # below it: wrong
        assert not rows[key].passed and rows[key].check_error > CLEAR_FAIL, key


def _softmax_backward_plain_mean(dp, cache):
    p, axis, temperature = cache
    return p * (dp - dp.mean(axis=axis, keepdims=True)) / temperature   # bug: mean, not p-weighted


def test_all_ones_upstream_hides_a_wrong_softmax_backward(rng):
    z = rng.standard_normal((5, 7))                                # (N, V)
    _, cache = functional.softmax_forward(z)
    ones = np.ones_like(z)
    numeric = numerical_grad(lambda: functional.softmax_forward(z)[0], z, ones)
    assert np.allclose(_softmax_backward_plain_mean(ones, cache), numeric)   # fooled
    g = rng.standard_normal(z.shape)
    numeric = numerical_grad(lambda: functional.softmax_forward(z)[0], z, g)
    assert rel_error(_softmax_backward_plain_mean(g, cache), numeric) > 1e-2  # caught


def test_compare_columns():
    a = np.arange(6.0).reshape(2, 3)
    assert compare("same", a, a.copy()).exact
    near = compare("near", a, a + 1e-15)
    assert near.close and not near.exact and near.maxdiff == pytest.approx(1e-15, rel=0.5)
    transposed = compare("transposed", a, a.T)
    assert not transposed.shape_ok and not transposed.close


# -- known answers for the forwards ---------------------------------------------

def test_activations_known_values():
    x = np.array([-2.0, 0.0, 3.0])
    assert np.array_equal(layers.relu_forward(x)[0], [0.0, 0.0, 3.0])
    assert layers.silu_forward(np.array([0.0]))[0][0] == 0.0
    assert layers.silu_forward(np.array([50.0]))[0][0] == pytest.approx(50.0)
    gelu = layers.gelu_forward(np.array([0.0, 1.0, -40.0]))[0]
    assert gelu[0] == 0.0 and gelu[1] == pytest.approx(0.8411920, abs=1e-6) and gelu[2] == 0.0
    assert functional.sigmoid(np.array([-800.0, 800.0])).tolist() == [0.0, 1.0]


def test_softmax_known_values_and_stability():
    p, _ = functional.softmax_forward(np.array([[0.0, np.log(3.0)]]))
    assert np.allclose(p, [[0.25, 0.75]])
    p, _ = functional.softmax_forward(np.array([[1000.0, -1000.0, 0.0]]))
    assert np.all(np.isfinite(p)) and np.allclose(p, [[1.0, 0.0, 0.0]])
    y, _ = functional.log_softmax_forward(np.array([[1000.0, -1000.0]]))
    assert np.all(np.isfinite(y)) and y[0, 0] == 0.0 and y[0, 1] == -2000.0


def test_cross_entropy_of_uniform_logits_is_log_v():
    loss, _ = losses.cross_entropy_forward(np.zeros((4, 7)), np.array([0, 3, 6, 1]))
    assert loss == pytest.approx(np.log(7))


def test_dropout_is_seeded_and_inverted(rng):
    x = rng.standard_normal((200, 50))
    y1, m1 = layers.dropout_forward(x, 0.25, seed=7)
    y2, m2 = layers.dropout_forward(x, 0.25, seed=7)
    assert np.array_equal(y1, y2)
    assert set(np.unique(m1)) == {0.0, 1 / 0.75}
    assert abs((m1 == 0).mean() - 0.25) < 0.02
    assert np.array_equal(layers.dropout_forward(x, 0.0, seed=1)[0], x)


# -- bad input ------------------------------------------------------------------

def test_linear_names_the_mismatched_widths():
    with pytest.raises(ValueError, match=r"linear_forward: x has D=5 but w has D=4"):
        layers.linear_forward(np.zeros((3, 5)), np.zeros((4, 2)), np.zeros(2))
    with pytest.raises(ValueError, match=r"b has H=3 but w has H=2"):
        layers.linear_forward(np.zeros((3, 4)), np.zeros((4, 2)), np.zeros(3))


@pytest.mark.parametrize("call, message", [
    (lambda: layers.dropout_forward(np.zeros(3), 1.0, 0), r"p must be in \[0, 1\), got 1.0"),
    (lambda: layers.dropout_forward(np.zeros(3), -0.1, 0), r"p must be in \[0, 1\)"),
    (lambda: layers.swiglu_forward(np.zeros((2, 3)), np.zeros((3, 2))), "a has shape"),
    (lambda: functional.softmax_forward(np.zeros(3), temperature=0.0), "temperature must be > 0"),
    (lambda: losses.cross_entropy_forward(np.zeros((2, 3)), np.array([0, 3])), r"labels must lie in \[0, 3\)"),
    (lambda: losses.cross_entropy_forward(np.zeros((2, 3)), np.array([0.0, 1.0])), "labels must be integers"),
    (lambda: losses.cross_entropy_forward(np.zeros((2, 3)), np.array([0])), "labels must have shape"),
    (lambda: losses.mse_forward(np.zeros((2, 3)), np.zeros((3, 2))), "y has shape"),
    (lambda: SGD({}, lr=0.0), "lr must be > 0"),
    (lambda: MLP(3, 0, 2), "MLP: hidden must be an integer >= 1, got 0"),
])
def test_bad_input_raises_a_named_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- training -------------------------------------------------------------------

@pytest.mark.parametrize("make_optimizer", [lambda p: SGD(p, lr=0.1), lambda p: Adam(p, lr=1e-2)])
def test_two_layer_network_learns_blobs(make_optimizer):
    x, y = data.make_blobs(1000, dim=10, classes=10, seed=0)
    net = MLP(10, 100, 10, seed=0)
    history = fit(net, x, y, losses.cross_entropy_forward, losses.cross_entropy_backward,
                  make_optimizer(net.params), steps=150, batch_size=64)
    assert np.mean(history[-20:]) < 0.3 * np.mean(history[:5])


def test_mlp_backward_matches_finite_differences(rng):
    net = MLP(4, 6, 3, seed=2)
    x = rng.standard_normal((5, 4))                                # (N, D)
    dy = rng.standard_normal((5, 3))                               # (N, V)
    net.forward(x)
    dx = net.backward(dy)
    pattern = lambda: (x @ net.params["w1"] + net.params["b1"]) > 0
    grads = {name: g.copy() for name, g in net.grads.items()}     # the forwards below overwrite caches
    for name, p in net.params.items():
        row = check_gradient(lambda: net.forward(x), p, dy, grads[name], selection=pattern)
        assert row.passed, f"{name}: check_error {row.check_error:.1e}"
    assert check_gradient(lambda: net.forward(x), x, dy, dx, selection=pattern).passed


def test_cli_gradcheck_states_the_rule_that_decides():
    run = _cli("gradcheck", "--filter", "linear")
    assert run.returncode == 0, run.stderr
    assert run.stdout.rstrip().splitlines()[-1].endswith(f"(pass: check_error < {TOLERANCE:.0e})")


# -- the command line -------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moe_np", *args], capture_output=True, text=True)


def test_cli_gradcheck_json_lists_every_layer_and_loss():
    run = _cli("gradcheck", "--json")
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert {"name", "wrt", "check_error", "rel_error", "abs_error", "floor", "passed"} \
        <= set(rows[0])
    assert set(CHAPTER_1) <= {r["name"] for r in rows}
    assert all(r["passed"] and r["check_error"] < TOLERANCE for r in rows)


def test_cli_gradcheck_filter_without_match_fails():
    run = _cli("gradcheck", "--filter", "no-such-check")
    assert run.returncode == 2 and "no check matches" in run.stderr


def test_cli_tutorial_names_missing_chapter():
    run = _cli("tutorial", "99")
    assert run.returncode == 2 and "no chapter 99" in run.stderr
