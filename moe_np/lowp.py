"""The low-precision compute mode: where a layer rounds, and how.

A layer running in low precision keeps float32 arrays (the master weights
stay float32) and rounds at three named steps of every matrix product:

    operands   a, b -> the format:  fp16 / bf16 round to nearest even;
               fp8 is scaled first (PrecisionConfig.fp8_scaling): one scale
               per 1 x 128 tile of the left operand along the inner
               dimension and per 128 x 128 block of the right operand
               ("tile", DeepSeek-V3), one per tensor ("tensor"), or one
               power of two per 32 elements of the inner dimension of both ("mx")
    product    float32 BLAS: the sums are exact float32 sums, which is what
               promoting partial sums to float32 gives (chapter 6 shows what
               a short accumulator without promotion costs, at small sizes)
    output     -> fp16 / bf16 for those formats; fp8 products are written as
               bf16, as fp8 GEMMs in practice write a 16-bit output

NumPy's own float16 matmul is not BLAS-backed and is hundreds of times
slower, so it is never used. The float64 pairs the gradient checks prove
never round: a layer rounds only when its SparseConfig.precision says so.

Speed. The roundings give the same bits as precision.round_to and the
scaled casts of precision.py, which stay the readable specification; the
tests compare them bit for bit. The hot path is two small Numba loops:
round_kernel, one sweep rounding the float32 bit patterns with integer
arithmetic, and scaled_kernel, which takes a band of rows at a time, finds
its tile maxima, then divides by each tile's scale, saturates, rounds and
multiplies back while the band is still in the cache. Each has a NumPy
twin (round_twin, scaled_twin), used when Numba's JIT is disabled
(NUMBA_DISABLE_JIT=1) and in the tests; a twin makes several passes over
memory, which is what the kernels exist to avoid. The rounded operands of a
product land in reused buffers (Scratch). `step_time_ratios` measures what
the whole mode costs.

A non-finite entry is not an error here: fp16 overflow gives inf, and an fp8
tile (or tensor, or MX block) holding an inf or NaN comes back as NaN, so
the loss scaler's found_inf sees it and skips the step.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numba
import numpy as np
from numba import njit

from moe_np import precision

FP8 = ("fp8_e4m3", "fp8_e5m2")
TILE = 128          # DeepSeek-V3's 1 x 128 activation tiles and 128 x 128 weight blocks
MX_BLOCK = 32       # OCP MX: 32 elements share one power-of-two scale
CHUNK = 1 << 15     # entries per pass of round_twin: its few work arrays stay in a 1 MiB L2
USE_KERNELS = not numba.config.DISABLE_JIT   # compiled loops, or their NumPy twins


# ---------------------------------------------------------------- scratch buffers

class Scratch:
    """Buffers reused from one call to the next, one per name, grown on demand.

    A fresh NumPy array of several MiB costs page faults on its first touch,
    which on a busy machine can take longer than the rounding written into
    it. Each gemm_for(...) product owns one Scratch (a layer makes one per
    forward and its backward reuses it), so the rounded operands of every
    expert's products land in the same few buffers. A buffer handed out is
    valid until the next request for the same name.
    """

    def __init__(self):
        self.buffers: dict = {}

    def get(self, name: str, shape: tuple, dtype, like=None) -> np.ndarray:
        """An uninitialised array of shape and dtype; laid out like `like` (C order, or
        F order when like is F-contiguous, as a transposed C array is)."""
        size = int(np.prod(shape))
        buf = self.buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != np.dtype(dtype):
            buf = self.buffers[name] = np.empty(max(size, 1), dtype=dtype)
        flat = buf[:size]
        if like is not None and like.flags.f_contiguous and not like.flags.c_contiguous:
            return flat.reshape(shape[::-1]).T
        return flat.reshape(shape)


def _buffer(scratch, name: str, shape: tuple, dtype, like=None) -> np.ndarray:
    """scratch.get(name, shape, dtype, like), or a fresh array (laid out like `like`)."""
    if scratch is None:
        f_order = like is not None and like.flags.f_contiguous and not like.flags.c_contiguous
        return np.empty(shape, dtype=dtype, order="F" if f_order else "C")
    return scratch.get(name, shape, dtype, like)


# ---------------------------------------------------------------- rounding on the bit pattern

class Rounding(NamedTuple):
    """The integers and constants of one format that the rounding loops need."""
    drop: int             # float32 fraction bits the format lacks: 23 - m
    max_bits: int         # the float32 pattern of max_finite
    min_normal_bits: int  # the float32 pattern of min_normal
    sub_scale: float      # 1 / the subnormal step, 2**(m - emin)
    limit_bits: int       # what overflow becomes: inf (IEEE) or max_finite (E4M3 saturates)


def _rounding_of(info: precision.FormatInfo) -> Rounding:
    bits = lambda v: int(np.float32(v).view(np.uint32))
    limit = np.inf if info.overflow == "inf" else info.max_finite
    return Rounding(23 - info.mantissa_bits, bits(info.max_finite), bits(info.min_normal),
                    2.0 ** (info.mantissa_bits - info.emin), bits(limit))


ROUNDINGS = {name: _rounding_of(info) for name, info in precision.FORMATS.items()}


def rounding(fmt: str, fn: str = "rounding") -> Rounding:
    """The Rounding of format `fmt`; ValueError (naming fn) for an unknown name."""
    if not isinstance(fmt, str) or fmt not in ROUNDINGS:
        raise ValueError(f"{fn}: fmt must be one of {tuple(ROUNDINGS)}, got {fmt!r}")
    return ROUNDINGS[fmt]


@njit(cache=True)
def round_value(v, drop, max_bits, min_normal_bits, sub_scale, limit_bits):
    """v (a float32) rounded to the format, as a float32.

    Normal range: add 2**(drop-1) - 1 plus the last kept bit to |v|'s bit
    pattern and clear the `drop` low bits. The sum carries into the kept bits
    exactly when the dropped part exceeds half a step, or equals it and the
    kept part is odd (ties to even); a carry out of the fraction steps the
    exponent, and one past max_finite becomes limit_bits (inf, or E4M3's
    448, which is also where E4M3 sends inf). Zero takes this path too (it
    stays zero), so the branch below is rare and well predicted even when
    half the entries are ReLU zeros. Below min_normal the step is fixed:
    |v| * sub_scale is exact in float64, rint rounds it ties to even, and
    dividing back is exact. NaN is returned as it is.
    """
    b = np.float32(v).view(np.uint32)                   # the bit pattern, no memory involved
    a = b & 0x7FFFFFFF                                  # |v| as bits
    if a > 0x7F800000:                                  # NaN
        return np.float32(v)
    if ((a - 1) & 0xFFFFFFFF) < min_normal_bits - 1:   # 0 < |v| < min_normal: a fixed step
        return np.float32(math.copysign(np.rint(abs(np.float64(v)) * sub_scale) / sub_scale, v))
    r = (a + ((1 << (drop - 1)) - 1) + ((a >> drop) & 1)) & (0xFFFFFFFF ^ ((1 << drop) - 1))
    if r > max_bits:
        r = limit_bits
    return np.uint32((b & 0x80000000) | r).view(np.float32)


@njit(cache=True)
def round_kernel(x, out, drop, max_bits, min_normal_bits, sub_scale, limit_bits):
    """out[k] = x[k] rounded to the format, one sweep.   x, out: (S,) float32 (may be the same)."""
    for k in range(x.size):
        out[k] = round_value(x[k], drop, max_bits, min_normal_bits, sub_scale, limit_bits)


def round_twin(x, out, drop, max_bits, min_normal_bits, sub_scale, limit_bits) -> None:
    """round_kernel in NumPy passes, CHUNK entries at a time (so that the passes after the
    first read hit the cache).   x, out: (S,) float32 (may be the same)."""
    size = min(x.size, CHUNK)
    work = np.empty(size, dtype=np.uint32)                             # (C,) |x|, then the carry
    for start in range(0, x.size, CHUNK):
        xc, oc = x[start:start + CHUNK], out[start:start + CHUNK]      # (C,) each
        w = work[:xc.size]
        np.bitwise_and(xc.view(np.uint32), np.uint32(0x7FFFFFFF), out=w)
        special = (w > np.uint32(0x7F800000)) | (w < np.uint32(min_normal_bits))   # NaN, fixed step
        with np.errstate(invalid="ignore"):                            # a signalling NaN
            saved = xc[special].astype(np.float64)                     # (P,) kept: out may be x
        carry = (w >> np.uint32(drop)) & np.uint32(1)                  # (C,) the last kept bit
        r = (w + np.uint32((1 << (drop - 1)) - 1) + carry) & np.uint32(0xFFFFFFFF ^ ((1 << drop) - 1))
        r[r > np.uint32(max_bits)] = limit_bits                        # (C,) overflow
        oc.view(np.uint32)[...] = (xc.view(np.uint32) & np.uint32(0x80000000)) | r
        fixed = np.copysign(np.rint(np.abs(saved) * sub_scale) / sub_scale, saved)   # (P,)
        oc[special] = np.where(np.isnan(saved), saved, fixed)


def round_fast(x: np.ndarray, fmt: str, out: np.ndarray | None = None) -> np.ndarray:
    """precision.round_to(x, fmt), bit for bit, in one sweep.   float32, any shape -> same shape.

    out: where to write (x itself is allowed). The sweep follows memory
    order whether x is C- or F-contiguous (anything else is copied first).
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise ValueError(f"round_fast: x must be a float32 array, got {getattr(x, 'dtype', type(x))}")
    params = rounding(fmt, "round_fast")
    order = "F" if x.flags.f_contiguous and not x.flags.c_contiguous else "C"
    result = np.empty(x.shape, np.float32, order=order) if out is None else out
    in_order = result.flags.f_contiguous if order == "F" else result.flags.c_contiguous
    target = result if in_order else np.empty(x.shape, np.float32, order=order)
    run = round_kernel if USE_KERNELS else round_twin
    run(x.ravel(order=order), target.ravel(order=order), *params)     # (S,) views in memory order
    if target is not result:
        result[...] = target
    return result


