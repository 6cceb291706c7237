"""The training side of low precision: state carried from one step to the next.

    found_inf        any inf or NaN among the gradients (the step is then skipped)
    LossScaler       PyTorch GradScaler's dynamic rule, with Megatron's hysteresis
    DelayedScaling   an fp8 tensor scale from the amaxes of past steps
    MasterWeights    float32 master copies behind a model whose weights are rounded

Each has a state_dict for checkpoints. The number formats and the stateless
scalings they rely on (round_to, amax_scale, quantize) are in precision.py;
chapter 6 explains both.
"""
from __future__ import annotations

import numpy as np

from moe_np.module import check_state_dict
from moe_np.precision import (FLOAT32_MAX, _check_f32, _check_fmt, _check_int, _check_scale, amax_scale,
                              round_to)


def found_inf(grads: dict) -> bool:
    """True if any entry of any gradient is inf or NaN."""
    if not isinstance(grads, dict):
        raise ValueError(f"found_inf: grads must be a dict of arrays, got {type(grads).__name__}")
    return any(not np.all(np.isfinite(g)) for g in grads.values())


class LossScaler:
    """Dynamic loss scaling with torch.cuda.amp.GradScaler's update rule.

    A step: loss * scale -> backward -> grads, found = scaler.unscale(grads)
    -> skip the optimizer step if found -> scaler.update(found).
      overflow:  growth_tracker = 0; scale *= backoff_factor
      otherwise: growth_tracker += 1; at growth_interval: scale *= growth_factor, tracker = 0
    hysteresis h (Megatron-LM's DynamicGradScaler, DeepSpeed's default): a
    counter starts at h, each overflow lowers it, and the scale backs off only
    once it reaches 0, then on every overflow until a growth resets it to h.
    The overflows need not be consecutive. h = 1 is PyTorch's rule.
    The scale stays a finite, nonzero float32 value: a growth or backoff that
    would leave that range keeps the old scale. dynamic=False: never changes.
    """

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, dynamic=True, hysteresis=1):
        fn = "LossScaler"
        if not (np.isfinite(init_scale) and 0 < init_scale <= FLOAT32_MAX):
            raise ValueError(f"{fn}: init_scale must be positive and a finite float32, got {init_scale}")
        if not (np.isfinite(growth_factor) and growth_factor > 1):
            raise ValueError(f"{fn}: growth_factor must be finite and > 1, got {growth_factor}")
        if not (0 < backoff_factor < 1):
            raise ValueError(f"{fn}: backoff_factor must be in (0, 1), got {backoff_factor}")
        _check_int(fn, "growth_interval", growth_interval, 1)
        _check_int(fn, "hysteresis", hysteresis, 1)
        self.scale = float(np.float32(init_scale))
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.hysteresis = int(growth_interval), int(hysteresis)
        self.dynamic = bool(dynamic)
        self.growth_tracker = 0
        self.hysteresis_tracker = self.hysteresis
        self.unscaled = False                 # set by unscale, cleared by update

    def unscale(self, grads: dict):
        """(grads * (1 / scale), found_inf).  Each result keeps its gradient's dtype.

        The product is formed in float64 and rounded once, so a power-of-two
        scale is undone exactly, even where 1 / scale would underflow in a
        16-bit gradient's own dtype (float16: 1 / 2**25 rounds to 0). Once per
        step: a second call before update() raises RuntimeError (it would
        divide by the scale twice).
        """
        if self.unscaled:
            raise RuntimeError("LossScaler.unscale: already called since the last update(); "
                               "call update(found_inf) first")
        if not isinstance(grads, dict):
            raise ValueError(f"LossScaler.unscale: grads must be a dict of arrays, "
                             f"got {type(grads).__name__}")
        for k, g in grads.items():
            if not isinstance(g, np.ndarray) or not np.issubdtype(g.dtype, np.floating):
                raise ValueError(f"LossScaler.unscale: grads[{k!r}] must be a floating-point array, "
                                 f"got {getattr(g, 'dtype', type(g).__name__)}")
        inv = 1.0 / self.scale
        out = {k: (np.asarray(g, dtype=np.float64) * inv).astype(g.dtype) for k, g in grads.items()}
        self.unscaled = True
        return out, found_inf(out)

    def update(self, found_inf: bool) -> None:
        """Adjust scale and trackers after a step (the rule in the class docstring)."""
        self.unscaled = False
        if not self.dynamic:
            return
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker = max(self.hysteresis_tracker - 1, 0)
            if self.hysteresis_tracker == 0:
                self.scale = self._times(self.backoff_factor)
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale = self._times(self.growth_factor)
            self.growth_tracker = 0
            self.hysteresis_tracker = self.hysteresis

    def _times(self, factor: float) -> float:
        """scale * factor rounded to float32, or the old scale if that is inf or 0."""
        new = self.scale * factor
        if not (0.0 < new <= FLOAT32_MAX) or np.float32(new) == 0:
            return self.scale
        return float(np.float32(new))

    def state_dict(self) -> dict:
        return {"scale": np.array(self.scale, dtype=np.float64),                 # ()
                "growth_tracker": np.array(self.growth_tracker, dtype=np.int64),  # ()
                "hysteresis_tracker": np.array(self.hysteresis_tracker, dtype=np.int64)}   # ()

    def load_state_dict(self, sd: dict) -> None:
        """Strict: keys, shapes, dtypes as state_dict writes them; values in range."""
        check_state_dict("LossScaler", self.state_dict(), sd)
        scale, growth, hyst = float(sd["scale"]), int(sd["growth_tracker"]), int(sd["hysteresis_tracker"])
        if not (0 < scale <= FLOAT32_MAX):
            raise ValueError(f"LossScaler.load_state_dict: key 'scale' must be a positive finite "
                             f"float32, got {scale}")
        if not 0 <= growth < self.growth_interval:
            raise ValueError(f"LossScaler.load_state_dict: key 'growth_tracker' must be in "
                             f"[0, {self.growth_interval}), got {growth}")
        if not 0 <= hyst <= self.hysteresis:
            raise ValueError(f"LossScaler.load_state_dict: key 'hysteresis_tracker' must be in "
                             f"[0, {self.hysteresis}], got {hyst}")
        self.scale, self.growth_tracker, self.hysteresis_tracker = scale, growth, hyst
        self.unscaled = False


