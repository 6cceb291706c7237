"""Precision: low-precision number formats and fp8 scaling, simulated in NumPy.

Nothing here runs in 16 or 8 bits. Every array stays float32 and holds only
values the named format can represent, so a reader can see each rounding:

    round_to(x, fmt)      the nearest fmt value (ties to even), or a stochastic neighbour
    quantize / tiles / blocks / mx    how fp8 recipes pick scales
    lp_matmul             fmt inputs, float32 accumulation (optionally a limited accumulator)
    int8 per channel      symmetric int8 weights and per-token activations

Every function here is stateless. What a training run carries from one step
to the next (LossScaler, DelayedScaling's amax history, MasterWeights) is in
scaling.py.

Shapes: the elementwise functions take any shape, written "same shape as x".
Matrices are x: (N, D) rows of tokens; a matmul is a: (N, K) @ b: (K, M).
A 2-D array cut into r x c tiles has R = ceil(N / r) by T = ceil(D / c) scales.
Every scale divides: q = round(x / scale), x_hat = q * scale.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = np.float32(2.0**-149)       # smallest positive float32 (a subnormal)
INT8_MAX = 127                             # symmetric int8: -127..127, -128 unused


class FormatInfo(NamedTuple):
    """The facts of one binary floating-point format."""
    name: str
    exponent_bits: int
    mantissa_bits: int       # stored fraction bits m; a significand has m + 1 bits
    emin: int                # exponent of the smallest normal, 1 - bias
    emax: int                # exponent of the largest finite value
    max_finite: float
    min_normal: float        # 2**emin
    min_subnormal: float     # 2**(emin - m), the quantum of the whole subnormal range
    eps: float               # 2**-m, the gap between 1 and the next value
    overflow: str            # "inf" (IEEE) or "saturate" (E4M3 has no inf)


def _format(name, exponent_bits, mantissa_bits, emax, max_finite, overflow) -> FormatInfo:
    emin = 2 - 2 ** (exponent_bits - 1)
    return FormatInfo(name, exponent_bits, mantissa_bits, emin, emax, max_finite, 2.0**emin,
                      2.0 ** (emin - mantissa_bits), 2.0**-mantissa_bits, overflow)


# E4M3 (the "fn" variant of the OCP fp8 spec) spends the all-ones exponent on normal values
# except S.1111.111 = NaN, so its largest value is 1.75 * 2**8 = 448 and it has no inf.
FORMATS = {
    "fp16": _format("fp16", 5, 10, 15, 65504.0, "inf"),
    "bf16": _format("bf16", 8, 7, 127, (2.0 - 2.0**-7) * 2.0**127, "inf"),
    "fp8_e4m3": _format("fp8_e4m3", 4, 3, 8, 448.0, "saturate"),
    "fp8_e5m2": _format("fp8_e5m2", 5, 2, 15, 57344.0, "inf"),
}


# ---------------------------------------------------------------- argument checks

def _check_fmt(fn: str, fmt) -> FormatInfo:
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"{fn}: fmt must be one of {tuple(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def _check_f32(fn: str, name: str, x) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        got = f"dtype {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{fn}: {name} must be a float32 array, got {got}")


def _check_2d(fn: str, name: str, x) -> None:
    _check_f32(fn, name, x)
    if x.ndim != 2:
        raise ValueError(f"{fn}: {name} must be 2-D, got shape {x.shape}")


def _check_scale(fn: str, name: str, scale) -> None:
    """Every entry positive and finite (a number or an array of scales)."""
    try:
        s = np.asarray(scale, dtype=np.float64)                      # scalar or (R, T)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: {name} must be a positive finite number, got {scale!r}") from None
    bad = ~(np.isfinite(s) & (s > 0))                                # same shape as s
    if bad.any():
        raise ValueError(f"{fn}: {name} must be positive and finite, got {s[bad][0]}")


def _check_int(fn: str, name: str, value, low: int, high: int | None = None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{fn}: {name} must be an integer {span}, got {value!r}")


def _check_rng(fn: str, rng) -> None:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"{fn}: rng must be a numpy Generator, got {type(rng).__name__}")


# ---------------------------------------------------------------- rounding

def round_to(x: np.ndarray, fmt: str, *, rng: np.random.Generator | None = None) -> np.ndarray:
    """y = the fmt value nearest x, ties to even (or, with rng, a stochastic neighbour).

    x: float32, any shape -> float32, same shape, every entry a value of fmt.
    Subnormals round with gradual underflow; NaN stays NaN. Overflow: fp16,
    bf16 and fp8_e5m2 follow IEEE (a value that rounds past max_finite
    becomes +-inf, inf stays inf); fp8_e4m3 has no inf, so every finite
    value beyond 448 saturates to +-448, like the saturating fp8 casts of
    Transformer Engine. inf also maps to +-448: a choice made here (E4M3
    cannot hold it, and the alternative is NaN). Check for overflow
    (found_inf) before an E4M3 cast if you need to see it.
    With rng the rounding is stochastic and unbiased: E[y] = x.
    """
    info = _check_fmt("round_to", fmt)
    _check_f32("round_to", "x", x)
    if rng is not None:
        _check_rng("round_to", rng)
        if fmt == "bf16":
            return stochastic_round_bf16(x, rng)
    elif fmt == "bf16":
        return _round_bf16(x)
    return _apply_overflow(_round_by_quantum(x, info, rng), info)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """bf16 is the top 16 bits of a float32: round the low 16 away, to nearest even.

    Adding 0x7FFF + lsb (lsb = bit 16, the last kept bit) carries into bit 16
    exactly when the low half is above 0x8000, or equal to it with lsb = 1
    (a tie goes to even); masking then truncates. A carry out of the mantissa
    steps the exponent, and past the largest value it lands on inf: IEEE overflow.
    """
    bits = x.view(np.uint32)                                         # same shape as x
    lsb = (bits >> 16) & 1                                           # same shape as x
    rounded = (bits + 0x7FFF + lsb) & 0xFFFF0000                     # same shape as x
    return np.where(np.isnan(x), np.float32(np.nan), rounded.view(np.float32))


def _round_by_quantum(x: np.ndarray, info: FormatInfo, rng) -> np.ndarray:
    """Round to a multiple of the format's quantum at x's exponent; float64, overflow unapplied.

    e = floor(log2 |x|) comes from the float32 exponent field. Below the
    format's emin the quantum stops shrinking (gradual underflow), so
    quantum = 2**(max(e, emin) - m). t = x / quantum is exact in float64 (a
    power-of-two scaling of a 24-bit number); np.rint(t) rounds ties to even;
    n * quantum is exact again and has at most m + 1 significant bits.
    Stochastic: n = floor(t) + [u < t - floor(t)], u uniform on multiples of
    2**-53 in [0, 1), so P(up) is the fraction exactly (within 2**-53).
    """
    bits = x.view(np.uint32)                                         # same shape as x
    e = ((bits >> 23) & 0xFF).astype(np.int32) - 127                 # same shape; -127 for 0/subnormal
    quantum = np.ldexp(1.0, np.maximum(e, info.emin) - info.mantissa_bits)   # same shape, float64
    with np.errstate(invalid="ignore"):                              # signalling NaNs; inf - inf
        t = x.astype(np.float64) / quantum                           # same shape, exact
        if rng is None:
            n = np.rint(t)                                           # same shape, ties to even
        else:
            low = np.floor(t)                                        # same shape
            n = low + (rng.random(t.shape) < t - low)                # same shape
        return np.copysign(n * quantum, x)                          # same shape; -0.3 -> floor + 1 = +0 -> -0


def _apply_overflow(y: np.ndarray, info: FormatInfo) -> np.ndarray:
    """|y| > max_finite becomes +-inf (IEEE) or +-max_finite (saturate); float64 in, float32 out."""
    big = np.abs(y) > info.max_finite                                # same shape; False for NaN
    limit = np.inf if info.overflow == "inf" else info.max_finite
    return np.where(big, np.copysign(limit, y), y).astype(np.float32)


def stochastic_round_bf16(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """y = bf16 neighbour of x, the upper one with probability (x - lo) / (hi - lo); E[y] = x.

    x: float32, any shape -> float32, same shape. Adds uniform noise in
    [0, 0xFFFF] to the low 16 bits and truncates: the carry into bit 16 happens
    with probability low16 / 65536, exactly the fraction of the way from the
    lower (toward zero) neighbour to the upper. Signs are untouched, so the
    rounding is unbiased for negative values too. A value above the largest
    bf16 can round up to inf, as the hardware would. NaN stays NaN.
    """
    _check_f32("stochastic_round_bf16", "x", x)
    _check_rng("stochastic_round_bf16", rng)
    bits = x.view(np.uint32)                                         # same shape as x
    noise = rng.integers(0, 1 << 16, size=x.shape, dtype=np.uint32)  # same shape as x
    rounded = (bits + noise) & 0xFFFF0000                            # same shape as x
    return np.where(np.isnan(x), np.float32(np.nan), rounded.view(np.float32))


# ---------------------------------------------------------------- scaling

def _amax_to_scale(amax, qmax: float) -> np.ndarray:
    """scale = amax / qmax in float32; 1 where amax == 0; never below the smallest float32."""
    a = np.asarray(amax, dtype=np.float32)                           # same shape as amax
    s = np.maximum(a / np.float32(qmax), FLOAT32_TINY)               # same shape as amax
    return np.where(a == 0, np.float32(1.0), s).astype(np.float32)


def amax_scale(amax, fmt: str) -> np.ndarray:
    """scale = amax / max_finite(fmt) in float32, 1 where amax is 0: the rule of tensor_scale,
    tile_scales and block_scales, for amaxes computed elsewhere.   amax: any shape -> same shape."""
    return _amax_to_scale(amax, _check_fmt("amax_scale", fmt).max_finite)


def mx_scale(amax, fmt: str) -> np.ndarray:
    """s = 2**(floor(log2 amax) - emax(fmt)), an E8M0 power of two (exponent clamped to
    [-127, 127]); 1 where amax is 0. quantize_mx's rule.   amax: any shape -> float32, same shape."""
    info = _check_fmt("mx_scale", fmt)
    amax = np.asarray(amax, dtype=np.float32)                        # same shape as amax
    floor_log2 = np.frexp(amax)[1] - 1                               # amax = f * 2**e, f in [0.5, 1)
    exponent = np.clip(floor_log2 - info.emax, -127, 127)            # same shape, an E8M0 exponent
    return np.where(amax == 0, 1.0, np.ldexp(1.0, exponent)).astype(np.float32)


