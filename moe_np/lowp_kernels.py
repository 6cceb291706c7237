"""The compiled loops of the low-precision compute mode (lowp.py): Numba kernels.

    round_value    one float32 rounded to a format on its bit pattern
    round_kernel   round_value over a flat array, in vectorized spans (bf16: one sweep)
    half_kernel    fp16 by the processor's own float32 -> float16 -> float32 conversion,
                   where native_half and half_agrees say it may be used (lowp.HALF)
    tile_scale     one fp8 tile's scale from its amax
    band_maxima    the tile maxima of a band of rows
    scaled_kernel  scale, saturate, round and scale back, one band of rows at a time

lowp.py imports this module on its first rounding, never at `import moe_np`,
and each kernel has a NumPy twin there (round_twin, scaled_twin) giving the
same bits; the twins run without numba or with NUMBA_DISABLE_JIT=1. The
integers a kernel takes are lowp.Rounding's fields; `sc` is a lowp.Scaling.
The sweeps run on the calling thread: they sit between two GEMMs, and a
second team of threads there fights OpenBLAS's (which wait spinning for the
next GEMM) for the cores; measured on 2 cores, a parallel version made the
fp16 step 0.76 -> 1.2 s. They compile with error_model="numpy" (IEEE
division, as in NumPy): Python's model tests every divisor for zero.
"""
from __future__ import annotations

import math
import platform

import numba
import numpy as np
from llvmlite import binding, ir
from numba import njit, types
from numba.extending import intrinsic

JIT = not numba.config.DISABLE_JIT   # False: the kernels would run as slow Python; use the twins


@njit(cache=True, error_model="numpy")
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
    if a != 0 and a < min_normal_bits:                  # 0 < |v| < min_normal: a fixed step
        return np.float32(math.copysign(np.rint(abs(np.float64(v)) * sub_scale) / sub_scale, v))
    r = (a + ((1 << (drop - 1)) - 1) + ((a >> drop) & 1)) & (0xFFFFFFFF ^ ((1 << drop) - 1))
    if r > max_bits:
        r = limit_bits
    return np.uint32((b & 0x80000000) | r).view(np.float32)


SPAN = 1024   # entries round_kernel takes at a time: a span's second and third reads hit L1


@njit(cache=True, error_model="numpy", inline="always")
def _bit_constants(drop, max_bits, limit_bits, min_normal_bits):
    """The uint32 constants _normal_bits and _is_small take, from lowp.Rounding's integers:
    (keep: the kept bits' mask, half: 2**(drop-1) - 1, shift: drop, top: max_bits,
    limit: limit_bits, low: min_normal_bits)."""
    u = np.uint32
    return (u(0xFFFFFFFF ^ ((1 << drop) - 1)), u((1 << (drop - 1)) - 1), u(drop), u(max_bits),
            u(limit_bits), u(min_normal_bits))


@njit(cache=True, error_model="numpy")
def round_kernel(x, out, drop, max_bits, min_normal_bits, sub_scale, limit_bits):
    """out[k] = round_value(x[k], ...) for every k.   x, out: (S,) float32, the same array
    or not overlapping at all (lowp.round_fast copies x when they overlap otherwise).

    One SPAN at a time: count the entries with 0 < |v| < min_normal, then
    sweep the span with round_value's normal-range path alone (_normal_bits:
    no branch, so the loop vectorizes), and send the counted entries through
    round_value itself. Writing in place, those are rounded first: the sweep
    leaves a value on the format's grid as it is. A span made mostly of such
    entries (fp16 or fp8 values that underflow) goes entry by entry.

    A format with float32's exponent range (bf16) needs no second look: its
    smallest normal is float32's, and below it both are fixed-point on the
    same bits, so the sweep's integer rounding is already round_value's.
    """
    keep, half, shift, top, limit, low = _bit_constants(drop, max_bits, limit_bits, min_normal_bits)
    in_place = x.ctypes.data == out.ctypes.data
    if low <= FP32_MIN_NORMAL_BITS:                                # bf16: one sweep is exact
        _sweep(x, out, in_place, keep, half, shift, top, limit)
        return
    for lo in range(0, x.size, SPAN):
        xs, ys = x[lo:lo + SPAN], out[lo:lo + SPAN]                # (s,) float32 each
        xb, yb = xs.view(np.uint32), ys.view(np.uint32)            # (s,) their bit patterns
        if not in_place:                                           # separate arrays: one loop
            for k in range(xb.size):
                yb[k] = _normal_bits(xb[k], keep, half, shift, top, limit)
        count = _count_small(xb, low)                              # read again, from L1
        if count * 16 > xs.size:                                   # mostly small: one by one
            for k in range(xs.size):
                ys[k] = round_value(xs[k], drop, max_bits, min_normal_bits, sub_scale, limit_bits)
            continue
        for k in range(xs.size if count else 0):                  # the few small entries
            if _is_small(xb[k], low):
                ys[k] = round_value(xs[k], drop, max_bits, min_normal_bits, sub_scale, limit_bits)
        if in_place:                                               # one array: its own loop
            for k in range(yb.size):
                yb[k] = _normal_bits(yb[k], keep, half, shift, top, limit)


