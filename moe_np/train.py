"""Training: the loop, its callbacks, routing statistics and loss scaling.

    fit(model, x, target, loss_forward, loss_backward, optimizer, steps, batch_size)
                        minibatch training; returns a History (the per-step losses,
                        plus one record per logged step with the routing statistics)
    Trainer             the state of a run (model, optimizer, scaler, sampler, step)
                        and its loop; a checkpoint saves exactly this
    routing_summary     load per expert, MaxVio, CV, drops, gate entropy, largest logit

One step, with a loss scaler (PyTorch GradScaler semantics, precision.py):

    out = model(x_b);  L = loss(out, y_b);  aux = model.aux
    backward with dL * S and aux_scale = S          (S = scaler.scale)
    grads, found = scaler.unscale(grads)            (one division by S, then inf/NaN check)
    if not found: clip, optimizer.step(grads)       (skipped: params and moments untouched)
    scaler.update(found)                            (back off on overflow, grow when clean)

Callbacks are objects with any of on_step(trainer, record), on_log(trainer,
record), on_end(trainer); they run between steps, when the state is whole,
and may set trainer.stop = True. Ctrl-C during `run` does the same: the step
in flight finishes, `history.interrupted` is set, and the caller can save a
checkpoint that resumes bit for bit. A second Ctrl-C stops at once.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from moe_np import balance, functional
from moe_np.config import PrecisionConfig, SparseConfig
from moe_np.module import check_state_dict, rng_state, set_rng_state
from moe_np.optim import clip_grad_norm


# ---------------------------------------------------------------- routing statistics

def routing_summary(stats) -> dict:
    """What one sparse layer's routing did on one batch, as plain numbers.

    stats: a RoutingStats (ids (N, K) or None, counts (E,), num_dropped, logits (N, E)).

        load_i     share of the N K assignments choosing expert i, before capacity drops
                   (expert choice: share of the kept assignments); ideal 1/E
        max_vio    max_i load_i / mean(load) - 1   (Wang et al. 2024, MaxVio; 0 is perfect)
        cv         std(load) / mean(load)
        drop_rate  dropped assignments / assignments
        entropy    mean_n H(softmax(logits_n)) in nats; at most log E
        max_logit  the largest router logit (the z-loss pulls logsumexp, so this, toward 0)
        balance    E sum_i f_i P_i on this batch (1 at perfect balance), whatever its coefficient
        z_loss     mean_n logsumexp(logits_n)^2, whatever its coefficient
    """
    logits = stats.logits                                                  # (N, E)
    e = logits.shape[1]
    if stats.ids is not None:
        chosen = balance.expert_counts(stats.ids, e)                       # (E,)
        assignments = stats.ids.size
    else:
        chosen, assignments = stats.counts, int(stats.counts.sum()) + int(stats.num_dropped)
    load = chosen / max(1, chosen.sum())                                   # (E,)
    mean = load.mean()
    probs = functional.softmax_forward(logits)[0]                          # (N, E)
    entropy = -np.sum(probs * np.log(np.maximum(probs, np.finfo(probs.dtype).tiny)), axis=1)  # (N,)
    out = {"load": [round(float(v), 6) for v in load],
           "max_vio": float(load.max() / mean - 1.0), "cv": float(load.std() / mean),
           "dropped": int(stats.num_dropped), "drop_rate": float(stats.num_dropped / max(1, assignments)),
           "entropy": float(entropy.mean()), "max_logit": float(logits.max()),
           "z_loss": float(balance.z_loss_forward(logits)[0])}
    out["balance"] = None if stats.ids is None else \
        float(balance.balance_loss_forward(probs, stats.ids)[0])
    return out


def sparse_stats(model) -> list:
    """(block index, RoutingStats) of every sparse layer in model, from its last forward."""
    if hasattr(model, "routing_stats"):
        found = model.routing_stats()
    elif hasattr(model, "modules"):
        found = [getattr(m, "stats", None) for m in model.modules]
    else:
        found = [getattr(model, "stats", None)]
    return [(i, s) for i, s in enumerate(found) if s is not None]


def accuracy(logits, labels) -> float:
    """Share of rows whose arg-max logit is the label.   logits (N, V), labels (N,)."""
    return float(np.mean(np.argmax(logits, axis=1) == labels))


# ---------------------------------------------------------------- history

class History(list):
    """The task loss of every step (a list, as fit always returned), and more.

    records      one dict per logged step: loss, aux, accuracy, lr, loss scale,
                 skipped steps, test metrics, and `routing`: one routing_summary
                 per sparse block
    interrupted  True if Ctrl-C (or a callback) ended the run early
    """

    def __init__(self):
        super().__init__()
        self.records: list[dict] = []
        self.interrupted = False


# ---------------------------------------------------------------- the loop

class Trainer:
    """A run's whole state and its loop.

    model       params, grads, forward(x), backward(dout[, aux_scale]); optional aux
    optimizer   step(grads), state_dict(); its `t` drives an lr schedule
    scaler      None (plain: no scaling, no skipping) or a scaling.LossScaler
    sampler     the Generator that draws each batch's rows (seeded by `seed`)
    step        steps taken so far (skipped ones included)
    eval_data   (x, target) evaluated at every logged step in eval mode
    """

    def __init__(self, model, optimizer, loss_forward, loss_backward, x, target, *,
                 batch_size: int, seed: int = 0, scaler=None, clip_norm: float | None = None,
                 eval_data=None):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"Trainer: batch_size must be an integer >= 1, got {batch_size!r}")
        if len(x) != len(target):
            raise ValueError(f"Trainer: x has {len(x)} rows but target has {len(target)}")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"Trainer: clip_norm must be > 0 or None, got {clip_norm}")
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.loss_forward, self.loss_backward = loss_forward, loss_backward
        self.x, self.target, self.batch_size, self.clip_norm = x, target, int(batch_size), clip_norm
        self.classify = np.issubdtype(np.asarray(target).dtype, np.integer)
        self.eval_data, self.sampler = eval_data, np.random.default_rng(seed)
        self.step, self.skipped, self.stop = 0, 0, False
        self.window = np.zeros(4, dtype=np.float64)     # (4,) sums since the last log: loss, aux, acc, steps
        self.history = History()

    def state_dict(self) -> dict:
        """The loop's own state: steps taken and skipped, the sampler's stream, the log window."""
        return {"step": np.array(self.step, dtype=np.int64),                # ()
                "skipped": np.array(self.skipped, dtype=np.int64),          # ()
                "window": self.window.copy(),                               # (4,)
                "rng.sampler": rng_state(self.sampler)}                     # (6,) uint64

    def load_state_dict(self, sd: dict) -> None:
        check_state_dict("Trainer", self.state_dict(), sd)
        if not 0 <= int(sd["skipped"]) <= int(sd["step"]):
            raise ValueError(f"Trainer.load_state_dict: skipped={int(sd['skipped'])} must lie in "
                             f"[0, step={int(sd['step'])}]")
        self.step, self.skipped = int(sd["step"]), int(sd["skipped"])
        self.window[...] = sd["window"]
        set_rng_state(self.sampler, sd["rng.sampler"])

    def _backward(self, out, target) -> tuple[float, float]:
        """Loss, then gradients of (loss + aux) * scale in model.grads.   -> (loss, aux)."""
        loss, cache = self.loss_forward(out, target)
        scale = 1.0 if self.scaler is None else self.scaler.scale
        dout = self.loss_backward(scale, cache)
        dout = dout[0] if isinstance(dout, tuple) else dout              # as out
        if self.scaler is None:
            self.model.backward(dout)
        else:
            self.model.backward(dout, aux_scale=scale)
        return float(loss), float(getattr(self.model, "aux", 0.0))

    def _update(self) -> tuple[bool, float | None]:
        """Unscale, check, clip and apply model.grads.   -> (skipped, gradient norm)."""
        grads, found = self.model.grads, False
        if self.scaler is not None:
            grads, found = self.scaler.unscale(grads)
        norm = None
        if not found:
            if self.clip_norm is not None:
                grads, norm = clip_grad_norm(grads, self.clip_norm)
            self.optimizer.step(grads)
        if self.scaler is not None:
            self.scaler.update(found)
        return found, norm

    def train_step(self) -> dict:
        """One minibatch step; returns its record (loss, aux, lr, scale used, skipped, ...)."""
        rows = self.sampler.integers(0, len(self.x), self.batch_size)    # (B,)
        xb, yb = self.x[rows], self.target[rows]                          # (B, D_in), (B, ...)
        scale = None if self.scaler is None else self.scaler.scale
        out = self.model.forward(xb)                                      # (B, D_out)
        loss, aux = self._backward(out, yb)
        skipped, norm = self._update()
        record = {"step": self.step, "loss": loss, "aux": aux, "lr": float(self.optimizer.lr),
                  "skipped": bool(skipped), "grad_norm": norm, "loss_scale": scale}
        if self.classify:
            record["accuracy"] = accuracy(out, yb)
        self.window += (loss, aux, record.get("accuracy", 0.0), 1.0)
        self.step += 1
        self.skipped += int(skipped)
        return record

    def evaluate(self) -> dict:
        """Loss (and accuracy) on eval_data in eval mode; no state of the run changes."""
        x, target = self.eval_data
        self.model.eval()
        try:
            out = self.model.forward(x)                                   # (N_eval, D_out)
            result = {"test_loss": float(self.loss_forward(out, target)[0])}
            if self.classify:
                result["test_accuracy"] = accuracy(out, target)
        finally:
            self.model.train()
        return result

    def _log_record(self, record: dict) -> dict:
        """A logged step's record: loss, aux and accuracy averaged over the steps since the
        last log (the step's own as batch_*), routing statistics, test metrics."""
        loss, aux, acc, count = self.window / self.window[3]
        record = dict(record, batch_loss=record["loss"], loss=float(loss), aux=float(aux),
                      skipped_total=self.skipped)
        if self.classify:
            record |= {"batch_accuracy": record["accuracy"], "accuracy": float(acc)}
        self.window[...] = 0.0
        record["routing"] = [dict(routing_summary(s), block=i) for i, s in sparse_stats(self.model)]
        if self.eval_data is not None:
            record |= self.evaluate()
        return record

    def run(self, steps: int, callbacks=(), log_every: int = 0) -> History:
        """Train until `steps` steps in total have been taken (a resumed trainer runs the rest).

        Step s is logged when log_every > 0 and s % log_every == 0, and always
        the last step. Returns self.history.
        """
        if not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"Trainer.run: steps must be an integer >= 0, got {steps!r}")
        if not isinstance(log_every, (int, np.integer)) or log_every < 0:
            raise ValueError(f"Trainer.run: log_every must be an integer >= 0, got {log_every!r}")
        self.stop = False
        with _deferred_interrupt(self):
            while self.step < steps and not self.stop:
                record = self.train_step()
                self.history.append(record["loss"])
                _call(callbacks, "on_step", self, record)
                s = record["step"]
                if log_every and (s % log_every == 0 or s == steps - 1):
                    record = self._log_record(record)
                    self.history.records.append(record)
                    _call(callbacks, "on_log", self, record)
        self.history.interrupted = self.step < steps
        _call(callbacks, "on_end", self)
        return self.history


