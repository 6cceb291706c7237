"""python -m moe_np bench [--json] [--quick]: where the time of a sparse MoE step goes.

Full size: N=8192 tokens, D=512, H=1024, E=8 experts, K=2, float32, ReLU
experts, softmax top-2 router, no capacity limit. Every time is the median
of --repeats runs (default 5) after one warm-up, and the strategies (and
PyTorch, when it is importable) take turns within each repeat, so a slow
moment of a shared machine hits them all alike.

    layer    forward, forward+backward of SparseMoE for each dispatch strategy
    stages   plan, gather, experts, combine and their backward passes
    floor    the expert GEMMs of forward+backward alone, on balanced buffers
    memcpy   a plain copy of the gathered bytes: what a gather can hope for
    jit      first-call compile time, then cached start-up, each in a fresh process
    memory   peak NumPy allocation of one forward+backward, in a fresh process
    scaling  time per token for E = 4..64 at fixed K, D, H
    torch    a Mixtral-style eager block (per-expert loop + index_add_), if importable

Progress goes to stderr; --json prints one object on stdout. The targets
are reported, never asserted: timings depend on the machine and its load.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("numpy", "numba", "einsum")
SCALING_E = (4, 8, 16, 32, 64)
BUDGET_S = 270.0                 # the scaling sweep skips what would overrun this
_START = [time.perf_counter()]


class Size(NamedTuple):
    n: int    # tokens
    d: int    # model width
    h: int    # expert hidden width
    e: int    # experts
    k: int    # experts per token


FULL = Size(8192, 512, 1024, 8, 2)
QUICK = Size(256, 32, 64, 8, 2)
SCALING_TOKENS = {FULL: 4096, QUICK: 256}


def progress(message: str) -> None:
    """A progress line on stderr, with the seconds since the benchmark started."""
    print(f"[bench {time.perf_counter() - _START[0]:6.1f}s] {message}", file=sys.stderr, flush=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls of fn(), after one warm-up call."""
    fn()
    return float(np.median([timed(fn) for _ in range(repeats)]))


# -- the layer under test ---------------------------------------------------------------

def make_layer(size: Size, strategy: str, seed: int = 0):
    """The benchmarked SparseMoE: float32, ReLU experts, softmax top-K, dropless."""
    from moe_np import SparseConfig, SparseMoE
    config = SparseConfig(d_model=size.d, num_experts=size.e, d_hidden=size.h, k=size.k,
                          router="softmax_topk", capacity_factor=None, drop_policy="position",
                          expert="mlp", dispatch=strategy)
    return SparseMoE(config, seed=seed, dtype=np.float32)


