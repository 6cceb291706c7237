"""Checkpoints and run directories: everything a resume needs, saved so a crash cannot damage it.

A checkpoint is one `np.savez` file of named arrays, no pickles:

    model.<key>     parameters, buffers and RNG streams (Module.state_dict)
    optim.<key>     optimizer moments and step count
    scaler.<key>    the loss scaler's scale and trackers (absent without a scaler)
    trainer.<key>   steps taken, steps skipped, the batch sampler's RNG stream
    meta.format     the format version;  meta.config  the run's config as UTF-8 JSON bytes

save_checkpoint writes a temporary file in the same directory, flushes it to
disk and renames it over the old one (`os.replace` is atomic on POSIX and
Windows), so a crash mid-save leaves the previous checkpoint whole.
load_checkpoint checks the whole file (readable, every key present with the
right shape and dtype, values in range) before it changes anything, and
raises ValueError with a one-line message otherwise.

A run directory holds config.json, metrics.jsonl (one JSON record per
logged step), routing.jsonl (the routing statistics of those steps) and
checkpoint.npz.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

FORMAT = 1
_UMASK = os.umask(0o022)
os.umask(_UMASK)                 # read the process umask (os.umask can only read by setting)
CONFIG_FILE, METRICS_FILE, ROUTING_FILE, CHECKPOINT_FILE = \
    "config.json", "metrics.jsonl", "routing.jsonl", "checkpoint.npz"


def _temporary(path: Path):
    """(fd, name) of a new file beside path, with the permissions open() would give it."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, tmp


def _parts(model, optimizer, scaler, trainer) -> dict:
    """prefix -> the object whose state_dict goes under it (scaler only if there is one)."""
    parts = {"model": model, "optim": optimizer, "trainer": trainer}
    if scaler is not None:
        parts["scaler"] = scaler
    return parts


def checkpoint_arrays(model, optimizer, scaler, trainer, config: dict | None = None) -> dict:
    """The flat dict of arrays a checkpoint holds (see the module docstring)."""
    arrays = {f"{prefix}.{k}": np.asarray(v)
              for prefix, owner in _parts(model, optimizer, scaler, trainer).items()
              for k, v in owner.state_dict().items()}
    arrays["meta.format"] = np.array(FORMAT, dtype=np.int64)                 # ()
    text = json.dumps(config or {}, sort_keys=True).encode()
    arrays["meta.config"] = np.frombuffer(text, dtype=np.uint8).copy()       # (bytes,)
    return arrays


def save_checkpoint(path, model, optimizer, scaler, trainer, config: dict | None = None) -> Path:
    """Write a checkpoint atomically: a temporary file beside `path`, fsync, os.replace.

    model, optimizer, scaler (or None), trainer: anything with state_dict().
    config: the run's configuration, stored as JSON for a resume to compare.
    """
    path = Path(path)
    arrays = checkpoint_arrays(model, optimizer, scaler, trainer, config)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path) -> dict:
    """Every array of a checkpoint file, fully read (so a damaged file fails here, not later).

    Raises ValueError naming the file when it is missing, truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"load_checkpoint: no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"load_checkpoint: {path} is truncated or corrupt ({reason})") from None
    if "meta.format" not in arrays or int(arrays["meta.format"]) != FORMAT:
        raise ValueError(f"load_checkpoint: {path} is not a moe_np checkpoint of format {FORMAT}")
    return arrays


def checkpoint_config(arrays: dict) -> dict:
    """The run configuration stored in a checkpoint's meta.config."""
    try:
        return json.loads(arrays["meta.config"].tobytes().decode())
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("load_checkpoint: meta.config is missing or not JSON") from None


def load_checkpoint(path, model, optimizer, scaler, trainer) -> dict:
    """Restore model, optimizer, scaler and trainer from `path`, all or nothing.

    The file is read and checked whole first; then each part loads
    strictly (keys, shapes, dtypes, values in range), and should any part
    refuse, every part is put back as it was. Returns the stored config
    dict. Raises ValueError with a one-line message.
    """
    arrays = read_checkpoint(path)
    parts = _parts(model, optimizer, scaler, trainer)
    given = {p: {k[len(p) + 1:]: v for k, v in arrays.items() if k.startswith(p + ".")}
             for p in ("model", "optim", "scaler", "trainer")}
    if given["scaler"] and scaler is None or scaler is not None and not given["scaler"]:
        raise ValueError(f"load_checkpoint: {path} was saved {'with' if given['scaler'] else 'without'}"
                         f" a loss scaler, this run has {'one' if scaler is not None else 'none'}")
    saved = {prefix: owner.state_dict() for prefix, owner in parts.items()}
    try:                            # each load_state_dict checks keys, shapes, dtypes (and values)
        for prefix, owner in parts.items():
            owner.load_state_dict(given[prefix])
    except ValueError as err:
        for prefix, owner in parts.items():
            owner.load_state_dict(saved[prefix])
        raise ValueError(f"load_checkpoint: {path} does not fit this run ({err})") from None
    return checkpoint_config(arrays)


# ---------------------------------------------------------------- run directories

def write_json_atomic(path, obj) -> None:
    """json.dump to a temporary file beside path, then os.replace."""
    path = Path(path)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_jsonl(path, record: dict) -> None:
    """One JSON object per line, appended."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file ([] if it does not exist); a torn last line is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def truncate_jsonl(path, before_step: int) -> None:
    """Keep only records with step < before_step (a resume drops what the checkpoint did not see)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if r.get("step", -1) < before_step]
    fd, tmp = _temporary(path)
    with os.fdopen(fd, "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    os.replace(tmp, path)


def read_run_config(run_dir) -> dict:
    """The "config" of RUN_DIR/config.json; ValueError if it is missing or unreadable."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        stored = json.loads(path.read_text())
        return stored["config"]
    except FileNotFoundError:
        raise ValueError(f"{run_dir} holds no run ({CONFIG_FILE} is missing)") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is unreadable ({type(err).__name__})") from None
