"""Training, in four parts (TrainConfig itself is in config.py):

    stats.py      routing statistics: routing_summary, routing_report, accuracy
    loop.py       the loop: Trainer, History, callbacks, fit
    assembly.py   a run from a TrainConfig: build_run, build_model, make_scaler, describe_run
    rundir.py     runs in a directory: start_run, train_in_dir, resuming and extending,
                  RunFiles, Progress
"""
from moe_np.config import TrainConfig
from moe_np.training.assembly import (Run, build_model, build_run, describe_run, make_scaler,
                                      train_quietly)
from moe_np.training.loop import History, PrintLoss, Trainer, fit
from moe_np.training.rundir import (Progress, RunFiles, config_from_dict, format_progress,
                                    last_checkpoint_step, resume_config, resume_hint, start_run,
                                    train_in_dir)
from moe_np.training.stats import accuracy, routing_report, routing_summary

__all__ = ["History", "PrintLoss", "Progress", "Run", "RunFiles", "TrainConfig", "Trainer",
           "accuracy", "build_model", "build_run", "config_from_dict", "describe_run", "fit",
           "format_progress", "last_checkpoint_step", "make_scaler", "resume_config",
           "resume_hint", "routing_report", "routing_summary", "start_run", "train_in_dir",
           "train_quietly"]
