"""Experts: E feed-forward networks, their matrices stacked over experts, applied as one batch.

    ReLU MLP expert   f_e(x) = relu(x W1[e] + b1[e]) W2[e] + b2[e]
    SwiGLU expert     f_e(x) = (silu(x Wg[e]) * (x Wu[e])) Wd[e]      (Mixtral's FFN)

The matrices are stacked over experts: W1 (E, D, H), W2 (E, H, D) and so on.
The input is either shared by every expert, x (N, D) -> y (E, N, D) (the
dense mixture), or one batch of rows per expert, x (E, M, D) -> y (E, M, D)
(a padded sparse layout, (E, C, D)). Backward returns dx in the shape x
came in: for a shared x the experts' contributions are summed.

The ragged pair runs a sparse layer's expert-contiguous buffer x_sorted
(M, D), expert e on rows offsets[e]:offsets[e+1], one GEMM chain per
expert, with biases and ReLU applied in place. Its backward can gather the input
rows again instead of keeping them, and write dx over dy (see ragged_experts_backward).
"""
from __future__ import annotations

import threading
from typing import Callable, NamedTuple

import numpy as np

from moe_np import blas, layers, lowp, validate


def _batched(fn, x, w_in):
    """x as (E or 1, M, D), after checking it against the stacked input weight."""
    validate.ndim(fn, "w_in", w_in, 3)
    if np.ndim(x) not in (2, 3):
        raise ValueError(f"{fn}: x must be (N, D) or (E, M, D), got shape {np.shape(x)}")
    if x.shape[-1] != w_in.shape[1]:
        raise ValueError(f"{fn}: x has D={x.shape[-1]} but the expert matrices have D={w_in.shape[1]}")
    if x.ndim == 3 and x.shape[0] != w_in.shape[0]:
        raise ValueError(f"{fn}: x has {x.shape[0]} expert batches but there are E={w_in.shape[0]} experts")
    return x if x.ndim == 3 else x[None]                           # (E or 1, M, D)


def _input_grad(dxb, x):
    """Sum the experts' input gradients when they shared one x."""
    return dxb if x.ndim == 3 else dxb.sum(axis=0)                 # (E, M, D) or (N, D)


def _weight_grad(xb, dy):
    """sum over rows of x^T dy for each expert.   (E|1, M, D), (E, M, H) -> (E, D, H)."""
    return np.swapaxes(xb, -1, -2) @ dy                            # (E, D, H)


class MlpExpertsCache(NamedTuple):
    x: np.ndarray       # (N, D) or (E, M, D) as given
    xb: np.ndarray      # (E|1, M, D)
    w1: np.ndarray      # (E, D, H)
    w2: np.ndarray      # (E, H, D)
    h: np.ndarray       # (E, M, H) relu(x W1 + b1); the ReLU mask is h > 0


def mlp_experts_forward(x, w1, b1, w2, b2):
    """y[e] = relu(x W1[e] + b1[e]) W2[e] + b2[e].

    x: (N, D) or (E, M, D)  W1: (E, D, H)  b1: (E, H)  W2: (E, H, D)  b2: (E, D)
    -> y: (E, N, D) or (E, M, D).  cache MlpExpertsCache.
    """
    xb = _batched("mlp_experts_forward", x, w1)                    # (E|1, M, D)
    validate.shape("mlp_experts_forward", "b1", b1, (w1.shape[0], w1.shape[2]))
    validate.shape("mlp_experts_forward", "w2", w2, (w1.shape[0], w1.shape[2], w1.shape[1]))
    validate.shape("mlp_experts_forward", "b2", b2, (w1.shape[0], w1.shape[1]))
    a = xb @ w1 + b1[:, None, :]                                   # (E, M, H)
    h = np.maximum(a, 0, out=a)                                    # (E, M, H) in place
    y = h @ w2 + b2[:, None, :]                                    # (E, M, D)
    return y, MlpExpertsCache(x, xb, w1, w2, h)


def mlp_experts_selection(cache: MlpExpertsCache):
    """The ReLU on/off pattern (the kink a gradient check must not cross).   (E, M, H) bool."""
    return cache.h > 0


