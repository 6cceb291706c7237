"""Figures of routing behaviour and training (matplotlib, Agg backend: files, no windows).

Figure functions draw on axes they are given (a chapter arranges them);
`plot_runs` assembles the `python -m moe_np plot` figures of run directories.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

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
    """Stacked share of assignments per expert over training, smoothed over `window` steps.

    loads: (steps, E) shares, counts / (N K), so each row sums to 1. Expert e
    is drawn in colour tab10(e), bottom to top. Returns one legend handle per
    expert: fig.legend(handles, [f"expert {e}" ...]) names the colours."""
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


def drop_policies(ax, ids, weights, dropped, policy: str, fontsize: float = 8.5):
    """One row per choice rank, one column per token; dropped assignments in dark red
    with white text, kept ones pale, each cell labelled with its expert and weight.
    ids, weights, dropped: (N, K)."""
    n, k = ids.shape
    ax.imshow(dropped.T, cmap="Reds", vmin=-0.1, vmax=1.05, aspect="auto")
    for t in range(n):
        for r in range(k):
            ax.text(t, r, f"e{ids[t, r]}\n{weights[t, r]:.2f}", ha="center", va="center",
                    fontsize=fontsize, linespacing=1.1,
                    color="white" if dropped[t, r] else "black",
                    fontweight="bold" if dropped[t, r] else "normal")
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", lw=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_yticks(range(k))
    ax.set_yticklabels(["1st", "2nd", "3rd", "4th"][:k] if k <= 4 else range(k))
    ax.set_ylabel(policy, fontsize=10)


def drop_rate(axes, factors, curves: dict, titles):
    """One panel per measured quantity over capacity factors.

    curves[policy] is (F, Q) for one batch, or (B, F, Q) for B batches: then
    the line is the mean over batches and the shaded band their range
    (min to max). Q = len(titles) = len(axes)."""
    for j, ax in enumerate(axes):
        for i, ((policy, values), style) in enumerate(zip(curves.items(), ["-", "--", ":", "-."])):
            values = np.asarray(values)                            # (F, Q) or (B, F, Q)
            mean = values[..., j] if values.ndim == 2 else values[..., j].mean(axis=0)   # (F,)
            ax.plot(factors, mean, style, label=policy, lw=2, color=f"C{i}")
            if values.ndim == 3:
                ax.fill_between(factors, values[..., j].min(axis=0), values[..., j].max(axis=0),
                                color=f"C{i}", alpha=0.2, lw=0)
        ax.set_title(titles[j], fontsize=9)
        ax.set_xlabel("capacity factor")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction")
    axes[0].legend(fontsize=8)


# ---------------------------------------------------------------------------
# Training runs (chapter 7 and `python -m moe_np plot`): curves over logged steps.

def training_curves(axes, runs: dict, classify: bool):
    """Loss (left) and accuracy or test loss (right) over steps, one colour per run.

    runs: name -> list of metrics records (train.Trainer's logged records).
    Solid: training (the mean since the previous log); dashed: the test set."""
    for i, (name, records) in enumerate(runs.items()):
        steps = [r["step"] + 1 for r in records]
        colour = f"C{i % 10}"
        axes[0].plot(steps, [r["loss"] for r in records], color=colour, label=f"{name} train")
        if "test_loss" in records[0]:
            axes[0].plot(steps, [r["test_loss"] for r in records], "--", color=colour,
                         label=f"{name} test")
        if classify:
            axes[1].plot(steps, [r["accuracy"] for r in records], color=colour)
            axes[1].plot(steps, [r.get("test_accuracy", np.nan) for r in records], "--", color=colour)
    axes[0].set_ylabel("task loss"); axes[0].set_yscale("log")
    axes[1].set_ylabel("accuracy (dashed: test)" if classify else "")
    for ax in axes:
        ax.set_xlabel("step"); ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)


def load_over_training(ax, steps, loads, title: str):
    """Stacked share of assignments per expert at each logged step; dotted lines at k/E.

    steps: (T,); loads: (T, E), rows summing to 1. Returns legend handles."""
    loads = np.asarray(loads)                                      # (T, E)
    num_experts = loads.shape[1]
    colors = plt.get_cmap("tab10")(np.arange(num_experts) % 10)
    ax.stackplot(steps, loads.T, colors=colors)
    for e in range(1, num_experts):
        ax.axhline(e / num_experts, color="k", lw=0.5, ls=":")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step"); ax.set_ylim(0, 1); ax.set_xlim(steps[0], steps[-1])
    return [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors]


def metric_curves(ax, curves: dict, ylabel: str, ideal: float | None = None, log: bool = False,
                  ideal_label: str = "ideal"):
    """One line per name: curves[name] = (steps (T,), values (T,)); a grey line at `ideal`."""
    for name, (steps, values) in curves.items():
        ax.plot(steps, values, label=name, lw=1.5)
    if ideal is not None:
        ax.axhline(ideal, color="0.5", lw=1, ls="--", label=f"{ideal_label} {ideal:.3g}")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel); ax.set_xlabel("step"); ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def assignment_heatmap(ax, weights, groups, title: str):
    """Tokens (rows, sorted by their true group) against experts (columns), coloured by
    the routing weight each expert got (0: not chosen).   weights: (N, E), groups: (N,)."""
    order = np.argsort(groups, kind="stable")                      # (N,)
    image = ax.imshow(np.asarray(weights)[order], aspect="auto", cmap="viridis",
                      interpolation="nearest", vmin=0)
    ax.figure.colorbar(image, ax=ax, label="routing weight (0: not chosen)", fraction=0.08)
    cuts = np.flatnonzero(np.diff(np.asarray(groups)[order])) + 0.5   # (G - 1,)
    for c in cuts:
        ax.axhline(c, color="w", lw=0.6)
    ax.set_xlabel("expert"); ax.set_ylabel("probe token (sorted by true group)")
    ax.set_xticks(range(np.shape(weights)[1]))
    ax.set_title(title, fontsize=9)


def routing_plane(ax, winner_of, title: str, num_experts: int, points=None, lo=-1.2, hi=1.2,
                  resolution: int = 200):
    """Colour the square [lo, hi]^2 by winner_of(points) -> expert id, with optional data
    points (P, 2) drawn over it (for 2-D tasks without quadrant regions)."""
    grid, _ = plane_grid(resolution, lo, hi)                       # (R*R, 2)
    winner = np.asarray(winner_of(grid)).reshape(resolution, resolution)   # (R, R)
    cmap = plt.get_cmap("tab10", 10)
    ax.imshow(winner, origin="lower", extent=(lo, hi, lo, hi), cmap=cmap, vmin=-0.5, vmax=9.5,
              interpolation="nearest")
    if points is not None:
        ax.scatter(points[:, 0], points[:, 1], s=1, c="k", alpha=0.3)
    ax.set_title(title, fontsize=9)
    return [plt.Rectangle((0, 0), 1, 1, color=cmap(e)) for e in range(num_experts)]


def loss_scale_trace(ax, steps, scales, skipped_steps):
    """log2 of the loss scale at each logged step, with the skipped steps marked."""
    ax.step(steps, np.log2(scales), where="post", label="log2 loss scale")
    if len(skipped_steps):
        ax.plot(skipped_steps, np.full(len(skipped_steps), np.log2(max(scales))), "rv", ms=4,
                label="a step was skipped since the last log")
    ax.set_xlabel("step"); ax.set_ylabel("log2(scale)"); ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------
# `python -m moe_np plot RUN_DIR [RUN_DIR ...]`: a run directory's figures.

class RunRecords(NamedTuple):
    """What a run directory holds, read back."""
    path: Path
    config: dict           # TrainConfig fields
    metrics: list          # one dict per logged step
    routing: list          # {"step", "blocks": [routing_summary, ...]} per logged step


def read_run(run_dir) -> RunRecords:
    """config.json, metrics.jsonl and routing.jsonl of run_dir (ValueError if there are no metrics)."""
    from moe_np import checkpoint as ckpt
    path = Path(run_dir)
    config = ckpt.read_run_config(path)
    metrics = ckpt.read_jsonl(path / ckpt.METRICS_FILE)
    if not metrics:
        raise ValueError(f"plot: {path} has no logged steps in {ckpt.METRICS_FILE} yet")
    return RunRecords(path, config, metrics, ckpt.read_jsonl(path / ckpt.ROUTING_FILE))


def _save(fig, path: Path, rect=(0, 0, 1, 1)) -> Path:
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label(run: RunRecords) -> str:
    c = run.config
    what = f"MoE E={c['experts']} K={c['k']}" if c["model"] == "moe" else f"dense ({c['dense_match']})"
    return f"{run.path.name}: {what}, {c['precision']}"


def _has_routing(run: RunRecords) -> bool:
    """Did the run log routing statistics (a model with sparse blocks)?"""
    return bool(run.routing) and bool(run.routing[0]["blocks"])


def _routing_series(run: RunRecords, key: str):
    """steps (T,) and values (T, B) of one routing_summary field over the logged steps."""
    steps = np.array([r["step"] + 1 for r in run.routing])         # (T,)
    values = np.array([[b[key] for b in r["blocks"]] for r in run.routing], dtype=np.float64)
    return steps, values                                            # (T,), (T, B) or (T, B, E)


def curves_figure(runs: list, path: Path) -> Path:
    classify = "accuracy" in runs[0].metrics[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    training_curves(axes, {_label(r): r.metrics for r in runs}, classify)
    if not classify:
        axes[1].set_visible(False)
    fig.suptitle(f"Loss{' and accuracy' if classify else ''}, task {runs[0].config['task']}",
                 fontsize=10)
    return _save(fig, path)


def routing_figures(run: RunRecords, out: Path) -> list:
    """Expert load, MaxVio, and gate entropy with drop rate over training, per sparse block."""
    steps, loads = _routing_series(run, "load")                     # (T,), (T, B, E)
    blocks, experts = loads.shape[1], loads.shape[2]
    fig, axes = plt.subplots(1, blocks, figsize=(4.2 * blocks, 3.2), squeeze=False)
    for b in range(blocks):
        handles = load_over_training(axes[0, b], steps, loads[:, b], f"block {b}: share of assignments")
    fig.suptitle(f"Expert load over training (dotted: equal shares 1/E = {1 / experts:.3f})",
                 fontsize=10)
    fig.legend(handles, [f"expert {e}" for e in range(experts)], loc="center right", fontsize=7)
    written = [_save(fig, out / "expert-load.png", rect=(0, 0, 0.88, 1))]
    _, vio = _routing_series(run, "max_vio")                        # (T, B)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    metric_curves(ax, {f"block {b}": (steps, vio[:, b]) for b in range(blocks)},
                  "MaxVio = max load / mean load - 1", ideal=0.0)
    written.append(_save(fig, out / "maxvio.png"))
    _, entropy = _routing_series(run, "entropy")                    # (T, B)
    _, drops = _routing_series(run, "drop_rate")                    # (T, B)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    metric_curves(axes[0], {f"block {b}": (steps, entropy[:, b]) for b in range(blocks)},
                  "gate entropy (nats)", ideal=float(np.log(experts)),
                  ideal_label="uniform: log E =")
    metric_curves(axes[1], {f"block {b}": (steps, drops[:, b]) for b in range(blocks)},
                  "share of assignments dropped", ideal=0.0)
    written.append(_save(fig, out / "entropy-drops.png"))
    return written


def scale_figure(run: RunRecords, path: Path) -> Path:
    steps = np.array([r["step"] + 1 for r in run.metrics])          # (T,)
    scales = np.array([r["loss_scale"] for r in run.metrics])       # (T,)
    totals = np.array([r["skipped_total"] for r in run.metrics])    # (T,)
    skipped = steps[np.diff(totals, prepend=0) > 0]                 # logged steps after a skip
    fig, ax = plt.subplots(figsize=(6, 3))
    loss_scale_trace(ax, steps, scales, skipped)
    skipped_steps = int(totals[-1])
    ax.set_title(f"Loss scale, {run.config['precision']} ({skipped_steps} "
                 f"step{'' if skipped_steps == 1 else 's'} skipped)", fontsize=10)
    return _save(fig, path)


def compare_figure(runs: list, path: Path) -> Path:
    """Several runs overlaid: loss, accuracy (classification) and the worst block's MaxVio."""
    classify = "accuracy" in runs[0].metrics[0]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
    training_curves(axes[:2], {_label(r): r.metrics for r in runs}, classify)
    vio = {_label(r): (s, v.max(axis=1)) for r in runs if _has_routing(r)
           for s, v in [_routing_series(r, "max_vio")]}
    metric_curves(axes[2], vio, "MaxVio (worst block)", ideal=0.0)
    fig.suptitle(f"{len(runs)} runs on task {runs[0].config['task']}", fontsize=10)
    return _save(fig, path)


def load_trained(run: RunRecords):
    """The run rebuilt from its config, with checkpoint.npz loaded, in eval mode.

    It routes with the "numpy" dispatch whatever the run trained with: every strategy
    computes the same numbers, and the einsum one's (N, E, C) one-hot tensors would not
    fit a 22,500-point routing map in memory."""
    from moe_np import checkpoint as ckpt
    from moe_np.training import build_run, config_from_dict
    config = config_from_dict(run.config, f"{run.path}/config.json")
    built = build_run(replace(config, dispatch="numpy"))
    ckpt.load_checkpoint(run.path / ckpt.CHECKPOINT_FILE, built.model, built.optimizer,
                         built.scaler, built.trainer)
    built.model.eval()
    return built


def first_choices(model):
    """winner_of(block) -> (points (P, D_in) -> (P,) first-choice expert of that sparse block).

    One forward serves every block: the last points seen are remembered."""
    seen = {}

    def forward(points):
        if "points" not in seen or not np.array_equal(seen["points"], points):
            model.forward(points.astype(model.dtype))
            seen["points"] = points
            seen["winners"] = [s.logits.argmax(axis=1) if s.ids is None else s.ids[:, 0]
                               for _, s in model.routing_stats()]               # B x (P,)
        return seen["winners"]

    return lambda block: (lambda points: forward(points)[block])


def dense_weights(stats, num_experts: int):
    """The routing weights as (N, E): weight where an expert was chosen, else 0."""
    n = len(stats.logits)
    if stats.ids is None:                                           # expert choice: probabilities
        from moe_np.functional import softmax_forward
        return softmax_forward(stats.logits)[0]                     # (N, E)
    w = np.zeros((n, num_experts), dtype=stats.weights.dtype)       # (N, E)
    np.put_along_axis(w, stats.ids, stats.weights, axis=1)
    return w


def probe_figures(run: RunRecords, out: Path, probe_size: int = 256) -> list:
    """Token-to-expert heatmap on the first probe_size test rows; the routing map on 2-D tasks."""
    built = load_trained(run)
    task, model = built.task, built.model
    groups = task.groups_test if task.groups_test is not None else task.y_test
    model.forward(task.x_test[:probe_size])
    experts, blocks = run.config["experts"], len(model.blocks)
    fig, axes = plt.subplots(1, blocks, figsize=(4 * blocks, 4.2), squeeze=False)
    for b, (_, stats) in enumerate(model.routing_stats()):
        assignment_heatmap(axes[0, b], dense_weights(stats, experts), groups[:probe_size],
                           f"block {b}")
    fig.suptitle(f"Routing weights on {probe_size} test tokens, grouped by true "
                 f"{'cluster' if task.name == 'clusters' else 'region' if task.name == 'regions' else 'class'}"
                 f" (step {built.trainer.step})", fontsize=10)
    written = [_save(fig, out / "probe-heatmap.png")]
    if task.d_in == 2:
        fig, axes = plt.subplots(1, blocks, figsize=(4 * blocks, 4), squeeze=False)
        winner_of = first_choices(model)
        for b in range(blocks):
            title = f"block {b}: first-choice expert"
            if task.name == "regions":
                handles = routing_map(axes[0, b], winner_of(b), title, experts, resolution=150)
            else:
                handles = routing_plane(axes[0, b], winner_of(b), title, experts,
                                        points=task.x_test, resolution=150)
        fig.legend(handles, [f"expert {e}" for e in range(experts)], loc="lower center",
                   ncol=min(experts, 8), fontsize=7)
        fig.subplots_adjust(bottom=0.15)
        written.append(_save(fig, out / "routing-map.png"))
    return written


def plot_runs(run_dirs) -> list:
    """Every figure of the first run, written into its directory; with several runs, their
    curves overlaid in compare.png. Returns the paths written."""
    if not run_dirs:
        raise ValueError("plot: give at least one RUN_DIR")
    runs = [read_run(d) for d in run_dirs]
    first, out = runs[0], runs[0].path
    written = [curves_figure(runs[:1], out / "loss.png")]
    if _has_routing(first):
        written += routing_figures(first, out)
    if first.metrics[0].get("loss_scale") is not None:
        written.append(scale_figure(first, out / "loss-scale.png"))
    if first.config["model"] == "moe":
        written += probe_figures(first, out)
    if len(runs) > 1:
        written.append(compare_figure(runs, out / "compare.png"))
    return written
