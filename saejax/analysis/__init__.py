"""Analysis of a trained dictionary: feature statistics, logit effects, ablation, plots,
a static HTML dashboard, steering (pinned-feature sampling) and feature splitting.

``report.analyze_run(sae_workdir)`` does all of it for a training run;
``restore.restore_run(sae_workdir)`` gives the dictionary, its LM and tokenizer for your own
analysis. Every entry point takes the LM (a ``Transformer`` or its ``(graphdef, params)``)
and an :class:`~saejax.sae.bundle.SAEBundle` (parameters, config, input normaliser, site),
whose ``encode`` / ``decode`` / ``splice`` / ``directions`` work in the LM's units. Results
are plain JSON-serialisable structures.

    bundle, record = load_sae("runs/demo/sae")
    stats = features.compute_feature_stats(model, bundle, tokens, FeatureStatsConfig(),
                                           tokenizer=store.tokenizer())
    features.save_stats(stats, "runs/x/analysis/features.json")
    dashboard.write_dashboard(stats, "runs/x/analysis/dashboard", metrics_path=...)

A SAELens SAE folder reads into the same kind of bundle: ``bundle, info = load_saelens(path)``.
"""

from saejax.interop.saelens import load_saelens
from saejax.record import load_sae
from saejax.sae.bundle import SAEBundle, load_bundle, save_bundle

__all__ = ["SAEBundle", "load_bundle", "load_sae", "load_saelens", "save_bundle"]