def mlp_experts_backward(dy, cache: MlpExpertsCache):
    """-> dx (as x), dW1 (E, D, H), db1 (E, H), dW2 (E, H, D), db2 (E, D)."""
    x, xb, w1, w2, h = cache
    dw2 = _weight_grad(h, dy)                                      # (E, H, D)
    db2 = dy.sum(axis=1)                                           # (E, D)
    da = (dy @ np.swapaxes(w2, -1, -2)) * (h > 0)                  # (E, M, H)
    dw1 = _weight_grad(xb, da)                                     # (E, D, H)
    db1 = da.sum(axis=1)                                           # (E, H)
    dx = _input_grad(da @ np.swapaxes(w1, -1, -2), x)              # as x
    return dx, dw1, db1, dw2, db2


class SwigluExpertsCache(NamedTuple):
    x: np.ndarray        # (N, D) or (E, M, D) as given
    xb: np.ndarray       # (E|1, M, D)
    w_gate: np.ndarray   # (E, D, H)
    w_up: np.ndarray     # (E, D, H)
    w_down: np.ndarray   # (E, H, D)
    u: np.ndarray        # (E, M, H) silu(x Wg) * (x Wu)
    glu_cache: tuple     # layers.swiglu's cache


def swiglu_experts_forward(x, w_gate, w_up, w_down):
    """y[e] = (silu(x Wg[e]) * (x Wu[e])) Wd[e]   (no biases, as in Mixtral).

    x: (N, D) or (E, M, D)  Wg, Wu: (E, D, H)  Wd: (E, H, D)  ->  y: (E, N, D) or (E, M, D).
    """
    xb = _batched("swiglu_experts_forward", x, w_gate)             # (E|1, M, D)
    validate.same_shape("swiglu_experts_forward", "w_gate", w_gate, "w_up", w_up)
    validate.shape("swiglu_experts_forward", "w_down", w_down,
                   (w_gate.shape[0], w_gate.shape[2], w_gate.shape[1]))
    a = xb @ w_gate                                                # (E, M, H)
    b = xb @ w_up                                                  # (E, M, H)
    u, glu_cache = layers.swiglu_forward(a, b)                     # (E, M, H)
    y = u @ w_down                                                 # (E, M, D)
    return y, SwigluExpertsCache(x, xb, w_gate, w_up, w_down, u, glu_cache)


def swiglu_experts_backward(dy, cache: SwigluExpertsCache):
    """-> dx (as x), dWg (E, D, H), dWu (E, D, H), dWd (E, H, D)."""
    x, xb, w_gate, w_up, w_down, u, glu_cache = cache
    dw_down = _weight_grad(u, dy)                                  # (E, H, D)
    du = dy @ np.swapaxes(w_down, -1, -2)                          # (E, M, H)
    da, db = layers.swiglu_backward(du, glu_cache)                 # (E, M, H), (E, M, H)
    dw_gate = _weight_grad(xb, da)                                 # (E, D, H)
    dw_up = _weight_grad(xb, db)                                   # (E, D, H)
    dxb = da @ np.swapaxes(w_gate, -1, -2) + db @ np.swapaxes(w_up, -1, -2)   # (E, M, D)
    return _input_grad(dxb, x), dw_gate, dw_up, dw_down


class ExpertKind(NamedTuple):
    forward: Callable     # (x, *matrices) -> y, cache
    backward: Callable    # (dy, cache) -> dx, *dmatrices (in `names` order)
    names: tuple          # parameter names, in the order forward takes them


EXPERTS = {
    "mlp": ExpertKind(mlp_experts_forward, mlp_experts_backward, ("w1", "b1", "w2", "b2")),
    "swiglu": ExpertKind(swiglu_experts_forward, swiglu_experts_backward,
                         ("w_gate", "w_up", "w_down")),
}


def expert_kind(kind: str) -> ExpertKind:
    if kind not in EXPERTS:
        raise ValueError(f"experts: kind must be one of {sorted(EXPERTS)}, got {kind!r}")
    return EXPERTS[kind]


def experts_selection(kind: str, cache):
    """The discrete choices of a stacked expert forward: the ReLU pattern, or () for SwiGLU."""
    return (mlp_experts_selection(cache),) if kind == "mlp" else ()


# -- the experts' pointwise passes ----------------------------------------------------

