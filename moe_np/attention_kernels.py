"""Attention's elementwise passes as compiled loops, bit for bit the NumPy passes they replace.

    causal_softmax(s, temperature, queries)   s (R, L) -> p over s   softmax of the scores
                         s / T under the causal mask: row i is query i % queries of the last ones
    softmax_grad(dp, p, temperature)          dp (R, L) -> dz over dp
    rope(x, cos, sin, transpose)              x (B, H, T, F) -> a new array: the rotation, or
                                              its transpose (RoPE's backward)
    scatter_add(rows, ids, out)               out[ids[n]] += rows[n]: the embedding's backward
    rms_norm(x, w, eps), rms_norm_grad(dy, xhat, rinv, w)   RMSNorm's pair, row by row

At chapter 9's size attention's scores are small arrays (a few hundred KiB
per query block): NumPy's masked softmax makes seven passes over them (the
mask, then divide, max, subtract, exp, sum, divide), each a separate call,
and a reduction along rows of 32 to 128 entries is slower per entry than a
pass. Here the mask, the temperature and the max go in one pass, NumPy's
own `exp` in a second (so that its bits are NumPy's: Numba's `exp` is
another implementation), and the sum and the division in a third; the
backward makes two loops over each row (the products dp p and their sum,
then the gradient).

Same bits as NumPy, which the tests check: every float operation is the
one NumPy makes, in the same order, in the array's dtype, and a row's sum
is `pairwise_sum`, NumPy's own summation order for a contiguous row
(eight running sums, halves above 128 entries). The twins are the NumPy
code in attention.py and functional.py that these replace. The loops trust
their inputs; the public functions at the end validate them, at the Python
boundary; with NUMBA_DISABLE_JIT=1 the loops run as plain Python. Shape letters as in
attention.py; R rows (every leading axis flattened), L keys.
"""
from __future__ import annotations

import numpy as np
from numba import njit

DTYPES = (np.float32, np.float64)
PAIRWISE_BLOCK = 128     # NumPy's PW_BLOCKSIZE: rows up to this long are summed in one block


@njit(cache=True, nogil=True, error_model="numpy")
def _block_sum(a, lo, n, zero):
    """NumPy's sum of a[lo:lo+n], n <= PAIRWISE_BLOCK: eight running sums, then the rest."""
    if n < 8:
        total = zero
        for i in range(n):
            total += a[lo + i]
        return total
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for j in range(i, n):
        total += a[lo + j]
    return total


@njit(cache=True, nogil=True, error_model="numpy")
def _halves_sum(a, lo, n, zero):
    """NumPy's recursion for a run longer than a block (sum(first half) + sum(second half),
    the first half a multiple of 8), walked with explicit stacks: Numba's cache cannot hold a
    recursive function (loading one crashes). A task is a run to sum (its lo, n) or, with
    n = -1, "add the last two sums"; the runs' sums wait on `sums` in the recursion's order."""
    task_lo, task_n = np.empty(200, np.int64), np.empty(200, np.int64)   # depth <= 64: < 200 tasks
    sums = np.empty(70, a.dtype)
    tasks, done = 1, 0
    task_lo[0], task_n[0] = lo, n
    while tasks:
        tasks -= 1
        start, size = task_lo[tasks], task_n[tasks]
        if size < 0:                                   # both halves summed: add them
            done -= 1
            sums[done - 1] = sums[done - 1] + sums[done]
        elif size <= PAIRWISE_BLOCK:
            sums[done] = _block_sum(a, start, size, zero)
            done += 1
        else:
            half = size // 2
            half -= half % 8
            task_lo[tasks], task_n[tasks] = 0, -1      # last: add the two sums
            task_lo[tasks + 1], task_n[tasks + 1] = start + half, size - half   # second
            task_lo[tasks + 2], task_n[tasks + 2] = start, half                 # first
            tasks += 3
    return sums[0]


