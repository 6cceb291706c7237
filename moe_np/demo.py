"""`python -m moe_np demo`: the tour in about a minute on two cores.

1. the gradient-check summary, judged by the rule that decides (check_error,
   chapter 1);
2. a sparse MoE trained on the clusters task with the library's defaults (8
   experts, top-2, dropless, numba dispatch, balance and z-loss as `train`
   sets them) in simulated fp16 with dynamic loss scaling, through the same
   code as `python -m moe_np train`, with progress lines; then the dense
   baseline with as many active parameters, for the comparison;
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
from moe_np.gradcheck import TOLERANCE

FIGURES = {  # file -> the chapter that explains it
    "loss.png": "chapter 7", "expert-load.png": "chapters 4 and 7", "maxvio.png": "chapter 7",
    "entropy-drops.png": "chapters 4 and 7", "probe-heatmap.png": "chapter 7",
    "routing-map.png": "chapters 3 and 7", "loss-scale.png": "chapter 6",
}


def summarise_checks(quick: bool) -> bool:
    """Run the registered gradient checks (chapters 1-2 only when quick) and print one summary:
    pass means check_error < TOLERANCE (chapter 1); rel_error is shown, not used."""
    rows = run_checks(chapter=1) + run_checks(chapter=2) if quick else run_checks()
    failed = [r for r in rows if not r.passed]
    worst = max(rows, key=lambda r: r.check_error)
    print(f"gradient checks{' (chapters 1-2, quick)' if quick else ''}: {len(rows)} run, "
          f"{len(failed)} failing (pass: check_error < {TOLERANCE:.0e}, chapter 1); worst "
          f"check_error {worst.check_error:.1e} ({worst.name} wrt {worst.wrt})")
    for r in failed:
        print(f"  FAIL {r.name} wrt {r.wrt}: check_error {r.check_error:.2e}")
    return not failed


def demo_config(quick: bool):
    """The demo's run: `train`'s defaults (the library's), in fp16; toy sizes when quick."""
    from moe_np.config import TrainConfig
    if quick:
        return TrainConfig(precision="fp16", steps=120, data_size=2000, batch_size=128,
                           d_model=16, d_hidden=16, log_every=40, checkpoint_every=120)
    return TrainConfig(precision="fp16", steps=4000, log_every=400, checkpoint_every=1000)


def test_routing(run) -> list[dict]:
    """routing_summary of every sparse block on the whole test set, in eval mode."""
    from moe_np.training import routing_report
    run.model.eval()
    run.model.forward(run.task.x_test)
    return routing_report(run.model)


def train_pair(config, out: Path):
    """The MoE run in `out` (progress printed), then its dense baseline, quietly."""
    from moe_np.training import train_in_dir, train_quietly
    print(f"\nsparse MoE on the clusters task (16 clusters in the plane, each labelling its "
          f"points its own way; 4 classes), run directory {out}")
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
    shares = ", ".join(f"{max(r['load']):.3f}" for r in routing)
    vio = ", ".join(f"{r['max_vio']:.2f}" for r in routing)
    print(f"expert load on the test set, per block: largest share {shares} against the ideal "
          f"1/E = {1 / c.experts:.3f} (MaxVio = max_i load_i / mean load - 1: {vio}; "
          f"0 is perfect balance)")
    drops = ", ".join(f"{r['drop_rate']:.1%}" for r in routing)
    limit = "dropless: no capacity limit" if c.capacity_factor is None else \
        f"capacity factor {c.capacity_factor:g}"
    print(f"assignments dropped ({limit}): {drops} per block")
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
