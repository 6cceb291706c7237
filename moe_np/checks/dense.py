"""Chapters 2-3: the gates, the experts, and the dense mixture end to end.

Every gate variant x every expert type x {MSE, cross-entropy} is checked
through the whole DenseMoE, for x and every parameter. ReLU kinks are kept
at least MARGIN away by redrawing inputs, and guarded by `selection`.
"""
from __future__ import annotations

import numpy as np

from moe_np import experts, functional, gates, layers, losses
from moe_np.checks.registry import register
from moe_np.config import DenseConfig
from moe_np.dense import combine_backward, combine_forward, dense_moe_backward, \
    dense_moe_forward, dense_moe_selection
from moe_np.gates import init_gate
from moe_np.gradcheck import check_pair

N, D, H, E, J = 5, 4, 6, 3, 7          # tokens, width, expert hidden, experts, gate hidden
MARGIN = 0.02                          # min |pre-activation| at a ReLU; h is 1e-3


def relu_inputs(params: dict, x) -> tuple:
    """Every ReLU pre-activation in a dense MoE (expert and MLP gate)."""
    pre = []
    if "w1" in params:
        xb = x if x.ndim == 3 else x[None]                                # (E or 1, N, D)
        pre.append(xb @ params["w1"] + params["b1"][:, None, :])          # (E, N, H)
    if "w_router1" in params:
        pre.append(x @ params["w_router1"] + params["b_router1"])         # (N, J)
    return tuple(pre)


def draw_clear_of_kinks(draw, seed: int, tries: int = 200):
    """Call draw(rng) -> (x, params) until no ReLU pre-activation is within MARGIN of 0."""
    rng = np.random.default_rng(seed)
    for _ in range(tries):
        x, params = draw(rng)
        if all(np.abs(a).min() >= MARGIN for a in relu_inputs(params, x)):
            return x, params
    raise RuntimeError(f"draw_clear_of_kinks: no draw cleared the margin in {tries} tries")


def _moe_params(rng, gate: str, expert: str) -> dict:
    """Random parameters, no zero biases. The gate's are kept moderate so no
    expert's weight is vanishingly small: a gradient entry of 1e-7 would
    leave rel_error's per-entry denominator nothing to measure against."""
    params = init_gate(gate, D, E, rng, gate_hidden=J, scale=0.5) | \
        experts.init_experts(expert, E, D, H, rng)
    return {k: v + (0.1 if "router" in k else 0.3) * rng.standard_normal(v.shape)
            for k, v in params.items()}


# -- gates ----------------------------------------------------------------------

@register("softmax_gate", chapter=2)
def _softmax_gate(seed):
    rng = np.random.default_rng(seed)
    return check_pair("softmax_gate(T=0.7)", gates.softmax_gate_forward,
                      gates.softmax_gate_backward,
                      {"x": rng.standard_normal((N, D)), "w": rng.standard_normal((D, E)),
                       "b": rng.standard_normal(E)}, static={"temperature": 0.7}, seed=seed)


@register("mlp_gate", chapter=2)
def _mlp_gate(seed):
    x, p = draw_clear_of_kinks(lambda r: (r.standard_normal((N, D)), _moe_params(r, "mlp", "mlp")), seed)
    inputs = {"x": x, "w1": p["w_router1"], "b1": p["b_router1"], "w2": p["w_router2"],
              "b2": p["b_router2"]}
    pattern = lambda **kw: gates.mlp_gate_selection(gates.mlp_gate_forward(**kw)[1])
    return check_pair("mlp_gate", gates.mlp_gate_forward, gates.mlp_gate_backward, inputs,
                      seed=seed, selection=pattern)


@register("per_dim_gate", chapter=2)
def _per_dim_gate(seed):
    rng = np.random.default_rng(seed)
    return check_pair("per_dim_gate", gates.per_dim_gate_forward, gates.per_dim_gate_backward,
                      {"x": rng.standard_normal((N, D)), "w": rng.standard_normal((D, E * D)),
                       "b": rng.standard_normal(E * D)},
                      static={"num_experts": E, "temperature": 1.3}, seed=seed)


# -- experts and the combine ----------------------------------------------------