@njit(cache=True, nogil=True, error_model="numpy")
def _pairwise_sum(a, lo, n, zero):
    """np.add.reduce of the contiguous a[lo:lo+n] (1-D a), in NumPy's order: blocks of at most
    PAIRWISE_BLOCK entries, a longer run split in two and the halves' sums added, the whole
    added to the reduction's start value +0 (zero: a +0 of a's dtype). Unchecked: see
    pairwise_sum."""
    if n <= PAIRWISE_BLOCK:
        return zero + _block_sum(a, lo, n, zero)
    return zero + _halves_sum(a, lo, n, zero)


@njit(cache=True, nogil=True, error_model="numpy")
def _row_max(a, n, low):
    """The largest of a[:n] (low if n == 0), in eight running maxima. NaNs are passed over: a
    row holding one comes out of the softmax all NaN whatever its max, as NumPy's does."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = low
    i = 0
    while i < n - n % 8:
        m0 = a[i] if a[i] > m0 else m0
        m1 = a[i + 1] if a[i + 1] > m1 else m1
        m2 = a[i + 2] if a[i + 2] > m2 else m2
        m3 = a[i + 3] if a[i + 3] > m3 else m3
        m4 = a[i + 4] if a[i + 4] > m4 else m4
        m5 = a[i + 5] if a[i + 5] > m5 else m5
        m6 = a[i + 6] if a[i + 6] > m6 else m6
        m7 = a[i + 7] if a[i + 7] > m7 else m7
        i += 8
    for j in range(i, n):
        m0 = a[j] if a[j] > m0 else m0
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


@njit(cache=True, nogil=True, error_model="numpy")
def scaled_masked_rows(s, temperature, period, offset, minus_inf):
    """s = s / T where row i sees key j (j <= offset + i % period), else -inf; then minus the
    row's max. In place.   s (R, L) -> s."""
    rows, keys = s.shape
    for i in range(rows):
        seen = min(offset + i % period + 1, keys)
        row = s[i]
        for j in range(seen):
            row[j] = row[j] / temperature
        for j in range(seen, keys):
            row[j] = minus_inf
        top = _row_max(row, seen, minus_inf)
        for j in range(keys):
            row[j] = row[j] - top
    return s


@njit(cache=True, nogil=True, error_model="numpy")
def normalized_rows(e, zero):
    """e / (the row's sum), in place.   e (R, L) -> e."""
    rows, keys = e.shape
    for i in range(rows):
        total = _pairwise_sum(e[i], 0, keys, zero)
        for j in range(keys):
            e[i, j] = e[i, j] / total
    return e


@njit(cache=True, nogil=True, error_model="numpy")
def softmax_grad_rows(dp, p, temperature, zero):
    """dz = p (dp - sum_j dp p) / T over dp, row by row.   dp, p (R, L) -> dp."""
    rows, keys = dp.shape
    work = np.empty(keys, dp.dtype)                    # (L,) one row's products dp p
    for i in range(rows):
        for j in range(keys):
            work[j] = dp[i, j] * p[i, j]
        inner = _pairwise_sum(work, 0, keys, zero)
        for j in range(keys):
            dp[i, j] = ((dp[i, j] - inner) * p[i, j]) / temperature
    return dp


@njit(cache=True, nogil=True, error_model="numpy")
def _row_mean(a, n, zero, rounded):
    """np.mean of a[:n] (1-D contiguous): the sum in NumPy's order, divided by the count as
    NumPy divides it (in float64, by an integer), then rounded to a's dtype through
    `rounded` (a 1-entry array of that dtype)."""
    rounded[0] = np.float64(_pairwise_sum(a, 0, n, zero)) / np.float64(n)
    return rounded[0]


