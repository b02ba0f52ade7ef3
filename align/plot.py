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
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        sub = os.path.join(run_dir, name)
        if os.path.isfile(os.path.join(sub, "metrics.jsonl")) and sub != run_dir:
            written += plot_run(sub)
    return written


def _plot_records(records: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
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
        names = sorted(series)
        if not names:
            continue
        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            xs, ys = zip(*series[name])
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, lw=1.2)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle(f"{kind}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{kind}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
