"""One call from a trained SAE run to its analysis report (``make demo``'s last stage and
``launch/analyze.py``).

    paths = analyze_run("runs/sae/tiny", "runs/sae/tiny/analysis", n_contexts=256)
    # paths["dashboard"] -> index.html; paths["stats"] -> features.json
    write_summary(paths, "runs/sae/tiny")  # summary.md / summary.json beside them

Restores the dictionary and its run record (:func:`saejax.record.load_sae`) and its LM, reads
``n_contexts`` held-out contexts from the LM's token store, computes the feature
statistics, saves them, and writes the dashboard with the density, L0 and training-curve
plots.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging

from saejax import parallel
from saejax.analysis import dashboard, features
from saejax.config import ConfigError, MeshConfig
from saejax.record import load_sae


def member_dir(sae_workdir: str, member: str | None = None) -> str:
    """Where a run's own files (metrics.jsonl, eval.json) are: the workdir, or a sweep
    member's ``members/<name>``."""
    return os.path.join(sae_workdir, "members", member) if member else sae_workdir


def analyze_run(sae_workdir: str, out_dir: str | None = None, *, n_contexts: int = 256,
                split: str = "val", config: features.FeatureStatsConfig | None = None,
                step: int | None = None, title: str | None = None,
                member: str | None = None, progress=None) -> dict[str, Any]:
    """Feature statistics and the dashboard of an SAE run.

    Args:
      sae_workdir: the SAE training workdir.
      out_dir: where to write (default ``<sae_workdir>/analysis``).
      n_contexts: held-out contexts to analyse (capped by the split's size and rounded
        down to whole batches).
      split: token-store split to read.
      config: statistics settings (default :class:`~saejax.analysis.features.FeatureStatsConfig`).
      step: checkpoint step (default latest).
      title: dashboard title (default: the workdir's name, and the member's).
      member: one dictionary of a sweep's workdir (:mod:`saejax.sweep`).
      progress: called with a short message after each stage of the statistics (default:
        ``logging.info``).

    Returns:
      {"stats": features.json path, "dashboard": index.html path, "summary": the stats
      summary, "meta": the stats meta}.
    """
    from saejax.data.token_store import TokenStore
    from saejax.lm.restore import load_lm

    config = config or features.FeatureStatsConfig()
    out_dir = out_dir or os.path.join(member_dir(sae_workdir, member), "analysis")
    mesh = parallel.make_mesh(MeshConfig())
    sae, record = load_sae(sae_workdir, step=step, mesh=mesh, member=member)
    if record.lm is None or record.lm.token_store is None:
        raise ConfigError(f"SAE run {sae_workdir!r} was trained without a saejax LM: the "
                          f"feature report needs the LM's contexts")
    model, _ = load_lm(record.lm.dir, step=record.lm.step, mesh=mesh)  # the one it trained on
    store = TokenStore.open(record.lm.token_store)
    n = min(n_contexts, store.rows(split))
    tokens = store.read(split, 0, n)
    logging.info("analysing %s (step %s) on %d %s contexts", sae_workdir, record.step, n, split)
    stats = features.compute_feature_stats(model, sae, tokens, config,
                                           tokenizer=store.tokenizer(), mesh=mesh,
                                           progress=progress)
    stats["meta"].update(sae_workdir=os.path.abspath(sae_workdir), step=record.step,
                         lm_dir=record.lm.dir, member=member, split=split)
    stats_path = os.path.join(out_dir, "features.json")
    features.save_stats(stats, stats_path)
    metrics = os.path.join(member_dir(sae_workdir, member), "metrics.jsonl")
    name = os.path.basename(os.path.abspath(sae_workdir)) + (f" / {member}" if member else "")
    index = dashboard.write_dashboard(
        stats, os.path.join(out_dir, "dashboard"),
        metrics_path=metrics if os.path.isfile(metrics) else None,
        title=title or f"saejax features: {name}")
    return {"stats": stats_path, "dashboard": index, "summary": stats["summary"],
            "meta": stats["meta"], "out_dir": out_dir,
            "sae": {"architecture": sae.config.architecture, "n_features": sae.n_features,
                    "k": sae.config.k if sae.config.architecture != "relu" else None,
                    "dead_window": sae.config.dead_window}}


