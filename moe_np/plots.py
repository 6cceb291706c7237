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
