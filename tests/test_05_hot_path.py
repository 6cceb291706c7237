"""Chapter 5: the hot path. Kernels equal their NumPy twins, the three dispatch strategies
agree, the numba layer passes a gradient check, the kernels run as plain Python, and bad
input is rejected before any compiled code runs."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moe_np import SparseConfig, SparseMoE, bench, dispatch, experts
from moe_np.dispatch import jit, kernels, onehot, plan as spec, reference
from moe_np.gradcheck import check_pair
from moe_np.sparse import init_sparse_params, sparse_moe_backward, sparse_moe_forward, \
    sparse_moe_selection

ROOT = Path(__file__).resolve().parent.parent
ROUTERS = ("softmax_topk", "softmax_topk_raw", "switch", "topk_softmax", "sigmoid_bias",
           "noisy_topk", "expert_choice")


def draw_ids(rng, n, e, k, kind):
    """ids (n, k), distinct per row. random | one_expert: every token's first choice is
    expert 0 | idle: only k of the e experts are ever chosen, the others get no token."""
    if kind == "idle":
        subset = rng.choice(e, size=k, replace=False)
        return np.stack([rng.permutation(subset) for _ in range(n)]).astype(np.int64)
    ids = np.stack([rng.permutation(e)[:k] for _ in range(n)]).astype(np.int64)   # (n, k)
    if kind == "one_expert":
        ids = np.stack([np.concatenate([[0], rng.permutation(np.arange(1, e))[:k - 1]])
                        for _ in range(n)]).astype(np.int64)
    return ids


def routing_cases(seed=5):
    """(ids, num_experts, cap, order) over sizes (N=1, K=E, ...), id patterns, capacities and
    every drop policy's claiming order."""
    rng = np.random.default_rng(seed)
    for n, e, k in [(1, 1, 1), (1, 4, 2), (7, 3, 3), (40, 8, 2), (33, 5, 1), (64, 16, 4), (12, 2, 2)]:
        for kind in ("random", "one_expert", "idle"):
            ids = draw_ids(rng, n, e, k, kind)
            for cap in (None, 0, 1, 3, 2 * n):
                for policy in spec.POLICIES:
                    order = spec.token_order(rng.random((n, k)), policy, rng)   # (n,)
                    yield ids, e, cap, order


def test_routing_cases_cover_the_corners():
    cases = list(routing_cases())
    assert any(len(ids) == 1 for ids, *_ in cases)                         # N = 1
    assert any(ids.shape[1] == e for ids, e, *_ in cases)                  # K = E
    assert any(np.all(ids[:, 0] == 0) and len(ids) > 1 for ids, *_ in cases)   # one expert
    assert any(len(np.unique(ids)) < e for ids, e, *_ in cases)            # idle experts
    assert any(spec.plan_token_choice(ids, e, cap, o).num_dropped > 0 for ids, e, cap, o in cases)


def test_plan_kernel_reproduces_the_spec():
    for ids, e, cap, order in routing_cases():
        want = spec.plan_token_choice(ids, e, cap, order)
        got = jit.plan_token_choice(ids, e, cap, order)
        for name in ("rows_token", "rows_weight", "offsets", "token_rows"):
            a, b = getattr(want, name), getattr(got, name)
            assert b.dtype == np.int64 and np.array_equal(a, b), (name, ids.shape, e, cap)
        assert (got.capacity, got.num_dropped) == (want.capacity, want.num_dropped)


