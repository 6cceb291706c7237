"""Chapter 9's compiled passes (attention_kernels) against their NumPy twins, bit for bit:
the masked softmax and its gradient, RoPE and its transpose, the embedding's scatter-add,
RMSNorm's pair, NumPy's summation order; the attention pair wired through them; bad input
refused."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_np import attention, attention_kernels as ak, functional

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (np.float32, np.float64)


def wide_values(rng, shape, dtype):
    """Normal values scaled by 10^[-3, 3]: sums whose order shows in their last bits."""
    return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 3, shape)).astype(dtype)


def same_bits(a, b) -> bool:
    """Equal entries, NaN where NaN, and the same sign on every zero."""
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True) \
        and np.array_equal(np.signbit(a), np.signbit(b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pairwise_sum_is_numpys_sum(dtype):
    """Every length from 0 to 300 (one block, the eight running sums and the rest, halves),
    and two long runs that split several times; a -0 run sums to +0 as NumPy's does."""
    rng = np.random.default_rng(0)
    for n in list(range(301)) + [1000, 4097]:
        a = wide_values(rng, n + 5, dtype)                         # (n + 5,)
        got = ak.pairwise_sum(a[3:3 + n])
        assert type(got) is dtype and same_bits(np.array(got), np.array(a[3:3 + n].sum())), n
    assert same_bits(np.array(ak.pairwise_sum(-np.zeros(9, dtype))), np.array(dtype(0)))
    for bad in (np.ones((2, 3), dtype), np.ones(8, dtype)[::2], np.ones(4, np.float16), [1.0]):
        with pytest.raises(ValueError, match="pairwise_sum: a must be a 1-D C-contiguous"):
            ak.pairwise_sum(bad)


def scores(rng, shape, dtype, specials=True):
    """Random scores; with specials, one row holds a NaN, one a +inf, one huge values."""
    s = wide_values(rng, shape, dtype).reshape(-1, shape[-1])      # (R, L)
    if specials and len(s) > 3:
        s[1, 0], s[2, -1] = np.nan, np.inf
        s[3] *= dtype(1e30)
    return s.reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,queries", [((2, 3, 8, 8), 8), ((2, 1, 12, 9), 3), ((5, 5), 5),
                                           ((1, 2, 6, 130), 2), ((3, 1), 1)])
