"""The benchmark's timed runs: the layer under test, its GEMM floor, PyTorch's eager block,
per-stage timings, copies of the gathered bytes, the sweep over the number of experts, and
what a training step in simulated fp16 / fp8 costs (step_time_ratios).

Every function here times one thing in *this* process, at whatever thread settings the
process started with; `bench.py` runs them in a fresh process per thread setting and
judges the results. Runners return (forward seconds, backward seconds); everything is
float32, ReLU experts, a softmax top-K router and no capacity limit (dropless).
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np

SCALING_E = (4, 8, 16, 32, 64)
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


def bandwidth_gbps(nbytes: int, seconds: float) -> float:
    """GB/s of a copy that reads nbytes and writes nbytes: 2 * nbytes / seconds / 1e9."""
    return 2 * nbytes / seconds / 1e9


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
    """A Mixtral-style PyTorch eager block on the same weights, or (None, None) without torch.

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


def time_interleaved(runners: dict, repeats: int, warm_up: bool = True) -> dict:
    """Each runner returns (forward s, backward s); all take turns in every repeat.
    -> {name: {forward_s, fwd_bwd_s}}, medians over the repeats (after one warm-up round
    unless warm_up=False: for a runner so slow that its first run is representative)."""
    runs = {name: [] for name in runners}
    first = 0 if warm_up else 1
    for rep in range(first, repeats + 1):                              # round 0 is the warm-up
        for name, runner in runners.items():
            runs[name].append(runner())
        progress(f"layer round {rep}/{repeats}: " +
                 ", ".join(f"{name} {sum(r[-1]):.3f}s" for name, r in runs.items()))
    kept = 1 if warm_up else 0
    return {name: {"forward_s": float(np.median([f for f, _ in r[kept:]])),
                   "fwd_bwd_s": float(np.median([f + b for f, b in r[kept:]]))}
            for name, r in runs.items()}


# -- stages: the layer's own calls, timed where they happen ------------------------------

STAGES = ("plan", "gather", "experts", "combine", "combine_bwd", "experts_bwd", "gather_bwd")
STRATEGY_CALLS = {"plan_token_choice": "plan", "gather_forward": "gather", "experts_forward": "experts",
                  "combine_forward": "combine", "combine_backward": "combine_bwd",
                  "experts_backward": "experts_bwd", "gather_backward": "gather_bwd"}


