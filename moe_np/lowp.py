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
tests compare them bit for bit. The hot path is small Numba loops in
lowp_kernels.py: round_kernel, which rounds the float32 bit patterns with
integer arithmetic in vectorized spans, and scaled_kernel, which takes a band
of rows at a time, finds its tile maxima, then divides by each tile's scale,
saturates, rounds and multiplies back while the band is still in the cache.
fp16 goes through the processor's own float32 -> float16 -> float32
conversion instead (half_kernel, two to three times faster), where numba's
target converts in instructions and a probe of fp16's rounding boundaries
has shown that it gives round_kernel's bits (lowp.HALF). Each has a
NumPy twin here (round_twin, scaled_twin), used when numba is absent or its
JIT disabled (NUMBA_DISABLE_JIT=1) and in the tests; a twin makes several
passes over memory, which is what the kernels exist to avoid. numba is
loaded on the first rounding (`kernels()`), never by `import moe_np`. The
rounded operands of a product land in reused buffers (Scratch). In fp16 and
bf16 an operand that two products share is rounded once (`once`): the
rounding is elementwise and leaves a rounded value as it is, so the bits are
those of rounding it at each product.
`bench.step_time_ratios` measures what the whole mode costs.

A non-finite entry is not an error here: fp16 overflow gives inf, and an fp8
tile (or tensor, or MX block) holding an inf or NaN comes back as NaN, so
the loss scaler's found_inf sees it and skips the step.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from moe_np import compiled, precision

FP8 = ("fp8_e4m3", "fp8_e5m2")
TILE = 128          # DeepSeek-V3's 1 x 128 activation tiles and 128 x 128 weight blocks
MX_BLOCK = 32       # OCP MX: 32 elements share one power-of-two scale
CHUNK = 1 << 15     # entries per pass of round_twin: its few work arrays stay in a 1 MiB L2
USE_KERNELS = None  # True: compiled loops; False: their NumPy twins; None: decided on first use
HALF = None         # fp16 by the processor's conversion (half_kernel): decided on loading them


