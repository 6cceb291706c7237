"""A run assembled from a TrainConfig: data, model, optimizer, loss scaler, trainer.

    build_model(config, d_in, d_out)   the MoE ResidualNet, or its matched dense baseline
    make_scaler(precision, loss_scale) the loss scaler a precision asks for (or None)
    build_run(config) -> Run           everything a run needs, ready to train or resume
    train_quietly(config)              build and train in memory (chapter 7's experiments)
    describe_run(run)                  the settings applied, as `train` prints them
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np

from moe_np.config import TrainConfig
from moe_np.training.loop import Trainer

MAXVIO = "max_i load_i / mean(load) - 1"      # Wang et al. 2024; 0: every expert equally loaded


class Run(NamedTuple):
    """A run assembled from a TrainConfig, ready to train, save or resume."""
    config: TrainConfig
    task: object            # data.Task
    model: object           # models.ResidualNet
    optimizer: object       # optim.AdamW with a WarmupCosine schedule
    scaler: object          # scaling.LossScaler or None
    trainer: Trainer


def _dense_width(config: TrainConfig) -> int:
    """The dense baseline's FFN width: the MoE of the same config, matched (dense_match)."""
    from moe_np.models import dense_width
    return dense_width(replace(config, model="moe").sparse_config(), config.dense_match)


def build_model(config: TrainConfig, d_in: int, d_out: int):
    """The MoE model, or the dense baseline matched to it (config.dense_match), in float32."""
    from moe_np.models import dense_net, moe_net
    if config.model == "moe":
        return moe_net(d_in, d_out, config.sparse_config(), config.blocks, seed=config.seed,
                       dtype=np.float32)
    return dense_net(d_in, d_out, config.d_model, _dense_width(config), config.blocks,
                     config.expert, seed=config.seed, dtype=np.float32)


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
    schedule = WarmupCosine(config.lr, config.schedule_length, config.warmup_steps,
                            floor_lr=config.lr / 10)
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


# ---------------------------------------------------------------- what is applied, printed

def _moe_lines(c: TrainConfig) -> list[str]:
    """The sparse blocks as built: from c.sparse_config(), the values the layers apply."""
    s = c.sparse_config()
    capacity = "dropless" if s.capacity_factor is None else \
        f"capacity factor {s.capacity_factor:g} (overflow dropped)"
    balance = f"balance {s.balance_coef:g}"
    if s.balance_coef != c.balance_coef:
        balance += (f" (router {s.router} has no softmax probabilities to balance; "
                    f"balance_coef {c.balance_coef:g} is not applied)")
    return [f"MoE: {c.blocks} blocks of {s.num_experts} {s.expert} experts (D={s.d_model}, "
            f"H={s.d_hidden}), router {s.router} top-{s.k}, {capacity}, dispatch {s.dispatch}",
            f"aux losses: {balance}, z {s.z_coef:g}; loss-free bias step {s.bias_gamma:g}",
            f"progress lines: MaxVio = {MAXVIO}, worst block (0: every expert equally loaded)"]


def _schedule_text(c: TrainConfig) -> str:
    """AdamW's schedule as applied: warm-up, cosine to lr/10, and any steps held at lr/10."""
    text = (f"AdamW lr {c.lr:g}, warm-up {c.warmup_steps} steps"
            f"{' (auto: min(100, steps // 10))' if c.warmup is None else ''}, "
            f"cosine to {c.lr / 10:g} at step {c.schedule_length}")
    if c.schedule_length < c.steps:
        text += f", then {c.lr / 10:g} to step {c.steps}"
    return text


def describe_run(run: Run) -> str:
    """What is trained, with every setting as applied (not merely as asked): 3-4 lines."""
    c, model = run.config, run.model
    if c.model == "moe":
        lines = _moe_lines(c)
    else:
        lines = [f"dense: {c.blocks} blocks of one {c.expert} FFN (D={c.d_model}, "
                 f"H={_dense_width(c)}), matched to the MoE's {c.dense_match} parameters"]
    scale = {None: "no loss scaling", True: "dynamic loss scaling from 2^16",
             False: "static loss scale 1"}[None if run.scaler is None else run.scaler.dynamic]
    lines.append(f"{model.num_params():,} parameters, {model.active_params():,} active per token; "
                 f"task {c.task}; {c.steps} steps of {c.batch_size}; {c.precision} ({scale})")
    lines.append(_schedule_text(c))
    return "\n".join(lines)
