"""Chapter 9's training: the language model on stdlib text, bits per byte, resume, generate, CLI.

Every run is tiny (one or two blocks of width 32, contexts of 32 bytes, a few dozen steps
on 20 files) so the file stays fast; the chapter's run is the full-size one.
"""
import json
import math
import os
import signal

import numpy as np
import pytest

from moe_np import checkpoint as ckpt, text
from moe_np.__main__ import main
from moe_np.lm_train import (LMTrainConfig, build_lm_run, evaluate_bpb, generate, load_lm_run,
                             sample_next, train_lm_in_dir, train_lm_quietly)

TINY = dict(max_files=20, d_model=32, layers=1, context=32, batch_size=8, steps=30, warmup=3,
            log_every=10, checkpoint_every=10, eval_bytes=2048, lr=1e-2)
TINY_ARGS = ["--max-files", "20", "--d-model", "32", "--layers", "1", "--context", "32",
             "--batch-size", "8", "--steps", "12", "--warmup", "2", "--log-every", "4",
             "--checkpoint-every", "5", "--eval-bytes", "2048"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    assert main(["train-lm", "--out", str(out), *TINY_ARGS]) == 0
    return out


def test_training_lowers_validation_loss():
    config = LMTrainConfig(**TINY)
    fresh = build_lm_run(config)
    before = evaluate_bpb(fresh.model, fresh.data.eval_windows, fresh.data.eval_bytes)
    assert abs(before["val_loss"] - math.log(256)) < 1.0          # near uniform at the start
    run = train_lm_quietly(config)
    after = run.trainer.history.records[-1]
    assert after["val_loss"] < before["val_loss"] - 1.0
    assert run.trainer.history.records[0]["routing"]                # routing statistics per block


def test_bits_per_byte_of_a_byte_model_is_loss_over_ln2():
    run = build_lm_run(LMTrainConfig(**TINY))
    got = evaluate_bpb(run.model, run.data.eval_windows, run.data.eval_bytes)
    assert np.isclose(got["val_bpb"], got["val_loss"] / math.log(2), rtol=1e-12)
    # with BPE a token spells several bytes: bits per byte = nats / ln 2 / bytes, not per token
    bpe = build_lm_run(LMTrainConfig(**TINY, tokenizer="bpe", vocab_size=300))
    got = evaluate_bpb(bpe.model, bpe.data.eval_windows, bpe.data.eval_bytes)
    per_token = bpe.data.eval_bytes.mean()
    assert per_token > 1.2
    assert np.isclose(got["val_bpb"], got["val_loss"] / math.log(2) / per_token, rtol=1e-9)


def test_trainer_draws_the_batchers_windows():
    run = build_lm_run(LMTrainConfig(**TINY))
    t = run.trainer
    rows = np.random.default_rng(TINY.get("seed", 0)).integers(0, len(t.x), t.batch_size)
    batch = text.Batcher(run.data.train, TINY["context"], TINY["batch_size"], seed=0).next()
    assert np.array_equal(t.x[rows], batch[:, :-1]) and np.array_equal(t.target[rows], batch[:, 1:])


class CtrlCAt:
    """Sends this process a SIGINT (what Ctrl-C sends) after the given step."""

    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, record):
        if trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_resume_is_bit_identical(tmp_path):
    config = LMTrainConfig(**TINY)
    straight = train_lm_in_dir(config, tmp_path / "a", log=lambda *_: None)
    stopped = train_lm_in_dir(config, tmp_path / "b", log=lambda *_: None, callbacks=[CtrlCAt(13)])
    assert stopped.trainer.history.interrupted and stopped.trainer.step == 13
    resumed = train_lm_in_dir(config, tmp_path / "b", resume=True, log=lambda *_: None)
    assert resumed.trainer.step == config.steps
    a = ckpt.read_checkpoint(tmp_path / "a" / ckpt.CHECKPOINT_FILE)
    b = ckpt.read_checkpoint(tmp_path / "b" / ckpt.CHECKPOINT_FILE)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    metrics = [json.loads(l) for l in (tmp_path / "b" / ckpt.METRICS_FILE).read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 10, 20, 29]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_generation_equals_full_forward_sampling(cli_run, temperature):
    """generate() over the KV cache picks what sampling from full forwards picks."""
    model, tok, config = load_lm_run(cli_run)
    prompt = b"def "
    got = generate(model, tok, prompt, tokens=12, temperature=temperature, top_k=None, seed=7)
    ids, rng = list(tok.encode(prompt)), np.random.default_rng(7)
    for _ in range(12):
        logits = model.forward(np.array([ids]))                      # (1, T, V)
        ids.append(sample_next(logits[0, -1], rng, temperature, None))
    want = tok.decode(np.array(ids[len(tok.encode(prompt)):]))
    assert got == want and (temperature == 0 or len(set(want)) > 3)


