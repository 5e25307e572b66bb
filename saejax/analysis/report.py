"""One call from a trained SAE run to its analysis report (``make demo``'s last stage).

    paths = analyze_run("runs/sae/tiny", "runs/sae/tiny/analysis", n_contexts=256)
    # paths["dashboard"] -> index.html; paths["stats"] -> features.json

Restores the dictionary and its run record (:func:`saejax.record.load_sae`) and its LM, reads
``n_contexts`` held-out contexts from the LM's token store, computes the feature
statistics, saves them, and writes the dashboard with the density, L0 and training-curve
plots.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from saejax import parallel
from saejax.analysis import dashboard, features
from saejax.config import ConfigError, MeshConfig
from saejax.record import load_sae


def analyze_run(sae_workdir: str, out_dir: str | None = None, *, n_contexts: int = 256,
                split: str = "val", config: features.FeatureStatsConfig | None = None,
                step: int | None = None, title: str | None = None) -> dict[str, Any]:
    """Feature statistics and the dashboard of an SAE run.

    Args:
      sae_workdir: the SAE training workdir.
      out_dir: where to write (default ``<sae_workdir>/analysis``).
      n_contexts: held-out contexts to analyse (capped by the split's size and rounded
        down to whole batches).
      split: token-store split to read.
      config: statistics settings (default :class:`~saejax.analysis.features.FeatureStatsConfig`).
      step: checkpoint step (default latest).
      title: dashboard title (default: the workdir's name).

    Returns:
      {"stats": features.json path, "dashboard": index.html path, "summary": the stats
      summary, "meta": the stats meta}.
    """
    from saejax.data.token_store import TokenStore
    from saejax.lm.restore import load_lm

    config = config or features.FeatureStatsConfig()
    out_dir = out_dir or os.path.join(sae_workdir, "analysis")
    mesh = parallel.make_mesh(MeshConfig())
    sae, record = load_sae(sae_workdir, step=step, mesh=mesh)
    if record.lm is None or record.lm.token_store is None:
        raise ConfigError(f"SAE run {sae_workdir!r} was trained without a saejax LM: the "
                          f"feature report needs the LM's contexts")
    model, _ = load_lm(record.lm.dir, step=record.lm.step, mesh=mesh)  # the one it trained on
    store = TokenStore.open(record.lm.token_store)
    n = min(n_contexts, store.rows(split))
    tokens = store.read(split, 0, n)
    logging.info("analysing %s (step %s) on %d %s contexts", sae_workdir, record.step, n, split)
    stats = features.compute_feature_stats(model, sae, tokens, config,
                                           tokenizer=store.tokenizer(), mesh=mesh)
    stats["meta"].update(sae_workdir=os.path.abspath(sae_workdir), step=record.step,
                         lm_dir=record.lm.dir)
    stats_path = os.path.join(out_dir, "features.json")
    features.save_stats(stats, stats_path)
    metrics = os.path.join(sae_workdir, "metrics.jsonl")
    index = dashboard.write_dashboard(
        stats, os.path.join(out_dir, "dashboard"),
        metrics_path=metrics if os.path.isfile(metrics) else None,
        title=title or f"saejax features: {os.path.basename(os.path.abspath(sae_workdir))}")
    return {"stats": stats_path, "dashboard": index, "summary": stats["summary"],
            "meta": stats["meta"]}
