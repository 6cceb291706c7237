"""Chapter 7: optimizers, clipping, the schedule, the model, the loop, checkpoints and the CLI.

Runs are tiny (a few dozen steps of a 2-block model) so the whole file stays fast. The loss
scaler's mechanics are tested on float32 compute with loss_scale="dynamic", so they do not
depend on the layers' simulated fp16; the end-to-end CLI test and the demo run real
--precision fp16.
"""
import hashlib
import json
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moe_np import SparseConfig, checkpoint as ckpt
from moe_np.__main__ import main
from moe_np.gradcheck import check_gradient
from moe_np.models import dense_net, dense_width, moe_net
from moe_np.optim import SGD, Adam, AdamW, WarmupCosine, clip_grad_norm
from moe_np.sparse import sparse_moe_selection
from moe_np.config import TrainConfig
from moe_np.training import Progress, Trainer, build_run, start_run, train_in_dir, train_quietly

TINY = dict(steps=24, data_size=400, batch_size=32, d_model=8, d_hidden=8, experts=4, k=2,
            warmup=4, log_every=6, checkpoint_every=10)
TINY_ARGS = ["--steps", "24", "--data-size", "400", "--batch-size", "32", "--d-model", "8",
             "--d-hidden", "8", "--experts", "4", "--warmup", "4", "--log-every", "6",
             "--checkpoint-every", "10"]


def params_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# -- optimizers ----------------------------------------------------------------------------

def test_adam_step_by_hand():
    """lr 0.1, betas (0.9, 0.999), eps 1e-8; p = 1; g = 0.5, then g = -0.25.

    step 1: m = 0.05, v = 0.00025, m_hat = 0.5, v_hat = 0.25:
            p = 1 - 0.1 * 0.5 / (0.5 + 1e-8) = 0.900000002
    step 2: m = 0.9 * 0.05 - 0.1 * 0.25 = 0.02;  v = 0.999 * 0.00025 + 0.001 * 0.0625 = 0.00031225
            m_hat = 0.02 / (1 - 0.9^2) = 0.1052631579;  v_hat = 0.00031225 / (1 - 0.999^2) = 0.1562031016
            p = 0.900000002 - 0.1 * 0.1052631579 / (0.3952253807 + 1e-8) = 0.8733662987
    """
    p = {"w": np.array([1.0])}
    opt = Adam(p, lr=0.1)
    opt.step({"w": np.array([0.5])})
    assert p["w"][0] == pytest.approx(0.900000002, rel=1e-13)
    opt.step({"w": np.array([-0.25])})
    assert opt.state["m"]["w"][0] == pytest.approx(0.02, rel=1e-13)
    assert opt.state["v"]["w"][0] == pytest.approx(0.00031225, rel=1e-13)
    assert p["w"][0] == pytest.approx(0.8733662987078463, rel=1e-13)


def test_adamw_step_by_hand():
    """As above with decoupled weight decay 0.01, applied first: p <- p - lr * wd * p.

    step 1: 1 - 0.1 * 0.01 * 1 - 0.099999998 = 0.899000002
    step 2: 0.899000002 * (1 - 0.001) - 0.0266337033 = 0.8714672987
    """
    p = {"w": np.array([1.0])}
    opt = AdamW(p, lr=0.1, weight_decay=0.01)
    opt.step({"w": np.array([0.5])})
    assert p["w"][0] == pytest.approx(0.899000002, rel=1e-13)
    opt.step({"w": np.array([-0.25])})
    assert p["w"][0] == pytest.approx(0.8714672987058463, rel=1e-13)