# ---------------------------------------------------------------- fp8 scaling

class Scaling(NamedTuple):
    """How one fp8 operand is scaled: one scale per rows x cols tile."""
    rows: int
    cols: int
    power_of_two: bool    # MX's E8M0 scales, else amax / max_finite
    qmax: float           # max_finite of the format
    emax: int             # its largest exponent (MX puts amax in that binade)


@njit(cache=True)
def tile_scale(amax, sc):
    """One tile's scale from its amax, as precision.amax_scale / precision.mx_scale compute it;
    NaN for a tile holding inf or NaN (the whole tile is then lost)."""
    if amax != amax or amax == np.inf:
        return np.float32(np.nan)
    if amax == 0:
        return np.float32(1.0)
    if sc.power_of_two:
        exponent = min(max(math.frexp(np.float64(amax))[1] - 1 - sc.emax, -127), 127)
        return np.float32(2.0 ** exponent)
    s = amax / np.float32(sc.qmax)                      # float32 division, as amax_scale
    return s if s >= np.float32(2.0**-149) else np.float32(2.0**-149)


@njit(cache=True)
def band_maxima(x, i0, i1, cols, amax):
    """amax[t] = max(amax[t], |x[i, j]|) over rows i0:i1 and tile t's columns; a NaN stays.
    x: (N, D); amax: (T,). A tile one column wide gets a loop of its own (no inner loop)."""
    d = x.shape[1]
    for i in range(i0, i1):
        if cols == 1:
            for j in range(d):
                a = abs(x[i, j])
                if a > amax[j] or a != a:
                    amax[j] = a
            continue
        for t in range(amax.size):
            best = amax[t]
            for j in range(t * cols, min(t * cols + cols, d)):
                a = abs(x[i, j])
                if a > best or a != a:
                    best = a
            amax[t] = best