def _saturating_round(y: np.ndarray, info: FormatInfo) -> np.ndarray:
    """round_to(clip(y, +-max_finite)): a scaled cast saturates, so a stale scale never makes inf."""
    return round_to(np.clip(y, -info.max_finite, info.max_finite), info.name)


def tensor_scale(x: np.ndarray, fmt: str) -> float:
    """scale = amax(|x|) / max_finite(fmt), or 1 if x is all zeros.   x: float32, any shape."""
    info = _check_fmt("tensor_scale", fmt)
    _check_f32("tensor_scale", "x", x)
    amax = np.max(np.abs(x)) if x.size else np.float32(0.0)
    if not np.isfinite(amax):
        raise ValueError(f"tensor_scale: x must be finite to be scaled, got amax {amax}")
    return float(_amax_to_scale(amax, info.max_finite))


def quantize(x: np.ndarray, fmt: str, scale: float) -> np.ndarray:
    """q = round_to(clip(x / scale, +-max_finite), fmt).   x: float32, any shape -> same shape.

    The division is float32 and the cast saturates (values past max_finite
    clip to it), like a scaled fp8 cast on hardware.
    """
    info = _check_fmt("quantize", fmt)
    _check_f32("quantize", "x", x)
    _check_scale("quantize", "scale", scale)
    return _saturating_round(x / np.float32(scale), info)           # same shape as x