class DelayedScaling:
    """Per-tensor fp8 scale from the amaxes of past steps (Transformer Engine's delayed scaling).

        scale = max(amax_history) * 2**margin / max_finite(fmt)

    Use: q = quantize(x, fmt, ds.scale); ds.update(amax(|x|)). This step's
    amax only shapes later steps' scales, so a step never waits for its own
    reduction; a sudden larger amax saturates for one step (quantize clips).
    amax_history: (L,) float32, newest first, zeros until filled. Until a
    positive amax arrives the scale is 1. Transformer Engine stores the
    reciprocal (x_fp8 = x * scale); here every scale divides.
    """

    def __init__(self, fmt: str, history_len: int = 16, margin: int = 0):
        self.info = _check_fmt("DelayedScaling", fmt)
        _check_int("DelayedScaling", "history_len", history_len, 1)
        _check_int("DelayedScaling", "margin", margin, 0)
        self.fmt, self.margin = fmt, int(margin)
        self.amax_history = np.zeros(history_len, dtype=np.float32)  # (L,)
        self.scale = 1.0

    def update(self, amax: float) -> None:
        """Push amax (>= 0, finite) into the history and recompute the scale from its max."""
        if not (np.isfinite(amax) and amax >= 0):
            raise ValueError(f"DelayedScaling.update: amax must be finite and >= 0, got {amax}")
        self.amax_history = np.roll(self.amax_history, 1)           # (L,) oldest drops off the end
        self.amax_history[0] = amax
        top = self.amax_history.max()
        if top > 0:
            self.scale = float(amax_scale(top, self.fmt)) * 2.0**self.margin

    def state_dict(self) -> dict:
        return {"amax_history": self.amax_history.copy(),            # (L,) float32
                "scale": np.array(self.scale, dtype=np.float64)}     # () float64

    def load_state_dict(self, sd: dict) -> None:
        """Strict: keys, shapes and dtypes must match what state_dict writes."""
        check_state_dict("DelayedScaling", self.state_dict(), sd)
        _check_scale("DelayedScaling.load_state_dict", "scale", sd["scale"])
        hist = np.asarray(sd["amax_history"])                         # (L,)
        if not np.all(np.isfinite(hist) & (hist >= 0)):
            raise ValueError("DelayedScaling.load_state_dict: amax_history must be finite and >= 0")
        self.amax_history = hist.copy()
        self.scale = float(sd["scale"])


class MasterWeights:
    """float32 master copies of a model's params; the model holds them rounded to fmt.

    The optimizer updates .master (small updates survive there, where a bf16
    weight would round them away); refresh(model_params) then writes
    round_to(master, fmt) into the model's float32 arrays in place.
    """

    def __init__(self, params: dict, fmt: str):
        _check_fmt("MasterWeights", fmt)
        if not isinstance(params, dict):
            raise ValueError(f"MasterWeights: params must be a dict of arrays, got {type(params).__name__}")
        for k, v in params.items():
            _check_f32("MasterWeights", f"params[{k!r}]", v)
        self.fmt = fmt
        self.master = {k: v.copy() for k, v in params.items()}

    def refresh(self, model_params: dict) -> None:
        """model_params[k][...] = round_to(master[k], fmt) for every key (same keys and shapes)."""
        if not isinstance(model_params, dict) or set(model_params) != set(self.master):
            got = sorted(model_params) if isinstance(model_params, dict) else type(model_params).__name__
            raise ValueError(f"MasterWeights.refresh: model_params keys {got} differ from "
                             f"master keys {sorted(self.master)}")
        for k, m in self.master.items():
            _check_f32("MasterWeights.refresh", f"model_params[{k!r}]", model_params[k])
            if model_params[k].shape != m.shape:
                raise ValueError(f"MasterWeights.refresh: model_params[{k!r}] has shape "
                                 f"{model_params[k].shape}, master has {m.shape}")
            model_params[k][...] = round_to(m, self.fmt)