def _last_training_metrics(path: str) -> dict[str, Any]:
    """The last training record of a metrics.jsonl ({} if none)."""
    last: dict[str, Any] = {}
    if not os.path.isfile(path):
        return last
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if "train/frac_dead" in row:
                last = row
    return last


def write_summary(report: dict[str, Any], sae_workdir: str, member: str | None = None) -> str:
    """summary.md and summary.json in ``report["out_dir"]`` (an :func:`analyze_run` result):
    the run's last evaluation (its eval.json), dead features over the training window (its
    metrics.jsonl), what the analysed tokens showed, and where the dashboard is.

    The two meanings of "dead" are named apart: *dead* = silent over the training window
    (the paper's resampling definition, ``dead_window`` steps), *silent on the analysed
    tokens* = no activation on the tokens this report read.
    """
    files = member_dir(sae_workdir, member)
    out_dir = report["out_dir"]
    ev = {}
    if os.path.isfile(os.path.join(files, "eval.json")):
        with open(os.path.join(files, "eval.json")) as f:
            ev = json.load(f)
    train = _last_training_metrics(os.path.join(files, "metrics.jsonl"))
    meta, summ, sae = report["meta"], report["summary"], report["sae"]
    n_f = sae["n_features"]
    name = os.path.basename(os.path.abspath(sae_workdir)) + (f", member {member}" if member else "")
    lines = [f"# saejax analysis: {name}", "",
             f"Run: `{os.path.abspath(sae_workdir)}`" + (f" (member `{member}`)" if member else "") +
             f", step {meta['step']}  ",
             f"Dictionary: {n_f:,} features ({sae['architecture']}"
             + (f", k {sae['k']}" if sae["k"] else "") + f") on `{meta['site']}`", "",
             "| metric | value |", "|---|---|"]
    if ev:
        lines += [
            f"| fraction of loss recovered (zero ablation; evaluation at step {ev.get('step')}) | "
            f"{100 * ev['frac_loss_recovered']:.1f}% |",
            f"| fraction of loss recovered (mean ablation) | "
            f"{100 * ev['frac_loss_recovered_mean_ablation']:.1f}% |",
            f"| L0 (mean active features per held-out token) | {ev['l0']:.1f} |",
            f"| explained variance | {ev['explained_variance']:.3f} |",
            f"| silent on the {ev['eval_tokens']:,} evaluation tokens | {ev['dead_features']:,} "
            f"({100 * ev['dead_features'] / n_f:.1f}%) |"]
    if "train/frac_dead" in train:
        lines.append(f"| dead (silent for the last {sae['dead_window']} training steps) | "
                     f"{100 * train['train/frac_dead']:.1f}% |")
    lines += [
        f"| analysed tokens ({meta.get('split', 'val')} split) | {meta['n_tokens']:,} "
        f"({meta['n_contexts']:,} contexts of {meta['seq_len']}) |",
        f"| silent on the analysed tokens | {summ['dead']:,} ({100 * summ['dead'] / n_f:.1f}%) |",
        f"| dense on the analysed tokens (density > {meta['dense_threshold']:g}) | {summ['dense']:,} |",
        f"| L0 on the analysed tokens | {summ['mean_l0']:.1f} |", "",
        f"Dashboard: `{os.path.abspath(report['dashboard'])}`  ",
        f"Feature statistics: `{os.path.abspath(report['stats'])}`"]
    if not ev:
        lines.append("\nThe run has no evaluation yet (no eval.json): run it with eval.every "
                     "or to its end for loss recovered.")
    path = os.path.join(out_dir, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"eval": ev, "train": {k: v for k, v in train.items() if k.startswith("train/")},
                   "analysis": summ, "meta": meta}, f, indent=1)
    return path
