"""Chapter 3: experts, the combine, DenseMoE end to end, and the mixture loss."""
import numpy as np
import pytest

from moe_np import data, experts, losses
from moe_np.metrics import normalized_mutual_info, purity
from moe_np.config import DenseConfig
from moe_np.dense import DenseMoE, combine_forward, dense_moe_forward
from moe_np.optim import Adam
from moe_np.train import fit

from conftest import assert_check_passes, checks_of


def test_every_gate_variant_expert_and_loss_is_registered():
    names = [n for n in checks_of(3) if n.startswith("dense_moe[")]
    assert len(names) == 4 * 2 * 2
    for gate in ("softmax", "mlp", "per_dim", "softmax+dropout"):
        for expert in ("mlp", "swiglu"):
            for loss in ("mse", "cross_entropy"):
                assert f"dense_moe[{gate},{expert},{loss}]" in names


@pytest.mark.parametrize("name", checks_of(3))
def test_registered_dense_check_passes(name):
    assert_check_passes(name, seeds=(0, 1))


def make_dense(d_model, num_experts, d_hidden, seed=0, **fields):
    return DenseMoE(DenseConfig(d_model=d_model, num_experts=num_experts, d_hidden=d_hidden,
                                **fields), seed=seed)


def test_uniform_gate_averages_the_experts(rng):
    layer = make_dense(4, 3, 6, gate="softmax", expert="swiglu", seed=1)
    layer.params["w_router"][:] = 0.0                                 # logits all equal
    x = rng.standard_normal((5, 4))                                 # (N, D)
    y = layer.forward(x)
    _, y_experts = layer.parts()                                    # (E, N, D)
    assert np.allclose(y, y_experts.mean(axis=0), rtol=1e-14, atol=1e-15)


def test_one_hot_gate_returns_one_expert_exactly(rng):
    y_experts = rng.standard_normal((3, 5, 4))                      # (E, N, D)
    choice = np.array([2, 0, 1, 1, 0])
    one_hot = np.eye(3)[choice]                                     # (N, E)
    assert np.array_equal(combine_forward(one_hot, y_experts), y_experts[choice, np.arange(5)])


def test_per_dim_combine_mixes_each_dimension(rng):
    y_experts = rng.standard_normal((3, 5, 4))                      # (E, N, D)
    g = np.zeros((5, 3, 4)); g[:, 0, :2] = 1; g[:, 2, 2:] = 1       # dims 0-1 from expert 0, 2-3 from 2
    y = combine_forward(g, y_experts)
    assert np.array_equal(y[:, :2], y_experts[0, :, :2]) and np.array_equal(y[:, 2:], y_experts[2, :, 2:])


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
def test_batched_experts_equal_one_expert_at_a_time(kind, rng):
    fwd, _, names = experts.EXPERTS[kind]
    params = experts.init_experts(kind, 3, 4, 6, rng)
    x = rng.standard_normal((5, 4))                                 # (N, D)
    y = fwd(x, *(params[k] for k in names))[0]                      # (E, N, D)
    for e in range(3):
        y_e = fwd(x, *(params[k][e:e + 1] for k in names))[0]      # (1, N, D)
        assert np.allclose(y[e], y_e[0], rtol=1e-13, atol=1e-14)


def test_mixture_nll_with_one_expert_is_half_squared_error(rng):
    y, t = rng.standard_normal((1, 6, 3)), rng.standard_normal((6, 3))
    loss, (r, _, _) = losses.mixture_nll_forward(np.ones((6, 1)), y, t)
    assert loss == pytest.approx(0.5 * np.mean(np.sum((y[0] - t) ** 2, axis=1)))
    assert np.allclose(r, 1.0)


def test_partition_scores_known_answers():
    truth = np.array([0, 0, 1, 1, 2, 2])
    renamed = np.array([5, 5, 3, 3, 9, 9])
    assert purity(renamed, truth) == 1.0 and normalized_mutual_info(renamed, truth) == pytest.approx(1.0)
    one_group = np.zeros(6, int)
    assert purity(one_group, truth) == pytest.approx(1 / 3)
    assert normalized_mutual_info(one_group, truth) == 0.0
    independent = np.array([0, 1, 0, 1, 0, 1])
    assert normalized_mutual_info(independent, truth) == pytest.approx(0.0, abs=1e-12)


def test_regions_are_the_quadrants():
    x, y, region = data.make_regions(400, seed=3)
    assert set(np.unique(region)) == {0, 1, 2, 3}
    assert np.all(region[(x[:, 0] >= 0) & (x[:, 1] >= 0)] == 0)
    assert np.all(region[(x[:, 0] < 0) & (x[:, 1] < 0)] == 2)


@pytest.mark.parametrize("gate", ["softmax", "mlp", "per_dim"])
def test_dense_moe_learns_the_regions_task(gate):
    x, y, _ = data.make_regions(1000, seed=0)
    moe = make_dense(2, 4, 8, gate=gate, seed=0, gate_dropout=0.1)
    history = fit(moe, x, y, losses.mse_forward, losses.mse_backward, Adam(moe.params, 1e-2),
                  steps=200, batch_size=64)
    assert np.mean(history[-20:]) < 0.5 * np.mean(history[:5])


def test_gate_dropout_only_while_training(rng):
    moe = make_dense(4, 3, 5, gate_dropout=0.5, seed=0)
    x = rng.standard_normal((8, 4))
    moe.eval()
    assert np.array_equal(moe.forward(x), moe.forward(x))
    moe.train()
    assert not np.array_equal(moe.forward(x), moe.forward(x))      # fresh masks each step


@pytest.mark.parametrize("call, message", [
    (lambda: make_dense(4, 0, 5), "num_experts must be an integer >= 1, got 0"),
    (lambda: make_dense(4, 3, 5, temperature=0.0), "temperature must be > 0"),
    (lambda: make_dense(4, 3, 5, gate_dropout=1.0), r"gate_dropout must be in \[0, 1\), got 1.0"),
    (lambda: make_dense(4, 3, 5, gate="hard"), "gate must be one of"),
    (lambda: make_dense(4, 3, 5, expert="conv"), "expert must be one of"),
    (lambda: make_dense(4, 3, 5).forward(np.zeros((2, 3))), "x has D=3 but the gate weight has D=4"),
    (lambda: dense_moe_forward(np.zeros(4), make_dense(4, 3, 5).params, make_dense(4, 3, 5).config),
     "x must have 2 dimensions"),
    (lambda: make_dense(4, 3, 5).forward(np.zeros((2, 4), np.float32)),
     "x is float32 but the parameters are float64"),
    (lambda: experts.mlp_experts_forward(np.zeros((2, 5, 4)), *experts.init_experts(
        "mlp", 3, 4, 6, np.random.default_rng(0)).values()), "x has 2 expert batches but there are E=3"),
    (lambda: losses.mixture_nll_forward(np.ones((4, 2)), np.zeros((3, 4, 2)), np.zeros((4, 2))),
     "y_experts must have shape"),
])
def test_bad_dense_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