@njit(cache=True, nogil=True, error_model="numpy")
def rms_norm_rows(x, w, eps, one, y, xhat, rinv):
    """rinv = 1 / sqrt(mean(x^2) + eps), xhat = x rinv, y = xhat w, row by row.
    x, y, xhat (R, D), w (D,), rinv (R,) -> y."""
    rows, d = x.shape
    work, rounded = np.empty(d, x.dtype), np.empty(1, x.dtype)     # (D,) x^2; (1,)
    zero = one - one
    for i in range(rows):
        for j in range(d):
            work[j] = x[i, j] * x[i, j]
        r = one / np.sqrt(_row_mean(work, d, zero, rounded) + eps)
        rinv[i] = r
        for j in range(d):
            v = x[i, j] * r
            xhat[i, j] = v
            y[i, j] = v * w[j]
    return y


@njit(cache=True, nogil=True, error_model="numpy")
def rms_norm_grad_rows(dy, xhat, rinv, w, one, dx, dw):
    """g = dy w, dx = (g - xhat mean(g xhat)) rinv row by row; dw = the column sums of
    dy xhat, rows added in order from +0 (NumPy's order for D >= 2; a single column it sums
    pairwise).   dy, xhat, dx (R, D), rinv (R,), w, dw (D,) -> dx."""
    rows, d = dy.shape
    work, rounded = np.empty(d, dy.dtype), np.empty(1, dy.dtype)   # (D,) g xhat; (1,)
    zero = one - one
    for j in range(d):
        dw[j] = zero
    for i in range(rows):
        for j in range(d):
            dw[j] += dy[i, j] * xhat[i, j]
            g = dy[i, j] * w[j]
            dx[i, j] = g
            work[j] = g * xhat[i, j]
        mu = _row_mean(work, d, zero, rounded)
        for j in range(d):
            dx[i, j] = (dx[i, j] - xhat[i, j] * mu) * rinv[i]
    return dx


@njit(cache=True, nogil=True, error_model="numpy")
def scatter_add_rows(rows, ids, out):
    """out[ids[n]] += rows[n] for n = 0, 1, ... in order (np.add.at's order).   rows (N, D),
    ids (N,), out (V, D) -> out."""
    n, d = rows.shape
    for i in range(n):
        target = ids[i]
        for j in range(d):
            out[target, j] += rows[i, j]
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def rope_rows(x, cos, sin, sign, out):
    """out = (x1 c - sign x2 s, x2 c + sign x1 s): RoPE (sign 1) or its transpose (sign -1).
    x (B, H, T, F) any strides, cos, sin (T, F/2), out (B, H, T, F) -> out."""
    b, h, t, f = x.shape
    half = f // 2
    for i in range(b):
        for j in range(h):
            for k in range(t):
                for m in range(half):
                    x1, x2, c, s = x[i, j, k, m], x[i, j, k, m + half], cos[k, m], sin[k, m]
                    out[i, j, k, m] = x1 * c - sign * (x2 * s)
                    out[i, j, k, m + half] = x2 * c + sign * (x1 * s)
    return out


# -- the Python boundary: everything checked before a loop runs -------------------------------

def _check_rows(fn: str, name: str, a, dtype=None, written: bool = False) -> None:
    """a: a C-contiguous float32/float64 array of at least 2 dimensions and a last axis of at
    least one entry (of `dtype` when given; writeable when the loop writes it)."""
    if not isinstance(a, np.ndarray) or a.dtype not in DTYPES or a.ndim < 2 or not a.shape[-1] \
            or not a.flags.c_contiguous or (written and not a.flags.writeable):
        raise ValueError(f"{fn}: {name} must be a{' writeable' if written else ''} C-contiguous "
                         f"float32/float64 array of at least 2 dimensions, its last not empty, got "
                         f"{type(a).__name__} {getattr(a, 'dtype', '')} {getattr(a, 'shape', '')}")
    if dtype is not None and a.dtype != dtype:
        raise ValueError(f"{fn}: {name} must be {dtype} like the others, got {a.dtype}")


def _check_positive(fn: str, name: str, value) -> None:
    if not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r}")


