"""The language model's training step, measured (the lm_* section of `python -m moe_np bench`).

    measure_lm(quick, repeats, use_torch) -> dict
        lm_step_s         median seconds of one training step (forward, loss, backward,
                          clipping, AdamW) at chapter 9's main size
        lm_tokens_per_s   B T / lm_step_s
        lm_peak_mem_mib   the largest memory NumPy held during a step beyond what it held
                          before (tracemalloc: NumPy reports its buffers to it)
        lm_page_faults    page faults per step (the heap keeps freed pages: a handful)
        lm_gemm_floor_s   the same step's matrix products alone, on preallocated buffers
        lm_stage_floors_s the same for the products of attention, moe and head alone
        lm_stages         seconds per part: attention, moe (or ffn), head (+ loss), optimizer
                          (+ clipping), rest (embedding, norms, residuals)
        lm_torch_step_s   with torch and transformers importable: HF's MixtralForCausalLM at
                          the same config and batch, random weights, forward + backward + AdamW,
                          with the fastest of its experts implementations (lm_torch_experts)

A stage is timed by wrapping the forward and backward of that part of the model with a
clock (the methods of these instances only); the sum of the stages is the step.
"""
from __future__ import annotations

import time
import tracemalloc

import numpy as np


def _clocked(obj, name: str, totals: dict, stage: str) -> None:
    """Replace obj.name by the same call, its seconds added to totals[stage]."""
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[stage] += time.perf_counter() - start
    setattr(obj, name, wrapper)


def _instrument(run) -> dict:
    """Clocks on the parts of run's model, optimizer and loss; -> the totals they fill."""
    totals = dict.fromkeys(("attention", "moe", "head", "optimizer"), 0.0)
    model, trainer = run.model, run.trainer
    for block in model.blocks:
        _clocked(block.attn, "forward", totals, "attention")
        _clocked(block.attn, "backward", totals, "attention")
        _clocked(block.ffn, "forward", totals, "moe")
        _clocked(block.ffn, "backward", totals, "moe")
    for owner, name in ((trainer, "loss_forward"), (trainer, "loss_backward")):
        _clocked(owner, name, totals, "head")
    _clocked(trainer, "_update", totals, "optimizer")
    return totals


def _head_time(run, ids) -> float:
    """Seconds of the LM head's forward and backward alone (median of 3): the model calls
    them inside its own forward and backward, where no clock reaches."""
    from moe_np.transformer import lm_head_backward, lm_head_forward
    h = np.zeros((*ids.shape, run.model.config.d_model), dtype=np.float32)     # (B, T, D)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        logits, cache = lm_head_forward(h, run.model.head_weight())            # (B, T, V)
        lm_head_backward(logits, cache)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_steps(run, repeats: int) -> tuple[float, dict]:
    """Median step seconds and the median seconds of each stage over `repeats` steps."""
    trainer = run.trainer
    trainer.train_step()                                   # warm-up: JIT, first allocations
    totals = _instrument(run)
    steps, stages = [], []
    for _ in range(repeats):
        for k in totals:
            totals[k] = 0.0
        start = time.perf_counter()
        trainer.train_step()
        steps.append(time.perf_counter() - start)
        ids = np.zeros((trainer.batch_size, run.config.context), dtype=np.int64)   # (B, T)
        stage = dict(totals, head=totals["head"] + _head_time(run, ids))
        stage["rest"] = steps[-1] - sum(stage.values())
        stages.append(stage)
    med = {k: float(np.median([s[k] for s in stages])) for k in stages[0]}
    return float(np.median(steps)), med


def faults_per_step(run, steps: int = 3) -> float:
    """Page faults (minor: a page's first touch) per training step, over `steps` steps. With
    the heap's pages kept (build_lm_run) a step reuses the last one's memory: a handful."""
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        run.trainer.train_step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps


