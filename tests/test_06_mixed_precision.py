"""Chapter 6: low-precision formats, fp8 scaling, limited accumulation, int8, loss scaling,
and the layer's low-precision mode (lowp) inside the real training step.

Rounding is checked bit for bit against independent casts: NumPy's float16
and ml_dtypes' bfloat16 / float8_e4m3fn / float8_e5m2 (always fed float32,
never float64, so the oracle rounds once). Two documented differences:
ml_dtypes' E4M3 cast turns anything past 464 into NaN where round_to
saturates to 448 (compared only within |x| <= 464, saturation tested alone);
ml_dtypes' E5M2 overflows to inf like IEEE, as round_to does (compared everywhere).
"""
import os
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from moe_np import SparseConfig, SparseMoE, balance, bench, losses, lowp
from moe_np.config import PrecisionConfig
from moe_np.models import moe_net
from moe_np.optim import AdamW
from moe_np.training import Trainer
from moe_np.precision import (FORMATS, block_scales, dequantize, dequantize_blocks, dequantize_mx,
                              dequantize_tiles, int8_matmul, lp_matmul, quantize, quantize_blocks,
                              quantize_int8_per_channel, quantize_mx, quantize_tiles, round_to,
                              stochastic_round_bf16, tensor_scale, tile_scales)
from moe_np.scaling import DelayedScaling, LossScaler, MasterWeights, found_inf

F32 = np.float32
ORACLE = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16,
          "fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}
FMTS = tuple(FORMATS)
FP8 = ("fp8_e4m3", "fp8_e5m2")


def oracle(x, fmt):
    """Independent cast: float32 -> fmt -> float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(ORACLE[fmt]).astype(F32)


def assert_bits_equal(x, got, want):
    """Same NaN positions; identical float32 bits (so +0 and -0 differ) everywhere else."""
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    assert np.array_equal(nan_got, nan_want), f"NaN differs at x={x[nan_got != nan_want][:5]}"
    bad = np.flatnonzero(got.view(np.uint32)[~nan_got] != want.view(np.uint32)[~nan_want])
    if len(bad):
        xs, g, w = x[~nan_got][bad[:5]], got[~nan_got][bad[:5]], want[~nan_want][bad[:5]]
        raise AssertionError(f"{len(bad)} mismatches, e.g. x={xs.tolist()} "
                             f"got={g.tolist()} want={w.tolist()}")


def format_values(fmt):
    """Every finite value of fmt, sorted, as float32 (from all its bit patterns)."""
    nbits = 8 if fmt in FP8 else 16
    raw = np.arange(2**nbits, dtype=np.uint8 if nbits == 8 else np.uint16)
    v = raw.view(ORACLE[fmt]).astype(F32)
    return np.unique(v[np.isfinite(v)])


def edge_values(fmt):
    """All values of fmt, every midpoint between neighbours (the ties) and one float32 ulp
    either side, the overflow tie past max_finite and its neighbours, tiny float32s, inf, NaN."""
    info = FORMATS[fmt]
    v = format_values(fmt).astype(np.float64)
    top = info.max_finite + 2.0 ** (info.emax - info.mantissa_bits - 1)     # max + half an ulp
    mids = np.concatenate([(v[:-1] + v[1:]) / 2, [top, -top, info.min_subnormal / 2]]).astype(F32)
    near = np.concatenate([np.nextafter(mids, F32(np.inf)), np.nextafter(mids, F32(-np.inf))])
    extra = np.array([np.inf, -np.inf, np.nan, 2.0**-149, -2.0**-149, 1e-40, 3.4e38, -3.4e38,
                      2.0 ** min(info.emax + 1, 127), 0.0, -0.0], dtype=F32)
    return np.concatenate([v.astype(F32), mids, near, extra])


def random_values(rng, fmt, n=2**20):
    """n random float32 bit patterns (every class: NaN, inf, subnormal), plus n values
    whose exponents span the format's range from below its subnormals to past its max."""
    info = FORMATS[fmt]
    anything = rng.integers(0, 2**32, size=n, dtype=np.uint32)                       # (n,)
    sign = rng.integers(0, 2, size=n, dtype=np.uint32) << 31                          # (n,)
    exp = rng.integers(info.emin - info.mantissa_bits - 3, info.emax + 3, size=n) + 127
    exp = np.clip(exp, 0, 254).astype(np.uint32) << 23                                # (n,)
    mant = rng.integers(0, 2**23, size=n, dtype=np.uint32)                            # (n,)
    return np.concatenate([anything, sign | exp | mant]).view(F32)


# ---------------------------------------------------------------- round_to vs independent casts

def test_fp16_exhaustive_every_bit_pattern():
    x = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(F32)              # all 65536
    assert_bits_equal(x, round_to(x, "fp16"), x.astype(np.float16).astype(F32))


@pytest.mark.parametrize("fmt", FMTS)
def test_round_to_matches_oracle_on_edges_and_a_million_random_values(fmt):
    rng = np.random.default_rng(6)
    x = np.concatenate([edge_values(fmt), random_values(rng, fmt)])
    assert x.size > 2 * 10**6
    got, want = round_to(x, fmt), oracle(x, fmt)
    keep = ~(np.abs(x) > 464) if fmt == "fp8_e4m3" else np.ones(x.shape, bool)    # NaN kept
    assert_bits_equal(x[keep], got[keep], want[keep])
    finite = np.isfinite(got)
    assert np.array_equal(got[finite], oracle(got[finite], fmt)), "outputs must be fmt values"


@pytest.mark.parametrize("fmt, x, want", [
    ("fp16", 65519.99, 65504.0), ("fp16", 65520.0, np.inf), ("fp16", -65520.0, -np.inf),
    ("fp16", 2.0**-25, 0.0), ("fp16", 3 * 2.0**-25, 2.0**-23), ("fp16", 2.0**-24, 2.0**-24),
    ("bf16", 257.0, 256.0), ("bf16", 259.0, 260.0), ("bf16", 3.4028235e38, np.inf),
    ("fp8_e4m3", 464.0, 448.0), ("fp8_e4m3", 1e6, 448.0), ("fp8_e4m3", -1e6, -448.0),
    ("fp8_e4m3", np.inf, 448.0), ("fp8_e4m3", -np.inf, -448.0), ("fp8_e4m3", 2.0**-10, 0.0),
    ("fp8_e5m2", 61439.0, 57344.0), ("fp8_e5m2", 61440.0, np.inf), ("fp8_e5m2", np.inf, np.inf),
])
def test_known_values(fmt, x, want):
    assert round_to(np.array([x], F32), fmt)[0] == want


@pytest.mark.parametrize("fmt", FMTS)
def test_signed_zero_and_nan(fmt):
    y = round_to(np.array([-0.0, -1e-45, np.nan, -np.nan], F32), fmt)
    assert np.signbit(y[:2]).all() and (y[:2] == 0).all() and np.isnan(y[2:]).all()
    tiny = np.full(1000, -0.25 * FORMATS[fmt].min_subnormal, F32)                     # rounds to -0 mostly
    y = round_to(tiny, fmt, rng=np.random.default_rng(0))
    assert np.signbit(y).all() and (y == 0).sum() > 600


def test_e4m3_saturates_beyond_448_and_keeps_nan():
    x = np.array([448.0, 449.0, 480.0, 1e30, 3.4e38, np.inf, -500.0, -np.inf, np.nan], F32)
    y = round_to(x, "fp8_e4m3")
    assert np.array_equal(y[:-1], np.array([448, 448, 448, 448, 448, 448, -448, -448], F32))
    assert np.isnan(y[-1])


# ---------------------------------------------------------------- stochastic rounding

def neighbours(x, fmt):
    """(lo, hi): the largest fmt value <= x and the smallest >= x (equal when x is one)."""
    v = format_values(fmt)
    lo = v[np.searchsorted(v, x, side="right") - 1]                                   # same shape as x
    hi = v[np.searchsorted(v, x, side="left")]                                        # same shape as x
    return lo, hi


@pytest.mark.parametrize("fmt", FMTS)
def test_stochastic_rounding_returns_a_neighbour(fmt):
    rng = np.random.default_rng(1)
    top = FORMATS[fmt].max_finite
    x = (rng.uniform(-1, 1, 20000) * top * 0.99 * np.exp(-rng.uniform(0, 40, 20000))).astype(F32)
    x[:4] = [1.0, -0.0, FORMATS[fmt].min_subnormal, -top]                              # exact values
    y = round_to(x, fmt, rng=rng)
    lo, hi = neighbours(x, fmt)
    assert np.all((y == lo) | (y == hi))
    assert np.array_equal(y[:4], x[:4])
    if fmt == "bf16":
        y2 = stochastic_round_bf16(x, rng)
        assert np.all((y2 == lo) | (y2 == hi))


