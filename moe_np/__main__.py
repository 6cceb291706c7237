"""The command line: python -m moe_np {demo, gradcheck, tutorial, notebook, train, plot, bench} ...

    python -m moe_np demo [--quick] [--out DIR]    the tour: checks, a sparse MoE trained, its figures
    python -m moe_np gradcheck [--json] [--seed S] [--filter SUBSTR]
    python -m moe_np tutorial N [--update | --quick | --check]
    python -m moe_np notebook N [N ...] [--out DIR]   chapters as Jupyter notebooks
    python -m moe_np train --out RUN_DIR [--model moe|dense] [--task T] [--experts E] [--k K]
                           [--capacity-factor F|none] [--router R] [--dispatch S]
                           [--precision fp32|fp16|bf16|fp8] [--steps N] [--seed S] [--resume] ...
    python -m moe_np plot RUN_DIR [RUN_DIR ...]  figures of one run (or several, overlaid)
    python -m moe_np bench ...                   time the hot path (moe_np/bench.py)
    mpiexec -n 4 python -m moe_np parallel [--dp D --ep P] [--router R] [--steps N]
                                                 expert parallelism over MPI (chapter 10)
    python -m moe_np train-lm --out RUN_DIR [--preset P] [--model moe|dense-active|dense-total]
                              [--tokenizer byte|bpe] [--precision ...] [--steps N] [--seed S] [--resume]
    python -m moe_np generate RUN_DIR --prompt "def " [--tokens N] [--temperature T] [--top-k K] [--seed S]

Bad input ends with one line on stderr and exit status 2; Ctrl-C during
training saves a checkpoint that `train --out RUN_DIR --resume` continues.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile

USAGE_EXIT, INTERRUPTED_EXIT, BROKEN_PIPE_EXIT = 2, 130, 141


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block), exit status 2."""

    def error(self, message):
        self.exit(USAGE_EXIT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _float(text: str, allow_zero: bool, allow_none: bool):
    if allow_none and text.lower() in ("none", "dropless", "off"):
        return None
    bound = ">= 0" if allow_zero else "> 0"
    extra = " or 'none'" if allow_none else ""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number {bound}{extra}, got {text!r}") from None
    if not (value >= 0 if allow_zero else value > 0) or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number {bound}{extra}, got {text!r}")
    return value


def positive_float(text):
    return _float(text, allow_zero=False, allow_none=False)


def non_negative_float(text):
    return _float(text, allow_zero=True, allow_none=False)


def positive_float_or_none(text):
    return _float(text, allow_zero=False, allow_none=True)


# ---------------------------------------------------------------- gradcheck, tutorial, demo

def cmd_gradcheck(args) -> int:
    from moe_np.checks import run_checks
    from moe_np.gradcheck import TOLERANCE, format_table
    rows = run_checks(seed=args.seed, name_filter=args.filter)
    if not rows:
        print(f"error: gradcheck: no check matches --filter {args.filter!r}", file=sys.stderr)
        return USAGE_EXIT
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=1))
    else:
        print(format_table(rows))
        failed = sum(not r.passed for r in rows)
        print(f"\n{len(rows)} checks, {failed} failing (pass: check_error < {TOLERANCE:.0e})")
    return 0 if all(r.passed for r in rows) else 1