FP32_MIN_NORMAL_BITS = 0x00800000   # the float32 pattern of 2**-126


@njit(cache=True, error_model="numpy")
def _sweep(x, out, in_place, keep, half, shift, top, limit):
    """out = _normal_bits of every entry of x, in one vectorized pass.   x, out: (S,) float32,
    the same array (in_place: one array in the loop, so no overlap check keeps it scalar) or
    not overlapping at all."""
    yb = out.view(np.uint32)                                       # (S,) out's bit patterns
    if in_place:
        for k in range(yb.size):
            yb[k] = _normal_bits(yb[k], keep, half, shift, top, limit)
        return
    xb = x.view(np.uint32)                                         # (S,) x's bit patterns
    for k in range(xb.size):
        yb[k] = _normal_bits(xb[k], keep, half, shift, top, limit)


@intrinsic
def _through_half(typingctx, v):
    """float32 -> IEEE half -> float32 as LLVM's fptrunc / fpext: the processor's own
    conversion (F16C's vcvtps2ph or its AVX-512 form on x86-64, fcvt on arm64), rounding
    to nearest even with fp16's subnormals and overflow to inf. It rounds in the thread's
    current rounding mode, which Python and NumPy leave at nearest-even. Where the target
    lacks the instructions LLVM calls a runtime function instead, which this process may
    not have (a crash, not an error): native_half guards every use."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.float32), codegen


def native_half() -> bool:
    """Whether numba's compile target converts float32 <-> half in instructions: arm64
    always; x86-64 with F16C, on the host (the default) or in NUMBA_CPU_FEATURES; else
    False (NUMBA_CPU_NAME=generic, another machine), and the integer kernel rounds fp16."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine not in ("x86_64", "amd64"):
        return False
    if numba.config.CPU_FEATURES:
        return "+f16c" in numba.config.CPU_FEATURES.split(",")
    if numba.config.CPU_NAME not in (None, "host"):
        return False
    return bool(binding.get_host_cpu_features().get("f16c", False))


@njit(cache=True, error_model="numpy")
def half_kernel(x, out):
    """out[k] = x[k] rounded to fp16, by the conversion instructions.   x, out: (S,) float32,
    the same array or not overlapping at all. The same bits as round_kernel for fp16 (a NaN
    stays a NaN, its payload may change); half_agrees checks that this machine's conversion does."""
    if x.ctypes.data == out.ctypes.data:
        for k in range(out.size):
            out[k] = _through_half(out[k])
        return
    for k in range(x.size):
        out[k] = _through_half(x[k])


@njit(cache=True, error_model="numpy")
def _count_small(bits, low):
    """How many patterns have 0 < |v| < min_normal (low = min_normal_bits).   bits: (s,)."""
    n = 0
    for k in range(bits.size):
        n += _is_small(bits[k], low)
    return n


@njit(cache=True, error_model="numpy", inline="always")
def _is_small(b, low):
    """0 < |v| < min_normal for the pattern b (low = min_normal_bits), with no branch."""
    a = b & np.uint32(0x7FFFFFFF)
    return (a != np.uint32(0)) & (a < low)


@njit(cache=True, error_model="numpy", inline="always")
def _normal_bits(b, keep, half, shift, top, limit):
    """round_value's normal-range path on one pattern b, with no branch: a NaN is kept, and a
    value already on the grid (a rounded subnormal among them) comes back unchanged."""
    a = b & np.uint32(0x7FFFFFFF)
    r = (a + half + ((a >> shift) & np.uint32(1))) & keep
    r = limit if r > top else r
    return (b & np.uint32(0x80000000)) | (a if a > np.uint32(0x7F800000) else r)


@njit(cache=True, error_model="numpy")
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


@njit(cache=True, error_model="numpy")
def band_maxima(x, i0, i1, cols, amax):
    """amax[t] = max(amax[t], |x[i, j]|) over rows i0:i1 and tile t's columns; a NaN stays.
    x: (N, D); amax: (T,) float32. Compared as bit patterns with the sign cleared: there the
    integer order is the float order, and every NaN's pattern lies above inf's, so a NaN
    stays (as a NaN) and the loops vectorize. A tile one column wide gets a loop of its own."""
    d = x.shape[1]
    bits, top = x.view(np.uint32), amax.view(np.uint32)     # (N, D), (T,) the same memory
    low = np.uint32(0x7FFFFFFF)
    for i in range(i0, i1):
        if cols == 1:
            for j in range(d):
                top[j] = max(top[j], bits[i, j] & low)
            continue
        for t in range(top.size):
            best = top[t]
            for j in range(t * cols, min(t * cols + cols, d)):
                best = max(best, bits[i, j] & low)
            top[t] = best


