"""The hot path's loops: Numba kernels for the plan, gather and combine, with NumPy twins.

    plan_kernel        ids (N, K), eligible  -> Plan arrays   one stable counting sort
    gather_rows        x (N, D)              -> out (M, D)    x_sorted[m] = x[rows_token[m]]
    copy_rows          src (M, D)            -> out (M, D)    the same bytes without an index
    combine_rows       y_sorted (M, D), w    -> out (N, D)    y[n] = sum_j w_j y_sorted[row_j]
    combine_grad_rows  dy (N, D)             -> (M, D), (W,)  dy_sorted, dweights
    sum_rows           dx_sorted (M, D)      -> out (N, D)    dx[n] = sum_j dx_sorted[row_j]

Each kernel is a plain loop, compiled by `@njit(cache=True,
error_model="numpy")`: a float division follows IEEE (x / 0 is inf, as in
NumPy) instead of testing its divisor for zero to raise Python's
ZeroDivisionError, a test that kept the SwiGLU loops from vectorizing
(4.6x slower, the same bits). The loops
marked `prange` run in parallel over outputs that no other iteration
writes (a token's output row, a buffer row), so there are no races and no
atomics. A token's rows are summed in the fixed order j = 0..R-1, in the
data's dtype, so every run gives the same bits. Each kernel has a twin
written with NumPy array operations *in the same order of floating-point
operations*: the tests require kernel and twin to agree bit for bit.

The (rows, D) outputs are passed in, allocated by NumPy: an array
allocated inside compiled code comes from Numba's allocator, without the
transparent huge pages NumPy asks Linux for, and its first touch costs a
page fault per 4 KiB; measured, that made the 32 MiB gather several times
slower than a plain copy. These functions trust their inputs: the strategy
in `jit.py` validates everything first. With NUMBA_DISABLE_JIT=1 they run
as ordinary Python (`prange` is then `range`), so a debugger can step
through every line.
Shape letters: N tokens, K choices, E experts, M rows (kept assignments),
D width, R the most rows a token owns (K, or E for expert choice), W the
number of routing weights (N*K, or E*C for expert choice).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


# -- the plan: one stable counting sort by expert id ---------------------------------

@njit(cache=True, error_model="numpy")
def plan_kernel(ids, num_experts, cap, order, eligible, seq_len):
    """Plan arrays for token-choice routing, exactly as plan.plan_token_choice builds them.

    ids (N, K) int64, order (N,) int64 permutation, cap < 0 for dropless,
    eligible (N, K) bool (False: a padding token's assignment, which claims
    nothing), seq_len: tokens per sequence, each sequence with its own cap
    slots per expert (seq_len = N: one capacity for the whole batch).
    Pass 1 visits the assignments rank-major (tokens in `order` within a
    rank); the j-th eligible visitor of (sequence, expert) is kept if j < cap,
    and a kept one takes the next slot of its expert. Pass 2 turns slots
    into rows: row = offsets[e] + slot.
    -> rows_token (M,), rows_weight (M,), offsets (E+1,), token_rows (N, K), num_dropped
    (eligible assignments without a row). The twin is plan.plan_token_choice (NumPy sorts).
    """
    n, k = ids.shape
    token_rows = np.full((n, k), -1, dtype=np.int64)   # (N, K) holds the slot until pass 2
    claimed = np.zeros((n // seq_len + 1) * num_experts, dtype=np.int64)   # (B*E,) visitors
    seen = np.zeros(num_experts, dtype=np.int64)       # (E,) slots taken so far per expert
    visitors = 0
    for r in range(k):                                 # every first choice before any second
        for i in range(n):
            t = order[i]                               # the drop policy's claiming order
            if eligible[t, r]:
                visitors += 1
                e = ids[t, r]
                v = (t // seq_len) * num_experts + e   # (sequence, expert): where capacity counts
                j = claimed[v]
                claimed[v] = j + 1
                if cap < 0 or j < cap:
                    token_rows[t, r] = seen[e]
                    seen[e] += 1
    offsets = np.zeros(num_experts + 1, dtype=np.int64)   # (E+1,)
    for e in range(num_experts):
        offsets[e + 1] = offsets[e] + seen[e]
    m = offsets[num_experts]
    rows_token = np.empty(m, dtype=np.int64)           # (M,)
    rows_weight = np.empty(m, dtype=np.int64)          # (M,)
    for t in range(n):
        for r in range(k):
            slot = token_rows[t, r]
            if slot >= 0:
                row = offsets[ids[t, r]] + slot
                token_rows[t, r] = row
                rows_token[row] = t
                rows_weight[row] = t * k + r           # flat index into weights (N, K)
    return rows_token, rows_weight, offsets, token_rows, visitors - m


# -- gather: rows into the expert-contiguous buffer ------------------------------------

@njit(cache=True, parallel=True, error_model="numpy")
def gather_rows(x, rows_token, out):
    """out[m] = x[rows_token[m]].   x (N, D), rows_token (M,), out (M, D) -> out.

    Parallel over buffer rows: each iteration writes only its own row."""
    m = rows_token.shape[0]
    d = x.shape[1]
    for i in prange(m):
        src = rows_token[i]
        for c in range(d):
            out[i, c] = x[src, c]
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def take_rows(x, rows, out):
    """out[m] = x[rows[m]] on the calling thread.   x (N, D), rows (M_e,), out (M_e, D) -> out.
    gather_rows for one expert's rows, inside its chain of GEMMs (the experts' backward
    gathers its input rows again): like every kernel run there, single-threaded."""
    for i in range(rows.shape[0]):
        src = rows[i]
        for c in range(x.shape[1]):
            out[i, c] = x[src, c]
    return out


def gather_rows_twin(x, rows_token):
    """NumPy twin of gather_rows: fancy indexing."""
    return x[rows_token]                               # (M, D)


@njit(cache=True, parallel=True, error_model="numpy")
def copy_rows(src, out):
    """out[m] = src[m].   src (M, D), out (M, D) -> out. The gather without the index: what a
    compiled row loop can do with the same bytes (the benchmark's yardstick for gather_rows)."""
    m, d = src.shape
    for i in prange(m):
        for c in range(d):
            out[i, c] = src[i, c]
    return out


def copy_rows_twin(src):
    """NumPy twin of copy_rows: a plain copy."""
    return src.copy()                                  # (M, D)


# -- combine: the weighted sum of each token's rows ---------------------------------------

@njit(cache=True, parallel=True, error_model="numpy")
def combine_rows(y_sorted, w_flat, rows_weight, token_rows, y):
    """y[n] = sum over j = 0..R-1 with row = token_rows[n, j] >= 0 of w_flat[rows_weight[row]] * y_sorted[row].

    y_sorted (M, D), w_flat (W,), rows_weight (M,), token_rows (N, R), y (N, D) -> y.
    Parallel over tokens: token n reads its own rows and writes only y[n].
    A token with no row (all its assignments dropped) gets exactly 0."""
    n, r = token_rows.shape
    d = y_sorted.shape[1]
    for t in prange(n):
        for c in range(d):
            y[t, c] = 0
        for j in range(r):                             # fixed order: deterministic sums
            row = token_rows[t, j]
            if row >= 0:
                w = w_flat[rows_weight[row]]           # a scalar of the data's dtype
                for c in range(d):
                    y[t, c] += w * y_sorted[row, c]
    return y


def combine_rows_twin(y_sorted, w_flat, rows_weight, token_rows):
    """NumPy twin of combine_rows: the same products, added in the same order j = 0..R-1."""
    y = np.zeros((token_rows.shape[0], y_sorted.shape[1]), dtype=y_sorted.dtype)   # (N, D)
    for j in range(token_rows.shape[1]):
        rows = token_rows[:, j]                        # (N,) token n's j-th row, -1 if none
        has = rows >= 0                                # (N,)
        w = w_flat[rows_weight[rows[has]]]             # (N_j,)
        y[has] += w[:, None] * y_sorted[rows[has]]     # (N_j, D)
    return y


# -- combine backward: two gradients from one pass over the rows --------------------------

@njit(cache=True, parallel=True, error_model="numpy")
def combine_grad_rows(dy, y_sorted, w_flat, rows_token, rows_weight, dy_sorted, dweights):
    """dy_sorted[m] = w_m dy[t_m];  dweights[rows_weight[m]] = sum_c dy[t_m, c] y_sorted[m, c].

    dy (N, D), y_sorted (M, D), w_flat (W,), dy_sorted (M, D), dweights (W,) -> both filled.
    Parallel over rows: row m writes its own dy_sorted row and its own
    weight entry (rows_weight has distinct entries). Weights with no row
    (dropped assignments) get gradient exactly 0."""
    m, d = y_sorted.shape
    for f in range(dweights.shape[0]):
        dweights[f] = 0
    for i in prange(m):
        t = rows_token[i]
        f = rows_weight[i]
        w = w_flat[f]
        for c in range(d):
            dy_sorted[i, c] = w * dy[t, c]
        total = dweights[f]                            # 0, in the data's dtype
        for c in range(d):                             # the dot product, c = 0..D-1 in order
            total += dy[t, c] * y_sorted[i, c]
        dweights[f] = total
    return dy_sorted, dweights


def combine_grad_rows_twin(dy, y_sorted, w_flat, rows_token, rows_weight):
    """NumPy twin of combine_grad_rows: the dot product summed column by column, c = 0..D-1."""
    dy_rows = dy[rows_token]                           # (M, D)
    w_rows = w_flat[rows_weight]                       # (M,)
    products = dy_rows * y_sorted                      # (M, D)
    dots = np.zeros(len(y_sorted), dtype=y_sorted.dtype)   # (M,)
    for c in range(y_sorted.shape[1]):
        dots += products[:, c]
    dweights = np.zeros(len(w_flat), dtype=y_sorted.dtype)   # (W,)
    dweights[rows_weight] = dots
    return w_rows[:, None] * dy_rows, dweights         # (M, D), (W,)


# -- gather backward: each token sums the gradients of its own rows -------------------------

@njit(cache=True, parallel=True, error_model="numpy")
def sum_rows(dx_sorted, token_rows, dx):
    """dx[n] = sum over j = 0..R-1 with row = token_rows[n, j] >= 0 of dx_sorted[row].

    dx_sorted (M, D), token_rows (N, R), dx (N, D) -> dx. Parallel over
    tokens, race-free: no np.add.at, no atomics."""
    n, r = token_rows.shape
    d = dx_sorted.shape[1]
    for t in prange(n):
        for c in range(d):
            dx[t, c] = 0
        for j in range(r):
            row = token_rows[t, j]
            if row >= 0:
                for c in range(d):
                    dx[t, c] += dx_sorted[row, c]
    return dx


def sum_rows_twin(dx_sorted, token_rows):
    """NumPy twin of sum_rows: the rows added in the same order j = 0..R-1."""
    dx = np.zeros((token_rows.shape[0], dx_sorted.shape[1]), dtype=dx_sorted.dtype)   # (N, D)
    for j in range(token_rows.shape[1]):
        rows = token_rows[:, j]                        # (N,)
        has = rows >= 0                                # (N,)
        dx[has] += dx_sorted[rows[has]]                # (N_j, D)
    return dx


# -- the experts' pointwise passes: bias, ReLU, SwiGLU and their gradients ---------------------
# Twins: experts.NUMPY_POINTWISE. These run between two BLAS calls of one expert, so they run
# on the calling thread (a second team of threads would fight OpenBLAS's, which wait spinning
# between GEMMs, for the cores; measured, a parallel version made the step slower) and release
# the GIL (experts side by side on Python threads run them at once). `zero` and `one`
# arrive as scalars of the data's dtype, so no float64 constant promotes a float32 loop. The
# kernels reproduce NumPy's bits exactly: np.maximum(v, 0) keeps a NaN and turns -0.0 into +0;
# a sum over axis 0 starts from +0 and adds the rows in order, as these do; SwiGLU's exp is
# NumPy's own (np.exp between two kernels: the C library's expf would round differently, and
# compiled code cannot call NumPy's vectorized one), the rest the same operations in the same order.

@njit(cache=True, nogil=True, error_model="numpy")
def bias_relu_rows(h, b, zero):
    """h[i] = max(h[i] + b, 0) in place.   h (M, H), b (H,) -> h."""
    m, w = h.shape
    for i in range(m):
        for j in range(w):
            v = h[i, j] + b[j]
            h[i, j] = v if (v > zero or v != v) else zero
    return h


@njit(cache=True, nogil=True, error_model="numpy")
def add_bias_rows(y, b):
    """y[i] += b in place.   y (M, D), b (D,) -> y."""
    m, w = y.shape
    for i in range(m):
        for j in range(w):
            y[i, j] += b[j]
    return y


@njit(cache=True, nogil=True, error_model="numpy")
def relu_grad_columns(da, h, zero, one):
    """da *= (h > 0) in place; -> its column sums, from +0, rows added in order.
    da, h (M, H) -> db (H,)."""
    m, w = da.shape
    db = np.full(w, zero)                              # (H,) a private sum: the loop vectorizes
    for i in range(m):
        for j in range(w):
            v = da[i, j] * (one if h[i, j] > zero else zero)
            da[i, j] = v
            db[j] += v
    return db


@njit(cache=True, nogil=True, error_model="numpy")
def column_sums(a, zero):
    """The column sums of a, from +0, rows added in order.   a (M, D) -> (D,)."""
    m, w = a.shape
    out = np.full(w, zero)                             # (D,)
    for i in range(m):
        for j in range(w):
            out[j] += a[i, j]
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def neg_abs_rows(a, out):
    """out = -|a|, the argument of functional.sigmoid's exp.   a, out (M, H) -> out."""
    m, w = a.shape
    for i in range(m):
        for j in range(w):
            out[i, j] = -abs(a[i, j])
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def swiglu_rows(a, b, e, one):
    """e = silu(a) b = (a s) b with s = (1 or e) / (1 + e), e = exp(-|a|) given (NumPy's exp,
    as functional.sigmoid calls it), written over e.   a, b, e (M, H) -> e.
    Each entry of e is read, then written: one array, so the loop vectorizes (an output
    that may alias an input would make it check their overlap and run scalar, 2.5x slower)."""
    m, w = a.shape
    for i in range(m):
        for j in range(w):
            x, ej = a[i, j], e[i, j]
            s = (one if x >= 0 else ej) / (one + ej)   # a select, not a branch: it vectorizes
            e[i, j] = (x * s) * b[i, j]
    return e


@njit(cache=True, nogil=True, error_model="numpy")
def swiglu_grad_rows(du, a, b, one, db):
    """da = (du b) s (1 + a (1 - s)) written over du, db = du silu(a); s as in swiglu_rows,
    from e = exp(-|a|) given in db.   du, a, b, db (M, H) -> (du holding da, db)."""
    m, w = a.shape
    for i in range(m):
        for j in range(w):
            x, ej, g = a[i, j], db[i, j], du[i, j]
            s = (one if x >= 0 else ej) / (one + ej)
            db[i, j] = g * (x * s)
            du[i, j] = ((g * b[i, j]) * s) * (one + x * (one - s))
    return du, db