def masks(rng, n, k):
    """(eligible (N, K) bool or None, seq_len or None): no mask, a random token mask, an
    assignment-level mask, every token masked, none masked; per-sequence capacity with and
    without a mask, for every seq_len that splits the batch into 2 or more sequences."""
    token = rng.random(n) < 0.6                                            # (N,) real tokens
    cases = [(None, None), (np.repeat(token[:, None], k, axis=1), None),
             (rng.random((n, k)) < 0.7, None), (np.zeros((n, k), bool), None),
             (np.ones((n, k), bool), None)]
    for seq_len in [s for s in range(1, n // 2 + 1) if n % s == 0][-2:]:
        cases += [(None, seq_len), (np.repeat(token[:, None], k, axis=1), seq_len)]
    return cases


def masked_cases(seed=13):
    """routing_cases with every mask and per-sequence capacity of `masks`."""
    rng = np.random.default_rng(seed)
    for ids, e, cap, order in list(routing_cases())[::3]:
        for eligible, seq_len in masks(rng, *ids.shape):
            if seq_len is None or cap is not None:
                yield ids, e, cap, order, eligible, seq_len


def test_masked_plans_cover_the_corners():
    cases = list(masked_cases())
    assert any(e is not None and not e.any() for _, _, _, _, e, _ in cases)          # all masked
    assert any(s is not None and len(ids) // s > 1 and spec.plan_token_choice(
        ids, ne, cap, o, e, s).num_dropped > 0 for ids, ne, cap, o, e, s in cases)    # B > 1, drops


def test_plan_kernel_reproduces_the_spec_with_masks():
    """Padding masks and per-sequence capacity run in the kernel and give the spec's plan."""
    for ids, e, cap, order, eligible, seq_len in masked_cases():
        want = spec.plan_token_choice(ids, e, cap, order, eligible, seq_len)
        got = jit.plan_token_choice(ids, e, cap, order, eligible, seq_len)
        for name in ("rows_token", "rows_weight", "offsets", "token_rows"):
            assert np.array_equal(getattr(want, name), getattr(got, name)), (name, ids.shape, cap, seq_len)
        assert (got.capacity, got.num_dropped) == (want.capacity, want.num_dropped)
        if eligible is not None:
            assert np.all(got.token_rows[~eligible] == -1)                 # masked: no row at all


def all_plans(seed=6):
    """(plan, weights shape): every token-choice case, (N, K) weights, masked and per-sequence
    plans among them, then expert-choice plans, (E, C) weights, whose token_rows is (N, E):
    a token may own up to E rows."""
    for ids, e, cap, order in routing_cases():
        yield spec.plan_token_choice(ids, e, cap, order), ids.shape
    for ids, e, cap, order, eligible, seq_len in list(masked_cases())[::4]:
        yield spec.plan_token_choice(ids, e, cap, order, eligible, seq_len), ids.shape
    rng = np.random.default_rng(seed)
    for n, e, c in [(1, 3, 1), (9, 4, 3), (20, 2, 20)]:
        yield spec.plan_expert_choice(np.stack([rng.permutation(n)[:c] for _ in range(e)]), n), (e, c)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kernels_equal_their_twins_bit_for_bit(dtype):
    """Same floating-point operations in the same order: identical bits, in both dtypes."""
    rng = np.random.default_rng(7)
    for plan, weights_shape in all_plans():
        (n, r), m, d = plan.token_rows.shape, len(plan.rows_token), 5
        num_w = int(np.prod(weights_shape))
        x, dy = rng.standard_normal((2, n, d)).astype(dtype)           # (N, D) each
        rows = rng.standard_normal((m, d)).astype(dtype)               # (M, D)
        w_flat = rng.random(num_w).astype(dtype)                       # (W,)
        got = kernels.gather_rows(x, plan.rows_token, np.empty((m, d), dtype))
        assert np.array_equal(got, kernels.gather_rows_twin(x, plan.rows_token))
        assert np.array_equal(kernels.copy_rows(got, np.empty_like(got)), kernels.copy_rows_twin(got))
        got = kernels.combine_rows(rows, w_flat, plan.rows_weight, plan.token_rows,
                                   np.full((n, d), np.nan, dtype))     # stale values must go
        assert got.dtype == dtype and np.array_equal(
            got, kernels.combine_rows_twin(rows, w_flat, plan.rows_weight, plan.token_rows))
        got = kernels.combine_grad_rows(dy, rows, w_flat, plan.rows_token, plan.rows_weight,
                                        np.empty((m, d), dtype), np.full(num_w, np.nan, dtype))
        want = kernels.combine_grad_rows_twin(dy, rows, w_flat, plan.rows_token, plan.rows_weight)
        assert all(a.dtype == dtype and np.array_equal(a, b) for a, b in zip(got, want))
        got = kernels.sum_rows(rows, plan.token_rows, np.full((n, d), np.nan, dtype))
        assert np.array_equal(got, kernels.sum_rows_twin(rows, plan.token_rows))


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("rows, width", [(0, 8), (1, 5), (7, 33), (300, 70), (700, 160)])
def test_pointwise_kernels_match_their_twins(dtype, rows, width):
    """The experts' compiled passes against experts.NUMPY_POINTWISE: the ReLU passes bit for
    bit (NaN kept, -0.0 -> +0, exact zeros in h, column sums from +0 in row order), SwiGLU
    too (NumPy's exp between the kernels)."""
    rng = np.random.default_rng(rows + width)
    twin, kern = experts.NUMPY_POINTWISE, jit.POINTWISE
    h = rng.standard_normal((rows, width)).astype(dtype)              # (M, H)
    h[:, :2] = 0
    h[rows // 2:, 2] = -0.0
    if rows > 3:
        h[1, 3], h[2, 3] = np.nan, np.inf
    b = rng.standard_normal(width).astype(dtype)                       # (H,)
    b[2] = -0.0
    relu = twin.bias_relu(h.copy(), b)                                 # (M, H)
    assert same_bits(kern.bias_relu(h.copy(), b), relu)
    assert same_bits(kern.add_bias(h.copy(), b), twin.add_bias(h.copy(), b))
    da = rng.standard_normal((rows, width)).astype(dtype)              # (M, H)
    da[:, 4:6] = -0.0
    want_da, got_da = da.copy(), da.copy()
    assert same_bits(kern.relu_grad(got_da, relu), twin.relu_grad(want_da, relu))
    assert same_bits(got_da, want_da)
    assert same_bits(kern.column_sums(da), twin.column_sums(da))
    picks = rng.integers(0, max(rows, 1), size=rows)                   # (M,) any order, repeats
    assert same_bits(kern.take_rows(da, picks, np.empty_like(da)),
                     twin.take_rows(da, picks, np.empty_like(da)))
    a = 4 * rng.standard_normal((rows, width)).astype(dtype)           # (M, H)
    a[:, 1] = 0
    g = rng.standard_normal((rows, width)).astype(dtype)               # (M, H)
    assert same_bits(kern.swiglu(a, g, np.empty_like(a)), twin.swiglu(a, g, np.empty_like(a)))
    got = kern.swiglu_grad(da.copy(), a, g, np.empty_like(a))
    want = twin.swiglu_grad(da.copy(), a, g, np.empty_like(a))
    assert all(same_bits(x, y) for x, y in zip(got, want))


def run_strategy(name, x, weights, params, kind, plan, dy):
    """Forward and backward through one strategy's interface.   -> y, dx, dweights, grads, selection."""
    s = dispatch.get_strategy(name)
    x_disp, g_cache = s.gather_forward(x, plan)
    y_disp, e_cache = s.experts_forward(x_disp, params, kind, plan)
    y, c_cache = s.combine_forward(y_disp, weights, plan)
    dy_disp, dweights = s.combine_backward(dy, c_cache)
    dx_disp, grads = s.experts_backward(dy_disp, e_cache)
    return y, s.gather_backward(dx_disp, g_cache), dweights, grads, s.experts_selection(e_cache)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
def test_strategies_agree_at_the_dispatch_seam(dtype, kind):
    """numba vs numpy: y and dx bit-equal when a token owns <= 2 rows (a + b == b + a);
    dweights differ only in summation order (sequential vs NumPy's pairwise). einsum: close."""
    rng = np.random.default_rng(8)
    tol = {np.float64: dict(rtol=1e-12, atol=1e-13), np.float32: dict(rtol=2e-5, atol=2e-6)}[dtype]
    for i, (plan, weights_shape) in enumerate(list(all_plans())[::7]):
        n, r = plan.token_rows.shape
        e, d = len(plan.offsets) - 1, 6
        x, dy = rng.standard_normal((2, n, d)).astype(dtype)           # (N, D) each
        weights = rng.random(weights_shape).astype(dtype)              # (N, K) or (E, C)
        params = {k: v + 0.1 for k, v in experts.init_experts(kind, e, d, 4, rng, dtype).items()}
        out = {s: run_strategy(s, x, weights, params, kind, plan, dy) for s in dispatch.STRATEGIES}
        ref = out["numpy"]
        for s in ("numba", "einsum"):
            for a, b in zip(ref[:3], out[s][:3]):
                assert a.dtype == b.dtype == dtype and np.allclose(a, b, **tol), (s, i)
            assert all(np.allclose(ref[3][k], out[s][3][k], **tol) for k in ref[3]), (s, i)
            assert all(np.array_equal(a, b) for a, b in zip(ref[4], out[s][4])), (s, i)
        if r <= 2:
            assert np.array_equal(ref[0], out["numba"][0]) and np.array_equal(ref[1], out["numba"][1])


def layer_config(router, **changes):
    k = 1 if router == "switch" else 2
    cap = 1.0 if router in ("expert_choice", "softmax_topk", "sigmoid_bias") else None
    policy = {"softmax_topk": "priority", "sigmoid_bias": "random"}.get(router, "position")
    base = SparseConfig(d_model=6, num_experts=4, d_hidden=5, k=k, router=router, capacity_factor=cap,
                        drop_policy=policy, num_shared=int(router == "topk_softmax"),
                        expert="swiglu" if router == "softmax_topk_raw" else "mlp")
    return replace(base, **changes)


@pytest.mark.parametrize("router", ROUTERS)
def test_three_strategies_agree_through_the_layer(router):
    rng = np.random.default_rng(9)
    x, dy = rng.standard_normal((2, 24, 6))                           # (N, D) each
    out = {}
    for s in dispatch.STRATEGIES:
        layer = SparseMoE(layer_config(router, dispatch=s), seed=3, dtype=np.float64)
        layer.train()
        out[s] = (layer.forward(x), layer.backward(dy), dict(layer.grads), layer.stats)
    ref = out["numpy"]
    for s in ("numba", "einsum"):
        y, dx, grads, stats = out[s]
        assert np.allclose(y, ref[0], rtol=1e-12, atol=1e-13), s
        assert np.allclose(dx, ref[1], rtol=1e-11, atol=1e-13), s
        assert all(np.allclose(grads[k], ref[2][k], rtol=1e-11, atol=1e-13) for k in ref[2]), s
        assert np.array_equal(stats.counts, ref[3].counts) and stats.num_dropped == ref[3].num_dropped
    if router != "expert_choice":                                      # a token owns <= K = 2 rows
        assert np.array_equal(out["numba"][0], ref[0])


def run_layer(config, x, dy, mask, seed=3):
    layer = SparseMoE(config, seed=seed, dtype=x.dtype)
    y = layer.forward(x, mask=mask)
    return y, layer.backward(dy), dict(layer.grads), layer.stats, layer.aux


@pytest.mark.parametrize("scope,masked", [("sequence", False), ("sequence", True), ("batch", True)])
def test_strategies_agree_with_masks_and_per_sequence_capacity(scope, masked):
    """Three sequences of 8 tokens, C per sequence (an expert can hold up to 3C rows), with and
    without padding: every strategy gives the reference's numbers, numba its very bits."""
    rng = np.random.default_rng(14)
    x, dy = rng.standard_normal((2, 24, 6))                           # (N, D) each, B=3 x 8
    mask = (rng.random(24) < 0.7) if masked else None                  # (N,)
    out = {}
    for s in dispatch.STRATEGIES:
        config = layer_config("softmax_topk", dispatch=s, capacity_factor=1.0, seq_len=8,
                              capacity_scope=scope, balance_coef=0.01, min_capacity=1)
        out[s] = run_layer(config, x, dy, mask)
    ref = out["numpy"]
    assert ref[3].num_dropped > 0 and ref[3].counts.max() > 1 * 2 * 8 // 4   # drops; > C rows
    for s in ("numba", "einsum"):
        y, dx, grads, stats, aux = out[s]
        assert np.allclose(y, ref[0], rtol=1e-12, atol=1e-13), s
        assert np.allclose(dx, ref[1], rtol=1e-11, atol=1e-13), s
        assert all(np.allclose(grads[k], ref[2][k], rtol=1e-11, atol=1e-13) for k in ref[2]), s
        assert np.array_equal(stats.counts, ref[3].counts) and stats.num_dropped == ref[3].num_dropped
        assert aux == ref[4]
    assert np.array_equal(out["numba"][0], ref[0])
    if masked:
        assert np.all(out["numba"][0][~mask] == 0)                     # padding: no routed output


@pytest.mark.parametrize("strategy", dispatch.STRATEGIES)
@pytest.mark.parametrize("router,changes", [
    ("softmax_topk", dict(balance_coef=0.01, z_coef=0.001)),
    ("softmax_topk", dict(capacity_scope="sequence", seq_len=4, balance_coef=0.01)),
    ("sigmoid_bias", dict(z_coef=0.001, bias_gamma=0.01))])
def test_a_batch_without_real_tokens_gives_zeros(strategy, router, changes):
    """Every token masked: output, aux and every gradient exactly 0, no NaN, no warning."""
    config = layer_config(router, dispatch=strategy, num_shared=0, **changes)
    layer = SparseMoE(config, seed=2)
    x, dy = np.random.default_rng(15).standard_normal((2, 8, 6))      # (N, D) each
    with np.errstate(all="raise"):
        y = layer.forward(x, mask=np.zeros(8, bool))
        dx = layer.backward(dy)
    assert np.all(y == 0) and layer.aux == 0.0 and np.all(dx == 0)
    assert all(np.all(g == 0) for g in layer.grads.values())
    assert layer.stats.num_dropped == 0 and np.all(layer.stats.counts == 0)
    assert all(np.all(np.isfinite(b)) for b in layer.buffers.values())


@pytest.mark.parametrize("mask,match", [
    (np.ones(7, bool), r"sparse_moe_forward: mask must have shape \(8,\)"),
    (np.ones(8, np.int64), "sparse_moe_forward: mask must be bool, got int64"),
    (np.ones((8, 1), bool), r"sparse_moe_forward: mask must have shape \(8,\)")])
def test_bad_masks_rejected_by_the_layer(mask, match):
    layer = SparseMoE(layer_config("softmax_topk", dispatch="numba"), seed=0)
    with pytest.raises(ValueError, match=match):
        layer.forward(np.zeros((8, 6)), mask=mask)


def test_bad_masks_rejected_before_the_plan_kernel():
    ids = small_case()[0]                                              # (N=4, K=2)
    for bad, match in [(np.ones((4, 1), bool), r"eligible must have shape \(4, 2\)"),
                       (np.ones((4, 2), np.uint8), "eligible must be a bool array, got uint8"),
                       ([[True, True]] * 4, "eligible must be a bool array, got list")]:
        with pytest.raises(ValueError, match="plan_token_choice: " + match):
            jit.plan_token_choice(ids, 3, 1, np.arange(4), eligible=bad)
    for seq_len in (3, 0, 2.0):
        with pytest.raises(ValueError, match="plan_token_choice: seq_len must be a positive integer"):
            jit.plan_token_choice(ids, 3, 1, np.arange(4), seq_len=seq_len)


def test_numba_strategy_runs_the_kernels(monkeypatch):
    """A layer with dispatch="numba" calls every compiled kernel, masked or not: the fast path,
    not the NumPy reference under another name. The plan, combine and gather backward run
    once per forward+backward, the gather once; the experts' kernels once per expert with rows
    (take_rows: the backward gathers its input rows again)."""
    once = ("plan_kernel", "combine_rows", "combine_grad_rows", "sum_rows")
    once += ("gather_rows",)
    pointwise = {"mlp": ("bias_relu_rows", "add_bias_rows", "relu_grad_columns", "column_sums",
                         "take_rows"),
                 "swiglu": ("neg_abs_rows", "swiglu_rows", "swiglu_grad_rows", "take_rows")}
    calls = []
    for name in dict.fromkeys(once + pointwise["mlp"] + pointwise["swiglu"]):
        kernel = getattr(kernels, name)
        assert hasattr(kernel, "py_func") or os.environ.get("NUMBA_DISABLE_JIT") == "1"
        monkeypatch.setattr(kernels, name, lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a))
    x, dy = np.random.default_rng(16).standard_normal((2, 16, 6))    # (N, D) each
    for router, mask, changes in [("softmax_topk", None, {}), ("softmax_topk", np.arange(16) % 3 > 0, {}),
                                  ("softmax_topk", None, dict(capacity_scope="sequence", seq_len=8)),
                                  ("softmax_topk_raw", None, {})]:
        calls.clear()
        config = layer_config(router, dispatch="numba", **changes)
        layer = SparseMoE(config, seed=3, dtype=x.dtype)
        layer.forward(x, mask=mask)
        layer.backward(dy)
        busy = int(np.count_nonzero(layer.stats.counts))               # experts with rows
        assert all(calls.count(name) == 1 for name in once), (router, mask, changes, calls)
        assert all(calls.count(name) >= busy for name in pointwise[config.expert]), (router, calls)


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
def test_ragged_backward_regathers_and_overwrites_with_the_same_bits(kind):
    """Keeping (x, rows) instead of x_sorted and writing dx over dy change no bit of any
    gradient; idle experts still get zero gradients."""
    rng = np.random.default_rng(17)
    ids = draw_ids(rng, 30, 5, 2, "idle")                              # (N, K): 3 experts idle
    plan = spec.plan_token_choice(ids, 5, None, np.arange(30))
    x = rng.standard_normal((30, 6)).astype(np.float32)                # (N, D)
    params = experts.init_experts(kind, 5, 6, 7, rng, np.float32)
    x_sorted = x[plan.rows_token]                                      # (M, D)
    dy = rng.standard_normal(x_sorted.shape).astype(np.float32)        # (M, D)
    y, kept = experts.ragged_experts_forward(x_sorted, params, kind, plan.offsets)
    y2, lean = experts.ragged_experts_forward(x_sorted, params, kind, plan.offsets,
                                              source=(x, plan.rows_token))
    assert lean.x_sorted is None and kept.x_sorted is x_sorted and np.array_equal(y, y2)
    dx, grads = experts.ragged_experts_backward(dy, kept)
    dy_owned = dy.copy()
    dx2, grads2 = experts.ragged_experts_backward(dy_owned, lean, overwrite=True)
    assert dx2 is dy_owned and np.array_equal(dx, dx2) and not np.array_equal(dx, dy)
    assert all(np.array_equal(grads[k], grads2[k]) for k in grads)
    idle = np.setdiff1d(np.arange(5), ids)
    assert all(np.all(g[idle] == 0) for g in grads2.values())


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
def test_experts_side_by_side_give_the_bits_of_one_blas_thread(kind, compiled, monkeypatch):
    """MOE_NP_EXPERT_THREADS=2 runs whole experts on two Python threads, BLAS on one thread
    each: every output and gradient equals the in-turn run on one BLAS thread, bit for bit,
    with NumPy's pointwise passes or the numba strategy's (two threads in them at once)."""
    from moe_np import blas
    if blas._control() is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS whose threads can be set")
    rng = np.random.default_rng(19)
    ids = draw_ids(rng, 1250, 5, 2, "random")                          # (N, K): ~500 rows per expert
    plan = spec.plan_token_choice(ids, 5, None, np.arange(1250))
    x = rng.standard_normal((1250, 256)).astype(np.float32)           # (N, D)
    params = experts.init_experts(kind, 5, 256, 512, rng, np.float32)
    dy = rng.standard_normal((len(plan.rows_token), 256)).astype(np.float32)   # (M, D)
    pointwise = jit.POINTWISE if compiled else experts.NUMPY_POINTWISE

    def run():
        y, cache = experts.ragged_experts_forward(x[plan.rows_token], params, kind, plan.offsets,
                                                  source=(x, plan.rows_token), pointwise=pointwise)
        dx, grads = experts.ragged_experts_backward(dy.copy(), cache, overwrite=True)
        return [y, dx] + [grads[k] for k in sorted(grads)]
    get, put = blas._control()
    before = get()
    put(1)
    try:
        want = run()
    finally:
        put(before)
    monkeypatch.setenv(blas.ENV, "2")
    got = run()
    assert blas.threads() == before
    assert all(np.array_equal(a, b) for a, b in zip(want, got))
    monkeypatch.setenv(blas.ENV, "two")
    with pytest.raises(ValueError, match="blas: MOE_NP_EXPERT_THREADS must be a positive integer"):
        run()


def test_layer_cache_keeps_no_gathered_input():
    """After a forward the ragged strategies keep x and the plan's rows, not x_sorted (M, D)."""
    x = np.random.default_rng(18).standard_normal((16, 6))            # (N, D)
    for s in ("numpy", "numba"):
        layer = SparseMoE(layer_config("softmax_topk", dispatch=s), seed=0)
        layer.forward(x)
        cache = layer._cache.experts_cache
        assert cache.x_sorted is None and cache.source[0] is x, s


def test_float32_layer_strategies_agree():
    rng = np.random.default_rng(10)
    x, dy = rng.standard_normal((2, 40, 6)).astype(np.float32)        # (N, D) each
    out = {}
    for s in dispatch.STRATEGIES:
        layer = SparseMoE(layer_config("softmax_topk", dispatch=s), seed=4, dtype=np.float32)
        out[s] = (layer.forward(x), layer.backward(dy), dict(layer.grads))
    for s in ("numba", "einsum"):
        assert all(a.dtype == np.float32 for a in out[s][:2])
        assert np.allclose(out[s][0], out["numpy"][0], rtol=1e-5, atol=1e-6)
        assert np.allclose(out[s][1], out["numpy"][1], rtol=1e-4, atol=1e-5)
        assert all(np.allclose(out[s][2][k], out["numpy"][2][k], rtol=1e-4, atol=1e-5)
                   for k in out[s][2])


@pytest.mark.parametrize("router,policy", [("softmax_topk", "priority"), ("expert_choice", "position")])
def test_numba_layer_gradient_check(router, policy):
    """Finite differences through the numba strategy, with drops, guarded at every kink."""
    config = SparseConfig(d_model=4, num_experts=3, d_hidden=6, k=2, router=router,
                          capacity_factor=0.75 if router != "expert_choice" else 0.6,
                          drop_policy=policy, router_scale=1.0, dispatch="numba")
    rng = np.random.default_rng(11)
    for _ in range(50):
        params = {k: v + 0.2 * rng.standard_normal(v.shape)
                  for k, v in init_sparse_params(config, rng).items()}
        x = rng.standard_normal((5, 4))                                # (N, D)
        if np.diff(np.sort(x @ params["w_router"], axis=1), axis=1).min() < 0.05:
            continue
        forward = lambda x, **p: sparse_moe_forward(x, p, config)
        backward = lambda dout, cache: (lambda dx, g: {"x": dx} | g)(*sparse_moe_backward(dout, cache))
        pick = lambda x, **p: sparse_moe_selection(forward(x, **p)[1])
        try:
            rows = check_pair(f"numba[{router}]", forward, backward, {"x": x} | params, selection=pick)
        except ValueError as err:
            if "selection changed" in str(err):
                continue
            raise
        plan = forward(x, **params)[1].plan
        assert plan.num_dropped > 0 or np.all(plan.token_rows < 0, axis=1).any()   # drops in place
        assert rows and all(r.passed for r in rows), [(r.wrt, r.rel_error) for r in rows if not r.passed]
        return
    pytest.fail("no draw kept its selection")


PLAIN_PYTHON = """
import numpy as np
from moe_np.dispatch import jit, kernels, plan as spec, reference
assert not hasattr(kernels.combine_rows, "py_func"), "the kernels are still compiled"
rng = np.random.default_rng(0)
for n, e, k, cap in [(1, 2, 1, None), (9, 4, 2, 3), (16, 3, 3, None)]:
    ids = np.stack([rng.permutation(e)[:k] for _ in range(n)])
    order = rng.permutation(n)
    want, got = spec.plan_token_choice(ids, e, cap, order), jit.plan_token_choice(ids, e, cap, order)
    assert all(np.array_equal(a, b) for a, b in zip(want[:4], got[:4]))
    x = rng.standard_normal((n, 3)); w = rng.random((n, k))
    xs, gc = jit.gather_forward(x, got); y, cc = jit.combine_forward(xs, w, got)
    ds, dw = jit.combine_backward(y, cc); dx = jit.gather_backward(ds, gc)
    rx, rg = reference.gather_forward(x, want); ry, rc = reference.combine_forward(rx, w, want)
    rds, rdw = reference.combine_backward(y, rc)
    assert np.array_equal(xs, rx) and np.allclose(y, ry) and np.allclose(dw, rdw)
    assert np.allclose(dx, reference.gather_backward(rds, rg))
    assert np.array_equal(kernels.copy_rows(xs, np.empty_like(xs)), xs)
ids = np.stack([rng.permutation(4)[:2] for _ in range(12)])            # masked, per-sequence capacity
eligible = np.repeat((rng.random(12) < 0.7)[:, None], 2, axis=1)
want = spec.plan_token_choice(ids, 4, 1, np.arange(12), eligible, seq_len=4)
got = jit.plan_token_choice(ids, 4, 1, np.arange(12), eligible, seq_len=4)
assert all(np.array_equal(a, b) for a, b in zip(want[:4], got[:4])) and want.num_dropped == got.num_dropped
print("plain python ok")
"""


def test_kernels_run_as_plain_python():
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-c", PLAIN_PYTHON], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "plain python ok" in done.stdout


# -- bad input: a ValueError naming the function, before any kernel runs -----------------------

def small_case(dtype=np.float64):
    ids = np.array([[0, 1], [1, 2], [2, 0], [1, 0]])                   # (N=4, K=2), E=3
    plan = jit.plan_token_choice(ids, 3, None, np.arange(4))
    x = np.arange(12, dtype=dtype).reshape(4, 3)                       # (N, D)
    return ids, plan, x, np.full((4, 2), 0.5, dtype=dtype)


@pytest.mark.parametrize("bad_ids,match", [
    (np.array([[0, 3]]), r"plan_token_choice: expert ids must lie in \[0, 3\)"),
    (np.array([[-1, 0]]), r"plan_token_choice: expert ids must lie in \[0, 3\)"),
    (np.array([[0.0, 1.0]]), r"plan_token_choice: ids must be integers"),
    (np.array([0, 1]), r"plan_token_choice: ids must have 2 dimensions")])
def test_bad_ids_rejected(bad_ids, match):
    with pytest.raises(ValueError, match=match):
        jit.plan_token_choice(bad_ids, 3, None)


def test_bad_order_and_capacity_rejected():
    ids = small_case()[0]
    with pytest.raises(ValueError, match="plan_token_choice: order must be a permutation"):
        jit.plan_token_choice(ids, 3, None, np.array([0, 0, 1, 2]))
    with pytest.raises(ValueError, match="plan_token_choice: cap must be None or an integer >= 0"):
        jit.plan_token_choice(ids, 3, -1)


def test_bad_buffers_rejected():
    ids, plan, x, w = small_case()
    with pytest.raises(ValueError, match="gather_forward: x must be float32 or float64.*float16"):
        jit.gather_forward(x.astype(np.float16), plan)
    with pytest.raises(ValueError, match="gather_forward: x must be float16, float32 or float64"):
        jit.gather_forward(x.astype(np.int64), plan)
    with pytest.raises(ValueError, match="gather_forward: x must be C-contiguous"):
        jit.gather_forward(np.asfortranarray(x), plan)
    with pytest.raises(ValueError, match="gather_forward: x has 3 rows but the plan needs 4"):
        jit.gather_forward(x[:3], plan)                                # a plan from another batch
    x_sorted, g_cache = jit.gather_forward(x, plan)
    with pytest.raises(ValueError, match="combine_forward: y_sorted must be C-contiguous"):
        jit.combine_forward(np.repeat(x_sorted, 2, axis=1)[:, ::2], w, plan)
    with pytest.raises(ValueError, match="combine_forward: weights are float32 but the data is float64"):
        jit.combine_forward(x_sorted, w.astype(np.float32), plan)
    with pytest.raises(ValueError, match="combine_forward: weights of shape \\(5, 2\\) do not match"):
        jit.combine_forward(x_sorted, np.ones((5, 2)), plan)
    with pytest.raises(ValueError, match="combine_forward: the plan indexes weight 7 but weights has only 4"):
        jit.combine_forward(x_sorted, np.ones((4, 1)), plan)           # mis-shaped weights
    y, c_cache = jit.combine_forward(x_sorted, w, plan)
    with pytest.raises(ValueError, match="combine_backward: dy has D=2 but the combined rows had D=3"):
        jit.combine_backward(np.ones((4, 2)), c_cache)
    with pytest.raises(ValueError, match="combine_backward: dy is float32 but the data is float64"):
        jit.combine_backward(y.astype(np.float32), c_cache)
    with pytest.raises(ValueError, match="gather_backward: dx_sorted has 7 rows but the plan needs 8"):
        jit.gather_backward(x_sorted[:7], g_cache)


@pytest.mark.parametrize("field,change,match", [
    ("token_rows", lambda a: a.__setitem__((0, 0), 8), r"plan.token_rows must lie in \[-1, M=8\)"),
    ("token_rows", lambda a: a.__setitem__((0, 0), a[1, 0]), "plan.token_rows and plan.rows_token disagree"),
    ("rows_token", lambda a: a.__setitem__(0, 9), r"plan.rows_token must lie in \[0, N=4\)"),
    ("rows_weight", lambda a: a.__setitem__(0, -2), "rows_weight be >= 0"),
    ("offsets", lambda a: a.__setitem__(1, 9), "the plan is inconsistent")])
def test_corrupt_plan_rejected(field, change, match):
    ids, plan, x, w = small_case()
    x_sorted, _ = jit.gather_forward(x, plan)
    bad = plan._replace(**{field: getattr(plan, field).copy()})
    change(getattr(bad, field))
    with pytest.raises(ValueError, match=match):
        jit.combine_forward(x_sorted, w, bad)
    with pytest.raises(ValueError, match=match):
        jit.gather_forward(x, bad)


def test_plan_index_arrays_must_be_int64():
    ids, plan, x, w = small_case()
    with pytest.raises(ValueError, match="gather_forward: plan.rows_token must be a C-contiguous 1-D int64"):
        jit.gather_forward(x, plan._replace(rows_token=plan.rows_token.astype(np.int32)))


def test_einsum_rejects_mis_shaped_padded_buffers():
    ids, plan, x, w = small_case()
    x_disp, _ = onehot.gather_forward(x, plan)                         # (E, C, D)
    params = experts.init_experts("mlp", 3, 3, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"experts_forward: x_disp must have shape \(E, C, D\)"):
        onehot.experts_forward(x_disp[:, :-1], params, "mlp", plan)
    with pytest.raises(ValueError, match="combine_forward: weights are float32"):
        onehot.combine_forward(x_disp, w.astype(np.float32), plan)
    y, c_cache = onehot.combine_forward(x_disp, w, plan)
    with pytest.raises(ValueError, match="combine_backward: dy is float64 with D=2 but"):
        onehot.combine_backward(np.ones((4, 2)), c_cache)


def test_layer_rejects_a_non_contiguous_input_before_the_kernels():
    layer = SparseMoE(layer_config("softmax_topk_raw", dispatch="numba", expert="mlp"), seed=0)
    x = np.random.default_rng(0).standard_normal((8, 12))[:, ::2]      # (N, D) strided view
    with pytest.raises(ValueError, match="gather_forward: x must be C-contiguous"):
        layer.forward(x)


def test_einsum_selection_ignores_padding_rows():
    """Padding rows of the (E, C) layout run through the experts too; the selection
    must report the real rows only, the same pattern as the ragged strategies."""
    ids = np.array([[0, 1], [0, 2], [0, 1], [2, 0]])                   # expert 0: 4 rows, C = 4
    plan = jit.plan_token_choice(ids, 3, None, np.arange(4))
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, 3))                                    # (N, D)
    params = experts.init_experts("mlp", 3, 3, 5, rng) | {"b1": np.full((3, 5), 5.0)}
    selection = {}
    for s in ("numpy", "einsum"):
        strategy = dispatch.get_strategy(s)
        x_disp, _ = strategy.gather_forward(x, plan)
        selection[s] = strategy.experts_selection(strategy.experts_forward(x_disp, params, "mlp", plan)[1])
    assert selection["einsum"][0].shape == (len(plan.rows_token), 5)  # (M, H), no padding rows
    assert np.array_equal(selection["einsum"][0], selection["numpy"][0])