def test_causal_softmax_is_its_numpy_twin(dtype, shape, queries):
    """Keys before the queries' own (a KV cache), rows over 128 keys, a temperature that is
    not a power of two, NaN and inf rows: the kernel gives the twin's bits, in s itself."""
    s = scores(np.random.default_rng(1), shape, dtype)
    with np.errstate(invalid="ignore"):                            # NumPy on the NaN and inf rows
        want = attention.causal_softmax_numpy(s.copy(), 2.7, queries)
    got = ak.causal_softmax(s, 2.7, queries)
    assert got is s and same_bits(got, want)
    hidden = ~attention.causal_mask(queries, shape[-1])             # (queries, L)
    masked = got.reshape(-1, queries, shape[-1])[:, hidden]
    assert np.all((masked == 0) | np.isnan(masked))               # NaN only in a NaN row


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_grad_is_functional_softmax_backward(dtype):
    rng = np.random.default_rng(2)
    p = attention.causal_softmax_numpy(scores(rng, (3, 16, 140), dtype, specials=False), 1.3, 8)
    dp = wide_values(rng, p.shape, dtype)                          # (3, 16, 140)
    dp[0, 0, :] = -0.0                                             # a row of products -0: inner +0
    want = functional.softmax_backward(dp, functional.SoftmaxCache(p, -1, 1.3))
    got = ak.softmax_grad(dp, p, 1.3)
    assert got is dp and same_bits(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_rope_is_its_numpy_twin_for_any_strides(dtype, transpose):
    rng = np.random.default_rng(3)
    cos, sin = attention.rope_tables(5, 6, 1e4, dtype, start=7)   # (T, F/2) each
    x = wide_values(rng, (2, 5, 3, 6), dtype).transpose(0, 2, 1, 3)   # (B, H, T, F) a strided view
    for view in (x, np.ascontiguousarray(x)):
        assert same_bits(ak.rope(view, cos, sin, transpose), attention.rope_numpy(view, cos, sin, transpose))


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_add_is_np_add_at(dtype):
    rng = np.random.default_rng(4)
    rows, ids = wide_values(rng, (300, 7), dtype), rng.integers(0, 5, 300)   # ids repeat
    want = np.zeros((6, 7), dtype=dtype)                           # (V, D), one id never used
    np.add.at(want, ids, rows)
    assert same_bits(ak.scatter_add(rows, ids, np.zeros((6, 7), dtype=dtype)), want)


def twin_paths(monkeypatch):
    """attention's NumPy twins in place of every kernel: _kernels then finds no dtype it takes."""
    monkeypatch.setattr(ak, "DTYPES", ())


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_through_the_kernels_gives_the_twins_bits(dtype, monkeypatch):
    """The whole sublayer, forward and backward, grouped heads and several query blocks:
    the same bits with every pass compiled and with every pass in NumPy."""
    rng = np.random.default_rng(5)
    b, t, d, heads, kv = 2, 40, 16, 4, 2
    params = {name: wide_values(rng, shape, dtype) * dtype(1e-3) for name, shape in
              (("wq", (d, d)), ("wk", (d, d // 2)), ("wv", (d, d // 2)), ("wo", (d, d)))}
    x, dy = wide_values(rng, (2, b, t, d), dtype) * dtype(1e-2)   # (B, T, D) each
    cos, sin = attention.rope_tables(t, d // heads, 1e4, dtype)
    ids = rng.integers(0, 9, (b, t))
    table = wide_values(rng, (9, d), dtype)

    def run():
        y, cache = attention.attention_forward(x, params, heads, kv, cos, sin)
        dx, grads = attention.attention_backward(dy, cache, params)
        emb, emb_cache = attention.embedding_forward(ids, table)
        return [y, dx, *grads.values(), emb, attention.embedding_backward(dx, emb_cache)]
    compiled = run()
    twin_paths(monkeypatch)
    for got, want in zip(compiled, run(), strict=True):
        assert same_bits(got, want)


def test_attention_calls_every_kernel(monkeypatch):
    """float32 attention runs the compiled passes, not the twins under another name."""
    calls = []
    for name in ("scaled_masked_rows", "normalized_rows", "softmax_grad_rows", "rope_rows",
                 "scatter_add_rows", "rms_norm_rows", "rms_norm_grad_rows"):
        kernel = getattr(ak, name)
        monkeypatch.setattr(ak, name, lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a))
    rng = np.random.default_rng(6)
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in
              (("wq", (8, 8)), ("wk", (8, 4)), ("wv", (8, 4)), ("wo", (8, 8)))}
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)          # (B, T, D)
    cos, sin = attention.rope_tables(5, 4, 1e4, np.float32)
    y, cache = attention.attention_forward(x, params, 2, 1, cos, sin)
    dx, _ = attention.attention_backward(y, cache, params)
    attention.embedding_backward(dx, attention.embedding_forward(np.zeros((2, 5), int), x[0])[1])
    attention.rms_norm_backward(x, attention.rms_norm_forward(x, x[0, 0], 1e-5)[1])
    assert sorted(set(calls)) == sorted(["scaled_masked_rows", "normalized_rows", "softmax_grad_rows",
                                         "rope_rows", "scatter_add_rows", "rms_norm_rows",
                                         "rms_norm_grad_rows"])
    assert calls.count("rope_rows") == 4                           # q, k forward; dq, dk backward


PLAIN_PYTHON = """
import numpy as np
from moe_np import attention, attention_kernels as ak, functional
rng = np.random.default_rng(0)
s = rng.standard_normal((2, 6, 9)).astype(np.float32)
want = attention.causal_softmax_numpy(s.copy(), 2.0, 3)
p = ak.causal_softmax(s, 2.0, 3)
assert np.array_equal(p, want)
dp = rng.standard_normal(p.shape).astype(np.float32)
assert np.array_equal(functional.softmax_backward(dp, functional.SoftmaxCache(p, -1, 2.0)),
                      ak.softmax_grad(dp.copy(), p, 2.0))
x = rng.standard_normal((1, 2, 9, 4)).astype(np.float32)
cos, sin = attention.rope_tables(9, 4, 1e4, np.float32)
assert np.array_equal(ak.rope(x, cos, sin, True), attention.rope_numpy(x, cos, sin, True))
a = rng.standard_normal(300).astype(np.float32)
assert ak.pairwise_sum(a) == a.sum()
w = rng.standard_normal(9).astype(np.float32)
y, cache = attention.rms_norm_numpy(s, w, 1e-5)
y_loop, xhat, rinv = ak.rms_norm(s, w, 1e-5)
assert np.array_equal(y, y_loop) and np.array_equal(cache.rinv, rinv)
assert all(np.array_equal(a, b) for a, b in zip(ak.rms_norm_grad(s, xhat, rinv, w),
                                                attention.rms_norm_grad_numpy(s, cache)))
ids, rows = np.array([2, 0, 2]), rng.standard_normal((3, 9)).astype(np.float32)
want = np.zeros((4, 9), np.float32)
np.add.at(want, ids, rows)
assert np.array_equal(ak.scatter_add(rows, ids, np.zeros((4, 9), np.float32)), want)
print("plain python ok")
"""


def test_kernels_run_as_plain_python():
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", PLAIN_PYTHON],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "plain python ok" in done.stdout


# -- bad input: a ValueError naming the function and the argument, before a loop runs ----------

def test_bad_scores_are_refused():
    s = np.zeros((2, 4, 6), dtype=np.float32)
    cases = [(lambda: ak.causal_softmax(s.astype(np.float16), 1.0, 2), "causal_softmax: s must"),
             (lambda: ak.causal_softmax(s[:, :, ::2], 1.0, 2), "causal_softmax: s must"),
             (lambda: ak.causal_softmax(s, 0.0, 2), "causal_softmax: temperature"),
             (lambda: ak.causal_softmax(s, np.nan, 2), "causal_softmax: temperature"),
             (lambda: ak.causal_softmax(s, 1.0, 3), "causal_softmax: queries"),
             (lambda: ak.causal_softmax(s, 1.0, 8), "causal_softmax: queries"),
             (lambda: ak.causal_softmax(s, 1.0, 2.0), "causal_softmax: queries"),
             (lambda: ak.softmax_grad(s, s.astype(np.float64), 1.0), "softmax_grad: p must be float32"),
             (lambda: ak.softmax_grad(s, s[:1], 1.0), "softmax_grad: p"),
             (lambda: ak.softmax_grad(s, s, 1.0), "softmax_grad: p .* its own memory"),
             (lambda: ak.causal_softmax(np.zeros((2, 0), np.float32), 1.0, 1), "causal_softmax: s must"),
             (lambda: ak.causal_softmax(s, "2", 2), "causal_softmax: temperature"),
             (lambda: ak.softmax_grad(s, s.copy(), -1.0), "softmax_grad: temperature")]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_bad_rope_and_scatter_input_is_refused():
    x = np.zeros((1, 2, 3, 4), dtype=np.float32)
    cos, sin = attention.rope_tables(3, 4, 1e4, np.float32)
    for args, match in [((x[0], cos, sin), "rope: x must"),
                        ((x[..., :3], cos, sin), "rope: x must .* F even"),
                        ((x.astype(np.int32), cos, sin), "rope: x must"),
                        ((x, cos.astype(np.float64), sin), "rope: cos must be float32"),
                        ((x, cos, sin[:2]), r"rope: sin must be float32 \(T, F/2\) = \(3, 2\)")]:
        with pytest.raises(ValueError, match=match):
            ak.rope(*args)
    out, rows = np.zeros((4, 3), dtype=np.float32), np.ones((5, 3), dtype=np.float32)
    for args, match in [((rows, np.array([0, 1, 2, 3, 4]), out), r"scatter_add: ids must be 5 integers in \[0, 4\)"),
                        ((rows, np.array([0, -1, 2, 3, 0]), out), "scatter_add: ids must"),
                        ((rows, np.zeros(5), out), "scatter_add: ids must"),
                        ((rows, np.zeros(4, int), out), "scatter_add: ids must"),
                        ((rows.astype(np.float64), np.zeros(5, int), out), "scatter_add: rows must be float32"),
                        ((rows, np.array(list("abcde")), out), "scatter_add: ids must"),
                        ((rows, np.zeros(5, int), np.zeros((4, 3, 2), np.float32)), "scatter_add: rows must")]:
        with pytest.raises(ValueError, match=match):
            ak.scatter_add(*args)
    assert np.all(out == 0)                                        # nothing written


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 64), (7, 3), (3, 130), (1, 1, 1, 6), (16, 1)])
def test_rms_norm_pair_is_its_numpy_twin(dtype, shape):
    """Widths that are not powers of two (NumPy's mean divides in float64 by an integer count,
    then rounds), rows over 128 entries, a single column (whose dw NumPy sums pairwise: the
    twin runs), values over six decades, two eps; x and dy read-only."""
    rng = np.random.default_rng(7)
    x, dy = wide_values(rng, shape, dtype), wide_values(rng, shape, dtype)
    x.flags.writeable = dy.flags.writeable = False
    w = rng.standard_normal(shape[-1]).astype(dtype)              # (D,)
    for eps in (1e-5, 0.3):
        y, cache = attention.rms_norm_forward(x, w, eps)
        y_twin, cache_twin = attention.rms_norm_numpy(x, w, eps)
        assert same_bits(y, y_twin) and all(same_bits(a, b) for a, b in zip(cache, cache_twin))
        for got, want in zip(attention.rms_norm_backward(dy, cache),
                             attention.rms_norm_grad_numpy(dy, cache_twin)):
            assert same_bits(got, want)