def _call(callbacks, event: str, *args) -> None:
    for cb in callbacks:
        method = getattr(cb, event, None)
        if method is not None:
            method(*args)


class _deferred_interrupt:
    """While active (main thread only), the first Ctrl-C sets trainer.stop; a second raises."""

    def __init__(self, trainer):
        self.trainer, self.previous = trainer, None

    def _handler(self, signum, frame):
        if self.trainer.stop:
            raise KeyboardInterrupt
        self.trainer.stop = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


# ---------------------------------------------------------------- fit, the one-call loop

class PrintLoss:
    """Callback: 'step     s  loss L' at every logged step, L the mean task loss over the
    steps since the previous line (fit's progress line)."""

    def __init__(self, log=print):
        self.log = log

    def on_log(self, trainer, record):
        self.log(f"step {record['step']:5d}  loss {record['loss']:.4f}")


def fit(model, x, target, loss_forward, loss_backward, optimizer, steps: int,
        batch_size: int, seed: int = 0, log_every: int = 0, log=print, *, callbacks=(),
        scaler=None, clip_norm: float | None = None, eval_data=None) -> History:
    """Minibatch training: sample a batch, forward, loss, backward, step.

    x: (N, D); target: (N, ...) as the loss expects. Returns a History: the
    list of per-step task losses, with `.records` for the logged steps
    (routing statistics of every sparse layer included). log_every > 0
    prints a progress line that often through `log` and records that step.
    scaler: a scaling.LossScaler (the model's backward must take
    aux_scale); clip_norm: clip the global gradient norm; eval_data:
    (x_test, target_test) scored at every logged step.
    """
    if steps < 0 or batch_size < 1:
        raise ValueError(f"fit: steps must be >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    if len(x) != len(target):
        raise ValueError(f"fit: x has {len(x)} rows but target has {len(target)}")
    trainer = Trainer(model, optimizer, loss_forward, loss_backward, x, target,
                      batch_size=batch_size, seed=seed, scaler=scaler, clip_norm=clip_norm,
                      eval_data=eval_data)
    printer = [PrintLoss(log)] if log is not None else []
    return trainer.run(steps, callbacks=printer + list(callbacks), log_every=log_every)


class Progress:
    """Callback: one progress line per logged step, for a person watching a run.

    step, loss (and aux), batch and test accuracy, MaxVio and drop rate
    (worst block), loss scale, tokens per second and time left.
    """

    def __init__(self, total_steps: int, log=print):
        self.total, self.log = total_steps, log
        self.last_time, self.last_step = time.perf_counter(), None

    def on_step(self, trainer, record):
        if self.last_step is None:                  # the first step this process takes
            self.last_step = record["step"]

    def on_log(self, trainer, record):
        now = time.perf_counter()
        done = record["step"] + 1 - self.last_step
        rate = done / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, record["step"] + 1
        self.log(format_progress(record, self.total, rate * trainer.batch_size,
                                 (self.total - record["step"] - 1) / rate if rate > 0 else math.nan))


def format_progress(record: dict, total: int, tokens_per_s: float, seconds_left: float) -> str:
    """One line: step/total, loss + aux, accuracies, MaxVio, drops, scale, speed, time left."""
    parts = [f"step {record['step'] + 1:>{len(str(total))}}/{total}",
             f"loss {record['loss']:.4f}", f"aux {record['aux']:.4f}"]
    if "accuracy" in record:
        parts.append(f"acc {record['accuracy']:.3f}")
    if "test_accuracy" in record:
        parts.append(f"test acc {record['test_accuracy']:.3f}")
    elif "test_loss" in record:
        parts.append(f"test loss {record['test_loss']:.4f}")
    routing = record.get("routing") or []
    if routing:
        parts.append(f"MaxVio {max(r['max_vio'] for r in routing):.2f}")
        parts.append(f"drop {max(r['drop_rate'] for r in routing):.1%}")
    if record.get("loss_scale") is not None:
        parts.append(f"scale {record['loss_scale']:.0f} (skipped {record['skipped_total']})")
    left = "?" if not math.isfinite(seconds_left) else f"{seconds_left:.0f}s"
    parts.append(f"{tokens_per_s:,.0f} tok/s, {left} left")
    return "  ".join(parts)


# ---------------------------------------------------------------- runs: a config, a model, a loop

PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp8": "fp8_e4m3"}
LOSS_SCALES = ("auto", "dynamic", "static", "none")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that defines a run of `python -m moe_np train` (field = option name).

    The data set is fixed by task and data_seed; `seed` varies the model's
    initialisation, its routing streams and the batch order. precision sets
    the sparse layers' compute format (fp8 means E4M3) and, with loss_scale
    "auto", the scaling: fp32 trains plainly; fp16 uses a dynamic LossScaler
    (2**16, GradScaler's rule); bf16 and fp8 keep fp32's exponent range or
    scale per tile inside the layer, so they use a static scale of 1, which
    still skips a step whose gradients hold an inf or NaN. loss_scale
    "dynamic", "static" or "none" overrides that choice. Parameters are
    float32 in every case: they are the master weights.
    """
    model: str = "moe"                     # moe | dense
    task: str = "clusters"                 # see data.TASKS
    experts: int = 8                       # E
    k: int = 2                             # K
    capacity_factor: float | None = 1.25   # None: dropless
    router: str = "softmax_topk"
    dispatch: str = "numpy"
    precision: str = "fp32"                # fp32 | fp16 | bf16 | fp8
    loss_scale: str = "auto"               # auto (by precision) | dynamic | static (1) | none
    steps: int = 1500
    seed: int = 0
    blocks: int = 2                        # B residual blocks
    d_model: int = 32                      # D
    d_hidden: int = 32                     # H of each expert
    expert: str = "mlp"                    # mlp | swiglu
    dense_match: str = "active"            # the dense model's FFN matches the MoE's active or total params
    balance_coef: float = 0.01
    z_coef: float = 0.001
    bias_gamma: float = 0.0                # loss-free bias step (router sigmoid_bias)
    batch_size: int = 256
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    data_size: int = 8000
    data_seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500

    def __post_init__(self):
        own = "TrainConfig"
        from moe_np import config as cfg, data
        _choice(own, "model", self.model, ("moe", "dense"))
        _choice(own, "task", self.task, data.TASKS)
        _choice(own, "router", self.router, cfg.ROUTER_KINDS)
        _choice(own, "dispatch", self.dispatch, cfg.DISPATCH_STRATEGIES)
        _choice(own, "precision", self.precision, tuple(PRECISIONS))
        _choice(own, "loss_scale", self.loss_scale, LOSS_SCALES)
        _choice(own, "expert", self.expert, cfg.EXPERT_KINDS)
        _choice(own, "dense_match", self.dense_match, ("active", "total"))
        for name in ("experts", "k", "steps", "blocks", "d_model", "d_hidden", "batch_size",
                     "data_size", "log_every", "checkpoint_every"):
            _integer(own, name, getattr(self, name), 1)
        for name in ("seed", "data_seed", "warmup"):
            _integer(own, name, getattr(self, name), 0)
        if self.k > self.experts:
            raise ValueError(f"{own}: k={self.k} exceeds experts={self.experts}")
        for name in ("capacity_factor", "clip_norm"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{own}: {name} must be > 0 (or none), got {getattr(self, name)}")
        for name in ("balance_coef", "z_coef", "bias_gamma", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{own}: {name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"{own}: lr must be > 0, got {self.lr}")
        if self.warmup > self.steps:
            raise ValueError(f"{own}: warmup={self.warmup} exceeds steps={self.steps}")
        if self.model == "moe":
            self.sparse_config()            # the layer's own cross-field rules, before any work

    def sparse_config(self) -> SparseConfig:
        """The SparseConfig of every block (the aux coefficients only where the router takes them)."""
        softmax = self.router in ("softmax_topk", "softmax_topk_raw", "switch", "topk_softmax")
        return SparseConfig(d_model=self.d_model, num_experts=self.experts, d_hidden=self.d_hidden,
                            expert=self.expert, router=self.router, k=self.k,
                            capacity_factor=self.capacity_factor, dispatch=self.dispatch,
                            balance_coef=self.balance_coef if softmax else 0.0,
                            z_coef=self.z_coef, bias_gamma=self.bias_gamma,
                            precision=PrecisionConfig(compute=PRECISIONS[self.precision],
                                                      router="fp32"))

    def to_dict(self) -> dict:
        return asdict(self)


def _choice(owner: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}: {name} must be one of {tuple(allowed)}, got {value!r}")


def _integer(owner: str, name: str, value, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")


class Run(NamedTuple):
    """A run assembled from a TrainConfig, ready to train, save or resume."""
    config: TrainConfig
    task: object            # data.Task
    model: object           # models.ResidualNet
    optimizer: object       # optim.AdamW with a WarmupCosine schedule
    scaler: object          # scaling.LossScaler or None
    trainer: Trainer


def build_model(config: TrainConfig, d_in: int, d_out: int):
    """The MoE model, or the dense baseline matched to it (config.dense_match), in float32."""
    from moe_np.models import dense_net, dense_width, moe_net
    sparse = config.sparse_config() if config.model == "moe" else None
    if sparse is not None:
        return moe_net(d_in, d_out, sparse, config.blocks, seed=config.seed, dtype=np.float32)
    like = replace(config, model="moe").sparse_config()
    width = dense_width(like, config.dense_match)
    return dense_net(d_in, d_out, config.d_model, width, config.blocks, config.expert,
                     seed=config.seed, dtype=np.float32)


def make_scaler(precision: str, loss_scale: str = "auto"):
    """The run's loss scaler: None (no scaling, no skipping); "dynamic": LossScaler() (2**16,
    x2 after 2000 clean steps, x0.5 on an overflow); "static": a fixed scale of 1, which
    still skips a step with an inf or NaN. "auto": dynamic for fp16, static for bf16 and
    fp8, none for fp32."""
    from moe_np.scaling import LossScaler
    if loss_scale == "auto":
        loss_scale = {"fp32": "none", "fp16": "dynamic"}.get(precision, "static")
    if loss_scale == "none":
        return None
    if loss_scale == "dynamic":
        return LossScaler()
    return LossScaler(init_scale=1.0, dynamic=False)


def build_run(config: TrainConfig) -> Run:
    """Task, model, AdamW with warm-up + cosine (floor lr/10), scaler and Trainer for config."""
    from moe_np import data, losses
    from moe_np.optim import AdamW, WarmupCosine
    task = data.make_task(config.task, config.data_size, config.data_seed, dtype=np.float32)
    model = build_model(config, task.d_in, task.d_out)
    schedule = WarmupCosine(config.lr, config.steps, config.warmup, floor_lr=config.lr / 10)
    optimizer = AdamW(model.params, lr=config.lr, weight_decay=config.weight_decay,
                      schedule=schedule)
    scaler = make_scaler(config.precision, config.loss_scale)
    pair = (losses.cross_entropy_forward, losses.cross_entropy_backward) \
        if task.kind == "classification" else (losses.mse_forward, losses.mse_backward)
    trainer = Trainer(model, optimizer, *pair, task.x_train, task.y_train,
                      batch_size=config.batch_size, seed=config.seed, scaler=scaler,
                      clip_norm=config.clip_norm, eval_data=(task.x_test, task.y_test))
    return Run(config, task, model, optimizer, scaler, trainer)


def train_quietly(config: TrainConfig, callbacks=()) -> Run:
    """Build and train a run in memory (no files, no printing): chapter 7's experiments."""
    run = build_run(config)
    run.trainer.run(config.steps, callbacks=callbacks, log_every=config.log_every)
    return run


# ---------------------------------------------------------------- runs in a directory

class RunFiles:
    """Callback: metrics.jsonl and routing.jsonl at every logged step, checkpoint.npz
    every `every` steps and when the run ends (finished or interrupted)."""

    def __init__(self, run_dir, run: Run, every: int):
        self.dir, self.run, self.every = Path(run_dir), run, every
        self.start = time.perf_counter()

    def on_log(self, trainer, record):
        from moe_np import checkpoint as ckpt
        metrics = {k: v for k, v in record.items() if k != "routing"}
        metrics["time"] = round(time.perf_counter() - self.start, 3)
        ckpt.append_jsonl(self.dir / ckpt.METRICS_FILE, metrics)
        ckpt.append_jsonl(self.dir / ckpt.ROUTING_FILE, {"step": record["step"],
                                                         "blocks": record["routing"]})

    def on_step(self, trainer, record):
        if trainer.step % self.every == 0:
            self.save()

    def on_end(self, trainer):
        self.save()

    def save(self):
        from moe_np import checkpoint as ckpt
        r = self.run
        ckpt.save_checkpoint(self.dir / ckpt.CHECKPOINT_FILE, r.model, r.optimizer, r.scaler,
                             r.trainer, r.config.to_dict())


def config_from_dict(stored: dict, where: str = "config") -> TrainConfig:
    """TrainConfig(**stored), with unknown or missing fields reported as a ValueError."""
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(stored) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}")
    return TrainConfig(**stored)