# -- the benchmark, at quick sizes --------------------------------------------------------

def test_scaling_frees_each_point_before_the_next(monkeypatch):
    """The sweep runs from the largest E down and frees the last layer and floor before it
    makes the next (their memory is reused, not faulted anew); its rows still come in
    SCALING_E's order, strategies in the order given at each E."""
    import gc
    import weakref
    from moe_np import bench_runs
    made, alive, order = [], [], []

    def tracked(make):
        def wrapper(size, *args):
            gc.collect()
            alive.append(sum(ref() is not None for ref in made))       # earlier points still held
            order.append(size.e)
            out = make(size, *args)
            made.append(weakref.ref(out))
            return out
        return wrapper
    for name in ("make_layer", "gemm_floor_runner"):
        monkeypatch.setattr(bench_runs, name, tracked(getattr(bench_runs, name)))
    monkeypatch.setattr(bench_runs, "progress", lambda text: None)
    rows, notes = bench_runs.scaling(bench.QUICK, ("numba", "numpy"), 1, float("inf"))
    assert [(r["E"], r["strategy"]) for r in rows] == [(e, s) for e in bench.SCALING_E
                                                       for s in ("numba", "numpy")]
    assert notes == [] and all(r["us_per_token"] > 0 for r in rows)
    assert order == [e for e in sorted(bench.SCALING_E, reverse=True) for _ in range(3)]
    assert alive == [0, 1, 0] * len(bench.SCALING_E)    # the floor is made beside its own layer


