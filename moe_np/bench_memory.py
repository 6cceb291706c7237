"""The benchmark's memory measurements: what one forward+backward of a sparse layer holds.

    memory_run     one forward+backward under tracemalloc, in this process: peak resident
                   growth, NumPy's peak allocation, the bytes the cache keeps, and what is
                   alive after each stage (route, plan, gather, experts, combine, backward)
    memory_parts   the bytes backward cannot do without, part by part (the model)
    memory_model   that, the outputs and the gradients in MiB, and the 1.25x target

`bench.py` runs memory_run in a fresh process (`bench.peak_memory`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from moe_np.bench_runs import STRATEGY_CALLS, Size, instrument, layer_step, make_inputs, make_layer


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


MEMORY_CALLS = {"router_forward": "route", "router_backward": "route_bwd"}


def memory_run(size_list, strategy: str = "numba") -> dict:
    """One forward+backward of the benchmark's layer under tracemalloc, after a small warm-up
    step (BLAS, numba and the allocator set up) and an expert's three products (blas_warm_up):
    peak resident growth, NumPy's peak allocation, the bytes the cache keeps, and [stage,
    alive MiB after it, peak MiB during it] for every stage in the order it ran."""
    import tracemalloc
    from moe_np import dispatch, routers, sparse
    from moe_np.dispatch import jit
    size = Size(*size_list)
    jit.warm_up(np.float32)
    small = size._replace(n=64)
    layer_step(make_layer(small, strategy), *make_inputs(small))
    blas_warm_up(size)
    layer = make_layer(size, strategy)
    x, dy = make_inputs(size)
    stages, before = [], resident_mib()

    def record(stage, _seconds):
        current, peak = tracemalloc.get_traced_memory()
        stages.append([stage, current / 2**20, peak / 2**20])
        tracemalloc.reset_peak()
    tracemalloc.start()
    with instrument(dispatch.get_strategy(strategy), STRATEGY_CALLS, record), \
            instrument(routers, MEMORY_CALLS, record):
        (y, aux), cache = sparse.sparse_moe_forward(x, layer.params, layer.config)
        dx, grads = sparse.sparse_moe_backward((dy, 1.0), cache)
    record("end", 0.0)
    tracemalloc.stop()
    return {"traced_peak_mib": max(p for _, _, p in stages), "rss_growth_mib": max_resident_mib() - before,
            "kept_mib": array_mib(cache, exclude=[x] + list(layer.params.values())), "stages": stages}


def blas_warm_up(size: Size) -> None:
    """An expert's three kinds of product at its shape: h = x W1, dx = dh W1^T, dW1 = x^T dh.
    OpenBLAS packs its operands into a work buffer it allocates once per process; products
    this size touch more of it than the small warm-up step does (3.3 MiB more, measured on 2
    cores against the same arrays made without a product). That buffer is the library's,
    shared by every GEMM of the process, not the layer's, so it is touched before the layer
    is measured."""
    x = np.ones((max(1, size.n * size.k // size.e), size.d), dtype=np.float32)   # (M_e, D) as the layer's
    w = np.ones((size.d, size.h), dtype=np.float32)                    # (D, H)
    h = x @ w                                                          # (M_e, H)
    _ = h @ w.T, x.T @ h                                               # (M_e, D), (D, H)


def memory_parts(size: Size) -> dict:
    """Bytes of what backward cannot do without, short of recomputing a GEMM (float32,
    dropless: M = N K rows): the hidden activations h (M, H) (dW2 and the ReLU mask), the
    experts' outputs y_sorted (M, D) (the routing-weight gradient) and the routing: ids,
    weights and probabilities, and the plan's arrays. x_sorted (M, D) is not in it: it
    can be gathered again from x."""
    n, d, h, e, k = size
    m, f, i = n * k, 4, 8                                              # float32, int64 bytes
    return {"h": m * h * f, "y_sorted": m * d * f, "ids": n * k * i, "weights": n * k * f,
            "probs": n * e * f, "rows_token": m * i, "rows_weight": m * i, "token_rows": n * k * i,
            "offsets": (e + 1) * i}


def memory_model(size: Size) -> dict:
    """MiB: must keep (memory_parts), outputs y (N, D), gradients dx (N, D) and one per
    parameter; target_mib = 1.25 x their sum."""
    n, d, h, e, k = size
    f = 4
    grads = n * d * f + (2 * e * d * h + e * h + e * d + d * e) * f
    mib = {"must_keep_mib": sum(memory_parts(size).values()), "outputs_mib": n * d * f,
           "grads_mib": grads, "x_sorted_mib": n * k * d * f}
    mib = {key: value / 2**20 for key, value in mib.items()}
    mib["target_mib"] = 1.25 * (mib["must_keep_mib"] + mib["outputs_mib"] + mib["grads_mib"])
    return mib
