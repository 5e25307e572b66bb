"""Report plots (matplotlib, Agg backend, PNG): unit density, L0, training curves (one PNG
per metric, titled and labelled), interpretability of features vs neurons.

Each function writes PNGs and returns their paths; none of them opens a window, so they
run on headless machines and inside the training loop's process.

Legend: F units (features or neurons).
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
                           title: str = "Feature density", unit: str = "feature") -> str:
    """log10 density histogram (the paper's plot); silent units are counted apart.

    Args:
      density: firing frequency of each unit [F].
      path: output PNG.
      floor: lowest density on the axis.
      bins: histogram bins on [log10(floor), 0].
      ultralow_threshold: draws a dashed line at this density (the ultralow cluster's edge).
      title: plot title.
      unit: what the units are ("feature" or "neuron"), for the labels.
    """
    density = np.asarray(density, np.float64)
    hist, edges, silent = density_histogram(density, floor=floor, bins=bins)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.bar(edges[:-1], hist, width=np.diff(edges), align="edge", color="#4c72b0")
    if ultralow_threshold:
        ax.axvline(math.log10(ultralow_threshold), color="#c44e52", ls="--", lw=1,
                   label=f"ultralow < {ultralow_threshold:.1e}")
        ax.legend(loc="upper left", fontsize=8)
    alive = density[density > 0]
    lo = math.floor(np.log10(alive.min())) - 1 if alive.size else math.log10(floor)
    ax.set_xlim(max(lo, math.log10(floor)), 0)
    ax.set_xlabel(f"log10 {unit} density (fraction of analysed tokens where it fires)")
    ax.set_ylabel(f"{unit}s")
    ax.set_title(f"{title} ({density.size} {unit}s, {silent} silent: never fired)")
    return _save(fig, path)


def plot_l0_histogram(l0_hist: Sequence[int], path: str, *, title: str = "L0 per token",
                      unit: str = "feature") -> str:
    """Histogram of the number of active units per token.

    Args:
      l0_hist: ``l0_hist[n]`` = tokens with exactly n active features (as in feature stats).
      path: output PNG.
      unit: what the units are ("feature" or "neuron"), for the labels.
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
    ax.set_xlabel(f"active {unit}s per token (L0)")
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


# Known metrics: (name, unit) for the y-axis label; matched on the key's last part.
_METRIC_LABELS = {
    "loss": ("training loss", "reconstruction + sparsity, normalised units"),
    "mse": ("reconstruction MSE", "normalised input units²"),
    "l0": ("L0", "active features per token"),
    "l1": ("L1", "sum of feature activations per token"),
    "aux_loss": ("auxiliary loss", "normalised units"),
    "sparsity_loss": ("sparsity loss", "normalised units"),
    "explained_variance": ("explained variance", "fraction"),
    "frac_dead": ("dead features", "fraction"), "frac_dense": ("dense features", "fraction"),
    "tokens_per_s": ("throughput", "tokens / s"),
    "resample_seconds": ("resampling time", "s"), "n_dead": ("dead features resampled", "count"),
    "loss_clean": ("LM loss, clean", "nats / token"),
    "loss_sae": ("LM loss, SAE spliced in", "nats / token"),
    "loss_zero_ablated": ("LM loss, site zero-ablated", "nats / token"),
    "loss_mean_ablated": ("LM loss, site mean-ablated", "nats / token"),
    "frac_loss_recovered": ("fraction of loss recovered (zero ablation)", "fraction"),
    "frac_loss_recovered_mean_ablation": ("fraction of loss recovered (mean ablation)",
                                          "fraction"),
    "kl_sae": ("KL(clean ‖ SAE)", "nats / token"),
    "kl_zero_ablated": ("KL(clean ‖ zero-ablated)", "nats / token"),
    "kl_mean_ablated": ("KL(clean ‖ mean-ablated)", "nats / token"),
    "dead_features": ("dead features", "count"), "dense_features": ("dense features", "count"),
    "eval_tokens": ("evaluation tokens", "count"), "eval_contexts": ("evaluation contexts", "count"),
    "lr": ("learning rate", ""), "grad_norm": ("gradient norm", "global L2"),
    "unigram_entropy": ("unigram entropy", "nats"),
}
_SKIP_KEYS = ("step", "time")  # "time" is a wall-clock timestamp


def metric_label(key: str) -> tuple[str, str]:
    """(readable name, unit) of a metrics key such as "train/l0" (unit "" when unknown)."""
    return _METRIC_LABELS.get(key.rsplit("/", 1)[-1], (key.rsplit("/", 1)[-1], ""))


def metric_filename(key: str) -> str:
    """The PNG name of a metric's training curve: training_<key, / and odd chars as _>.png."""
    safe = "".join(c if c.isalnum() or c in "-." else "_" for c in key)
    return f"training_{safe}.png"


def plot_training_curves(metrics_path: str, out_dir: str, *, keys: Sequence[str] | None = None,
                         log_keys: Sequence[str] = ("loss", "mse", "l1", "l0"),
                         allow_empty: bool = False) -> list[str]:
    """One PNG per metric against ``step`` (titled, axes labelled), from a metrics JSONL.

    Args:
      metrics_path: JSONL with records like {"step": 100, "train/loss": 0.3, ...}; records
        without "step" and bad lines are ignored, non-numeric fields skipped.
      out_dir: where the PNGs go (``metric_filename(key)`` each).
      keys: metrics to plot (default: every numeric field but "time", in first-seen order).
      log_keys: metrics (last part of the key) drawn on a log y-axis when all positive.
      allow_empty: return [] instead of raising when there is nothing to plot.

    Returns:
      The PNG paths, in the order of ``keys``.
    """
    records = [r for r in read_metrics(metrics_path) if isinstance(r.get("step"), (int, float))]
    if keys is None:
        keys = []
        for r in records:
            for k, v in r.items():
                if (k not in _SKIP_KEYS and k not in keys and isinstance(v, (int, float))
                        and not isinstance(v, bool)):
                    keys.append(k)
    if not keys:
        if allow_empty:
            return []
        raise ValueError(f"{metrics_path!r} has no numeric metrics with a 'step' to plot")
    out = []
    for key in keys:
        pts = [(r["step"], r[key]) for r in records
               if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)
               and math.isfinite(r[key])]
        name, unit = metric_label(key)
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        if pts:
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, lw=1.4, marker="." if len(pts) < 30 else None, color="#4c72b0")
            if key.rsplit("/", 1)[-1] in log_keys and min(y) > 0:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_title(f"{name} ({key})" if name != key else key)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{name} ({unit})" if unit else name)
        ax.grid(alpha=0.3)
        out.append(_save(fig, os.path.join(out_dir, metric_filename(key))))
    return out


