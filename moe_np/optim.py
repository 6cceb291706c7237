"""Optimizers over a model's `params` and `grads` dicts (name -> array).

Each `step(grads)` updates the arrays in place, so a module's references
stay valid. Optimizer state (moments, step count) is saved and restored
with `state_dict()` / `load_state_dict()`, strictly, like a Module's.
"""
from __future__ import annotations

import numpy as np

from moe_np import validate
from moe_np.module import check_state_dict


class Optimizer:
    """Base: params, named per-parameter state slots, a step count."""
    slots: tuple = ()

    def __init__(self, params: dict, lr: float):
        validate.positive(type(self).__name__, "lr", lr)
        self.params, self.lr, self.t = params, lr, 0
        self.state = {s: {k: np.zeros_like(p) for k, p in params.items()} for s in self.slots}

    def state_dict(self) -> dict:
        sd = {"t": np.array(self.t, dtype=np.int64)}
        sd |= {f"{s}.{k}": v.copy() for s, d in self.state.items() for k, v in d.items()}
        return sd

    def load_state_dict(self, sd: dict) -> None:
        check_state_dict(type(self).__name__, self.state_dict(), sd)
        self.t = int(sd["t"])
        for s, d in self.state.items():
            for k in d:
                d[k][...] = sd[f"{s}.{k}"]

    def _check(self, grads: dict) -> None:
        if set(grads) != set(self.params):
            raise ValueError(f"{type(self).__name__}.step: grads have keys {sorted(grads)}, "
                             f"params have {sorted(self.params)}")


class SGD(Optimizer):
    """p <- p - lr * g; with momentum mu: v <- mu v + g, p <- p - lr * v."""
    slots = ("velocity",)

    def __init__(self, params: dict, lr: float, momentum: float = 0.0):
        super().__init__(params, lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def step(self, grads: dict) -> None:
        self._check(grads)
        self.t += 1
        for name, p in self.params.items():
            g = grads[name]
            if self.momentum:
                v = self.state["velocity"][name]
                v *= self.momentum
                v += g
                g = v
            p -= self.lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction:
    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    p <- p - lr * m_hat / (sqrt(v_hat) + eps).
    weight_decay > 0 gives AdamW (Loshchilov & Hutter 2019): p <- p - lr * wd * p,
    decoupled from the moments.
    """
    slots = ("m", "v")

    def __init__(self, params: dict, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"{type(self).__name__}: betas must lie in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"{type(self).__name__}: weight_decay must be >= 0, got {weight_decay}")
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    def step(self, grads: dict) -> None:
        self._check(grads)
        b1, b2 = self.betas
        self.t += 1
        for name, p in self.params.items():
            g, m, v = grads[name], self.state["m"][name], self.state["v"][name]
            m[...] = b1 * m + (1 - b1) * g
            v[...] = b2 * v + (1 - b2) * g * g
            m_hat = m / (1 - b1**self.t)
            v_hat = v / (1 - b2**self.t)
            if self.weight_decay:
                p -= self.lr * self.weight_decay * p
            p -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


class AdamW(Adam):
    """Adam with decoupled weight decay (default 0.01)."""

    def __init__(self, params: dict, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr, betas, eps, weight_decay)
