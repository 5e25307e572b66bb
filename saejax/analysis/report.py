"""One call from a trained SAE run to its analysis report (``make demo``'s last stage).

    paths = analyze_run("runs/sae/tiny", "runs/sae/tiny/analysis", n_contexts=256)
    # paths["dashboard"] -> index.html; paths["stats"] -> features.json

Restores the dictionary (:func:`saejax.analysis.bundle.load_sae_run`) and its LM, reads
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
from saejax.analysis.bundle import load_sae_run
from saejax.config import MeshConfig


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
    sae, extra = load_sae_run(sae_workdir, step=step, mesh=mesh)
    model, _ = load_lm(extra["lm_dir"], mesh=mesh)
    store = TokenStore.open(extra["store_dir"])
    n = min(n_contexts, store.rows(split))
    tokens = store.read(split, 0, n)
    logging.info("analysing %s (step %s) on %d %s contexts", sae_workdir, extra["step"], n, split)
    stats = features.compute_feature_stats(model, sae, tokens, config,
                                           tokenizer=store.tokenizer(), mesh=mesh)
    stats["meta"].update(sae_workdir=os.path.abspath(sae_workdir), step=extra["step"],
                         lm_dir=extra["lm_dir"])
    stats_path = os.path.join(out_dir, "features.json")
    features.save_stats(stats, stats_path)
    index = dashboard.write_dashboard(
        stats, os.path.join(out_dir, "dashboard"), metrics_path=extra.get("metrics_path"),
        title=title or f"saejax features: {os.path.basename(os.path.abspath(sae_workdir))}")
    return {"stats": stats_path, "dashboard": index, "summary": stats["summary"],
            "meta": stats["meta"]}
