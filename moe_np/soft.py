"""Soft MoE: experts process weighted averages of tokens (Puigcerver et al., 2023).

    logits    L = x Phi                                   (N, E*S)   S slots per expert
    dispatch  Dw = softmax of L over TOKENS (axis 0)      (N, E*S)   each column sums to 1
    slots     X~ = Dw^T x                                 (E*S, D)   slot j: an average of tokens
    experts   Y~[e*S:(e+1)*S] = f_e(X~[e*S:(e+1)*S])      (E*S, D)   expert e on its S slots
    combine   C = softmax of L over SLOTS (axis 1)        (N, E*S)   each row sums to 1
    output    y = C Y~                                    (N, D)

No token is ever chosen or dropped: every step is a matrix product or a
softmax, so the whole layer is smooth and its gradient needs no kink guard
(only a ReLU expert's own relu has one). Each expert costs S rows whatever N
is, so the compute is set by E*S, not by the number of tokens.

Why it cannot be used as-is in a causal decoder: the dispatch softmax runs
over the tokens of the whole sequence, so every slot, and through the
combine every output y_n, mixes in every token x_m, including the future
ones (m > n). A decoder that must predict token n+1 from tokens <= n would
read the answer; masking per position would need one dispatch per prefix,
losing the fixed E*S cost. (Autoregressive sampling breaks it too: the
slots change every time a token is appended.) x is therefore one group of
tokens (one sequence or image) per call. The paper also l2-normalises x and
Phi's columns, with a learned scale, for large D; this layer does not.

Shape letters: N tokens, D width, H expert hidden width, E experts, S slots per expert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from moe_np import functional, validate
from moe_np.experts import EXPERTS, expert_kind, experts_selection, init_experts
from moe_np.layer import Layer


@dataclass(frozen=True, kw_only=True)
class SoftMoEConfig:
    """A Soft MoE layer: E experts with S slots each."""
    d_model: int               # D
    num_experts: int           # E
    d_hidden: int              # H
    num_slots: int = 1         # S, slots per expert
    expert: str = "mlp"        # mlp (ReLU) | swiglu

    def __post_init__(self):
        validate.sizes("SoftMoEConfig", d_model=self.d_model, num_experts=self.num_experts,
                       d_hidden=self.d_hidden, num_slots=self.num_slots)
        validate.one_of("SoftMoEConfig", "expert", self.expert, EXPERTS)


class SoftCache(NamedTuple):
    kind: str
    x: np.ndarray              # (N, D)
    phi: np.ndarray            # (D, E*S)
    dispatch_cache: functional.SoftmaxCache   # p (N, E*S): softmax over tokens (axis 0)
    combine_cache: functional.SoftmaxCache    # p (N, E*S): softmax over slots (axis 1)
    y_slots: np.ndarray        # (E*S, D) the experts' outputs
    experts_cache: tuple       # the stacked experts' cache, input (E, S, D)


def _check_input(x, params: dict, kind: str) -> tuple:
    """-> (E, S) after checking x, phi and the expert weights against each other."""
    fn = "soft_moe_forward"
    num_experts = validate.routed_input(fn, x, params, "phi", expert_kind(kind).names)
    phi = params["phi"]
    if phi.shape[0] != x.shape[1] or phi.shape[1] % num_experts:
        raise ValueError(f"{fn}: phi must have shape (D, E*S) with D={x.shape[1]} and a multiple "
                         f"of E={num_experts} columns, got {phi.shape}")
    return num_experts, phi.shape[1] // num_experts


def soft_moe_forward(x, params: dict, kind: str = "mlp"):
    """y = softmax_slots(x Phi) f(softmax_tokens(x Phi)^T x).   x (N, D) -> y (N, D); SoftCache.

    params: phi (D, E*S) and the stacked expert weights of `kind` (E, ...);
    slot j belongs to expert j // S."""
    e, s = _check_input(x, params, kind)
    phi = params["phi"]
    logits = x @ phi                                                   # (N, E*S)
    dispatch, dispatch_cache = functional.softmax_forward(logits, axis=0)   # (N, E*S) columns sum to 1
    combine, combine_cache = functional.softmax_forward(logits, axis=1)     # (N, E*S) rows sum to 1
    slots = dispatch.T @ x                                             # (E*S, D)
    expert_params = (params[k] for k in expert_kind(kind).names)       # each (E, ...)
    y_exp, experts_cache = expert_kind(kind).forward(slots.reshape(e, s, -1), *expert_params)   # (E, S, D)
    y_slots = y_exp.reshape(e * s, -1)                                 # (E*S, D)
    y = combine @ y_slots                                              # (N, D)
    return y, SoftCache(kind, x, phi, dispatch_cache, combine_cache, y_slots, experts_cache)