def plot_interp_comparison(feature_aurocs: Sequence[float], neuron_aurocs: Sequence[float],
                           path: str, *, bins: int = 25) -> str:
    """Held-out AUROC of the one-rule explanations, features vs neurons: overlaid histograms
    (left) and CDFs (right), with n and the medians in the legend.

    Args:
      feature_aurocs: AUROC of each scored feature.
      neuron_aurocs: AUROC of each scored neuron.
      path: output PNG.
    """
    fig, (ax, cx) = plt.subplots(1, 2, figsize=(10, 3.8))
    edges = np.linspace(0.0, 1.0, bins + 1)
    for vals, name, color in ((feature_aurocs, "features", "#4c72b0"),
                              (neuron_aurocs, "neurons", "#dd8452")):
        v = np.asarray([x for x in vals if x is not None and math.isfinite(x)], np.float64)
        if not v.size:
            continue
        med = float(np.median(v))
        label = f"{name} (n={v.size}, median {med:.3f})"
        ax.hist(v, bins=edges, density=True, histtype="stepfilled", alpha=0.35, color=color,
                label=label)
        ax.axvline(med, color=color, ls="--", lw=1)
        s = np.sort(v)
        cx.step(s, np.arange(1, s.size + 1) / s.size, where="post", color=color, label=label)
    ax.set_xlabel("held-out AUROC of the unit's explanation")
    ax.set_ylabel("density (normalised per group)")
    ax.set_title("Interpretability: features vs neurons")
    ax.legend(fontsize=8, loc="upper left")
    cx.set_xlabel("held-out AUROC of the unit's explanation")
    cx.set_ylabel("fraction of units ≤ AUROC")
    cx.set_title("Cumulative distribution")
    cx.set_xlim(0, 1)
    cx.legend(fontsize=8, loc="upper left")
    return _save(fig, path)
