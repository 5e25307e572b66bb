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

import dataclasses
import json
import os
from typing import Any

import numpy as np

from absl import logging

from saejax import parallel
from saejax.analysis import dashboard, features
from saejax.config import ConfigError, MeshConfig
from saejax.record import load_sae


def member_dir(sae_workdir: str, member: str | None = None) -> str:
    """Where a run's own files (metrics.jsonl, eval.json) are: the workdir, or a sweep
    member's ``members/<name>``."""
    return os.path.join(sae_workdir, "members", member) if member else sae_workdir


SPLITS_HELP = ('"val", "train", or "val+train" (the validation split first, then training '
               'contexts until the token budget is met)')


def read_contexts(store, split: str, n_contexts: int) -> tuple[np.ndarray, str]:
    """Up to ``n_contexts`` contexts of ``split`` (see :data:`SPLITS_HELP`) and a label
    naming where they came from, e.g. ``"val (116 contexts) + train (15,884 contexts)"``."""
    parts, label = [], []
    for name in (split.split("+") if split == "val+train" else [split]):
        take = min(n_contexts - sum(len(p) for p in parts), store.rows(name))
        if take > 0:
            parts.append(store.read(name, 0, take))
            label.append(f"{name} ({take:,} contexts)")
    if not parts:
        raise ConfigError(f"split {split!r}: the token store holds no contexts there")
    return np.concatenate(parts), " + ".join(label)


