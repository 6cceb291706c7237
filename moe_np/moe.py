"""Mixture-of-Experts layers built from gates and experts.

DenseMoE: every expert runs on every token and the gate blends them,

    y[n] = sum_e g[n, e] f_e(x[n])          (softmax and MLP gates)
    y[n, d] = sum_e g[n, e, d] f_e(x[n])[d]  (per-dimension gate)

Shape letters: N tokens, D model width, H expert hidden width, E experts.
Parameters live in one dict: the gate's (gate_*) and the experts' (see
`experts.EXPERTS`). Backward returns (dx, grads) with grads keyed like params.
"""
from __future__ import annotations

import numpy as np

from moe_np import experts as experts_mod
from moe_np import gates, layers, validate

GATES = {
    # name: (forward, backward, parameter names in backward's order)
    "softmax": (gates.softmax_gate_forward, gates.softmax_gate_backward, ("gate_w", "gate_b")),
    "mlp": (gates.mlp_gate_forward, gates.mlp_gate_backward,
            ("gate_w1", "gate_b1", "gate_w2", "gate_b2")),
    "per_dim": (gates.per_dim_gate_forward, gates.per_dim_gate_backward, ("gate_w", "gate_b")),
}


def _kinds(gate: str, expert: str):
    if gate not in GATES:
        raise ValueError(f"dense_moe: gate must be one of {sorted(GATES)}, got {gate!r}")
    if expert not in experts_mod.EXPERTS:
        raise ValueError(f"dense_moe: expert must be one of {sorted(experts_mod.EXPERTS)}, "
                         f"got {expert!r}")
    return GATES[gate], experts_mod.EXPERTS[expert]


def dense_moe_forward(x, params: dict, gate: str = "softmax", expert: str = "mlp",
                      temperature: float = 1.0, gate_dropout: float = 0.0, dropout_seed=None):
    """y = sum_e g_e(x) f_e(x).   x: (N, D) -> y: (N, D).

    gate_dropout: inverted dropout on the gate weights, applied only when a
    dropout_seed (int or Generator) is given, i.e. while training.
    cache keeps the gate weights g (N, E) or (N, E, D), the expert outputs
    (E, N, D) and the gate's and experts' own caches.
    """
    _, (exp_fwd, _, exp_names) = _kinds(gate, expert)
    validate.ndim("dense_moe_forward", "x", x, 2)
    validate.probability("dense_moe_forward", "gate_dropout", gate_dropout)
    num_experts = params[exp_names[0]].shape[0]
    g, gate_cache = gate_forward(x, params, gate, num_experts, temperature)   # (N, E) or (N, E, D)
    if g.shape[1] != num_experts:
        raise ValueError(f"dense_moe_forward: the gate has {g.shape[1]} outputs but there "
                         f"are E={num_experts} experts")
    drop_scale = None
    if gate_dropout > 0 and dropout_seed is not None:
        g, drop_scale = layers.dropout_forward(g, gate_dropout, dropout_seed)   # as g
    y_experts, exp_cache = exp_fwd(x, *(params[k] for k in exp_names))       # (E, N, D)
    y = combine_forward(g, y_experts)                                         # (N, D)
    return y, (gate, expert, g, y_experts, gate_cache, drop_scale, exp_cache)


def gate_forward(x, params: dict, gate: str, num_experts: int, temperature: float = 1.0):
    """The gate's mixing weights: (N, E), or (N, E, D) for the per-dimension gate."""
    fwd, _, names = GATES[gate]
    extra = {"num_experts": num_experts} if gate == "per_dim" else {}
    return fwd(x, *(params[k] for k in names), temperature=temperature, **extra)


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


def mixture_parts(cache):
    """The gate weights (N, E) and expert outputs (E, N, D) a forward computed."""
    return cache[2], cache[3]


