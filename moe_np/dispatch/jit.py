"""The "numba" dispatch strategy: the reference's data movement as compiled loops.

    plan     ids (N, K)        -> Plan              one counting sort (kernels.plan_kernel),
                                                    padding masks and per-sequence capacity included
    gather   x (N, D)          -> x_sorted (M, D)   parallel row copy
    experts  x_sorted (M, D)   -> y_sorted (M, D)   one GEMM chain per expert (experts.py), its
                                                    bias, ReLU / SwiGLU passes fused (POINTWISE)
    combine  y_sorted (M, D)   -> y (N, D)          each token sums its own rows, in parallel
    backward: combine_grad_rows gives dy_sorted and dweights in one pass;
              gather's backward is again a per-token sum of rows (no np.add.at).

Same interface and same results as `reference.py`: identical plans, and
values equal up to the order of a sum. Compiled code checks no bounds, so
everything is validated here, at the Python boundary, before a kernel
runs: ids in range, buffers C-contiguous float32/float64 of matching dtype
and shape, a plan whose every index lies inside the arrays it is used
with. Small index arrays (ids, order, weights) are converted to
contiguous int64 / contiguous copies; the (rows, D) data buffers never
are, since a silent copy would cost what this strategy exists to save.
"""
from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from moe_np import experts
from moe_np.dispatch import kernels
# the experts run on the same ragged layout as the reference strategy's, their pointwise passes compiled
from moe_np.dispatch.reference import experts_backward, experts_selection  # noqa: F401
from moe_np.dispatch.plan import Plan, check_buffer, check_eligible, check_routing, \
    check_seq_len, check_weights

LAYOUT = "ragged"
DTYPES = (np.float32, np.float64)
PARALLEL_MIN_ELEMENTS = 1 << 20   # below this many buffer entries a kernel runs on one thread:
                                  # waking the others (and taking a core from OpenBLAS, whose
                                  # threads wait spinning between GEMMs) costs more than the copy


class GatherCache(NamedTuple):
    num_tokens: int          # N, rows of the input
    plan: Plan


class CombineCache(NamedTuple):
    y_sorted: np.ndarray     # (M, D) the experts' outputs, kept for the weight gradient
    w_flat: np.ndarray       # (W,) the routing weights, flattened (W = N*K or E*C)
    weights_shape: tuple     # (N, K) or (E, C)
    plan: Plan


# -- boundary checks ---------------------------------------------------------------------

