"""The C heap's handling of freed memory, which decides whether a step's arrays fault afresh.

    keep_pages(mib=64)   glibc keeps up to `mib` MiB of freed memory at the top of its heap
                         and serves every allocation under MMAP_LIMIT from the heap -> True;
                         False where the C library has no mallopt (not glibc: nothing changes)

NumPy takes each array from the C allocator. glibc gives an allocation above
its mmap threshold a fresh mapping, and hands freed memory at the top of its
heap back to the system once more than its trim threshold lies free; either
way the next step's arrays of the same sizes are new pages to the kernel,
and each 4 KiB page faults on its first write. A training step of chapter
9's model makes a few hundred such arrays between a few KiB and a MiB
(scores, their softmax, the experts' hidden layers) and faulted about 1,800
pages a step, about a tenth of the step. With the pages kept, a step reuses
the memory the last one freed and faults a handful. The cost: the process
holds on to up to `mib` MiB of free memory at the top of its heap, and
since allocations under MMAP_LIMIT now come from the heap, a gap freed
below a block still in use stays the process's until it is reused (about
10 MiB more resident at chapter 9's size).

This changes the whole process's allocator for the rest of its life, so
nothing calls it on import: lm_train.build_lm_run does, for the
language-model runs (the chapter, the train-lm command, bench's lm_*
section, which its process measures last). The numbers a run computes do
not change, only where their memory comes from.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TOP_PAD, M_MMAP_THRESHOLD = -2, -3    # glibc's mallopt parameters (malloc.h)
MMAP_LIMIT = 32 << 20                   # allocations from this size up still get a mapping of
                                        # their own (the largest threshold glibc takes on 64-bit)
MAX_MIB = 2047                          # mallopt takes an int of bytes


def keep_pages(mib: int = 64) -> bool:
    """Ask glibc to keep `mib` MiB of freed heap and to map only allocations of MMAP_LIMIT or
    more; -> whether it could (False where the C library has no mallopt)."""
    if not isinstance(mib, int) or isinstance(mib, bool) or not 0 <= mib <= MAX_MIB:
        raise ValueError(f"keep_pages: mib must be an integer in [0, {MAX_MIB}], got {mib!r}")
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):           # no C library found, or not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_LIMIT)) and bool(mallopt(M_TOP_PAD, mib << 20))
