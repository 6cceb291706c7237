"""The "einsum" dispatch strategy: GShard's one-hot dispatch and combine tensors.

    dispatch[n, e, c] = 1 if token n sits in slot c of expert e      (N, E, C)
    combine[n, e, c]  = dispatch[n, e, c] * (that assignment's weight) (N, E, C)
    gather   x_disp = einsum("nec,nd->ecd", dispatch, x)        (E, C, D)   padded layout
    experts  y_disp[e] = f_e(x_disp[e])                           (E, C, D)   stacked GEMMs
    combine  y = einsum("nec,ecd->nd", combine, y_disp)           (N, D)

Every data movement is a dense matrix product, which is why this layout
suits accelerators that are good at little else. Each einsum is one GEMM
over the flattened (E*C) axis; `contract` below writes it as a matmul on
reshaped views, because np.einsum(optimize=True) sometimes copies a
transposed operand first (1.6x slower for "nd,ecd->nec"). The price is
O(N E C D) multiply-adds per einsum (almost all by zero) and two (N, E, C)
tensors. With C ~ K N / E the einsum costs ~ K N^2 D, independent of E,
and the tensors hold ~ K N^2 entries: at N = 8192 and K = 2 that is
128 Mi entries, 512 MiB each in float32, for 16 Ki useful ones.

Padding: expert e's slots counts[e]..C-1 hold zero rows. The experts run
on them too (their outputs are finite, f_e(0)), and the combine tensor
multiplies them by exactly zero, so they change no output and, since their
upstream gradient is exactly zero, no gradient. `experts_selection`
reports the ReLU pattern of the real rows only, in the ragged buffer's row
order, so it equals the other strategies' selection. For a dropless plan
(capacity None), or a capacity per sequence, C is the largest count.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from moe_np import experts
from moe_np.dispatch.plan import Plan, check_buffer, check_weights, plan_token_choice  # noqa: F401

LAYOUT = "padded"


class Slots(NamedTuple):
    """Where each ragged row m sits in the padded (E, C) layout."""
    token: np.ndarray     # (M,) rows_token
    expert: np.ndarray    # (M,) the expert that owns row m
    slot: np.ndarray      # (M,) its slot, m - offsets[expert]
    capacity: int         # C of the padded layout


class GatherCache(NamedTuple):
    dispatch: np.ndarray  # (N, E, C) the one-hot dispatch tensor
    plan: Plan


class ExpertsCache(NamedTuple):
    kind: str
    inner: tuple          # the stacked pair's cache (experts.MlpExpertsCache or SwigluExpertsCache)
    slots: Slots          # which (e, c) are real rows


class CombineCache(NamedTuple):
    combine: np.ndarray   # (N, E, C) the combine tensor
    y_disp: np.ndarray    # (E, C, D) the experts' outputs, kept for the weight gradient
    weights_shape: tuple  # (N, K) or (E, C)
    plan: Plan


def slots(plan: Plan) -> Slots:
    """(token, expert, slot) of every ragged row. C is the plan's capacity, or the largest
    count when that is larger: dropless, or a capacity counted per sequence (B sequences of
    C slots each can fill B*C rows of one expert)."""
    counts = plan.counts                                               # (E,)
    expert = np.repeat(np.arange(len(counts)), counts)                 # (M,)
    slot = np.arange(len(expert)) - plan.offsets[expert]               # (M,)
    cap = max(plan.capacity or 0, int(counts.max(initial=0)))
    return Slots(plan.rows_token, expert, slot, int(cap))


def contract(spec: str, a, b):
    """The three einsums of this layout, as one matmul each over the flattened (E*C) axis.

    "nec,nd->ecd": (N, E, C), (N, D) -> (E, C, D)
    "nec,ecd->nd": (N, E, C), (E, C, D) -> (N, D)
    "nd,ecd->nec": (N, D), (E, C, D) -> (N, E, C)
    """
    if spec == "nec,nd->ecd":
        n, e, c = a.shape
        return (a.reshape(n, e * c).T @ b).reshape(e, c, b.shape[1])   # (E, C, D)
    if spec == "nec,ecd->nd":
        n, e, c = a.shape
        return a.reshape(n, e * c) @ b.reshape(e * c, b.shape[2])       # (N, D)
    if spec == "nd,ecd->nec":
        e, c, d = b.shape
        return (a @ b.reshape(e * c, d).T).reshape(a.shape[0], e, c)    # (N, E, C)
    raise ValueError(f"contract: spec must be one of the three dispatch einsums, got {spec!r}")


def one_hot(plan: Plan, values, dtype) -> np.ndarray:
    """T[n, e, c] = values[m] for the row m at (token n, expert e, slot c), else 0.   (N, E, C)."""
    s = slots(plan)
    n, e = plan.token_rows.shape[0], len(plan.offsets) - 1
    table = np.zeros((n, e, s.capacity), dtype=dtype)                  # (N, E, C)
    table[s.token, s.expert, s.slot] = values                          # (M,) entries set
    return table


def check_padded(fn: str, name: str, a, plan: Plan) -> None:
    """A float (E, C, D) buffer matching the plan's padded layout."""
    want = (len(plan.offsets) - 1, slots(plan).capacity)
    if a.ndim != 3 or a.shape[:2] != want:
        raise ValueError(f"{fn}: {name} must have shape (E, C, D) = {want + ('D',)}, got {a.shape}")
    if a.dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"{fn}: {name} must be float16, float32 or float64, got {a.dtype}")


