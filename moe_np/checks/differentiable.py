"""Chapter 8's differentiable routers: ReMoE and Soft MoE, end to end.

ReMoE's only kink is relu at 0, in the router and in a ReLU expert: inputs
are redrawn until every pre-activation is at least MARGIN (20 h) from 0,
and the guard (`remoe_selection`: the router's active pattern and the
experts' relu patterns) proves no +-h step crossed one. The L1 term is part
of the output, (y, aux), so its gradient is checked with the rest. Soft MoE
is smooth apart from a ReLU expert's relu, guarded the same way; with
SwiGLU experts it has no kink at all and runs unguarded.
"""
from __future__ import annotations

import numpy as np

from moe_np import experts, functional
from moe_np.checks.registry import register
from moe_np.checks.sparse import until_stable
from moe_np.gradcheck import check_pair
from moe_np.remoe import remoe_backward, remoe_forward, remoe_selection
from moe_np.soft import soft_moe_backward, soft_moe_forward, soft_moe_selection

N, D, H, E = 7, 4, 5, 3     # tokens, width, expert hidden, experts
MARGIN = 0.02               # min |pre-activation| at any relu; h is 1e-3
L1_COEF = 0.3               # lambda in the ReMoE checks: large enough to matter


def _expert_params(rng, kind: str) -> dict:
    """Random stacked experts with no zero biases."""
    params = experts.init_experts(kind, E, D, H, rng)
    return {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}


def _expert_pre(xb, params: dict, kind: str) -> tuple:
    """A ReLU expert's pre-activations on every row it could see.   xb (1 or E, M, D) -> (E, M, H)."""
    return (xb @ params["w1"] + params["b1"][:, None, :],) if kind == "mlp" else ()


def _clear(arrays) -> bool:
    return all(np.abs(a).min() >= MARGIN for a in arrays)


def remoe_inputs(rng, kind: str, tries: int = 500):
    """x (N, D) and params whose router logits and expert pre-activations (every token through
    every expert) are all at least MARGIN from 0, with both signs among the logits."""
    for _ in range(tries):
        x = rng.standard_normal((N, D))                                # (N, D)
        params = {"w_router": rng.standard_normal((D, E))} | _expert_params(rng, kind)   # (D, E)
        logits = x @ params["w_router"]                                # (N, E)
        if (logits > 0).any() and (logits < 0).any() and \
                _clear((logits,) + _expert_pre(x[None], params, kind)):
            return x, params
    raise RuntimeError(f"remoe_inputs: no draw in {tries} cleared the relu margins")


def remoe_check(kind: str, seed: int):
    """(y, aux) = ReMoE(x) wrt x, w_router and every expert weight, lambda = L1_COEF."""
    def rows(rng):
        x, params = remoe_inputs(rng, kind)
        forward = lambda x, **p: remoe_forward(x, p, kind, L1_COEF)

        def backward(dout, cache):
            dx, grads = remoe_backward(dout, cache)
            return {"x": dx} | grads

        pick = lambda x, **p: remoe_selection(forward(x, **p)[1])
        return check_pair(f"remoe[{kind}]", forward, backward, {"x": x} | params, seed=seed,
                          selection=pick)
    return until_stable(rows, seed)


def soft_inputs(rng, kind: str, num_slots: int, tries: int = 500):
    """x (N, D) and params (phi (D, E*S) and experts) whose slot pre-activations clear MARGIN."""
    for _ in range(tries):
        x = rng.standard_normal((N, D))                                # (N, D)
        params = {"phi": rng.standard_normal((D, E * num_slots))} | _expert_params(rng, kind)
        dispatch = functional.softmax_forward(x @ params["phi"], axis=0)[0]   # (N, E*S)
        slots = (dispatch.T @ x).reshape(E, num_slots, D)              # (E, S, D)
        if _clear(_expert_pre(slots, params, kind)):
            return x, params
    raise RuntimeError(f"soft_inputs: no draw in {tries} cleared the relu margin")


def soft_check(kind: str, num_slots: int, seed: int):
    """y = SoftMoE(x) wrt x, phi and every expert weight."""
    def rows(rng):
        x, params = soft_inputs(rng, kind, num_slots)
        forward = lambda x, **p: soft_moe_forward(x, p, kind)

        def backward(dy, cache):
            dx, grads = soft_moe_backward(dy, cache)
            return {"x": dx} | grads

        pick = None if kind == "swiglu" else (lambda x, **p: soft_moe_selection(forward(x, **p)[1]))
        return check_pair(f"soft_moe[{kind},S={num_slots}]", forward, backward, {"x": x} | params,
                          seed=seed, selection=pick)
    return until_stable(rows, seed)


CHECKS = {
    "remoe[mlp]": lambda seed: remoe_check("mlp", seed),
    "remoe[swiglu]": lambda seed: remoe_check("swiglu", seed),
    "soft_moe[mlp,S=2]": lambda seed: soft_check("mlp", 2, seed),
    "soft_moe[swiglu,S=1]": lambda seed: soft_check("swiglu", 1, seed),
}

for _name, _fn in CHECKS.items():
    register(_name, chapter=8)(_fn)