def start_run(config: TrainConfig, run_dir, resume: bool = False) -> Run:
    """A new run in an empty (or new) run_dir, or the run saved in run_dir, restored.

    New: run_dir must not hold anything; config.json is written. Resume: the
    stored config must equal `config`, and checkpoint.npz must load; the
    JSON-lines files lose records the checkpoint had not reached. Every check
    comes before anything in run_dir is written.
    """
    from moe_np import checkpoint as ckpt
    run_dir = Path(run_dir)
    if not resume:
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise ValueError(f"train: {run_dir} already holds files (another run?); "
                             f"pass --resume to continue it, or choose a new --out")
        run = build_run(config)
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_json_atomic(run_dir / ckpt.CONFIG_FILE, {"format": ckpt.FORMAT,
                                                            "config": config.to_dict()})
        return run
    stored = ckpt.read_run_config(run_dir)
    differ = [k for k, v in config.to_dict().items() if stored.get(k) != v]
    if differ:
        k = differ[0]
        raise ValueError(f"train --resume: {run_dir} was run with {k}={stored.get(k)!r}, "
                         f"this command asks for {k}={getattr(config, k)!r}")
    run = build_run(config)
    ckpt.load_checkpoint(run_dir / ckpt.CHECKPOINT_FILE, run.model, run.optimizer, run.scaler,
                         run.trainer)
    for name in (ckpt.METRICS_FILE, ckpt.ROUTING_FILE):
        ckpt.truncate_jsonl(run_dir / name, run.trainer.step)
    return run