def cmd_tutorial(args) -> int:
    if args.check and (args.update or args.quick):
        raise ValueError("tutorial: --check reruns the chapter at full size and compares its "
                         "output blocks; it cannot be combined with --update or --quick")
    if args.update and args.quick:
        raise ValueError("tutorial: --update and --quick cannot be combined: --update rewrites the "
                         "chapter's output blocks, which must come from a full-size run, and "
                         "--quick runs small sizes; drop --quick to update, or --update to try it")
    if (args.update or args.check) and os.environ.get("MOE_NP_QUICK") == "1":
        raise ValueError(f"tutorial: --{'update' if args.update else 'check'} with MOE_NP_QUICK=1 "
                         "in the environment would run small sizes; unset MOE_NP_QUICK")
    if args.quick:
        os.environ["MOE_NP_QUICK"] = "1"
    quick_sizes = os.environ.get("MOE_NP_QUICK") == "1"
    if quick_sizes or args.check:
        # small sizes, or a check, must not overwrite the committed full-size figures
        os.environ.setdefault("MOE_NP_FIGURES", tempfile.mkdtemp(prefix="moe_np_figures_"))
    from moe_np.tutorial import check_outputs, chapter_path, figure_path, run_chapter, FIGURES
    path = chapter_path(args.number)
    where = figure_path("").resolve()
    if where == FIGURES.resolve():
        note = "figures go to figures/, rewriting the tracked figures"
    else:
        note = f"figures go to {where} (a temporary folder: figures/ is left as it is)"
    mode = " (quick sizes)" if quick_sizes else " (full size, checking its output)" if args.check else ""
    print(f"# running {path.name}{mode}; {note}\n", flush=True)
    committed = path.read_text()                 # what the run is compared with, read before it
    outputs = run_chapter(path, update=args.update, echo=not args.check)
    if not args.check:
        return 0
    diff = check_outputs(path, outputs, committed)
    if diff:
        print(diff, end="")
        print(f"{path.name}: the output differs from the committed blocks (diff above); "
              f"if the change is meant, run `python -m moe_np tutorial {args.number} --update`")
        return 1
    print(f"{path.name}: all {len(outputs)} output blocks match (wall-clock lines masked)")
    return 0


def cmd_notebook(args) -> int:
    from moe_np.notebook import write_notebook
    for number in args.numbers:
        print(write_notebook(number, args.out))
    return 0


def cmd_demo(args) -> int:
    from moe_np.demo import run_demo
    return run_demo(quick=args.quick, out=args.out)


# ---------------------------------------------------------------- train and plot

TRAIN_HELP = {
    "model": "a sparse MoE, or the dense baseline", "task": "data set, generated in code",
    "experts": "E, experts per block", "k": "K, experts per token",
    "capacity_factor": "C = ceil(F K N / E) per expert; 'none' for dropless",
    "router": "how tokens choose experts (chapter 4)", "dispatch": "how rows move (chapter 5)",
    "precision": "the layers' compute format; float32 master weights",
    "loss_scale": "auto: dynamic for fp16, static 1 for bf16/fp8, none for fp32",
    "steps": "training steps; with --resume, a larger N extends a finished or stopped run: "
             "its schedule keeps its length and the extra steps train at lr/10",
    "schedule_steps": "the warm-up + cosine's length; steps past it train at lr/10",
    "seed": "init, routing and batches",
    "blocks": "residual blocks", "d_model": "D", "d_hidden": "H of each expert",
    "dense_match": "dense FFN width matches the MoE's active or total parameters",
    "balance_coef": "balance loss (softmax routers; 0 with others)", "z_coef": "router z-loss",
    "bias_gamma": "loss-free bias step (router sigmoid_bias)", "lr": "peak learning rate",
    "warmup": "linear warm-up steps, then cosine to lr/10", "weight_decay": "AdamW's",
    "clip_norm": "global gradient-norm clip; 'none' to turn off",
    "log_every": "a progress line and a metrics record every N steps",
    "checkpoint_every": "a checkpoint every N steps (and at the start, the end, and on Ctrl-C)",
}
TRAIN_NONE = {"capacity_factor": "none: dropless", "warmup": "min(100, steps // 10)",
              "schedule_steps": "--steps"}


def _default_text(name: str, value) -> str:
    """'(default X)', saying where X comes from when it is a bare layer's default."""
    from moe_np.config import LAYER_SETTINGS, RUN_OBJECTIVE
    text = TRAIN_NONE.get(name, value) if value is None else value
    if name in LAYER_SETTINGS:
        return f"(default {text}, as SparseConfig)"
    if name in RUN_OBJECTIVE:
        return f"(default {text}; a bare SparseConfig has 0)"
    return f"(default {text})"