class Pointwise(NamedTuple):
    """The elementwise passes of the ragged pair, in place or into a given buffer: NumPy's
    (NUMPY_POINTWISE, the specification) or the numba strategy's fused loops, which reproduce
    them bit for bit (dispatch/kernels.py)."""
    bias_relu: Callable     # (h (M, H), b (H,)) -> h = max(h + b, 0)
    add_bias: Callable      # (y (M, D), b (D,)) -> y += b
    relu_grad: Callable     # (da (M, H), h (M, H)) -> db (H,): da *= h > 0, db its column sums
    column_sums: Callable   # (a (M, D)) -> (D,)
    swiglu: Callable        # (a, b, out (M, H)) -> out = silu(a) b
    swiglu_grad: Callable   # (du, a, b, db (M, H)) -> (da written over du, db)
    take_rows: Callable     # (x (N, D), rows (M,), out (M, D)) -> out = x[rows]


def _bias_relu(h, b):
    h += b                                                         # (M, H)
    return np.maximum(h, 0, out=h)                                 # (M, H) ReLU in place


def _add_bias(y, b):
    y += b                                                         # (M, D)
    return y


def _relu_grad(da, h):
    da *= h > 0                                                    # (M, H) ReLU mask
    return da.sum(axis=0)                                          # (H,)


def _swiglu(a, b, out):
    return np.multiply(layers.silu_forward(a)[0], b, out=out)      # (M, H)


def _swiglu_grad(du, a, b, db):
    silu_a, silu_cache = layers.silu_forward(a)                    # (M, H)
    np.multiply(du, silu_a, out=db)                                # (M, H) db = du silu(a)
    du[...] = layers.silu_backward(du * b, silu_cache)             # (M, H) da over du
    return du, db


NUMPY_POINTWISE = Pointwise(_bias_relu, _add_bias, _relu_grad, lambda a: a.sum(axis=0),
                            _swiglu, _swiglu_grad,
                            lambda x, rows, out: np.take(x, rows, axis=0, out=out))


# -- the ragged layout: expert-contiguous rows of a sparse layer ------------------

class RaggedCache(NamedTuple):
    kind: str
    x_sorted: np.ndarray | None   # (M, D), or None when the rows are gathered again from source
    offsets: np.ndarray    # (E+1,)
    matrices: tuple        # the expert weight matrices (and biases), in EXPERTS[kind].names order
    hidden: tuple          # mlp: (h,) relu output (M, H); swiglu: (a, b) pre-activations (M, H)
    gemm: Callable         # every matrix product: np.matmul, or a low-precision one
    source: tuple | None   # (x (N, D), rows_token (M,)) with x_sorted[m] = x[rows_token[m]], or None
    pointwise: Pointwise   # the elementwise passes


def check_offsets(fn: str, offsets, rows: int, num_experts: int) -> None:
    """offsets (E+1,) int, non-decreasing, from 0 to rows."""
    validate.shape(fn, "offsets", offsets, (num_experts + 1,))
    if offsets[0] != 0 or offsets[-1] != rows or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{fn}: offsets must rise from 0 to M={rows}, got {offsets[:6]}...")


def ragged_experts_forward(x_sorted, params: dict, kind: str, offsets, gemm=np.matmul,
                           source=None, pointwise: Pointwise = NUMPY_POINTWISE):
    """y_sorted[lo:hi] = f_e(x_sorted[lo:hi]) for lo, hi = offsets[e], offsets[e+1].

    x_sorted: (M, D), params: the stacked expert matrices (E, ...) -> y_sorted (M, D).
    Only what backward cannot cheaply recompute is kept: the hidden
    activations (M, H); the ReLU mask is recovered as h > 0. With source =
    (x (N, D), rows_token (M,)), the rows x_sorted was gathered from, not even
    x_sorted is kept: the backward gathers each expert's rows again, one
    segment at a time (the same values, so the same gradients, one (M, D)
    buffer less). gemm(a, b, out=) computes every matrix product, forward and
    backward: np.matmul, or a simulated low-precision product (lowp.gemm_for).
    pointwise: the elementwise passes (NUMPY_POINTWISE, or compiled ones that match them).
    """
    matrices = tuple(params[k] for k in expert_kind(kind).names)
    validate.ndim("ragged_experts_forward", "x_sorted", x_sorted, 2)
    _check_matrices(kind, matrices, x_sorted)
    check_offsets("ragged_experts_forward", offsets, len(x_sorted), matrices[0].shape[0])
    if source is not None:
        _check_source(source, x_sorted)
    run = _ragged_mlp_forward if kind == "mlp" else _ragged_swiglu_forward
    y_sorted, hidden = run(x_sorted, matrices, offsets, gemm, pointwise)   # (M, D)
    kept = x_sorted if source is None else None
    return y_sorted, RaggedCache(kind, kept, offsets, matrices, hidden, gemm, source, pointwise)


