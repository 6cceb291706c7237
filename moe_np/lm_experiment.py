"""Chapter 9's experiment: the runs it compares, trained once and cached by config and code.

    experiment(configs, cache_path)   train each config (or read its record from the cache)
    trained_model(config)             the model a run trained, for the atlas (cached in a
                                      temporary folder, else trained again)
    experiment_configs(quick), bpe_config(quick)   the chapter's runs

A cached record is reused only by the code that produced it: its key includes a
fingerprint of the library source a training run executes, so a number the chapter
prints can never outlive the code that printed it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from moe_np import checkpoint as ckpt
from moe_np.lm_train import MODELS, LMRun, LMTrainConfig, train_lm_quietly

# modules that cannot change a training run's numbers (they print, plot, time or check)
NOT_TRAINING = ("__main__.py", "tutorial.py", "notebook.py", "demo.py", "plots.py", "gradcheck.py",
                "lm_experiment.py")
NOT_TRAINING_DIRS = ("checks", "parallel")


def code_fingerprint() -> str:
    """SHA-256 (16 hex digits) of the library's source that a training run executes: a cached
    run is reused only by the code that produced it, so a stale number cannot survive a change."""
    import hashlib
    digest, root = hashlib.sha256(), Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.name in NOT_TRAINING or rel.name.startswith("bench") or rel.parts[0] in NOT_TRAINING_DIRS:
            continue
        digest.update(str(rel).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def run_key(config: LMTrainConfig) -> str:
    """A run's identity: the SHA-256 of its config (as JSON, keys sorted) and of the training
    code (code_fingerprint), 16 hex digits."""
    import hashlib
    text_ = json.dumps(config.to_dict(), sort_keys=True) + code_fingerprint()
    return hashlib.sha256(text_.encode()).hexdigest()[:16]


def model_cache_path(config: LMTrainConfig) -> Path:
    import tempfile
    return Path(tempfile.gettempdir()) / "moe_np_lm_models" / f"{run_key(config)}.npz"


def run_record(run: LMRun, seconds: float) -> dict:
    """What the chapter keeps of a run: config, sizes, the validation curve, the time."""
    records = run.trainer.history.records
    return {"config": run.config.to_dict(), "params": run.model.num_params(),
            "active": run.model.active_params(), "seconds": round(seconds, 1),
            "corpus": run.data.corpus.describe()["hash"],
            "steps": [r["step"] + 1 for r in records],
            "train_loss": [round(r["loss"], 5) for r in records],
            "val_bpb": [round(r["val_bpb"], 5) for r in records],
            "val_loss": [round(r["val_loss"], 5) for r in records]}


def experiment(configs, cache_path=None, log=print) -> list[dict]:
    """Train every config (in order) and return its run_record.

    cache_path: a JSON file of records by run_key (config and training code); a run found
    there is not trained again, and records left by other code are dropped when the file is
    written. Each trained model's state goes to model_cache_path(config), so a chapter can
    study it without training it again."""
    cache, code = {}, code_fingerprint()
    if cache_path is not None and Path(cache_path).is_file():
        cache = {k: r for k, r in json.loads(Path(cache_path).read_text()).items()
                 if r.get("code") == code}
    out = []
    for config in configs:
        key = run_key(config)
        if key not in cache:
            start = time.perf_counter()
            run = train_lm_quietly(config)
            cache[key] = run_record(run, time.perf_counter() - start) | {"code": code}
            save_model(run.model, model_cache_path(config))
            if cache_path is not None:
                ckpt.write_json_atomic(cache_path, cache)
            log(f"trained {config.model} seed {config.seed}: {cache[key]['val_bpb'][-1]:.3f} bpb "
                f"in {cache[key]['seconds']:.0f} s")
        out.append(cache[key])
    return out


def save_model(model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **model.state_dict())


def trained_model(config: LMTrainConfig, tokenizer=None):
    """The model `experiment` trained for config (from its cache, else trained now)."""
    from moe_np.transformer import MoETransformer
    path = model_cache_path(config)
    if path.is_file():
        vocab = 256 if config.tokenizer == "byte" else config.vocab_size
        model = MoETransformer(config.lm_config(vocab), seed=config.seed, dtype=np.float32)
        try:
            with np.load(path) as z:
                model.load_state_dict({k: z[k] for k in z.files})
            return model
        except (ValueError, OSError):
            pass                # saved by another version of the model: train it again
    run = train_lm_quietly(config, tokenizer)
    save_model(run.model, path)
    return run.model


def experiment_configs(quick: bool, seeds=(0, 1, 2)) -> list[LMTrainConfig]:
    """Chapter 9's runs: the Mixtral-shaped MoE and its dense models matched to its active and
    its total parameters, same data, steps and tokens, each with every seed."""
    if quick:
        base = LMTrainConfig(max_files=20, d_model=32, layers=1, context=32, batch_size=8,
                             steps=20, warmup=2, log_every=10, eval_bytes=1024)
        seeds = seeds[:1]
    else:
        base = LMTrainConfig(d_model=64, layers=2, context=128, batch_size=16, steps=300,
                             warmup=30, log_every=50, eval_bytes=8192)
    return [LMTrainConfig(**(base.to_dict() | {"model": m, "seed": s}))
            for s in seeds for m in MODELS]


def bpe_config(quick: bool) -> LMTrainConfig:
    """The chapter's MoE (seed 0) on BPE tokens instead of bytes: bits per byte compare them."""
    return LMTrainConfig(**(experiment_configs(quick)[0].to_dict()
                            | {"tokenizer": "bpe", "vocab_size": 300 if quick else 1024}))