def make_inputs(size: Size, seed: int = 1):
    """x and an upstream gradient dy, standard normal float32.   (N, D) each."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((size.n, size.d), dtype=np.float32)       # (N, D)
    dy = rng.standard_normal((size.n, size.d), dtype=np.float32)      # (N, D)
    return x, dy


def layer_step(layer, x, dy):
    """One forward+backward -> (forward seconds, backward seconds)."""
    start = time.perf_counter()
    layer.forward(x)
    middle = time.perf_counter()
    layer.backward(dy)
    return middle - start, time.perf_counter() - middle


def gemm_floor_runner(size: Size, params: dict):
    """The six GEMMs per expert of a forward+backward, on pre-gathered balanced buffers
    (M/E rows per expert) and into preallocated outputs: the floor for the expert compute.
    -> a runner returning (forward seconds, backward seconds)."""
    e, m_e, d, h = size.e, size.n * size.k // size.e, size.d, size.h
    rng = np.random.default_rng(2)
    x = rng.standard_normal((e, m_e, d), dtype=np.float32)            # (E, M_e, D)
    dy = rng.standard_normal((e, m_e, d), dtype=np.float32)           # (E, M_e, D)
    hid, dhid = np.empty((2, e, m_e, h), dtype=np.float32)            # (E, M_e, H) each
    y, dx = np.empty((2, e, m_e, d), dtype=np.float32)                # (E, M_e, D) each
    dw1, dw2 = np.empty_like(params["w1"]), np.empty_like(params["w2"])   # (E, D, H), (E, H, D)
    w1, w2 = params["w1"], params["w2"]

    def run():
        start = time.perf_counter()
        for i in range(e):
            np.matmul(x[i], w1[i], out=hid[i])                         # (M_e, H)
            np.matmul(hid[i], w2[i], out=y[i])                         # (M_e, D)
        middle = time.perf_counter()
        for i in range(e):
            np.matmul(hid[i].T, dy[i], out=dw2[i])                     # (H, D)
            np.matmul(dy[i], w2[i].T, out=dhid[i])                     # (M_e, H)
            np.matmul(x[i].T, dhid[i], out=dw1[i])                     # (D, H)
            np.matmul(dhid[i], w1[i].T, out=dx[i])                     # (M_e, D)
        return middle - start, time.perf_counter() - middle
    return run


def torch_runner(params: dict, x, dy, k: int):
    """A Mixtral-style PyTorch eager block on the same weights, or None without torch.

    Router softmax, top-K, renormalise; then a Python loop over experts:
    find the expert's tokens, run its MLP on them, scale by the weights and
    index_add_ into the output; autograd for the backward.
    -> (runner returning (forward s, backward s), forward function)."""
    try:
        import torch
    except ImportError:
        return None, None
    p = {name: torch.tensor(params[name], requires_grad=True)
         for name in ("w_router", "w1", "b1", "w2", "b2")}
    xt, dyt = torch.tensor(x, requires_grad=True), torch.tensor(dy)

    def forward():
        probs = torch.softmax(xt @ p["w_router"], dim=-1)             # (N, E)
        weights, ids = torch.topk(probs, k, dim=-1)                    # (N, K)
        weights = weights / weights.sum(dim=-1, keepdim=True)          # (N, K)
        y = torch.zeros_like(xt)                                       # (N, D)
        for e in range(p["w1"].shape[0]):
            token, rank = torch.where(ids == e)                        # (M_e,) each
            hid = torch.relu(xt[token] @ p["w1"][e] + p["b1"][e])      # (M_e, H)
            out = (hid @ p["w2"][e] + p["b2"][e]) * weights[token, rank, None]   # (M_e, D)
            y.index_add_(0, token, out)
        return y

    def run():
        for t in list(p.values()) + [xt]:
            t.grad = None
        start = time.perf_counter()
        y = forward()
        middle = time.perf_counter()
        y.backward(dyt)
        return middle - start, time.perf_counter() - middle
    return run, forward


def torch_gemm_floor_runner(params: dict, size: Size):
    """gemm_floor_runner's six GEMMs per expert in PyTorch (its own BLAS), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    e, m_e = size.e, size.n * size.k // size.e
    gen = torch.Generator().manual_seed(2)
    x, dy = torch.randn((2, e, m_e, size.d), generator=gen)           # (E, M_e, D) each
    w1, w2 = torch.tensor(params["w1"]), torch.tensor(params["w2"])   # (E, D, H), (E, H, D)

    def run():
        start = time.perf_counter()
        hid = [x[i] @ w1[i] for i in range(e)]                         # (M_e, H) each
        _ = [hid[i] @ w2[i] for i in range(e)]                         # (M_e, D) each
        middle = time.perf_counter()
        for i in range(e):
            _ = hid[i].T @ dy[i]                                       # (H, D)
            dhid = dy[i] @ w2[i].T                                     # (M_e, H)
            _ = x[i].T @ dhid                                          # (D, H)
            _ = dhid @ w1[i].T                                         # (M_e, D)
        return middle - start, time.perf_counter() - middle
    return run


def time_interleaved(runners: dict, repeats: int) -> dict:
    """Each runner returns (forward s, backward s); all take turns in every repeat.
    -> {name: {forward_s, fwd_bwd_s}}, medians over the repeats after one warm-up round."""
    runs = {name: [] for name in runners}
    for rep in range(repeats + 1):                                     # round 0 is the warm-up
        for name, runner in runners.items():
            runs[name].append(runner())
        progress(f"layer round {rep}/{repeats}: " +
                 ", ".join(f"{name} {sum(r[-1]):.3f}s" for name, r in runs.items()))
    return {name: {"forward_s": float(np.median([f for f, _ in r[1:]])),
                   "fwd_bwd_s": float(np.median([f + b for f, b in r[1:]]))}
            for name, r in runs.items()}


