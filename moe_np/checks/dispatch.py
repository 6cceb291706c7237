"""Chapter 4 (and 5): the dispatch steps on their own, for every strategy.

gather and combine are linear in their float inputs, so their checks need
no guard; the plan (which rows exist) is fixed by ids drawn once, with a
capacity that drops some assignments and an expert that receives nothing.
The ragged experts have ReLU kinks: guarded by `ragged_experts_selection`.
"""
from __future__ import annotations

import numpy as np

from moe_np import dispatch, experts
from moe_np.checks.registry import register
from moe_np.gradcheck import check_pair

N, D, H, E, K = 9, 4, 5, 4, 2     # tokens, width, hidden, experts, choices per token
CAP = 4                           # capacity: some experts overflow, drops happen


def sample_plan(rng, strategy):
    """A plan with drops and one idle expert (expert E-1 is never chosen)."""
    scores = rng.standard_normal((N, E - 1))                           # (N, E-1)
    ids = np.argsort(-scores, axis=1)[:, :K]                           # (N, K) in [0, E-1)
    return strategy.plan_token_choice(ids, E, CAP, np.arange(N))


def _gather_check(name, seed):
    strategy = dispatch.get_strategy(name)
    rng = np.random.default_rng(seed)
    plan = sample_plan(rng, strategy)
    fwd = lambda x: strategy.gather_forward(x, plan)
    return check_pair(f"dispatch:gather[{name}]", fwd, strategy.gather_backward,
                      {"x": rng.standard_normal((N, D))}, seed=seed)


def _combine_check(name, seed):
    strategy = dispatch.get_strategy(name)
    rng = np.random.default_rng(seed)
    plan = sample_plan(rng, strategy)
    x_disp = strategy.gather_forward(rng.standard_normal((N, D)), plan)[0]   # (M, D) or (E, C, D)
    fwd = lambda y_disp, weights: strategy.combine_forward(y_disp, weights, plan)
    return check_pair(f"dispatch:combine[{name}]", fwd, strategy.combine_backward,
                      {"y_disp": rng.standard_normal(x_disp.shape),
                       "weights": rng.uniform(0.1, 1.0, (N, K))}, seed=seed)


for _strategy in dispatch.STRATEGIES:
    register(f"dispatch:gather[{_strategy}]", chapter=4)(lambda seed, s=_strategy: _gather_check(s, seed))
    register(f"dispatch:combine[{_strategy}]", chapter=4)(lambda seed, s=_strategy: _combine_check(s, seed))


def _ragged_check(kind: str, seed: int):
    """Expert e on rows offsets[e]:offsets[e+1], one expert idle, wrt x_sorted and every weight."""
    rng = np.random.default_rng(seed)
    offsets = np.array([0, 3, 3, 7, 10], dtype=np.int64)               # (E+1,) expert 1 idle
    names = experts.EXPERTS[kind].names
    for _ in range(200):
        params = experts.init_experts(kind, E, D, H, rng)
        params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}
        x_sorted = rng.standard_normal((offsets[-1], D))               # (M, D)
        if kind != "mlp" or all(np.abs(x_sorted[lo:hi] @ params["w1"][e] + params["b1"][e]).min() > 0.02
                                for e, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])) if hi > lo):
            break

    def forward(x_sorted, **weights):
        return experts.ragged_experts_forward(x_sorted, weights, kind, offsets)

    def backward(dy, cache):
        dx, grads = experts.ragged_experts_backward(dy, cache)
        return {"x_sorted": dx} | grads

    pick = lambda **kw: experts.ragged_experts_selection(forward(**kw)[1])
    return check_pair(f"experts:ragged[{kind}]", forward, backward,
                      {"x_sorted": x_sorted} | {k: params[k] for k in names}, seed=seed,
                      selection=pick)


for _kind in experts.EXPERTS:
    register(f"experts:ragged[{_kind}]", chapter=4)(lambda seed, k=_kind: _ragged_check(k, seed))
