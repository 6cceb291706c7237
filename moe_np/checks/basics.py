"""Chapter 1's checks: every layer and loss, every input, in float64.

Sizes are tiny and mutually distinct (N=5, D=4, H=6) so a transposed axis
cannot pass by accident.
"""
from __future__ import annotations

import numpy as np

from moe_np import functional, layers, losses
from moe_np.checks.registry import register
from moe_np.gradcheck import check_pair

N, D, H, V = 5, 4, 6, 7


def _away_from_zero(rng, shape, margin=0.1):
    """Random values with |v| >= margin, so +-h never crosses ReLU's kink."""
    v = rng.standard_normal(shape)                       # shape
    return np.where(np.abs(v) < margin, np.sign(v + 1e-12) * margin * 2, v)


@register("linear", chapter=1)
def _linear(seed):
    rng = np.random.default_rng(seed)
    return check_pair("linear", layers.linear_forward, layers.linear_backward,
                      {"x": rng.standard_normal((N, D)), "w": rng.standard_normal((D, H)),
                       "b": rng.standard_normal(H)}, seed=seed)


@register("relu", chapter=1)
def _relu(seed):
    rng = np.random.default_rng(seed)
    x = _away_from_zero(rng, (N, H), margin=1e-2)        # (N, H)
    return check_pair("relu", layers.relu_forward, layers.relu_backward, {"x": x},
                      seed=seed, selection=lambda x: x > 0)


@register("gelu", chapter=1)
def _gelu(seed):
    rng = np.random.default_rng(seed)
    return check_pair("gelu", layers.gelu_forward, layers.gelu_backward,
                      {"x": 2 * rng.standard_normal((N, H))}, seed=seed)


@register("silu", chapter=1)
def _silu(seed):
    rng = np.random.default_rng(seed)
    return check_pair("silu", layers.silu_forward, layers.silu_backward,
                      {"x": 2 * rng.standard_normal((N, H))}, seed=seed)


@register("swiglu", chapter=1)
def _swiglu(seed):
    rng = np.random.default_rng(seed)
    return check_pair("swiglu", layers.swiglu_forward, layers.swiglu_backward,
                      {"a": rng.standard_normal((N, H)), "b": rng.standard_normal((N, H))},
                      seed=seed)


@register("dropout", chapter=1)
def _dropout(seed):
    rng = np.random.default_rng(seed)
    return check_pair("dropout", layers.dropout_forward, layers.dropout_backward,
                      {"x": rng.standard_normal((N, H))},
                      static={"p": 0.3, "seed": seed + 1}, seed=seed)


@register("softmax", chapter=1)
def _softmax(seed):
    rng = np.random.default_rng(seed)
    rows = check_pair("softmax", functional.softmax_forward, functional.softmax_backward,
                      {"z": rng.standard_normal((N, V))}, seed=seed)
    rows += check_pair("softmax(T=0.5)", functional.softmax_forward, functional.softmax_backward,
                       {"z": rng.standard_normal((N, V))}, static={"temperature": 0.5},
                       seed=seed)
    rows += check_pair("softmax(axis=0)", functional.softmax_forward, functional.softmax_backward,
                       {"z": rng.standard_normal((N, V))}, static={"axis": 0}, seed=seed)
    return rows


@register("log_softmax", chapter=1)
def _log_softmax(seed):
    rng = np.random.default_rng(seed)
    return check_pair("log_softmax", functional.log_softmax_forward, functional.log_softmax_backward,
                      {"z": rng.standard_normal((N, V))}, seed=seed)


@register("cross_entropy", chapter=1)
def _cross_entropy(seed):
    rng = np.random.default_rng(seed)
    return check_pair("cross_entropy", losses.cross_entropy_forward,
                      losses.cross_entropy_backward,
                      {"logits": rng.standard_normal((N, V))},
                      static={"labels": rng.integers(0, V, N)}, seed=seed)


@register("mse", chapter=1)
def _mse(seed):
    rng = np.random.default_rng(seed)
    return check_pair("mse", losses.mse_forward, losses.mse_backward,
                      {"y": rng.standard_normal((N, D)), "target": rng.standard_normal((N, D))},
                      seed=seed)
