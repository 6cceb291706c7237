"""Dispatch: how a sparse layer moves tokens to experts and back.

`plan.py` is the specification (capacity, drop policies, slots and the
expert-order permutation). A *strategy* implements the data movement
around the experts, behind one interface, chosen by `SparseConfig.dispatch`:

    plan_token_choice(ids, num_experts, cap, order, eligible=None, seq_len=None) -> Plan
        eligible (N, K) bool: False leaves an assignment out (a padding token's);
        seq_len: capacity counted per sequence of seq_len tokens (cap slots each)
    gather_forward(x, plan) -> x_disp, cache       gather_backward(dx_disp, cache) -> dx
    experts_forward(x_disp, params, kind, plan, x=None) -> y_disp, cache
        given x, a ragged strategy keeps (x, plan rows) instead of x_disp
    experts_backward(dy_disp, cache, overwrite=False)   -> dx_disp, grads
        overwrite=True may write dx_disp over dy_disp (the caller owns it)
    experts_selection(cache)                       -> the experts' discrete choices
    combine_forward(y_disp, weights, plan) -> y, cache
    combine_backward(dy, cache) -> dy_disp, dweights

Every strategy validates its inputs at this boundary (ids in range, shapes,
dtypes, a plan that matches the batch) before any kernel runs.
"""
from __future__ import annotations

import importlib

from moe_np.dispatch.plan import POLICIES, Plan, capacity, plan_expert_choice, token_order  # noqa: F401

STRATEGY_MODULES = {
    "numpy": "moe_np.dispatch.reference",   # the reference: fancy indexing and np.add.at
    "numba": "moe_np.dispatch.jit",         # compiled counting sort, gather and combine loops
    "einsum": "moe_np.dispatch.onehot",     # GShard: one-hot (N, E, C) tensors, padded layout
}
STRATEGIES = tuple(STRATEGY_MODULES)


def pointwise_for(name: str):
    """The experts' elementwise passes strategy `name` runs (experts.Pointwise): the numba
    strategy's compiled loops, or NumPy's (experts.NUMPY_POINTWISE, every other strategy)."""
    from moe_np.experts import NUMPY_POINTWISE
    return getattr(get_strategy(name), "POINTWISE", NUMPY_POINTWISE)


def get_strategy(name: str):
    """The module implementing dispatch strategy `name`."""
    if name not in STRATEGY_MODULES:
        raise ValueError(f"dispatch: strategy must be one of {STRATEGIES}, got {name!r}")
    try:   # imported on first use: only the "numba" strategy loads numba
        return importlib.import_module(STRATEGY_MODULES[name])
    except ImportError as err:
        if err.name != "numba":
            raise
        raise ImportError(f"dispatch: strategy {name!r} needs the numba package, which is not "
                          f"installed (pip install numba); dispatch='numpy' computes the same "
                          f"numbers without it") from err
