"""The C heap's handling of freed memory, which decides whether a step's arrays fault afresh.

    keep_pages(mib=64, every_size=False)
                         glibc keeps up to `mib` MiB of freed memory at the top of its heap
                         and serves every allocation under MMAP_LIMIT from the heap -> True;
                         False where the C library has no mallopt (not glibc: nothing changes).
                         every_size: allocations of every size come from the heap (the main
                         thread's; other threads' arenas still map blocks over 64 MiB), none
                         from a mapping of its own, and freed memory goes back to the system
                         only beyond `mib` MiB (bench and chapter 5, at the layer's size)

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

An allocation of MMAP_LIMIT or more still gets a mapping of its own when the
heap's free top cannot hold it: at chapter 5's layer size h (64 MiB) and
the (M, D) buffers (32 MiB) do, now and then, and a fresh mapping there was
seen to stall a step by hundreds of milliseconds on chapter 5's machine, a
virtual one: NumPy asks the kernel for 2 MiB pages under its large arrays,
and the first touch of each such page took about 10-25 ms there (138 of
them, under the GEMM floor's buffers, 1.3-2.4 s in three runs; the same
bytes in 4 KiB pages about 0.06 s). NUMPY_MADVISE_HUGEPAGE=0, set before NumPy loads, turns the
request off, as bench's timing processes do (chapter 5).
every_size sends those to the heap too (mallopt M_MMAP_MAX = 0), which then
keeps up to `mib` MiB free (M_TOP_PAD, and M_TRIM_THRESHOLD so that it does
not trim below that at every free) for the next step.

This changes the whole process's allocator for the rest of its life, so
nothing calls it on import: lm_train.build_lm_run does, for the
language-model runs (the chapter, the train-lm command, bench's lm_*
section, which its process measures last), and bench's timing processes
and chapter 5 call keep_pages(bench.KEEP_MIB, every_size=True). A later
call without every_size leaves its two settings as they are. The numbers a
run computes do not change, only where their memory comes from.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4   # glibc's mallopt
                                                                            # parameters (malloc.h)
MMAP_LIMIT = 32 << 20                   # allocations from this size up still get a mapping of
                                        # their own (the largest threshold glibc takes on 64-bit)
MAX_MIB = 2047                          # mallopt takes an int of bytes


def keep_pages(mib: int = 64, every_size: bool = False) -> bool:
    """Ask glibc to keep `mib` MiB of freed heap and to map only allocations of MMAP_LIMIT or
    more; with every_size, to map none (every allocation from the heap) and to hand freed
    memory back only beyond `mib` MiB. -> whether it could (False without glibc's mallopt)."""
    if not isinstance(mib, int) or isinstance(mib, bool) or not 0 <= mib <= MAX_MIB:
        raise ValueError(f"keep_pages: mib must be an integer in [0, {MAX_MIB}], got {mib!r}")
    if not isinstance(every_size, bool):
        raise ValueError(f"keep_pages: every_size must be True or False, got {every_size!r}")
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):           # no C library found, or not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = [(M_MMAP_THRESHOLD, MMAP_LIMIT), (M_TOP_PAD, mib << 20)]
    if every_size:
        settings += [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, mib << 20)]
    return all([bool(mallopt(param, value)) for param, value in settings])