def test_bench_timings_memory_and_report_at_quick_size():
    """Every measurement of one thread setting, in this process, at the quick size; the
    assembled report judges nothing at this size and prints one line per target."""
    core = bench.timing_core(list(bench.QUICK), 1, False, True)
    assert set(core["stages"]) == set(dispatch.STRATEGIES)
    assert all(v > 0 for st in core["stages"].values() for v in st.values())
    assert [(r["E"], r["strategy"]) for r in core["scaling"]] == [   # in SCALING_E's order
        (e, s) for s in ("numba", "numba, experts side by side") for e in bench.SCALING_E]
    assert 0 < core["lowp"]["fp16_step_ratio"] and 0 < core["lowp"]["fp8_step_ratio"]
    memory = bench.memory_run(list(bench.QUICK)) | bench.memory_model(bench.QUICK)
    stages = [name for name, *_ in memory["stages"]]
    assert stages[:6] == ["route", "plan", "gather", "experts", "combine", "combine_bwd"]
    assert stages[-1] == "end" and memory["traced_peak_mib"] >= max(m for _, m, _ in memory["stages"])
    jit = {"jit_compile_s": None, "jit_cached_s": 1.0, "jit_import_s": 0.5, "jit_cached_first_call_s": 0.5}
    results = bench.assemble(bench.QUICK, 1, {"default": core, "one": core}, jit, memory)
    json.loads(json.dumps(results))
    assert results["judged"] is False and all(t["met"] is None for t in results["targets"])
    assert {"fp16_step_ratio", "fp8_step_ratio", "threads"} <= set(results)
    assert set(results["threads"]) >= {"default", "one"}
    assert [{t["key"]: t["bound"] for t in results["threads"][s]["targets"]}["fwd_bwd_over_floor"]
            for s in ("default", "one")] == ["<= 1.2", "<= 1.15"]           # each setting's own
    settings = bench.process_settings()                               # what this process ran with
    assert all(results["threads"][s][bench.BIG_PAGES[0]] == settings["big_pages"] and
               results["threads"][s][bench.BLAS_SPIN[0]] == settings["blas_spin"] for s in ("default", "one"))
    report = bench.format_report(results)
    assert "smoke test" in report and "MISS" not in report and " met" not in report
    names = [t["name"] for t in results["targets"]]
    assert len(names) == len(set(names)) and all(report.count(n + " (target") == 1 for n in names)


