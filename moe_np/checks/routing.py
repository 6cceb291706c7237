"""Chapter 8's checks: the routers of current models, guarded at every kink.

DeepSeek-V3's group-limited sigmoid router (unnormalized and scaled), its
sequence-wise balance loss, the global-batch balance loss, HF Switch's mean
of per-sequence balance losses, and SparseMoE end to end as DeepSeek-V3 and
Qwen2-MoE configure it (shared expert gate, its own width, router jitter, a
token mask, capacity per sequence) and with the balance loss per sequence.
"""
from __future__ import annotations

import numpy as np

from moe_np import balance, functional, routers
from moe_np.checks.registry import register
from moe_np.checks.sparse import separated_logits, until_stable
from moe_np.config import SparseConfig
from moe_np.gradcheck import check_pair
from moe_np.sparse import init_sparse_params, sparse_moe_backward, sparse_moe_forward, \
    sparse_moe_selection

N, D, H, E, K, T = 8, 4, 5, 4, 2, 4     # tokens, width, hidden, experts, choices, seq_len


@register("router:sigmoid_groups", chapter=8)
def _sigmoid_groups(seed):
    def rows(rng):
        logits = separated_logits(rng, N, E)                           # (N, E)
        bias = np.array([0.01, -0.02, 0.03, 0.0])                      # (E,)
        kw = dict(k=K, bias=bias, n_group=2, topk_group=1, normalize=False, scale=2.5)
        forward = lambda logits: ((o := routers.sigmoid_topk_forward(logits, **kw))[0][1], o[1])
        pick = lambda logits: routers.sigmoid_topk_forward(logits, **kw)[0][0]
        return check_pair("router:sigmoid_groups(unnormalized,x2.5)", forward,
                          routers.sigmoid_topk_backward, {"logits": logits}, seed=seed,
                          selection=pick)
    return until_stable(rows, seed)


@register("aux:seq_balance", chapter=8)
def _seq_balance(seed):
    rng = np.random.default_rng(seed)
    scores = functional.sigmoid(rng.standard_normal((N, E)))          # (N, E)
    ids = routers.top_k_indices(rng.standard_normal((N, E)), K)        # (N, K)
    fwd = lambda scores: balance.seq_balance_loss_forward(scores, ids, T)
    return check_pair("aux:seq_balance", fwd, balance.seq_balance_loss_backward,
                      {"scores": scores}, seed=seed)


@register("aux:global_balance", chapter=8)
def _global_balance(seed):
    rng = np.random.default_rng(seed)
    probs = [functional.softmax_forward(rng.standard_normal((n, E)))[0] for n in (3, 5)]
    ids = [routers.top_k_indices(p, K) for p in probs]
    fwd = lambda p1, p2: balance.global_balance_loss_forward([p1, p2], ids)
    bwd = lambda d, c: tuple(balance.global_balance_loss_backward(d, c))
    return check_pair("aux:global_balance", fwd, bwd, {"p1": probs[0], "p2": probs[1]}, seed=seed)


@register("aux:seq_mean_balance", chapter=8)
def _seq_mean_balance(seed):
    rng = np.random.default_rng(seed)
    probs = functional.softmax_forward(rng.standard_normal((N, E)))[0]   # (N, E)
    ids = routers.top_k_indices(rng.standard_normal((N, E)), K)        # (N, K)
    fwd = lambda probs: balance.seq_mean_balance_loss_forward(probs, ids, T)
    return check_pair("aux:seq_mean_balance", fwd, balance.seq_mean_balance_loss_backward,
                      {"probs": probs}, seed=seed)


MODEL_CASES = {
    "deepseek_v3": dict(router="sigmoid_bias", n_group=2, topk_group=1, norm_topk_prob=False,
                        routed_scaling_factor=2.5, seq_aux_coef=0.3, seq_len=T, num_shared=1,
                        expert="swiglu", z_coef=0.05),
    "qwen2_moe": dict(router="softmax_topk_raw", num_shared=1, shared_gate=True, d_hidden_shared=7,
                      expert="swiglu", balance_coef=0.3, jitter=0.1),
    "switch-like,balance per sequence": dict(router="softmax_topk_raw", capacity_factor=1.0,
                                             capacity_scope="sequence", seq_len=T, balance_coef=0.3,
                                             balance_scope="sequence", z_coef=0.05),
    "masked,capacity per sequence": dict(router="softmax_topk", capacity_factor=0.75,
                                         capacity_scope="sequence", seq_len=T, balance_coef=0.3,
                                         z_coef=0.05),
}


def model_case_check(name: str, seed: int):
    """(y, aux) = SparseMoE(x) wrt x and every parameter, configured as a current model."""
    config = SparseConfig(d_model=D, num_experts=E, d_hidden=H, k=K, router_scale=1.0,
                          **MODEL_CASES[name])

    def rows(rng):
        params = {k: v + 0.2 * rng.standard_normal(v.shape)
                  for k, v in init_sparse_params(config, rng).items()}
        x = rng.standard_normal((N, D))                                # (N, D)
        kw = {"bias": np.array([0.01, -0.02, 0.0, 0.02]), "rng": seed,
              "jitter": rng.uniform(0.9, 1.1, (N, D)) if config.jitter else None,
              "mask": np.arange(N) % 3 != 2 if name.startswith("masked") else None}
        forward = lambda x, **p: sparse_moe_forward(x, p, config, **kw)

        def backward(dout, cache):
            dx, grads = sparse_moe_backward(dout, cache)
            return {"x": dx} | grads

        pick = lambda x, **p: sparse_moe_selection(forward(x, **p)[1])
        return check_pair(f"sparse_moe[{name}]", forward, backward, {"x": x} | params, seed=seed,
                          selection=pick)
    return until_stable(rows, seed, tries=60)


for _name in MODEL_CASES:
    register(f"sparse_moe[{_name}]", chapter=8)(lambda seed, c=_name: model_case_check(c, seed))