def pairwise_sum(a) -> float:
    """np.add.reduce of a 1-D C-contiguous float32/float64 array, in NumPy's order (the loops'
    row sums use this).   a (n,) -> a number of a's dtype."""
    if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype not in DTYPES \
            or not a.flags.c_contiguous:
        raise ValueError(f"pairwise_sum: a must be a 1-D C-contiguous float32/float64 array, got "
                         f"{type(a).__name__} {getattr(a, 'dtype', '')} {getattr(a, 'shape', '')}")
    return a.dtype.type(_pairwise_sum(a, 0, a.size, a.dtype.type(0)))


def causal_softmax(s, temperature: float, queries: int):
    """p = softmax(s / T + causal mask) along the last axis, written over s.   s (..., L) -> p
    (s itself). Its rows cycle through `queries` positions, the last ones of the L keys: row i
    of the flattened (R, L) scores sees keys j <= L - queries + i % queries (causal_mask).
    The bits of attention's NumPy twin (np.copyto of -inf, then functional.softmax_forward)."""
    _check_rows("causal_softmax", "s", s, written=True)
    _check_positive("causal_softmax", "temperature", temperature)
    keys = s.shape[-1]
    if not isinstance(queries, (int, np.integer)) or not 1 <= queries <= keys \
            or s.shape[-2] % queries:
        raise ValueError(f"causal_softmax: queries must be an integer in [1, L={keys}] dividing "
                         f"the rows ({s.shape[-2]}), got {queries!r}")
    s2 = s.reshape(-1, keys)                                       # (R, L) a view: s is C-contiguous
    kind = s.dtype.type
    scaled_masked_rows(s2, kind(temperature), int(queries), keys - int(queries), kind(-np.inf))
    np.exp(s2, out=s2)                                             # (R, L) NumPy's exp, its bits
    normalized_rows(s2, kind(0))
    return s


def softmax_grad(dp, p, temperature: float):
    """dz = p (dp - sum(dp p)) / T along the last axis, written over dp (functional.
    softmax_backward's bits).   dp, p (..., L) -> dz (dp itself)."""
    _check_rows("softmax_grad", "dp", dp, written=True)
    _check_rows("softmax_grad", "p", p, dp.dtype)
    if p.shape != dp.shape or np.may_share_memory(dp, p):
        raise ValueError(f"softmax_grad: p {p.shape} must have dp's shape {dp.shape} and its own "
                         f"memory (dp is written row by row while p is read)")
    _check_positive("softmax_grad", "temperature", temperature)
    softmax_grad_rows(dp.reshape(-1, dp.shape[-1]), p.reshape(-1, p.shape[-1]),
                      dp.dtype.type(temperature), dp.dtype.type(0))
    return dp


def _check_norm(fn: str, pairs, w) -> None:
    """Every (name, array) a C-contiguous (..., D) float32/float64 of one shape and dtype; w (D,)."""
    (first, a), *rest = pairs
    _check_rows(fn, first, a)
    for name, b in rest:
        _check_rows(fn, name, b, a.dtype)
        if b.shape != a.shape:
            raise ValueError(f"{fn}: {name} {b.shape} must have {first}'s shape {a.shape}")
    if not isinstance(w, np.ndarray) or w.dtype != a.dtype or w.shape != a.shape[-1:]:
        raise ValueError(f"{fn}: w must be {a.dtype} (D={a.shape[-1]},), got "
                         f"{getattr(w, 'dtype', '')} {getattr(w, 'shape', type(w).__name__)}")


def rms_norm(x, w, eps: float):
    """RMSNorm's forward with attention.rms_norm_forward's bits.   x (..., D) C-contiguous,
    w (D,) -> y, xhat (x's shape), rinv (..., 1)."""
    _check_norm("rms_norm", (("x", x),), w)
    _check_positive("rms_norm", "eps", eps)
    d = x.shape[-1]
    y, xhat = np.empty_like(x), np.empty_like(x)                   # (..., D) each
    rinv = np.empty(x.shape[:-1] + (1,), dtype=x.dtype)            # (..., 1)
    kind = x.dtype.type
    rms_norm_rows(x.reshape(-1, d), w, kind(eps), kind(1), y.reshape(-1, d), xhat.reshape(-1, d),
                  rinv.reshape(-1))
    return y, xhat, rinv