@njit(cache=True, error_model="numpy")
def scaled_kernel(x, sc, out, drop, max_bits, min_normal_bits, sub_scale, limit_bits):
    """out = round(clip(x / s, +-qmax)) * s in float32, s = tile_scale(amax of the tile).

    x: (N, D) C-contiguous; out: (N, D), not x's memory. One band of sc.rows
    rows at a time: its tile maxima in one sweep, then the rounding in a
    second sweep while the band is still in the cache. A trailing partial
    tile uses its own entries only.
    """
    n, d = x.shape
    scale = np.empty(-(-d // sc.cols), dtype=np.float32)   # (T,) a band's maxima, then scales
    columns = np.empty(d, dtype=np.float32)                # (D,) each column's scale in the band
    limit, sub, step = np.float32(sc.qmax), np.float32(sub_scale), np.float32(1 / sub_scale)
    for band in range(-(-n // sc.rows)):
        i0, i1 = band * sc.rows, min(band * sc.rows + sc.rows, n)
        scale[:] = 0.0
        band_maxima(x, i0, i1, sc.cols, scale)
        for t in range(scale.size):
            columns[t * sc.cols:(t + 1) * sc.cols] = tile_scale(scale[t], sc)
        for i in range(i0, i1):
            _scaled_row(x[i], columns, out[i], limit, drop, max_bits, min_normal_bits, sub,
                        step, limit_bits)


@njit(cache=True, error_model="numpy")
def _scaled_row(xr, columns, row, limit, drop, max_bits, min_normal_bits, sub, step, limit_bits):
    """row[j] = columns[j] round(clip(xr[j] / columns[j], +-limit)), with no branch, so the
    loop vectorizes: every q takes round_value's normal-range path (_normal_bits) and its
    fixed-step path in float32, rint(q sub) step (sub = 1 / step = 2**9 for E4M3, 2**16 for
    E5M2: both products are exact), and keeps the one its size calls for. A NaN
    stays a NaN either way. xr, columns, row: (D,)."""
    keep, half, shift, top, cap, low = _bit_constants(drop, max_bits, limit_bits, min_normal_bits)
    for j in range(xr.size):
        s = columns[j]
        q = xr[j] / s
        q = limit if q > limit else (-limit if q < -limit else q)   # saturate; NaN passes
        b = np.float32(q).view(np.uint32)
        fixed = np.float32(np.rint(q * sub) * step)                # 0 < |q| < min_normal
        normal = np.uint32(_normal_bits(b, keep, half, shift, top, cap)).view(np.float32)
        row[j] = s * (fixed if _is_small(b, low) else normal)


def half_probe() -> np.ndarray:
    """float32 values at fp16's rounding boundaries.   -> (P,) float32.

    For each float32 exponent from 2**-25 to 2**16 (fp16's range and one binade either side)
    and each of the 2**10 leading fraction patterns fp16 keeps there: the value, its
    neighbours, both sides of the tie above it, and the tie with each one of the dropped
    bits below it set (a conversion that ignored one of them would round such a value
    down). The ties and near-ties of fp16's subnormal steps, where the grid is coarser.
    Four patterns of every exponent (zero, float32 subnormals, far overflow, inf and
    NaN). Both signs. It shows the conversion right where rounding decides; it is not
    every float32 (all 2**32 were compared once, off line, on the machine the chapters
    ran on)."""
    u = np.uint32
    exps = np.arange(102, 144, dtype=u)[:, None] << u(23)             # (42, 1) exponent fields
    top = (exps | (np.arange(1 << 10, dtype=u) << u(13))).ravel()      # (42 * 2**10,) on the grid
    low = np.array([0, 1, 0xFFF, 0x1000, 0x1FFF] + [0x1000 | 1 << i for i in range(12)],
                   dtype=u)                                            # offsets from a grid value
    grid = (top[:, None] | low[None, :]).ravel()                       # (42 * 2**10 * 17,)
    every = ((np.arange(256, dtype=u)[:, None] << u(23))
             | np.array([0, 1, 0x400000, 0x7FFFFF], dtype=u)).ravel()  # (1024,) every exponent
    steps = np.arange(1025, dtype=np.float64) * 2.0**-24               # fp16's subnormal steps
    near = np.concatenate([steps, steps + 2.0**-25]).astype(np.float32)   # (2050,) and ties
    near = np.concatenate([near, np.nextafter(near, np.float32(1)), np.nextafter(near, np.float32(0))])
    tie = np.float32([65520.0, 65519.996])                             # (2,) fp16's overflow tie
    values = np.concatenate([grid.view(np.float32), every.view(np.float32), near, tie])   # (P / 2,)
    return np.concatenate([values, -values])                           # (P,) both signs


def half_agrees(fp16) -> bool:
    """Whether half_kernel gives round_kernel's bits on half_probe (NaN for NaN).
    fp16: lowp.Rounding of fp16. lowp asks once, on loading these kernels."""
    x = half_probe()                                                  # (P,)
    want, got = np.empty_like(x), np.empty_like(x)                    # (P,) each
    round_kernel(x, want, *fp16)
    half_kernel(x, got)
    nan = np.isnan(want)                                              # (P,)
    return bool(np.array_equal(nan, np.isnan(got))
                and np.array_equal(want.view(np.uint32)[~nan], got.view(np.uint32)[~nan]))
