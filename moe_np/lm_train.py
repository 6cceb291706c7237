"""Training the language model on the standard library's source, with the chapter-7 trainer.

    LMTrainConfig               everything that defines a run of `python -m moe_np train-lm`
    build_lm_run(config)        corpus, tokenizer, streams, model, AdamW + warm-up/cosine,
                                loss scaler, and a training.Trainer over (B, T) windows
    evaluate_bpb(model, ...)    validation loss per token and bits per byte
    train_lm_in_dir(config, run_dir, resume)   a run directory: progress lines, metrics,
                                atomic checkpoints, Ctrl-C and bit-identical resume
    load_lm_run(run_dir)        the trained model and its tokenizer back from a run directory
    generate(model, tok, prompt, ...)          sampling with the model's KV cache

The trainer samples rows of (inputs, targets) arrays; here those are the sliding-window
views of the training stream (text.Batcher.views), so its seeded row sampler *is* the
batcher: offsets drawn uniformly, saved in the checkpoint with the rest of the run.

Bits per byte: the summed negative log-likelihood of the validation tokens, in nats,
divided by ln 2 and by the number of bytes those tokens spell. A byte model and a BPE
model scored on the same text are then comparable; the loss per token is not.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np

from moe_np import checkpoint as ckpt, heap, text
from moe_np.config import PrecisionConfig
from moe_np.training import Progress, format_progress

MODELS = ("moe", "dense-active", "dense-total")
TOKENIZERS = ("byte", "bpe")
PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp8": "fp8_e4m3"}
LOSS_SCALES = ("auto", "dynamic", "static", "none")
RUN_KIND = "lm"
TOKENIZER_FILE, CORPUS_FILE = "tokenizer.json", "corpus.json"


@dataclass(frozen=True, kw_only=True)
class LMTrainConfig:
    """A train-lm run (field = option name). Sizes are the chapter's main run's."""
    preset: str = "mixtral"            # lm_presets.LM_PRESETS: mixtral | qwen2_moe | deepseek_v3
    model: str = "moe"                 # moe, or the dense model matched to its active / total params
    tokenizer: str = "byte"            # byte (V = 256) | bpe (V = vocab_size, learned here)
    vocab_size: int = 1024             # BPE's vocabulary
    max_files: int = 0                 # corpus: 0 = every file, else an evenly spaced selection
    d_model: int = 64                  # D
    layers: int = 2                    # decoder blocks
    context: int = 128                 # T
    batch_size: int = 16               # B windows per step
    precision: str = "fp32"            # the MoE experts' compute format (chapter 6)
    loss_scale: str = "auto"
    steps: int = 400
    seed: int = 0                      # init, routing and the window sampler
    lr: float = 3e-3
    warmup: int = 40
    weight_decay: float = 0.01
    clip_norm: float | None = 1.0
    eval_bytes: int = 16384            # validation text scored at every log
    log_every: int = 50
    checkpoint_every: int = 100

    def __post_init__(self):
        from moe_np.lm_presets import LM_PRESETS
        own = "LMTrainConfig"
        for name, allowed in (("preset", tuple(LM_PRESETS)), ("model", MODELS),
                              ("tokenizer", TOKENIZERS), ("precision", tuple(PRECISIONS)),
                              ("loss_scale", LOSS_SCALES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{own}: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("d_model", "layers", "context", "batch_size", "steps", "log_every",
                     "checkpoint_every", "eval_bytes"):
            _integer(own, name, getattr(self, name), 1)
        for name in ("seed", "warmup", "max_files"):
            _integer(own, name, getattr(self, name), 0)
        _integer(own, "vocab_size", self.vocab_size, 257)
        if self.max_files == 1:
            raise ValueError(f"{own}: max_files must be 0 (all) or >= 2, got 1")
        if self.warmup > self.steps:
            raise ValueError(f"{own}: warmup={self.warmup} exceeds steps={self.steps}")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError(f"{own}: lr must be > 0 and weight_decay >= 0, got {self.lr}, "
                             f"{self.weight_decay}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"{own}: clip_norm must be > 0 or None, got {self.clip_norm}")

    def to_dict(self) -> dict:
        return asdict(self)

    def lm_config(self, vocab_size: int):
        """The model's LMConfig: the preset at this size, made dense if asked."""
        from moe_np.lm_presets import LM_PRESETS, dense_baseline
        moe = {"precision": PrecisionConfig(compute=PRECISIONS[self.precision], router="fp32")}
        cfg = LM_PRESETS[self.preset](vocab_size=vocab_size, d_model=self.d_model,
                                      num_layers=self.layers, context_length=self.context, moe=moe)
        return cfg if self.model == "moe" else dense_baseline(cfg, self.model.split("-")[1])