@register("experts", chapter=3)
def _experts(seed):
    rows = []
    for kind in ("mlp", "swiglu"):
        fwd, bwd, names = experts.EXPERTS[kind]
        for layout, x_shape in (("shared x", (N, D)), ("per-expert x", (E, N, D))):
            x, p = draw_clear_of_kinks(lambda r: (r.standard_normal(x_shape),
                                                  _moe_params(r, "softmax", kind)), seed)
            pattern = lambda k=kind, **kw: experts.experts_selection(
                k, experts.EXPERTS[k].forward(**kw)[1])
            rows += check_pair(f"{kind}_experts({layout})", fwd, bwd,
                               {"x": x} | {k: p[k] for k in names}, seed=seed, selection=pattern)
    return rows


@register("combine", chapter=3)
def _combine(seed):
    rng = np.random.default_rng(seed)
    fwd = lambda g, y_experts: (combine_forward(g, y_experts), (g, y_experts))
    bwd = lambda dy, c: combine_backward(dy, *c)
    rows = check_pair("combine", fwd, bwd, {"g": rng.standard_normal((N, E)),
                      "y_experts": rng.standard_normal((E, N, D))}, seed=seed)
    rows += check_pair("combine(per-dim)", fwd, bwd, {"g": rng.standard_normal((N, E, D)),
                       "y_experts": rng.standard_normal((E, N, D))}, seed=seed)
    return rows


@register("gate_dropout", chapter=2)
def _gate_dropout(seed):
    rng = np.random.default_rng(seed)
    g = functional.softmax_forward(rng.standard_normal((N, E)))[0]     # (N, E)
    return check_pair("gate_dropout", layers.dropout_forward, layers.dropout_backward,
                      {"x": g}, static={"p": 0.4, "seed": seed + 3}, seed=seed)


@register("mixture_nll", chapter=3)
def _mixture_nll(seed):
    rng = np.random.default_rng(seed)
    g = functional.softmax_forward(rng.standard_normal((N, E)))[0]     # (N, E)
    target = rng.standard_normal((N, D))                           # (N, D)
    # experts near the target, so no responsibility is vanishingly small
    y_experts = target + 0.5 * rng.standard_normal((E, N, D))      # (E, N, D)
    return check_pair("mixture_nll", losses.mixture_nll_forward, losses.mixture_nll_backward,
                      {"g": g, "y_experts": y_experts, "target": target}, seed=seed)


# -- the dense mixture end to end -------------------------------------------------

GATE_VARIANTS = {           # name: (gate kind, extra config fields)
    "softmax": ("softmax", {"temperature": 0.8}),
    "mlp": ("mlp", {}),
    "per_dim": ("per_dim", {}),
    "softmax+dropout": ("softmax", {"gate_dropout": 0.3}),
}


def dense_moe_loss_check(variant: str, expert: str, loss: str, seed: int):
    """Check loss(DenseMoE(x)) wrt x and every parameter."""
    gate, options = GATE_VARIANTS[variant]
    x, params = draw_clear_of_kinks(lambda r: (r.standard_normal((N, D)),
                                               _moe_params(r, gate, expert)), seed)
    labels = np.random.default_rng(seed).integers(0, D, N)         # (N,)
    target = np.random.default_rng(seed + 1).standard_normal((N, D))   # (N, D)
    config = DenseConfig(d_model=D, num_experts=E, d_hidden=H, gate=gate, expert=expert,
                         gate_hidden=J, **options)
    dropout_rng = seed + 5 if config.gate_dropout else None        # the same mask at every call

    def forward(x, **params):
        y, moe_cache = dense_moe_forward(x, params, config, dropout_rng=dropout_rng)
        if loss == "mse":
            value, loss_cache = losses.mse_forward(y, target)
        else:
            value, loss_cache = losses.cross_entropy_forward(y, labels)
        return value, (moe_cache, loss_cache)

    def backward(dloss, cache):
        moe_cache, loss_cache = cache
        if loss == "mse":
            dy = losses.mse_backward(dloss, loss_cache)[0]
        else:
            dy = losses.cross_entropy_backward(dloss, loss_cache)
        dx, grads = dense_moe_backward(dy, moe_cache)
        return {"x": dx} | grads

    pattern = lambda x, **params: dense_moe_selection(forward(x, **params)[1][0])
    return check_pair(f"dense_moe[{variant},{expert},{loss}]", forward, backward,
                      {"x": x} | params, seed=seed, selection=pattern)


for _variant in GATE_VARIANTS:
    for _expert in experts.EXPERTS:
        for _loss in ("mse", "cross_entropy"):
            register(f"dense_moe[{_variant},{_expert},{_loss}]", chapter=3)(
                lambda seed, v=_variant, e=_expert, l=_loss: dense_moe_loss_check(v, e, l, seed))
