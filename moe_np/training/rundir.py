"""Runs in a directory: files written as a run goes, resuming and extending, progress lines.

    start_run(config, run_dir, resume)   a new run (config.json, a step-0 checkpoint) or
                                         the saved one restored, every check before any write
    resume_config(stored, given)         the config a resume runs: the stored one, with
                                         only `steps` allowed to grow (an extension)
    train_in_dir(config, run_dir, ...)   start or resume, train with progress lines, save
    RunFiles                             callback: metrics.jsonl, routing.jsonl, checkpoints
    Progress, format_progress            the line a person watching a run reads
    resume_hint(run_dir, ...)            what to type next, after Ctrl-C or at the end

An extended run keeps its schedule: the warm-up and cosine still end at the
original length, and the extra steps train at the cosine's floor, lr/10
(TrainConfig.schedule_steps records the original length). It is therefore
not the run a larger --steps would have been from the start.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

from moe_np import checkpoint as ckpt
from moe_np.config import TrainConfig
from moe_np.training.assembly import Run, build_run, describe_run

COMMAND = "python -m moe_np train"


class RunFiles:
    """Callback: metrics.jsonl and routing.jsonl at every logged step, checkpoint.npz
    every `every` steps and when the run ends (finished or interrupted)."""

    def __init__(self, run_dir, run: Run, every: int):
        self.dir, self.run, self.every = Path(run_dir), run, every
        self.start = time.perf_counter()

    def on_log(self, trainer, record):
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
        save_run(self.dir, self.run)


def save_run(run_dir, run: Run) -> None:
    """checkpoint.npz of the run's whole state (atomic), its config inside."""
    ckpt.save_checkpoint(Path(run_dir) / ckpt.CHECKPOINT_FILE, run.model, run.optimizer,
                         run.scaler, run.trainer, run.config.to_dict())


def config_from_dict(stored: dict, where: str = "config") -> TrainConfig:
    """TrainConfig(**stored), with unknown fields reported as a ValueError (a missing
    field takes its default: config.json files of older versions still load)."""
    unknown = sorted(set(stored) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}")
    return TrainConfig(**stored)


def resume_config(stored: dict, given: dict, where: str = "config") -> TrainConfig:
    """The config a resume runs: `stored` (a run's config.json) with the options `given`.

    Every given option must equal the stored one, except `steps`, which may
    grow: the run is then extended, its schedule kept (schedule_steps = the
    stored length), so the extra steps train at lr/10. Raises ValueError
    naming the option and how to go on otherwise.
    """
    old = config_from_dict(stored, where)
    steps = given.get("steps", old.steps)
    if steps < old.steps:
        raise ValueError(f"train --resume: {where} is a run of {old.steps} steps, this command "
                         f"gives --steps {steps}; a run can be extended, not shortened")
    new = old if steps == old.steps else replace(old, steps=steps,
                                                 schedule_steps=old.schedule_length)
    for name, value in given.items():
        have = new.schedule_length if name == "schedule_steps" else getattr(new, name)
        if have != value:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"train --resume: {where} was run with {flag} {have}, this command "
                             f"gives {value}; a resumed run keeps its configuration (only --steps "
                             f"may grow); for other settings start a new run with another --out")
    return new


