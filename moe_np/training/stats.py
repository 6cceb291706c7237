"""Routing statistics: what each routed layer did on one batch, as plain numbers.

    routing_summary(stats)   one RoutingStats -> load per expert, MaxVio, CV, drops,
                             gate entropy, largest logit, balance and z-loss values
    routing_report(model)    routing_summary of every routed layer of a model (the layer
                             protocol's routing_stats()), each tagged with its name
    accuracy(logits, labels) share of rows whose arg-max is the label
"""
from __future__ import annotations

import numpy as np

from moe_np import balance, functional


def routing_summary(stats) -> dict:
    """What one sparse layer's routing did on one batch, as plain numbers.

    stats: a RoutingStats (ids (N, K) or None, counts (E,), num_dropped, logits (N, E)).

        load_i     share of the N K assignments choosing expert i, before capacity drops
                   (expert choice: share of the kept assignments); ideal 1/E
        max_vio    max_i load_i / mean(load) - 1   (Wang et al. 2024, MaxVio; 0 is perfect)
        cv         std(load) / mean(load)
        drop_rate  dropped assignments / assignments
        entropy    mean_n H(softmax(logits_n)) in nats; at most log E
        max_logit  the largest router logit (the z-loss pulls logsumexp, so this, toward 0)
        balance    E sum_i f_i P_i on this batch (1 at perfect balance), whatever its coefficient
        z_loss     mean_n logsumexp(logits_n)^2, whatever its coefficient
    """
    logits = stats.logits                                                  # (N, E)
    e = logits.shape[1]
    if stats.ids is not None:
        chosen = balance.expert_counts(stats.ids, e)                       # (E,)
        assignments = stats.ids.size
    else:
        chosen, assignments = stats.counts, int(stats.counts.sum()) + int(stats.num_dropped)
    load = chosen / max(1, chosen.sum())                                   # (E,)
    mean = load.mean()
    probs = functional.softmax_forward(logits)[0]                          # (N, E)
    entropy = -np.sum(probs * np.log(np.maximum(probs, np.finfo(probs.dtype).tiny)), axis=1)  # (N,)
    out = {"load": [round(float(v), 6) for v in load],
           "max_vio": float(load.max() / mean - 1.0), "cv": float(load.std() / mean),
           "dropped": int(stats.num_dropped), "drop_rate": float(stats.num_dropped / max(1, assignments)),
           "entropy": float(entropy.mean()), "max_logit": float(logits.max()),
           "z_loss": float(balance.z_loss_forward(logits)[0])}
    out["balance"] = None if stats.ids is None else \
        float(balance.balance_loss_forward(probs, stats.ids)[0])
    return out


def routing_report(model) -> list[dict]:
    """routing_summary of every routed layer in model, from its last forward, in forward
    order; each dict also holds `block`, the layer's name in model.routing_stats()."""
    return [dict(routing_summary(stats), block=name) for name, stats in model.routing_stats()]


def accuracy(logits, labels) -> float:
    """Share of rows whose arg-max logit is the label.   logits (N, V), labels (N,)."""
    return float(np.mean(np.argmax(logits, axis=1) == labels))
