"""`make demo`: the whole pipeline on the embedded default corpus, then the report.

    python launch/demo.py [--runs=runs] [--sae_config=experiments/sae_demo.py]

Stages (each resumes, or is skipped when already complete, on a re-run):
  1. corpus: this Python's stdlib source -> BPE-4096 token store (runs/demo/corpus);
  2. lm: the paper's 1-layer model (d_model 128, 512 ReLU neurons), 600 steps (runs/demo/lm);
  3. sae: a 4,096-feature dictionary on its MLP neurons with resampling (runs/demo/sae);
  4. report: the analysis launch/analyze.py runs for any run (saejax.analysis.report):
     statistics of the 4,096 features and of the 512 MLP neurons over 2M tokens
     (--report_tokens), ablation effects for the 1,024 densest features
     (--report_ablation_features=0 for all), automatic interpretability scores of features
     beside neurons, plots and the HTML dashboard (runs/demo/report/summary.md), and
     runs/demo/summary.md with loss recovered, L0, dead/dense counts and stage times.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402

from saejax import cli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RUNS = flags.DEFINE_string("runs", "runs", "where runs/demo/... are written")
_LM_STEPS = flags.DEFINE_integer(
    "lm_steps", 600, "LM training steps (experiments/lm_paper.py runs 800; the demo stops at "
    "600 to fit its 20-minute budget)")
_SAE_STEPS = flags.DEFINE_integer("sae_steps", None, "override the SAE's training steps")
_TOKENS = flags.DEFINE_integer(
    "report_tokens", 2_000_000, "tokens the report analyses (the validation split first, then "
    "training contexts), for the features and again for the MLP neurons")
_ALLOW = cli.define_allow_changes()
_ABLATE = flags.DEFINE_integer(
    "report_ablation_features", 1024, "features (densest first) whose ablation effect on "
    "log-likelihood the report measures; each costs 4 LM forwards (0 = all alive features)")


def _load(name: str, *args):
    import importlib

    return importlib.import_module(f"experiments.{name}").get_config(*args)


def main(argv):
    del argv
    sys.path.insert(0, ROOT)
    from saejax.metrics import quiet_orbax_logs

    quiet_orbax_logs()
    from saejax.analysis.report import last_training_metrics, analyze_run, write_summary
    from saejax.config import from_config
    from saejax.data.corpus import CorpusJobConfig
    from saejax.data.corpus import build_token_store
    from saejax.lm.config import LMTrainConfig
    from saejax.lm.train import train as train_lm
    from saejax.train import train as train_sae
    from saejax.train_config import SAETrainConfig

    demo = os.path.join(_RUNS.value, "demo")
    times: dict[str, float] = {}

    def stage(name):
        logging.info("=== demo stage: %s ===", name)
        print(f"\n=== demo: {name} ===", flush=True)
        return time.perf_counter()

    t = stage("corpus")
    cd = _load("corpus_stdlib")
    cd.corpus.out_dir = os.path.join(demo, "corpus")
    store = build_token_store(from_config(CorpusJobConfig, cd))
    times["corpus"] = time.perf_counter() - t

    t = stage("lm")
    cd = _load("lm_paper")
    cd.store_dir = store.directory
    cd.workdir = os.path.join(demo, "lm")
    if _LM_STEPS.value:
        cd.num_steps = _LM_STEPS.value
    lm = train_lm(from_config(LMTrainConfig, cd), allow_changes=tuple(_ALLOW.value))
    times["lm"] = time.perf_counter() - t

    t = stage("sae")
    cd = _load("sae_demo")
    cd.lm.dir = os.path.join(demo, "lm")
    cd.workdir = os.path.join(demo, "sae")
    if _SAE_STEPS.value:
        cd.num_steps = _SAE_STEPS.value
    sae_cfg = from_config(SAETrainConfig, cd)
    sae = train_sae(sae_cfg, allow_changes=tuple(_ALLOW.value))
    times["sae"] = time.perf_counter() - t

    t = stage("report")
    from saejax.analysis.features import FeatureStatsConfig

    report = analyze_run(sae_cfg.workdir, os.path.join(demo, "report"),
                         n_tokens=_TOKENS.value, title="saejax demo: 4,096 features",
                         config=FeatureStatsConfig(ablation_max_features=_ABLATE.value or None),
                         show_progress=True)
    write_summary(report, sae_cfg.workdir)  # report/summary.md, as launch/analyze.py writes it
    times["report"] = time.perf_counter() - t

    e = sae["eval"]
    # A re-run whose SAE stage was already complete logs no training window: read the last
    # one the run wrote.
    train_last = sae["train"] or {k.removeprefix("train/"): v for k, v in last_training_metrics(
        os.path.join(sae_cfg.workdir, "metrics.jsonl")).items() if k.startswith("train/")}
    lines = [
        "# saejax demo", "",
        f"Corpus: {store}  ",
        f"LM: val {lm['val_loss']:.3f} nats/token (unigram baseline {lm['unigram_val']:.3f}), "
        f"step {lm['step']}  ",
        f"SAE: {sae_cfg.sae.n_features} features ({sae_cfg.sae.architecture}), "
        f"{sae['step']} steps x {sae_cfg.batch_size} activations, input normalised to "
        f"E||x|| = sqrt({sae_cfg.sae.d_in})", "",
        "| metric | value |", "|---|---|",
        f"| fraction of loss recovered (zero ablation) | {100 * e['frac_loss_recovered']:.1f}% |",
        f"| fraction of loss recovered (mean ablation) | "
        f"{100 * e['frac_loss_recovered_mean_ablation']:.1f}% |",
        f"| L0 (mean active features per token) | {e['l0']:.1f} |",
        f"| dead features (silent for the last {sae_cfg.sae.dead_window} training steps = "
        f"{sae_cfg.sae.dead_window * sae_cfg.batch_size:,} inputs) | "
        + (f"{100 * train_last['frac_dead']:.1f}% |" if "frac_dead" in train_last else "n/a |"),
        f"| silent on the {e['eval_tokens']:,} held-out evaluation tokens | "
        f"{e['dead_features']} ({100 * e['dead_features'] / sae_cfg.sae.n_features:.1f}%) |",
        f"| dense features (density > 1%) | {e['dense_features']} |",
        f"| explained variance | {e['explained_variance']:.3f} |",
        f"| KL(clean ‖ spliced) per token | {e['kl_sae']:.4f} |",
        f"| losses: clean / spliced / zero-ablated | {e['loss_clean']:.3f} / {e['loss_sae']:.3f} "
        f"/ {e['loss_zero_ablated']:.3f} |", "",
        "| stage | seconds |", "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in times.items()],
        f"| total | {sum(times.values()):.0f} |", "",
        f"Ablation effects were measured for the {_ABLATE.value or 'all alive'} densest "
        f"features (--report_ablation_features).  ",
        f"Dashboard: {os.path.abspath(report['dashboard'])}  ",
        f"Feature statistics: {os.path.abspath(report['stats'])}  ",
        f"Analysis of {report['meta']['n_tokens']:,} tokens ({report['meta']['split']}): "
        f"{os.path.abspath(os.path.join(report['out_dir'], 'summary.md'))}",
    ]
    summary_path = os.path.join(demo, "summary.md")
    with open(summary_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(demo, "summary.json"), "w") as f:
        json.dump({"eval": e, "train": train_last, "times": times,
                   "lm": {k: lm[k] for k in ("val_loss", "unigram_val", "step")}}, f, indent=1)
    print("\n".join(lines))
    print(f"\nsaejax demo done in {sum(times.values()) / 60:.1f} min. Open the report:\n"
          f"  {os.path.abspath(report['dashboard'])}\n  {os.path.abspath(summary_path)}")


if __name__ == "__main__":
    cli.run("demo", main)
