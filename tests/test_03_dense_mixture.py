"""Chapter 3: experts, the combine, DenseMoE end to end, the mixture loss, and the
chapter's specialisation experiment (its helpers run at small sizes)."""
import contextlib
import io
import os
from unittest import mock

import numpy as np
import pytest

from moe_np import data, experts, gates, losses
from moe_np.metrics import normalized_mutual_info, purity
from moe_np.config import DenseConfig
from moe_np.dense import DenseMoE, combine_forward, dense_moe_forward
from moe_np.optim import Adam
from moe_np.training import fit
from moe_np.tutorial import chapter_path, code_blocks

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


@pytest.mark.parametrize("kind, dtype", [("mlp", np.float64), ("mlp", np.float32), ("swiglu", np.float32)])
def test_init_experts_draws_what_one_draw_of_each_matrix_would(kind, dtype):
    """Drawn one expert at a time, the matrices hold the values (and leave the generator in
    the state) of drawing each whole (E, ...) matrix at once, He-scaled, then cast."""
    e, d, h = 3, 4, 6
    params = experts.init_experts(kind, e, d, h, np.random.default_rng(7), dtype=dtype)
    rng = np.random.default_rng(7)
    shapes = {"w1": ((e, d, h), 2.0 / d), "w2": ((e, h, d), 1.0 / h)} if kind == "mlp" else \
        {"w_gate": ((e, d, h), 1.0 / d), "w_up": ((e, d, h), 1.0 / d), "w_down": ((e, h, d), 1.0 / h)}
    for name, (shape, variance) in shapes.items():                  # the order init_experts draws in
        want = (rng.standard_normal(shape) * np.sqrt(variance)).astype(dtype)
        assert params[name].dtype == dtype and np.array_equal(params[name], want), name
    after = np.random.default_rng(7)
    experts.init_experts(kind, e, d, h, after, dtype=dtype)
    assert after.random() == rng.random()


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


# -- purity and NMI: known values ------------------------------------------------

QUADRANTS = np.repeat(np.arange(4), 2)                              # two points per quadrant


def test_purity_punishes_merging_but_not_splitting():
    merged = np.array([0, 0, 1, 1, 2, 2, 2, 2])                     # quadrants 2 and 3 share a group
    split = np.array([0, 4, 1, 1, 2, 2, 3, 3])                      # quadrant 0 over two groups
    assert purity(merged, QUADRANTS) == pytest.approx(0.75)
    assert purity(split, QUADRANTS) == 1.0
    assert purity(np.arange(8), QUADRANTS) == 1.0                   # one group per point: still 1


def test_nmi_uses_the_geometric_mean_of_the_entropies():
    """Broken by dividing by the arithmetic mean (H_A + H_T) / 2: the split case reads 0.941."""
    split = np.array([0, 4, 1, 1, 2, 2, 3, 3])                      # H_A = 2.25 log 2, I = H_T = 2 log 2
    assert normalized_mutual_info(split, QUADRANTS) == pytest.approx(2 / np.sqrt(2.25 * 2), abs=1e-12)
    merged = np.array([0, 0, 1, 1, 2, 2, 2, 2])                     # I = H_A = 1.5 log 2
    assert normalized_mutual_info(merged, QUADRANTS) == pytest.approx(np.sqrt(1.5 / 2), abs=1e-12)
    assert normalized_mutual_info(QUADRANTS, merged) == pytest.approx(np.sqrt(1.5 / 2), abs=1e-12)


# -- the chapter's experiment: its own helpers, run at small sizes ---------------

@pytest.fixture(scope="module")
def chapter():
    """The namespace of chapter 3 after the fences that define the regions data,
    mixture_nll_sigma, train_moe, clone_busiest and scores (quick sizes, output hidden)."""
    needed = ("from moe_np import losses", "make_regions(6000", "def mixture_nll_sigma",
              "def train_moe")
    namespace = {"__name__": "__chapter__"}
    with mock.patch.dict(os.environ, {"MOE_NP_QUICK": "1"}), \
            contextlib.redirect_stdout(io.StringIO()):
        for code in code_blocks(chapter_path(3).read_text()):
            if any(n in code for n in needed):
                exec(compile(code, "03-dense-mixture.md", "exec"), namespace)
    return namespace