@njit(cache=True)
def scaled_kernel(x, sc, out, drop, max_bits, min_normal_bits, sub_scale, limit_bits):
    """out = round(clip(x / s, +-qmax)) * s in float32, s = tile_scale(amax of the tile).

    x: (N, D) C-contiguous; out: (N, D) (may be x). One band of sc.rows rows
    at a time: its tile maxima in one sweep, then the rounding in a second
    sweep while the band is still in the cache. A trailing partial tile uses
    its own entries only.
    """
    n, d = x.shape
    tile_of = np.arange(d) // sc.cols                   # (D,) each column's tile
    limit = np.float32(sc.qmax)
    scale = np.empty(tile_of[-1] + 1, dtype=np.float32)   # (T,) a band's tile maxima, then scales
    for band in range(-(-n // sc.rows)):
        i0, i1 = band * sc.rows, min(band * sc.rows + sc.rows, n)
        scale[:] = 0.0
        band_maxima(x, i0, i1, sc.cols, scale)
        for t in range(scale.size):
            scale[t] = tile_scale(scale[t], sc)
        for i in range(i0, i1):
            for j in range(d):
                s = scale[tile_of[j]]
                q = x[i, j] / s
                if q > limit:                           # a scaled cast saturates; NaN passes
                    q = limit
                elif q < -limit:
                    q = -limit
                out[i, j] = s * round_value(q, drop, max_bits, min_normal_bits, sub_scale, limit_bits)


def scaled_twin(x, sc: Scaling, out, fmt: str) -> None:
    """scaled_kernel in NumPy passes over x zero-padded to whole tiles (zeros change no max)."""
    n, d = x.shape
    r, t = -(-n // sc.rows), -(-d // sc.cols)
    v = np.zeros((r * sc.rows, t * sc.cols), dtype=np.float32)        # (R*rows, T*cols)
    v[:n, :d] = x
    v = v.reshape(r, sc.rows, t, sc.cols)                              # (R, rows, T, cols)
    amax = np.maximum(v.max(axis=(1, 3)), -v.min(axis=(1, 3)))         # (R, T); NaN propagates
    finite = np.isfinite(amax)                                         # (R, T)
    scale_of = precision.mx_scale if sc.power_of_two else precision.amax_scale
    s = np.where(finite, scale_of(np.where(finite, amax, 0), fmt), np.nan).astype(np.float32)
    s4 = s[:, None, :, None]                                           # (R, 1, T, 1)
    with np.errstate(invalid="ignore"):
        q = np.clip(v / s4, -sc.qmax, sc.qmax)                         # (R, rows, T, cols)
        flat = q.reshape(-1)                                           # (S,) a view
        round_twin(flat, flat, *rounding(fmt))
        q *= s4
    out[...] = q.reshape(r * sc.rows, t * sc.cols)[:n, :d]


def scaled_round(x: np.ndarray, fmt: str, rows: int, cols: int, power_of_two: bool = False,
                 scratch: Scratch | None = None, name: str = "q") -> np.ndarray:
    """x_hat = round(x / s) * s with one scale s per rows x cols tile of x (N, D) -> (N, D).

    s = amax / max_finite (precision.amax_scale), or MX's power of two
    (precision.mx_scale); a trailing partial tile has its own scale. Same bits
    as precision's quantize_tiles / quantize_blocks / quantize + dequantize
    (rows, cols = (1, 128), (128, 128), (N, D)) and quantize_mx ((1, 32)).
    A tile holding inf or NaN comes back all NaN (those functions refuse it).
    With a scratch the result lives in its buffer `name`.
    """
    if fmt not in FP8:
        raise ValueError(f"scaled_round: fmt must be one of {FP8}, got {fmt!r}")
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        raise ValueError(f"scaled_round: x must be a 2-D float32 array, got "
                         f"{getattr(x, 'dtype', type(x))} of shape {np.shape(x)}")
    if not all(isinstance(v, (int, np.integer)) and v >= 1 for v in (rows, cols)):
        raise ValueError(f"scaled_round: rows and cols must be integers >= 1, got {rows!r}, {cols!r}")
    if x.flags.f_contiguous and not x.flags.c_contiguous:            # a transposed array:
        return scaled_round(x.T, fmt, cols, rows, power_of_two, scratch, name).T   # same tiles
    if x.size == 0:
        return np.zeros(x.shape, np.float32)
    info = precision.FORMATS[fmt]
    sc = Scaling(int(rows), int(cols), bool(power_of_two), float(info.max_finite), int(info.emax))
    out = _buffer(scratch, name, x.shape, np.float32)                  # (N, D)
    if USE_KERNELS:
        scaled_kernel(np.ascontiguousarray(x), sc, out, *rounding(fmt))
    else:
        scaled_twin(x, sc, out, fmt)
    return out


def _fp8_operand(x, fmt: str, scaling: str, left: bool, scratch, name: str):
    """An fp8 operand, scaled, rounded and scaled back.   (rows, inner) or (inner, cols)."""
    if scaling == "tensor":
        rows, cols, pow2 = x.shape[0], x.shape[1], False
    elif scaling == "mx":
        rows, cols, pow2 = (1, MX_BLOCK, True) if left else (MX_BLOCK, 1, True)   # along the inner dim
    else:
        rows, cols, pow2 = (1, TILE, False) if left else (TILE, TILE, False)
    return scaled_round(x, fmt, rows, cols, pow2, scratch, name)


# ---------------------------------------------------------------- the named steps

def round_operand(x, config, left: bool = True, scratch: Scratch | None = None):
    """One operand of a product in config.compute (a PrecisionConfig), as float32 values.
    left: the (rows, inner) operand; else the (inner, cols) one (fp8 scaling differs).
    With a scratch the result lives in its buffer "a" (left) or "b" (right)."""
    fmt = config.compute
    if fmt == "fp32":
        return x
    name = "a" if left else "b"
    if fmt in FP8:
        return _fp8_operand(x, fmt, config.fp8_scaling, left, scratch, name)
    return round_fast(x, fmt, out=None if scratch is None else scratch.get(name, x.shape, np.float32, x))


def round_output(c, config, out=None):
    """A product's output: fp16 / bf16 in their format; fp8 products written as bf16.
    out: where to write (c itself is allowed); with fp32, c is returned untouched."""
    fmt = config.compute
    if fmt == "fp32":
        return c
    return round_fast(c, "bf16" if fmt in FP8 else fmt, out=out)


def gemm_for(config):
    """gemm(a, b, out=None): round the operands, multiply in float32, round the output in
    place. With config.compute "fp32" it is np.matmul itself. Each gemm owns a Scratch:
    the rounded operands live there until its next call."""
    if config.compute == "fp32":
        return np.matmul
    scratch = Scratch()

    def gemm(a, b, out=None):
        a_low = round_operand(a, config, True, scratch)                # (rows, inner)
        b_low = round_operand(b, config, False, scratch)               # (inner, cols)
        c = np.matmul(a_low, b_low, out=out)                           # (rows, cols), float32 sums
        return round_output(c, config, out=c)                          # rounded where it lies
    return gemm


# ---------------------------------------------------------------- what it costs

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
    "fp8_e4m3" (lowp cannot build a SparseMoE itself: sparse.py imports lowp).
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
    runs = {name: (make_layer(compute), None if init is None else
                   precision.LossScaler(init_scale=init, dynamic=False))
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