@pytest.mark.parametrize("fmt", FMTS)
def test_stochastic_rounding_is_unbiased(fmt):
    """The mean of n draws of y in {lo, hi} with P(hi) = p has std (hi - lo) sqrt(p (1 - p) / n);
    every value's mean must sit within 5 of those stds of x."""
    rng = np.random.default_rng(2)
    info, n = FORMATS[fmt], 50000
    v = format_values(fmt).astype(np.float64)
    anchors = [1.0, -1.0, info.max_finite / 2, info.min_subnormal, -info.min_normal, 3.0]
    i = np.searchsorted(v, anchors)                                                   # (6,) lower neighbours
    x = (v[i] + np.array([0.3, 0.7, 0.5, 0.25, 0.6, 0.9]) * (v[i + 1] - v[i])).astype(F32)
    lo, hi = neighbours(x, fmt)
    draws = round_to(np.repeat(x[None], n, axis=0), fmt, rng=rng)                     # (n, 6)
    p = (x.astype(np.float64) - lo) / (hi.astype(np.float64) - lo)                    # (6,)
    std = (hi.astype(np.float64) - lo) * np.sqrt(p * (1 - p) / n)                     # (6,)
    assert np.all((p > 0.05) & (p < 0.95))
    assert np.all(np.abs(draws.astype(np.float64).mean(axis=0) - x) <= 5 * std)


@pytest.mark.parametrize("fmt", FMTS)
def test_stochastic_rounding_draws_afresh_on_every_call(fmt):
    """Two calls on one generator are two independent draws: a rounding that reseeded (or
    copied) the generator on every call would repeat the first draw, and an update rounded
    that way would be biased the same way at every step. bf16 rounds on its bit pattern, the
    other formats by their quantum."""
    x = np.full(4096, 1 + 0.5 * FORMATS[fmt].eps, F32)                               # halfway: p = 0.5
    rng = np.random.default_rng(4)
    first, second = round_to(x, fmt, rng=rng), round_to(x, fmt, rng=rng)
    assert not np.array_equal(first, second)
    assert 0.4 < np.mean(first != second) < 0.6                                       # independent draws
    same = np.random.default_rng(4)
    assert np.array_equal(round_to(x, fmt, rng=same), first)                         # seeded: reproducible
    if fmt == "bf16":
        a, b = stochastic_round_bf16(x, rng), stochastic_round_bf16(x, rng)
        assert not np.array_equal(a, b) and 0.4 < np.mean(a != b) < 0.6


def test_stochastic_round_bf16_unbiased_direct():
    rng = np.random.default_rng(3)
    x = np.full(400000, 1 + 0.3 * 2.0**-7, F32)                                       # p ~= 0.3
    y = stochastic_round_bf16(x, rng).astype(np.float64)
    lo, hi = 1.0, 1 + 2.0**-7
    p = (float(x[0]) - lo) / (hi - lo)
    assert abs(y.mean() - float(x[0])) <= 5 * (hi - lo) * np.sqrt(p * (1 - p) / x.size)


# ---------------------------------------------------------------- scaling

def outlier_data(rng, n=64, d=300):
    """Gaussian activations with a few channels 1000x larger (the case fine scaling is for)."""
    x = rng.standard_normal((n, d)).astype(F32)                                      # (N, D)
    x[rng.integers(0, n, 6), rng.integers(0, d, 6)] *= 1000.0
    return x


def tile_bound(amax, fmt):
    """A scaled cast's worst error at a tile whose amax is amax: half an ulp relative
    (2**-(m+1)) of amax, the float32 divide and multiply, and half a subnormal quantum."""
    info = FORMATS[fmt]
    return amax * (2.0 ** -(info.mantissa_bits + 1) + 2.0**-22 + info.min_subnormal / 2 / info.max_finite)


@pytest.mark.parametrize("fmt", FP8)
def test_tile_and_block_error_bounded_by_their_amax(fmt):
    rng = np.random.default_rng(4)
    x = outlier_data(rng)                                                            # (64, 300)
    q, s = quantize_tiles(x, fmt, tile=128)
    amax = np.repeat(s * F32(FORMATS[fmt].max_finite), 128, axis=1)[:, :300]          # (64, 300)
    assert np.all(np.abs(dequantize_tiles(q, s, tile=128) - x) <= tile_bound(amax, fmt))
    q, s = quantize_blocks(x, fmt, block=32)
    amax = np.repeat(np.repeat(s * F32(FORMATS[fmt].max_finite), 32, 0), 32, 1)[:64, :300]
    assert np.all(np.abs(dequantize_blocks(q, s, block=32) - x) <= tile_bound(amax, fmt))


@pytest.mark.parametrize("fmt", FP8)
def test_mx_scales_are_powers_of_two_and_error_bounded(fmt):
    rng = np.random.default_rng(5)
    info = FORMATS[fmt]
    x = outlier_data(rng)                                                            # (64, 300)
    q, s = quantize_mx(x, fmt)
    assert s.shape == (64, 10) and np.all(np.frexp(s)[0] == 0.5)
    full = np.repeat(s, 32, axis=1)[:, :300]                                          # (64, 300)
    amax = np.repeat(np.abs(np.pad(x, ((0, 0), (0, 20)))).reshape(64, 10, 32).max(2), 32, 1)[:, :300]
    assert np.all((amax / full >= 2.0**info.emax) & (amax / full < 2.0 ** (info.emax + 1)))
    err = np.abs(dequantize_mx(q, s) - x)                                             # (64, 300)
    assert np.all(err <= amax / 8)                                              # saturation of the top binade
    inside = np.abs(x) / full <= info.max_finite                                      # not saturated
    half_ulp = np.abs(x) * 2.0 ** -(info.mantissa_bits + 1) + full * info.min_subnormal / 2
    assert np.all(err[inside] <= half_ulp[inside])