def test_bad_rms_norm_input_is_refused():
    x, w = np.ones((3, 4), np.float32), np.ones(4, np.float32)
    rinv = np.ones((3, 1), np.float32)
    for call, match in [(lambda: ak.rms_norm(x, w.astype(np.float64), 1e-5), r"rms_norm: w must be float32 \(D=4,\)"),
                        (lambda: ak.rms_norm(x[:, ::2], w[:2], 1e-5), "rms_norm: x must"),
                        (lambda: ak.rms_norm(x, w, 0.0), "rms_norm: eps"),
                        (lambda: ak.rms_norm_grad(x, x[:2], rinv, w), "rms_norm_grad: xhat"),
                        (lambda: ak.rms_norm_grad(x, x, rinv[:2], w), r"rms_norm_grad: rinv must be \(3, 1\)"),
                        (lambda: ak.rms_norm_grad(x[:, :1].copy(), x[:, :1].copy(), rinv, w[:1]),
                         "rms_norm_grad: D must be >= 2"),
                        (lambda: ak.rms_norm(np.ones((3, 0), np.float32), w[:0], 1e-5), "rms_norm: x must")]:
        with pytest.raises(ValueError, match=match):
            call()


WITHOUT_NUMBA = """
import sys
sys.modules["numba"] = None                                        # numba cannot be imported
import numpy as np
from moe_np import attention, compiled
from moe_np.optim import AdamW
rng = np.random.default_rng(0)
params = {n: rng.standard_normal(s).astype(np.float32) for n, s in
          (("wq", (8, 8)), ("wk", (8, 4)), ("wv", (8, 4)), ("wo", (8, 8)))}
x = rng.standard_normal((2, 5, 8)).astype(np.float32)
cos, sin = attention.rope_tables(5, 4, 1e4, np.float32)
y, cache = attention.attention_forward(attention.rms_norm_forward(x, x[0, 0], 1e-5)[0], params, 2, 1, cos, sin)
dx, grads = attention.attention_backward(y, cache, params)
AdamW(params, lr=1e-3).step(grads)
print("twins without numba", compiled.load("attention_kernels"), compiled.load("optim_kernels"))
"""


