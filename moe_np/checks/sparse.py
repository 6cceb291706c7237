"""Chapter 4: every router, every auxiliary loss, and SparseMoE end to end.

Top-K selection and capacity drops are kinks: a +-h step that changed a
choice would make the central difference meaningless. So every check here
passes a `selection` that returns all discrete choices (ids, which
assignments were dropped, the permutation, ReLU on/off patterns), and the
harness raises if any perturbed evaluation chooses differently. Inputs are
drawn with a margin between neighbouring scores; a draw the guard rejects
anyway is redrawn (the guard, not the margin, is the proof).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from moe_np import balance, functional, routers
from moe_np.checks.registry import register
from moe_np.config import SparseConfig
from moe_np.gradcheck import check_pair
from moe_np.sparse import init_sparse_params, sparse_moe_backward, sparse_moe_forward, \
    sparse_moe_selection

N, D, H, E, K = 8, 4, 5, 3, 2     # tokens, width, expert hidden, experts, choices per token
GAP = 0.3                         # spacing between a row's logits


def separated_logits(rng, n=N, e=E, gap=GAP):
    """Rows whose sorted logits are at least `gap` apart, in random order.   -> (n, e)."""
    base = np.arange(e) * gap + rng.uniform(0, 0.5 * gap, (n, e)).cumsum(axis=1)   # increasing
    return rng.permuted(base, axis=1) - base.mean(axis=1, keepdims=True)          # (n, e)


def until_stable(make_rows, seed: int, tries: int = 25):
    """make_rows(rng) runs a guarded check; redraw while the guard reports a crossed kink."""
    rng = np.random.default_rng(seed)
    for _ in range(tries):
        try:
            return make_rows(rng)
        except ValueError as err:
            if "selection changed" not in str(err):
                raise
    raise RuntimeError(f"until_stable: no draw in {tries} kept its selection under +-h")


# -- routers (wrt their logits) -------------------------------------------------

def _router_check(name, fwd, bwd, k, seed, extra=None):
    def rows(rng):
        logits = separated_logits(rng)                                  # (N, E)
        forward = lambda logits: ((out := fwd(logits, k, **(extra or {})))[0][1], out[1])
        pick = lambda logits: fwd(logits, k, **(extra or {}))[0][0]
        return check_pair(name, forward, bwd, {"logits": logits}, seed=seed, selection=pick)
    return until_stable(rows, seed)


@register("router:softmax_topk", chapter=4)
def _softmax_topk(seed):
    return (_router_check("router:softmax_topk(K=2,renorm)", routers.softmax_topk_forward,
                          routers.softmax_topk_backward, 2, seed)
            + _router_check("router:softmax_topk(K=2,raw)", routers.softmax_topk_forward,
                            routers.softmax_topk_backward, 2, seed, {"renormalize": False})
            + _router_check("router:switch(K=1,raw)", routers.softmax_topk_forward,
                            routers.softmax_topk_backward, 1, seed, {"renormalize": False})
            + _router_check("router:softmax_topk(K=1,renorm)", routers.softmax_topk_forward,
                            routers.softmax_topk_backward, 1, seed))


@register("router:topk_softmax", chapter=4)
def _topk_softmax(seed):
    return _router_check("router:topk_softmax(K=2)", routers.topk_softmax_forward,
                         routers.topk_softmax_backward, 2, seed)


@register("router:sigmoid_bias", chapter=4)
def _sigmoid_bias(seed):
    bias = np.array([0.02, -0.05, 0.04])                               # (E,) small: keeps margins
    return _router_check("router:sigmoid_bias(K=2)", routers.sigmoid_topk_forward,
                         routers.sigmoid_topk_backward, 2, seed, {"bias": bias})


@register("router:noisy_topk", chapter=4)
def _noisy_topk(seed):
    """The whole noisy router unit: (weights, load_estimate) wrt x, w_router and w_noise."""
    config = SparseConfig(d_model=D, num_experts=E, d_hidden=H, router="noisy_topk", k=K)

    def rows(rng):
        inputs = {"x": rng.standard_normal((N, D)), "w_router": rng.standard_normal((D, E)),
                  "w_noise": 0.5 * rng.standard_normal((D, E))}
        noise = rng.standard_normal((N, E))                             # (N, E)

        def forward(x, **params):
            route, cache = routers.router_forward(x, params, config, noise=noise)
            return (route.weights, route.load_estimate), cache

        def backward(dout, cache):
            aux = balance.AuxGrads(None, None, dout[1])
            dx, grads = routers.router_backward(dout[0], cache, aux)
            return {"x": dx} | grads

        pick = lambda x, **params: routers.router_selection(forward(x, **params)[1])
        return check_pair("router:noisy_topk", forward, backward, inputs, seed=seed, selection=pick)
    return until_stable(rows, seed)


@register("router:expert_choice", chapter=4)
def _expert_choice(seed):
    def rows(rng):
        logits = 2.0 * rng.standard_normal((N, E))                     # (N, E)
        fwd = lambda logits: ((o := routers.expert_choice_forward(logits, 3))[0][1], o[1])
        pick = lambda logits: routers.expert_choice_forward(logits, 3)[0][0]
        return check_pair("router:expert_choice(C=3)", fwd, routers.expert_choice_backward,
                          {"logits": logits}, seed=seed, selection=pick)
    return until_stable(rows, seed)


# -- auxiliary losses ------------------------------------------------------------

@register("aux:balance", chapter=4)
def _balance(seed):
    rng = np.random.default_rng(seed)
    probs = functional.softmax_forward(rng.standard_normal((N, E)))[0]    # (N, E)
    ids = routers.top_k_indices(probs, K)                              # (N, K)
    fwd = lambda probs: balance.balance_loss_forward(probs, ids)
    return check_pair("aux:balance", fwd, balance.balance_loss_backward, {"probs": probs}, seed=seed)


@register("aux:z_loss", chapter=4)
def _z_loss(seed):
    rng = np.random.default_rng(seed)
    return check_pair("aux:z_loss", balance.z_loss_forward, balance.z_loss_backward,
                      {"logits": 2 * rng.standard_normal((N, E))}, seed=seed)


@register("aux:cv_squared", chapter=4)
def _cv_squared(seed):
    rng = np.random.default_rng(seed)
    return check_pair("aux:cv_squared", balance.cv_squared_forward, balance.cv_squared_backward,
                      {"v": rng.uniform(0.5, 3.0, E + 2)}, seed=seed)


@register("aux:importance", chapter=4)
def _importance(seed):
    rng = np.random.default_rng(seed)
    ids = routers.top_k_indices(rng.standard_normal((N, E)), K)        # (N, K)
    fwd = lambda w: balance.importance_forward(w, ids, E)
    return check_pair("aux:importance", fwd, balance.importance_backward,
                      {"w": rng.uniform(0.1, 1.0, (N, K))}, seed=seed)


# -- SparseMoE end to end ----------------------------------------------------------

def _case(router, k=K, capacity_factor=None, drop_policy="position", expert="mlp", shared=0,
          **coefs):
    return SparseConfig(d_model=D, num_experts=E, d_hidden=H, num_shared=shared, expert=expert,
                        router=router, k=k, capacity_factor=capacity_factor,
                        drop_policy=drop_policy, router_scale=1.0, **coefs)


SPARSE_CASES = {
    "softmax_topk,cap0.75,position,shared": _case("softmax_topk", capacity_factor=0.75, shared=1,
                                                  balance_coef=0.3, z_coef=0.05),
    "softmax_topk,cap0.75,priority": _case("softmax_topk", capacity_factor=0.75,
                                           drop_policy="priority", balance_coef=0.3, z_coef=0.05),
    "softmax_topk,cap0.75,random": _case("softmax_topk", capacity_factor=0.75, drop_policy="random",
                                         expert="swiglu", balance_coef=0.3),
    "softmax_topk(K=1),cap1.0": _case("softmax_topk", k=1, capacity_factor=1.0, balance_coef=0.3),
    "switch,cap1.0": _case("switch", k=1, capacity_factor=1.0, balance_coef=0.3, z_coef=0.05),
    "topk_softmax,dropless": _case("topk_softmax", expert="swiglu", shared=1),
    "sigmoid_bias,cap0.75": _case("sigmoid_bias", capacity_factor=0.75, z_coef=0.05),
    "noisy_topk,cap1.0": _case("noisy_topk", capacity_factor=1.0, z_coef=0.05, cv_coef=0.2),
    "expert_choice,cap1.0": _case("expert_choice", capacity_factor=1.0, z_coef=0.05),
}


def sparse_case_inputs(name: str, rng, min_gap: float = 0.05, tries: int = 500):
    """x and parameters for a case, redrawn until every row's sorted router
    logits are at least min_gap apart (50 h): the guard then has little to reject."""
    config = SPARSE_CASES[name]
    for _ in range(tries):
        params = init_sparse_params(config, rng)
        params = {k: v + 0.2 * rng.standard_normal(v.shape) for k, v in params.items()}   # no zero biases
        x = rng.standard_normal((N, D))                                # (N, D)
        gaps = np.diff(np.sort(x @ params["w_router"], axis=1), axis=1)   # (N, E-1)
        if gaps.min() >= min_gap:
            return config, x, params
    raise RuntimeError(f"sparse_case_inputs: no draw in {tries} had logit gaps >= {min_gap}")


def sparse_moe_check(name: str, seed: int, dispatch: str = "numpy"):
    """Check (y, aux) = SparseMoE(x) wrt x and every parameter, with drops in place."""
    def rows(rng):
        config, x, params = sparse_case_inputs(name, rng)
        config = replace(config, dispatch=dispatch)
        noise = rng.standard_normal((N, E)) if config.router == "noisy_topk" else None
        bias = np.array([0.01, -0.02, 0.0])                            # (E,)
        kw = {"config": config, "noise": noise, "bias": bias, "rng": seed + 11}

        def forward(x, **params):
            return sparse_moe_forward(x, params, **kw)

        def backward(dout, cache):
            dx, grads = sparse_moe_backward(dout, cache)
            return {"x": dx} | grads

        pick = lambda x, **params: sparse_moe_selection(forward(x, **params)[1])
        return check_pair(f"sparse_moe[{name}]", forward, backward, {"x": x} | params,
                          seed=seed, selection=pick)
    return until_stable(rows, seed)


for _name in SPARSE_CASES:
    register(f"sparse_moe[{_name}]", chapter=4)(lambda seed, c=_name: sparse_moe_check(c, seed))