def dequantize(q: np.ndarray, scale: float) -> np.ndarray:
    """x_hat = q * scale.   q: float32, any shape -> float32, same shape."""
    _check_f32("dequantize", "q", q)
    _check_scale("dequantize", "scale", scale)
    return q * np.float32(scale)                                     # same shape as q


def _grid_amax(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """amax of |x| over each rows x cols tile; a trailing partial tile uses only its own entries.

    x: (N, D) -> (R, T), R = ceil(N / rows), T = ceil(D / cols). Zero padding
    cannot change a max of absolute values.
    """
    n, d = x.shape
    r, t = -(-n // rows), -(-d // cols)
    padded = np.zeros((r * rows, t * cols), dtype=np.float32)       # (R*rows, T*cols)
    padded[:n, :d] = np.abs(x)
    return padded.reshape(r, rows, t, cols).max(axis=(1, 3))        # (R, T)


def _grid_expand(scales: np.ndarray, rows: int, cols: int, shape: tuple) -> np.ndarray:
    """One scale per tile -> one per element.   scales: (R, T) -> (N, D)."""
    full = np.repeat(np.repeat(scales, rows, axis=0), cols, axis=1)  # (R*rows, T*cols)
    return full[:shape[0], :shape[1]]                                # (N, D)


def _grid_quantize(fn, x, fmt, rows, cols):
    """Shared body of quantize_tiles / quantize_blocks: (q (N, D), scales (R, T))."""
    info = _check_fmt(fn, fmt)
    _check_2d(fn, "x", x)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{fn}: x must be finite to be scaled")
    scales = _amax_to_scale(_grid_amax(x, rows, cols), info.max_finite)     # (R, T)
    q = _saturating_round(x / _grid_expand(scales, rows, cols, x.shape), info)  # (N, D)
    return q, scales


def _grid_dequantize(fn, q, scales, rows, cols):
    """x_hat = q * (each element's tile scale).   q: (N, D), scales: (R, T) -> (N, D)."""
    _check_2d(fn, "q", q)
    _check_2d(fn, "scales", scales)
    _check_scale(fn, "scales", scales)
    expected = (-(-q.shape[0] // rows), -(-q.shape[1] // cols))
    if scales.shape != expected:
        raise ValueError(f"{fn}: scales must have shape {expected} for q of shape {q.shape}, "
                         f"got {scales.shape}")
    return q * _grid_expand(scales, rows, cols, q.shape)            # (N, D)


def tile_scales(x: np.ndarray, fmt: str, tile: int = 128) -> np.ndarray:
    """s[n, t] = amax(|x[n, t*tile:(t+1)*tile]|) / max_finite.   x: (N, D) -> (N, T).

    DeepSeek-V3's activation scaling: one scale per 1 x tile slice of a row.
    A trailing partial tile (D not a multiple of tile) gets its own scale from
    its own amax. An all-zero tile gets scale 1.
    """
    info = _check_fmt("tile_scales", fmt)
    _check_2d("tile_scales", "x", x)
    _check_int("tile_scales", "tile", tile, 1)
    return _amax_to_scale(_grid_amax(x, 1, tile), info.max_finite)  # (N, T)


def block_scales(w: np.ndarray, fmt: str, block: int = 128) -> np.ndarray:
    """s[i, j] = amax(|w over block (i, j)|) / max_finite.   w: (N, D) -> (R, T).

    DeepSeek-V3's weight scaling: one scale per block x block square. Partial
    blocks on the bottom and right edges get their own scales.
    """
    info = _check_fmt("block_scales", fmt)
    _check_2d("block_scales", "w", w)
    _check_int("block_scales", "block", block, 1)
    return _amax_to_scale(_grid_amax(w, block, block), info.max_finite)     # (R, T)


def quantize_tiles(x: np.ndarray, fmt: str, tile: int = 128):
    """q = round(x / s) with s = tile_scales(x).   x: (N, D) -> (q (N, D), s (N, T))."""
    _check_int("quantize_tiles", "tile", tile, 1)
    return _grid_quantize("quantize_tiles", x, fmt, 1, tile)


def dequantize_tiles(q: np.ndarray, scales: np.ndarray, tile: int = 128) -> np.ndarray:
    """x_hat = q * s (each 1 x tile slice by its scale).   q: (N, D), s: (N, T) -> (N, D)."""
    _check_int("dequantize_tiles", "tile", tile, 1)
    return _grid_dequantize("dequantize_tiles", q, scales, 1, tile)


def quantize_blocks(w: np.ndarray, fmt: str, block: int = 128):
    """q = round(w / s) with s = block_scales(w).   w: (N, D) -> (q (N, D), s (R, T))."""
    _check_int("quantize_blocks", "block", block, 1)
    return _grid_quantize("quantize_blocks", w, fmt, block, block)


def dequantize_blocks(q: np.ndarray, scales: np.ndarray, block: int = 128) -> np.ndarray:
    """x_hat = q * s (each block x block square by its scale).   q: (N, D), s: (R, T) -> (N, D)."""
    _check_int("dequantize_blocks", "block", block, 1)
    return _grid_dequantize("dequantize_blocks", q, scales, block, block)


def quantize_mx(x: np.ndarray, fmt: str, block: int = 32):
    """OCP MX: s = 2**(floor(log2 amax) - emax(fmt)) per 1 x block slice; q = round(x / s).

    x: (N, D) -> (q (N, D), s (N, T)), T = ceil(D / block); dequantize with
    dequantize_mx. The scale is an E8M0 power of two (exponent clamped to
    [-127, 127]), so dividing by it is exact. It puts amax in the format's top
    binade [2**emax, 2**(emax+1)); the part above max_finite (E4M3: 448..512)
    saturates, as the spec's conversion does, which costs up to amax / 8.
    A partial trailing block gets its own scale; an all-zero block gets 1.
    """
    info = _check_fmt("quantize_mx", fmt)
    _check_2d("quantize_mx", "x", x)
    _check_int("quantize_mx", "block", block, 1)
    if not np.all(np.isfinite(x)):
        raise ValueError("quantize_mx: x must be finite to be scaled")
    scales = mx_scale(_grid_amax(x, 1, block), fmt)                  # (N, T)
    q = _saturating_round(x / _grid_expand(scales, 1, block, x.shape), info)         # (N, D)
    return q, scales


def dequantize_mx(q: np.ndarray, scales: np.ndarray, block: int = 32) -> np.ndarray:
    """x_hat = q * s (each 1 x block slice by its power-of-two scale).   q: (N, D) -> (N, D)."""
    _check_int("dequantize_mx", "block", block, 1)
    return _grid_dequantize("dequantize_mx", q, scales, 1, block)


# ---------------------------------------------------------------- low-precision matmul

def lp_matmul(a: np.ndarray, b: np.ndarray, fmt: str, *, accumulator_bits: int | None = None,
              promote_every: int | None = None, group: int = 4) -> np.ndarray:
    """c = out(round_to(a, fmt) @ round_to(b, fmt)).   a: (N, K), b: (K, M) -> c: (N, M) float32.

    Low-precision inputs, float32 accumulation (float32 BLAS). For fp16 and
    bf16 the result is rounded once to fmt. For fp8 it is returned as float32
    without rounding: fp8 GEMMs write bf16 or fp32, and keeping fp32 leaves
    that choice to the caller. a and b are rounded as given: scale them first.

    accumulator_bits=p simulates a limited accumulator (DeepSeek-V3 measured
    about 14 mantissa bits in H800 fp8 tensor cores): see _limited_accumulate.
    promote_every=N_C (DeepSeek-V3: 128, a multiple of group) restarts that
    accumulator every N_C products and adds the partial sums in float32.
    """
    info = _check_fmt("lp_matmul", fmt)
    _check_2d("lp_matmul", "a", a)
    _check_2d("lp_matmul", "b", b)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"lp_matmul: a has K={a.shape[1]} but b has K={b.shape[0]}")
    _check_int("lp_matmul", "group", group, 1)
    if accumulator_bits is not None:
        _check_int("lp_matmul", "accumulator_bits", accumulator_bits, 1, 23)
    if promote_every is not None:
        _check_int("lp_matmul", "promote_every", promote_every, 1)
        if accumulator_bits is None or promote_every % group:
            raise ValueError(f"lp_matmul: promote_every={promote_every} needs accumulator_bits "
                             f"(got {accumulator_bits}) and a multiple of group={group}")
    a_r, b_r = round_to(a, fmt), round_to(b, fmt)                    # (N, K), (K, M)
    if accumulator_bits is None:
        c = a_r @ b_r                                                # (N, M), float32 BLAS
    else:
        c = _limited_accumulate(a_r, b_r, accumulator_bits, group, promote_every)    # (N, M)
    return c if info.name.startswith("fp8") else round_to(c, fmt)


def _truncate_mantissa(x: np.ndarray, bits: int) -> np.ndarray:
    """Keep `bits` fraction bits of each float32, dropping the rest (round toward zero)."""
    mask = np.uint32((0xFFFFFFFF << (23 - bits)) & 0xFFFFFFFF)
    return (x.view(np.uint32) & mask).view(np.float32)               # same shape as x


def _limited_accumulate(a: np.ndarray, b: np.ndarray, bits: int, group: int,
                        promote_every: int | None) -> np.ndarray:
    """A model of a tensor core's limited accumulator, not a bit-exact emulation.

    The K products are taken `group` at a time; each group's sum is formed in
    float32 (exact for fp8 inputs unless exponents differ widely) and added to
    a running sum that is then truncated to `bits` fraction bits (toward zero,
    as an aligning adder that drops shifted-out bits does). With promote_every
    the running sum restarts every promote_every products, and the chunk sums
    are added in float32, like DeepSeek-V3's copy to CUDA-core registers.
    a: (N, K), b: (K, M) -> (N, M). K is zero-padded; adding 0 changes nothing.
    Memory: the group sums take K / group * N * M floats, so keep N and M small.
    """
    n, k = a.shape
    m = b.shape[1]
    chunk = promote_every or -(-k // group) * group                  # products per accumulator run
    kp = -(-k // chunk) * chunk
    ap = np.zeros((n, kp), dtype=np.float32)                         # (N, Kp)
    ap[:, :k] = a
    bp = np.zeros((kp, m), dtype=np.float32)                         # (Kp, M)
    bp[:k] = b
    g = kp // group
    sums = ap.reshape(n, g, group).transpose(1, 0, 2) @ bp.reshape(g, group, m)   # (G, N, M)
    sums = sums.reshape(kp // chunk, chunk // group, n, m)           # (P, S, N, M): P chunks of S groups
    acc = np.zeros((kp // chunk, n, m), dtype=np.float32)            # (P, N, M)
    for step in range(chunk // group):
        acc = _truncate_mantissa(acc + sums[:, step], bits)          # (P, N, M)
    out = np.zeros((n, m), dtype=np.float32)                         # (N, M)
    for partial in acc:                                              # promotion: float32 adds
        out = out + partial                                          # (N, M)
    return out


# ---------------------------------------------------------------- int8 inference

def quantize_int8_per_channel(w: np.ndarray):
    """q = rint(w / s), s[j] = amax(|w[:, j]|) / 127.   w: (D, M) float32 -> (q (D, M) int8, s (M,) float32).

    Symmetric, one scale per output column of y = x @ w; an all-zero column gets scale 1.
    """
    _check_2d("quantize_int8_per_channel", "w", w)
    if not np.all(np.isfinite(w)):
        raise ValueError("quantize_int8_per_channel: w must be finite")
    scales = _amax_to_scale(np.abs(w).max(axis=0), INT8_MAX)         # (M,)
    q = np.clip(np.rint(w / scales), -INT8_MAX, INT8_MAX).astype(np.int8)   # (D, M)
    return q, scales


def int8_matmul(x: np.ndarray, q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """y = (qx @ q) * sx[:, None] * s[None, :], qx = rint(x / sx), sx[n] = amax(|x[n]|) / 127.

    x: (N, D) float32, q: (D, M) int8, scales: (M,) float32 -> y: (N, M) float32.
    x is quantised per row (per token). The products are summed exactly in
    int32 (np.matmul on int32: correct, but not BLAS, so slow); D is limited so
    that D * 127 * 127 cannot overflow int32.
    """
    _check_2d("int8_matmul", "x", x)
    if not isinstance(q, np.ndarray) or q.dtype != np.int8 or q.ndim != 2:
        raise ValueError(f"int8_matmul: q must be a 2-D int8 array, got {getattr(q, 'dtype', type(q))}")
    _check_f32("int8_matmul", "scales", scales)
    _check_scale("int8_matmul", "scales", scales)
    if x.shape[1] != q.shape[0] or scales.shape != (q.shape[1],):
        raise ValueError(f"int8_matmul: x {x.shape}, q {q.shape}, scales {scales.shape} do not fit")
    if x.shape[1] > (2**31 - 1) // INT8_MAX**2:
        raise ValueError(f"int8_matmul: D={x.shape[1]} could overflow the int32 accumulator")
    if not np.all(np.isfinite(x)):
        raise ValueError("int8_matmul: x must be finite")
    sx = _amax_to_scale(np.abs(x).max(axis=1), INT8_MAX)             # (N,)
    qx = np.clip(np.rint(x / sx[:, None]), -INT8_MAX, INT8_MAX).astype(np.int32)    # (N, D)
    acc = qx @ q.astype(np.int32)                                    # (N, M), exact
    return acc.astype(np.float32) * sx[:, None] * scales[None, :]   # (N, M)
