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

import numpy as np

from moe_np import balance, losses, routers
from moe_np.gradcheck import check_pair, register
from moe_np.sparse import SparseConfig, init_sparse_params, sparse_moe_backward, \
    sparse_moe_forward

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


@register("router:softmax_topk")
def _softmax_topk(seed):
    return (_router_check("router:softmax_topk(K=2,renorm)", routers.softmax_topk_forward,
                          routers.softmax_topk_backward, 2, seed)
            + _router_check("router:softmax_topk(K=2,raw)", routers.softmax_topk_forward,
                            routers.softmax_topk_backward, 2, seed, {"renormalize": False})
            + _router_check("router:switch(K=1,raw)", routers.softmax_topk_forward,
                            routers.softmax_topk_backward, 1, seed, {"renormalize": False})
            + _router_check("router:softmax_topk(K=1,renorm)", routers.softmax_topk_forward,
                            routers.softmax_topk_backward, 1, seed))


@register("router:topk_softmax")
def _topk_softmax(seed):
    return _router_check("router:topk_softmax(K=2)", routers.topk_softmax_forward,
                         routers.topk_softmax_backward, 2, seed)


@register("router:sigmoid_bias")
def _sigmoid_bias(seed):
    bias = np.array([0.02, -0.05, 0.04])                               # (E,) small: keeps margins
    return _router_check("router:sigmoid_bias(K=2)", routers.sigmoid_topk_forward,
                         routers.sigmoid_topk_backward, 2, seed, {"bias": bias})


@register("router:noisy_topk")
def _noisy_topk(seed):
    def rows(rng):
        inputs = {"x": rng.standard_normal((N, D)), "w_gate": rng.standard_normal((D, E)),
                  "w_noise": 0.5 * rng.standard_normal((D, E))}
        static = {"noise": rng.standard_normal((N, E)), "k": K}
        fwd = lambda **kw: ((o := routers.noisy_topk_forward(**kw))[0][1:], o[1])
        pick = lambda **kw: (routers.noisy_topk_forward(**kw)[0][0],
                             routers.noisy_topk_forward(**kw)[1][7])   # ids, threshold entries
        return check_pair("router:noisy_topk", fwd, routers.noisy_topk_backward, inputs,
                          static=static, seed=seed, selection=pick)
    return until_stable(rows, seed)


@register("router:expert_choice")
def _expert_choice(seed):
    def rows(rng):
        logits = 2.0 * rng.standard_normal((N, E))                     # (N, E)
        fwd = lambda logits: ((o := routers.expert_choice_forward(logits, 3))[0][1], o[1])
        pick = lambda logits: routers.expert_choice_forward(logits, 3)[0][0]
        return check_pair("router:expert_choice(C=3)", fwd, routers.expert_choice_backward,
                          {"logits": logits}, seed=seed, selection=pick)
    return until_stable(rows, seed)


# -- auxiliary losses ------------------------------------------------------------

@register("aux:balance")
def _balance(seed):
    rng = np.random.default_rng(seed)
    probs = losses.softmax_forward(rng.standard_normal((N, E)))[0]    # (N, E)
    ids = routers.top_k_indices(probs, K)                              # (N, K)
    fwd = lambda probs: balance.balance_loss_forward(probs, ids)
    return check_pair("aux:balance", fwd, balance.balance_loss_backward, {"probs": probs}, seed=seed)


@register("aux:z_loss")
def _z_loss(seed):
    rng = np.random.default_rng(seed)
    return check_pair("aux:z_loss", balance.z_loss_forward, balance.z_loss_backward,
                      {"logits": 2 * rng.standard_normal((N, E))}, seed=seed)


@register("aux:cv_squared")
def _cv_squared(seed):
    rng = np.random.default_rng(seed)
    return check_pair("aux:cv_squared", balance.cv_squared_forward, balance.cv_squared_backward,
                      {"v": rng.uniform(0.5, 3.0, E + 2)}, seed=seed)


@register("aux:importance")
def _importance(seed):
    rng = np.random.default_rng(seed)
    ids = routers.top_k_indices(rng.standard_normal((N, E)), K)        # (N, K)
    fwd = lambda w: balance.importance_forward(w, ids, E)
    return check_pair("aux:importance", fwd, balance.importance_backward,
                      {"w": rng.uniform(0.1, 1.0, (N, K))}, seed=seed)


