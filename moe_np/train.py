"""A minimal training loop over any model with params/grads/forward/backward."""
from __future__ import annotations

import numpy as np


def fit(model, x, target, loss_forward, loss_backward, optimizer, steps: int,
        batch_size: int, seed: int = 0, log_every: int = 0, log=print):
    """Minibatch training: sample a batch, forward, loss, backward, step.

    x: (N, D); target: (N, ...) as the loss expects. Returns the list of
    per-step losses. log_every > 0 prints a progress line that often.
    """
    if steps < 0 or batch_size < 1:
        raise ValueError(f"fit: steps must be >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    if len(x) != len(target):
        raise ValueError(f"fit: x has {len(x)} rows but target has {len(target)}")
    rng = np.random.default_rng(seed)
    history = []
    for step in range(steps):
        rows = rng.integers(0, len(x), batch_size)           # (B,)
        out = model.forward(x[rows])                          # (B, ...)
        loss, cache = loss_forward(out, target[rows])
        grads = loss_backward(1.0, cache)
        model.backward(grads[0] if isinstance(grads, tuple) else grads)
        optimizer.step(model.grads)
        history.append(float(loss))
        if log_every and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:5d}  loss {loss:.4f}")
    return history


def accuracy(logits, labels) -> float:
    """Share of rows whose arg-max logit is the label.   logits (N, V), labels (N,)."""
    return float(np.mean(np.argmax(logits, axis=1) == labels))
