"""Report plots (matplotlib, Agg backend, PNG): feature density, L0, training curves.

Each function writes one PNG and returns its path; none of them opens a window, so they
run on headless machines and inside the training loop's process.

Legend: F features.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from saejax.evaluate import density_histogram  # noqa: E402

_DPI = 110


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def plot_density_histogram(density: Sequence[float], path: str, *, floor: float = 1e-10,
                           bins: int = 50, ultralow_threshold: float | None = None,
                           title: str = "Feature density") -> str:
    """log10 feature-density histogram (the paper's plot); dead features are counted apart.

    Args:
      density: firing frequency of each feature [F].
      path: output PNG.
      floor: lowest density on the axis.
      bins: histogram bins on [log10(floor), 0].
      ultralow_threshold: draws a dashed line at this density (the ultralow cluster's edge).
      title: plot title.
    """
    density = np.asarray(density, np.float64)
    hist, edges, dead = density_histogram(density, floor=floor, bins=bins)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.bar(edges[:-1], hist, width=np.diff(edges), align="edge", color="#4c72b0")
    if ultralow_threshold:
        ax.axvline(math.log10(ultralow_threshold), color="#c44e52", ls="--", lw=1,
                   label=f"ultralow < {ultralow_threshold:.1e}")
        ax.legend(loc="upper left", fontsize=8)
    alive = density[density > 0]
    lo = math.floor(np.log10(alive.min())) - 1 if alive.size else math.log10(floor)
    ax.set_xlim(max(lo, math.log10(floor)), 0)
    ax.set_xlabel("log10 feature density")
    ax.set_ylabel("features")
    ax.set_title(f"{title} ({density.size} features, {dead} dead)")
    return _save(fig, path)


def plot_l0_histogram(l0_hist: Sequence[int], path: str, *, title: str = "L0 per token") -> str:
    """Histogram of the number of active features per token.

    Args:
      l0_hist: ``l0_hist[n]`` = tokens with exactly n active features (as in feature stats).
      path: output PNG.
    """
    counts = np.asarray(l0_hist, np.float64)
    values = np.arange(counts.size)
    total = counts.sum()
    mean = float((values * counts).sum() / total) if total else 0.0
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if counts.size > 80:  # regroup into ~60 bars
        width = int(math.ceil(counts.size / 60))
        pad = (-counts.size) % width
        counts = np.concatenate([counts, np.zeros(pad)]).reshape(-1, width).sum(1)
        values = np.arange(counts.size) * width
    else:
        width = 1
    ax.bar(values, counts, width=width, align="edge", color="#55a868")
    ax.axvline(mean, color="#c44e52", ls="--", lw=1, label=f"mean L0 = {mean:.2f}")
    ax.legend(fontsize=8)
    ax.set_xlabel("active features per token (L0)")
    ax.set_ylabel("tokens")
    ax.set_title(title)
    return _save(fig, path)


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics JSONL file (one JSON object per line; blank/bad lines skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def plot_training_curves(metrics_path: str, path: str, *, keys: Sequence[str] | None = None,
                         log_keys: Sequence[str] = ("loss", "mse", "l1", "l0"),
                         max_panels: int = 9) -> str:
    """One panel per metric against ``step``, from a metrics JSONL file.

    Args:
      metrics_path: JSONL with records like {"step": 100, "loss": 0.3, ...}; records
        without "step" are ignored, non-numeric fields skipped.
      path: output PNG.
      keys: metrics to plot (default: every numeric field, in first-seen order).
      log_keys: metrics drawn on a log y-axis when all their values are positive.
      max_panels: at most this many panels.
    """
    records = [r for r in read_metrics(metrics_path) if isinstance(r.get("step"), (int, float))]
    if keys is None:
        keys = []
        for r in records:
            for k, v in r.items():
                if (k != "step" and k not in keys and isinstance(v, (int, float))
                        and not isinstance(v, bool)):
                    keys.append(k)
    keys = list(keys)[:max_panels]
    if not keys:
        raise ValueError(f"{metrics_path!r} has no numeric metrics with a 'step' to plot")
    cols = min(3, len(keys))
    rows = int(math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        pts = [(r["step"], r[key]) for r in records
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, lw=1.2, marker="." if len(pts) < 30 else None)
            if key in log_keys and min(y) > 0:
                ax.set_yscale("log")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    return _save(fig, path)
