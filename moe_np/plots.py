"""Figures of routing behaviour (matplotlib, Agg backend: files, no windows)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plane_grid(resolution: int = 200, lo: float = -1.0, hi: float = 1.0):
    """Points on a square grid: (resolution^2, 2), and the axis ticks."""
    ticks = np.linspace(lo, hi, resolution)                        # (R,)
    gx, gy = np.meshgrid(ticks, ticks)                             # (R, R) each
    return np.column_stack([gx.ravel(), gy.ravel()]), ticks        # (R*R, 2), (R,)


def routing_map(ax, winner_of, title: str, num_experts: int, resolution: int = 200):
    """Colour the plane [-1, 1]^2 by winner_of(points) -> expert id, with the
    true region boundaries (the axes x0 = 0 and x1 = 0) drawn over it."""
    points, ticks = plane_grid(resolution)
    winner = np.asarray(winner_of(points)).reshape(resolution, resolution)   # (R, R)
    cmap = plt.get_cmap("tab10", 10)
    ax.imshow(winner, origin="lower", extent=(-1, 1, -1, 1), cmap=cmap, vmin=-0.5,
              vmax=9.5, interpolation="nearest")
    ax.axhline(0, color="k", lw=1.5)
    ax.axvline(0, color="k", lw=1.5)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([-1, 0, 1]); ax.set_yticks([-1, 0, 1])
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(e)) for e in range(num_experts)]
    return handles


def expert_load(ax, loads, title: str, window: int = 10):
    """Stacked share of tokens per expert over training, smoothed over `window` steps.

    loads: (steps, E) shares (rows sum to 1 for top-1 routing). Returns legend handles."""
    loads = np.asarray(loads)                                      # (T, E)
    num_experts = loads.shape[1]
    kernel = np.ones(window) / window                              # (W,)
    smooth = np.array([np.convolve(loads[:, e], kernel, mode="valid")
                       for e in range(num_experts)])               # (E, T - W + 1)
    colors = plt.get_cmap("tab10")(np.arange(num_experts) % 10)
    ax.stackplot(np.arange(smooth.shape[1]) + window - 1, smooth, colors=colors)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    return [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors]


def drop_policies(ax, ids, weights, dropped, policy: str):
    """One row per choice rank, one column per token; dropped assignments in red,
    each cell labelled with its expert and weight.   ids, weights, dropped: (N, K)."""
    n, k = ids.shape
    ax.imshow(dropped.T, cmap="Reds", vmin=0, vmax=1.4, aspect="auto")
    for t in range(n):
        for r in range(k):
            ax.text(t, r, f"e{ids[t, r]}\n{weights[t, r]:.2f}", ha="center", va="center",
                    fontsize=6)
    ax.set_yticks(range(k))
    ax.set_yticklabels(["1st", "2nd", "3rd", "4th"][:k] if k <= 4 else range(k))
    ax.set_ylabel(policy, fontsize=9)


def drop_rate(axes, factors, curves: dict, titles):
    """One panel per measured quantity: curves[policy] is (F, len(titles)) over capacity factors."""
    for j, ax in enumerate(axes):
        for (policy, values), style in zip(curves.items(), ["-", "--", ":", "-."]):
            ax.plot(factors, values[:, j], style, label=policy, lw=2)
        ax.set_title(titles[j], fontsize=9)
        ax.set_xlabel("capacity factor")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction")
    axes[0].legend(fontsize=8)