def test_mixture_gradients_are_the_derived_formulas(chapter, rng):
    """dL/dz = (g - r) / (N T) through the gate pair, dL/df_e = r (f_e - t) / (N sigma^2).
    Broken by returning the scaled expert gradient without the 1/sigma of the chain rule."""
    n, e, d, temperature, sigma = 6, 3, 2, 0.6, 0.3
    x, w, b = rng.standard_normal((n, 2)), rng.standard_normal((2, e)), rng.standard_normal(e)
    target = rng.standard_normal((n, d))                            # (N, D)
    y_experts = target + 0.3 * rng.standard_normal((e, n, d))       # (E, N, D)
    g, gate_cache = gates.softmax_gate_forward(x, w, b, temperature=temperature)
    loss, r, dg, dy = chapter["mixture_nll_sigma"](g, y_experts, target, sigma)
    sq = np.sum((target[None] - y_experts) ** 2, axis=2).T          # (N, E)
    assert loss == pytest.approx(-np.mean(np.log(np.sum(g * np.exp(-sq / (2 * sigma**2)), axis=1))))
    assert np.allclose(r, g * np.exp(-sq / (2 * sigma**2)) /
                       np.sum(g * np.exp(-sq / (2 * sigma**2)), axis=1, keepdims=True))
    _, dw, db = gates.softmax_gate_backward(dg, gate_cache)
    assert np.allclose(db, np.sum(g - r, axis=0) / (n * temperature), rtol=1e-12, atol=1e-15)
    assert np.allclose(dw, x.T @ (g - r) / (n * temperature), rtol=1e-12, atol=1e-15)
    assert np.allclose(dy, r.T[:, :, None] * (y_experts - target) / (n * sigma**2), rtol=1e-12)


def test_clone_halves_the_busy_experts_weight_and_copies_its_state(chapter):
    """Broken by leaving out the T log 2 shift (the pair then holds twice the busy weight)
    or by not copying Adam's moments."""
    moe = DenseMoE(DenseConfig(d_model=2, num_experts=4, d_hidden=8, temperature=0.5), seed=3)
    moe.params["b_router"][:] = [0.4, -30.0, 0.9, 0.0]             # expert 1 is dead
    opt = Adam(moe.params, lr=1e-2)
    x = chapter["x_tr"][:64]
    moe.forward(x); moe.backward(np.ones((64, 2)) / 64); opt.step(moe.grads)
    before = moe.gate_weights(x)                                    # (N, E)
    busy = int(before.mean(axis=0).argmax())
    assert chapter["clone_busiest"](moe, opt, np.random.default_rng(0)) == (1, busy)
    after = moe.gate_weights(x)                                     # (N, E)
    assert np.allclose(after[:, 1], after[:, busy], rtol=1e-12)
    assert np.allclose(after[:, 1] + after[:, busy], before[:, busy], rtol=1e-9)
    others = [k for k in range(4) if k not in (1, busy)]
    assert np.allclose(after[:, others], before[:, others], rtol=1e-9)
    for name in ("w1", "b1", "w2", "b2"):
        for moments in opt.state.values():
            assert np.array_equal(moments[name][1], moments[name][busy])
    w1 = moe.params["w1"]
    assert 0 < np.abs(w1[1] - w1[busy]).max() < 0.05 * w1[busy].std()   # a copy, plus 1% noise


def test_clone_leaves_a_layer_with_no_starving_expert_alone(chapter):
    moe = DenseMoE(DenseConfig(d_model=2, num_experts=4, d_hidden=8), seed=0)   # near-uniform gate
    before = {k: v.copy() for k, v in moe.params.items()}
    assert chapter["clone_busiest"](moe, Adam(moe.params), np.random.default_rng(0)) is None
    assert all(np.array_equal(before[k], moe.params[k]) for k in before)


@pytest.fixture(scope="module")
def recipe_runs(chapter):
    """The recipe (sigma 0.1, annealed temperature, cloning), seeds 0-2, 1000 steps."""
    return [chapter["train_moe"](seed, steps=1000, sigma=0.1, anneal=True, clone=True)
            for seed in range(3)]


def test_recipe_finds_the_quadrants_where_the_blended_mse_does_not(chapter, recipe_runs):
    """Seeds 0-2 at 1000 steps: NMI 0.97-0.98 against 0.17-0.43. Broken by a competitive
    step that ignores sigma (sigma 1), or by dropping the cloning (seed 0 keeps 3 experts)."""
    train_moe, scores = chapter["train_moe"], chapter["scores"]
    for seed, (moe, _, _) in enumerate(recipe_runs):
        _, nmi, _, used = scores(moe)
        assert nmi > 0.9 and used == 4, (seed, nmi, used)
        _, nmi, _, _ = scores(train_moe(seed, steps=1000, loss="blended")[0])
        assert nmi < 0.7, (seed, nmi)


def test_sharp_competition_without_cloning_starves_an_expert(chapter, recipe_runs):
    """Seed 0: with sigma = 0.1 alone one expert's share of the gate falls to ~0 and stays;
    the recipe's clones bring it back. Broken by a clone threshold of 0 (no clone fires)."""
    _, shares, clones = chapter["train_moe"](0, steps=1000, sigma=0.1)
    assert shares[-100:].mean(axis=0).min() < 0.02 and clones == []
    _, shares, clones = recipe_runs[0]
    assert shares[-100:].mean(axis=0).min() > 0.15 and clones


def test_winners_of_the_per_dimension_gate_has_one_partition_per_output(chapter):
    moe = DenseMoE(DenseConfig(d_model=2, num_experts=4, d_hidden=8, gate="per_dim"), seed=0)
    win = chapter["winners"](moe, chapter["x_te"])
    assert win.shape == (len(chapter["x_te"]), 2)
    g = moe.gate_weights(chapter["x_te"])                           # (N, E, D)
    assert np.array_equal(win[:, 1], g[:, :, 1].argmax(axis=1))