def _integer(owner: str, name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")


def config_from_dict(stored: dict, where: str) -> LMTrainConfig:
    known = {f.name for f in fields(LMTrainConfig)}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}")
    return LMTrainConfig(**stored)


# ---------------------------------------------------------------- data

class LMData(NamedTuple):
    corpus: text.Corpus
    tokenizer: object
    train: np.ndarray          # (N,) training stream
    eval_windows: np.ndarray   # (B, T+1) validation windows
    eval_bytes: np.ndarray     # (B, T) bytes spelled by each window's targets


def validation_text(corpus: text.Corpus, budget: int) -> list[bytes]:
    """The first `budget` bytes of the validation files, whole files first, the last cut."""
    out, left = [], budget
    for data in corpus.split("val"):
        if left <= 0:
            break
        out.append(data[:left])
        left -= len(out[-1])
    return out


def build_data(config: LMTrainConfig, tokenizer=None) -> LMData:
    """Corpus, tokenizer (BPE trained on the training split unless given), streams."""
    corpus = text.stdlib_corpus(max_files=config.max_files or None)
    if tokenizer is None:
        tokenizer = text.make_tokenizer(config.tokenizer, corpus, config.vocab_size)
    train, _ = text.encode_stream(tokenizer, corpus.split("train"))          # (N,)
    val, lengths = text.encode_stream(tokenizer, validation_text(corpus, config.eval_bytes))
    windows = text.eval_windows(val, config.context)                          # (B, T+1)
    count = len(windows) * config.context
    spelled = lengths[1:count + 1].reshape(len(windows), config.context)     # (B, T)
    return LMData(corpus, tokenizer, train, windows, spelled)


def evaluate_bpb(model, windows, spelled, batch: int = 16) -> dict:
    """Validation loss per token (nats) and bits per byte, in eval mode.

    windows (B, T+1) token ids; spelled (B, T) bytes of each target token."""
    from moe_np.transformer import lm_loss_forward
    nats, tokens = 0.0, 0
    model.eval()
    try:
        for i in range(0, len(windows), batch):
            w = windows[i:i + batch]                                          # (b, T+1)
            loss, _ = lm_loss_forward(model.forward(w[:, :-1]), w[:, 1:])
            nats += float(loss) * w[:, 1:].size
            tokens += w[:, 1:].size
    finally:
        model.train()
    return {"val_loss": nats / tokens, "val_bpb": nats / math.log(2) / float(spelled.sum())}


# ---------------------------------------------------------------- a run

class LMRun(NamedTuple):
    config: LMTrainConfig
    data: LMData
    model: object              # transformer.MoETransformer
    optimizer: object
    scaler: object
    trainer: object            # training.Trainer


def build_lm_run(config: LMTrainConfig, tokenizer=None) -> LMRun:
    """Data, float32 model, AdamW (warm-up + cosine to lr/10), scaler and Trainer. Also asks
    the C heap to keep freed pages for the next step's arrays (heap.keep_pages: the process's
    allocator, for speed; the numbers do not change)."""
    from moe_np.optim import AdamW, WarmupCosine
    from moe_np.training import Trainer, make_scaler
    from moe_np.transformer import MoETransformer, lm_loss_backward, lm_loss_forward
    heap.keep_pages()
    data = build_data(config, tokenizer)
    model = MoETransformer(config.lm_config(data.tokenizer.vocab_size), seed=config.seed,
                           dtype=np.float32)
    schedule = WarmupCosine(config.lr, config.steps, config.warmup, floor_lr=config.lr / 10)
    optimizer = AdamW(model.params, lr=config.lr, weight_decay=config.weight_decay,
                      schedule=schedule)
    scaler = make_scaler(config.precision, config.loss_scale)
    inputs, targets = text.Batcher(data.train, config.context, config.batch_size).views()
    trainer = Trainer(model, optimizer, lm_loss_forward, lm_loss_backward, inputs, targets,
                      batch_size=config.batch_size, seed=config.seed, scaler=scaler,
                      clip_norm=config.clip_norm)
    trainer.classify = False            # next-token targets: no accuracy column
    return LMRun(config, data, model, optimizer, scaler, trainer)


