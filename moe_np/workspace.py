"""Large arrays kept from one training step for the next.

    Workspace.empty(shape, dtype)     an uninitialised array, in kept memory when some is free
    empty(workspace, shape, dtype)    the same, or np.empty when workspace is None

A fresh array of many MiB is memory the process has never written: the
operating system maps and clears each page at its first write. NumPy asks
Linux for transparent huge pages for arrays of 4 MiB and more, so the first
write into each 2 MiB waits while the kernel clears it, on the thread that
writes. A training step of chapter 5's layer makes about 250 MiB of such
arrays (the dispatched rows, the hidden layer, the gradients), and
`python -m moe_np bench` shows what that costs against a step whose
buffers are reused (chapter 5, "What the backward must keep").

A Workspace keeps the large arrays it hands out and hands their memory out
again once nothing else refers to them: CPython's reference count of a kept
buffer then holds only the workspace's own reference (a view of it, a cache
or a gradient still in use keeps it busy). Among the free buffers the
smallest that fits is taken, if it wastes at most a fifth of itself (a
large buffer handed out for a small array would leave the next large
request without one), so memory freed early in a step serves later
arrays of a like size, much as malloc would; a request no free buffer
fits gets a new one. Arrays under MIN_BYTES come from malloc, which reuses
small blocks itself, and at most MAX_KEPT buffers are kept (a new one then
takes the place of a free one). Not thread-safe: call it from the thread
that runs the step.
"""
from __future__ import annotations

import math
import sys

import numpy as np

MIN_BYTES = 1 << 22     # 4 MiB: NumPy's threshold for huge pages; malloc recycles smaller blocks
MAX_KEPT = 16           # buffers a workspace keeps at most


class Workspace:
    """Kept byte buffers, handed out as arrays of any shape and dtype."""

    def __init__(self):
        self.kept: list[np.ndarray] = []          # (bytes,) uint8 each

    def _free(self, i: int) -> bool:
        """Nothing but this list refers to kept[i] (getrefcount adds its own argument)."""
        return sys.getrefcount(self.kept[i]) == 2

    def empty(self, shape, dtype) -> np.ndarray:
        """An uninitialised C-contiguous array of shape and dtype: in the smallest free kept
        buffer that holds it without wasting more than a fifth, else in a new buffer, kept in
        place of a free one once MAX_KEPT are kept."""
        dtype = np.dtype(dtype)
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(n) for n in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_BYTES:
            return np.empty(shape, dtype=dtype)
        free = [i for i in range(len(self.kept)) if self._free(i)]
        fits = [i for i in free if nbytes <= self.kept[i].size <= nbytes * 5 // 4]
        if fits:
            i = min(fits, key=lambda j: self.kept[j].size)
            return self.kept[i][:nbytes].view(dtype).reshape(shape)
        buf = np.empty(nbytes, dtype=np.uint8)                         # (bytes,)
        if len(self.kept) < MAX_KEPT:
            self.kept.append(buf)
        elif free:
            self.kept[free[0]] = buf                                   # the free one is let go
        return buf.view(dtype).reshape(shape)

    def __deepcopy__(self, memo):
        return Workspace()                # a copy of a layer starts with no kept memory

    def __getstate__(self):
        return {"kept": []}               # pickled without its buffers

    def kept_bytes(self) -> int:
        """The bytes of every kept buffer, free or in use."""
        return sum(b.size for b in self.kept)


def empty(workspace: Workspace | None, shape, dtype) -> np.ndarray:
    """workspace.empty(shape, dtype), or np.empty(shape, dtype) without a workspace."""
    if workspace is None:
        return np.empty(shape, dtype=dtype)
    return workspace.empty(shape, dtype)