def train_in_dir(config: TrainConfig, run_dir, resume: bool = False, log=print,
                 callbacks=()) -> Run:
    """Start or resume a run in run_dir, train it with progress lines, save as it goes.

    Returns the Run; run.trainer.history.interrupted tells whether Ctrl-C
    (or a callback setting trainer.stop) ended it early; a resumable
    checkpoint is saved either way. callbacks run before the run's own.
    """
    run = start_run(config, run_dir, resume)
    t = run.trainer
    log(describe_run(run) + (f"\nresuming at step {t.step} of {config.steps}" if resume else ""))
    if t.step >= config.steps:
        return run
    files = RunFiles(run_dir, run, config.checkpoint_every)
    t.run(config.steps, callbacks=[*callbacks, Progress(config.steps, log), files],
          log_every=config.log_every)
    return run


def describe_run(run: Run) -> str:
    """Two lines: what is trained on what, its sizes, and its precision."""
    c, model = run.config, run.model
    if c.model == "moe":
        what = (f"MoE: {c.blocks} blocks of {c.experts} {c.expert} experts (D={c.d_model}, "
                f"H={c.d_hidden}), {c.router} top-{c.k}, capacity factor {c.capacity_factor}, "
                f"balance {c.balance_coef}, z {c.z_coef}, bias step {c.bias_gamma}")
    else:
        width = model.blocks[0].params["w1" if c.expert == "mlp" else "w_up"].shape[-1]
        what = (f"dense: {c.blocks} blocks of one {c.expert} FFN (D={c.d_model}, H={width}), "
                f"matched to the MoE's {c.dense_match} parameters")
    scale = {None: "no loss scaling", True: "dynamic loss scaling from 2^16",
             False: "static loss scale 1"}[None if run.scaler is None else run.scaler.dynamic]
    return (f"{what}\n{model.num_params():,} parameters, {model.active_params():,} active per "
            f"token; task {c.task}; {c.steps} steps of {c.batch_size}; {c.precision} ({scale})")
