"""The training loop: Trainer (a run's state and its steps), its callbacks, and fit().

    fit(model, x, target, loss_forward, loss_backward, optimizer, steps, batch_size)
                        minibatch training; returns a History (the per-step losses,
                        plus one record per logged step with the routing statistics)
    Trainer             the state of a run (model, optimizer, scaler, sampler, step)
                        and its loop; a checkpoint saves exactly this

The model is any Layer (layer.py): the trainer calls forward(x), backward(dout,
aux_scale=S), reads `aux` and `routing_stats()`, and asks nothing else. One step,
with a loss scaler (PyTorch GradScaler semantics, scaling.py):

    out = model.forward(x_b);  L = loss(out, y_b);  aux = model.aux
    model.backward(dL * S, aux_scale=S)             (S = scaler.scale; 1 without a scaler)
    grads, found = scaler.unscale(grads)            (one division by S, then inf/NaN check)
    if not found: clip, optimizer.step(grads)       (skipped: params and moments untouched)
    scaler.update(found)                            (back off on overflow, grow when clean)

Callbacks are objects with any of on_step(trainer, record), on_log(trainer,
record), on_end(trainer); they run between steps, when the state is whole,
and may set trainer.stop = True. Ctrl-C during `run` does the same: the step
in flight finishes, `history.interrupted` is set, and the caller can save a
checkpoint that resumes bit for bit. A second Ctrl-C raises KeyboardInterrupt
at once; the last checkpoint saved is then the place to resume from.
"""
from __future__ import annotations

import signal
import threading

import numpy as np

from moe_np import validate
from moe_np.module import check_state_dict, rng_state, set_rng_state
from moe_np.optim import clip_grad_norm
from moe_np.training.stats import accuracy, routing_report


class History(list):
    """The task loss of every step (a list, as fit always returned), and more.

    records      one dict per logged step: loss, aux, accuracy, lr, loss scale,
                 skipped steps, test metrics, and `routing`: one routing_summary
                 per routed layer (tagged with its name under "block")
    interrupted  True if Ctrl-C (or a callback) ended the run early
    """

    def __init__(self):
        super().__init__()
        self.records: list[dict] = []
        self.interrupted = False


class Trainer:
    """A run's whole state and its loop.

    model       a Layer: forward(x), backward(dout, aux_scale), aux, routing_stats(),
                params and grads
    optimizer   step(grads), state_dict(); its `t` drives an lr schedule
    scaler      None (plain: no scaling, no skipping) or a scaling.LossScaler
    sampler     the Generator that draws each batch's rows (seeded by `seed`)
    step        steps taken so far (skipped ones included)
    eval_data   (x, target) evaluated at every logged step in eval mode
    """

    def __init__(self, model, optimizer, loss_forward, loss_backward, x, target, *,
                 batch_size: int, seed: int = 0, scaler=None, clip_norm: float | None = None,
                 eval_data=None):
        validate.integer("Trainer", "batch_size", batch_size, 1)
        if len(x) != len(target):
            raise ValueError(f"Trainer: x has {len(x)} rows but target has {len(target)}")
        if clip_norm is not None:
            validate.positive("Trainer", "clip_norm", clip_norm)
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
        if isinstance(dout, tuple):                 # a two-input loss (mse) gives (d out, d target)
            dout = dout[0]                                                # as out
        self.model.backward(dout, aux_scale=scale)
        return float(loss), float(self.model.aux)

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
        rows = self.sampler.integers(0, len(self.x), self.batch_size)    # (N,)
        xb, yb = self.x[rows], self.target[rows]                          # (N, D_in), (N, ...)
        scale = None if self.scaler is None else self.scaler.scale
        out = self.model.forward(xb)                                      # (N, D_out)
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
        record["routing"] = routing_report(self.model)
        if self.eval_data is not None:
            record |= self.evaluate()
        return record

    def run(self, steps: int, callbacks=(), log_every: int = 0) -> History:
        """Train until `steps` steps in total have been taken (a resumed trainer runs the rest).

        Step s is logged when log_every > 0 and s % log_every == 0, and always
        the last step. Returns self.history.
        """
        validate.integer("Trainer.run", "steps", steps, 0)
        validate.integer("Trainer.run", "log_every", log_every, 0)
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

    model: any Layer. x: (N, D); target: (N, ...) as the loss expects. Returns
    a History: the list of per-step task losses, with `.records` for the
    logged steps (routing statistics of every routed layer included).
    log_every > 0 prints a progress line that often through `log` and records
    that step. scaler: a scaling.LossScaler; clip_norm: clip the global
    gradient norm; eval_data: (x_test, target_test) scored at every logged step.
    """
    validate.integer("fit", "steps", steps, 0)
    validate.integer("fit", "batch_size", batch_size, 1)
    if len(x) != len(target):
        raise ValueError(f"fit: x has {len(x)} rows but target has {len(target)}")
    trainer = Trainer(model, optimizer, loss_forward, loss_backward, x, target,
                      batch_size=batch_size, seed=seed, scaler=scaler, clip_norm=clip_norm,
                      eval_data=eval_data)
    printer = [PrintLoss(log)] if log is not None else []
    return trainer.run(steps, callbacks=printer + list(callbacks), log_every=log_every)