def synthetic_core(seconds):
    """A timing_core result in which every measured time is `seconds`."""
    stage = {name: seconds for name in bench.STAGES}
    layer = {"forward_s": seconds, "fwd_bwd_s": 2 * seconds}
    return {"layer_times": {"numpy": layer, "numba": layer, "gemm_floor": layer},
            "stages": {"numpy": stage, "numba": stage},
            "copies": {"new": {name: seconds for name in ("memcpy", "copy_loop", "gather", "combine")},
                       "touched": {"memcpy": seconds / 2, "copy_loop": seconds / 2,
                                   "gather": seconds / 4, "combine": seconds / 4}},
            "scaling": [{"E": 8, "strategy": "numba", "us_per_token": 2.0, "floor_us_per_token": 1.0},
                        {"E": 64, "strategy": "numba", "us_per_token": 3.0, "floor_us_per_token": 1.25}]}


def test_bench_bandwidths_have_known_values():
    """A gather and a memcpy that take the same time have the same bandwidth, and a copy
    reads and writes its bytes once each: 2 * M * D * 4 bytes over the time."""
    size = bench.Size(1000, 250, 8, 4, 2)                              # M*D*4 = 2,000,000 bytes
    r = bench.derive(size, synthetic_core(0.01))
    assert r["memcpy_gbps"] == pytest.approx(0.4) and r["gather_gbps"] == pytest.approx(0.4)
    assert r["copy_loop_gbps"] == pytest.approx(0.4)
    values = bench.target_values(r)
    assert values["gather_over_memcpy"] == pytest.approx(1.0)
    assert values["gather_over_copy_loop"] == pytest.approx(1.0)
    assert values["scaling_ratio_64_8"] == pytest.approx(1.5)
    assert values["scaling_over_floor_64_8"] == pytest.approx(1.5 / 1.25)   # the GEMMs rose 1.25x
    assert values["combine_over_copy"] == pytest.approx(0.01 / (3_000_000 / 0.4e9))   # (M + N) D 4 bytes
    assert r["touched_gbps"] == pytest.approx({"memcpy": 0.8, "copy_loop": 0.8, "gather": 1.6})
    assert values["gather_over_copy_loop_touched"] == pytest.approx(2.0)   # touched against touched
    assert values["combine_over_copy"] == pytest.approx(4 / 3)        # 10 ms against 7.5 ms
    assert values["combine_over_copy_touched"] == pytest.approx(2.5 / 3.75)
    assert r["copy_ratios"]["new"] == pytest.approx({"gather_over_copy_loop": 1.0,
                                                     "combine_over_copy": values["combine_over_copy"]})
    rows = {t["key"]: t for t in bench.targets(values, judged=True)}
    assert rows["gather_over_copy_loop_touched"]["met"] and rows["scaling_over_floor_64_8"]["met"]
    assert rows["combine_over_copy_touched"]["met"]                   # judged on the touched pair
    values["scaling_over_floor_64_8"] = 1.21
    assert not {t["key"]: t for t in bench.targets(values, judged=True)}["scaling_over_floor_64_8"]["met"]


