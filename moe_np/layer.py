"""Layer: the one protocol every layer and model of moe_np follows.

    y  = layer.forward(x)                    x: (N, D_in) -> y: (N, D_out)
    dx = layer.backward(dy, aux_scale=1.0)   fills layer.grads; the auxiliary
                                             loss's gradient enters times aux_scale
    layer.aux                                the last forward's auxiliary loss
                                             (coefficients applied; 0.0 if none)
    layer.routing_stats()                    [(name, RoutingStats)] of every routed
                                             layer inside, in forward order

A backward before any forward raises ValueError, and so does a dy whose
dtype is not the layer's. A trainer, a loss scaler or a container asks
nothing else of what it holds: no type tests, no `getattr(..., "aux", 0)`.

Constructors take the sizes (or a config) positionally and `seed=` and
`dtype=` by keyword only, and refuse a dtype that is not floating point.

Containers (Sequential, ResidualNet, the language model) list their parts
in `children()`; `aux` and `routing_stats()` then sum and collect over them
without any code of their own. A leaf sets `self._aux` and `self.stats` (its
own statistics type) in its forward; a routed leaf's `own_routing_stats()`
gives them as a RoutingStats (SparseMoE's stats are one already; ReMoE
converts; Soft MoE routes no token, so it has none).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from moe_np import validate
from moe_np.module import Module


class RoutingStats(NamedTuple):
    """What one forward's routing did (the shape every routed layer reports)."""
    ids: np.ndarray | None    # (N, K) chosen experts; None when tokens do not pick K (expert choice, ReMoE)
    weights: np.ndarray       # (N, K) routing weights; expert choice (E, C); ReMoE (N, E)
    counts: np.ndarray        # (E,) kept assignments per expert
    num_dropped: int          # assignments that found no slot
    logits: np.ndarray        # (N, E) router logits


class Layer(Module):
    """Base class of the layer protocol (see the module docstring).

    Each subclass writes its own forward(x) and backward(dy, aux_scale=1.0) over its
    forward/backward pairs; the base class gives what every layer shares: the dtype,
    the cache that guards backward, and aux / routing_stats() over the children."""

    def __init__(self, dtype=np.float64):
        super().__init__()
        self.dtype = validate.float_dtype(type(self).__name__, dtype)
        self._cache = None        # what backward needs; None until a forward has run
        self._aux = 0.0           # this layer's own auxiliary loss from the last forward
        self.stats = None         # this layer's own statistics of the last forward, or None
                                  # (SparseMoE: RoutingStats; ReMoE: ReMoEStats; SoftMoE: SoftStats)

    @property
    def aux(self) -> float:
        """Own auxiliary loss plus every child layer's, from the last forward."""
        kids = [c.aux for c in self.children().values() if isinstance(c, Layer)]
        return float(self._aux + sum(kids))

    def own_routing_stats(self) -> RoutingStats | None:
        """This layer's own RoutingStats from the last forward; None if it routes nothing."""
        return self.stats if isinstance(self.stats, RoutingStats) else None

    def routing_stats(self) -> list:
        """[(name, RoutingStats)] for this layer and every routed layer inside it.

        Names are the children's keys joined by "." ("block0", "1", "layer2.moe");
        a routed leaf reports itself as ""."""
        own = self.own_routing_stats()
        found = [("", own)] if own is not None else []
        for name, child in self.children().items():
            if isinstance(child, Layer):
                found += [(f"{name}.{k}" if k else name, s) for k, s in child.routing_stats()]
        return found
