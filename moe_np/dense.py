"""DenseMoE: every expert runs on every token and the gate blends them.

    y[n] = sum_e g[n, e] f_e(x[n])          (softmax and MLP gates)
    y[n, d] = sum_e g[n, e, d] f_e(x[n])[d]  (per-dimension gate)

Shape letters: N tokens, D model width, H expert hidden width, E experts.
Parameters live in one dict: the gate's (see `gates.GATES`) and the
experts' (see `experts.EXPERTS`). Backward returns (dx, grads) with grads
keyed like params.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from moe_np import layers, validate
from moe_np.config import DenseConfig
from moe_np.experts import expert_kind, experts_selection, init_experts
from moe_np.gates import gate_kind, gate_selection, init_gate
from moe_np.layer import Layer


class DenseCache(NamedTuple):
    config: DenseConfig
    g: np.ndarray                    # (N, E) or (N, E, D) the gate weights (after dropout)
    y_experts: np.ndarray            # (E, N, D) every expert's output
    gate_cache: tuple
    dropout_scale: np.ndarray | None # as g: the scaled dropout mask, or None
    experts_cache: tuple


def gate_forward(x, params: dict, config: DenseConfig):
    """The gate's mixing weights: (N, E), or (N, E, D) for the per-dimension gate."""
    kind = gate_kind(config.gate)
    extra = {"num_experts": config.num_experts} if config.gate == "per_dim" else {}
    return kind.forward(x, *(params[k] for k in kind.names), temperature=config.temperature, **extra)


def combine_forward(g, y_experts):
    """y[n] = sum_e g[n, e] y_experts[e, n]  (or per dimension with g (N, E, D)) -> (N, D)."""
    if g.ndim == 2:
        return np.einsum("ne,end->nd", g, y_experts)               # (N, D)
    return np.einsum("ned,end->nd", g, y_experts)                  # (N, D)


def combine_backward(dy, g, y_experts):
    """-> dg (as g), dy_experts (E, N, D)."""
    if g.ndim == 2:
        dg = np.einsum("nd,end->ne", dy, y_experts)                # (N, E)
        dy_experts = np.einsum("ne,nd->end", g, dy)                # (E, N, D)
    else:
        dg = np.einsum("nd,end->ned", dy, y_experts)               # (N, E, D)
        dy_experts = np.einsum("ned,nd->end", g, dy)               # (E, N, D)
    return dg, dy_experts


def dense_moe_forward(x, params: dict, config: DenseConfig, *, dropout_rng=None):
    """y = sum_e g_e(x) f_e(x).   x: (N, D) -> y: (N, D), DenseCache.

    Gate dropout (config.gate_dropout) is applied only when dropout_rng (a
    Generator or seed) is given, i.e. while training.
    """
    validate.ndim("dense_moe_forward", "x", x, 2)
    kind = expert_kind(config.expert)
    dtype = params[kind.names[0]].dtype
    validate.param_dtype("dense_moe_forward", "x", x, dtype)
    g, gate_cache = gate_forward(x, params, config)                    # (N, E) or (N, E, D)
    dropout_scale = None
    if config.gate_dropout > 0 and dropout_rng is not None:
        g, dropout_scale = layers.dropout_forward(g, config.gate_dropout, dropout_rng)   # as g
    y_experts, experts_cache = kind.forward(x, *(params[k] for k in kind.names))   # (E, N, D)
    y = combine_forward(g, y_experts)                                  # (N, D)
    return y, DenseCache(config, g, y_experts, gate_cache, dropout_scale, experts_cache)


def dense_moe_parts_backward(dg, dy_experts, cache: DenseCache):
    """Backward from gradients on the gate weights and on each expert's output.

    Used directly by losses that see the experts separately (the competitive
    mixture likelihood of chapter 3); `dense_moe_backward` calls it after
    `combine_backward`. -> dx (N, D), grads dict.
    """
    gate, kind = gate_kind(cache.config.gate), expert_kind(cache.config.expert)
    if cache.dropout_scale is not None:
        dg = layers.dropout_backward(dg, cache.dropout_scale)          # as g
    dx_gate, *gate_grads = gate.backward(dg, cache.gate_cache)         # (N, D), ...
    dx_experts, *exp_grads = kind.backward(dy_experts, cache.experts_cache)   # (N, D), ...
    grads = dict(zip(gate.names, gate_grads)) | dict(zip(kind.names, exp_grads))
    return dx_gate + dx_experts, grads


def dense_moe_backward(dy, cache: DenseCache):
    """-> dx (N, D), grads dict (one array per parameter)."""
    dg, dy_experts = combine_backward(dy, cache.g, cache.y_experts)   # as g, (E, N, D)
    return dense_moe_parts_backward(dg, dy_experts, cache)


def dense_moe_selection(cache: DenseCache) -> tuple:
    """Every discrete choice of a forward: ReLU patterns of the experts and the MLP gate."""
    return (experts_selection(cache.config.expert, cache.experts_cache)
            + gate_selection(cache.config.gate, cache.gate_cache))


def init_dense_params(config: DenseConfig, rng, dtype=np.float64) -> dict:
    """The gate's parameters, then the experts', in dtype."""
    return init_gate(config.gate, config.d_model, config.num_experts, rng, config.gate_hidden,
                     config.router_scale, dtype) | \
        init_experts(config.expert, config.num_experts, config.d_model, config.d_hidden, rng, dtype)


class DenseMoE(Layer):
    """A dense mixture of E experts with a learned gate.   x: (N, D) -> y: (N, D).

    Gate dropout is applied in `forward` while training, with masks drawn
    from the layer's own seeded stream; evaluation is deterministic. No
    auxiliary loss (`aux` is 0.0) and no routing statistics: every token
    uses every expert.
    """

    def __init__(self, config: DenseConfig, *, seed: int = 0, dtype=np.float64):
        super().__init__(dtype)
        if not isinstance(config, DenseConfig):
            raise ValueError(f"DenseMoE: config must be a DenseConfig, got {type(config).__name__}")
        validate.integer("DenseMoE", "seed", seed, minimum=0)
        self.config = config
        self.params = init_dense_params(config, np.random.default_rng(seed), self.dtype)
        self.init_grads()
        self.rngs["dropout"] = np.random.default_rng(seed + 1)

    def forward(self, x):
        rng = self.rngs["dropout"] if self.training else None
        y, self._cache = dense_moe_forward(x, self.params, self.config, dropout_rng=rng)
        return y                                                       # (N, D)

    def gate_weights(self, x):
        """The gate's mixing weights for x, without dropout.   (N, E) or (N, E, D)."""
        return gate_forward(x, self.params, self.config)[0]

    def backward(self, dy, aux_scale: float = 1.0):
        """dx (N, D); aux_scale is accepted by every layer (this one has no aux loss)."""
        self.check_backward(dy, aux_scale)
        dx, grads = dense_moe_backward(dy, self._cache)
        self.set_grads(grads)
        return dx                                                      # (N, D)

    def parts(self):
        """The last forward's gate weights (N, E) and expert outputs (E, N, D)."""
        if self._cache is None:
            raise ValueError("DenseMoE.parts: call forward first")
        return self._cache.g, self._cache.y_experts

    def backward_parts(self, dg, dy_experts):
        """Backward from gradients on the gate weights and the expert outputs."""
        self.check_backward(dy_experts)
        dx, grads = dense_moe_parts_backward(dg, dy_experts, self._cache)
        self.set_grads(grads)
        return dx