def test_generate_cli(cli_run, capsys):
    assert main(["generate", str(cli_run), "--prompt", "import ", "--tokens", "10",
                 "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("import ")
    assert main(["generate", str(cli_run), "--prompt", "import ", "--tokens", "10",
                 "--seed", "3"]) == 0
    assert capsys.readouterr().out == first                           # seeded


def _one_line_error(capsys, argv, *words):
    before = capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return before


def test_cli_errors(cli_run, tmp_path, capsys):
    _one_line_error(capsys, ["generate", str(cli_run), "--prompt", ""], "--prompt", "empty")
    layer_run = tmp_path / "layer"
    layer_run.mkdir()
    (layer_run / "config.json").write_text(json.dumps({"format": 1, "config": {"model": "moe"}}))
    _one_line_error(capsys, ["generate", str(layer_run)], str(layer_run), "not a train-lm run")
    _one_line_error(capsys, ["generate", str(tmp_path / "nowhere")], "nowhere")
    _one_line_error(capsys, ["train-lm", "--out", str(cli_run), *TINY_ARGS], "--out",
                    "already holds files")
    fresh = tmp_path / "fresh"
    _one_line_error(capsys, ["train-lm", "--out", str(fresh), "--tokenizer", "words"], "words")
    _one_line_error(capsys, ["train-lm", "--out", str(fresh), "--warmup", "50", "--steps", "10"],
                    "warmup=50")
    assert not fresh.exists()                                          # nothing written
    _one_line_error(capsys, ["train-lm", "--out", str(cli_run), "--resume", "--seed", "5"],
                    "seed")


def test_the_experiment_cache_is_reused_only_by_the_code_that_made_it(tmp_path, monkeypatch):
    """A cached run whose training code has changed is trained again, never reused stale."""
    from moe_np import lm_experiment
    trained = []

    def counted_train(config, tokenizer=None):
        trained.append(config.seed)
        return train_lm_quietly(config, tokenizer)

    monkeypatch.setattr(lm_experiment, "train_lm_quietly", counted_train)
    monkeypatch.setattr(lm_experiment, "model_cache_path", lambda config: tmp_path / "model.npz")
    cache, config = tmp_path / "runs.json", LMTrainConfig(**TINY | dict(steps=4, log_every=2))
    lm_experiment.experiment([config], cache_path=cache, log=lambda line: None)
    lm_experiment.experiment([config], cache_path=cache, log=lambda line: None)
    assert trained == [0]                               # the same code: read from the cache
    monkeypatch.setattr(lm_experiment, "code_fingerprint", lambda: "another version")
    lm_experiment.experiment([config], cache_path=cache, log=lambda line: None)
    assert trained == [0, 0]                            # other code: trained again
    assert len(json.loads(cache.read_text())) == 1      # the stale record is dropped


def test_the_step_floor_counts_the_products_the_step_makes():
    """bench's LM floor holds attention's products as attend_forward makes them: per block of
    query positions, over the keys the block may see (5/8 of the square at T = 4 blocks),
    the stacked query heads of a key/value head in one product; the per-stage floors split
    exactly those products."""
    from moe_np.attention import QUERY_BLOCK
    from moe_np.bench_lm import PARTS, step_gemms
    config = LMTrainConfig(**dict(TINY, context=4 * QUERY_BLOCK))
    lm = build_lm_run(config).model.config
    b, t, f = config.batch_size, config.context, lm.head_dim
    part = step_gemms(config, lm, "attention")
    forward = part[:len(part) // 3]                                # then two per product backward
    attention = [g for g in forward if g[0] == b * lm.num_kv_heads]   # not the projections (batch 1)
    macs = sum(p * m * k * n for p, m, k, n in attention) // lm.num_layers
    keys_seen = sum(QUERY_BLOCK * end for end in range(QUERY_BLOCK, t + 1, QUERY_BLOCK))
    assert keys_seen * 8 == t * t * 5
    assert macs == 2 * b * lm.num_heads * f * keys_seen           # q k^T and p v
    parts = [g for name in PARTS for g in step_gemms(config, lm, name)]   # the stages' own floors
    assert sorted(parts) == sorted(step_gemms(config, lm))         # split the step's products


HEAP_CHURN = """
import resource, sys
import numpy as np
from moe_np import heap
mode, sizes = sys.argv[1], [int(n) for n in sys.argv[2].split(",")]
kept = {"keep": heap.keep_pages, "keep128": lambda: heap.keep_pages(128),
        "every128": lambda: heap.keep_pages(128, every_size=True)}.get(mode, lambda: None)()

def churn():                                     # a step's worth of arrays, made and freed
    for _ in range(20):
        arrays = [np.ones(n, np.float32) for n in sizes]
        del arrays
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def churn_faults(modes, sizes) -> dict:
    """{mode: page faults of the second of two churns of `sizes` float32 arrays}, each mode in
    a fresh process (HEAP_CHURN); skips where keep_pages cannot act (not glibc)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    faults = {}
    for mode in modes:
        done = subprocess.run([sys.executable, "-c", HEAP_CHURN, mode, ",".join(map(str, sizes))],
                              cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        kept, faults[mode] = done.stdout.split()
        if kept == "False":
            pytest.skip("the C library is not glibc: keep_pages changes nothing here")
    return {mode: int(n) for mode, n in faults.items()}


def test_kept_heap_pages_stop_the_page_faults_of_repeated_arrays():
    """The same arrays made and freed again: without keep_pages each new array's pages fault
    again; with it the heap reuses them (the allocator of a fresh process each time)."""
    faults = churn_faults(("default", "keep"), (50_000, 260_000, 1_000_000, 120_000, 700_000))
    assert faults["default"] > 1000 and faults["keep"] * 100 < faults["default"]


def test_every_size_keeps_the_pages_of_arrays_over_the_mmap_limit_too():
    """Arrays over heap.MMAP_LIMIT made when the heap has no free top to hold them get
    mappings of their own under keep_pages, so they fault again each time; with every_size
    they come from the heap, which keeps them (128 MiB here) for the next time."""
    big = 10_500_000                                                  # floats: 40 MiB each
    faults = churn_faults(("keep128", "every128"), (big, big))
    assert faults["keep128"] > 200 and faults["every128"] * 20 < faults["keep128"]


def test_keep_pages_refuses_a_bad_size():
    from moe_np import heap
    for bad in (-1, 1.5, "64", True, 2048):
        with pytest.raises(ValueError, match=r"keep_pages: mib must be an integer in \[0, 2047\]"):
            heap.keep_pages(bad)
    with pytest.raises(ValueError, match="keep_pages: every_size must be True or False, got 1"):
        heap.keep_pages(64, every_size=1)