# -- SparseMoE end to end ----------------------------------------------------------

SPARSE_CASES = {
    # name: (config, shared experts)
    "softmax_topk,cap0.75,position,shared":
        (SparseConfig("softmax_topk", K, 0.75, 0, "position", "mlp", 0.3, 0.05), 1),
    "softmax_topk,cap0.75,priority":
        (SparseConfig("softmax_topk", K, 0.75, 0, "priority", "mlp", 0.3, 0.05), 0),
    "softmax_topk,cap0.75,random":
        (SparseConfig("softmax_topk", K, 0.75, 0, "random", "swiglu", 0.3), 0),
    "softmax_topk(K=1),cap1.0":
        (SparseConfig("softmax_topk", 1, 1.0, 0, "position", "mlp", 0.3), 0),
    "switch,cap1.0": (SparseConfig("switch", 1, 1.0, 0, "position", "mlp", 0.3, 0.05), 0),
    "topk_softmax,dropless": (SparseConfig("topk_softmax", K, None, 0, "position", "swiglu"), 1),
    "sigmoid_bias,cap0.75": (SparseConfig("sigmoid_bias", K, 0.75, 0, "position", "mlp", 0, 0.05), 0),
    "noisy_topk,cap1.0": (SparseConfig("noisy_topk", K, 1.0, 0, "position", "mlp", 0, 0.05, 0.2), 0),
    "expert_choice,cap1.0": (SparseConfig("expert_choice", K, 1.0, 0, "position", "mlp", 0, 0.05), 0),
}


def sparse_case_inputs(name: str, rng, min_gap: float = 0.05, tries: int = 500):
    """x and parameters for a case, redrawn until every row's sorted router
    logits are at least min_gap apart (50 h): the guard then has little to reject."""
    config, shared = SPARSE_CASES[name]
    for _ in range(tries):
        params = init_sparse_params(config, D, E, H, rng, num_shared=shared, router_scale=1.0)
        params = {k: v + 0.2 * rng.standard_normal(v.shape) for k, v in params.items()}   # no zero biases
        x = rng.standard_normal((N, D))                                # (N, D)
        gaps = np.diff(np.sort(x @ params["router_w"], axis=1), axis=1)   # (N, E-1)
        if gaps.min() >= min_gap:
            return config, x, params
    raise RuntimeError(f"sparse_case_inputs: no draw in {tries} had logit gaps >= {min_gap}")


def sparse_selection(cache):
    """Every discrete choice one SparseMoE forward made."""
    config, stats = cache.config, cache.stats
    plan = stats["plan"]
    mlp = config.expert == "mlp"          # ReLU masks sit at index 5 of an MLP expert cache
    patterns = tuple(c[5] for c in cache.segments_cache[2] if c is not None and mlp)
    shared = (cache.shared_cache[5],) if cache.shared_cache is not None and mlp else ()
    thr = (cache.router_cache[7],) if config.router == "noisy_topk" else ()   # threshold entries
    ids = () if stats["ids"] is None else (stats["ids"],)
    return ids + (plan.rows_token, plan.rows_weight) + patterns + shared + thr


def sparse_moe_check(name: str, seed: int):
    """Check (y, aux) = SparseMoE(x) wrt x and every parameter, with drops in place."""
    def rows(rng):
        config, x, params = sparse_case_inputs(name, rng)
        noise = rng.standard_normal((N, E)) if config.router == "noisy_topk" else None
        bias = np.array([0.01, -0.02, 0.0])                            # (E,)
        kw = {"config": config, "noise": noise, "bias": bias, "seed": seed + 11}

        def forward(x, **params):
            return sparse_moe_forward(x, params, **kw)

        def backward(dout, cache):
            dx, grads = sparse_moe_backward(dout, cache)
            return {"x": dx} | grads

        pick = lambda x, **params: sparse_selection(sparse_moe_forward(x, params, **kw)[1])
        return check_pair(f"sparse_moe[{name}]", forward, backward, {"x": x} | params,
                          seed=seed, selection=pick)
    return until_stable(rows, seed)


for _case in SPARSE_CASES:
    register(f"sparse_moe[{_case}]")(lambda seed, c=_case: sparse_moe_check(c, seed))