def peak_step_mib(run) -> float:
    """The most memory NumPy held during one step beyond what it held before, in MiB."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        run.trainer.train_step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return (peak - base) / 2**20


PARTS = ("attention", "moe", "head")    # the stages of time_steps whose products the floor has


def step_gemms(config, lm, part: str | None = None) -> list[tuple]:
    """Every matrix product of one training step as (batch, m, k, n), forward and backward;
    with `part` (one of PARTS; "moe" is every FFN block, sparse or dense) only that stage's.

    A product (m, k) @ (k, n) in the forward has two in the backward: (m, n) @ (n, k) for
    the input and (k, m) @ (m, n) for the weight; an attention product has two of the same
    kind. Attention's are the ones attend_forward makes: per block of query positions, a
    key/value head's A/P query heads stacked, over the keys the block may see. Routed
    experts see N K / E rows each (a balanced load)."""
    fwd = [g for name, g in _forward_gemms(config, lm) if part in (None, name)]
    bwd = [g for (p, m, k, nn) in fwd for g in ((p, m, nn, k), (p, k, m, nn))]
    return fwd + bwd


def _forward_gemms(config, lm) -> list[tuple[str, tuple]]:
    """(part, (batch, m, k, n)) for every product of the forward, in order."""
    from moe_np.attention import QUERY_BLOCK, query_blocks
    b, t, d, v = config.batch_size, config.context, lm.d_model, lm.vocab_size
    n, heads, kv, f = b * t, lm.num_heads, lm.num_kv_heads, lm.head_dim
    fwd = []
    for i in range(lm.num_layers):
        attn = [(1, n, d, heads * f), (1, n, d, kv * f), (1, n, d, kv * f), (1, n, heads * f, d)]
        for lo, hi, end in query_blocks(t, t, QUERY_BLOCK):         # scores, weighted values
            rows = heads // kv * (hi - lo)
            attn += [(b * kv, rows, f, end), (b * kv, rows, end, f)]
        moe = lm.moe if (i + 1) % lm.moe_every == 0 else None
        if moe is None:
            ffn = [(1, n, d, lm.d_ffn)] * 2 + [(1, n, lm.d_ffn, d)]
        else:
            rows = n * moe.k // moe.num_experts
            ffn = [(1, n, d, moe.num_experts)]
            ffn += [(moe.num_experts, rows, d, moe.d_hidden)] * 2 + [(moe.num_experts, rows, moe.d_hidden, d)]
        fwd += [("attention", g) for g in attn] + [("moe", g) for g in ffn]
    return fwd + [("head", (1, n, d, v))]


def gemm_floor(gemms, repeats: int) -> float:
    """Median seconds of all the products, float32, each into a preallocated output."""
    rng = np.random.default_rng(0)
    bufs = [(rng.standard_normal((p, m, k), dtype=np.float32),              # (batch, rows, inner)
             rng.standard_normal((p, k, n), dtype=np.float32),              # (batch, inner, columns)
             np.empty((p, m, n), dtype=np.float32)) for p, m, k, n in gemms]   # (batch, rows, columns)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for a, w, out in bufs:
            np.matmul(a, w, out=out)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


TORCH_EXPERTS = ("grouped_mm", "eager")   # HF's experts implementations worth timing on a CPU
                                          # ("batched_mm" copies every expert's weights per token:
                                          # 30x slower here)


def torch_step(config, lm, repeats: int) -> tuple[float, str] | None:
    """HF MixtralForCausalLM at the same sizes, random weights: median seconds of forward,
    backward and AdamW with each of TORCH_EXPERTS -> (the fastest, its name), or None."""
    try:
        import torch
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError:
        return None
    ids = torch.randint(0, lm.vocab_size, (config.batch_size, config.context + 1),
                        generator=torch.Generator().manual_seed(0))
    best = None
    for experts in TORCH_EXPERTS:
        hf = MixtralConfig(vocab_size=lm.vocab_size, hidden_size=lm.d_model,
                           intermediate_size=lm.moe.d_hidden, num_hidden_layers=lm.num_layers,
                           num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads,
                           max_position_embeddings=lm.context_length,
                           num_local_experts=lm.moe.num_experts, num_experts_per_tok=lm.moe.k,
                           rope_theta=lm.rope_theta, rms_norm_eps=lm.rms_eps,
                           tie_word_embeddings=lm.tie_embeddings, experts_implementation=experts)
        torch.manual_seed(0)
        model = MixtralForCausalLM(hf)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(input_ids=ids[:, :-1], labels=ids[:, 1:].contiguous()).loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times[1:]))
        best = (seconds, experts) if best is None or seconds < best[0] else best
    return best


def measure_lm(quick: bool = False, repeats: int = 5, use_torch: bool = True) -> dict:
    """The lm_* keys (see the module docstring) for chapter 9's main MoE run (quick: tiny)."""
    from moe_np.lm_experiment import experiment_configs
    from moe_np.lm_train import build_lm_run
    config = experiment_configs(quick)[0]
    run = build_lm_run(config)
    lm = run.model.config
    step, stages = time_steps(run, repeats)
    tokens = config.batch_size * config.context
    r = {"lm_step_s": step, "lm_tokens_per_s": tokens / step,
         "lm_peak_mem_mib": peak_step_mib(run), "lm_page_faults": faults_per_step(run),
         "lm_gemm_floor_s": gemm_floor(step_gemms(config, lm), repeats),
         "lm_stage_floors_s": {part: gemm_floor(step_gemms(config, lm, part), repeats)
                               for part in PARTS},
         "lm_stages": stages,
         "lm_size": {"batch": config.batch_size, "context": config.context, "d_model": lm.d_model,
                     "layers": lm.num_layers, "experts": lm.moe.num_experts, "k": lm.moe.k,
                     "vocab": lm.vocab_size}}
    if use_torch:
        hf = torch_step(config, lm, repeats)
        if hf is not None:
            r["lm_torch_step_s"], r["lm_torch_experts"] = hf
    return r


def format_lm(r: dict) -> list[str]:
    """The lm_* keys as report lines."""
    s = r["lm_size"]
    lines = [f"language model step, B={s['batch']} T={s['context']} D={s['d_model']} "
             f"{s['layers']} blocks, E={s['experts']} K={s['k']}, V={s['vocab']}, float32:",
             f"  step {r['lm_step_s'] * 1e3:.0f} ms ({r['lm_tokens_per_s']:,.0f} tokens/s); "
             f"matrix products alone {r['lm_gemm_floor_s'] * 1e3:.0f} ms "
             f"(step / floor {r['lm_step_s'] / r['lm_gemm_floor_s']:.1f}); "
             f"peak memory {r['lm_peak_mem_mib']:.0f} MiB, {r['lm_page_faults']:.0f} page faults",
             "  " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in r["lm_stages"].items()),
             "  their products alone: " + ", ".join(f"{k} {v * 1e3:.0f} ms"
                                                     for k, v in r["lm_stage_floors_s"].items())]
    if "lm_torch_step_s" in r:
        lines.append(f"  HF MixtralForCausalLM step {r['lm_torch_step_s'] * 1e3:.0f} ms, experts "
                     f"{r['lm_torch_experts']!r} (moe_np / HF {r['lm_step_s'] / r['lm_torch_step_s']:.2f})")
    return lines