def test_fwd_bwd_target_is_judged_on_each_settings_own_bound():
    """The layer-over-floor bound is 1.2 at the default threads and 1.15 at one thread:
    1.18 meets the first and misses the second, and the report line names both bounds."""
    values = {"fwd_bwd_over_floor": 1.18}
    met = {s: bench.targets(values, True, bench.TIMING_TARGETS, s)[0] for s in bench.THREAD_SETTINGS}
    assert met["default"]["met"] and not met["one"]["met"]
    assert (met["default"]["bound"], met["one"]["bound"]) == ("<= 1.2", "<= 1.15")
    assert bench.targets(values, True)[0]["met"]                      # the headline: default's
    r = {"judged": True, "targets": [met["default"]],
         "threads": {s: {"targets": [met[s]]} for s in bench.THREAD_SETTINGS}}
    assert bench._target_lines(r)[1] == ("  fwd+bwd / GEMM floor (target <= 1.2 at the default "
                                         "threads, <= 1.15 at one): default threads 1.180 met, "
                                         "one thread 1.180 MISS")


def test_memory_model_counts_the_arrays_backward_keeps():
    """Each part of the memory model is the size of the array a real forward keeps."""
    size = bench.Size(48, 8, 12, 6, 2)
    layer = bench.make_layer(size, "numba")
    x, _ = bench.make_inputs(size)
    layer.forward(x)
    cache = layer._cache
    real = {"h": cache.experts_cache.hidden[0], "y_sorted": cache.combine_cache.y_sorted,
            "offsets": cache.plan.offsets, "rows_token": cache.plan.rows_token,
            "rows_weight": cache.plan.rows_weight, "token_rows": cache.plan.token_rows}
    parts = bench.memory_parts(size)
    assert {k: parts[k] for k in real} == {k: v.nbytes for k, v in real.items()}
    assert parts["ids"] == 8 * size.n * size.k and parts["probs"] == 4 * size.n * size.e
    assert bench.memory_model(size)["must_keep_mib"] * 2**20 == sum(parts.values())


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
def test_ffn_size_counts_an_experts_parameters(kind):
    """models.ffn_size is what init_experts allocates for one expert, and dense_width gives
    the FFN whose size is closest to the sparse block it is matched to."""
    from moe_np import models
    for d, h in [(4, 6), (16, 48), (30, 7)]:
        counted = sum(v.size for v in experts.init_experts(kind, 1, d, h, np.random.default_rng(0)).values())
        assert models.ffn_size(kind, d, h) == counted, (kind, d, h)
    config = SparseConfig(d_model=16, num_experts=8, d_hidden=40, k=2, expert=kind)
    for match, experts_used in (("active", 2), ("total", 8)):
        width = models.dense_width(config, match)
        target = 16 * 8 + experts_used * models.ffn_size(kind, 16, 40)
        size = lambda w: sum(v.size for v in models.FFN(16, w, kind).params.values())   # noqa: E731
        assert abs(size(width) - target) <= min(abs(size(width + 1) - target), abs(size(width - 1) - target))