def test_adamw_updates_in_place_without_touching_the_gradients():
    """float32 parameters and moments stay float32 objects updated in place, the gradients
    stay as they were, and three steps equal the textbook update written with temporaries,
    to the bit."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 3)).astype(np.float32)                 # (4, 3)
    p, ref = {"w": w}, w.copy()
    opt = AdamW(p, lr=0.05, weight_decay=0.1)
    m, v = np.zeros_like(ref), np.zeros_like(ref)
    for t in range(1, 4):
        g = rng.standard_normal((4, 3)).astype(np.float32)             # (4, 3)
        g0 = g.copy()
        opt.step({"w": g})
        assert np.array_equal(g, g0)
        m = 0.9 * m + (1 - 0.9) * g0
        v = 0.999 * v + (1 - 0.999) * g0 * g0
        ref = ref - 0.05 * 0.1 * ref
        ref = ref - 0.05 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    assert p["w"] is w and w.dtype == opt.state["m"]["w"].dtype == np.float32
    assert np.array_equal(w, ref) and np.array_equal(opt.state["v"]["w"], v)


def test_clip_grad_norm_rescales_together_and_keeps_dtypes():
    grads = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]], np.float16)}
    clipped, norm = clip_grad_norm(grads, 1.0)
    assert norm == 5.0
    assert clipped["a"].dtype == np.float32 and clipped["b"].dtype == np.float16
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [[0.8]], rtol=1e-3)
    same, norm = clip_grad_norm(grads, 10.0)                      # below the threshold: untouched
    assert norm == 5.0 and same["a"] is grads["a"]
    bad = {"a": np.array([np.inf, 1.0])}
    out, norm = clip_grad_norm(bad, 1.0)                          # a scaler skips such a step
    assert norm == np.inf and out["a"] is bad["a"]
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(grads, 0.0)


def test_warmup_cosine_schedule():
    s = WarmupCosine(peak_lr=1.0, total_steps=10, warmup_steps=2, floor_lr=0.1)
    assert [s.lr(0), s.lr(1), s.lr(2)] == [0.5, 1.0, 1.0]
    assert s.lr(6) == pytest.approx(0.1 + 0.9 * 0.5)              # half-way through the cosine
    assert s.lr(10) == s.lr(1000) == 0.1
    after = [s.lr(t) for t in range(2, 11)]
    assert all(a > b for a, b in zip(after, after[1:]))
    with pytest.raises(ValueError, match="warmup_steps=5 exceeds total_steps=3"):
        WarmupCosine(1.0, 3, 5)


def test_an_optimizer_takes_its_lr_from_the_schedule_at_its_step():
    s = WarmupCosine(peak_lr=1.0, total_steps=10, warmup_steps=2)
    p = {"w": np.zeros(1)}
    opt = SGD(p, lr=1.0, schedule=s)
    for _ in range(4):
        opt.step({"w": np.ones(1)})
    assert p["w"][0] == -(s.lr(0) + s.lr(1) + s.lr(2) + s.lr(3))  # 0.5 + 1 + 1 + 0.96
    assert set(opt.state_dict()) == {"t", "velocity.w"}          # the format is unchanged


# -- the model ---------------------------------------------------------------------------

def test_residual_net_gradients_match_finite_differences():
    """x + SparseMoE(x) blocks, aux losses included through aux_scale, in float64."""
    config = SparseConfig(d_model=4, num_experts=3, d_hidden=5, k=2, balance_coef=0.3, z_coef=0.1,
                          router_scale=1.0)
    model = moe_net(3, 2, config, num_blocks=2, seed=3).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3))                               # (N, D_in)
    dy, c = rng.standard_normal((6, 2)), 0.7                      # (N, D_out), aux weight

    def f():
        return model.forward(x), np.array(model.aux)

    def selection():
        return tuple(sparse_moe_selection(b._cache) for b in model.blocks)

    f()
    dx = model.backward(dy, aux_scale=c)
    grads = {k: g.copy() for k, g in model.grads.items()}
    row = check_gradient(f, x, (dy, c), dx, selection=selection, name="moe_net", wrt="x")
    assert row.passed, f"x: check_error {row.check_error:.2e}"
    for name in ("block0.w_router", "block1.w1", "embed.w", "head.b"):
        row = check_gradient(f, model.params[name], (dy, c), grads[name], selection=selection,
                             name="moe_net", wrt=name)
        assert row.passed, f"{name}: check_error {row.check_error:.2e}"


def test_models_cover_their_state_and_match_parameters():
    config = SparseConfig(d_model=8, num_experts=4, d_hidden=8, k=2, capacity_factor=1.0,
                          balance_coef=0.01)
    moe = moe_net(2, 3, config, num_blocks=2, seed=0, dtype=np.float32)
    sd = moe.state_dict()
    assert {"block0.rng.routing", "block1.rng.routing", "embed.w", "head.b"} <= set(sd)
    assert len([k for k in sd if not k.startswith(("block0.rng", "block1.rng"))]) == len(moe.params)
    x = np.random.default_rng(0).standard_normal((10, 2)).astype(np.float32)
    moe.forward(x)
    assert moe.aux == pytest.approx(sum(b.aux for b in moe.blocks))
    assert [(name, s.counts.shape) for name, s in moe.routing_stats()] == [("block0", (4,)),
                                                                         ("block1", (4,))]
    for match in ("active", "total"):
        dense = dense_net(2, 3, 8, dense_width(config, match), num_blocks=2)
        target = moe.active_params() if match == "active" else moe.num_params()
        assert abs(dense.num_params() - target) <= 2 * (2 * 8 + 1)   # within one hidden unit a block


# -- the loop, loss scaling and resuming ----------------------------------------------------

@pytest.fixture
def inf_at(monkeypatch):
    """inf_at({steps}): the gradients of those steps get an inf (an fp16 overflow, forced)."""
    steps = set()
    original = Trainer._backward

    def backward(self, out, target):
        result = original(self, out, target)
        if self.step in steps:
            next(iter(self.model.grads.values())).flat[0] = np.inf
        return result

    monkeypatch.setattr(Trainer, "_backward", backward)
    return steps.update


def test_a_skipped_step_changes_nothing_but_the_scale(inf_at):
    run = build_run(TrainConfig(loss_scale="dynamic", **TINY))
    t = run.trainer
    t.train_step()
    inf_at({1})
    params = {k: v.copy() for k, v in run.model.params.items()}
    moments = run.optimizer.state_dict()
    record = t.train_step()
    assert record["skipped"] and t.skipped == 1 and t.step == 2
    assert params_equal(params, run.model.params)
    assert params_equal(moments, run.optimizer.state_dict())
    assert run.scaler.scale == 2.0**15


@pytest.mark.parametrize("loss_scale", ["none", "dynamic"])
def test_stop_then_resume_is_bit_identical(tmp_path, inf_at, loss_scale):
    """Also across a skipped step (dynamic scaling: an inf at step 3, before the stop at 10)."""
    if loss_scale == "dynamic":
        inf_at({3})
    config = TrainConfig(loss_scale=loss_scale, **TINY)
    whole = train_in_dir(config, tmp_path / "whole", log=lambda s: None)

    class StopAt10:
        def on_step(self, trainer, record):
            trainer.stop = trainer.step == 10

    part = start_run(config, tmp_path / "part")
    part.trainer.run(config.steps, callbacks=[StopAt10()], log_every=config.log_every)
    ckpt.save_checkpoint(tmp_path / "part" / ckpt.CHECKPOINT_FILE, part.model, part.optimizer,
                         part.scaler, part.trainer, config.to_dict())
    resumed = train_in_dir(config, tmp_path / "part", resume=True, log=lambda s: None)
    assert resumed.trainer.step == whole.trainer.step == config.steps
    assert params_equal(whole.model.state_dict(), resumed.model.state_dict())
    assert params_equal(whole.optimizer.state_dict(), resumed.optimizer.state_dict())
    if loss_scale == "dynamic":
        assert whole.trainer.skipped == resumed.trainer.skipped == 1
        assert whole.scaler.scale == resumed.scaler.scale == 2.0**15


def test_ctrl_c_saves_a_checkpoint_that_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    base = ["train", *TINY_ARGS, "--loss-scale", "dynamic"]
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    original = Progress.on_step

    def press_ctrl_c(self, trainer, record):                    # a real SIGINT, mid-run
        original(self, trainer, record)
        if trainer.step == 9:                                   # mid-way between two logs
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(Progress, "on_step", press_ctrl_c)
    run_dir = tmp_path / "cut"
    assert main([*base, "--out", str(run_dir)]) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(Progress, "on_step", original)
    assert main(["train", "--out", str(run_dir), "--resume"]) == 0
    a = ckpt.read_checkpoint(tmp_path / "whole" / ckpt.CHECKPOINT_FILE)
    b = ckpt.read_checkpoint(run_dir / ckpt.CHECKPOINT_FILE)
    assert params_equal(a, b)
    drop_time = lambda d: [{k: v for k, v in r.items() if k != "time"}
                           for r in ckpt.read_jsonl(d / ckpt.METRICS_FILE)]
    assert drop_time(tmp_path / "whole") == drop_time(run_dir)


def test_a_power_of_two_loss_scale_changes_no_bit():
    """Loss and aux gradients scaled by 2^10, unscaled once: the same bits as no scaling.

    Breaks if the auxiliary gradient is not scaled (backward(dy, aux_scale=S)) or if the
    gradients are unscaled twice or not at all."""
    from moe_np.scaling import LossScaler
    config = TrainConfig(balance_coef=0.5, z_coef=0.1, **TINY)
    plain, scaled = build_run(config), build_run(config)
    scaled.trainer.scaler = LossScaler(init_scale=2.0**10, dynamic=False)
    plain.trainer.run(6)
    scaled.trainer.run(6)
    assert params_equal(plain.model.params, scaled.model.params)


def test_same_seed_same_metrics():
    config = TrainConfig(**TINY)
    a, b = train_quietly(config), train_quietly(config)
    assert a.trainer.history.records == b.trainer.history.records
    assert list(a.trainer.history) == list(b.trainer.history)
    other = train_quietly(replace(config, seed=1))
    assert other.trainer.history.records != a.trainer.history.records


def test_routing_summary_by_hand():
    """N=4 tokens, K=2, E=4: 8 assignments choose experts 0,0,0,0,1,1,2,3 before capacity."""
    from moe_np.sparse import RoutingStats
    from moe_np.training import routing_summary
    ids = np.array([[0, 1], [0, 2], [0, 1], [3, 0]])
    stats = RoutingStats(ids, np.full((4, 2), 0.5), counts=np.array([2, 2, 1, 1]), num_dropped=2,
                         logits=np.zeros((4, 4)))
    r = routing_summary(stats)
    assert r["load"] == [0.5, 0.25, 0.125, 0.125]                # chosen, not kept
    assert r["max_vio"] == 1.0                                    # 0.5 / 0.25 - 1
    assert r["cv"] == pytest.approx(np.sqrt(0.0234375) / 0.25)    # population std / mean
    assert r["drop_rate"] == 0.25 and r["dropped"] == 2
    assert r["entropy"] == pytest.approx(np.log(4)) and r["max_logit"] == 0.0
    assert r["z_loss"] == pytest.approx(np.log(4) ** 2) and r["balance"] == pytest.approx(1.0)


def test_records_hold_the_routing_statistics():
    records = train_quietly(TrainConfig(**TINY)).trainer.history.records
    assert [r["step"] for r in records] == [0, 6, 12, 18, 23]
    for r in records:
        assert {"loss", "aux", "accuracy", "test_accuracy", "lr"} <= set(r)
        for block in r["routing"]:
            load = np.array(block["load"])
            assert load.shape == (4,) and load.sum() == pytest.approx(1.0, abs=1e-5)
            assert block["max_vio"] == pytest.approx(load.max() / load.mean() - 1, abs=1e-4)
            assert 0 <= block["entropy"] <= np.log(4) + 1e-6 and 0 <= block["drop_rate"] <= 1


# -- checkpoints ------------------------------------------------------------------------

def _saved_run(tmp_path):
    run = build_run(TrainConfig(**TINY))
    run.trainer.run(5)
    path = tmp_path / ckpt.CHECKPOINT_FILE
    ckpt.save_checkpoint(path, run.model, run.optimizer, run.scaler, run.trainer)
    return run, path


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    run, path = _saved_run(tmp_path)
    before = path.read_bytes()
    run.trainer.run(8)

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, run.model, run.optimizer, run.scaler, run.trainer)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    (tmp_path / (path.name + ".x1y2.tmp")).write_bytes(b"junk from a killed process")
    fresh = build_run(TrainConfig(**TINY))
    ckpt.load_checkpoint(path, fresh.model, fresh.optimizer, fresh.scaler, fresh.trainer)
    assert fresh.trainer.step == 5


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing key", "wrong shape"])
def test_a_bad_checkpoint_is_refused_and_changes_nothing(tmp_path, damage):
    run, path = _saved_run(tmp_path)
    arrays = ckpt.read_checkpoint(path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 1000)
    else:
        key = "model.block0.w1"
        arrays = {k: v for k, v in arrays.items() if k != key} if damage == "missing key" \
            else arrays | {key: np.zeros((1, 2), np.float32)}
        np.savez(path, **arrays)
    fresh = build_run(TrainConfig(**TINY))
    before = ckpt.checkpoint_arrays(fresh.model, fresh.optimizer, fresh.scaler, fresh.trainer)
    with pytest.raises(ValueError) as err:
        ckpt.load_checkpoint(path, fresh.model, fresh.optimizer, fresh.scaler, fresh.trainer)
    assert "\n" not in str(err.value) and "load_checkpoint" in str(err.value)
    after = ckpt.checkpoint_arrays(fresh.model, fresh.optimizer, fresh.scaler, fresh.trainer)
    assert params_equal(before, after)


def test_a_checkpoint_whose_values_are_refused_restores_every_part(tmp_path):
    """A loss scale out of range passes the key check; the parts loaded before it are put back."""
    run = build_run(TrainConfig(loss_scale="dynamic", **TINY))
    run.trainer.run(5)
    path = tmp_path / ckpt.CHECKPOINT_FILE
    ckpt.save_checkpoint(path, run.model, run.optimizer, run.scaler, run.trainer)
    arrays = ckpt.read_checkpoint(path)
    np.savez(path, **(arrays | {"scaler.scale": np.array(-1.0)}))
    fresh = build_run(TrainConfig(loss_scale="dynamic", **TINY))
    before = ckpt.checkpoint_arrays(fresh.model, fresh.optimizer, fresh.scaler, fresh.trainer)
    with pytest.raises(ValueError, match="scale"):
        ckpt.load_checkpoint(path, fresh.model, fresh.optimizer, fresh.scaler, fresh.trainer)
    after = ckpt.checkpoint_arrays(fresh.model, fresh.optimizer, fresh.scaler, fresh.trainer)
    assert params_equal(before, after)


# -- the command line ---------------------------------------------------------------------

def test_train_and_plot_end_to_end(tmp_path, capsys):
    a, b = tmp_path / "moe", tmp_path / "dense"
    assert main(["train", *TINY_ARGS, "--precision", "fp16", "--out", str(a)]) == 0
    assert main(["train", *TINY_ARGS, "--model", "dense", "--out", str(b)]) == 0
    out = capsys.readouterr().out
    assert "MaxVio" in out and "tok/s" in out and "left" in out and "scale 65536" in out
    assert {"config.json", "metrics.jsonl", "routing.jsonl", "checkpoint.npz"} <= \
        {p.name for p in a.iterdir()}
    assert json.loads((a / "config.json").read_text())["config"]["experts"] == 4
    assert len(ckpt.read_jsonl(a / "routing.jsonl")) == len(ckpt.read_jsonl(a / "metrics.jsonl")) == 5
    assert main(["plot", str(a), str(b)]) == 0
    figures = {"loss.png", "expert-load.png", "maxvio.png", "entropy-drops.png",
               "probe-heatmap.png", "routing-map.png", "loss-scale.png", "compare.png"}
    assert figures <= {p.name for p in a.iterdir()}
    assert all((a / f).stat().st_size > 1000 for f in figures)


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("existing") / "run"
    assert main(["train", *TINY_ARGS, "--out", str(run_dir)]) == 0
    return run_dir


BAD = {
    "unknown option": ["train", "--out", "{new}", "--bogus", "1"],
    "k above experts": ["train", "--out", "{new}", "--experts", "2", "--k", "3"],
    "capacity factor 0": ["train", "--out", "{new}", "--capacity-factor", "0"],
    "capacity factor < 0": ["train", "--out", "{new}", "--capacity-factor=-1"],
    "negative seed": ["train", "--out", "{new}", "--seed", "-1"],
    "another run, no --resume": ["train", "--out", "{run}", *TINY_ARGS],
    "--resume, other config": ["train", "--out", "{run}", "--resume", "--experts", "8"],
    "--resume, no run there": ["train", "--out", "{new}", "--resume"],
    "truncated checkpoint": ["train", "--out", "{run}", "--resume"],
    "corrupt checkpoint": ["train", "--out", "{run}", "--resume"],
    "gradcheck negative seed": ["gradcheck", "--seed", "-1"],
    "tutorial --quick --update": ["tutorial", "7", "--quick", "--update"],
    "plot, no run": ["plot", "{new}"],
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_touches_nothing(case, existing_run, tmp_path, capsys):
    run_dir = existing_run
    if case.endswith("checkpoint"):                             # damage a copy of the run
        run_dir = tmp_path / "copy"
        run_dir.mkdir()
        for p in existing_run.iterdir():
            (run_dir / p.name).write_bytes(p.read_bytes())
        data = (run_dir / ckpt.CHECKPOINT_FILE).read_bytes()
        (run_dir / ckpt.CHECKPOINT_FILE).write_bytes(
            data[: len(data) // 3] if case.startswith("truncated") else b"\x13" * len(data))
    before = _digest(run_dir)
    argv = [a.format(new=tmp_path / "new", run=run_dir) for a in BAD[case]]
    assert main(argv) != 0
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    assert captured.out == ""
    assert _digest(run_dir) == before
    assert not (tmp_path / "new").exists()


def test_gradcheck_filter_without_a_match_prints_only_the_error(capsys):
    assert main(["gradcheck", "--filter", "no such check"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "no check matches --filter 'no such check'" in captured.err


def test_a_closed_pipe_ends_quietly():
    """`gradcheck --json | head`: the reader goes away; no BrokenPipeError traceback."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "moe_np", "gradcheck", "--json", "--filter",
                             "linear"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                                         # the reader is gone at once
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err


