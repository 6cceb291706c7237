"""Synthetic tasks generated in code (nothing is downloaded).

    make_blobs      Gaussian clouds, one per class (chapters 1 and 4)
    make_regions    a plane of four quadrants with their own rules (chapter 3)
    make_clusters   many small clusters, each labelling its points its own way (chapter 7)
    make_task       any of them by name, split into train and test (the train command)

Shape letters: N samples, D input width, V classes, M clusters.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


def make_blobs(n: int, dim: int = 10, classes: int = 10, spread: float = 1.0,
               seed: int = 0):
    """Gaussian blobs: class c is a cloud of width `spread` around a random centre.

    Returns x (N, D) float64 and labels (N,) int64 in [0, classes). Draw
    train and test rows in one call and cut them with `split`, so both
    share the same centres.
    """
    if n < 1 or dim < 1 or classes < 1:
        raise ValueError(f"make_blobs: n, dim, classes must be >= 1, got {n}, {dim}, {classes}")
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.standard_normal((classes, dim))   # (V, D)
    labels = rng.integers(0, classes, n)                  # (N,)
    x = centres[labels] + spread * rng.standard_normal((n, dim))   # (N, D)
    return x, labels


def split(x, y, train_fraction: float = 0.8):
    """First train_fraction of the rows for training, the rest for testing."""
    cut = int(round(train_fraction * len(x)))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


# ---------------------------------------------------------------------------
# The regions task of chapter 3: a plane split into regions with their own rules.

REGION_RULES = (
    # (A (2, 2), b (2,)): y = tanh(x @ A + b) inside the region
    (np.array([[1.5, 0.0], [0.0, -1.5]]), np.array([0.5, 0.0])),
    (np.array([[0.0, 2.0], [2.0, 0.0]]), np.array([-0.5, 0.5])),
    (np.array([[-1.5, 1.0], [0.5, 1.5]]), np.array([0.0, -0.5])),
    (np.array([[1.0, -2.0], [-1.0, -1.0]]), np.array([0.5, 0.5])),
)


def region_of(x):
    """The true region of each point: the quadrant of the plane.   x (N, 2) -> (N,) in 0..3.

    0: x0 >= 0, x1 >= 0;  1: x0 < 0, x1 >= 0;  2: x0 < 0, x1 < 0;  3: x0 >= 0, x1 < 0.
    """
    right = x[:, 0] >= 0                                  # (N,)
    top = x[:, 1] >= 0                                    # (N,)
    return np.where(top, np.where(right, 0, 1), np.where(right, 3, 2))


def make_regions(n: int, noise: float = 0.05, seed: int = 0):
    """Points uniform in [-1, 1]^2; each region applies its own rule y = tanh(x A_r + b_r).

    Returns x (N, 2), y (N, 2) and the true region (N,). The rules disagree at
    the boundaries, so one smooth function fits the whole plane badly while a
    mixture of simple experts, one per region, fits it well.
    """
    if n < 1:
        raise ValueError(f"make_regions: n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (n, 2))                    # (N, 2)
    region = region_of(x)                                 # (N,)
    y = np.empty_like(x)                                  # (N, 2)
    for r, (a, b) in enumerate(REGION_RULES):
        inside = region == r                              # (N,)
        y[inside] = np.tanh(x[inside] @ a + b)
    y += noise * rng.standard_normal(y.shape)             # (N, 2)
    return x, y, region


# ---------------------------------------------------------------------------
# The clusters task of chapter 7: many clusters, each with its own labelling rule.

def make_clusters(n: int, dim: int = 2, clusters: int = 16, classes: int = 4,
                  spread: float = 0.08, noise: float = 0.0, seed: int = 0):
    """Points around `clusters` centres in [-1, 1]^D; each cluster labels its points its own way.

        c_n ~ uniform{0..clusters-1};  x_n = mu_c + spread * eps_n;
        label_n = argmax_v ((x_n - mu_c) R_c)_v      R_c: (D, V) random, one per cluster

    Returns x (N, D) float64, labels (N,) int64 in [0, classes) and the
    cluster of each point (N,). Inside a cluster the classes are wedges
    around its centre, cut by that cluster's own random directions, so one
    model has to learn `clusters` different linear rules and know which one
    applies: a task made for experts that specialise by cluster. With
    noise > 0 a share `noise` of the labels is redrawn uniformly (a ceiling
    on accuracy of 1 - noise (V - 1) / V). Centres are drawn at least
    4 spread apart, so clusters barely overlap.
    """
    if min(n, dim, clusters, classes) < 1:
        raise ValueError(f"make_clusters: n, dim, clusters, classes must be >= 1, got "
                         f"{n}, {dim}, {clusters}, {classes}")
    if not 0.0 <= noise <= 1.0 or not spread > 0:
        raise ValueError(f"make_clusters: need spread > 0 and noise in [0, 1], got {spread}, {noise}")
    rng = np.random.default_rng(seed)
    centres = _spaced_centres(rng, clusters, dim, 4.0 * spread)          # (M, D)
    rules = rng.standard_normal((clusters, dim, classes))                 # (M, D, V)
    cluster = rng.integers(0, clusters, n)                                # (N,)
    offset = spread * rng.standard_normal((n, dim))                       # (N, D)
    x = centres[cluster] + offset                                         # (N, D)
    labels = np.einsum("nd,ndv->nv", offset, rules[cluster]).argmax(axis=1)   # (N,)
    flip = rng.random(n) < noise                                          # (N,)
    labels = np.where(flip, rng.integers(0, classes, n), labels)          # (N,)
    return x, labels.astype(np.int64), cluster


def _spaced_centres(rng, count: int, dim: int, min_gap: float):
    """Uniform points in [-0.9, 0.9]^D, redrawn until every pair is min_gap apart (or 1000 tries)."""
    chosen = []
    for _ in range(1000 * count):
        c = rng.uniform(-0.9, 0.9, dim)                                   # (D,)
        if all(np.linalg.norm(c - o) >= min_gap for o in chosen):
            chosen.append(c)
            if len(chosen) == count:
                return np.array(chosen)                                   # (M, D)
    raise ValueError(f"make_clusters: cannot place {count} centres {min_gap:.2f} apart in "
                     f"[-0.9, 0.9]^{dim}; lower clusters or spread")


# ---------------------------------------------------------------------------
# Tasks by name, as the train command and chapter 7 use them.

TASKS = ("clusters", "regions", "blobs")


class Task(NamedTuple):
    """A train/test split with what a model needs to know about it."""
    name: str
    kind: str               # "classification" (integer labels) or "regression"
    x_train: np.ndarray     # (N_tr, D_in)
    y_train: np.ndarray     # (N_tr,) int labels or (N_tr, D_out)
    x_test: np.ndarray      # (N_te, D_in)
    y_test: np.ndarray      # (N_te,) or (N_te, D_out)
    groups_test: np.ndarray | None   # (N_te,) the true cluster or region of each test point
    d_in: int
    d_out: int              # classes, or the regression target's width


def make_task(name: str, n: int = 8000, seed: int = 0, dtype=np.float64) -> Task:
    """Task `name` (see TASKS) with n rows, 80% for training; inputs and regression targets in dtype.

    clusters: make_clusters(dim=2, 16 clusters, 4 classes), classification.
    regions:  the chapter-3 quadrants, regression y in R^2 (groups: the true region).
    blobs:    make_blobs(dim=10, 10 classes, spread 1.5), classification (no groups).
    """
    if name not in TASKS:
        raise ValueError(f"make_task: name must be one of {TASKS}, got {name!r}")
    if not isinstance(n, (int, np.integer)) or n < 10:
        raise ValueError(f"make_task: n must be an integer >= 10, got {n!r}")
    groups = None
    if name == "clusters":
        x, y, groups = make_clusters(n, seed=seed)                        # (N, 2), (N,), (N,)
        kind, d_out = "classification", 4
    elif name == "regions":
        x, y, groups = make_regions(n, seed=seed)                         # (N, 2) each, (N,)
        kind, d_out, y = "regression", 2, y.astype(dtype)
    else:
        x, y = make_blobs(n, dim=10, classes=10, spread=1.5, seed=seed)   # (N, 10), (N,)
        kind, d_out = "classification", 10
    (x_tr, y_tr), (x_te, y_te) = split(x.astype(dtype), y)
    g_te = None if groups is None else split(groups, groups)[1][0]        # (N_te,)
    return Task(name, kind, x_tr, y_tr, x_te, y_te, g_te, x.shape[1], d_out)
