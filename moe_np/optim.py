"""Optimizers over a model's `params` and `grads` dicts (name -> array).

Each `step()` updates the arrays in place, so a module's references stay valid.
"""
from __future__ import annotations

import numpy as np

from moe_np import validate


class SGD:
    """p <- p - lr * g."""

    def __init__(self, params: dict, lr: float):
        validate.positive("SGD", "lr", lr)
        self.params, self.lr = params, lr

    def step(self, grads: dict) -> None:
        for name, p in self.params.items():
            p -= self.lr * grads[name]


class Adam:
    """Adam (Kingma & Ba 2015) with bias correction:
    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    p <- p - lr * m_hat / (sqrt(v_hat) + eps).
    """

    def __init__(self, params: dict, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        validate.positive("Adam", "lr", lr)
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        self.v = {k: np.zeros_like(p) for k, p in params.items()}
        self.t = 0

    def step(self, grads: dict) -> None:
        b1, b2 = self.betas
        self.t += 1
        for name, p in self.params.items():
            g = grads[name]
            self.m[name] = b1 * self.m[name] + (1 - b1) * g
            self.v[name] = b2 * self.v[name] + (1 - b2) * g * g
            m_hat = self.m[name] / (1 - b1**self.t)
            v_hat = self.v[name] / (1 - b2**self.t)
            p -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
