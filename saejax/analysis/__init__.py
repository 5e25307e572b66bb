"""Analysis of a trained dictionary: feature statistics, logit effects, ablation, plots,
a static HTML dashboard, steering (pinned-feature sampling) and feature splitting.

``report.analyze_run(sae_workdir)`` does all of it for a training run. Every entry point
takes the LM (a ``Transformer`` or its ``(graphdef, params)``) and an
:class:`~saejax.analysis.bundle.SAEBundle` (SAE parameters, config, site and the input
normalisation constant ``norm_scale``). Results are plain JSON-serialisable structures.

    stats = features.compute_feature_stats(model, sae, tokens, FeatureStatsConfig(),
                                           tokenizer=store.tokenizer())
    features.save_stats(stats, "runs/x/analysis/features.json")
    dashboard.write_dashboard(stats, "runs/x/analysis/dashboard", metrics_path=...)
"""

from saejax.analysis.bundle import SAEBundle, load_sae, load_sae_run, save_sae

__all__ = ["SAEBundle", "load_sae", "load_sae_run", "save_sae"]