def test_finer_scaling_beats_per_tensor_with_outliers():
    """Floating-point error is relative, so one per-tensor scale only hurts once outliers push
    the typical values below E4M3's normal range (448 / 2**-6 ~ 2.9e4 apart): three entries
    1e5 times larger, and the error on everything else (RMS) is compared."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((256, 512)).astype(F32)                                   # (N, D)
    spikes = (np.array([3, 100, 200]), np.array([7, 300, 500]))
    x[spikes] *= 1e5
    rest = np.ones(x.shape, bool)
    rest[spikes] = False
    rms = lambda y: float(np.sqrt(np.mean((y - x)[rest].astype(np.float64) ** 2)))
    s = tensor_scale(x, "fp8_e4m3")
    per_tensor = rms(dequantize(quantize(x, "fp8_e4m3", s), s))
    tiles = rms(dequantize_tiles(*quantize_tiles(x, "fp8_e4m3")))
    blocks = rms(dequantize_blocks(*quantize_blocks(x, "fp8_e4m3")))
    mx = rms(dequantize_mx(*quantize_mx(x, "fp8_e4m3")))
    assert max(tiles, mx) < per_tensor / 3 and blocks < per_tensor / 1.5, (per_tensor, tiles, blocks, mx)


@pytest.mark.parametrize("fmt", FMTS)
def test_round_trip_exact_for_representable_values(fmt):
    info = FORMATS[fmt]
    v = format_values(fmt)                                                           # every value
    assert np.array_equal(dequantize(quantize(v, fmt, 1.0), 1.0), v)
    small = v[np.abs(v) <= info.max_finite / 4]                                       # x / 0.25 fits
    assert np.array_equal(dequantize(quantize(small, fmt, 0.25), 0.25), small)


def test_mx_round_trip_exact_e5m2_but_not_e4m3_when_amax_significand_is_1_875():
    """E5M2 always round-trips. E4M3 does unless a block's amax has significand 1.111b:
    the MX scale puts it at 1.875 * 2**8 = 480 > 448, which saturates (a known MX cost)."""
    rng = np.random.default_rng(8)
    for fmt in FP8:
        v = format_values(fmt)
        x = rng.choice(v[np.abs(v) < 200], size=(16, 64)).astype(F32)                # (16, 64)
        x[:, [0, 32]] = 192.0                                                         # significand 1.5
        assert np.array_equal(dequantize_mx(*quantize_mx(x, fmt)), x)
    x[0, 0] = 240.0                                                              # 1.875 * 2**7, an E4M3 value
    assert dequantize_mx(*quantize_mx(x, "fp8_e4m3"))[0, 0] == 224.0


def test_partial_tiles_and_blocks_get_their_own_scales():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 200)).astype(F32)                                     # (3, 200)
    x[:, 150] = 50.0
    s = tile_scales(x, "fp8_e4m3", tile=128)
    assert s.shape == (3, 2)
    assert np.array_equal(s[:, 0], np.abs(x[:, :128]).max(1) / F32(448))
    assert np.array_equal(s[:, 1], np.full(3, F32(50.0) / F32(448)))
    w = rng.standard_normal((200, 300)).astype(F32)                                   # (200, 300)
    b = block_scales(w, "fp8_e5m2", block=128)
    assert b.shape == (2, 3)
    assert b[1, 2] == np.abs(w[128:, 256:]).max() / F32(57344)
    assert tile_scales(np.zeros((2, 5), F32), "fp8_e4m3", tile=4).tolist() == [[1, 1], [1, 1]]


def test_tensor_scale_and_zero_guard():
    x = np.array([[1.0, -896.0]], F32)
    assert tensor_scale(x, "fp8_e4m3") == 2.0
    assert tensor_scale(np.zeros((3,), F32), "fp8_e4m3") == 1.0
    assert np.array_equal(quantize(x, "fp8_e4m3", 2.0), np.array([[0.5, -448]], F32))


def test_delayed_scaling_uses_max_of_history_and_resumes():
    ds = DelayedScaling("fp8_e4m3", history_len=3, margin=1)
    assert ds.scale == 1.0
    scales = []
    for amax in [0.0, 1.0, 4.0, 2.0, 0.5, 0.25, 0.125]:
        ds.update(amax)
        scales.append(ds.scale)
    want = [1.0] + [m * 2 / 448 for m in [1, 4, 4, 4, 2, 0.5]]                       # max of last 3, margin 1
    assert np.allclose(scales, want, rtol=1e-6)
    other = DelayedScaling("fp8_e4m3", history_len=3, margin=1)
    other.load_state_dict(ds.state_dict())
    for amax in [8.0, 0.0, 0.0, 0.0]:
        ds.update(amax)
        other.update(amax)
        assert other.scale == ds.scale
    with pytest.raises(ValueError, match="amax_history"):
        other.load_state_dict({"scale": np.array(1.0)})


def test_quantize_saturates_when_a_delayed_scale_is_stale():
    x = np.array([1e6, -1e6, 1.0], F32)
    q = quantize(x, "fp8_e5m2", 1.0)                                               # scale from a quieter past
    assert np.array_equal(q, np.array([57344, -57344, 1], F32))


# ---------------------------------------------------------------- low-precision matmul

@pytest.mark.parametrize("fmt", FMTS)
def test_lp_matmul_is_rounded_inputs_float32_product(fmt):
    rng = np.random.default_rng(10)
    a = rng.standard_normal((17, 300)).astype(F32)                                    # (N, K)
    b = rng.standard_normal((300, 13)).astype(F32)                                    # (K, M)
    c32 = round_to(a, fmt) @ round_to(b, fmt)                                          # (N, M)
    want = c32 if fmt in FP8 else round_to(c32, fmt)
    assert np.array_equal(lp_matmul(a, b, fmt), want)


@pytest.mark.parametrize("fmt", FMTS)
def test_lp_matmul_error_vs_float64_within_format_bound(fmt):
    """Rigorous bound: each input is off by <= u|x| + h (u = eps/2, h = half a subnormal
    quantum), so |a~ b~ - a b| <= (u|a| + h)((1+u)|b| + h) + |a|(u|b| + h) per product;
    float32 accumulation adds gamma_K |a~|@|b~| (gamma_K = K 2**-24 / (1 - K 2**-24));
    a 16-bit output rounding adds u |c|."""
    rng = np.random.default_rng(11)
    info = FORMATS[fmt]
    a = rng.standard_normal((17, 300)).astype(F32)
    b = rng.standard_normal((300, 13)).astype(F32)
    A, B = np.abs(a).astype(np.float64), np.abs(b).astype(np.float64)
    u, h, k = info.eps / 2, info.min_subnormal / 2, a.shape[1]
    gamma = k * 2.0**-24 / (1 - k * 2.0**-24)
    inputs = (u * A + h) @ ((1 + u) * B + h) + A @ (u * B + h)                         # (N, M)
    accum = gamma * (((1 + u) * A + h) @ ((1 + u) * B + h))                            # (N, M)
    ref = a.astype(np.float64) @ b                                                    # (N, M)
    out = 0.0 if fmt in FP8 else u * (np.abs(ref) + inputs + accum)
    err = np.abs(lp_matmul(a, b, fmt) - ref)
    assert np.all(err <= inputs + accum + out)
    assert err.max() > 0.01 * (inputs + accum + out).max()                          # the bound is not vacuous


def test_promotion_every_128_cuts_limited_accumulation_error():
    """K = 4096 fp8 products, positive data as in DeepSeek-V3's example: a 14-bit
    accumulator loses about 1%; restarting it every 128 products and adding the
    partial sums in float32 brings that under 0.05%."""
    rng = np.random.default_rng(12)
    a = rng.random((8, 4096)).astype(F32)                                             # (N, K)
    b = rng.random((4096, 8)).astype(F32)                                             # (K, M)
    ref = round_to(a, "fp8_e4m3").astype(np.float64) @ round_to(b, "fp8_e4m3")        # exact sums
    rel = lambda c: float(np.linalg.norm(c - ref) / np.linalg.norm(ref))
    plain = rel(lp_matmul(a, b, "fp8_e4m3"))
    limited = rel(lp_matmul(a, b, "fp8_e4m3", accumulator_bits=14))
    promoted = rel(lp_matmul(a, b, "fp8_e4m3", accumulator_bits=14, promote_every=128))
    full = rel(lp_matmul(a, b, "fp8_e4m3", accumulator_bits=23))
    assert plain < 1e-6 and full < 1e-6
    assert limited > 3e-3 and promoted < 5e-4 and promoted < limited / 10, (limited, promoted)


def test_limited_accumulation_pads_a_ragged_inner_dimension():
    rng = np.random.default_rng(13)
    a = rng.random((3, 130)).astype(F32)
    b = rng.random((130, 2)).astype(F32)
    c = lp_matmul(a, b, "fp8_e5m2", accumulator_bits=23, promote_every=64, group=4)
    ref = round_to(a, "fp8_e5m2").astype(np.float64) @ round_to(b, "fp8_e5m2")
    assert c.dtype == F32 and c.shape == (3, 2) and np.allclose(c, ref, rtol=1e-6)


# ---------------------------------------------------------------- int8

def test_int8_per_channel_error_bound_and_memory():
    """|x w - x^ w^| <= (sx/2) sum_k |w^_kj| + (sw_j/2) sum_k |x_nk| (each side off by half a
    step), plus float32 rounding. On Gaussian data the relative error is about 1%: a row's
    step is amax/127 ~ 3/127, whose rounding noise (step / sqrt(12)) is ~0.7% of the row's std,
    and the weights add as much again; the test allows 1.5%."""
    rng = np.random.default_rng(14)
    x = rng.standard_normal((64, 256)).astype(F32)                                    # (N, D)
    w = (rng.standard_normal((256, 128)) * rng.uniform(0.1, 3, 128)).astype(F32)     # (D, M)
    w[:, 5] = 0.0
    q, s = quantize_int8_per_channel(w)
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127 and s.shape == (128,)
    assert q.nbytes * 4 == w.nbytes and s[5] == 1.0 and not q[:, 5].any()
    y = int8_matmul(x, q, s)                                                          # (N, M)
    ref = x.astype(np.float64) @ w
    sx = np.abs(x).max(1, keepdims=True) / 127.0                                      # (N, 1)
    w_hat = q.astype(np.float64) * s                                                  # (D, M)
    bound = sx / 2 * np.abs(w_hat).sum(0) + s / 2 * np.abs(x).sum(1, keepdims=True)
    assert np.all(np.abs(y - ref) <= bound * 1.001 + 1e-5 * (np.abs(x) @ np.abs(w)))
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.015


# ---------------------------------------------------------------- loss scaling

def run(scaler, flags):
    out = []
    for flag in flags:
        scaler.update(flag)
        out.append((scaler.scale, scaler.growth_tracker))
    return out


def test_loss_scaler_table_pytorch_rule():
    s = LossScaler(init_scale=8.0, growth_interval=3)
    flags = [False, False, False, False, True, False, False, False, True, True]
    want = [(8, 1), (8, 2), (16, 0), (16, 1), (8, 0), (8, 1), (8, 2), (16, 0), (8, 0), (4, 0)]
    assert run(s, flags) == want


def test_loss_scaler_hysteresis_counts_overflows_since_last_growth():
    """Megatron-LM: with h = 2 the first overflow only spends hysteresis; so does one
    after a growth; overflows need not be consecutive (the counter resets only on growth)."""
    s = LossScaler(init_scale=8.0, growth_interval=3, hysteresis=2)
    flags = [True, True, True, False, False, False, True, False, True]
    want = [(8, 0), (4, 0), (2, 0), (2, 1), (2, 2), (4, 0), (4, 0), (4, 1), (2, 0)]
    assert run(s, flags) == want


def test_loss_scaler_growth_stays_finite_near_float32_max():
    s = LossScaler(init_scale=2.0**126, growth_interval=1)
    assert run(s, [False, False, False]) == [(2.0**127, 0)] * 3
    assert np.isfinite(np.float32(s.scale))
    tiny = LossScaler(init_scale=2.0**-149)
    assert run(tiny, [True]) == [(2.0**-149, 0)]


def test_loss_scaler_static_never_changes():
    s = LossScaler(init_scale=1024.0, growth_interval=1, dynamic=False)
    assert run(s, [True, False, False, True]) == [(1024.0, 0)] * 4


def test_unscale_once_per_step_and_exact_with_power_of_two_scale():
    rng = np.random.default_rng(15)
    grads = {"w": rng.standard_normal((5, 4)).astype(F32),
             "b": (rng.standard_normal(4) * 1e-4).astype(np.float16)}
    s = LossScaler(init_scale=2.0**26)                                             # 1 / scale is 0 in float16
    scaled = {k: (g.astype(np.float64) * s.scale).astype(g.dtype) for k, g in grads.items()}   # loss * scale
    out, inf = s.unscale(scaled)
    assert not inf
    for k in grads:
        assert out[k].dtype == grads[k].dtype
        assert np.array_equal(out[k].view(np.uint8), grads[k].view(np.uint8))
    with pytest.raises(RuntimeError, match="already called"):
        s.unscale(scaled)
    s.update(inf)
    out, inf = s.unscale({"w": np.array([1.0, np.nan], F32)})
    assert inf


def test_found_inf():
    assert not found_inf({"a": np.ones(3, F32), "b": np.zeros((2, 2), np.float16)})
    assert found_inf({"a": np.ones(3, F32), "b": np.array([0, np.inf], np.float16)})
    assert found_inf({"a": np.array([[np.nan]], F32)})


def test_loss_scaler_state_resumes_identical_sequence():
    flags = [False, True, False, True, False, False, False, False, True, True, False, True]
    a = LossScaler(init_scale=2.0**12, growth_interval=4, hysteresis=2)
    run(a, flags[:3])                                                    # mid-interval, hysteresis spent once
    b = LossScaler(init_scale=1.0, growth_interval=4, hysteresis=2)
    sd = a.state_dict()
    assert sd["scale"].dtype == np.float64 and sd["growth_tracker"].dtype == np.int64
    b.load_state_dict(sd)
    assert run(b, flags[3:]) == run(a, flags[3:])


@pytest.mark.parametrize("change, key", [
    (lambda sd: sd.pop("growth_tracker"), "growth_tracker"),
    (lambda sd: sd.update(scale=np.array([1.0])), "scale"),
    (lambda sd: sd.update(extra=np.array(1.0)), "extra"),
    (lambda sd: sd.update(scale=np.array(-1.0)), "scale"),
    (lambda sd: sd.update(hysteresis_tracker=np.array(7)), "hysteresis_tracker"),
])
def test_loss_scaler_load_rejects_bad_state(change, key):
    sd = LossScaler().state_dict()
    change(sd)
    with pytest.raises(ValueError, match=key):
        LossScaler().load_state_dict(sd)


def test_master_weights_keep_small_updates_a_bf16_model_loses():
    model = {"w": np.ones((2, 3), F32)}
    array = model["w"]
    mw = MasterWeights(model, "bf16")
    model_only = model["w"].copy()                                                   # a bf16 model, no master
    for _ in range(10):
        mw.master["w"] += F32(1e-3)                                                   # an optimizer step
        mw.refresh(model)
        model_only = round_to(model_only + F32(1e-3), "bf16")                      # 1 + 1e-3 rounds back to 1
    assert model["w"] is array and np.all(model["w"] == round_to(mw.master["w"], "bf16"))
    assert np.all(model["w"] == F32(1.0078125)) and np.all(model_only == 1.0)


# ---------------------------------------------------------------- bad arguments

X = np.ones((2, 4), F32)
BAD = [
    (lambda: round_to(X, "fp4"),
     r"round_to: fmt must be one of \('fp16', 'bf16', 'fp8_e4m3', 'fp8_e5m2'\), got 'fp4'"),
    (lambda: round_to(X.astype(np.float64), "fp16"), r"round_to: x must be a float32 array, got dtype float64"),
    (lambda: round_to([1.0], "fp16"), r"round_to: x .* got list"),
    (lambda: round_to(X, "bf16", rng=3), r"round_to: rng"),
    (lambda: stochastic_round_bf16(X.astype(np.float16), np.random.default_rng(0)), r"float16"),
    (lambda: quantize(X, "fp8_e4m3", 0.0), r"quantize: scale .* got 0.0"),
    (lambda: quantize(X, "fp8_e4m3", -2.0), r"quantize: scale .* got -2.0"),
    (lambda: quantize(X, "fp8_e4m3", float("nan")), r"quantize: scale .* got nan"),
    (lambda: quantize(X, "fp8_e4m3", float("inf")), r"quantize: scale .* got inf"),
    (lambda: quantize(X, "fp8", 1.0), r"quantize: fmt"),
    (lambda: dequantize(X, 0.0), r"dequantize: scale"),
    (lambda: tensor_scale(np.array([np.inf], F32), "fp8_e4m3"), r"tensor_scale: x must be finite"),
    (lambda: tile_scales(X, "fp8_e4m3", tile=0), r"tile_scales: tile"),
    (lambda: block_scales(np.ones(4, F32), "fp8_e4m3"), r"block_scales: w must be 2-D"),
    (lambda: quantize_tiles(np.array([[np.nan]], F32), "fp8_e4m3"), r"quantize_tiles: x must be finite"),
    (lambda: dequantize_tiles(X, np.ones((2, 2), F32), tile=4), r"dequantize_tiles: scales must have shape \(2, 1\)"),
    (lambda: dequantize_blocks(X, np.zeros((1, 1), F32), block=4), r"dequantize_blocks: scales .* got 0.0"),
    (lambda: quantize_mx(X, "fp8_e4m3", block=-1), r"quantize_mx: block"),
    (lambda: lp_matmul(X, X, "bf16"), r"lp_matmul: a has K=4 but b has K=2"),
    (lambda: lp_matmul(X, X.T, "fp16", promote_every=128), r"lp_matmul: promote_every=128 needs accumulator_bits"),
    (lambda: lp_matmul(X, X.T, "fp16", accumulator_bits=14, promote_every=6), r"multiple of group=4"),
    (lambda: lp_matmul(X, X.T, "fp16", accumulator_bits=24), r"lp_matmul: accumulator_bits .* got 24"),
    (lambda: lp_matmul(X, X.T.astype(np.float64), "fp16"), r"lp_matmul: b must be a float32"),
    (lambda: quantize_int8_per_channel(X.astype(np.float64)), r"quantize_int8_per_channel: w"),
    (lambda: int8_matmul(X, X.T, np.ones(2, F32)), r"int8_matmul: q must be a 2-D int8"),
    (lambda: int8_matmul(np.ones((1, 133145), F32), np.ones((133145, 1), np.int8), np.ones(1, F32)),
     r"int8_matmul: D=133145 could overflow"),
    (lambda: LossScaler(init_scale=0.0), r"LossScaler: init_scale .* got 0.0"),
    (lambda: LossScaler(init_scale=float("inf")), r"LossScaler: init_scale .* got inf"),
    (lambda: LossScaler(init_scale=float("nan")), r"LossScaler: init_scale .* got nan"),
    (lambda: LossScaler(init_scale=1e39), r"LossScaler: init_scale"),
    (lambda: LossScaler(growth_factor=1.0), r"LossScaler: growth_factor .* got 1.0"),
    (lambda: lowp.round_fast(X, "fp16", out=np.empty((2, 4))),
     r"round_fast: out must be a float32 array of x's shape \(2, 4\), got float64 \(2, 4\)"),
    (lambda: lowp.round_fast(X, "bf16", out=np.empty((4, 2), F32)),
     r"round_fast: out must be a float32 array of x's shape \(2, 4\), got float32 \(4, 2\)"),
    (lambda: LossScaler(backoff_factor=1.0), r"LossScaler: backoff_factor .* got 1.0"),
    (lambda: LossScaler(backoff_factor=0.0), r"LossScaler: backoff_factor .* got 0.0"),
    (lambda: LossScaler(growth_interval=0), r"LossScaler: growth_interval .* got 0"),
    (lambda: LossScaler(growth_interval=2.5), r"LossScaler: growth_interval .* got 2.5"),
    (lambda: LossScaler(hysteresis=0), r"LossScaler: hysteresis .* got 0"),
    (lambda: LossScaler().unscale([X]), r"LossScaler.unscale: grads must be a dict"),
    (lambda: LossScaler().unscale({"w": np.ones(3, np.int32)}), r"LossScaler.unscale: grads\['w'\] .* int32"),
    (lambda: found_inf([X]), r"found_inf: grads must be a dict"),
    (lambda: DelayedScaling("int8"), r"DelayedScaling: fmt"),
    (lambda: DelayedScaling("fp8_e4m3", history_len=0), r"DelayedScaling: history_len"),
    (lambda: DelayedScaling("fp8_e4m3", margin=-1), r"DelayedScaling: margin"),
    (lambda: DelayedScaling("fp8_e4m3").update(float("nan")), r"DelayedScaling.update: amax .* got nan"),
    (lambda: DelayedScaling("fp8_e4m3").update(-1.0), r"DelayedScaling.update: amax .* got -1.0"),
    (lambda: MasterWeights({"w": X.astype(np.float64)}, "bf16"), r"MasterWeights: params\['w'\] .* float64"),
    (lambda: MasterWeights({"w": X}, "bf16").refresh({"v": X}), r"MasterWeights.refresh: model_params keys"),
]


@pytest.mark.parametrize("call, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------- the layer's rounding (lowp)

@pytest.fixture(params=[True, False], ids=["kernels", "twins"])
def kernels(request, monkeypatch):
    """Run a test through lowp's compiled loops and again through their NumPy twins."""
    monkeypatch.setattr(lowp, "USE_KERNELS", request.param)
    return request.param


