"""python -m moe_np bench [--json] [--quick]: where the time of a sparse MoE step goes.

Full size: N=8192 tokens, D=512, H=1024, E=8 experts, K=2, float32, ReLU
experts, softmax top-2 router, no capacity limit. The timings run twice, each
time in a fresh process: at the libraries' default threads (no *_NUM_THREADS
variable set: OpenBLAS and numba use every core) and with one thread each
(OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1); both are
reported under `threads`, and the headline keys are the default setting's.
Both processes set OPENBLAS_THREAD_TIMEOUT=20 unless it is set already
(BLAS_SPIN: OpenBLAS's idle threads sleep after 2^20 clock ticks, not after its
build's 2^28) and NUMPY_MADVISE_HUGEPAGE=0 likewise (BIG_PAGES: NumPy does not ask
the kernel for 2 MiB pages under its large arrays, whose first touch took about 10-25 ms
a page on chapter 5's machine), and say which values they ran with.
Every time is the median of --repeats runs (default 3) after one warm-up,
the strategies (and PyTorch, when it is importable) taking turns within each
repeat, so a slow moment of a shared machine hits them all alike.

    layer    forward, forward+backward of SparseMoE for each dispatch strategy
    stages   plan, gather, experts, combine and their backward passes, timed
             inside those same layer steps
    floor    the expert GEMMs of forward+backward alone, on balanced buffers
    copies   the gather and the combine against a compiled copy loop and memcpy of the same
             bytes, taking turns in each round, into new arrays and into touched ones
    scaling  numba's time per token for E = 4..64 at fixed K, D, H; at the default threads
             also with the experts side by side (MOE_NP_EXPERT_THREADS=2, moe_np/blas.py)
    torch    a Mixtral-style eager block (per-expert loop + index_add_), if importable
    lowp     a training step in simulated fp16 and fp8 over the fp32 step (default threads)
    lm       chapter 9's language-model training step, its GEMM floor, its stages and, with
             torch and transformers importable, HF's MixtralForCausalLM (bench_lm.py; default threads)
    jit      first-call compile time, then cached start-up, each in a fresh process
    memory   peak resident growth and NumPy allocations of one forward+backward, and
             what is alive after each stage, in a fresh process

Each timing process keeps freed heap pages (heap.keep_pages(KEEP_MIB, every_size=True)):
a step's arrays, whatever their size, reuse the memory the last step freed instead of
faulting fresh pages (which a virtual machine can be slow to provide, 2 MiB ones most of
all: BIG_PAGES above). The lm section's build_lm_run calls keep_pages() after that, which sets
the free heap kept back to 64 MiB and leaves every_size's two settings in place. The
memory process keeps none (it measures one step's growth from a fresh start).

Progress goes to stderr; --json prints one object on stdout. Targets are
judged at the full size only (--quick is a smoke test of every measurement)
and reported, never asserted: timings depend on the machine and its load.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moe_np.bench_memory import (MEMORY_CALLS, array_mib, max_resident_mib, memory_model,  # noqa: F401
                                 memory_parts, memory_run, resident_mib)
from moe_np.bench_runs import (FULL, QUICK, SCALING_E, SCALING_TOKENS, STAGES, STRATEGY_CALLS,  # noqa: F401
                               Size, _START, bandwidth_gbps, copy_ratios, copy_rounds,
                               gemm_floor_runner, instrument, layer_step, make_inputs, make_layer, median_time,
                               progress, scaling, stage_medians, staged_runner, step_time_ratios,
                               time_interleaved, torch_gemm_floor_runner, torch_runner)
from moe_np.bench_targets import (ONCE_TARGETS, TIMING_TARGETS, derive, target_values,  # noqa: F401
                                  targets)

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("numpy", "numba", "einsum")
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
THREAD_SETTINGS = ("default", "one")   # libraries' defaults; one thread per library
KEEP_MIB = 512                         # freed heap each timing process keeps (heap.keep_pages)
BLAS_SPIN = ("OPENBLAS_THREAD_TIMEOUT", "20")   # OpenBLAS's idle threads sleep after 2^20 clock
                                               # ticks (under a ms) instead of its build's 2^28
BIG_PAGES = ("NUMPY_MADVISE_HUGEPAGE", "0")    # NumPy asks for no 2 MiB pages (read at its import)
REPEATS = 3
SCALING_BUDGET_S = 30.0                # the scaling sweep skips what would overrun this


def thread_env(setting: str) -> dict:
    """This process's environment without any thread variable ("default": each library picks
    its own, every core) or with all of them set to 1 ("one"). Either way, unless the
    variable is already set, OpenBLAS's idle threads stop spinning after BLAS_SPIN's 2^20
    ticks: at its build's 2^28 (about 0.1 s) a thread spinning after one GEMM takes a core
    from the compiled dispatch loops that run before the next (chapter 5, "OpenBLAS's
    spinning threads"); and NumPy asks for no 2 MiB pages (BIG_PAGES), whose first touch is
    slow on some virtual machines (chapter 5, "Where the time goes")."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.setdefault(*BLAS_SPIN)
    env.setdefault(*BIG_PAGES)
    if setting == "one":
        env |= {k: "1" for k in THREAD_VARIABLES}
    return env


def process_settings() -> dict:
    """What this process ran with, of the two variables thread_env sets: {"blas_spin",
    "big_pages"}, each its value or the library's default."""
    return {"blas_spin": os.environ.get(BLAS_SPIN[0], "build default"),
            "big_pages": os.environ.get(BIG_PAGES[0], "NumPy's default")}


# -- one thread setting's timings, in this process -------------------------------------------

def timing_core(size_list, repeats: int, use_torch: bool, full_set: bool) -> dict:
    """Every timing at this process's thread settings. full_set adds the einsum strategy and
    the fp16/fp8 step ratios (measured once, at the default threads).   -> JSON-ready dict."""
    import numba
    from moe_np.dispatch import jit
    size = Size(*size_list)
    jit.warm_up(np.float32)
    layers = {s: make_layer(size, s) for s in STRATEGIES}              # one seed: same weights
    x, dy = make_inputs(size)
    logs = {s: [] for s in STRATEGIES}
    runners = {s: staged_runner(layers[s], x, dy, logs[s]) for s in ("numpy", "numba")}
    runners["gemm_floor"] = gemm_floor_runner(size, layers["numba"].params)
    out = {"numba_threads": numba.get_num_threads(), "notes": [],
           "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
           "load_average_1min": os.getloadavg()[0]} | process_settings()
    runners |= _torch_runners(layers["numba"], x, dy, size, use_torch, out)
    out["layer_times"] = time_interleaved(runners, repeats)
    out["stages"] = {s: stage_medians(logs[s]) for s in ("numpy", "numba")}
    if full_set:                  # einsum after the others: its GiB temporaries slow what follows
        warm = size == QUICK      # at full size one einsum step (seconds) is its own warm-up
        out["layer_times"] |= time_interleaved({"einsum": staged_runner(layers["einsum"], x, dy,
                                                                        logs["einsum"])}, 1, warm)
        out["stages"]["einsum"] = stage_medians(logs["einsum"], warm)
    del layers
    out["copies"] = copy_rounds(size, 2 * repeats + 1)
    out["scaling"], notes = scaling(size, ("numba",), repeats, time.perf_counter() + SCALING_BUDGET_S)
    out["notes"] += notes
    if full_set:                  # the experts side by side (blas.run_each), two Python threads
        out["scaling"] += side_by_side_scaling(size, repeats)
    if full_set:
        progress("fp16 and fp8 training steps against fp32")
        out["lowp"] = lowp_ratios(size, repeats)
        progress("chapter 9's language-model step" + (", and HF's Mixtral" if use_torch else ""))
        from moe_np.bench_lm import measure_lm
        out["lm"] = measure_lm(quick=size == QUICK, repeats=max(repeats, 5), use_torch=use_torch)
    return out


def side_by_side_scaling(size: Size, repeats: int, workers: int = 2) -> list:
    """The numba scaling sweep with MOE_NP_EXPERT_THREADS=workers, rows labelled
    "numba, experts side by side"."""
    from moe_np import blas
    before = os.environ.get(blas.ENV)
    os.environ[blas.ENV] = str(workers)
    try:
        rows, _ = scaling(size, ("numba",), repeats, float("inf"))
    finally:
        os.environ.pop(blas.ENV) if before is None else os.environ.__setitem__(blas.ENV, before)
    return [dict(row, strategy="numba, experts side by side") for row in rows]


def _torch_runners(layer, x, dy, size: Size, use_torch: bool, out: dict) -> dict:
    """PyTorch's eager block and GEMM floor, if torch is importable and wanted; the largest
    difference of its output from moe_np's goes into out["torch_max_abs_diff"]."""
    run, forward = torch_runner(layer.params, x, dy, size.k) if use_torch else (None, None)
    if run is None:
        progress("torch is not importable (or --no-torch): no PyTorch comparison")
        return {}
    import torch
    out["torch_threads"] = torch.get_num_threads()
    out["torch_max_abs_diff"] = float(np.abs(forward().detach().numpy() - layer.forward(x)).max())
    progress(f"torch imported; max |y_torch - y_moe_np| = {out['torch_max_abs_diff']:.2e}")
    return {"torch": run, "torch_gemm_floor": torch_gemm_floor_runner(layer.params, size)}


def lowp_ratios(size: Size, repeats: int) -> dict:
    """step_time_ratios on the benchmark's layer: x standard normal, dy a mean loss's scale."""
    from dataclasses import replace
    from moe_np import SparseMoE
    from moe_np.config import PrecisionConfig
    base = make_layer(size, "numba").config
    make = lambda c: SparseMoE(replace(base, precision=PrecisionConfig(compute=c)),   # noqa: E731
                               seed=0, dtype=np.float32)
    x, dy = make_inputs(size)
    return step_time_ratios(make, x, dy / np.float32(size.n), repeats)


CORE_SCRIPT = """
import json, sys
from moe_np import bench, heap
heap.keep_pages(bench.KEEP_MIB, every_size=True)   # a step's arrays reuse the last step's memory
print(json.dumps(bench.timing_core(*json.loads(sys.argv[1]))))
"""


# -- fresh processes: JIT start-up and memory -------------------------------------------------

JIT_SCRIPT = """
import json, time
start = time.perf_counter()
import numpy as np
from moe_np.dispatch import jit
imported = time.perf_counter()
jit.warm_up(np.float32)
print(json.dumps({"import_s": imported - start, "first_call_s": time.perf_counter() - imported}))
"""

MEMORY_SCRIPT = """
import json, sys
from moe_np import bench
print(json.dumps(bench.memory_run(json.loads(sys.argv[1]), sys.argv[2])))
"""


def run_script(script: str, *argv, env: dict | None = None, show_progress: bool = False) -> dict:
    """Run a Python snippet in a fresh interpreter at the repository root; parse its JSON line.
    show_progress passes its stderr (progress lines) straight through."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("NUMBA_DISABLE_JIT", None)
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=None if show_progress else subprocess.PIPE,
                          timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"bench: a fresh-process measurement failed:\n{(done.stderr or '')[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def jit_times(compile_too: bool = True) -> dict:
    """Compile every kernel (float32) in a fresh process with an empty cache, then start
    a second fresh process on that cache: import time and first-call time of each.
    Without compile_too (quick runs) the second process uses the usual cache, and
    jit_compile_s is None."""
    with tempfile.TemporaryDirectory(prefix="moe_np_numba_cache_") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache) if compile_too else None
        cold = run_script(JIT_SCRIPT, env=env) if compile_too else {"first_call_s": None}
        warm = run_script(JIT_SCRIPT, env=env)
    return {"jit_compile_s": cold["first_call_s"], "jit_cached_s": warm["import_s"] + warm["first_call_s"],
            "jit_import_s": warm["import_s"], "jit_cached_first_call_s": warm["first_call_s"]}


def peak_memory(size: Size, strategy: str = "numba") -> dict:
    """Memory of one forward+backward in a fresh process (memory_run), beside the model above."""
    return run_script(MEMORY_SCRIPT, json.dumps(list(size)), strategy) | memory_model(size)


def layer_and_floor(size_list, repeats: int) -> dict:
    """The numba layer's forward+backward and its GEMM floor, taking turns, with its stages:
    the first lines of timing_core alone.   -> {"fwd_bwd_s", "gemm_floor_s", "stages",
    "blas_spin", "big_pages": this process's OPENBLAS_THREAD_TIMEOUT, NUMPY_MADVISE_HUGEPAGE}."""
    from moe_np.dispatch import jit
    size = Size(*size_list)
    jit.warm_up(np.float32)
    layer, (x, dy), log = make_layer(size, "numba"), make_inputs(size), []
    t = time_interleaved({"numba": staged_runner(layer, x, dy, log),
                          "gemm_floor": gemm_floor_runner(size, layer.params)}, repeats)
    return {"fwd_bwd_s": t["numba"]["fwd_bwd_s"], "gemm_floor_s": t["gemm_floor"]["fwd_bwd_s"],
            "stages": stage_medians(log)} | process_settings()


SPIN_SCRIPT = """
import json, sys
from moe_np import bench, heap
from moe_np.bench_lm import measure_lm
heap.keep_pages(bench.KEEP_MIB, every_size=True)
size_list, repeats = json.loads(sys.argv[1])
r = bench.layer_and_floor(size_list, repeats)
lm = measure_lm(quick=tuple(size_list) == bench.QUICK, repeats=2 * repeats + 1, use_torch=False)
print(json.dumps(r | {k: lm[k] for k in ("lm_step_s", "lm_gemm_floor_s")}))
"""


def spin_comparison(size: Size, repeats: int, spins=(None, BLAS_SPIN[1], "16")) -> dict:
    """layer_and_floor and chapter 9's training step (its lm_step_s, lm_gemm_floor_s) at the
    default threads, in a fresh process per OPENBLAS_THREAD_TIMEOUT value (None: unset, the
    build's own spin).   -> {value or "build default": its timings}."""
    out = {}
    for spin in spins:
        env = thread_env("default")
        env.pop(BLAS_SPIN[0]) if spin is None else env.__setitem__(BLAS_SPIN[0], spin)
        out["build default" if spin is None else spin] = run_script(
            SPIN_SCRIPT, json.dumps([list(size), repeats]), env=env)
    return out


# -- the whole benchmark ------------------------------------------------------------------

def measure(quick: bool = False, repeats: int = REPEATS, use_torch: bool = True) -> dict:
    """Run every measurement; -> one JSON-ready dict (see the module docstring)."""
    _START[0] = time.perf_counter()
    size = QUICK if quick else FULL
    progress(f"size {size}, {repeats} repeats after a warm-up, load average "
             f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    cores = {}
    for setting in THREAD_SETTINGS:
        progress(f"timings at {THREAD_LABELS[setting]}, in a fresh process")
        cores[setting] = run_script(CORE_SCRIPT, json.dumps([list(size), repeats, use_torch,
                                                             setting == "default"]),
                                    env=thread_env(setting), show_progress=True)
    progress("JIT start-up from numba's cache" + ("" if quick else ", and compile time") +
             ", in fresh processes")
    jit = jit_times(compile_too=not quick)
    progress("memory of one forward+backward, in a fresh process")
    memory = peak_memory(size)
    return assemble(size, repeats, cores, jit, memory)


THREAD_LABELS = {"default": "the default threads", "one": "one thread per library"}


def assemble(size: Size, repeats: int, cores: dict, jit: dict, memory: dict) -> dict:
    """The JSON object: headline keys (default threads) first, then each setting, then details."""
    full = size == FULL
    per = {s: derive(size, c) for s, c in cores.items()}
    r = dict(per["default"]) | jit
    lowp = cores["default"].get("lowp", {})
    r |= {"peak_mem_mib": memory["traced_peak_mib"], "peak_rss_growth_mib": memory["rss_growth_mib"],
          "memory": memory} | {k: v for k, v in lowp.items() if k.endswith("ratio")}
    r["lowp"] = lowp
    r |= cores["default"].get("lm", {})
    r["targets"] = targets(target_values(r), full)
    r["judged"] = full
    r["threads"] = {"cores": os.cpu_count()}
    for s, c in cores.items():
        keep = ("moe_fwd_bwd_s", "gemm_floor_s", "gather_gbps", "memcpy_gbps", "copy_loop_gbps",
                "combine_numba_s", "combine_add_at_s", "combine_copy_s", "touched_gbps",
                "copy_ratios", "copies", "scaling_ratio_64_8",
                "scaling_floor_ratio_64_8", "scaling_ratio_64_8_side_by_side", "moe_vs_torch",
                "torch_fwd_bwd_s", "scaling", "strategies")
        r["threads"][s] = {"variables": "none set" if s == "default" else
                           " ".join(f"{k}=1" for k in THREAD_VARIABLES),
                           "numba": c["numba_threads"], "openblas": c["blas_threads"],
                           BLAS_SPIN[0]: c.get("blas_spin"), BIG_PAGES[0]: c.get("big_pages"),
                           "torch": c.get("torch_threads"), "load_average_1min": c["load_average_1min"],
                           **{k: per[s][k] for k in keep if k in per[s]},
                           "targets": targets(target_values(per[s]), full, TIMING_TARGETS, s)}
    r["size"] = size._asdict() | {"scaling_tokens": SCALING_TOKENS.get(size, size.n)}
    r["repeats"] = repeats
    r["notes"] = [n for c in cores.values() for n in c["notes"]] + \
        ([] if not full else ["einsum: one step at full size, timed once (no warm-up)"])
    r["load_average_1min"] = os.getloadavg()[0]
    r["elapsed_s"] = time.perf_counter() - _START[0]
    return r


def seconds(s: float) -> str:
    """A duration in the unit that suits it."""
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} us"


def mib(m: float) -> str:
    """A size in the unit that suits it."""
    return f"{m:.1f} MiB" if m >= 1 else f"{m * 1024:.0f} KiB"


def format_report(r: dict) -> str:
    """The results as aligned text: the layer, each thread setting side by side, the targets."""
    size, judged = r["size"], r["judged"]
    lines = [f"sparse MoE step, N={size['n']} D={size['d']} H={size['h']} E={size['e']} "
             f"K={size['k']}, float32, medians of {r['repeats']} runs after a warm-up"]
    if not judged:
        lines.append("quick size: a smoke test of every measurement. The targets refer to the full "
                     "size (python -m moe_np bench) and are not judged here.")
    lines += ["", f"{'default threads':<18}{'dispatch':>11}{'combine':>11}{'forward':>11}{'fwd+bwd':>11}"]
    for s, t in r["strategies"].items():
        lines.append(f"{s:<18}" + "".join(f"{seconds(t[k]):>11}" for k in
                                          ("dispatch_s", "combine_s", "forward_s", "fwd_bwd_s")))
    for name in ("gemm_floor", "torch", "torch_gemm_floor"):
        if name in r["layer_times"]:
            t = r["layer_times"][name]
            lines.append(f"{name:<18}{'':>22}{seconds(t['forward_s']):>11}{seconds(t['fwd_bwd_s']):>11}")
    return "\n".join(lines + [""] + _settings_table(r) + [""] + _once_lines(r) + [""]
                     + _target_lines(r) + r["notes"])


def _settings_table(r: dict) -> list[str]:
    """Each thread setting's headline numbers, side by side."""
    th = {s: r["threads"][s] for s in THREAD_SETTINGS}
    rows = [("threads (numba / OpenBLAS / torch)",
             {s: f"{t['numba']} / {t['openblas']} / {t['torch'] or '-'}" for s, t in th.items()}),
            ("load average (1 min)", {s: f"{t['load_average_1min']:.1f}" for s, t in th.items()}),
            (BLAS_SPIN[0], {s: str(t.get(BLAS_SPIN[0])) for s, t in th.items()}),
            (BIG_PAGES[0], {s: str(t.get(BIG_PAGES[0])) for s, t in th.items()}),
            ("numba fwd+bwd", {s: seconds(t["moe_fwd_bwd_s"]) for s, t in th.items()}),
            ("GEMM floor", {s: seconds(t["gemm_floor_s"]) for s, t in th.items()}),
            ("gather / memcpy / copy loop, GB/s", {s: f"{t['gather_gbps']:.1f} / {t['memcpy_gbps']:.1f}"
                                                   f" / {t['copy_loop_gbps']:.1f}" for s, t in th.items()}),
            ("touched: gather / memcpy / loop, GB/s", {s: " / ".join(f"{t['touched_gbps'][k]:.1f}" for k in
                                                                   ("gather", "memcpy", "copy_loop"))
                                                        for s, t in th.items()}),
            ("combine: numba / a copy of its bytes", {s: f"{seconds(t['combine_numba_s'])} / "
                                                    f"{seconds(t['combine_copy_s'])}" for s, t in th.items()}),
            ("combine / a copy of its bytes, new / touched", {s: " / ".join(
                f"{t['copy_ratios'][into]['combine_over_copy']:.2f}" for into in ("new", "touched"))
                for s, t in th.items()}),
            ("combine: np.add.at", {s: seconds(t["combine_add_at_s"]) for s, t in th.items()})]
    if all("torch_fwd_bwd_s" in t for t in th.values()):
        rows.append(("PyTorch eager fwd+bwd", {s: seconds(t["torch_fwd_bwd_s"]) for s, t in th.items()}))
    for label in ("numba", "numba, experts side by side"):
        name = "numba" if label == "numba" else "numba side by side"
        rows.append((f"{name} us/token E={','.join(map(str, SCALING_E))}",
                     {s: " ".join(f"{row['us_per_token']:.0f}" for row in t["scaling"]
                                  if row["strategy"] == label) or "-" for s, t in th.items()}))
    rows.append((f"GEMM floor us/token E={','.join(map(str, SCALING_E))}",
                 {s: " ".join(f"{row['floor_us_per_token']:.0f}" for row in t["scaling"]
                              if row["strategy"] == "numba" and "floor_us_per_token" in row) or "-"
                  for s, t in th.items()}))
    lines = [f"{'':<36}{'default threads':>22}{'one thread each':>22}"]
    return lines + [f"{name:<36}" + "".join(f"{v[s]:>22}" for s in THREAD_SETTINGS) for name, v in rows]


def _once_lines(r: dict) -> list[str]:
    m = r["memory"]
    lines = [f"memory: peak resident growth {mib(m['rss_growth_mib'])}, NumPy's peak allocation "
             f"{mib(m['traced_peak_mib'])}; backward must keep {mib(m['must_keep_mib'])}, the cache "
             f"keeps {mib(m['kept_mib'])}, outputs {mib(m['outputs_mib'])}, gradients {mib(m['grads_mib'])}",
             f"JIT: compile {'not measured' if r['jit_compile_s'] is None else seconds(r['jit_compile_s'])}"
             f", cached start-up {seconds(r['jit_cached_s'])} "
             f"(import {seconds(r['jit_import_s'])})"]
    if "fp16_step_ratio" in r:
        lines.append(f"training step over fp32 (default threads): fp16 {r['fp16_step_ratio']:.2f}, "
                     f"fp8 {r['fp8_step_ratio']:.2f}")
    if "lm_step_s" in r:
        from moe_np.bench_lm import format_lm
        lines += format_lm(r)
    return lines


def _target_lines(r: dict) -> list[str]:
    """One line per target: its bound and, per thread setting, the value and (full size) verdict."""
    verdict = {True: " met", False: " MISS", None: ""}
    per = {s: {t["key"]: t for t in r["threads"][s]["targets"]} for s in THREAD_SETTINGS}
    lines = ["targets" + ("" if r["judged"] else " (quick size: values only, not judged)")]
    for t in r["targets"]:
        bound = t["bound"]
        if t["key"] in per["default"]:
            values = ", ".join(f"{label} {per[s][t['key']]['value']:.3f}{verdict[per[s][t['key']]['met']]}"
                               for s, label in (("default", "default threads"), ("one", "one thread"))
                               if t["key"] in per[s])
            if t["key"] in per["one"] and per["one"][t["key"]]["bound"] != bound:
                bound = f"{bound} at the default threads, {per['one'][t['key']]['bound']} at one"
        else:
            values = f"{t['value']:.3f}{verdict[t['met']]}"
        lines.append(f"  {t['name']} (target {bound}): {values}")
    return lines


def configure(parser) -> None:
    """Add the bench options to an argparse (sub)parser."""
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, seconds: a smoke test (targets are judged at full size only)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed runs after a warm-up (>= 1)")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if importable")


def run(args) -> int:
    """Run the benchmark with parsed args; print a report (or JSON); 0 on success."""
    if args.repeats < 1:
        raise ValueError(f"bench: --repeats must be >= 1, got {args.repeats}")
    results = measure(quick=args.quick, repeats=args.repeats, use_torch=not args.no_torch)
    print(json.dumps(results, indent=1) if args.json else format_report(results))
    return 0