def rms_norm_grad(dy, xhat, rinv, w):
    """RMSNorm's backward with attention.rms_norm_backward's bits.   dy, xhat (..., D),
    rinv (..., 1), w (D,) -> dx (dy's shape), dw (D,). D >= 2: NumPy sums a single column
    pairwise, not row after row."""
    _check_norm("rms_norm_grad", (("dy", dy), ("xhat", xhat)), w)
    if dy.shape[-1] < 2:
        raise ValueError(f"rms_norm_grad: D must be >= 2, got dy {dy.shape}")
    _check_rows("rms_norm_grad", "rinv", rinv, dy.dtype)
    if rinv.shape != dy.shape[:-1] + (1,):
        raise ValueError(f"rms_norm_grad: rinv must be {dy.shape[:-1] + (1,)}, got {rinv.shape}")
    d = dy.shape[-1]
    dx, dw = np.empty_like(dy), np.empty_like(w)                   # (..., D), (D,)
    rms_norm_grad_rows(dy.reshape(-1, d), xhat.reshape(-1, d), rinv.reshape(-1), w,
                       dy.dtype.type(1), dx.reshape(-1, d), dw)
    return dx, dw


def scatter_add(rows, ids, out):
    """out[ids[n]] += rows[n], n in order: np.add.at(out, ids, rows), its bits.   rows (N, D),
    ids (N,) ints in [0, V), out (V, D) of rows' dtype -> out."""
    _check_rows("scatter_add", "out", out, written=True)
    if not isinstance(rows, np.ndarray) or rows.dtype != out.dtype or rows.ndim != 2 \
            or out.ndim != 2 or rows.shape[1] != out.shape[1]:
        raise ValueError(f"scatter_add: rows must be {out.dtype} (N, D={out.shape[1]}), got "
                         f"{getattr(rows, 'dtype', '')} {getattr(rows, 'shape', type(rows).__name__)}")
    ids = np.asarray(ids)
    integers = np.issubdtype(ids.dtype, np.integer)
    if ids.shape != rows.shape[:1] or not integers or (ids.size and (ids.min() < 0 or ids.max() >= len(out))):
        seen = f" from {ids.min()} to {ids.max()}" if integers and ids.size else ""
        raise ValueError(f"scatter_add: ids must be {len(rows)} integers in [0, {len(out)}), got "
                         f"{ids.dtype} {ids.shape}{seen}")
    return scatter_add_rows(rows, ids.astype(np.int64, copy=False), out)


def rope(x, cos, sin, transpose: bool = False):
    """RoPE's rotation (or with transpose, its transpose: the backward) of x (B, H, T, F), any
    strides, by cos, sin (T, F/2) of x's dtype -> a new C-contiguous (B, H, T, F) (the twin's
    result has x's layout; the values are the same)."""
    if not isinstance(x, np.ndarray) or x.dtype not in DTYPES or x.ndim != 4 or x.shape[3] % 2:
        raise ValueError(f"rope: x must be a float32/float64 (B, H, T, F) array, F even, got "
                         f"{type(x).__name__} {getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}")
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, np.ndarray) or table.dtype != x.dtype \
                or table.shape != (x.shape[2], x.shape[3] // 2):
            raise ValueError(f"rope: {name} must be {x.dtype} (T, F/2) = ({x.shape[2]}, "
                             f"{x.shape[3] / 2:g}) for x {x.shape}, got {getattr(table, 'dtype', '')} "
                             f"{getattr(table, 'shape', type(table).__name__)}")
    out = np.empty(x.shape, dtype=x.dtype)                         # (B, H, T, F)
    return rope_rows(x, cos, sin, x.dtype.type(-1 if transpose else 1), out)
