"""The losses, as forward/backward pairs: cross-entropy, MSE, the mixture likelihood.

Shape letters: N rows, V classes. The softmax family they are built on
lives in `functional.py`.
"""
from __future__ import annotations

import numpy as np

from moe_np import validate
from moe_np.functional import log_softmax_forward, logsumexp


def cross_entropy_forward(logits, labels):
    """loss = -mean_n log softmax(logits)[n, labels[n]].

    logits: (N, V) float; labels: (N,) integers in [0, V) -> scalar.
    cache (softmax(logits), labels).
    """
    validate.ndim("cross_entropy_forward", "logits", logits, 2)
    n, v = logits.shape
    labels = np.asarray(labels)
    validate.shape("cross_entropy_forward", "labels", labels, (n,))
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"cross_entropy_forward: labels must be integers, got {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= v):
        raise ValueError(f"cross_entropy_forward: labels must lie in [0, {v}), "
                         f"got min {labels.min()} max {labels.max()}")
    logp, (p, _) = log_softmax_forward(logits)           # (N, V)
    loss = -logp[np.arange(n), labels].mean()            # scalar
    return loss, (p, labels)


def cross_entropy_backward(dloss, cache):
    """dlogits = dloss * (softmax(logits) - onehot(labels)) / N."""
    p, labels = cache
    n = p.shape[0]
    dlogits = p.copy()                                   # (N, V)
    dlogits[np.arange(n), labels] -= 1.0
    return dloss * dlogits / n


def mse_forward(y, target):
    """loss = mean((y - target)^2) over every entry.   y, target: same shape -> scalar."""
    validate.same_shape("mse_forward", "y", y, "target", target)
    diff = y - target                                    # same shape as y
    return np.mean(diff**2), diff


def mse_backward(dloss, diff):
    """dy = 2 dloss (y - target) / size,  dtarget = -dy."""
    dy = 2.0 * dloss * diff / diff.size                  # same shape as y
    return dy, -dy


def mixture_nll_forward(g, y_experts, target):
    """Competitive mixture loss of Jacobs, Jordan, Nowlan and Hinton (1991):

        L = -mean_n log sum_e g[n, e] exp(-||target[n] - y_experts[e, n]||^2 / 2)

    Each expert is a Gaussian guess with unit variance and the gate its prior;
    the gradient sends each token's error mostly to the experts that already
    explain it (their posterior responsibility r[n, e]), so experts compete
    instead of cooperating.   g: (N, E)  y_experts: (E, N, D)  target: (N, D)
    -> scalar. cache (responsibilities r (N, E), g, y_experts - target).
    """
    validate.ndim("mixture_nll_forward", "g", g, 2)
    validate.ndim("mixture_nll_forward", "y_experts", y_experts, 3)
    n, e = g.shape
    validate.shape("mixture_nll_forward", "y_experts", y_experts, (e, n, np.shape(target)[-1]))
    validate.shape("mixture_nll_forward", "target", target, (n, y_experts.shape[2]))
    err = y_experts - target[None]                                 # (E, N, D)
    s = np.log(g) - 0.5 * np.sum(err**2, axis=2).T                 # (N, E) log prior + log likelihood
    lse = logsumexp(s)                                             # (N,)
    r = np.exp(s - lse[:, None])                                   # (N, E) posterior responsibilities
    return -lse.mean(), (r, g, err)


def mixture_nll_backward(dloss, cache):
    """dg = -dloss r / (N g),  dy_experts[e, n] = dloss r[n, e] (y_e - target) / N,
    dtarget = -sum_e dy_experts[e].   -> (dg (N, E), dy_experts (E, N, D), dtarget (N, D))."""
    r, g, err = cache
    n = g.shape[0]
    dg = -dloss * r / (n * g)                                      # (N, E)
    dy_experts = dloss * r.T[:, :, None] * err / n                 # (E, N, D)
    return dg, dy_experts, -dy_experts.sum(axis=0)
