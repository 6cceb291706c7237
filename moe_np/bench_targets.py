"""The benchmark's targets: the numbers of one thread setting derived from its timings
(derive), the bound each target sets (TIMING_TARGETS for each thread setting, ONCE_TARGETS
measured once), the ratio each is judged on (target_values) and the verdicts (targets).
bench.py measures; chapter 5's "The targets" says why each bound is what it is.
"""
from __future__ import annotations

from moe_np.bench_runs import Size, bandwidth_gbps, copy_ratios


def derive(size: Size, core: dict) -> dict:
    """The numbers of one thread setting, from its timings (see timing_core)."""
    gathered = size.n * size.k * size.d * 4                            # bytes of x_sorted (M, D)
    moved = (size.n * size.k + size.n) * size.d * 4                   # combine: read (M, D), write (N, D)
    t, st, new, touched = core["layer_times"], core["stages"], core["copies"]["new"], core["copies"]["touched"]
    r = {"moe_fwd_bwd_s": t["numba"]["fwd_bwd_s"], "gemm_floor_s": t["gemm_floor"]["fwd_bwd_s"],
         "gather_gbps": bandwidth_gbps(gathered, st["numba"]["gather"]),
         "memcpy_gbps": bandwidth_gbps(gathered, new["memcpy"]),
         "copy_loop_gbps": bandwidth_gbps(gathered, new["copy_loop"]),
         "combine_numba_s": st["numba"]["combine"], "combine_add_at_s": st["numpy"]["combine"],
         "scaling": core["scaling"], "copies": core["copies"]}
    r["combine_copy_s"] = moved / (r["copy_loop_gbps"] * 1e9)          # a copy loop moving as many bytes
    r["touched_gbps"] = {name: bandwidth_gbps(gathered, touched[name])
                         for name in ("gather", "memcpy", "copy_loop")}
    r["copy_ratios"] = copy_ratios(size, core["copies"])               # both in the same rounds
    for label, key in (("numba", "scaling_ratio_64_8"),
                       ("numba, experts side by side", "scaling_ratio_64_8_side_by_side")):
        per_e = {row["E"]: row for row in core["scaling"] if row["strategy"] == label}
        if 8 in per_e and 64 in per_e:
            r[key] = per_e[64]["us_per_token"] / per_e[8]["us_per_token"]
            if "floor_us_per_token" in per_e[8]:      # how much of the rise the GEMMs alone show
                r[key.replace("ratio", "floor_ratio")] = \
                    per_e[64]["floor_us_per_token"] / per_e[8]["floor_us_per_token"]
    if "torch" in t:
        r |= {"torch_fwd_bwd_s": t["torch"]["fwd_bwd_s"], "torch_max_abs_diff": core["torch_max_abs_diff"],
              "torch_gemm_floor_s": t["torch_gemm_floor"]["fwd_bwd_s"]}
        r["moe_vs_torch"] = r["moe_fwd_bwd_s"] / r["torch_fwd_bwd_s"]
    r["strategies"] = {s: t[s] | {"dispatch_s": v["plan"] + v["gather"], "combine_s": v["combine"],
                                  "stages": v} for s, v in st.items()}
    r["layer_times"] = t
    return r


# (key in the results, name, bound kind, bound): kind "<=", ">=" or "in" (a [low, high] range);
# a bound that differs between thread settings is a dict {setting: bound}
TIMING_TARGETS = (
    ("fwd_bwd_over_floor", "fwd+bwd / GEMM floor", "<=", {"default": 1.20, "one": 1.15}),
    # the 50-90 ms outside the GEMMs take as long at either setting, over a floor half as
    # long at the default threads (chapter 5, "The targets")
    ("gather_over_copy_loop_touched", "gather / compiled copy loop bandwidth, into touched memory",
     ">=", 0.70),
    ("add_at_over_combine", "np.add.at combine / numba combine", ">=", 10.0),
    ("combine_over_copy_touched", "numba combine / a copy loop moving its bytes, into touched memory",
     "<=", 1.25),
    ("scaling_over_floor_64_8", "numba us/token over the GEMM floor's, E=64 / E=8", "in", (0.8, 1.2)),
    ("moe_vs_torch", "fwd+bwd / PyTorch eager", "<=", 0.95))   # 0.8 lies at its own GEMM floor (chapter 5)
ONCE_TARGETS = (
    ("memory_ratio", "peak resident growth / (must keep + outputs + grads)", "<=", 1.25),
    ("jit_cached_s", "cached JIT start-up (s)", "<=", 2.0),
    ("fp16_step_ratio", "fp16 step / fp32 step", "<=", 1.3),
    ("fp8_step_ratio", "fp8 step / fp32 step", "<=", 1.6),
    ("lm_step_over_floor", "LM step / its GEMM floor", "<=", 1.5),
    ("lm_step_over_hf", "LM step / HF MixtralForCausalLM's", "<=", 0.5))


def target_values(r: dict) -> dict:
    """The ratio each target is judged on, from one setting's numbers (missing: not measured)."""
    v = {"fwd_bwd_over_floor": r["moe_fwd_bwd_s"] / r["gemm_floor_s"],
         "gather_over_memcpy": r["gather_gbps"] / r["memcpy_gbps"],
         "gather_over_copy_loop": r["gather_gbps"] / r["copy_loop_gbps"],
         "add_at_over_combine": r["combine_add_at_s"] / r["combine_numba_s"],
         "combine_over_copy": r["combine_numba_s"] / r["combine_copy_s"],
         "gather_over_copy_loop_touched": r["copy_ratios"]["touched"]["gather_over_copy_loop"],
         "combine_over_copy_touched": r["copy_ratios"]["touched"]["combine_over_copy"]}
    for key in ("scaling_ratio_64_8", "moe_vs_torch", "jit_cached_s", "fp16_step_ratio", "fp8_step_ratio"):
        if key in r:
            v[key] = r[key]
    if "scaling_floor_ratio_64_8" in r:   # the rise the GEMMs alone show is physical (chapter 5)
        v["scaling_over_floor_64_8"] = r["scaling_ratio_64_8"] / r["scaling_floor_ratio_64_8"]
    if "lm_step_s" in r:
        v["lm_step_over_floor"] = r["lm_step_s"] / r["lm_gemm_floor_s"]
    if "lm_torch_step_s" in r:
        v["lm_step_over_hf"] = r["lm_step_s"] / r["lm_torch_step_s"]
    if "memory" in r:
        v["memory_ratio"] = r["memory"]["rss_growth_mib"] / (r["memory"]["target_mib"] / 1.25)
    return v


def targets(values: dict, judged: bool, rows=TIMING_TARGETS + ONCE_TARGETS,
            setting: str = "default") -> list[dict]:
    """Each measured target: value, bound (the thread setting's, where they differ) and met
    (None when not judged: quick sizes)."""
    out = []
    for key, name, kind, bound in rows:
        if key not in values:
            continue
        bound = bound[setting] if isinstance(bound, dict) else bound
        v = float(values[key])
        met = {"<=": v <= bound, ">=": v >= bound}.get(kind) if kind != "in" else bound[0] <= v <= bound[1]
        text = f"in [{bound[0]}, {bound[1]}]" if kind == "in" else f"{kind} {bound}"
        out.append({"key": key, "name": name, "value": round(v, 4), "bound": text,
                    "met": bool(met) if judged else None})
    return out