def test_bench_that_fails_to_import_leaves_the_cli_working(monkeypatch, capsys):
    import sys
    import moe_np
    monkeypatch.setitem(sys.modules, "moe_np.bench", None)      # import moe_np.bench now fails
    monkeypatch.delattr(moe_np, "bench", raising=False)         # (an earlier import set it)
    assert main(["bench"]) == 2
    assert "bench is unavailable" in capsys.readouterr().err
    assert main(["gradcheck", "--filter", "linear"]) == 0


def test_demo_quick_runs(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "pass: check_error < 1e-07" in out and "ideal" in out and "dense baseline" in out
    assert out.index("MaxVio") == out.index("MaxVio = max_i load_i / mean(load) - 1")  # defined first
    last = out.strip().splitlines()[-1]
    assert str(tmp_path / "demo") in last and "chapter 7" in last
    assert (tmp_path / "demo" / "routing-map.png").exists()


# -- one set of defaults, what is printed, short runs, extensions, interrupts ----------------

def _help_text(capsys) -> str:
    assert main(["train", "--out", "x", "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())               # argparse's wrapping undone


def test_one_default_per_setting(capsys):
    """The defaults table: SparseConfig, TrainConfig, `train --help` and the demo agree."""
    from dataclasses import fields
    from moe_np.config import LAYER_SETTINGS, RUN_OBJECTIVE, PrecisionConfig
    from moe_np.demo import demo_config
    layer = {f.name: f.default for f in fields(SparseConfig)} | {"precision": PrecisionConfig().compute}
    train, text = TrainConfig(), _help_text(capsys)
    for name in LAYER_SETTINGS:
        assert getattr(train, name) == layer[name], name
        shown = "none: dropless" if layer[name] is None else layer[name]
        assert f"(default {shown}, as SparseConfig)" in text, name
    for name, value in RUN_OBJECTIVE.items():                      # the run's own, said so
        assert getattr(train, name) == value and layer[name] == 0.0
        assert f"(default {value}; a bare SparseConfig has 0)" in text
    assert train.dispatch == "numba" and train.capacity_factor is None
    for quick in (True, False):                                    # the demo: fp16 on purpose
        demo = demo_config(quick)
        for name in (*LAYER_SETTINGS, *RUN_OBJECTIVE, "warmup"):
            assert getattr(demo, name) == getattr(train, name) or name == "precision", name


def test_a_20_step_run_works_and_an_explicit_warmup_past_it_does_not(tmp_path, capsys):
    assert TrainConfig(steps=20).warmup_steps == 2 and TrainConfig().warmup_steps == 100
    assert main(["train", "--steps", "20", "--out", str(tmp_path / "short")]) == 0
    out = capsys.readouterr().out
    assert "warm-up 2 steps" in out and "step 20/20" in out
    assert main(["train", "--steps", "20", "--warmup", "30", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: TrainConfig: warmup=30 exceeds the schedule's 20 steps"
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_bias"])
def test_the_printed_settings_are_the_applied_ones(router):
    """A non-softmax router takes no balance loss: the line says 0, as the layers apply."""
    import re
    from moe_np.training import describe_run
    run = build_run(TrainConfig(router=router, balance_coef=0.05, **TINY))
    text = describe_run(run)
    for block in run.model.blocks:
        c = block.config
        printed = re.search(r"balance (\S+?),? .*z (\S+?);", text)
        assert float(printed[1]) == c.balance_coef and float(printed[2]) == c.z_coef
        assert f"dispatch {c.dispatch}" in text and f"top-{c.k}" in text
    assert ("0.05 is not applied" in text) == (router == "sigmoid_bias")
    assert f"warm-up {TINY['warmup']} steps" in text


def test_fp16_reaches_the_layers():
    """--precision fp16 rounds inside the layers, not only through the loss scaler."""
    x = np.random.default_rng(0).uniform(-1, 1, (64, 2)).astype(np.float32)     # (N, D_in)
    outs = {}
    for precision in ("fp32", "fp16"):
        run = build_run(TrainConfig(precision=precision, loss_scale="none", **TINY))
        outs[precision] = run.model.forward(x)                                 # (N, V)
        assert all(b.config.precision.compute == precision for b in run.model.blocks)
    diff = np.abs(outs["fp16"] - outs["fp32"]).max()
    assert 1e-5 < diff < 1e-1, diff                         # rounded (fp16: 2^-11), not broken


def test_fit_trains_any_layer_through_the_protocol():
    """fit(Sequential(...), scaler=LossScaler()): aux and routing reached by the protocol."""
    from moe_np.models import Linear, Sequential
    from moe_np.scaling import LossScaler
    from moe_np.sparse import SparseMoE
    from moe_np.training import fit
    from moe_np import losses
    config = SparseConfig(d_model=8, num_experts=4, d_hidden=8, k=2, balance_coef=0.01)
    model = Sequential(Linear(2, 8, seed=0), SparseMoE(config, seed=1), Linear(8, 3, seed=2))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 2)), rng.integers(0, 3, 64)                # (N, 2), (N,)
    before = {k: v.copy() for k, v in model.params.items()}
    history = fit(model, x, y, losses.cross_entropy_forward, losses.cross_entropy_backward,
                  AdamW(model.params, lr=1e-2), steps=5, batch_size=16, log_every=2, log=None,
                  scaler=LossScaler(init_scale=2.0**4))
    assert len(history) == 5 and not params_equal(before, model.params)
    assert [r["step"] for r in history.records] == [0, 2, 4]
    assert all(r["aux"] > 0 and [b["block"] for b in r["routing"]] == ["1"] for r in history.records)


def test_a_second_ctrl_c_says_where_the_last_checkpoint_is(tmp_path, monkeypatch, capsys):
    original = Progress.on_step

    def press_ctrl_c_twice(self, trainer, record):
        original(self, trainer, record)
        if trainer.step == 13:                                  # checkpoints at 0 and 10
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(Progress, "on_step", press_ctrl_c_twice)
    run_dir = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--out", str(run_dir)]) == 130
    err = capsys.readouterr().err.strip()
    assert "second Ctrl-C" in err and "at step 10 of 24" in err, err
    assert err.endswith(f"python -m moe_np train --out {run_dir} --resume") and "\n" not in err
    monkeypatch.setattr(Progress, "on_step", original)
    assert main(["train", "--out", str(run_dir), "--resume"]) == 0
    assert "resuming at step 10 of 24" in capsys.readouterr().out


def test_a_finished_run_is_extended_at_the_floor_lr(tmp_path, capsys):
    """--resume --steps 36 on a 24-step run: the schedule keeps its 24 steps, the rest at lr/10."""
    run_dir = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--out", str(run_dir)]) == 0
    assert main(["train", "--out", str(run_dir), "--resume"]) == 0
    assert "--resume --steps N (N > 24" in capsys.readouterr().out   # how to go on, said
    assert main(["train", "--out", str(run_dir), "--resume", "--steps", "36"]) == 0
    stored = json.loads((run_dir / "config.json").read_text())["config"]
    assert stored["steps"] == 36 and stored["schedule_steps"] == 24
    records = ckpt.read_jsonl(run_dir / ckpt.METRICS_FILE)
    assert [r["step"] for r in records] == [0, 6, 12, 18, 23, 24, 30, 35]
    lr = TrainConfig().lr
    assert all(r["lr"] == pytest.approx(lr / 10) for r in records if r["step"] >= 24)
    assert ckpt.read_checkpoint(run_dir / ckpt.CHECKPOINT_FILE)["trainer.step"] == 36
    capsys.readouterr()
    assert main(["train", "--out", str(run_dir), "--resume", "--steps", "30"]) == 2
    assert "can be extended, not shortened" in capsys.readouterr().err
    assert main(["train", "--out", str(run_dir), "--resume", "--steps", "40", "--lr", "0.1"]) == 2
    assert "start a new run with another --out" in capsys.readouterr().err


def test_the_demo_judges_checks_by_check_error(monkeypatch, capsys):
    """A large rel_error on tiny entries passes (check_error decides, chapter 1); the worst
    check shown is the worst by check_error."""
    from moe_np import demo
    from moe_np.gradcheck import CheckResult
    rows = [CheckResult("tiny entries", "x", rel_error=1e-3, passed=True, check_error=1e-9),
            CheckResult("closest call", "w", rel_error=1e-9, passed=True, check_error=5e-8)]
    monkeypatch.setattr(demo, "run_checks", lambda **kw: rows)
    assert demo.summarise_checks(quick=False)
    out = capsys.readouterr().out
    assert "0 failing" in out and "check_error 5.0e-08 (closest call wrt w)" in out, out