def _train_options(p) -> None:
    """One option per TrainConfig field (--capacity-factor for capacity_factor); unset
    options stay absent, so a resume can tell what the command line asked for."""
    from moe_np import config as cfg, data
    d = cfg.TrainConfig()
    choices = {"model": ("moe", "dense"), "task": data.TASKS, "router": cfg.ROUTER_KINDS,
               "dispatch": cfg.DISPATCH_STRATEGIES, "precision": tuple(cfg.PRECISIONS),
               "loss_scale": cfg.LOSS_SCALES,
               "expert": cfg.EXPERT_KINDS, "dense_match": ("active", "total")}
    kinds = {"seed": non_negative_int, "data_seed": non_negative_int, "warmup": non_negative_int,
             "capacity_factor": positive_float_or_none, "clip_norm": positive_float_or_none,
             "lr": positive_float, "schedule_steps": positive_int}
    for name, value in d.to_dict().items():
        flag = "--" + name.replace("_", "-")
        text = f"{TRAIN_HELP.get(name, '')} {_default_text(name, value)}".lstrip()
        if name in choices:
            p.add_argument(flag, choices=choices[name], default=argparse.SUPPRESS, help=text)
            continue
        kind = kinds.get(name, positive_int if isinstance(value, int) else non_negative_float)
        p.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                       metavar=name.split("_")[-1].upper(), help=text)


def train_config(args):
    """The TrainConfig a train command asks for: its options over the defaults, or, with
    --resume, over the run's stored config (only --steps may differ: it extends the run)."""
    from moe_np.checkpoint import read_run_config
    from moe_np.config import TrainConfig
    from moe_np.training import resume_config
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if not args.resume:
        return TrainConfig(**given)
    return resume_config(read_run_config(args.out), given, f"{args.out}/config.json")


def cmd_train(args) -> int:
    from moe_np.training import resume_hint, train_in_dir
    config = train_config(args)
    try:
        run = train_in_dir(config, args.out, resume=args.resume)
    except KeyboardInterrupt:                    # a second Ctrl-C: stopped mid-step
        print(resume_hint(args.out, config, "killed"), file=sys.stderr)
        return INTERRUPTED_EXIT
    t = run.trainer
    if t.history.interrupted:
        print(resume_hint(args.out, config, "stopped"), file=sys.stderr)
        return INTERRUPTED_EXIT
    if not t.history.records:
        print(resume_hint(args.out, config, "complete"))
        return 0
    final = t.history.records[-1]
    score = " ".join(f"{k} {final[k]:.4f}" for k in ("test_accuracy", "test_loss") if k in final)
    print(f"done: {t.step} steps ({t.skipped} skipped); {score}; files in {args.out}: "
          f"config.json, metrics.jsonl, routing.jsonl, checkpoint.npz; "
          f"figures: python -m moe_np plot {args.out}")
    return 0


def cmd_plot(args) -> int:
    from moe_np.plots import plot_runs
    written = plot_runs(args.run_dirs)
    for path in written:
        print(path)
    return 0


# ---------------------------------------------------------------- bench, loaded only when asked for

def _add_bench(sub, wanted: bool) -> None:
    """The bench sub-command from moe_np/bench.py (configure(parser), run(args) -> int).

    bench.py is imported only when the command is bench, so every other
    command works even if it fails to import; bench then says why."""
    p = sub.add_parser("bench", help="time the hot path (moe_np/bench.py)")
    if not wanted:
        return
    try:
        bench = importlib.import_module("moe_np.bench")
        bench.configure(p)
        p.set_defaults(run=bench.run)
    except Exception as err:     # an import of a module under development can fail any way
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(run=lambda args: _bench_unavailable(reason))