def soft_moe_backward(dy, cache: SoftCache):
    """dy (N, D) -> dx (N, D), grads {phi (D, E*S), expert weights (E, ...)}.

    dC = dy Y~^T, dY~ = C^T dy; the experts give dX~; dDw = x dX~^T and
    dx = Dw dX~; both softmaxes send their vector-Jacobian products to L,
    and L = x Phi sends dPhi = x^T dL and dx += dL Phi^T."""
    kind = expert_kind(cache.kind)
    validate.same_shape("soft_moe_backward", "dy", dy, "x", cache.x)
    d_combine = dy @ cache.y_slots.T                                   # (N, E*S)
    dy_slots = cache.combine_cache.p.T @ dy                            # (E*S, D)
    e = cache.experts_cache.xb.shape[0]
    dslots, *dexpert_params = kind.backward(dy_slots.reshape(e, -1, dy.shape[1]), cache.experts_cache)
    dslots = dslots.reshape(dy_slots.shape)                            # (E*S, D)
    d_dispatch = cache.x @ dslots.T                                    # (N, E*S)
    dlogits = functional.softmax_backward(d_dispatch, cache.dispatch_cache) + \
        functional.softmax_backward(d_combine, cache.combine_cache)    # (N, E*S)
    dx = cache.dispatch_cache.p @ dslots + dlogits @ cache.phi.T       # (N, D)
    grads = {"phi": cache.x.T @ dlogits} | dict(zip(kind.names, dexpert_params))   # phi (D, E*S)
    return dx, grads


def soft_moe_selection(cache: SoftCache) -> tuple:
    """The experts' relu pattern (mlp) or () (swiglu): the layer's only discrete choices."""
    return experts_selection(cache.kind, cache.experts_cache)


class SoftStats(NamedTuple):
    """How one forward mixed tokens into slots and slots back into tokens."""
    dispatch: np.ndarray   # (N, E*S) each column sums to 1 over the tokens
    combine: np.ndarray    # (N, E*S) each row sums to 1 over the slots


def init_soft_params(config: SoftMoEConfig, rng, dtype=np.float64) -> dict:
    """Phi (D, E*S): normal with std 1/sqrt(D); experts as in experts.init_experts."""
    d, cols = config.d_model, config.num_experts * config.num_slots
    phi = (rng.standard_normal((d, cols)) / np.sqrt(d)).astype(dtype)  # (D, E*S)
    return {"phi": phi} | init_experts(config.expert, config.num_experts, d, config.d_hidden,
                                       rng, dtype)


class SoftMoE(Layer):
    """A Soft MoE layer over one group of tokens: forward(x) -> y, backward(dy, aux_scale) -> dx.

    No auxiliary loss (`aux` is 0.0) and no state: training and evaluation
    compute the same thing. `stats` holds the last forward's SoftStats; no
    token is routed, so `routing_stats()` is empty.
    """

    def __init__(self, config: SoftMoEConfig, *, seed: int = 0, dtype=np.float64):
        super().__init__(dtype)
        if not isinstance(config, SoftMoEConfig):
            raise ValueError(f"SoftMoE: config must be a SoftMoEConfig, got {type(config).__name__}")
        validate.integer("SoftMoE", "seed", seed, minimum=0)
        self.config = config
        self.params = init_soft_params(config, np.random.default_rng(seed), self.dtype)
        self.init_grads()

    def forward(self, x):
        """x (N, D), one group of tokens -> y (N, D)."""
        y, self._cache = soft_moe_forward(x, self.params, self.config.expert)
        self.stats = SoftStats(self._cache.dispatch_cache.p, self._cache.combine_cache.p)
        return y                                                       # (N, D)

    def backward(self, dy, aux_scale: float = 1.0):
        """dx (N, D); aux_scale is accepted for a uniform block interface (no aux loss here)."""
        self.check_backward(dy, aux_scale)
        dx, grads = soft_moe_backward(dy, self._cache)
        self.set_grads(grads)
        return dx                                                      # (N, D)