def use_path(path: str, monkeypatch) -> None:
    """Route round_fast: "half" (fp16 by the conversion instructions, where lowp accepts
    them), "integer" (fp16 by round_kernel), "kernels" (the compiled loops of a format with
    no conversion path) or "twins" (NumPy)."""
    from moe_np import lowp_kernels
    monkeypatch.setattr(lowp, "USE_KERNELS", path != "twins")
    if path == "integer":
        monkeypatch.setattr(lowp, "HALF", False)
    elif path == "half" and lowp_kernels.JIT:
        lowp.kernels()
        assert lowp.HALF == lowp_kernels.native_half()   # accepted wherever it is native


ROUND_PATHS = [(fmt, path) for fmt in FMTS
               for path in (("half", "integer", "twins") if fmt == "fp16" else ("kernels", "twins"))]


def test_fp16_goes_through_the_conversion_and_a_wrong_one_is_refused(monkeypatch):
    """round_fast takes half_kernel for fp16 (and only for fp16) once half_agrees has passed,
    and half_agrees fails a conversion that differs from round_kernel on one value of its
    probe; the probe holds fp16's ties (normal and subnormal) and its overflow tie."""
    from moe_np import lowp_kernels
    monkeypatch.setattr(lowp, "USE_KERNELS", True)
    lowp.kernels()
    calls = []
    monkeypatch.setattr(lowp_kernels, "half_kernel",
                        lambda x, out: calls.append(x.size) or lowp_kernels.round_kernel(
                            x, out, *lowp.rounding("fp16")))
    x = np.random.default_rng(3).standard_normal(100).astype(F32)                    # (100,)
    lowp.round_fast(x, "bf16")
    assert calls == []
    monkeypatch.setattr(lowp, "HALF", True)
    lowp.round_fast(x, "fp16")
    assert calls == [100]
    probe = lowp_kernels.half_probe()                                               # (P,)
    assert {2.0**-25, 3 * 2.0**-25, 65520.0, -65520.0} <= set(probe.tolist())       # ties
    one_and_tie = np.uint32(0x3F800000 | 0x1000)                                     # 1 + 2^-11
    past = [(one_and_tie | np.uint32(1 << i)).view(F32) for i in range(12)]          # tie + one bit
    assert set(np.float32(past).tolist()) <= set(probe.tolist())
    for wrong in (lambda x, out: np.copyto(out, x),                                # no rounding
                  lambda x, out: (lowp_kernels.round_kernel(x, out, *lowp.rounding("fp16")),
                                  out.__setitem__(slice(-1, None), 0.0))):          # one entry off
        monkeypatch.setattr(lowp_kernels, "half_kernel", wrong)
        assert not lowp_kernels.half_agrees(lowp.rounding("fp16"))