class Validation:
    """Callback: val_loss and val_bpb into every logged record (before the files see it)."""

    def __init__(self, run: LMRun):
        self.run = run

    def on_log(self, trainer, record):
        record |= evaluate_bpb(self.run.model, self.run.data.eval_windows, self.run.data.eval_bytes)


def train_lm_quietly(config: LMTrainConfig, tokenizer=None, callbacks=()) -> LMRun:
    """Build and train in memory, validation at every logged step (the chapter's experiments)."""
    run = build_lm_run(config, tokenizer)
    run.trainer.run(config.steps, callbacks=[Validation(run), *callbacks],
                    log_every=config.log_every)
    return run


class LMProgress(Progress):
    """training.Progress counting tokens (B T per step), with validation loss and bits per byte."""

    def __init__(self, total_steps: int, tokens_per_step: int, log=print):
        super().__init__(total_steps, log)
        self.tokens_per_step = tokens_per_step

    def on_log(self, trainer, record):
        now = time.perf_counter()
        rate = (record["step"] + 1 - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, record["step"] + 1
        left = (self.total - record["step"] - 1) / rate if rate > 0 else math.nan
        line = format_progress({k: v for k, v in record.items() if k != "test_loss"}, self.total,
                               rate * self.tokens_per_step, left)
        head, tail = line.rsplit("  ", 1)
        self.log(f"{head}  val loss {record['val_loss']:.4f}  bpb {record['val_bpb']:.3f}  {tail}")


# ---------------------------------------------------------------- run directories

def read_lm_config(run_dir, command: str) -> LMTrainConfig:
    """The LMTrainConfig stored in run_dir/config.json; a layer-trainer run is refused."""
    path = Path(run_dir) / ckpt.CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{command}: {run_dir} holds no {ckpt.CONFIG_FILE} (not a run directory)")
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{command}: {path} is not readable JSON") from None
    if not isinstance(stored, dict) or stored.get("kind") != RUN_KIND:
        raise ValueError(f"{command}: {run_dir} is not a train-lm run (its config.json is from "
                         f"`python -m moe_np train`, the layer trainer)")
    return config_from_dict(stored.get("config", {}), str(path))


def start_lm_run(config: LMTrainConfig, run_dir, resume: bool = False) -> LMRun:
    """A new run in an empty run_dir (config, corpus and tokenizer files, a step-0 checkpoint),
    or the saved one restored with the tokenizer it trained with. Checks come before writes."""
    from moe_np.training import RunFiles
    run_dir = Path(run_dir)
    if resume:
        stored = read_lm_config(run_dir, "train-lm --resume")
        if stored != config:
            k = next(k for k, v in config.to_dict().items() if getattr(stored, k) != v)
            raise ValueError(f"train-lm --resume: {run_dir} was run with {k}={getattr(stored, k)!r}, "
                             f"this command asks for {k}={getattr(config, k)!r}")
        tok = text.load_tokenizer(run_dir / TOKENIZER_FILE)
        run = build_lm_run(config, tok)
        ckpt.load_checkpoint(run_dir / ckpt.CHECKPOINT_FILE, run.model, run.optimizer,
                             run.scaler, run.trainer)
        for name in (ckpt.METRICS_FILE, ckpt.ROUTING_FILE):
            ckpt.truncate_jsonl(run_dir / name, run.trainer.step)
        return run
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ValueError(f"train-lm: --out {run_dir} already holds files (another run?); pass "
                         f"--resume to continue it, or choose a new --out")
    run = build_lm_run(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    text.save_tokenizer(run.data.tokenizer, run_dir / TOKENIZER_FILE)
    ckpt.write_json_atomic(run_dir / CORPUS_FILE, run.data.corpus.describe())
    ckpt.write_json_atomic(run_dir / ckpt.CONFIG_FILE, {"format": ckpt.FORMAT, "kind": RUN_KIND,
                                                        "config": config.to_dict()})
    RunFiles(run_dir, run, config.checkpoint_every).save()
    return run


def describe_lm_run(run: LMRun) -> str:
    c, m, d = run.config, run.model, run.data
    kind = "MoE" if c.model == "moe" else f"dense ({c.model.split('-')[1]} parameters matched)"
    corpus = d.corpus.describe()
    return (f"{c.preset} {kind}: {c.layers} blocks, D={c.d_model}, V={d.tokenizer.vocab_size} "
            f"({c.tokenizer}); {m.num_params():,} parameters, {m.active_params():,} active per "
            f"token\ncorpus {corpus['hash']}: {corpus['train']['files']} training files "
            f"({corpus['train']['bytes']:,} bytes, {len(d.train):,} tokens); {c.steps} steps of "
            f"{c.batch_size} x {c.context} tokens; {c.precision}")


def train_lm_in_dir(config: LMTrainConfig, run_dir, resume: bool = False, log=print,
                    callbacks=()) -> LMRun:
    """Start or resume a run in run_dir; train with progress lines; save as it goes."""
    from moe_np.training import RunFiles
    run = start_lm_run(config, run_dir, resume)
    t = run.trainer
    log(describe_lm_run(run) + (f"\nresuming at step {t.step} of {config.steps}" if resume else ""))
    if t.step >= config.steps:
        return run
    progress = LMProgress(config.steps, config.batch_size * config.context, log)
    files = RunFiles(run_dir, run, config.checkpoint_every)
    t.run(config.steps, callbacks=[*callbacks, Validation(run), progress, files],
          log_every=config.log_every)
    return run


def load_lm_run(run_dir, command: str = "generate"):
    """(model, tokenizer, config) of a train-lm run directory, the last checkpoint loaded."""
    from moe_np.transformer import MoETransformer
    config = read_lm_config(run_dir, command)
    tok = text.load_tokenizer(Path(run_dir) / TOKENIZER_FILE)
    model = MoETransformer(config.lm_config(tok.vocab_size), seed=config.seed, dtype=np.float32)
    arrays = ckpt.read_checkpoint(Path(run_dir) / ckpt.CHECKPOINT_FILE)
    model.load_state_dict({k[len("model."):]: v for k, v in arrays.items()
                           if k.startswith("model.")})
    return model, tok, config


# ---------------------------------------------------------------- sampling

def sample_next(logits, rng, temperature: float, top_k: int | None) -> int:
    """One token from logits (V,): greedy at temperature 0, else softmax(logits / temperature)
    over the top_k largest (all when None)."""
    logits = np.asarray(logits, dtype=np.float64)                             # (V,)
    if temperature == 0:
        return int(np.argmax(logits))
    if top_k is not None and top_k < len(logits):
        cut = np.partition(logits, -top_k)[-top_k]                            # ()
        logits = np.where(logits >= cut, logits, -np.inf)                     # (V,)
    z = logits / temperature
    p = np.exp(z - z.max())                                                   # (V,)
    return int(rng.choice(len(p), p=p / p.sum()))


def generate(model, tok, prompt: bytes, tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 40, seed: int = 0) -> bytes:
    """The prompt continued by `tokens` sampled tokens (at most to the context length),
    one decode_step over the KV cache per token.   -> the continuation's bytes."""
    if not prompt:
        raise ValueError("generate: --prompt is empty; give at least one character, e.g. 'def '")
    ids = tok.encode(prompt)[None, :]                                          # (1, T0)
    room = model.config.context_length - ids.shape[1]
    if room < 1:
        raise ValueError(f"generate: the prompt is {ids.shape[1]} tokens, the model's context "
                         f"is {model.config.context_length}")
    rng = np.random.default_rng(seed)
    model.eval()
    logits, cache = model.prefill(ids)                                        # (1, T0, V)
    out = []
    for _ in range(min(tokens, room)):
        out.append(sample_next(logits[0, -1], rng, temperature, top_k))
        if cache.length >= model.config.context_length:
            break
        logits, cache = model.decode_step(np.array([[out[-1]]]), cache)       # (1, 1, V)
    return tok.decode(np.array(out, dtype=np.int64))


# ---------------------------------------------------------------- the command line

def configure_train(p, cli) -> None:
    """train-lm's options: one per LMTrainConfig field; unset ones stay absent (for --resume).
    cli: the command-line module, whose argument types (positive_int, ...) are used."""
    import argparse
    from moe_np.lm_presets import LM_PRESETS
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run's directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in RUN_DIR")
    choices = {"preset": tuple(LM_PRESETS), "model": MODELS, "tokenizer": TOKENIZERS,
               "precision": tuple(PRECISIONS), "loss_scale": LOSS_SCALES}
    kinds = {"seed": cli.non_negative_int, "warmup": cli.non_negative_int,
             "max_files": cli.non_negative_int, "lr": cli.positive_float,
             "weight_decay": cli.non_negative_float, "clip_norm": cli.positive_float_or_none}
    for f in fields(LMTrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(LMTrainConfig(), f.name)
        if f.name in choices:
            p.add_argument(flag, choices=choices[f.name], default=argparse.SUPPRESS,
                           help=f"(default {default})")
        else:
            p.add_argument(flag, type=kinds.get(f.name, cli.positive_int), default=argparse.SUPPRESS,
                           metavar=f.name.split("_")[-1].upper(), help=f"(default {default})")


def cmd_train_lm(args) -> int:
    given = {k: v for k, v in vars(args).items() if k in LMTrainConfig.__dataclass_fields__}
    if args.resume:
        stored = read_lm_config(args.out, "train-lm --resume")
        config = LMTrainConfig(**(stored.to_dict() | given))
    else:
        config = LMTrainConfig(**given)
    run = train_lm_in_dir(config, args.out, resume=args.resume)
    t = run.trainer
    if t.history.interrupted:
        print(f"interrupted at step {t.step} of {config.steps}; checkpoint saved in {args.out}; "
              f"continue with: python -m moe_np train-lm --out {args.out} --resume",
              file=__import__("sys").stderr)
        return 130
    if not t.history.records:
        print(f"nothing to do: the run in {args.out} is complete ({t.step} of {config.steps} steps)")
        return 0
    final = t.history.records[-1]
    print(f"done: {t.step} steps; validation loss {final['val_loss']:.4f}, "
          f"{final['val_bpb']:.3f} bits per byte; files in {args.out}; sample with: "
          f"python -m moe_np generate {args.out} --prompt 'def '")
    return 0


def configure_generate(p, cli) -> None:
    non_negative_float, non_negative_int, positive_int = \
        cli.non_negative_float, cli.non_negative_int, cli.positive_int
    p.add_argument("run_dir", metavar="RUN_DIR", help="a train-lm run directory")
    p.add_argument("--prompt", default="def ", help="text to continue (default 'def ')")
    p.add_argument("--tokens", type=positive_int, default=200, help="tokens to sample (default 200)")
    p.add_argument("--temperature", type=non_negative_float, default=0.8,
                   help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=positive_int, default=40, help="sample among the K most likely (default 40)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="the sampler's seed")


def cmd_generate(args) -> int:
    import sys
    if not args.prompt:
        raise ValueError("generate: --prompt is empty; give at least one character, e.g. --prompt 'def '")
    model, tok, _ = load_lm_run(args.run_dir, "generate")
    out = generate(model, tok, args.prompt.encode("utf-8"), args.tokens, args.temperature,
                   args.top_k, args.seed)
    sys.stdout.write(args.prompt + out.decode("utf-8", errors="replace") + "\n")
    return 0
