"""Models built from the layer pairs, as Modules (see module.py).

A model has `params` and `grads` (dicts name -> array, same keys),
`forward(x) -> out` (which keeps what backward needs) and
`backward(dout) -> dx` (which stores fresh gradients in `grads`).
"""
from __future__ import annotations

import numpy as np

from moe_np import layers
from moe_np.module import Module


def he_init(rng, fan_in: int, shape, dtype=np.float64):
    """Normal(0, 2 / fan_in): keeps ReLU activations at unit scale."""
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)


class MLP(Module):
    """Two-layer network: y = relu(x W1 + b1) W2 + b2.

    x: (N, D)  W1: (D, H)  b1: (H,)  W2: (H, V)  b2: (V,)  ->  y: (N, V)
    """

    def __init__(self, d_in: int, hidden: int, d_out: int, seed: int = 0, dtype=np.float64):
        super().__init__()
        if min(d_in, hidden, d_out) < 1:
            raise ValueError(f"MLP: widths must be >= 1, got {d_in}, {hidden}, {d_out}")
        rng = np.random.default_rng(seed)
        self.params = {
            "w1": he_init(rng, d_in, (d_in, hidden), dtype),     # (D, H)
            "b1": np.zeros(hidden, dtype=dtype),                 # (H,)
            "w2": he_init(rng, hidden, (hidden, d_out), dtype),  # (H, V)
            "b2": np.zeros(d_out, dtype=dtype),                  # (V,)
        }
        self.init_grads()
        self._cache = None

    def forward(self, x):
        p = self.params
        a, c1 = layers.linear_forward(x, p["w1"], p["b1"])   # (N, H)
        h, c2 = layers.relu_forward(a)                       # (N, H)
        y, c3 = layers.linear_forward(h, p["w2"], p["b2"])   # (N, V)
        self._cache = (c1, c2, c3)
        return y

    def backward(self, dy):
        c1, c2, c3 = self._cache
        dh, dw2, db2 = layers.linear_backward(dy, c3)        # (N, H), (H, V), (V,)
        da = layers.relu_backward(dh, c2)                    # (N, H)
        dx, dw1, db1 = layers.linear_backward(da, c1)        # (N, D), (D, H), (H,)
        self.set_grads({"w1": dw1, "b1": db1, "w2": dw2, "b2": db2})
        return dx


class Linear(Module):
    """y = x W + b as a module.   x: (N, D_in) -> y: (N, D_out)."""

    def __init__(self, d_in: int, d_out: int, seed: int = 0, dtype=np.float64):
        super().__init__()
        if min(d_in, d_out) < 1:
            raise ValueError(f"Linear: widths must be >= 1, got {d_in}, {d_out}")
        rng = np.random.default_rng(seed)
        self.params = {"w": (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(dtype),
                       "b": np.zeros(d_out, dtype=dtype)}                # (D_in, D_out), (D_out,)
        self.init_grads()
        self._cache = None

    def forward(self, x):
        y, self._cache = layers.linear_forward(x, self.params["w"], self.params["b"])
        return y                                                   # (N, D_out)

    def backward(self, dy):
        dx, dw, db = layers.linear_backward(dy, self._cache)
        self.set_grads({"w": dw, "b": db})
        return dx


class Sequential(Module):
    """Modules applied in order; backward runs them in reverse.

    params and grads are flat dicts named "<index>.<name>", the very arrays
    of each module, so an optimizer over `params` updates the modules;
    train()/eval() reach every module.
    """

    def __init__(self, *modules):
        super().__init__()
        if not modules:
            raise ValueError("Sequential: give at least one module")
        self.modules = modules
        self.params = {f"{i}.{k}": v for i, m in enumerate(modules) for k, v in m.params.items()}
        self._collect_grads()

    def children(self) -> dict:
        return {str(i): m for i, m in enumerate(self.modules)}

    def _collect_grads(self):
        self.grads = {f"{i}.{k}": g for i, m in enumerate(self.modules) for k, g in m.grads.items()}

    def forward(self, x):
        for m in self.modules:
            x = m.forward(x)
        return x

    def backward(self, dy):
        for m in reversed(self.modules):
            dy = m.backward(dy)
        self._collect_grads()
        return dy

    @property
    def aux(self) -> float:
        """The sum of the modules' auxiliary losses from the last forward."""
        return float(sum(getattr(m, "aux", 0.0) for m in self.modules))
