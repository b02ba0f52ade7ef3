"""``align plot RUN_DIR``: PNG curves of every metric in metrics.jsonl (one figure per kind: train, eval, ...).

For a pipeline run directory, each stage's sub-directory gets its own plots.
"""

from __future__ import annotations

import math
import os

from .metrics import read_metrics

SKIP = {"step", "kind", "time"}


def plot_run(run_dir: str) -> list[str]:
    """Write RUN_DIR/plots/<kind>.png; returns the files written (also for each stage of a pipeline)."""
    written = []
    records = read_metrics(run_dir)
    if records:
        written += _plot_records(records, os.path.join(run_dir, "plots"))
        written += _plot_rl(records, os.path.join(run_dir, "plots"))
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        sub = os.path.join(run_dir, name)
        if os.path.isfile(os.path.join(sub, "metrics.jsonl")) and sub != run_dir:
            written += plot_run(sub)
    return written


def _plot_records(records: list[dict], out_dir: str) -> list[str]:
    kinds: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in records:
        series = kinds.setdefault(r.get("kind", "train"), {})
        for k, v in r.items():
            if k in SKIP or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if math.isfinite(v):
                series.setdefault(k, []).append((int(r.get("step", 0)), float(v)))
    written = []
    for kind, series in kinds.items():
        if series:
            written.append(_grid({name: series[name] for name in sorted(series)},
                                 os.path.join(out_dir, f"{kind}.png"), title=kind))
    return written


def _grid(panels: dict[str, list[tuple[int, float]]], path: str, title: str | None = None) -> str:
    """One small line plot per named series, three to a row, saved as ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path), exist_ok=True)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, points) in zip(axes.flat, panels.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, lw=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# The curves that tell whether RL works, on one page: (kind, metric, title). Written only for runs with rewards.
RL_CURVES = [
    ("train", "reward_mean", "reward (mean over rollouts)"),
    ("eval", "accuracy", "held-out accuracy"),
    ("train", "kl_ref", "KL(π_θ ‖ π_ref) per token (k3)"),
    ("train", "entropy", "entropy per token"),
    ("train", "mismatch/logprob_diff_max", "max |log π_trainer − log π_engine|"),
    ("train", "completion_length", "completion length (tokens)"),
]


def _plot_rl(records: list[dict], out_dir: str) -> list[str]:
    """RUN_DIR/plots/rl.png: reward, held-out accuracy, KL to the reference, entropy, engine mismatch, length."""
    series = {}
    for kind, key, title in RL_CURVES:
        points = [(int(r.get("step", 0)), float(r[key])) for r in records if r.get("kind", "train") == kind
                  and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if points:
            series[title] = points
    if "reward (mean over rollouts)" not in series:
        return []
    return [_grid(series, os.path.join(out_dir, "rl.png"))]