def dense_moe_parts_backward(dg, dy_experts, cache):
    """Backward from gradients on the gate weights and on each expert's output.

    Used directly by losses that see the experts separately (the competitive
    mixture likelihood of chapter 3); `dense_moe_backward` calls it after
    `combine_backward`. -> dx (N, D), grads dict.
    """
    gate, expert, _, _, gate_cache, drop_scale, exp_cache = cache
    (_, gate_bwd, gate_names), (_, exp_bwd, exp_names) = _kinds(gate, expert)
    if drop_scale is not None:
        dg = layers.dropout_backward(dg, drop_scale)               # as g
    dx_gate, *gate_grads = gate_bwd(dg, gate_cache)                # (N, D), ...
    dx_experts, *exp_grads = exp_bwd(dy_experts, exp_cache)        # (N, D), ...
    grads = dict(zip(gate_names, gate_grads)) | dict(zip(exp_names, exp_grads))
    return dx_gate + dx_experts, grads


def dense_moe_backward(dy, cache):
    """-> dx (N, D), grads dict (one array per parameter)."""
    g, y_experts = mixture_parts(cache)
    dg, dy_experts = combine_backward(dy, g, y_experts)            # as g, (E, N, D)
    return dense_moe_parts_backward(dg, dy_experts, cache)


def init_gate(kind: str, d_model: int, num_experts: int, rng, gate_hidden: int = 16,
              scale: float = 0.1):
    """Small random gate weights (near-uniform mixing at the start), zero biases."""
    if kind == "softmax":
        return {"gate_w": scale * rng.standard_normal((d_model, num_experts)),        # (D, E)
                "gate_b": np.zeros(num_experts)}                                     # (E,)
    if kind == "mlp":
        return {"gate_w1": rng.standard_normal((d_model, gate_hidden)) * np.sqrt(2 / d_model),
                "gate_b1": np.zeros(gate_hidden),                                    # (G,)
                "gate_w2": scale * rng.standard_normal((gate_hidden, num_experts)),  # (G, E)
                "gate_b2": np.zeros(num_experts)}                                    # (E,)
    if kind == "per_dim":
        return {"gate_w": scale * rng.standard_normal((d_model, num_experts * d_model)),
                "gate_b": np.zeros(num_experts * d_model)}                           # (E*D,)
    raise ValueError(f"init_gate: kind must be one of {sorted(GATES)}, got {kind!r}")


class DenseMoE:
    """A dense mixture of E experts with a learned gate; a model for `train.fit`.

    x: (N, D) -> y: (N, D). Gate dropout is applied in `forward` while
    `training` is True, with masks drawn from the layer's own seeded stream.
    """

    def __init__(self, d_model: int, num_experts: int, d_hidden: int, gate: str = "softmax",
                 expert: str = "mlp", temperature: float = 1.0, gate_dropout: float = 0.0,
                 gate_hidden: int = 16, seed: int = 0):
        if num_experts < 1:
            raise ValueError(f"DenseMoE: num_experts must be >= 1, got {num_experts}")
        validate.positive("DenseMoE", "temperature", temperature)
        validate.probability("DenseMoE", "gate_dropout", gate_dropout)
        _kinds(gate, expert)
        rng = np.random.default_rng(seed)
        self.num_experts = num_experts
        self.params = init_gate(gate, d_model, num_experts, rng, gate_hidden) | \
            experts_mod.init_experts(expert, num_experts, d_model, d_hidden, rng)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.options = dict(gate=gate, expert=expert, temperature=temperature,
                            gate_dropout=gate_dropout)
        self.training = True
        self._dropout_rng = np.random.default_rng(seed + 1)
        self._cache = None

    def num_params(self) -> int:
        return sum(p.size for p in self.params.values())

    def forward(self, x):
        seed = self._dropout_rng if self.training else None
        y, self._cache = dense_moe_forward(x, self.params, dropout_seed=seed, **self.options)
        return y                                                   # (N, D)

    def gate_weights(self, x):
        """The gate's mixing weights for x, without dropout.   (N, E) or (N, E, D)."""
        return gate_forward(x, self.params, self.options["gate"], self.num_experts,
                            self.options["temperature"])[0]

    def backward(self, dy):
        dx, self.grads = dense_moe_backward(dy, self._cache)
        return dx

    def parts(self):
        """The last forward's gate weights (N, E) and expert outputs (E, N, D)."""
        return mixture_parts(self._cache)

    def backward_parts(self, dg, dy_experts):
        """Backward from gradients on the gate weights and the expert outputs."""
        dx, self.grads = dense_moe_parts_backward(dg, dy_experts, self._cache)
        return dx
