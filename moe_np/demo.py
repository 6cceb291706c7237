"""`python -m moe_np demo`: the tour in about a minute on two cores.

1. the gradient-check summary, against the pass threshold;
2. a sparse MoE (8 experts, top-2, capacity factor 1.25, balance loss) trained
   on the clusters task with fp16 loss scaling, through the same code as
   `python -m moe_np train`, with progress lines; then the dense baseline
   with as many active parameters, for the comparison;
3. the routing figures of the run, and where each is explained.

`--quick` runs the same path at toy sizes in a few seconds (the tests use it).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from moe_np.checks import run_checks

FIGURES = {  # file -> the chapter that explains it
    "loss.png": "chapter 7", "expert-load.png": "chapters 4 and 7", "maxvio.png": "chapter 7",
    "entropy-drops.png": "chapters 4 and 7", "probe-heatmap.png": "chapter 7",
    "routing-map.png": "chapters 3 and 7", "loss-scale.png": "chapter 6",
}


def summarise_checks(quick: bool) -> bool:
    """Run the registered gradient checks (chapters 1-2 only when quick) and print one summary."""
    rows = run_checks(chapter=1) + run_checks(chapter=2) if quick else run_checks()
    failed = [r for r in rows if not r.passed]
    worst = max(rows, key=lambda r: r.rel_error)
    print(f"gradient checks{' (chapters 1-2, quick)' if quick else ''}: {len(rows)} run, "
          f"{len(failed)} failing; worst rel_error {worst.rel_error:.1e} ({worst.name} wrt "
          f"{worst.wrt}) against the pass threshold 1e-7")
    for r in failed:
        print(f"  FAIL {r.name} wrt {r.wrt}: {r.rel_error:.2e}")
    return not failed


def layers_round_fp16() -> bool:
    """Does SparseConfig(precision=fp16) change what a layer computes yet? (Compared on one batch.)"""
    from moe_np import SparseConfig, SparseMoE
    from moe_np.config import PrecisionConfig
    base = SparseConfig(d_model=8, num_experts=4, d_hidden=8, k=2)
    x = np.random.default_rng(0).uniform(-1, 1, (16, 8)).astype(np.float32)     # (N, D)
    outs = [SparseMoE(replace(base, precision=PrecisionConfig(compute=c)), dtype=np.float32).forward(x)
            for c in ("fp32", "fp16")]                                         # (N, D) each
    return not np.array_equal(outs[0], outs[1])


def demo_config(quick: bool):
    """The demo's run: chapter 7's defaults, fp16 loss scaling; toy sizes when quick."""
    from moe_np.train import TrainConfig
    if quick:
        return TrainConfig(precision="fp16", steps=120, data_size=2000, batch_size=128,
                           d_model=16, d_hidden=16, warmup=10, log_every=40, checkpoint_every=120)
    return TrainConfig(precision="fp16", steps=4000, warmup=200, log_every=400,
                       checkpoint_every=1000)


def test_routing(run) -> dict:
    """routing_summary of every sparse block on the whole test set, in eval mode."""
    from moe_np.train import routing_summary, sparse_stats
    run.model.eval()
    run.model.forward(run.task.x_test)
    return {i: routing_summary(s) for i, s in sparse_stats(run.model)}


def train_pair(config, out: Path):
    """The MoE run in `out` (progress printed), then its dense baseline, quietly."""
    from moe_np.train import train_in_dir, train_quietly
    print(f"\nsparse MoE on the clusters task (16 clusters in the plane, each labelling its "
          f"points its own way; 4 classes), run directory {out}")
    if not layers_round_fp16():
        print("(the layers do not round to fp16 yet: this run computes in fp32 and goes "
              "through fp16's loss scaling and overflow checks)")
    moe = train_in_dir(config, out)
    t = time.perf_counter()
    dense = train_quietly(replace(config, model="dense", dense_match="active"))
    print(f"dense baseline: the same {config.steps} steps, its FFN as wide as the MoE's active "
          f"parameters ({dense.model.active_params():,} vs {moe.model.active_params():,}); "
          f"{time.perf_counter() - t:.0f}s")
    return moe, dense


def report(moe, dense) -> None:
    """Each number against what it should be compared with."""
    m, d = moe.trainer.history.records[-1], dense.trainer.history.records[-1]
    c = moe.config
    print(f"\ntest accuracy: MoE {m['test_accuracy']:.3f}, dense baseline {d['test_accuracy']:.3f}, "
          f"chance {1 / moe.task.d_out:.3f} ({len(moe.task.x_test):,} test points)")
    routing = test_routing(moe)
    shares = ", ".join(f"{max(r['load']):.3f}" for r in routing.values())
    vio = ", ".join(f"{r['max_vio']:.2f}" for r in routing.values())
    print(f"expert load on the test set, per block: largest share {shares} against the ideal "
          f"1/E = {1 / c.experts:.3f} (MaxVio {vio}; 0 is perfect balance)")
    drops = ", ".join(f"{r['drop_rate']:.1%}" for r in routing.values())
    print(f"assignments dropped at capacity factor {c.capacity_factor}: {drops} per block "
          f"(0% with no capacity limit)")
    scale, skipped = moe.scaler.scale, moe.trainer.skipped
    print(f"loss scale at the end: {scale:.0f} = 2^{np.log2(scale):.0f} (it starts at 2^16, halves "
          f"on an overflow, doubles after 2000 clean steps); {skipped} of {c.steps} steps skipped")


def run_demo(quick: bool = False, out=None) -> int:
    """The whole tour; returns 0 if every gradient check passed, else 1."""
    from moe_np.plots import plot_runs
    start = time.perf_counter()
    np.set_printoptions(precision=4, suppress=True)
    ok = summarise_checks(quick)
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="moe_np_demo_"))
    moe, dense = train_pair(demo_config(quick), out)
    report(moe, dense)
    written = plot_runs([out])
    where = "; ".join(f"{p.name} ({FIGURES.get(p.name, 'chapter 7')})" for p in written)
    print(f"\ndemo took {time.perf_counter() - start:.0f}s. Figures in {out}: {where}")
    return 0 if ok else 1
