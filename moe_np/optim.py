"""Optimizers over a model's `params` and `grads` dicts (name -> array).

Each `step(grads)` updates the arrays in place, so a module's references
stay valid. Optimizer state (moments, step count) is saved and restored
with `state_dict()` / `load_state_dict()`, strictly, like a Module's.

    SGD, Adam, AdamW          the update rules
    clip_grad_norm            rescale every gradient when their global norm is too large
    WarmupCosine              linear warm-up, then cosine decay to a floor: lr(t)

An optimizer given `schedule=` takes its learning rate from `schedule.lr(t)`
before each update, t = the number of updates already applied (its `t`).
Because t is in the optimizer's state dict, a resumed run continues the
schedule exactly; a step skipped for an overflow (no update) does not
advance it, as in Megatron-LM, which steps its scheduler only after a
successful update.
"""
from __future__ import annotations

import math

import numpy as np

from moe_np import compiled, validate
from moe_np.module import check_state_dict


class Optimizer:
    """Base: params, named per-parameter state slots, a step count."""
    slots: tuple = ()

    def __init__(self, params: dict, lr: float, schedule=None):
        validate.positive(type(self).__name__, "lr", lr)
        if schedule is not None and not callable(getattr(schedule, "lr", None)):
            raise ValueError(f"{type(self).__name__}: schedule must have a method lr(step), "
                             f"got {type(schedule).__name__}")
        self.params, self.lr, self.t, self.schedule = params, lr, 0, schedule
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
        """Same keys as the params; then, with a schedule, lr <- schedule.lr(t)."""
        if set(grads) != set(self.params):
            raise ValueError(f"{type(self).__name__}.step: grads have keys {sorted(grads)}, "
                             f"params have {sorted(self.params)}")
        if self.schedule is not None:
            self.lr = self.schedule.lr(self.t)


class SGD(Optimizer):
    """p <- p - lr * g; with momentum mu: v <- mu v + g, p <- p - lr * v."""
    slots = ("velocity",)

    def __init__(self, params: dict, lr: float, momentum: float = 0.0, schedule=None):
        super().__init__(params, lr, schedule)
        validate.probability("SGD", "momentum", momentum)
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
                 weight_decay: float = 0.0, schedule=None):
        super().__init__(params, lr, schedule)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"{type(self).__name__}: betas must lie in [0, 1), got {betas}")
        validate.non_negative(type(self).__name__, "weight_decay", weight_decay)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    def step(self, grads: dict) -> None:
        """Every parameter updated in place: one compiled pass (optim_kernels) where it gives
        NumPy's bits, else update_numpy, its twin."""
        self._check(grads)
        self.t += 1
        kernels = compiled.load("optim_kernels")                   # None without numba
        if kernels is not None:
            hyper = kernels.AdamHyper(*self.betas, self.lr, self.eps, self.weight_decay, self.t)
        for name, p in self.params.items():
            g, m, v = grads[name], self.state["m"][name], self.state["v"][name]
            if kernels is None or not kernels.adam_update(p, g, m, v, hyper, strict=False):
                self.update_numpy(p, g, m, v)

    def update_numpy(self, p, g, m, v) -> None:
        """One parameter's update in NumPy (t already advanced): the twin of the kernel."""
        b1, b2 = self.betas
        m *= b1                                        # m <- b1 m + (1 - b1) g, in place
        m += (1 - b1) * g
        v *= b2                                        # v <- b2 v + (1 - b2) g g
        g2 = (1 - b2) * g                              # g's shape and dtype
        g2 *= g
        v += g2
        step = m / (1 - b1**self.t)                    # m_hat, then lr m_hat / (...)
        step *= self.lr
        den = v / (1 - b2**self.t)                     # v_hat, then sqrt(v_hat) + eps
        np.sqrt(den, out=den)
        den += self.eps
        step /= den
        if self.weight_decay:
            p -= self.lr * self.weight_decay * p
        p -= step


class AdamW(Adam):
    """Adam with decoupled weight decay (default 0.01)."""

    def __init__(self, params: dict, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, schedule=None):
        super().__init__(params, lr, betas, eps, weight_decay, schedule)


def clip_grad_norm(grads: dict, max_norm: float):
    """Rescale all gradients together so their global L2 norm is at most max_norm.

        norm = sqrt(sum_k sum |g_k|^2);   g_k <- g_k * min(1, max_norm / norm)

    grads: name -> array (any shapes) -> (clipped grads, same keys, shapes and
    dtypes; norm as a float). The norm is summed in float64, so float16 or
    float32 gradients cannot overflow it. Below the threshold the arrays are
    returned unchanged (the same objects); above it, fresh arrays. A
    non-finite norm (an inf or NaN somewhere) is returned as it is with the
    gradients untouched: scaling by it would turn every entry into NaN, and
    the caller (a loss scaler) skips such a step anyway. PyTorch's
    clip_grad_norm_ divides by norm + 1e-6; here the division is exact, so a
    clipped set has norm max_norm up to rounding.
    """
    validate.positive("clip_grad_norm", "max_norm", max_norm)
    if not isinstance(grads, dict):
        raise ValueError(f"clip_grad_norm: grads must be a dict of arrays, got {type(grads).__name__}")
    total = sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values())
    norm = math.sqrt(total)
    if not math.isfinite(norm) or norm <= max_norm:
        return grads, norm
    factor = max_norm / norm
    return {k: (g * factor).astype(g.dtype, copy=False) for k, g in grads.items()}, norm


class WarmupCosine:
    """Linear warm-up to peak_lr, then cosine decay to floor_lr; constant after total_steps.

        t < W:      lr(t) = peak * (t + 1) / W
        W <= t < T: lr(t) = floor + (peak - floor) * (1 + cos(pi * (t - W) / (T - W))) / 2
        t >= T:     lr(t) = floor

    t counts updates from 0, W = warmup_steps, T = total_steps. The first
    update already uses peak / W (never 0). The schedule is a pure function
    of t and has no state of its own: the optimizer's t is what a checkpoint
    saves.
    """

    def __init__(self, peak_lr: float, total_steps: int, warmup_steps: int = 0,
                 floor_lr: float = 0.0):
        validate.positive("WarmupCosine", "peak_lr", peak_lr)
        validate.integer("WarmupCosine", "total_steps", total_steps, minimum=0)
        validate.integer("WarmupCosine", "warmup_steps", warmup_steps, minimum=0)
        if warmup_steps > total_steps:
            raise ValueError(f"WarmupCosine: warmup_steps={warmup_steps} exceeds "
                             f"total_steps={total_steps}")
        if not 0.0 <= floor_lr <= peak_lr:
            raise ValueError(f"WarmupCosine: floor_lr must be in [0, peak_lr={peak_lr}], got {floor_lr}")
        self.peak, self.total, self.warmup, self.floor = float(peak_lr), int(total_steps), \
            int(warmup_steps), float(floor_lr)

    def lr(self, step: int) -> float:
        validate.integer("WarmupCosine.lr", "step", step, minimum=0)
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if step >= self.total:
            return self.floor
        progress = (step - self.warmup) / (self.total - self.warmup)
        return self.floor + (self.peak - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