# -- stages -----------------------------------------------------------------------------

STAGES = ("plan", "gather", "experts", "combine", "combine_bwd", "experts_bwd", "gather_bwd")


def staged_pass(strategy: str, params: dict, ids, weights, x, dy) -> dict:
    """One forward+backward through the strategy interface, each stage timed.   -> {stage: s}."""
    from moe_np import dispatch
    s, times = dispatch.get_strategy(strategy), {}

    def stage(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        times[name] = time.perf_counter() - start
        return out
    num_experts = params["w1"].shape[0]
    plan = stage("plan", s.plan_token_choice, ids, num_experts, None, np.arange(len(x)))
    x_disp, gather_cache = stage("gather", s.gather_forward, x, plan)
    y_disp, experts_cache = stage("experts", s.experts_forward, x_disp, params, "mlp", plan)
    _, combine_cache = stage("combine", s.combine_forward, y_disp, weights, plan)
    dy_disp, _ = stage("combine_bwd", s.combine_backward, dy, combine_cache)
    dx_disp, _ = stage("experts_bwd", s.experts_backward, dy_disp, experts_cache)
    stage("gather_bwd", s.gather_backward, dx_disp, gather_cache)
    return times


def time_stages(size: Size, strategies, repeats: dict) -> dict:
    """Median time of every stage per strategy, strategies taking turns.
    repeats: {strategy: runs after one warm-up}.   -> {strategy: {stage: s}}."""
    layer = make_layer(size, "numba")
    x, dy = make_inputs(size)
    layer.forward(x)
    ids, weights = layer.stats.ids, layer.stats.weights               # (N, K) each
    runs = {s: [] for s in strategies}
    for rep in range(max(repeats.values()) + 1):
        for s in strategies:
            if rep <= repeats[s]:
                runs[s].append(staged_pass(s, layer.params, ids, weights, x, dy))
        progress(f"stage round {rep}: " + ", ".join(
            f"{s} {sum(r[-1].values()):.3f}s" for s, r in runs.items()))
    return {s: {name: float(np.median([r[name] for r in rs[1:]])) for name in STAGES}
            for s, rs in runs.items()}


def memcpy_seconds(size: Size, repeats: int) -> float:
    """A plain copy of the gathered buffer's bytes (M*D floats, freshly allocated, like a gather)."""
    src = np.random.default_rng(3).standard_normal((size.n * size.k, size.d), dtype=np.float32)  # (M, D)
    return median_time(src.copy, repeats)


# -- fresh processes: JIT start-up and peak memory -----------------------------------------

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
import json, sys, tracemalloc
import numpy as np
from moe_np import bench
from moe_np.dispatch import jit
from moe_np.sparse import sparse_moe_backward, sparse_moe_forward
size = bench.Size(*json.loads(sys.argv[1]))
layer = bench.make_layer(size, sys.argv[2])
x, dy = bench.make_inputs(size)
jit.warm_up(np.float32)
before = bench.resident_mib()
tracemalloc.start()
(y, aux), cache = sparse_moe_forward(x, layer.params, layer.config)
dx, grads = sparse_moe_backward((dy, 1.0), cache)
_, peak = tracemalloc.get_traced_memory()
print(json.dumps({"traced_peak_mib": peak / 2**20, "rss_growth_mib": bench.max_resident_mib() - before,
                  "kept_mib": bench.array_mib(cache, exclude=[x] + list(layer.params.values()))}))
"""


def run_script(script: str, *argv, env: dict | None = None) -> dict:
    """Run a Python snippet in a fresh interpreter at the repository root; parse its JSON line."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("NUMBA_DISABLE_JIT", None)
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    if done.returncode != 0:
        raise RuntimeError(f"bench: a fresh-process measurement failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def jit_times() -> dict:
    """Compile every kernel (float32) in a fresh process with an empty cache, then start
    a second fresh process on that cache: import time and first-call time of each."""
    with tempfile.TemporaryDirectory(prefix="moe_np_numba_cache_") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        cold = run_script(JIT_SCRIPT, env=env)
        warm = run_script(JIT_SCRIPT, env=env)
    return {"jit_compile_s": cold["first_call_s"], "jit_cached_s": warm["import_s"] + warm["first_call_s"],
            "jit_import_s": warm["import_s"], "jit_cached_first_call_s": warm["first_call_s"]}


def resident_mib() -> float:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_resident_mib() -> float:
    """This process's peak resident memory so far: VmHWM on Linux (ru_maxrss would carry
    the parent's peak across fork and exec), else ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10                    # kB -> MiB
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def array_mib(obj, exclude=()) -> float:
    """MiB of the distinct NumPy arrays reachable through tuples, lists and dicts in obj,
    leaving out any that share memory with an array in `exclude` (the input, the weights)."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, np.ndarray):
            base = item if item.base is None else item.base
            if id(base) not in seen and not any(np.may_share_memory(item, e) for e in exclude):
                seen.add(id(base))
                total += getattr(base, "nbytes", item.nbytes)
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return total / 2**20


def memory_model(size: Size) -> dict:
    """MiB, float32, dropless (M = N K rows). What backward cannot do without, short of
    recomputing a GEMM: the hidden activations h (M, H) (dW2 and the ReLU mask) and the
    experts' outputs y_sorted (M, D) (the routing-weight gradient), plus the routing itself
    (ids, weights, probabilities, plan). x_sorted (M, D) is not in it: it can be gathered
    again from x. Outputs: y (N, D). Gradients: dx (N, D) and one per parameter."""
    n, d, h, e, k = size
    m, f, i = n * k, 4, 8                                              # float32, int64 bytes
    routing = n * k * (i + f) + n * e * f + m * 2 * i + n * k * i + (e + 1) * i
    keep = m * h * f + m * d * f + routing
    outputs = n * d * f
    grads = n * d * f + (2 * e * d * h + e * h + e * d + d * e) * f
    mib = {"must_keep_mib": keep, "outputs_mib": outputs, "grads_mib": grads,
           "x_sorted_mib": m * d * f}
    mib = {key: value / 2**20 for key, value in mib.items()}
    mib["target_mib"] = 1.25 * (mib["must_keep_mib"] + mib["outputs_mib"] + mib["grads_mib"])
    return mib


def peak_memory(size: Size, strategy: str = "numba") -> dict:
    """Peak memory of one forward+backward in a fresh process, beside the model above."""
    measured = run_script(MEMORY_SCRIPT, json.dumps(list(size)), strategy)
    return measured | memory_model(size)


# -- scaling with the number of experts -------------------------------------------------------

def scaling(size: Size, strategies, repeats: int, deadline: float) -> tuple[list, list]:
    """Time per token of forward+backward for E in SCALING_E, K, D, H fixed.

    Every numba point and each strategy's first point always run; another
    point whose projected time (from the strategy's previous point) would
    pass `deadline` is skipped and named in the returned notes."""
    n, rows, notes, last = SCALING_TOKENS.get(size, size.n), [], [], {}
    for e in SCALING_E:
        sub = size._replace(n=n, e=e)
        x, dy = make_inputs(sub)
        for s in strategies:
            projected = 1.5 * (repeats + 1) * last.get(s, 0.0)
            if s != "numba" and s in last and time.perf_counter() + projected > deadline:
                notes.append(f"scaling: skipped {s} at E={e} (projected {projected:.0f}s "
                             f"would pass the {BUDGET_S:.0f}s budget)")
                continue
            layer = make_layer(sub, s)
            steps = [sum(layer_step(layer, x, dy)) for _ in range(repeats + 1)]
            last[s] = float(np.median(steps[1:]))
            rows.append({"E": e, "strategy": s, "us_per_token": last[s] / n * 1e6})
            progress(f"scaling E={e:2d} {s:6s}: {rows[-1]['us_per_token']:.2f} us/token")
    return rows, notes


# -- the whole benchmark ------------------------------------------------------------------

def time_layer_and_floor(size: Size, repeats: int, use_torch: bool) -> tuple[dict, float | None]:
    """The ragged strategies' layers, the GEMM floor and (if importable) torch, taking turns;
    then the einsum layer on its own: its GiB-sized one-hot temporaries slow the next
    large allocations of whatever runs after it (measured: a 6 ms combine took 55 ms).
    -> (times per runner, max |y_torch - y_numba| as a sanity check, or None)."""
    from moe_np.dispatch import jit
    jit.warm_up(np.float32)
    layers = {s: make_layer(size, s) for s in STRATEGIES}              # one seed: same weights
    x, dy = make_inputs(size)
    runners = {s: (lambda layer=layer: layer_step(layer, x, dy)) for s, layer in layers.items()}
    einsum = {"einsum": runners.pop("einsum")}
    runners["gemm_floor"] = gemm_floor_runner(size, layers["numba"].params)
    torch_run, torch_forward = torch_runner(layers["numba"].params, x, dy, size.k) \
        if use_torch else (None, None)
    difference = None
    if torch_run is not None:
        runners["torch"] = torch_run
        runners["torch_gemm_floor"] = torch_gemm_floor_runner(layers["numba"].params, size)
        y = layers["numba"].forward(x)                                 # (N, D)
        difference = float(np.abs(torch_forward().detach().numpy() - y).max())
        progress(f"torch imported; max |y_torch - y_moe_np| = {difference:.2e}")
    else:
        progress("torch is not importable: no PyTorch comparison")
    return time_interleaved(runners, repeats) | time_interleaved(einsum, repeats), difference


def targets(r: dict) -> list[dict]:
    """Each target of the hot path: measured value, the bound, met or not."""
    scale = {(row["strategy"], row["E"]): row["us_per_token"] for row in r["scaling"]}
    rows = [("fwd+bwd / GEMM floor", r["moe_fwd_bwd_s"] / r["gemm_floor_s"], "<=", 1.15),
            ("gather / memcpy bandwidth", r["gather_gbps"] / r["memcpy_gbps"], ">=", 0.70),
            ("np.add.at combine / numba combine", r["combine_add_at_s"] / r["combine_numba_s"], ">=", 30.0),
            ("peak memory / (must keep + outputs + grads)",
             r["peak_mem_mib"] / (r["memory"]["target_mib"] / 1.25), "<=", 1.25),
            ("cached JIT start-up (s)", r["jit_cached_s"], "<=", 2.0)]
    if "torch_fwd_bwd_s" in r:
        rows.append(("fwd+bwd / PyTorch eager", r["moe_vs_torch"], "<=", 0.8))
    if ("numba", 8) in scale and ("numba", 64) in scale:
        ratio = scale[("numba", 64)] / scale[("numba", 8)]
        rows.append(("numba us/token, E=64 / E=8 (within +-20%)", ratio, "<=", 1.2))
        rows.append(("numba us/token, E=64 / E=8 (within +-20%)", ratio, ">=", 0.8))
    largest = max([e for s, e in scale if s == "einsum"], default=None)
    if ("einsum", 8) in scale and largest and largest > 8:
        rows.append((f"einsum us/token, E={largest} / E=8 (grows)",
                     scale[("einsum", largest)] / scale[("einsum", 8)], ">", 1.0))
    met = {"<=": lambda v, b: v <= b, ">=": lambda v, b: v >= b, ">": lambda v, b: v > b}
    return [{"name": n, "value": round(float(v), 4), "bound": f"{op} {b}", "met": bool(met[op](v, b))}
            for n, v, op, b in rows]


def measure(quick: bool = False, repeats: int = 5, use_torch: bool = True) -> dict:
    """Run every measurement; -> one JSON-ready dict (see the module docstring)."""
    _START[0] = time.perf_counter()
    size = QUICK if quick else FULL
    progress(f"size {size}, {repeats} repeats after a warm-up, load average "
             f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        progress("warning: the machine is busy; multi-threaded BLAS and numba loops stall when a "
                 "thread is parked (OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 measure more fairly)")
    layer_times, torch_difference = time_layer_and_floor(size, repeats, use_torch)
    stage_repeats = {s: repeats if (quick or s != "einsum") else min(repeats, 3) for s in STRATEGIES}
    stages = time_stages(size, ("numpy", "numba"), stage_repeats)     # einsum apart, as above
    stages |= time_stages(size, ("einsum",), stage_repeats)
    memcpy_s = memcpy_seconds(size, repeats)
    progress("JIT compile and cached start-up, in fresh processes")
    jit = jit_times()
    progress("peak memory of one forward+backward, in a fresh process")
    memory = peak_memory(size)
    rows, notes = scaling(size, STRATEGIES, 3, _START[0] + BUDGET_S)
    progress("the language model's training step (chapter 9, bench_lm.py)")
    from moe_np.bench_lm import measure_lm
    lm = measure_lm(quick=quick, repeats=repeats, use_torch=use_torch)
    return assemble(size, repeats, layer_times, stages, memcpy_s, jit, memory, rows,
                    notes + ([] if quick else [f"einsum stages: median of {stage_repeats['einsum']} runs"]),
                    torch_difference) | lm


def assemble(size, repeats, layer_times, stages, memcpy_s, jit, memory, rows, notes,
             torch_difference) -> dict:
    """The JSON object: headline keys first, then the details they come from."""
    gathered_bytes = size.n * size.k * size.d * 4                     # read + write each once
    r = {"moe_fwd_bwd_s": layer_times["numba"]["fwd_bwd_s"],
         "gemm_floor_s": layer_times["gemm_floor"]["fwd_bwd_s"],
         "gather_gbps": 2 * gathered_bytes / stages["numba"]["gather"] / 1e9,
         "memcpy_gbps": 2 * gathered_bytes / memcpy_s / 1e9,
         "combine_numba_s": stages["numba"]["combine"],
         "combine_add_at_s": stages["numpy"]["combine"],
         **jit, "peak_mem_mib": memory["traced_peak_mib"], "memory": memory, "scaling": rows}
    if "torch" in layer_times:
        r["torch_fwd_bwd_s"] = layer_times["torch"]["fwd_bwd_s"]
        r["moe_vs_torch"] = r["moe_fwd_bwd_s"] / r["torch_fwd_bwd_s"]
        r["torch_max_abs_diff"] = torch_difference
        r["torch_gemm_floor_s"] = layer_times["torch_gemm_floor"]["fwd_bwd_s"]
    r["strategies"] = {s: layer_times[s] | {"dispatch_s": st["plan"] + st["gather"],
                                            "combine_s": st["combine"], "stages": st}
                       for s, st in stages.items()}
    r["layer_times"] = layer_times
    r["size"] = size._asdict() | {"scaling_tokens": SCALING_TOKENS.get(size, size.n)}
    r["repeats"] = repeats
    r["notes"] = notes
    r["targets"] = targets(r)
    r["load_average_1min"] = os.getloadavg()[0]
    r["threads"] = {"cores": os.cpu_count(), "numba": _numba_threads(),
                    "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")}
    r["elapsed_s"] = time.perf_counter() - _START[0]
    return r


def _numba_threads() -> int:
    import numba
    return numba.get_num_threads()


def format_report(r: dict) -> str:
    """The results as aligned text tables."""
    lines = [f"sparse MoE step, N={r['size']['n']} D={r['size']['d']} H={r['size']['h']} "
             f"E={r['size']['e']} K={r['size']['k']}, float32, medians of {r['repeats']} runs", "",
             f"{'strategy':<18}{'dispatch':>11}{'combine':>11}{'forward':>11}{'fwd+bwd':>11}"]
    for s, t in r["strategies"].items():
        lines.append(f"{s:<18}" + "".join(f"{t[k] * 1e3:>9.1f}ms" for k in
                                          ("dispatch_s", "combine_s", "forward_s", "fwd_bwd_s")))
    for name in ("gemm_floor", "torch", "torch_gemm_floor"):
        if name in r["layer_times"]:
            t = r["layer_times"][name]
            lines.append(f"{name:<18}{'':>22}{t['forward_s'] * 1e3:>9.1f}ms{t['fwd_bwd_s'] * 1e3:>9.1f}ms")
    lines += ["", f"gather {r['gather_gbps']:.1f} GB/s, memcpy {r['memcpy_gbps']:.1f} GB/s; combine "
              f"numba {r['combine_numba_s'] * 1e3:.2f} ms, np.add.at {r['combine_add_at_s'] * 1e3:.1f} ms",
              f"JIT: compile {r['jit_compile_s']:.2f} s, cached start-up {r['jit_cached_s']:.2f} s "
              f"(import {r['jit_import_s']:.2f} s)",
              f"peak memory {r['peak_mem_mib']:.0f} MiB (backward must keep "
              f"{r['memory']['must_keep_mib']:.0f} MiB; moe_np keeps {r['memory']['kept_mib']:.0f} MiB)",
              "", "us per token (fwd+bwd), N=" + str(r["size"]["scaling_tokens"]) + ":"]
    for s in STRATEGIES:
        points = [f"E={row['E']}: {row['us_per_token']:.1f}" for row in r["scaling"] if row["strategy"] == s]
        lines.append(f"  {s:<8}" + ",  ".join(points))
    if "lm_step_s" in r:
        from moe_np.bench_lm import format_lm
        lines += [""] + format_lm(r)
    lines += [""] + [f"{'met ' if t['met'] else 'MISS'} {t['name']}: {t['value']:.3f} (target "
                     f"{t['bound']})" for t in r["targets"]] + r["notes"]
    return "\n".join(lines)


def configure(parser) -> None:
    """Add the bench options to an argparse (sub)parser."""
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds (for tests)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after a warm-up (>= 1)")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if importable")


def run(args) -> int:
    """Run the benchmark with parsed args; print a report (or JSON); 0 on success."""
    if args.repeats < 1:
        raise ValueError(f"bench: --repeats must be >= 1, got {args.repeats}")
    results = measure(quick=args.quick, repeats=args.repeats, use_torch=not args.no_torch)
    print(json.dumps(results, indent=1) if args.json else format_report(results))
    return 0


# -- the low-precision compute mode: what a training step costs ---------------------------

def _timed_step(layer, x, dy, scaler) -> float:
    """Seconds of one training step of the layer: forward, backward of the (scaled) upstream
    gradient and, with a scaler, its unscale and inf check. The optimizer is left out: it is
    the same float32 update in every precision."""
    start = time.perf_counter()
    layer.forward(x)
    if scaler is None:
        layer.backward(dy)
    else:
        layer.backward(dy * np.float32(scaler.scale), aux_scale=scaler.scale)
        _, found = scaler.unscale(layer.grads)
        scaler.update(found)
    return time.perf_counter() - start


def step_time_ratios(make_layer, x: np.ndarray, dy: np.ndarray, repeats: int = 5) -> dict:
    """Time of a SparseMoE training step in simulated fp16 and in fp8, each over the fp32 step.

    make_layer(compute) -> a float32 layer computing in "fp32", "fp16" or
    "fp8_e4m3" (as the chapter builds it).
    The benchmark's layer, at N=8192, D=512, H=1024, E=8, K=2:

        base = SparseConfig(d_model=512, num_experts=8, d_hidden=1024, k=2, capacity_factor=None)
        make_layer = lambda c: SparseMoE(replace(base, precision=PrecisionConfig(compute=c)),
                                         seed=0, dtype=np.float32)

    x, dy: (N, D) float32 input and upstream gradient (a mean loss's scale,
    e.g. standard normal / N). fp16 runs with a loss scale of 2**16, fp8
    with 1 (static: the step is timed, not trained). Medians of `repeats`
    steps after one warm-up, the precisions taking turns within each repeat
    so that a busy moment of a shared machine hits them alike.
    -> {"fp16_step_ratio", "fp8_step_ratio", "fp32_step_s", "fp16_step_s", "fp8_step_s"}.
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"step_time_ratios: repeats must be an integer >= 1, got {repeats!r}")
    from moe_np.scaling import LossScaler
    runs = {name: (make_layer(compute), None if init is None else
                   LossScaler(init_scale=init, dynamic=False))
            for name, compute, init in (("fp32", "fp32", None), ("fp16", "fp16", 2.0**16),
                                        ("fp8", "fp8_e4m3", 1.0))}
    times = {name: [] for name in runs}
    for r in range(repeats + 1):
        for name, (layer, scaler) in runs.items():
            seconds = _timed_step(layer, x, dy, scaler)
            if r:                                                      # repeat 0 warms up
                times[name].append(seconds)
    med = {name: float(np.median(t)) for name, t in times.items()}
    return {"fp16_step_ratio": med["fp16"] / med["fp32"], "fp8_step_ratio": med["fp8"] / med["fp32"],
            **{f"{name}_step_s": t for name, t in med.items()}}