def test_spin_comparison_runs_each_value_in_its_own_process():
    """Each fresh process ran with the OPENBLAS_THREAD_TIMEOUT it is filed under, even when
    this process has one set."""
    name = bench.BLAS_SPIN[0]
    before = os.environ.get(name)
    os.environ[name] = "24"
    try:
        runs = bench.spin_comparison(bench.QUICK, 1, spins=(None, "16"))
    finally:
        os.environ.pop(name) if before is None else os.environ.__setitem__(name, before)
    assert {k: r["blas_spin"] for k, r in runs.items()} == {"build default": "build default", "16": "16"}
    assert all(r["big_pages"] == bench.thread_env("default")[bench.BIG_PAGES[0]] for r in runs.values())
    assert all(r["fwd_bwd_s"] > 0 and r["gemm_floor_s"] > 0 and set(r["stages"]) == set(bench.STAGES)
               and r["lm_step_s"] > r["lm_gemm_floor_s"] > 0 for r in runs.values())


def test_thread_settings_are_the_defaults_and_one_thread(monkeypatch):
    """No thread variable at the defaults, all of them 1 for one thread; either way the short
    OpenBLAS spin and no 2 MiB pages from NumPy, unless a variable is set already, and then
    the value set is kept."""
    name, value = bench.BLAS_SPIN
    monkeypatch.delenv(name, raising=False)
    default, one = bench.thread_env("default"), bench.thread_env("one")
    assert not any(k in default for k in bench.THREAD_VARIABLES)
    assert all(one[k] == "1" for k in bench.THREAD_VARIABLES)
    assert default[name] == one[name] == value
    monkeypatch.setenv(name, "24")
    assert bench.thread_env("default")[name] == bench.thread_env("one")[name] == "24"
    pages, off = bench.BIG_PAGES                                      # NumPy's 2 MiB pages: the same
    monkeypatch.delenv(pages, raising=False)
    assert bench.thread_env("default")[pages] == bench.thread_env("one")[pages] == off == "0"
    monkeypatch.setenv(pages, "1")
    assert bench.thread_env("default")[pages] == bench.thread_env("one")[pages] == "1"
