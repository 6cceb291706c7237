"""The low-precision compute mode: where a layer rounds, and how.

A layer running in low precision keeps float32 arrays (the master weights
stay float32) and rounds at three named steps of every matrix product:

    operands   a, b -> the format:  fp16 / bf16 round to nearest even;
               fp8 is scaled first (PrecisionConfig.fp8_scaling): one scale
               per 1 x 128 tile of the left operand along the inner
               dimension and per 128 x 128 block of the right operand
               ("tile", DeepSeek-V3), one per tensor ("tensor"), or one
               power of two per 1 x 32 block of both ("mx")
    product    float32 BLAS: the sums are exact float32 sums, which is what
               promoting partial sums to float32 gives (chapter 6 shows what
               a short accumulator without promotion costs, at small sizes)
    output     -> fp16 / bf16 for those formats; fp8 products are written as
               bf16, as fp8 GEMMs in practice write a 16-bit output

NumPy's own float16 matmul is not BLAS-backed and is hundreds of times
slower, so it is never used. The float64 pairs the gradient checks prove
never round: a layer rounds only when its SparseConfig.precision says so.
"""
from __future__ import annotations

import numpy as np

from moe_np import precision

FP8 = ("fp8_e4m3", "fp8_e5m2")


def _scaled(x, fmt: str, scaling: str, left: bool):
    """x rounded to fp8 through its scales, then scaled back.   (R, C) -> (R, C) float32."""
    if scaling == "tensor":
        s = precision.tensor_scale(x, fmt)
        return precision.dequantize(precision.quantize(x, fmt, s), s)
    if scaling == "mx":
        q, s = precision.quantize_mx(x if left else np.ascontiguousarray(x.T), fmt)
        back = precision.dequantize_mx(q, s)                           # blocks along the inner dim
        return back if left else back.T
    if left:
        return precision.dequantize_tiles(*precision.quantize_tiles(x, fmt))
    return precision.dequantize_blocks(*precision.quantize_blocks(x, fmt))


def round_operand(x, config, left: bool = True):
    """One operand of a product in config.compute (a PrecisionConfig), as float32 values.
    left: the (rows, inner) operand; else the (inner, cols) one (fp8 scaling differs)."""
    fmt = config.compute
    if fmt == "fp32":
        return x
    if fmt in FP8:
        return _scaled(np.ascontiguousarray(x), fmt, config.fp8_scaling, left)
    return precision.round_to(np.ascontiguousarray(x), fmt)


def round_output(c, config):
    """A product's output: fp16 / bf16 in their format; fp8 products written as bf16."""
    fmt = config.compute
    if fmt == "fp32":
        return c
    return precision.round_to(c, "bf16" if fmt in FP8 else fmt)


def gemm_for(config):
    """gemm(a, b, out=None): round the operands, multiply in float32, round the output.
    With config.compute "fp32" it is np.matmul itself."""
    if config.compute == "fp32":
        return np.matmul

    def gemm(a, b, out=None):
        c = round_output(round_operand(a, config, True) @ round_operand(b, config, False), config)
        if out is None:
            return c
        out[...] = c
        return out
    return gemm