def kernels():
    """The compiled loops (moe_np.lowp_kernels), or None when the NumPy twins run.

    Numba is imported here, on the first rounding, so `import moe_np` and a
    float32 layer never load it. Without numba, or with NUMBA_DISABLE_JIT=1,
    USE_KERNELS becomes False and the twins give the same bits, more slowly.
    The first call also settles HALF (fp16 by the conversion instructions):
    loading half_kernel and running its probe costs a few tenths of a second.
    """
    global USE_KERNELS, HALF
    if USE_KERNELS is None:                  # None without numba or with its JIT disabled
        USE_KERNELS = compiled.load("lowp_kernels") is not None
    if not USE_KERNELS:
        return None
    from moe_np import lowp_kernels
    if HALF is None:
        HALF = lowp_kernels.JIT and lowp_kernels.native_half() \
            and lowp_kernels.half_agrees(ROUNDINGS["fp16"])
    return lowp_kernels


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
    """precision.round_to(x, fmt), bit for bit, in one pass.   float32, any shape -> same shape.

    out: where to write (x itself is allowed; an out overlapping x otherwise
    gets a copy of x first). The pass follows memory order whether x is C- or
    F-contiguous (anything else is copied first). A NaN stays a NaN (its
    payload may change: the integer kernel keeps it, the conversion and
    round_to may quiet it).
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise ValueError(f"round_fast: x must be a float32 array, got {getattr(x, 'dtype', type(x))}")
    if out is not None and (not isinstance(out, np.ndarray) or out.dtype != np.float32
                            or out.shape != x.shape):
        raise ValueError(f"round_fast: out must be a float32 array of x's shape {x.shape}, got "
                         f"{getattr(out, 'dtype', type(out))} {np.shape(out)}")
    params = rounding(fmt, "round_fast")
    order = "F" if x.flags.f_contiguous and not x.flags.c_contiguous else "C"
    result = np.empty(x.shape, np.float32, order=order) if out is None else out
    in_order = result.flags.f_contiguous if order == "F" else result.flags.c_contiguous
    target = result if in_order else np.empty(x.shape, np.float32, order=order)
    compiled = kernels()
    source, dest = x.ravel(order=order), target.ravel(order=order)     # (S,) views in memory order
    if np.may_share_memory(source, dest) and source.ctypes.data != dest.ctypes.data:
        source = source.copy()                                         # shifted overlap: keep x apart
    if compiled is None:
        round_twin(source, dest, *params)
    elif fmt == "fp16" and HALF:
        compiled.half_kernel(source, dest)                             # the conversion instructions
    else:
        compiled.round_kernel(source, dest, *params)
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
    compiled = kernels()
    if compiled is None:
        scaled_twin(x, sc, out, fmt)
    else:
        source = np.ascontiguousarray(x)                               # (N, D)
        if np.may_share_memory(source, out):                           # a shifted out would be read
            source = source.copy()                                     # after written: keep them apart
        compiled.scaled_kernel(source, sc, out, *rounding(fmt))
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

class Rounded:
    """An operand already rounded to a 16-bit format (from `once`): a gemm_for product in that
    format takes it as it is. Not an array: np.matmul refuses it."""
    __slots__ = ("array", "fmt")

    def __init__(self, array: np.ndarray, fmt: str):
        self.array, self.fmt = array, fmt                              # any shape, float32

    @property
    def T(self) -> "Rounded":
        return Rounded(self.array.T, self.fmt)


GEMM_BUFFERS = ("a", "b", "q")   # the scratch names gemm_for's own roundings use


def once(gemm, x, name: str, out=None):
    """x rounded once for several products of `gemm`: Rounded(x in the format) when gemm is a
    gemm_for product in fp16 or bf16, whose rounding is elementwise (the same on either side
    of a product) and leaves a rounded value as it is, so the products give the bits of
    rounding x at each; x itself for np.matmul and for fp8, whose scaling depends on the side.
    The result lives in gemm's scratch buffer `name` (valid until the next `once` of that
    name), or in out (x itself allowed)."""
    if name in GEMM_BUFFERS:
        raise ValueError(f"once: name must not be one of gemm's own buffers {GEMM_BUFFERS}, got {name!r}")
    fmt = getattr(gemm, "compute", "fp32")
    if fmt == "fp32" or fmt in FP8:
        return x
    target = gemm.scratch.get(name, x.shape, np.float32, x) if out is None else out   # x's shape
    return Rounded(round_fast(x, fmt, out=target), fmt)


def round_operand(x, config, left: bool = True, scratch: Scratch | None = None):
    """One operand of a product in config.compute (a PrecisionConfig), as float32 values.
    left: the (rows, inner) operand; else the (inner, cols) one (fp8 scaling differs).
    With a scratch the result lives in its buffer "a" (left) or "b" (right). A Rounded
    operand (from `once`) is taken as it is."""
    fmt = config.compute
    if isinstance(x, Rounded):
        if x.fmt != fmt:
            raise ValueError(f"round_operand: a Rounded operand in {x.fmt!r} given to a {fmt!r} product")
        return x.array
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
    the rounded operands live there until its next call (an operand several products share
    can be rounded once, with `once`)."""
    if config.compute == "fp32":
        return np.matmul
    scratch = Scratch()

    def gemm(a, b, out=None):
        a_low = round_operand(a, config, True, scratch)                # (rows, inner)
        b_low = round_operand(b, config, False, scratch)               # (inner, cols)
        c = np.matmul(a_low, b_low, out=out)                           # (rows, cols), float32 sums
        return round_output(c, config, out=c)                          # rounded where it lies
    gemm.compute, gemm.scratch = config.compute, scratch               # for `once`
    return gemm