def check_data(fn: str, name: str, a, dtype=None) -> None:
    """A C-contiguous float32/float64 buffer, of `dtype` when given."""
    if a.dtype not in DTYPES:
        raise ValueError(f"{fn}: {name} must be float32 or float64 for the numba strategy, "
                         f"got {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise ValueError(f"{fn}: {name} is {a.dtype} but the data is {dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{fn}: {name} must be C-contiguous (strides {a.strides} for shape "
                         f"{a.shape}); pass np.ascontiguousarray({name})")


def _check_index(fn: str, name: str, a, ndim: int) -> None:
    if a.ndim != ndim or a.dtype != np.int64 or not a.flags.c_contiguous:
        raise ValueError(f"{fn}: plan.{name} must be a C-contiguous {ndim}-D int64 array, "
                         f"got {a.ndim}-D {a.dtype}")


def check_plan(fn: str, plan: Plan) -> None:
    """Every index of the plan lies inside the arrays it addresses, and the plan agrees with
    itself: offsets rise from 0 to M, rows_token[row] == n for each row token n owns, and
    every row is owned exactly once. O(M + N R): small next to one (M, D) pass."""
    for name, nd in (("rows_token", 1), ("rows_weight", 1), ("offsets", 1), ("token_rows", 2)):
        _check_index(fn, name, getattr(plan, name), nd)
    m, (n, r) = len(plan.rows_token), plan.token_rows.shape
    if len(plan.rows_weight) != m or plan.offsets[0] != 0 or plan.offsets[-1] != m \
            or np.any(np.diff(plan.offsets) < 0):
        raise ValueError(f"{fn}: the plan is inconsistent: {m} rows_token, {len(plan.rows_weight)} "
                         f"rows_weight, offsets from {plan.offsets[0]} to {plan.offsets[-1]}")
    if m and (plan.rows_token.min() < 0 or plan.rows_token.max() >= n or plan.rows_weight.min() < 0):
        raise ValueError(f"{fn}: plan.rows_token must lie in [0, N={n}) and rows_weight be >= 0, "
                         f"got [{plan.rows_token.min()}, {plan.rows_token.max()}] and "
                         f"min {plan.rows_weight.min()}")
    owned = plan.token_rows >= 0                                       # (N, R)
    rows = plan.token_rows[owned]                                      # (M,) if consistent
    if plan.token_rows.size and (plan.token_rows.min() < -1 or plan.token_rows.max() >= m):
        raise ValueError(f"{fn}: plan.token_rows must lie in [-1, M={m}), got "
                         f"[{plan.token_rows.min()}, {plan.token_rows.max()}]")
    owner = np.broadcast_to(np.arange(n)[:, None], (n, r))[owned]      # (M,)
    if len(rows) != m or np.any(np.bincount(rows, minlength=m) != 1) \
            or np.any(plan.rows_token[rows] != owner):
        raise ValueError(f"{fn}: plan.token_rows and plan.rows_token disagree (each of the "
                         f"M={m} rows must belong to exactly the token it was gathered from)")


def _check_weight_rows(fn: str, plan: Plan, w_flat) -> None:
    """Distinct weight indices: the backward writes one weight gradient per row, race-free."""
    if len(plan.rows_weight) and np.bincount(plan.rows_weight, minlength=len(w_flat)).max() > 1:
        raise ValueError(f"{fn}: plan.rows_weight repeats an index; each row needs its own weight")


def run_kernel(kernel, work: int, *args):
    """kernel(*args) on numba's threads, or on one thread when `work` (entries touched) is small."""
    if work >= PARALLEL_MIN_ELEMENTS:
        return kernel(*args)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(threads)


# -- the experts' pointwise passes, compiled ------------------------------------------------

def _bias_relu(h, b):
    return kernels.bias_relu_rows(h, b, h.dtype.type(0))


def _add_bias(y, b):
    return kernels.add_bias_rows(y, b)


def _relu_grad(da, h):
    return kernels.relu_grad_columns(da, h, da.dtype.type(0), da.dtype.type(1))


def _column_sums(a):
    return kernels.column_sums(a, a.dtype.type(0))


def _swiglu(a, b, out):
    e = np.exp(kernels.neg_abs_rows(a, out), out=out)                  # (M, H) exp(-|a|)
    return kernels.swiglu_rows(a, b, e, a.dtype.type(1))               # (M, H) over e (out)


def _swiglu_grad(du, a, b, db):
    np.exp(kernels.neg_abs_rows(a, db), out=db)                        # (M, H) exp(-|a|)
    return kernels.swiglu_grad_rows(du, a, b, a.dtype.type(1), db)


def _take_rows(x, rows, out):
    return kernels.take_rows(x, rows, out)


# The wrappers look each kernel up when called (a test observes every call). The
# low-precision path and the expert-parallel layer use these too (dispatch.pointwise_for).
POINTWISE = experts.Pointwise(_bias_relu, _add_bias, _relu_grad, _column_sums, _swiglu,
                              _swiglu_grad, _take_rows)


def experts_forward(x_sorted, params: dict, kind: str, plan: Plan, x=None):
    """The reference's ragged experts (experts.ragged_experts_forward), their pointwise passes
    compiled (POINTWISE). Given x, the cache keeps x and the plan's rows instead of x_sorted."""
    check_data("experts_forward", "x_sorted", x_sorted)
    source = None if x is None else (x, plan.rows_token)
    return experts.ragged_experts_forward(x_sorted, params, kind, plan.offsets, source=source,
                                          pointwise=POINTWISE)


# -- the strategy ------------------------------------------------------------------------

def plan_token_choice(ids, num_experts: int, cap: int | None, order=None, eligible=None,
                      seq_len: int | None = None) -> Plan:
    """The plan of plan.plan_token_choice, by one counting sort.   ids (N, K), order (N,),
    eligible (N, K) bool or None (padding tokens' assignments claim nothing), seq_len:
    capacity counted per sequence, or None. Masks and per-sequence capacity stay in the kernel."""
    check_routing("plan_token_choice", ids, num_experts, order)
    if cap is not None and (not isinstance(cap, (int, np.integer)) or cap < 0):
        raise ValueError(f"plan_token_choice: cap must be None or an integer >= 0, got {cap!r}")
    n, k = ids.shape
    if eligible is None:
        eligible = np.ones((n, k), dtype=bool)                         # (N, K)
    check_eligible("plan_token_choice", eligible, (n, k))
    if seq_len is not None:
        check_seq_len("plan_token_choice", seq_len, n)
    ids64 = np.ascontiguousarray(ids, dtype=np.int64)                  # (N, K)
    order = np.arange(n) if order is None else order
    order64 = np.ascontiguousarray(order, dtype=np.int64)              # (N,)
    cap_arg = -1 if cap is None else int(cap)
    rows_token, rows_weight, offsets, token_rows, dropped = kernels.plan_kernel(
        ids64, int(num_experts), cap_arg, order64, np.ascontiguousarray(eligible),
        int(seq_len or max(n, 1)))
    return Plan(rows_token, rows_weight, offsets, token_rows, cap, int(dropped))


def gather_forward(x, plan: Plan):
    """x_sorted[m] = x[rows_token[m]].   x (N, D) -> (M, D)."""
    check_buffer("gather_forward", "x", x, plan, rows=plan.token_rows.shape[0])
    check_data("gather_forward", "x", x)
    check_plan("gather_forward", plan)
    x_sorted = np.empty((len(plan.rows_token), x.shape[1]), dtype=x.dtype)   # (M, D)
    run_kernel(kernels.gather_rows, x_sorted.size, x, plan.rows_token, x_sorted)
    return x_sorted, GatherCache(len(x), plan)


def gather_backward(dx_sorted, cache: GatherCache):
    """dx[n] = sum of dx_sorted over token n's rows, j = 0..R-1.   (M, D) -> (N, D)."""
    plan = cache.plan
    check_buffer("gather_backward", "dx_sorted", dx_sorted, plan)
    check_data("gather_backward", "dx_sorted", dx_sorted)
    check_plan("gather_backward", plan)
    dx = np.empty((cache.num_tokens, dx_sorted.shape[1]), dtype=dx_sorted.dtype)   # (N, D)
    return run_kernel(kernels.sum_rows, dx_sorted.size, dx_sorted, plan.token_rows, dx)


def combine_forward(y_sorted, weights, plan: Plan):
    """y[n] = sum over token n's rows m of w_m y_sorted[m].   (M, D), (N, K) or (E, C) -> (N, D)."""
    check_buffer("combine_forward", "y_sorted", y_sorted, plan)
    check_data("combine_forward", "y_sorted", y_sorted)
    check_weights("combine_forward", weights, plan, y_sorted.dtype)
    check_plan("combine_forward", plan)
    w_flat = np.ascontiguousarray(weights).ravel()                     # (W,)
    _check_weight_rows("combine_forward", plan, w_flat)
    y = np.empty((plan.token_rows.shape[0], y_sorted.shape[1]), dtype=y_sorted.dtype)   # (N, D)
    run_kernel(kernels.combine_rows, y_sorted.size, y_sorted, w_flat, plan.rows_weight,
               plan.token_rows, y)
    return y, CombineCache(y_sorted, w_flat, weights.shape, plan)


def combine_backward(dy, cache: CombineCache):
    """-> dy_sorted (M, D) = w_m dy[token_m];  dweights (as weights), 0 where dropped."""
    plan, y_sorted = cache.plan, cache.y_sorted
    check_buffer("combine_backward", "dy", dy, plan, rows=plan.token_rows.shape[0])
    check_data("combine_backward", "dy", dy, y_sorted.dtype)
    if dy.shape[1] != y_sorted.shape[1]:
        raise ValueError(f"combine_backward: dy has D={dy.shape[1]} but the combined rows "
                         f"had D={y_sorted.shape[1]}")
    check_plan("combine_backward", plan)
    dy_sorted = np.empty_like(y_sorted)                                # (M, D)
    dweights = np.empty(len(cache.w_flat), dtype=y_sorted.dtype)       # (W,) zeroed by the kernel
    run_kernel(kernels.combine_grad_rows, y_sorted.size, dy, y_sorted, cache.w_flat,
               plan.rows_token, plan.rows_weight, dy_sorted, dweights)
    return dy_sorted, dweights.reshape(cache.weights_shape)


def warm_up(dtype=np.float32) -> None:
    """Compile (or load from numba's cache) every kernel for `dtype`, on a 4-token batch.

    Compilation happens at a kernel's first call for each dtype; calling
    this first keeps that one-off cost out of a timing."""
    ids = np.array([[0, 1], [1, 0], [1, 2], [2, 0]])                  # (N=4, K=2)
    plan = plan_token_choice(ids, 3, 2, np.arange(4))
    x = np.ones((4, 2), dtype=dtype)                                   # (N, D)
    x_sorted, gather_cache = gather_forward(x, plan)                   # (M, D)
    y, combine_cache = combine_forward(x_sorted, np.ones((4, 2), dtype=dtype), plan)   # (N, D)
    dy_sorted, _ = combine_backward(y, combine_cache)                  # (M, D)
    gather_backward(dy_sorted, gather_cache)
    h, b = np.ones((2, 4, 2), dtype=dtype)                             # (M, H) each
    _relu_grad(_bias_relu(_add_bias(h, b[0]), b[0]), h)
    _swiglu_grad(_swiglu(h, b, np.empty_like(h)), h, b, _column_sums(b) * b)
    _take_rows(h, np.arange(2), np.empty_like(h[:2]))