def test_the_language_model_parts_run_their_twins_without_numba():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-c", WITHOUT_NUMBA], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "twins without numba None None" in done.stdout


def test_the_twin_keeps_the_mask_of_a_strided_block():
    """causal_softmax_numpy on a non-contiguous s: the mask lands on the scores it normalizes."""
    s = np.random.default_rng(8).standard_normal((3, 2, 4, 4)).transpose(1, 0, 2, 3)   # strided
    p = attention.causal_softmax_numpy(s, 1.0, 4)
    assert np.all(p[..., ~attention.causal_mask(4, 4)] == 0)
    assert np.allclose(p.sum(axis=-1), 1)


@pytest.mark.parametrize("path", ["compiled", "twin"])
def test_rms_norm_keeps_float32_with_a_numpy_eps(path, monkeypatch):
    """eps given as a NumPy float64: the output stays float32 (NumPy would promote), with the
    bits of a Python-float eps, on either path."""
    if path == "twin":
        monkeypatch.setattr(ak, "DTYPES", ())
    x = np.random.default_rng(9).standard_normal((4, 6)).astype(np.float32)
    w = np.ones(6, np.float32)
    y, cache = attention.rms_norm_forward(x, w, np.float64(1e-5))
    assert y.dtype == cache.rinv.dtype == np.float32
    assert same_bits(y, attention.rms_norm_numpy(x, w, 1e-5)[0])