def _check_matrices(kind: str, matrices, x_sorted) -> None:
    """The stacked matrices' shapes agree with each other and with x_sorted's width D, and
    share its dtype (the compiled passes read the biases by these shapes)."""
    e, d, h = matrices[0].shape if np.ndim(matrices[0]) == 3 else (0, -1, 0)
    want = {"mlp": ((e, d, h), (e, h), (e, h, d), (e, d)),
            "swiglu": ((e, d, h), (e, d, h), (e, h, d))}[kind]
    names = expert_kind(kind).names
    for name, w, shape in zip(names, matrices, want):
        if np.shape(w) != shape or w.dtype != x_sorted.dtype:
            raise ValueError(f"ragged_experts_forward: {name} must be {shape} {x_sorted.dtype} "
                             f"(from {names[0]} {np.shape(matrices[0])} and x_sorted's dtype), "
                             f"got {np.shape(w)} {w.dtype}")
    if x_sorted.shape[1] != d:
        raise ValueError(f"ragged_experts_forward: x_sorted has D={x_sorted.shape[1]} but the "
                         f"expert matrices have D={d}")


def _check_source(source, x_sorted) -> None:
    """source = (x (N, D), rows_token (M,)) from which x_sorted was gathered."""
    x, rows_token = source
    if x.ndim != 2 or x.shape[1] != x_sorted.shape[1] or x.dtype != x_sorted.dtype \
            or rows_token.shape != (len(x_sorted),) \
            or (len(rows_token) and not 0 <= rows_token.min() <= rows_token.max() < len(x)):
        raise ValueError(f"ragged_experts_forward: source must be (x (N, D={x_sorted.shape[1]}) "
                         f"{x_sorted.dtype}, rows_token (M={len(x_sorted)},) in [0, N)), got x "
                         f"{x.shape} {x.dtype} and rows_token {rows_token.shape}")


def _segments(offsets):
    """(e, lo, hi) for every expert that owns at least one row."""
    return [(e, int(lo), int(hi)) for e, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:]))
            if hi > lo]


def _each_segment(fn, offsets, gemm) -> None:
    """fn((e, lo, hi)) for every expert with rows. With NumPy's own matmul the experts run side
    by side (blas.run_each: each expert's chain on one BLAS thread, largest first); a simulated
    low-precision gemm keeps shared scratch buffers, so its experts run in turn."""
    segments = sorted(_segments(offsets), key=lambda s: s[1] - s[2])
    if gemm is np.matmul:
        blas.run_each(fn, segments)
    else:
        for segment in segments:
            fn(segment)


def _ragged_mlp_forward(x, matrices, offsets, gemm, pw: Pointwise):
    w1, b1, w2, b2 = matrices
    h = np.empty((len(x), w1.shape[2]), dtype=x.dtype)             # (M, H)
    y = np.empty_like(x)                                           # (M, D)

    def expert(segment):
        e, lo, hi = segment
        he = gemm(x[lo:hi], w1[e], out=h[lo:hi])                   # (M_e, H)
        pw.bias_relu(he, b1[e])                                    # (M_e, H) in place
        pw.add_bias(gemm(he, w2[e], out=y[lo:hi]), b2[e])          # (M_e, D)
    _each_segment(expert, offsets, gemm)
    return y, (h,)


def _ragged_swiglu_forward(x, matrices, offsets, gemm, pw: Pointwise):
    w_gate, w_up, w_down = matrices
    a = np.empty((len(x), w_gate.shape[2]), dtype=x.dtype)         # (M, H)
    b = np.empty_like(a)                                           # (M, H)
    y = np.empty_like(x)                                           # (M, D)

    def expert(segment):
        e, lo, hi = segment
        xe = lowp.once(gemm, x[lo:hi], "x")                        # (M_e, D) rounded once, if at all
        gemm(xe, w_gate[e], out=a[lo:hi])                          # (M_e, H)
        gemm(xe, w_up[e], out=b[lo:hi])                            # (M_e, H)
        u = pw.swiglu(a[lo:hi], b[lo:hi], np.empty_like(b[lo:hi]))   # (M_e, H)
        gemm(u, w_down[e], out=y[lo:hi])                           # (M_e, D)
    _each_segment(expert, offsets, gemm)
    return y, (a, b)


