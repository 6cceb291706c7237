"""BLAS threads: how many OpenBLAS runs, and independent GEMM chains run side by side.

    threads()            how many threads NumPy's OpenBLAS splits one GEMM across (1 if unknown)
    run_each(fn, items)  fn(item) for every item: in turn, or with MOE_NP_EXPERT_THREADS=T > 1
                         on T Python threads, each GEMM on one BLAS thread

A sparse layer's experts are independent GEMM chains. OpenBLAS splits each
GEMM across its threads and ends it in a barrier where one thread waits for
the other; a step makes six such calls per expert. When another job holds a
core, each barrier can wait a whole scheduler time slice, so the step grows
with the number of calls, that is with E. run_each can instead give whole
experts to T Python threads (NumPy releases the GIL inside BLAS and its
loops) with BLAS on one thread each: one join per stage instead of a
barrier per GEMM, and the bits of a one-thread run. It is off unless asked
for (side_by_side), because a GEMM split across BLAS threads can round
differently from the same GEMM on one thread: turning it on changes the last
bits of a multi-threaded run. The thread count is read and set through
OpenBLAS's own functions (found in NumPy's bundled library with ctypes);
where they cannot be found, items run in turn.
"""
from __future__ import annotations

import ctypes
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_NAMES = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
          ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
          ("openblas_get_num_threads", "openblas_set_num_threads"))
_FOUND: list = []
_LOCK = threading.Lock()
_POOLS: dict = {}


def _control():
    """(get, set) of the OpenBLAS NumPy loaded, or None (another BLAS, or not found)."""
    if not _FOUND:
        folder = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
        libs = sorted(glob.glob(os.path.join(folder, "*openblas*")))
        found = None
        for path in libs:
            lib = ctypes.CDLL(path)
            for get, put in _NAMES:
                if hasattr(lib, get) and hasattr(lib, put):
                    getattr(lib, put).argtypes = [ctypes.c_int]
                    found = (getattr(lib, get), getattr(lib, put))
                    break
            if found:
                break
        _FOUND.append(found)
    return _FOUND[0]


def threads() -> int:
    """The number of threads NumPy's OpenBLAS uses for one GEMM (1 if it cannot be told)."""
    control = _control()
    return max(1, int(control[0]())) if control else 1


ENV = "MOE_NP_EXPERT_THREADS"   # Python threads for independent experts; unset or 1: in turn


def side_by_side() -> int:
    """How many Python threads run_each may use: $MOE_NP_EXPERT_THREADS (default 1, in turn).

    Off by default: an OpenBLAS GEMM split across threads can round differently from the
    same GEMM on one thread, so turning this on changes the last bits of a multi-threaded
    run (and of every chapter output generated at the default threads)."""
    value = os.environ.get(ENV, "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"blas: {ENV} must be a positive integer, got {value!r}")
    return int(value)


def run_each(fn, items) -> None:
    """fn(item) for each item, in any order: the items must write disjoint outputs.
    In turn unless side_by_side() > 1 and BLAS can be told its thread count; then on that
    many Python threads, BLAS at one thread meanwhile (restored after). An exception in fn
    is raised here."""
    items = list(items)
    count = min(side_by_side(), len(items)) if _control() else 1
    if count <= 1:
        for item in items:
            fn(item)
        return
    get, put = _control()
    with _LOCK:
        pool = _POOLS.setdefault(count, ThreadPoolExecutor(count, thread_name_prefix="moe_np_blas"))
        before = get()
        put(1)
        try:
            list(pool.map(fn, items))
        finally:
            put(before)