@pytest.mark.parametrize("fmt, path", ROUND_PATHS)
def test_round_fast_is_round_to_bit_for_bit(fmt, path, monkeypatch):
    use_path(path, monkeypatch)
    rng = np.random.default_rng(20)
    x = np.concatenate([edge_values(fmt), random_values(rng, fmt, n=2**17)])
    if fmt == "fp16":
        x = np.concatenate([x, np.arange(2**16, dtype=np.uint16).view(np.float16).astype(F32)])
    assert_bits_equal(x, lowp.round_fast(x, fmt), round_to(x, fmt))
    m = x[: x.size // 512 * 512].reshape(-1, 512)                                     # (R, 512)
    for view in (m.T, m[:, ::3]):                                                    # F order, strided
        assert_bits_equal(view.ravel(), lowp.round_fast(view, fmt).ravel(),
                          round_to(np.ascontiguousarray(view), fmt).ravel())
    want = round_to(m, fmt)
    assert lowp.round_fast(m, fmt, out=m) is m                                       # in place
    assert_bits_equal(m.ravel(), m.ravel(), want.ravel())


@pytest.mark.parametrize("fmt, path", ROUND_PATHS)
def test_round_fast_on_every_kind_of_entry_in_place_and_not(fmt, path, monkeypatch):
    """Spans of round_kernel's integer path (fp16 "integer", fp8): none below min_normal
    (the vectorized sweep alone), a few (the sweep, and round_value for those: written in
    place they are rounded before the sweep, which must leave them as they are; rounded
    twice, a value just past a tie would land on the tie and then on the even side), mostly
    such values (entry by entry), with NaN, inf, overflow and ties among them, and a partial
    last span. The same entries test bf16's single sweep, fp16's conversion and the twins."""
    use_path(path, monkeypatch)
    from moe_np.lowp_kernels import SPAN
    info, rng = FORMATS[fmt], np.random.default_rng(21)
    normal = (rng.standard_normal(SPAN) * 4 * info.min_normal).astype(F32)        # (SPAN,)
    normal[np.abs(normal) < info.min_normal] = info.min_normal * 1.5
    few = normal.copy()
    few[[3, 100, 700]] = info.min_subnormal * np.array([0.5, 1.5, -2.5], F32)       # ties below
    few[[4, 101]] = info.min_subnormal * np.array([2.5, -0.5], F32) * F32(1 + 2**-16)   # just past
    top = info.max_finite + 2.0 ** (info.emax - info.mantissa_bits - 1)            # overflow tie
    few[[9, 10, 11, 12, 13]] = [np.nan, np.inf, top, -np.nextafter(F32(top), F32(np.inf)), 3.4e38]
    few[[14, 15, 16]] = [0.0, -0.0, 1e-40]                                         # zeros, fp32 subnormal
    few[17] = np.uint32(0x7F800001).view(F32)                                      # NaN, low payload
    mostly = (rng.standard_normal(SPAN) * info.min_normal).astype(F32)            # (SPAN,)
    mostly[[5, 6]] = [np.nan, -np.inf]
    x = np.concatenate([normal, few, mostly, few[:SPAN // 3]])                     # (S,)
    want = round_to(x, fmt)
    assert_bits_equal(x, lowp.round_fast(x, fmt), want)
    inplace = x.copy()
    assert lowp.round_fast(inplace, fmt, out=inplace) is inplace
    assert_bits_equal(x, inplace, want)


@pytest.mark.parametrize("fmt", FP8)
@pytest.mark.parametrize("shape", [(64, 300), (130, 257), (5, 4)])
def test_scaled_round_is_the_scaled_cast_of_precision(fmt, shape, kernels):
    """Tiles, blocks, one tensor scale and MX, with partial tiles, a transposed input and
    column tiles (128, 1) of a C-ordered input (a right-hand operand's)."""
    rng = np.random.default_rng(21)
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-8, 8, shape))).astype(F32)
    s = tensor_scale(x, fmt)
    cases = [((1, 128, False), dequantize_tiles(*quantize_tiles(x, fmt))),
             ((128, 128, False), dequantize_blocks(*quantize_blocks(x, fmt))),
             ((shape[0], shape[1], False), dequantize(quantize(x, fmt, s), s)),
             ((1, 32, True), dequantize_mx(*quantize_mx(x, fmt)))]
    for (rows, cols, pow2), want in cases:
        assert np.array_equal(lowp.scaled_round(x, fmt, rows, cols, pow2), want), (rows, cols)
    xt = np.ascontiguousarray(x.T)
    assert np.array_equal(lowp.scaled_round(xt.T, fmt, 32, 1, True), dequantize_mx(*quantize_mx(xt, fmt)).T)
    assert np.array_equal(lowp.scaled_round(x, fmt, 128, 1), dequantize_tiles(*quantize_tiles(xt, fmt)).T)


def test_scaled_round_loses_only_the_tile_that_holds_inf_or_nan(kernels):
    x = np.ones((4, 256), F32)
    x[1, 3], x[2, 200] = np.inf, np.nan
    bad = ~np.isfinite(x)                                                             # (4, 256)
    for rows, cols, pow2 in ((1, 128, False), (1, 32, True), (4, 64, False)):
        tile_bad = bad.reshape(4 // rows, rows, 256 // cols, cols).any(axis=(1, 3))   # (R, T)
        lost = np.repeat(np.repeat(tile_bad, rows, 0), cols, 1)                       # (4, 256)
        y = lowp.scaled_round(x, "fp8_e4m3", rows, cols, pow2)
        assert np.array_equal(np.isnan(y), lost) and np.all(y[~lost] == 1.0), (rows, cols)


def test_scaled_round_of_its_own_scratch_buffer(kernels):
    """x may be the very buffer the result is written to (the same scratch name): the result
    must have the bits of a fresh call (a kernel that read a row again after writing it, as
    an earlier one redid rows holding a NaN or an fp8 subnormal, would need an untouched copy).
    Row 3's tile has amax 448, so its scale is 1 and q = x: 2^-7 + 2^-10 + 2^-14 rounds to
    5 subnormal steps of 2^-9, but read again after the normal-range pass had written
    2^-7 + 2^-10 (4.5 steps, a tie) it would round to 4."""
    rng = np.random.default_rng(4)
    scratch = lowp.Scratch()
    x = scratch.get("q", (6, 256), F32)                                               # (6, 256)
    x[...] = rng.standard_normal((6, 256))
    x[1, 5], x[2, 9] = np.nan, 1e-7                                                   # specials
    x[3, 0], x[3, 1] = 448.0, 2.0**-7 + 2.0**-10 + 2.0**-14
    want = lowp.scaled_round(x.copy(), "fp8_e4m3", 1, 128)
    got = lowp.scaled_round(x, "fp8_e4m3", 1, 128, scratch=scratch, name="q")
    assert np.shares_memory(got, x)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("compute, scaling", [("fp16", "tile"), ("bf16", "tile"), ("fp8_e4m3", "tile"),
                                              ("fp8_e5m2", "mx"), ("fp8_e4m3", "tensor")])
def test_gemm_rounds_operands_and_output(compute, scaling):
    rng = np.random.default_rng(22)
    config = PrecisionConfig(compute=compute, fp8_scaling=scaling)
    gemm = lowp.gemm_for(config)
    a = rng.standard_normal((40, 300)).astype(F32)                                    # (N, K)
    b = np.ascontiguousarray(rng.standard_normal((130, 300)).astype(F32)).T          # (K, M), F order
    want = lowp.round_output(lowp.round_operand(a, config, True) @ lowp.round_operand(b, config, False),
                             config)
    out = np.empty((40, 130), F32)
    assert np.array_equal(gemm(a, b), want) and gemm(a, b, out=out) is out
    assert np.array_equal(out, want) and np.array_equal(gemm(a, b), want)           # scratch reused
    assert lowp.gemm_for(PrecisionConfig()) is np.matmul


@pytest.mark.parametrize("path", ["half", "integer", "twins"])
def test_round_fast_into_an_overlapping_shifted_view(path, monkeypatch):
    """out one entry behind x in the same buffer: each entry must be x's, rounded (the kernel
    would read entries the pass already wrote)."""
    use_path(path, monkeypatch)
    buf = (np.random.default_rng(26).standard_normal(3000) * 1e-3).astype(F32)      # (S+1,)
    buf[::7] *= F32(1e-3)                                                           # some below min_normal
    want = round_to(buf[1:].copy(), "fp16")
    got = lowp.round_fast(buf[1:], "fp16", out=buf[:-1])
    assert_bits_equal(want, got, want)


def test_once_rounds_for_16_bit_products_only():
    x = np.random.default_rng(27).standard_normal((5, 7)).astype(F32)               # (5, 7)
    for compute in ("fp16", "bf16"):
        held = lowp.once(lowp.gemm_for(PrecisionConfig(compute=compute)), x, "x")
        assert isinstance(held, lowp.Rounded) and held.fmt == compute
        assert np.array_equal(held.array, round_to(x, compute)) and held.T.array.shape == (7, 5)
    for gemm in (np.matmul, lowp.gemm_for(PrecisionConfig(compute="fp8_e4m3"))):
        assert lowp.once(gemm, x, "x") is x
    with pytest.raises(ValueError, match=r"once: name must not be one of .* got 'a'"):
        lowp.once(lowp.gemm_for(PrecisionConfig(compute="fp16")), x, "a")
    bf16_held = lowp.once(lowp.gemm_for(PrecisionConfig(compute="bf16")), x, "x")
    with pytest.raises(ValueError, match=r"round_operand: a Rounded operand in 'bf16' given to a 'fp16'"):
        lowp.gemm_for(PrecisionConfig(compute="fp16"))(bf16_held, x.T)


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
@pytest.mark.parametrize("compute", ["fp16", "bf16", "fp8_e4m3"])
def test_operands_rounded_once_give_the_bits_of_rounding_at_every_product(kind, compute):
    """The experts round an operand two products share once (lowp.once: x, dy, and the hidden
    gradients in place). The specification rounds both operands at every product and takes
    the ReLU mask from h as computed: one hidden unit has 0 < h that rounds to 0, so an h
    kept rounded would lose that unit's gradient. y, dx and every gradient must match the
    specification bit for bit, with the input gathered again or kept."""
    from moe_np.experts import init_experts, ragged_experts_backward, ragged_experts_forward
    config = PrecisionConfig(compute=compute)
    rng = np.random.default_rng(25)

    def spec(a, b, out=None):                                                      # rounds everything
        c = np.matmul(lowp.round_operand(a, config, True), lowp.round_operand(b, config, False), out=out)
        return lowp.round_output(c, config, out=c)

    params = init_experts(kind, 3, 16, 40, rng, dtype=F32)
    for name in ("b1", "b2") if kind == "mlp" else ():                             # h off the grid
        params[name][...] = rng.standard_normal(params[name].shape) * 0.3
    if kind == "mlp":                                  # unit 7: h = b1 > 0, which rounds to 0
        params["w1"][:, :, 7], params["b1"][:, 7] = 0.0, FORMATS[compute].min_subnormal / 4
    x = rng.standard_normal((30, 16)).astype(F32)                                     # (N, D)
    rows = rng.permutation(np.repeat(np.arange(30), 2))                               # (M,) K=2
    offsets = np.array([0, 25, 25, 60])                                               # one idle expert
    dy = (rng.standard_normal((60, 16)) * 50).astype(F32)                             # (M, D)
    before = {k: v.copy() for k, v in params.items()}
    for source in (None, (x, rows)):
        for overwrite in (False, True):
            results = []
            for gemm in (lowp.gemm_for(config), spec):
                x_sorted = x[rows]                                                     # (M, D)
                y, cache = ragged_experts_forward(x_sorted, params, kind, offsets, gemm=gemm,
                                                  source=source)
                hidden = [h.copy() for h in cache.hidden]
                dy_given = dy.copy()                                                   # (M, D) unrounded
                dx, grads = ragged_experts_backward(dy_given, cache, overwrite=overwrite)
                assert overwrite or np.array_equal(dy_given, dy)                       # not written
                assert np.array_equal(x_sorted, x[rows]) and all(map(np.array_equal, hidden, cache.hidden))
                results.append([y, dx] + [grads[k] for k in sorted(grads)])
            for got, want in zip(*results):
                assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (kind, compute)
    assert all(np.array_equal(before[k], params[k]) for k in params)


# ---------------------------------------------------------------- the low-precision SparseMoE

EPS = {"fp16": 2.0**-10, "bf16": 2.0**-7, "fp8_e4m3": 2.0**-3, "fp8_e5m2": 2.0**-2}


def layer_pair(compute, seed, **extra):
    """A float32 layer computing in `compute` and the float64 layer with the same weights."""
    config = SparseConfig(d_model=32, num_experts=4, d_hidden=48, k=2, balance_coef=0.01,
                          z_coef=1e-3, **extra)
    low = SparseMoE(replace(config, precision=PrecisionConfig(compute=compute)), seed=seed, dtype=F32)
    ref = SparseMoE(config, seed=seed, dtype=np.float64)
    for k in ref.params:
        ref.params[k][...] = low.params[k]
    return low, ref


@pytest.mark.parametrize("compute", tuple(EPS))
def test_low_precision_gradients_match_float64_within_the_format(compute):
    """|low - ref| <= 8 eps (|ref| + rms(ref)) for the output, dx and every gradient, eps = 2**-m
    of the format (the worst of six seeds measured 4.7 eps). SwiGLU experts: a ReLU kink crossed
    by rounding would be a different function, not a rounding error; the router runs in float32
    and its choices are asserted identical. dy is standard normal, far above fp16's subnormals,
    so no loss scale is needed; the error is also required to be there (the layer does round)."""
    for seed in (0, 1):
        low, ref = layer_pair(compute, seed, expert="swiglu")
        rng = np.random.default_rng(seed)
        x, dy = rng.standard_normal((2, 64, 32)).astype(F32)                          # (N, D) each
        y, y64 = low.forward(x), ref.forward(x.astype(np.float64))
        assert np.array_equal(low.stats.ids, ref.stats.ids)
        dx, dx64 = low.backward(dy), ref.backward(dy.astype(np.float64))
        pairs = {"y": (y, y64), "dx": (dx, dx64)} | {k: (low.grads[k], ref.grads[k]) for k in ref.grads}
        for name, (got, want) in pairs.items():
            assert got.dtype == F32, name
            rms = np.sqrt(np.mean(want**2))
            assert np.all(np.abs(got - want) <= 8 * EPS[compute] * (np.abs(want) + rms)), (seed, name)
        assert np.abs(y - y64).max() > 0.05 * EPS[compute] * np.sqrt(np.mean(y64**2))


@pytest.mark.parametrize("compute", ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("router, dispatch_name", [("fp32", "numpy"), ("compute", "numba")])
def test_low_precision_layer_is_float32_throughout(compute, router, dispatch_name):
    config = SparseConfig(d_model=16, num_experts=4, d_hidden=24, k=2, num_shared=1, balance_coef=0.01,
                          dispatch=dispatch_name, precision=PrecisionConfig(compute=compute, router=router))
    layer = SparseMoE(config, seed=0, dtype=F32)
    x = np.random.default_rng(0).standard_normal((32, 16)).astype(F32)
    y = layer.forward(x)
    dx = layer.backward(np.ones_like(y) * F32(0.01))
    assert y.dtype == dx.dtype == F32 and all(g.dtype == F32 for g in layer.grads.values())
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))


def test_einsum_dispatch_refuses_low_precision():
    for compute in ("fp16", "bf16", "fp8_e4m3"):
        with pytest.raises(ValueError, match=r"precision.compute=.* use dispatch 'numpy' or 'numba', not 'einsum'"):
            SparseConfig(d_model=8, num_experts=4, d_hidden=8, dispatch="einsum",
                         precision=PrecisionConfig(compute=compute))


def test_low_precision_router_flips_what_the_float32_router_keeps():
    """Two experts whose router columns differ by 1e-4 relative: their logits nearly tie, and
    the better one is expert 1 wherever expert 0's logit is positive. bf16 (8 significant
    bits) rounds the two columns to the same values, so a bf16 router sees exact ties and
    flips about half the choices; the float32 router of a bf16 layer flips none (it is the
    float32 layer's router exactly: selective precision)."""
    config = SparseConfig(d_model=16, num_experts=2, d_hidden=8, k=1, router="switch")
    x = np.random.default_rng(23).standard_normal((256, 16)).astype(F32)              # (N, D)
    ids = {}
    for name, prec in (("fp32", PrecisionConfig()),
                       ("bf16, fp32 router", PrecisionConfig(compute="bf16", router="fp32")),
                       ("bf16 router", PrecisionConfig(compute="bf16", router="compute"))):
        layer = SparseMoE(replace(config, precision=prec), seed=0, dtype=F32)
        w = layer.params["w_router"]                                                   # (D, E)
        w[:, 1] = w[:, 0] * F32(1 + 1e-4)
        layer.forward(x)
        ids[name] = layer.stats.ids[:, 0]                                              # (N,)
    assert 0.3 < np.mean(ids["fp32"] == 1) < 0.7
    assert np.array_equal(ids["bf16, fp32 router"], ids["fp32"])
    assert np.mean(ids["bf16 router"] != ids["fp32"]) > 0.3


# ---------------------------------------------------------------- the real training step

def tiny_trainer(compute="fp16", scaler=None, **extra):
    rng = np.random.default_rng(24)
    x = rng.standard_normal((128, 6)).astype(F32)                                      # (N, D_in)
    y = rng.integers(0, 3, 128)                                                        # (N,)
    config = SparseConfig(d_model=8, num_experts=4, d_hidden=12, k=2, balance_coef=0.01, z_coef=1e-3,
                          precision=PrecisionConfig(compute=compute), **extra)
    model = moe_net(6, 3, config, num_blocks=2, seed=0, dtype=F32)
    opt = AdamW(model.params, lr=1e-2)
    scaler = LossScaler(init_scale=2.0**10, growth_interval=1000) if scaler is None else scaler
    return Trainer(model, opt, losses.cross_entropy_forward, losses.cross_entropy_backward, x, y,
                   batch_size=32, seed=0, scaler=scaler, clip_norm=1.0)


def snapshot(trainer):
    """Every array the optimizer step may touch, as raw bytes (NaN-safe, sign of zero kept)."""
    arrays = {f"param {k}": v for k, v in trainer.model.params.items()}
    arrays |= {f"optim {k}": np.asarray(v) for k, v in trainer.optimizer.state_dict().items()}
    return {k: np.array(v).tobytes() for k, v in arrays.items()}


def assert_skipped_untouched(trainer, record, before, scale):
    assert record["skipped"] and trainer.skipped >= 1
    assert snapshot(trainer) == before                                                # bit-identical
    assert trainer.scaler.scale == scale / 2                                          # backed off


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
def test_one_bad_gradient_entry_anywhere_skips_the_step(bad, monkeypatch):
    """Each parameter in turn (embedding, both blocks' router and experts, head) gets one entry
    replaced after the real backward pass; the trainer's step must skip and change nothing."""
    trainer = tiny_trainer()
    trainer.train_step()                                                               # moments nonzero
    model, rng = trainer.model, np.random.default_rng(25)
    backward = model.backward
    for name in model.params:
        def poisoned(dout, aux_scale=1.0, name=name):
            dx = backward(dout, aux_scale=aux_scale)
            g = model.grads[name]
            g.flat[rng.integers(g.size)] = bad
            return dx
        monkeypatch.setattr(model, "backward", poisoned)
        before, scale = snapshot(trainer), trainer.scaler.scale
        assert_skipped_untouched(trainer, trainer.train_step(), before, scale)
    monkeypatch.setattr(model, "backward", backward)
    assert not trainer.train_step()["skipped"]                                        # and it recovers


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
def test_a_bad_aux_loss_gradient_skips_the_step(bad, monkeypatch):
    """One entry of the auxiliary losses' gradient to the logits, in the last block's backward
    (it then flows through the real router backward into w_router and dx)."""
    trainer = tiny_trainer()
    trainer.train_step()
    aux_backward = balance.aux_backward

    def poisoned(daux, cache):
        grads = aux_backward(daux, cache)
        dlogits = grads[0].copy()
        dlogits[3, 1] = bad
        return grads._replace(**{grads._fields[0]: dlogits})
    monkeypatch.setattr(balance, "aux_backward", poisoned)
    before, scale = snapshot(trainer), trainer.scaler.scale
    assert_skipped_untouched(trainer, trainer.train_step(), before, scale)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_real_fp16_overflow_skips_the_step_and_backs_off():
    """No injection: a loss scale of 2**40 makes the fp16 expert gradients overflow."""
    trainer = tiny_trainer(scaler=LossScaler(init_scale=2.0**40, growth_interval=1000))
    before = snapshot(trainer)
    assert_skipped_untouched(trainer, trainer.train_step(), before, 2.0**40)
    steps = [trainer.train_step()["skipped"] for _ in range(40)]
    assert not steps[-1] and trainer.scaler.scale < 2.0**30


def test_aux_gradient_is_scaled_and_unscaled_with_the_task_gradient(monkeypatch):
    """fp32 compute: a power-of-two loss scale, undone once, must give the same gradients bit
    for bit as no scaling, the balance and z-loss gradients included (the router's)."""
    seen = []
    for scaler in (None, LossScaler(init_scale=2.0**12, dynamic=False)):
        trainer = tiny_trainer("fp32", scaler=scaler)
        step = trainer.optimizer.step
        monkeypatch.setattr(trainer.optimizer, "step",
                            lambda grads, step=step: (seen.append({k: g.copy() for k, g in grads.items()}),
                                                      step(grads))[1])
        trainer.train_step()
        assert trainer.model.aux > 0
    assert seen[0].keys() == seen[1].keys()
    for k in seen[0]:
        assert np.array_equal(seen[0][k], seen[1][k]), k


# ---------------------------------------------------------------- bad arguments and the timing helper

def test_lowp_bad_arguments():
    with pytest.raises(ValueError, match=r"round_fast: fmt must be one of .* got 'fp4'"):
        lowp.round_fast(np.ones(3, F32), "fp4")
    with pytest.raises(ValueError, match=r"round_fast: fmt must be one of .* got \['fp16'\]"):
        lowp.round_fast(np.ones(3, F32), ["fp16"])
    with pytest.raises(ValueError, match=r"round_fast: x must be a float32 array, got float64"):
        lowp.round_fast(np.ones(3), "fp16")
    with pytest.raises(ValueError, match=r"scaled_round: fmt must be one of .* got 'bf16'"):
        lowp.scaled_round(np.ones((2, 2), F32), "bf16", 1, 128)
    with pytest.raises(ValueError, match=r"scaled_round: x must be a 2-D float32 array, got float64"):
        lowp.scaled_round(np.ones((2, 2)), "fp8_e4m3", 1, 128)
    with pytest.raises(ValueError, match=r"scaled_round: rows and cols must be integers >= 1, got 0, 128"):
        lowp.scaled_round(np.ones((2, 2), F32), "fp8_e4m3", 0, 128)
    with pytest.raises(ValueError, match=r"step_time_ratios: repeats must be an integer >= 1, got 0"):
        bench.step_time_ratios(lambda c: None, None, None, repeats=0)


def test_step_time_ratios_runs_on_a_tiny_layer():
    base = SparseConfig(d_model=8, num_experts=4, d_hidden=16, k=2)
    make = lambda c: SparseMoE(replace(base, precision=PrecisionConfig(compute=c)), seed=0, dtype=F32)
    rng = np.random.default_rng(26)
    x, dy = rng.standard_normal((2, 64, 8)).astype(F32)
    r = bench.step_time_ratios(make, x, dy / F32(64), repeats=1)                     # a mean loss's dy
    assert set(r) == {"fp16_step_ratio", "fp8_step_ratio", "fp32_step_s", "fp16_step_s", "fp8_step_s"}
    assert all(v > 0 for v in r.values())


def test_step_time_ratios_take_the_median_of_each_rounds_ratio(monkeypatch):
    """The precisions take turns in each round; a slow moment (round 2) slows the three
    alike, so each round's own ratio is kept and the median taken over rounds: 1.2 here,
    where the ratio of the medians (1.4 / 1.0) would report the slow round's fp16 step."""
    from moe_np import bench_runs
    steps = iter([9.0, 9.0, 9.0,                      # round 0, the warm-up: left out
                  1.0, 1.2, 1.5, 2.0, 2.2, 3.0, 1.0, 1.4, 1.4])   # fp32, fp16, fp8 per round
    monkeypatch.setattr(bench_runs, "_timed_step", lambda *args: next(steps))
    base = SparseConfig(d_model=8, num_experts=4, d_hidden=16, k=2)
    make = lambda c: SparseMoE(replace(base, precision=PrecisionConfig(compute=c)), seed=0, dtype=F32)
    r = bench.step_time_ratios(make, None, None, repeats=3)
    assert r["fp16_step_ratio"] == pytest.approx(1.2) and r["fp8_step_ratio"] == pytest.approx(1.5)
    assert (r["fp32_step_s"], r["fp16_step_s"], r["fp8_step_s"]) == (1.0, 1.4, 1.5)


# ---------------------------------------------------------------- without numba

WITHOUT_NUMBA = """
import sys
sys.modules["numba"] = None                      # import numba now raises ImportError
import numpy as np
from moe_np import SparseConfig, SparseMoE
from moe_np.config import PrecisionConfig
from moe_np.optim import AdamW
rng = np.random.default_rng(0)
x = rng.standard_normal((12, 6))                 # (N, D)
dy = rng.standard_normal((12, 6))                # (N, D)
for precision in (PrecisionConfig(), PrecisionConfig(compute="fp16")):
    dtype = np.float64 if precision.compute == "fp32" else np.float32
    layer = SparseMoE(SparseConfig(d_model=6, num_experts=4, d_hidden=8, k=2, balance_coef=0.01,
                                   dispatch="numpy", precision=precision), seed=0, dtype=dtype)
    before = {k: v.copy() for k, v in layer.params.items()}
    layer.forward(x.astype(dtype))
    dx = layer.backward(dy.astype(dtype))
    AdamW(layer.params, lr=1e-2).step(layer.grads)
    assert dx.shape == x.shape and np.all(np.isfinite(dx)) and layer.aux > 0
    assert all(not np.array_equal(before[k], layer.params[k]) for k in ("w_router", "w1", "w2"))
try:
    SparseMoE(SparseConfig(d_model=6, num_experts=4, d_hidden=8, dispatch="numba")).forward(x)
except ImportError as err:
    print("refused:", err)
print("numpy layer trained without numba;", "numba" in sys.modules and sys.modules["numba"] is not None)
"""


def test_a_numpy_dispatch_layer_trains_without_numba():
    """numba blocked: the numpy strategy (and the fp16 mode, through its NumPy twins) runs a
    forward, a backward and an optimizer step; the numba strategy says what is missing."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run([sys.executable, "-c", WITHOUT_NUMBA], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "numpy layer trained without numba; False" in done.stdout
    assert "refused: dispatch: strategy 'numba' needs the numba package" in done.stdout
    assert "dispatch='numpy' computes the same numbers" in done.stdout


CONVERSION_REFUSED = """
import numpy as np
from moe_np import lowp, precision
x = np.concatenate([np.random.default_rng(0).standard_normal(4000) * s for s in (1e-6, 1, 7e4)])
x = x.astype(np.float32)
same = all(np.array_equal(lowp.round_fast(x, f).view(np.uint32), precision.round_to(x, f).view(np.uint32))
           for f in ("fp16", "bf16"))
print("HALF", lowp.HALF, "same bits", same)
"""


@pytest.mark.parametrize("setting, half", [({"NUMBA_CPU_NAME": "generic"}, "False"),
                                           ({"NUMBA_DISABLE_JIT": "1"}, "None")])
def test_fp16_without_the_conversion_instructions(setting, half, tmp_path):
    """Compiled for a generic x86-64 (no F16C) LLVM would call a runtime function this
    process lacks, so lowp must not compile the conversion there: fp16 rounds by the
    integer kernel, with round_to's bits. With the JIT disabled the twins run and the
    conversion is never reached (it cannot run as Python)."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env |= {"NUMBA_CACHE_DIR": str(tmp_path)} | setting
    done = subprocess.run([sys.executable, "-c", CONVERSION_REFUSED], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = half if platform.machine().lower() in ("x86_64", "amd64") or half == "None" else "True"
    assert done.stdout.strip() == f"HALF {expected} same bits True"


def test_import_moe_np_does_not_load_numba():
    """A float32 layer on the numpy strategy, the configs, routers and the checks of chapters 1-4
    never import numba (the numba strategy and the low-precision kernels load it on first use)."""
    code = ("import sys; import moe_np, moe_np.checks, moe_np.presets, moe_np.interop; "
            "from moe_np import SparseConfig, SparseMoE; import numpy as np; "
            "SparseMoE(SparseConfig(d_model=4, num_experts=3, d_hidden=5, dispatch='numpy'))"
            ".forward(np.ones((2, 4))); print(sorted(m for m in sys.modules if m.startswith('numba'))[:3])")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