def ragged_experts_selection(cache: RaggedCache):
    """The ReLU pattern of every row (mlp), or () (swiglu).   (M, H) bool."""
    return (cache.hidden[0] > 0,) if cache.kind == "mlp" else ()


class Segment(NamedTuple):
    """One expert's rows during the backward, and the scratch its products write into."""
    e: int
    rows: slice          # its rows lo:hi of the (M, ...) buffers
    dy: np.ndarray       # (M_e, D) its upstream gradient rows
    dx: np.ndarray       # (M_e, D) where its input gradient goes (dy's own memory with overwrite);
                         # its input rows are gathered again here, after dy's last read
    own_dy: bool         # dy may be written (overwrite): rounded in place, not into scratch
    hidden: tuple        # its rows of cache.hidden, (M_e, H) each
    scratch: np.ndarray  # (S, M_e, H) work buffers for the hidden layer (S = 1 mlp, 2 swiglu)


def _input_rows(seg: Segment, cache: RaggedCache):
    """The expert's input rows: a slice of the kept x_sorted, or gathered again from x into
    seg.dx. Call it after the last read of seg.dy (with overwrite, seg.dx is dy's memory)."""
    if cache.source is None:
        return cache.x_sorted[seg.rows]                            # (M_e, D)
    x, rows_token = cache.source
    return cache.pointwise.take_rows(x, rows_token[seg.rows], seg.dx)   # (M_e, D)


def ragged_experts_backward(dy_sorted, cache: RaggedCache, overwrite: bool = False):
    """-> dx_sorted (M, D), grads {name: (E, ...)}; experts with no rows get zero gradients.

    overwrite=True writes dx_sorted over dy_sorted (each expert's rows of dy
    are read in full before its rows of dx are written; in fp16 / bf16 they
    are first rounded in place, lowp.once) and returns it: the caller must
    own dy_sorted and need it no more. The work buffer is sized by
    the largest expert (one per thread running experts), so the backward
    allocates little beyond the gradients, and those are written once: each
    expert's GEMMs fill its slices (only an idle expert's are zeroed), where
    zeros_like would first write all E experts' matrices with zeros."""
    if dy_sorted.ndim != 2 or dy_sorted.shape[1] != cache.matrices[0].shape[1] \
            or len(dy_sorted) != cache.offsets[-1] or dy_sorted.dtype != cache.hidden[0].dtype:
        raise ValueError(f"ragged_experts_backward: dy_sorted must be (M={cache.offsets[-1]}, "
                         f"D={cache.matrices[0].shape[1]}) {cache.hidden[0].dtype}, got "
                         f"{dy_sorted.shape} {dy_sorted.dtype}")
    grads = tuple(np.empty_like(w) for w in cache.matrices)        # each expert writes its slices
    for e in np.flatnonzero(np.diff(cache.offsets) == 0):          # an idle expert: gradient 0
        for g in grads:
            g[e] = 0
    dx = dy_sorted if overwrite else np.empty_like(dy_sorted)      # (M, D) every row written
    widest, width = int(np.diff(cache.offsets).max(initial=0)), cache.hidden[0].shape[1]
    buffers = 1 if cache.kind == "mlp" else 2
    local = threading.local()                                      # one work buffer per thread
    run = _ragged_mlp_backward if cache.kind == "mlp" else _ragged_swiglu_backward

    def expert(segment):
        e, lo, hi = segment
        if not hasattr(local, "scratch"):
            local.scratch = np.empty((buffers, widest, width), dtype=dy_sorted.dtype)   # (S, M_max, H)
        run(Segment(e, slice(lo, hi), dy_sorted[lo:hi], dx[lo:hi], overwrite,
                    tuple(a[lo:hi] for a in cache.hidden), local.scratch[:, :hi - lo]), grads, cache)
    _each_segment(expert, cache.offsets, cache.gemm)
    return dx, dict(zip(expert_kind(cache.kind).names, grads))


def _dy_once(seg: Segment, gemm):
    """The segment's upstream gradient rounded once for its two products: in place when the
    backward owns dy (it becomes dx afterwards), else in gemm's scratch."""
    return lowp.once(gemm, seg.dy, "dy", out=seg.dy if seg.own_dy else None)   # (M_e, D)