def _start_new(config: TrainConfig, run_dir: Path) -> Run:
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ValueError(f"train: {run_dir} already holds files (another run?); "
                         f"pass --resume to continue it, or choose a new --out")
    run = build_run(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_json_atomic(run_dir / ckpt.CONFIG_FILE, {"format": ckpt.FORMAT,
                                                        "config": config.to_dict()})
    save_run(run_dir, run)                  # step 0: a resume is possible from the start
    return run


def start_run(config: TrainConfig, run_dir, resume: bool = False) -> Run:
    """A new run in an empty (or new) run_dir, or the run saved in run_dir, restored.

    New: run_dir must not hold anything; config.json and a step-0
    checkpoint are written. Resume: `config` must be the stored config or
    its extension (resume_config), and checkpoint.npz must load; the
    JSON-lines files lose records the checkpoint had not reached. Every
    check comes before anything in run_dir is written.
    """
    run_dir = Path(run_dir)
    if not resume:
        return _start_new(config, run_dir)
    stored = ckpt.read_run_config(run_dir)
    expected = resume_config(stored, {"steps": config.steps}, f"{run_dir}/{ckpt.CONFIG_FILE}")
    differ = [k for k, v in expected.to_dict().items() if getattr(config, k) != v]
    if differ:
        k = differ[0]
        raise ValueError(f"train --resume: {run_dir} was run with {k}={getattr(expected, k)!r}, "
                         f"this command asks for {k}={getattr(config, k)!r}")
    run = build_run(config)
    ckpt.load_checkpoint(run_dir / ckpt.CHECKPOINT_FILE, run.model, run.optimizer, run.scaler,
                         run.trainer)
    if config.to_dict() != stored:          # an extension: the longer run is now this run
        ckpt.write_json_atomic(run_dir / ckpt.CONFIG_FILE, {"format": ckpt.FORMAT,
                                                            "config": config.to_dict()})
    for name in (ckpt.METRICS_FILE, ckpt.ROUTING_FILE):
        ckpt.truncate_jsonl(run_dir / name, run.trainer.step)
    return run


def train_in_dir(config: TrainConfig, run_dir, resume: bool = False, log=print,
                 callbacks=(), progress_log=None) -> Run:
    """Start or resume a run in run_dir, train it with progress lines, save as it goes.

    Returns the Run; run.trainer.history.interrupted tells whether Ctrl-C
    (or a callback setting trainer.stop) ended it early; a resumable
    checkpoint is saved either way. A second Ctrl-C raises KeyboardInterrupt
    at once: the last checkpoint saved (resume_hint says which) is intact.
    callbacks run before the run's own; progress lines go to progress_log
    (default: log), the description of the run to log.
    """
    run = start_run(config, run_dir, resume)
    t = run.trainer
    log(describe_run(run) + (f"\nresuming at step {t.step} of {config.steps}" if resume else ""))
    if t.step >= config.steps:
        return run
    files = RunFiles(run_dir, run, config.checkpoint_every)
    t.run(config.steps, callbacks=[*callbacks, Progress(config.steps, progress_log or log), files],
          log_every=config.log_every)
    return run


def last_checkpoint_step(run_dir) -> int | None:
    """The step the checkpoint in run_dir was saved at (None if there is no readable one)."""
    try:
        return int(ckpt.read_checkpoint(Path(run_dir) / ckpt.CHECKPOINT_FILE)["trainer.step"])
    except (ValueError, KeyError):
        return None


def resume_hint(run_dir, config: TrainConfig, how: str) -> str:
    """One line: where the run stands and what to type next.

    how: "stopped" (Ctrl-C: the step in flight finished and was saved), "killed" (a
    second Ctrl-C: the last periodic checkpoint is what survives) or "complete"."""
    resume = f"{COMMAND} --out {run_dir} --resume"
    step = last_checkpoint_step(run_dir)
    if how == "complete":
        return (f"nothing to do: the run in {run_dir} is complete ({step} of {config.steps} "
                f"steps); to train longer: {resume} --steps N (N > {config.steps}; the schedule "
                f"keeps its {config.schedule_length} steps, the extra steps train at lr "
                f"{config.lr / 10:g})")
    if step is None:
        return f"interrupted; {run_dir} holds no readable checkpoint: start again with a new --out"
    where = "interrupted" if how == "stopped" else \
        "stopped at once by a second Ctrl-C (the steps after the last checkpoint are lost)"
    return (f"{where}; the checkpoint in {run_dir} is at step {step} of {config.steps}; "
            f"continue with: {resume}")


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