def gather_forward(x, plan: Plan):
    """x_disp = einsum("nec,nd->ecd", dispatch, x).   x (N, D) -> (E, C, D); padding rows 0."""
    check_buffer("gather_forward", "x", x, plan, rows=plan.token_rows.shape[0])
    dispatch = one_hot(plan, 1, x.dtype)                               # (N, E, C)
    x_disp = contract("nec,nd->ecd", dispatch, x)      # (E, C, D)
    return x_disp, GatherCache(dispatch, plan)


def gather_backward(dx_disp, cache: GatherCache):
    """dx = einsum("nec,ecd->nd", dispatch, dx_disp).   (E, C, D) -> (N, D)."""
    check_padded("gather_backward", "dx_disp", dx_disp, cache.plan)
    return contract("nec,ecd->nd", cache.dispatch, dx_disp)   # (N, D)


def experts_forward(x_disp, params: dict, kind: str, plan: Plan, x=None):
    """y_disp[e] = f_e(x_disp[e]) on all C slots, padding included.   (E, C, D) -> (E, C, D).
    x is accepted for the common interface and unused: the stacked pair keeps x_disp."""
    check_padded("experts_forward", "x_disp", x_disp, plan)
    pair = experts.expert_kind(kind)
    y_disp, inner = pair.forward(x_disp, *(params[k] for k in pair.names))   # (E, C, D)
    return y_disp, ExpertsCache(kind, inner, slots(plan))


def experts_backward(dy_disp, cache: ExpertsCache, overwrite: bool = False):
    """-> dx_disp (E, C, D), grads {name: (E, ...)} from the stacked pair (always a fresh dx_disp:
    overwrite is accepted for the common interface)."""
    pair = experts.expert_kind(cache.kind)
    dx_disp, *grads = pair.backward(dy_disp, cache.inner)              # (E, C, D), ...
    return dx_disp, dict(zip(pair.names, grads))


def experts_selection(cache: ExpertsCache):
    """The ReLU pattern of the real rows only, in ragged row order: (M, H) bool (mlp), or ()."""
    if cache.kind != "mlp":
        return ()
    pattern = experts.mlp_experts_selection(cache.inner)              # (E, C, H) padding included
    return (pattern[cache.slots.expert, cache.slots.slot],)           # (M, H) real rows


def combine_forward(y_disp, weights, plan: Plan):
    """y = einsum("nec,ecd->nd", combine, y_disp), combine = dispatch * weight.   -> (N, D)."""
    check_padded("combine_forward", "y_disp", y_disp, plan)
    check_weights("combine_forward", weights, plan, y_disp.dtype)
    combine = one_hot(plan, weights.ravel()[plan.rows_weight], y_disp.dtype)   # (N, E, C)
    y = contract("nec,ecd->nd", combine, y_disp)       # (N, D)
    return y, CombineCache(combine, y_disp, weights.shape, plan)


def combine_backward(dy, cache: CombineCache):
    """dy_disp = einsum("nec,nd->ecd", combine, dy);  dcombine = einsum("nd,ecd->nec", dy, y_disp);
    dweights = dcombine at each kept assignment's (n, e, c), 0 where dropped."""
    plan = cache.plan
    check_buffer("combine_backward", "dy", dy, plan, rows=plan.token_rows.shape[0])
    if dy.shape[1] != cache.y_disp.shape[2] or dy.dtype != cache.y_disp.dtype:
        raise ValueError(f"combine_backward: dy is {dy.dtype} with D={dy.shape[1]} but the combined "
                         f"rows were {cache.y_disp.dtype} with D={cache.y_disp.shape[2]}")
    dy_disp = contract("nec,nd->ecd", cache.combine, dy)   # (E, C, D)
    dcombine = contract("nd,ecd->nec", dy, cache.y_disp)   # (N, E, C)
    s = slots(plan)
    dweights = np.zeros(int(np.prod(cache.weights_shape)), dtype=dy.dtype)   # (W,)
    dweights[plan.rows_weight] = dcombine[s.token, s.expert, s.slot]  # (M,)
    return dy_disp, dweights.reshape(cache.weights_shape)
