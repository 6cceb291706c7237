"""Experts: E feed-forward networks with stacked weights, applied as one batch.

    ReLU MLP expert   f_e(x) = relu(x W1[e] + b1[e]) W2[e] + b2[e]
    SwiGLU expert     f_e(x) = (silu(x Wg[e]) * (x Wu[e])) Wd[e]      (Mixtral's FFN)

Weights are stacked over experts: W1 (E, D, H), W2 (E, H, D) and so on.
The input is either shared by every expert, x (N, D) -> y (E, N, D) (the
dense mixture), or one batch of rows per expert, x (E, M, D) -> y (E, M, D)
(a sparse layer's expert-contiguous segments, one expert at a time with
E = 1). Backward returns dx in the shape x came in: for a shared x the
experts' contributions are summed.
"""
from __future__ import annotations

import numpy as np

from moe_np import layers, validate


def _batched(fn, x, w_in):
    """x as (E or 1, M, D), after checking it against the stacked input weight."""
    validate.ndim(fn, "w_in", w_in, 3)
    if np.ndim(x) not in (2, 3):
        raise ValueError(f"{fn}: x must be (N, D) or (E, M, D), got shape {np.shape(x)}")
    if x.shape[-1] != w_in.shape[1]:
        raise ValueError(f"{fn}: x has D={x.shape[-1]} but the expert weights have D={w_in.shape[1]}")
    if x.ndim == 3 and x.shape[0] != w_in.shape[0]:
        raise ValueError(f"{fn}: x has {x.shape[0]} expert batches but there are E={w_in.shape[0]} experts")
    return x if x.ndim == 3 else x[None]                           # (E or 1, M, D)


def _input_grad(dxb, x):
    """Sum the experts' input gradients when they shared one x."""
    return dxb if x.ndim == 3 else dxb.sum(axis=0)                 # (E, M, D) or (N, D)


def _weight_grad(xb, dy):
    """sum over rows of x^T dy for each expert.   (E|1, M, D), (E, M, H) -> (E, D, H)."""
    return np.swapaxes(xb, -1, -2) @ dy                            # (E, D, H)


def mlp_experts_forward(x, w1, b1, w2, b2):
    """y[e] = relu(x W1[e] + b1[e]) W2[e] + b2[e].

    x: (N, D) or (E, M, D)  W1: (E, D, H)  b1: (E, H)  W2: (E, H, D)  b2: (E, D)
    -> y: (E, N, D) or (E, M, D).  cache (x, W1, W2, hidden pre-activation, hidden).
    """
    xb = _batched("mlp_experts_forward", x, w1)                    # (E|1, M, D)
    validate.shape("mlp_experts_forward", "b1", b1, (w1.shape[0], w1.shape[2]))
    validate.shape("mlp_experts_forward", "w2", w2, (w1.shape[0], w1.shape[2], w1.shape[1]))
    validate.shape("mlp_experts_forward", "b2", b2, (w1.shape[0], w1.shape[1]))
    a = xb @ w1 + b1[:, None, :]                                   # (E, M, H)
    h, mask = layers.relu_forward(a)                               # (E, M, H)
    y = h @ w2 + b2[:, None, :]                                    # (E, M, D)
    return y, (x, xb, w1, w2, h, mask)


def mlp_experts_backward(dy, cache):
    """-> dx (as x), dW1 (E, D, H), db1 (E, H), dW2 (E, H, D), db2 (E, D)."""
    x, xb, w1, w2, h, mask = cache
    dw2 = _weight_grad(h, dy)                                      # (E, H, D)
    db2 = dy.sum(axis=1)                                           # (E, D)
    da = layers.relu_backward(dy @ np.swapaxes(w2, -1, -2), mask)  # (E, M, H)
    dw1 = _weight_grad(xb, da)                                     # (E, D, H)
    db1 = da.sum(axis=1)                                           # (E, H)
    dx = _input_grad(da @ np.swapaxes(w1, -1, -2), x)              # as x
    return dx, dw1, db1, dw2, db2


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
    return y, (x, xb, w_gate, w_up, w_down, u, glu_cache)


def swiglu_experts_backward(dy, cache):
    """-> dx (as x), dWg (E, D, H), dWu (E, D, H), dWd (E, H, D)."""
    x, xb, w_gate, w_up, w_down, u, glu_cache = cache
    dw_down = _weight_grad(u, dy)                                  # (E, H, D)
    du = dy @ np.swapaxes(w_down, -1, -2)                          # (E, M, H)
    da, db = layers.swiglu_backward(du, glu_cache)                 # (E, M, H), (E, M, H)
    dw_gate = _weight_grad(xb, da)                                 # (E, D, H)
    dw_up = _weight_grad(xb, db)                                   # (E, D, H)
    dxb = da @ np.swapaxes(w_gate, -1, -2) + db @ np.swapaxes(w_up, -1, -2)   # (E, M, D)
    return _input_grad(dxb, x), dw_gate, dw_up, dw_down


EXPERTS = {
    # name: (forward, backward, parameter names in backward's order)
    "mlp": (mlp_experts_forward, mlp_experts_backward, ("w1", "b1", "w2", "b2")),
    "swiglu": (swiglu_experts_forward, swiglu_experts_backward, ("w_gate", "w_up", "w_down")),
}


def init_experts(kind: str, num_experts: int, d_model: int, d_hidden: int, rng):
    """Random expert parameters: He-scaled normal weights, zero biases."""
    if kind not in EXPERTS:
        raise ValueError(f"init_experts: kind must be one of {sorted(EXPERTS)}, got {kind!r}")
    if min(num_experts, d_model, d_hidden) < 1:
        raise ValueError(f"init_experts: num_experts, d_model, d_hidden must be >= 1, "
                         f"got {num_experts}, {d_model}, {d_hidden}")
    e, d, h = num_experts, d_model, d_hidden
    if kind == "mlp":
        return {"w1": rng.standard_normal((e, d, h)) * np.sqrt(2 / d),      # (E, D, H)
                "b1": np.zeros((e, h)),                                       # (E, H)
                "w2": rng.standard_normal((e, h, d)) * np.sqrt(1 / h),      # (E, H, D)
                "b2": np.zeros((e, d))}                                       # (E, D)
    return {"w_gate": rng.standard_normal((e, d, h)) * np.sqrt(1 / d),      # (E, D, H)
            "w_up": rng.standard_normal((e, d, h)) * np.sqrt(1 / d),        # (E, D, H)
            "w_down": rng.standard_normal((e, h, d)) * np.sqrt(1 / h)}      # (E, H, D)