def _bench_unavailable(reason: str) -> int:
    print(f"error: bench is unavailable: importing moe_np.bench failed ({reason})", file=sys.stderr)
    return USAGE_EXIT


def _add_parallel(sub, wanted: bool) -> None:
    """The parallel sub-command (moe_np/parallel/cli.py), configured only when asked for."""
    p = sub.add_parser("parallel", help="expert parallelism over MPI, checked against one process "
                       "(start with mpiexec -n 4)")
    if wanted:
        cli = importlib.import_module("moe_np.parallel.cli")
        cli.configure(p)
        p.set_defaults(run=cli.run)


# ---------------------------------------------------------------- main

def build_parser(argv) -> Parser:
    parser = Parser(prog="python -m moe_np", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("gradcheck", help="run every registered gradient check")
    p.add_argument("--json", action="store_true", help="print a JSON list of results")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed for inputs and upstream gradients")
    p.add_argument("--filter", default=None, help="only checks whose name contains SUBSTR")
    p.set_defaults(run=cmd_gradcheck)

    p = sub.add_parser("tutorial", help="run one chapter and write its figures")
    p.add_argument("number", type=positive_int, help="chapter number, e.g. 1")
    p.add_argument("--update", action="store_true",
                   help="rewrite the chapter's output blocks with what this run printed")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (as in the tests); figures go to a temporary folder")
    p.add_argument("--check", action="store_true",
                   help="rerun at full size; exit 1 with a diff if any output block differs")
    p.set_defaults(run=cmd_tutorial)

    p = sub.add_parser("notebook", help="write chapters as Jupyter notebooks (NN-slug.ipynb)")
    p.add_argument("numbers", type=positive_int, nargs="+", metavar="N", help="chapter number(s)")
    p.add_argument("--out", default=".", metavar="DIR", help="folder to write into (default: .)")
    p.set_defaults(run=cmd_notebook)

    p = sub.add_parser("demo", help="the tour: gradient checks, a sparse MoE trained, its figures")
    p.add_argument("--quick", action="store_true", help="a few seconds instead of about a minute")
    p.add_argument("--out", default=None, help="run directory (default: a new temporary one)")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("train", help="train a model; progress, metrics and checkpoints in RUN_DIR")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run's directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in RUN_DIR; with a larger --steps, extend it (its "
                        "schedule keeps its length, the extra steps train at lr/10)")
    _train_options(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("plot", help="write a run's figures into (the first) RUN_DIR")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.set_defaults(run=cmd_plot)

    _add_lm(sub, wanted=argv[0] if argv else None)
    _add_bench(sub, wanted=bool(argv) and argv[0] == "bench")
    _add_parallel(sub, wanted=bool(argv) and argv[0] == "parallel")
    return parser


def _add_lm(sub, wanted) -> None:
    """train-lm and generate (chapter 9, moe_np/lm_train.py), configured only when asked for."""
    p = sub.add_parser("train-lm", help="train the language model on the standard library's source")
    if wanted == "train-lm":
        from moe_np import lm_train
        lm_train.configure_train(p, sys.modules[__name__])
        p.set_defaults(run=lm_train.cmd_train_lm)
    p = sub.add_parser("generate", help="sample text from a train-lm run (KV-cached decoding)")
    if wanted == "generate":
        from moe_np import lm_train
        lm_train.configure_generate(p, sys.modules[__name__])
        p.set_defaults(run=lm_train.cmd_generate)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as done:           # --help, or a usage error already printed on one line
        return done.code if isinstance(done.code, int) else USAGE_EXIT
    try:
        code = args.run(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # the reader (e.g. `head`) went away: stop quietly, and keep Python's exit-time
        # flush of stdout from raising again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE_EXIT
    except (ValueError, OSError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return USAGE_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT


if __name__ == "__main__":
    sys.exit(main())
