"""Dense gates: the network that decides how much each expert counts.

Every gate maps tokens x (N, D) to mixing weights over E experts that are
positive and sum to one, g = softmax(logits(x) / T). They differ in how the
logits are made:

    softmax gate     logits = x W + b                        g: (N, E)
    MLP gate         logits = relu(x W1 + b1) W2 + b2        g: (N, E)
    per-dim gate     logits = (x W + b) reshaped (N, E, D)   g: (N, E, D),
                     softmax over E separately for each output dimension

Gate dropout (inverted, seeded) is `layers.dropout_forward` applied to g.
Each backward returns (dx, then one gradient per parameter, in order).
"""
from __future__ import annotations

from moe_np import layers, losses, validate


def _check_x(fn, x, w):
    validate.ndim(fn, "x", x, 2)
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"{fn}: x has D={x.shape[1]} but the gate weight has D={w.shape[0]}")


def softmax_gate_forward(x, w, b, temperature: float = 1.0):
    """g = softmax((x W + b) / T).   x: (N, D)  W: (D, E)  b: (E,)  ->  g: (N, E)."""
    _check_x("softmax_gate_forward", x, w)
    logits, lin_cache = layers.linear_forward(x, w, b)             # (N, E)
    g, sm_cache = losses.softmax_forward(logits, temperature=temperature)   # (N, E)
    return g, (lin_cache, sm_cache)


def softmax_gate_backward(dg, cache):
    """-> dx (N, D), dW (D, E), db (E,)."""
    lin_cache, sm_cache = cache
    dlogits = losses.softmax_backward(dg, sm_cache)               # (N, E)
    return layers.linear_backward(dlogits, lin_cache)


def mlp_gate_forward(x, w1, b1, w2, b2, temperature: float = 1.0):
    """g = softmax((relu(x W1 + b1) W2 + b2) / T).

    x: (N, D)  W1: (D, G)  b1: (G,)  W2: (G, E)  b2: (E,)  ->  g: (N, E)
    (G is the gate's own hidden width.)
    """
    _check_x("mlp_gate_forward", x, w1)
    a, c1 = layers.linear_forward(x, w1, b1)                       # (N, G)
    h, c2 = layers.relu_forward(a)                                 # (N, G)
    logits, c3 = layers.linear_forward(h, w2, b2)                  # (N, E)
    g, c4 = losses.softmax_forward(logits, temperature=temperature)  # (N, E)
    return g, (c1, c2, c3, c4)


def mlp_gate_backward(dg, cache):
    """-> dx (N, D), dW1 (D, G), db1 (G,), dW2 (G, E), db2 (E,)."""
    c1, c2, c3, c4 = cache
    dlogits = losses.softmax_backward(dg, c4)                     # (N, E)
    dh, dw2, db2 = layers.linear_backward(dlogits, c3)            # (N, G), (G, E), (E,)
    da = layers.relu_backward(dh, c2)                             # (N, G)
    dx, dw1, db1 = layers.linear_backward(da, c1)                 # (N, D), (D, G), (G,)
    return dx, dw1, db1, dw2, db2


def per_dim_gate_forward(x, w, b, num_experts: int, temperature: float = 1.0):
    """g[n, e, d] = softmax_e((x W + b)[n, e*D_out + d] / T).

    x: (N, D)  W: (D, E*D_out)  b: (E*D_out,)  ->  g: (N, E, D_out)
    Each output dimension d has its own mixture over the experts, so the
    combined output is y[n, d] = sum_e g[n, e, d] f_e(x)[n, d].
    """
    _check_x("per_dim_gate_forward", x, w)
    if num_experts < 1 or w.shape[1] % num_experts:
        raise ValueError(f"per_dim_gate_forward: the gate weight's {w.shape[1]} columns "
                         f"do not split into num_experts={num_experts} groups")
    logits, lin_cache = layers.linear_forward(x, w, b)             # (N, E*D_out)
    logits = logits.reshape(len(x), num_experts, -1)               # (N, E, D_out)
    g, sm_cache = losses.softmax_forward(logits, axis=1, temperature=temperature)  # (N, E, D_out)
    return g, (lin_cache, sm_cache)


def per_dim_gate_backward(dg, cache):
    """-> dx (N, D), dW (D, E*D_out), db (E*D_out,)."""
    lin_cache, sm_cache = cache
    dlogits = losses.softmax_backward(dg, sm_cache)               # (N, E, D_out)
    return layers.linear_backward(dlogits.reshape(len(dg), -1), lin_cache)
