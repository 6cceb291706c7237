"""Sparse upcycling: an MoE layer grown from a trained dense FFN (Komatsuzaki et al., 2022).

    experts   W1[e] = w1, b1[e] = b1, W2[e] = w2, b2[e] = b2     for every e (copies)
    router    drawn fresh (SparseMoE's initialisation)

Right after upcycling every expert computes the dense FFN f, so a token's
output is (sum_k weight_k) f(x): with weights that sum to 1 per token
(renormalised top-K) and no capacity drop, the layer computes f exactly, up
to rounding, and training resumes from the dense model's quality. Only the
router differs between tokens at first: different experts receive different
tokens and weights, hence different gradients, and the copies drift apart.
`expert_spread` measures that drift (the symmetry break), 0 at the start.
"""
from __future__ import annotations

import numpy as np

from moe_np.config import SparseConfig
from moe_np.experts import expert_kind
from moe_np.sparse import SparseMoE

DENSE_NAMES = ("w1", "b1", "w2", "b2")


def _dense_weights(mlp_params: dict, config: SparseConfig) -> dict:
    """The FFN's w1 (D, H), b1 (H,), w2 (H, D), b2 (D,), checked against the config.
    A leading expert axis of 1 (models.FFN's layout) is accepted and dropped."""
    if not isinstance(mlp_params, dict) or set(DENSE_NAMES) - set(mlp_params):
        got = sorted(mlp_params) if isinstance(mlp_params, dict) else type(mlp_params).__name__
        raise ValueError(f"upcycle: mlp_params must hold {list(DENSE_NAMES)}, got {got}")
    dense = {k: np.asarray(mlp_params[k]) for k in DENSE_NAMES}
    if dense["w1"].ndim == 3 and all(v.shape[0] == 1 for v in dense.values()):
        dense = {k: v[0] for k, v in dense.items()}
    d, h = config.d_model, config.d_hidden
    want = {"w1": (d, h), "b1": (h,), "w2": (h, d), "b2": (d,)}
    for k, shape in want.items():
        if dense[k].shape != shape:
            raise ValueError(f"upcycle: mlp_params[{k!r}] has shape {dense[k].shape} but the config "
                             f"(d_model={d}, d_hidden={h}) needs {shape}")
    dtypes = {str(v.dtype) for v in dense.values()}
    if len(dtypes) != 1 or not np.issubdtype(dense["w1"].dtype, np.floating):
        raise ValueError(f"upcycle: mlp_params must share one float dtype, got {sorted(dtypes)}")
    return dense


def upcycle(mlp_params: dict, config: SparseConfig, seed: int = 0) -> SparseMoE:
    """A SparseMoE(config) whose E experts are copies of the dense FFN, router fresh from seed.

    mlp_params: w1 (D, H), b1 (H,), w2 (H, D), b2 (D,) of y = relu(x w1 + b1) w2 + b2
    (an MLP's params with V = D, or an FFN's (1, ...) arrays). config.expert
    must be "mlp" and config.num_shared 0. The layer takes the FFN's dtype.
    """
    if not isinstance(config, SparseConfig):
        raise ValueError(f"upcycle: config must be a SparseConfig, got {type(config).__name__}")
    if config.expert != "mlp":
        raise ValueError(f"upcycle: config.expert must be 'mlp' (a ReLU FFN is copied), "
                         f"got {config.expert!r}")
    if config.num_shared:
        raise ValueError(f"upcycle: config.num_shared must be 0 (every copy is a routed expert), "
                         f"got {config.num_shared}")
    dense = _dense_weights(mlp_params, config)
    layer = SparseMoE(config, seed=seed, dtype=dense["w1"].dtype)
    for k, v in dense.items():
        layer.params[k][...] = v                                       # broadcast over E
    return layer


def expert_spread(params: dict, kind: str = "mlp") -> float:
    """mean over pairs i < j of |theta_i - theta_j|  /  mean over e of |theta_e|.

    theta_e: expert e's weights flattened into one vector (every array of
    `kind`, e.g. W1[e], b1[e], W2[e], b2[e]); |.| the Euclidean norm. 0 when
    the experts are identical (right after upcycling); about sqrt(2) for
    independent random experts of equal norm. Differences are taken
    directly, never through |a|^2 + |b|^2 - 2ab, so identical experts give
    exactly 0.
    """
    names = expert_kind(kind).names
    if set(names) - set(params):
        raise ValueError(f"expert_spread: params is missing {sorted(set(names) - set(params))}")
    theta = np.concatenate([params[k].reshape(len(params[k]), -1) for k in names], axis=1)   # (E, P)
    e = len(theta)
    if e < 2:
        raise ValueError(f"expert_spread: needs at least 2 experts, got E={e}")
    i, j = np.triu_indices(e, k=1)                                     # (E(E-1)/2,) each
    pair_dist = np.linalg.norm(theta[i] - theta[j], axis=1)            # (E(E-1)/2,)
    scale = float(np.mean(np.linalg.norm(theta, axis=1)))
    if not scale > 0:
        raise ValueError("expert_spread: every expert's weights are zero")
    return float(np.mean(pair_dist)) / scale
