"""How well a learned partition (which expert wins) matches known regions.

With n[a, t] points assigned to group a whose true label is t, N points in
all, p[a, t] = n[a, t] / N and the marginals p_a = sum_t p[a, t],
p_t = sum_a p[a, t]:

    purity = sum_a max_t n[a, t] / N
    NMI    = I(A; T) / sqrt(H(A) H(T))          (geometric-mean normalisation)
    I(A; T) = sum_{a,t} p[a, t] log(p[a, t] / (p_a p_t)),  H(A) = -sum_a p_a log p_a

Natural logarithms; the base cancels in NMI. Both scores lie in [0, 1] and
are 1 when the partitions agree up to renaming. Purity does not notice a
true region split over several groups; NMI penalises splitting and merging.
"""
from __future__ import annotations

import numpy as np


def contingency(assigned, truth):
    """counts[a, t] = number of points assigned to a whose true label is t.   -> (A, T)."""
    assigned, truth = np.asarray(assigned), np.asarray(truth)
    if assigned.shape != truth.shape or assigned.ndim != 1:
        raise ValueError(f"contingency: assigned {assigned.shape} and truth {truth.shape} "
                         "must be equal-length 1-D arrays")
    a_ids, a_idx = np.unique(assigned, return_inverse=True)
    t_ids, t_idx = np.unique(truth, return_inverse=True)
    counts = np.zeros((len(a_ids), len(t_ids)), dtype=np.float64)                 # (A, T)
    np.add.at(counts, (a_idx, t_idx), 1)
    return counts


def purity(assigned, truth) -> float:
    """sum_a max_t n[a, t] / N: the share of points whose group's majority label is their own.

    1 is perfect, but so is one group per point: purity cannot see splitting."""
    counts = contingency(assigned, truth)                          # (A, T)
    return float(counts.max(axis=1).sum() / counts.sum())


def normalized_mutual_info(assigned, truth) -> float:
    """I(A; T) / sqrt(H(A) H(T)), in [0, 1]; 1 when the partitions agree up to renaming.

    If one partition is a single group its entropy is 0: the score is then 0,
    or 1 when both are single groups."""
    counts = contingency(assigned, truth)                          # (A, T)
    p = counts / counts.sum()                                      # (A, T) joint
    pa, pt = p.sum(axis=1), p.sum(axis=0)                          # (A,), (T,)
    nz = p > 0
    mi = np.sum(p[nz] * np.log(p[nz] / np.outer(pa, pt)[nz]))
    ha, ht = -np.sum(pa * np.log(pa)), -np.sum(pt * np.log(pt))
    if ha == 0 or ht == 0:
        return 1.0 if ha == ht else 0.0
    return float(mi / np.sqrt(ha * ht))