def _ragged_mlp_backward(seg: Segment, grads, cache):
    """One expert's segment: its slices of the gradients, then dx (after dy's last read)."""
    w1, _, w2, _ = cache.matrices
    dw1, db1, dw2, db2 = grads
    gemm, pw, e, h = cache.gemm, cache.pointwise, seg.e, seg.hidden[0]   # h: (M_e, H)
    db2[e] = pw.column_sums(seg.dy)                                # (D,)
    dy = _dy_once(seg, gemm)                                       # (M_e, D) for its two products
    gemm(h.T, dy, out=dw2[e])                                      # (H, D)
    da = gemm(dy, w2[e].T, out=seg.scratch[0])                     # (M_e, H); dy's last read
    db1[e] = pw.relu_grad(da, h)                                   # (H,); da masked in place
    da = lowp.once(gemm, da, "da", out=da)                         # (M_e, H) rounded in place
    gemm(_input_rows(seg, cache).T, da, out=dw1[e])                # (D, H)
    gemm(da, w1[e].T, out=seg.dx)                                  # (M_e, D)


def _ragged_swiglu_backward(seg: Segment, grads, cache):
    w_gate, w_up, w_down = cache.matrices
    dw_gate, dw_up, dw_down = grads
    gemm, pw, e, (a, b) = cache.gemm, cache.pointwise, seg.e, seg.hidden   # (M_e, H) each
    u = pw.swiglu(a, b, seg.scratch[1])                            # (M_e, H) recomputed
    dy = _dy_once(seg, gemm)                                       # (M_e, D) for its two products
    gemm(u.T, dy, out=dw_down[e])                                  # (H, D)
    du = gemm(dy, w_down[e].T, out=seg.scratch[0])                 # (M_e, H)
    da, db = pw.swiglu_grad(du, a, b, seg.scratch[1])              # (M_e, H) each, over du and u
    da, db = lowp.once(gemm, da, "da", out=da), lowp.once(gemm, db, "db", out=db)   # in place
    x = _input_rows(seg, cache)                                    # (M_e, D), after dy's last read
    x = lowp.once(gemm, x, "x", out=None if cache.source is None else x)   # gathered: in place
    gemm(x.T, da, out=dw_gate[e])                                  # (D, H)
    gemm(x.T, db, out=dw_up[e])                                    # (D, H)
    dx = gemm(da, w_gate[e].T, out=seg.dx)                         # (M_e, D)
    dx += gemm(db, w_up[e].T)


def _stacked_normal(rng, shape, scale: float, dtype) -> np.ndarray:
    """scale * standard normal draws, (E, ...) in dtype, drawn one expert at a time: the same
    values in the same order as one draw of the whole shape (rng's stream is consumed entry
    by entry), without a float64 array of the whole shape (256 MiB per matrix at E = 64,
    D = 512, H = 1024) beside the result."""
    out = np.empty(shape, dtype=dtype)                                 # (E, ...)
    for i in range(shape[0]):
        out[i] = rng.standard_normal(shape[1:]) * scale                # float64, cast once
    return out


def init_experts(kind: str, num_experts: int, d_model: int, d_hidden: int, rng,
                 dtype=np.float64):
    """Random expert parameters in `dtype`: He-scaled normal matrices, zero biases."""
    expert_kind(kind)
    if min(num_experts, d_model, d_hidden) < 1:
        raise ValueError(f"init_experts: num_experts, d_model, d_hidden must be >= 1, "
                         f"got {num_experts}, {d_model}, {d_hidden}")
    e, d, h = num_experts, d_model, d_hidden
    normal = lambda shape, fan_in, gain: _stacked_normal(rng, shape, np.sqrt(gain / fan_in), dtype)
    if kind == "mlp":
        return {"w1": normal((e, d, h), d, 2.0),                   # (E, D, H)
                "b1": np.zeros((e, h), dtype=dtype),               # (E, H)
                "w2": normal((e, h, d), h, 1.0),                   # (E, H, D)
                "b2": np.zeros((e, d), dtype=dtype)}               # (E, D)
    return {"w_gate": normal((e, d, h), d, 1.0),                   # (E, D, H)
            "w_up": normal((e, d, h), d, 1.0),                     # (E, D, H)
            "w_down": normal((e, h, d), h, 1.0)}                   # (E, H, D)