def analyze_run(sae_workdir: str, out_dir: str | None = None, *, n_contexts: int | None = None,
                n_tokens: int = 2_000_000, split: str = "val+train",
                config: features.FeatureStatsConfig | None = None,
                step: int | None = None, title: str | None = None,
                member: str | None = None, progress=None, neurons: bool = True,
                show_progress: bool = False) -> dict[str, Any]:
    """Unit statistics and the dashboard of an SAE run, with the site's neurons beside it.

    Args:
      sae_workdir: the SAE training workdir.
      out_dir: where to write (default ``<sae_workdir>/analysis``).
      n_contexts: contexts to analyse (default: enough for ``n_tokens``); capped by what
        the store holds and rounded down to whole batches.
      n_tokens: tokens to analyse when ``n_contexts`` is None.
      split: where the contexts come from (:data:`SPLITS_HELP`); shown in the report.
      config: statistics settings (default :class:`~saejax.analysis.features.FeatureStatsConfig`).
      step: checkpoint step (default latest).
      title: dashboard title (default: the workdir's name, and the member's).
      member: one dictionary of a sweep's workdir (:mod:`saejax.sweep`).
      progress: called with a short message after each stage of the statistics (default:
        ``logging.info``).
      neurons: also analyse the site's neurons (``neurons.json``, the dashboard's neuron
        pages), when the site has them (``mlp.post``).
      show_progress: draw progress bars (tokens/s, ETA) on stderr during the passes.

    Returns:
      {"stats": features.json path, "neurons": neurons.json path | None, "dashboard":
      index.html path, "summary", "meta", "neuron_summary" | None, "out_dir", "sae"}.
    """
    from saejax.analysis.neurons import has_neurons, neuron_bundle
    from saejax.data.token_store import TokenStore
    from saejax.lm.restore import load_lm

    config = config or features.FeatureStatsConfig()
    out_dir = out_dir or os.path.join(member_dir(sae_workdir, member), "analysis")
    mesh = parallel.make_mesh(MeshConfig())
    sae, record = load_sae(sae_workdir, step=step, mesh=mesh, member=member)
    if record.lm is None or record.lm.token_store is None:
        raise ConfigError(f"SAE run {sae_workdir!r} was trained without a saejax LM: the "
                          f"feature report needs the LM's contexts")
    if split not in ("val", "train", "val+train"):
        raise ConfigError(f"split: {split!r} is not one of {SPLITS_HELP}")
    model, _ = load_lm(record.lm.dir, step=record.lm.step, mesh=mesh)  # the one it trained on
    store = TokenStore.open(record.lm.token_store)
    seq_len = min(store.seq_len, model.cfg.max_len)
    n = n_contexts if n_contexts is not None else -(-n_tokens // seq_len)
    tokens, where = read_contexts(store, split, n)
    logging.info("analysing %s (step %s) on %s", sae_workdir, record.step, where)
    tokenizer = store.tokenizer()
    train_dead = _train_dead(os.path.join(member_dir(sae_workdir, member), "metrics.jsonl"),
                             sae.config.dead_window)
    extra = dict(sae_workdir=os.path.abspath(sae_workdir), step=record.step,
                 lm_dir=record.lm.dir, member=member, split=where, train_dead=train_dead)
    stats = features.compute_feature_stats(model, sae, tokens, config, tokenizer=tokenizer,
                                           mesh=mesh, progress=progress,
                                           show_progress=show_progress)
    stats["meta"].update(extra)
    stats_path = os.path.join(out_dir, "features.json")
    features.save_stats(stats, stats_path)
    _remember(sae_workdir, member, out_dir)
    neuron_stats, neuron_path = None, None
    if neurons and has_neurons(model, sae.site):
        neuron_stats = features.compute_feature_stats(
            # Neurons are no TopK dictionary: their pass picks its own form.
            model, neuron_bundle(model, sae.site), tokens,
            dataclasses.replace(config, pass_form="auto"), vocab=stats["vocab"],
            mesh=mesh, progress=progress, unit="neuron", show_progress=show_progress)
        neuron_stats["meta"].update(extra | {"train_dead": None})
        neuron_path = os.path.join(out_dir, "neurons.json")
        features.save_stats(neuron_stats, neuron_path)
    metrics = os.path.join(member_dir(sae_workdir, member), "metrics.jsonl")
    name = os.path.basename(os.path.abspath(sae_workdir)) + (f" / {member}" if member else "")
    index = dashboard.write_dashboard(
        stats, os.path.join(out_dir, "dashboard"),
        metrics_path=metrics if os.path.isfile(metrics) else None,
        title=title or f"saejax features: {name}", neurons=neuron_stats)
    return {"stats": stats_path, "neurons": neuron_path, "dashboard": index,
            "summary": stats["summary"], "meta": stats["meta"],
            "neuron_summary": neuron_stats["summary"] if neuron_stats else None,
            "out_dir": out_dir,
            "sae": {"architecture": sae.config.architecture, "n_features": sae.n_features,
                    "k": sae.config.k if sae.config.architecture != "relu" else None,
                    "dead_window": sae.config.dead_window}}


LATEST = "analysis_latest.json"  # in the run's (or member's) folder: where its report went


def _remember(sae_workdir: str, member: str | None, out_dir: str) -> None:
    """Records where the run's latest analysis is (for launch/search.py and split.py)."""
    path = os.path.join(member_dir(sae_workdir, member), LATEST)
    try:
        with open(path + ".tmp", "w") as f:
            json.dump({"out_dir": os.path.abspath(out_dir)}, f)
        os.replace(path + ".tmp", path)
    except OSError as e:  # a read-only run folder: the default location still works
        logging.warning("could not record the analysis location in %s: %s", path, e)


def latest_stats(sae_workdir: str, member: str | None = None) -> str | None:
    """The features.json of the run's latest analysis (wherever ``analyze_run`` wrote it;
    else ``<run>/analysis``), or None."""
    folder = member_dir(sae_workdir, member)
    candidates = []
    try:
        with open(os.path.join(folder, LATEST)) as f:
            candidates.append(os.path.join(json.load(f)["out_dir"], "features.json"))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    candidates.append(os.path.join(folder, "analysis", "features.json"))
    return next((c for c in candidates if os.path.isfile(c)), None)


def _train_dead(metrics_path: str, window: int) -> dict[str, Any] | None:
    """{"fraction", "window", "step"}: dead over the training window at the last record."""
    last = last_training_metrics(metrics_path)
    if "train/frac_dead" not in last:
        return None
    return {"fraction": float(last["train/frac_dead"]), "window": int(window),
            "step": last.get("step")}


def last_training_metrics(path: str) -> dict[str, Any]:
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


def _interp_lines(feat: dict | None, neur: dict | None) -> list[str]:
    """The interpretability table of the summary: features beside neurons."""
    if not feat:
        return []
    cols = [("features", feat)] + ([("neurons", neur)] if neur else [])

    def cell(d, key, pct=False):
        v = d.get(key)
        return "n/a" if v is None else (f"{100 * v:.0f}%" if pct else f"{v:.3f}")

    rows = [("units scored (enough firings in both halves)",
             lambda d: f"{d['n_scored']:,} of {d['n_units']:,}"),
            ("held-out AUROC, median [q25, q75]",
             lambda d: f"{cell(d, 'auroc_median')} [{cell(d, 'auroc_q25')}, "
                       f"{cell(d, 'auroc_q75')}]"),
            ("held-out F1, median", lambda d: cell(d, "f1_median")),
            ("precision (specificity), mean", lambda d: cell(d, "precision_mean")),
            ("recall (sensitivity), mean", lambda d: cell(d, "recall_mean")),
            ("AUROC >= 0.9", lambda d: cell(d, "frac_auroc_ge_0.9", pct=True))]
    out = ["Automatic interpretability (single-token explanations fitted on even contexts, "
           "scored on odd ones; saejax.analysis.interp documents the method and its limits):",
           "", "| | " + " | ".join(c for c, _ in cols) + " |",
           "|---|" + "---|" * len(cols)]
    out += [f"| {name} | " + " | ".join(fn(d) for _, d in cols) + " |" for name, fn in rows]
    return out + [""]


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
    train = last_training_metrics(os.path.join(files, "metrics.jsonl"))
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
        f"| analysed tokens | {meta['n_tokens']:,} ({meta.get('split', 'val')}, "
        f"{meta['seq_len']} tokens each) |",
        f"| silent on the analysed tokens | {summ['silent']:,} "
        f"({100 * summ['silent'] / n_f:.1f}%) |",
        f"| dense on the analysed tokens (density > {meta['dense_threshold']:g}) | "
        f"{summ['dense']:,} |",
        f"| L0 on the analysed tokens | {summ['mean_l0']:.1f} |",
        f"| analysis pass | {meta.get('pass_seconds', 0):.0f} s "
        f"({meta.get('tokens_per_second', 0):,} tokens/s) |", ""]
    lines += _interp_lines(summ.get("interp"), (report.get("neuron_summary") or {}).get("interp"))
    if meta.get("interp_skipped"):
        lines += [f"Automatic interpretability skipped: {meta['interp_skipped']}.", ""]
    lines += [
        f"Dashboard: `{os.path.abspath(report['dashboard'])}`  ",
        f"Feature statistics: `{os.path.abspath(report['stats'])}`"
        + (f"  \nNeuron statistics: `{os.path.abspath(report['neurons'])}`"
           if report.get("neurons") else "")]
    if not ev:
        lines.append("\nThe run has no evaluation yet (no eval.json): run it with eval.every "
                     "or to its end for loss recovered.")
    path = os.path.join(out_dir, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"eval": ev, "train": {k: v for k, v in train.items() if k.startswith("train/")},
                   "analysis": summ, "neurons": report.get("neuron_summary"), "meta": meta},
                  f, indent=1)
    return path
