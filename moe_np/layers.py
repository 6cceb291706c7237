"""Layers as pure forward/backward pairs.

    y, cache = f_forward(...)        grads = f_backward(dy, cache)

Shape letters: N tokens (rows), D input width, H output width.
Backward passes return fresh arrays and never accumulate into anything.
The elementwise activations accept any shape; linear takes (..., D) rows.
"""
from __future__ import annotations

import numpy as np

from moe_np import validate
from moe_np.functional import sigmoid

GELU_C = np.sqrt(2.0 / np.pi)   # the tanh form of GELU: 0.5 x (1 + tanh(c (x + a x^3)))
GELU_A = 0.044715


def linear_forward(x, w, b):
    """y = x @ w + b.   x: (N, D)  w: (D, H)  b: (H,)  ->  y: (N, H); cache (x, w)."""
    validate.ndim("linear_forward", "w", w, 2)
    validate.ndim("linear_forward", "b", b, 1)
    if np.ndim(x) < 1 or np.shape(x)[-1] != w.shape[0]:
        raise ValueError(f"linear_forward: x has D={np.shape(x)[-1] if np.ndim(x) else None} "
                         f"but w has D={w.shape[0]} (x {np.shape(x)}, w {w.shape})")
    if b.shape[0] != w.shape[1]:
        raise ValueError(f"linear_forward: b has H={b.shape[0]} but w has H={w.shape[1]}")
    y = x @ w + b                                        # (N, H)
    return y, (x, w)


def linear_backward(dy, cache):
    """dx = dy w^T, dw = x^T dy, db = sum_n dy.   -> (dx (N, D), dw (D, H), db (H,))."""
    x, w = cache
    dx = dy @ w.T                                        # (N, D)
    x2 = x.reshape(-1, x.shape[-1])                      # (N, D) with leading axes folded
    dy2 = dy.reshape(-1, dy.shape[-1])                   # (N, H)
    dw = x2.T @ dy2                                      # (D, H)
    db = dy2.sum(axis=0)                                 # (H,)
    return dx, dw, db


def relu_forward(x):
    """y = max(x, 0).   any shape; cache the mask x > 0."""
    mask = x > 0                                         # same shape as x
    return x * mask, mask


def relu_backward(dy, mask):
    """dx = dy * [x > 0]."""
    return dy * mask


def gelu_forward(x):
    """y = 0.5 x (1 + tanh(u)), u = c (x + a x^3), c = sqrt(2/pi), a = 0.044715.

    Computed as y = x * sigmoid(2u), the same function: 0.5 (1 + tanh(u)) =
    sigmoid(2u), and the sigmoid form keeps full precision in the left tail
    where 1 + tanh(u) cancels. cache (x, s = sigmoid(2u)).
    """
    s = sigmoid(2.0 * GELU_C * (x + GELU_A * x**3))      # same shape as x
    return x * s, (x, s)


def gelu_backward(dy, cache):
    """dx = dy * (s + x * 2 s (1 - s) * du/dx),  du/dx = c (1 + 3 a x^2)."""
    x, s = cache
    du_dx = GELU_C * (1.0 + 3.0 * GELU_A * x**2)         # same shape as x
    return dy * (s + x * 2.0 * s * (1.0 - s) * du_dx)


def silu_forward(x):
    """y = x * sigmoid(x).   cache (x, s)."""
    s = sigmoid(x)                                       # same shape as x
    return x * s, (x, s)


def silu_backward(dy, cache):
    """dx = dy * s (1 + x (1 - s))."""
    x, s = cache
    return dy * s * (1.0 + x * (1.0 - s))


def swiglu_forward(a, b):
    """y = silu(a) * b, the gated unit of SwiGLU FFNs.   a, b: (N, H) -> y: (N, H)."""
    validate.same_shape("swiglu_forward", "a", a, "b", b)
    silu_a, silu_cache = silu_forward(a)                 # (N, H)
    return silu_a * b, (silu_a, silu_cache, b)


def swiglu_backward(dy, cache):
    """da = dy * b * silu'(a), db = dy * silu(a).   -> (da, db)."""
    silu_a, silu_cache, b = cache
    da = silu_backward(dy * b, silu_cache)               # (N, H)
    db = dy * silu_a                                     # (N, H)
    return da, db


def dropout_forward(x, p: float, seed):
    """Inverted dropout: y = x * m / (1 - p), m ~ Bernoulli(1 - p).

    seed: an int or np.random.Generator; the same seed gives the same mask.
    p = 0 is the identity. cache is the scaled mask m / (1 - p).
    """
    validate.probability("dropout_forward", "p", p)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    keep = rng.random(np.shape(x)) >= p                  # same shape as x
    scale = (keep / (1.0 - p)).astype(np.asarray(x).dtype)   # same shape and dtype as x
    return x * scale, scale


def dropout_backward(dy, scale):
    """dx = dy * m / (1 - p)."""
    return dy * scale
