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

from typing import Callable, NamedTuple

import numpy as np

from moe_np import functional, layers, validate


def _check_x(fn, x, w):
    validate.ndim(fn, "x", x, 2)
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"{fn}: x has D={x.shape[1]} but the gate weight has D={w.shape[0]}")


class LinearGateCache(NamedTuple):
    linear_cache: tuple     # (x, W)
    softmax_cache: functional.SoftmaxCache   # (g, axis, T)


class MlpGateCache(NamedTuple):
    linear1: tuple          # (x, W1)
    mask: np.ndarray        # (N, J) the ReLU pattern
    linear2: tuple          # (h, W2)
    softmax_cache: functional.SoftmaxCache


def softmax_gate_forward(x, w, b, temperature: float = 1.0):
    """g = softmax((x W + b) / T).   x: (N, D)  W: (D, E)  b: (E,)  ->  g: (N, E)."""
    _check_x("softmax_gate_forward", x, w)
    logits, lin_cache = layers.linear_forward(x, w, b)             # (N, E)
    g, sm_cache = functional.softmax_forward(logits, temperature=temperature)   # (N, E)
    return g, LinearGateCache(lin_cache, sm_cache)


def softmax_gate_backward(dg, cache):
    """-> dx (N, D), dW (D, E), db (E,)."""
    dlogits = functional.softmax_backward(dg, cache.softmax_cache)    # (N, E)
    return layers.linear_backward(dlogits, cache.linear_cache)


def mlp_gate_forward(x, w1, b1, w2, b2, temperature: float = 1.0):
    """g = softmax((relu(x W1 + b1) W2 + b2) / T).

    x: (N, D)  W1: (D, J)  b1: (J,)  W2: (J, E)  b2: (E,)  ->  g: (N, E)
    (J is the gate's own hidden width, `gate_hidden`.)
    """
    _check_x("mlp_gate_forward", x, w1)
    a, c1 = layers.linear_forward(x, w1, b1)                       # (N, J)
    h, c2 = layers.relu_forward(a)                                 # (N, J)
    logits, c3 = layers.linear_forward(h, w2, b2)                  # (N, E)
    g, c4 = functional.softmax_forward(logits, temperature=temperature)  # (N, E)
    return g, MlpGateCache(c1, c2, c3, c4)


def mlp_gate_selection(cache: MlpGateCache):
    """The hidden ReLU pattern (N, J): the gate's only kink."""
    return cache.mask


def mlp_gate_backward(dg, cache: MlpGateCache):
    """-> dx (N, D), dW1 (D, J), db1 (J,), dW2 (J, E), db2 (E,)."""
    dlogits = functional.softmax_backward(dg, cache.softmax_cache)    # (N, E)
    dh, dw2, db2 = layers.linear_backward(dlogits, cache.linear2) # (N, J), (J, E), (E,)
    da = layers.relu_backward(dh, cache.mask)                     # (N, J)
    dx, dw1, db1 = layers.linear_backward(da, cache.linear1)      # (N, D), (D, J), (J,)
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
    g, sm_cache = functional.softmax_forward(logits, axis=1, temperature=temperature)  # (N, E, D_out)
    return g, LinearGateCache(lin_cache, sm_cache)


def per_dim_gate_backward(dg, cache: LinearGateCache):
    """-> dx (N, D), dW (D, E*D_out), db (E*D_out,)."""
    dlogits = functional.softmax_backward(dg, cache.softmax_cache)    # (N, E, D_out)
    return layers.linear_backward(dlogits.reshape(len(dg), -1), cache.linear_cache)


# -- the registry of gates, with their parameter names and initialisation -------

class GateKind(NamedTuple):
    forward: Callable     # (x, *weights, temperature=...) -> g, cache
    backward: Callable    # (dg, cache) -> dx, *dweights (in `names` order)
    names: tuple          # parameter names (DenseMoE keys), in forward's order


GATES = {
    "softmax": GateKind(softmax_gate_forward, softmax_gate_backward, ("w_router", "b_router")),
    "mlp": GateKind(mlp_gate_forward, mlp_gate_backward,
                    ("w_router1", "b_router1", "w_router2", "b_router2")),
    "per_dim": GateKind(per_dim_gate_forward, per_dim_gate_backward, ("w_router", "b_router")),
}


def gate_kind(kind: str) -> GateKind:
    """The registered gate `kind` (the registry is the one list of gate kinds)."""
    validate.one_of("gate_kind", "gate", kind, GATES)
    return GATES[kind]


def gate_selection(kind: str, cache) -> tuple:
    """The gate's discrete choices: the MLP gate's ReLU pattern, else ()."""
    return (mlp_gate_selection(cache),) if kind == "mlp" else ()


def init_gate(kind: str, d_model: int, num_experts: int, rng, gate_hidden: int = 16,
              scale: float = 0.1, dtype=np.float64) -> dict:
    """Small random gate weights (near-uniform mixing at the start), zero biases, in dtype."""
    gate_kind(kind)
    normal = lambda shape, std: (std * rng.standard_normal(shape)).astype(dtype)
    if kind == "mlp":
        return {"w_router1": normal((d_model, gate_hidden), np.sqrt(2 / d_model)),   # (D, J)
                "b_router1": np.zeros(gate_hidden, dtype=dtype),                     # (J,)
                "w_router2": normal((gate_hidden, num_experts), scale),              # (J, E)
                "b_router2": np.zeros(num_experts, dtype=dtype)}                     # (E,)
    width = num_experts * (d_model if kind == "per_dim" else 1)
    return {"w_router": normal((d_model, width), scale),                            # (D, E[*D])
            "b_router": np.zeros(width, dtype=dtype)}                               # (E[*D],)