@contextmanager
def instrument(module, calls: dict, after):
    """Within the block, module.<name>() for each name in `calls` runs as before and then
    calls after(calls[name], seconds it took). The layer looks its strategy's functions up
    on the module at every call, so this observes a real forward+backward unchanged."""
    originals = {name: getattr(module, name) for name in calls}

    def wrap(name, fn):
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            after(calls[name], time.perf_counter() - start)
            return out
        return timed_call
    try:
        for name, fn in originals.items():
            setattr(module, name, wrap(name, fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def staged_runner(layer, x, dy, log: list):
    """A runner (forward s, backward s) for the layer that also appends {stage: seconds} of
    its dispatch stages to `log`: the stages of the very steps being timed."""
    from moe_np import dispatch
    strategy = dispatch.get_strategy(layer.config.dispatch)

    def run():
        times = {}
        with instrument(strategy, STRATEGY_CALLS, lambda stage, s: times.__setitem__(stage, s)):
            out = layer_step(layer, x, dy)
        log.append(times)
        return out
    return run


def stage_medians(log: list, warm_up: bool = True) -> dict:
    """{stage: median seconds} over the logged steps, the warm-up step left out."""
    kept = log[1:] if warm_up and len(log) > 1 else log
    return {name: float(np.median([t[name] for t in kept])) for name in STAGES}


def copy_rounds(size: Size, repeats: int) -> dict:
    """The dispatch kernels and their yardsticks, taking turns in every round (a slow moment of
    the machine hits them all): the gather (M rows of x by a plan), the combine (N weighted
    sums of K rows), a compiled copy loop of the gathered bytes (kernels.copy_rows) and
    memcpy. Each runs twice a round: into a new array, as the layer's step writes ("new":
    the gather and combine by the layer's own calls, jit.*_forward, their checks included),
    and into an array already written ("touched": the kernels alone), where only their own
    reads and writes are left.   -> {"new": {name: s}, "touched": {name: s}}, medians after
    one warm-up round."""
    from moe_np.dispatch import jit, kernels
    rng = np.random.default_rng(3)
    src = rng.standard_normal((size.n * size.k, size.d), dtype=np.float32)      # (M, D)
    x = rng.standard_normal((size.n, size.d), dtype=np.float32)                 # (N, D)
    ids = np.argsort(rng.random((size.n, size.e)), axis=1)[:, :size.k]          # (N, K) distinct
    weights = rng.random((size.n, size.k), dtype=np.float32)                    # (N, K)
    plan = jit.plan_token_choice(ids, size.e, None)
    rows_out, tokens_out = np.zeros_like(src), np.zeros_like(x)                 # (M, D), (N, D)
    w_flat = weights.ravel()                                                    # (N K,)
    runners = {"new": {"memcpy": src.copy,
                       "copy_loop": lambda: kernels.copy_rows(src, np.empty_like(src)),
                       "gather": lambda: jit.gather_forward(x, plan),
                       "combine": lambda: jit.combine_forward(src, weights, plan)},
               "touched": {"memcpy": lambda: np.copyto(rows_out, src),
                           "copy_loop": lambda: kernels.copy_rows(src, rows_out),
                           "gather": lambda: kernels.gather_rows(x, plan.rows_token, rows_out),
                           "combine": lambda: kernels.combine_rows(src, w_flat, plan.rows_weight,
                                                                   plan.token_rows, tokens_out)}}
    times = {(into, name): [] for into, group in runners.items() for name in group}
    for _ in range(repeats + 1):                                       # round 0 is the warm-up
        for (into, name) in times:
            times[into, name].append(timed(runners[into][name]))
    return {into: {name: float(np.median(times[into, name][1:])) for name in group}
            for into, group in runners.items()}


def copy_ratios(size: Size, copies: dict) -> dict:
    """From copy_rounds' times, for "new" and "touched" memory: the gather's bandwidth over the
    copy loop's (both move M*D floats) and the combine's time over a copy loop moving its
    bytes (it reads (M, D) and writes (N, D)).   -> {into: {"gather_over_copy_loop",
    "combine_over_copy"}}."""
    gathered = size.n * size.k * size.d                                # floats the gather moves
    moved = (size.n * size.k + size.n) * size.d / 2                    # the combine's, in copies of one
    return {into: {"gather_over_copy_loop": c["copy_loop"] / c["gather"],
                   "combine_over_copy": c["combine"] / (c["copy_loop"] * moved / gathered)}
            for into, c in copies.items()}


# -- scaling with the number of experts -------------------------------------------------------

def scaling(size: Size, strategies, repeats: int, deadline: float) -> tuple[list, list]:
    """Time per token of forward+backward for E in SCALING_E, K, D, H fixed; for numba also
    its GEMM floor at the same E (floor_us_per_token: gemm_floor_runner, N K / E rows each).
    -> (rows in SCALING_E's order, notes).

    The points run from the largest E down, each layer and floor freed before the next
    is made: the later, smaller ones reuse the memory the first one faulted in, where
    growing E would fault more at every point (a fresh page costs much on some machines).
    Every numba point and each strategy's first (largest) point always run; another
    point whose projected time (from the strategy's previous, larger point) would
    pass `deadline` (a perf_counter value) is skipped and named in the notes."""
    n, rows, notes, last = SCALING_TOKENS.get(size, size.n), [], [], {}
    for e in sorted(SCALING_E, reverse=True):
        sub = size._replace(n=n, e=e)
        x, dy = make_inputs(sub)
        for s in strategies:
            projected = 1.5 * (repeats + 1) * last.get(s, 0.0)
            if s != "numba" and s in last and time.perf_counter() + projected > deadline:
                notes.append(f"scaling: skipped {s} at E={e} (projected {projected:.0f}s "
                             f"would pass the time budget)")
                continue
            layer = floor = None                                      # the last point's, freed
            layer = make_layer(sub, s)
            steps = [sum(layer_step(layer, x, dy)) for _ in range(repeats + 1)]
            last[s] = float(np.median(steps[1:]))
            rows.append({"E": e, "strategy": s, "us_per_token": last[s] / n * 1e6})
            if s == "numba":                                  # the same GEMMs alone, at this E
                floor = gemm_floor_runner(sub, layer.params)
                rows[-1]["floor_us_per_token"] = float(np.median(
                    [sum(floor()) for _ in range(repeats + 1)][1:])) / n * 1e6
            progress(f"scaling E={e:2d} {s:6s}: {rows[-1]['us_per_token']:.2f} us/token")
    return sorted(rows, key=lambda row: row["E"]), notes      # stable: strategies keep their order


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
    with 1 (static: the step is timed, not trained). The precisions take turns
    within each of `repeats` rounds (after a warm-up round), so that a busy
    moment of a shared machine hits them alike; each ratio is the median over
    the rounds of that round's own ratio, each *_step_s the median step.
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
    fp32 = np.array(times["fp32"])                                     # (repeats,)
    ratio = {name: float(np.median(np.array(times[name]) / fp32)) for name in ("fp16", "fp8")}
    return {"fp16_step_ratio": ratio["fp16"], "fp8_step_ratio": ratio["fp8"],
            **{f"{name}_step_s": float(np.median(t)) for name, t in times.items()}}
