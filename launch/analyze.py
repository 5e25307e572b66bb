"""Analyses a trained SAE run (or one member of a sweep) into a report.

    python launch/analyze.py --workdir=runs/sae/tiny
    python launch/analyze.py --workdir=runs/demo/sweep --member=topk_k24 --tokens=500000 \
        --ablation_features=256 --out=reports/k24

Writes to ``--out`` (default ``<workdir>/analysis``, or ``<workdir>/members/<name>/analysis``):
``summary.md`` and ``summary.json`` (the run's last evaluation, dead features over the
training window, what the analysed tokens showed, and the automatic interpretability
scores of features beside neurons), ``features.json`` and ``neurons.json`` (per-unit
statistics: density, activation histograms, top and interval-sampled contexts, logit and
ablation effects, explanations and scores, neighbours) and ``dashboard/index.html`` with
its plots (neuron pages under ``dashboard/neurons/``). The run's record names its LM and
token store; ``--tokens`` (2M by default) are read from the validation split first, then
from training contexts (``--split``), in one streaming pass per unit kind with progress
bars. The latest checkpoint is analysed, or ``--step``.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from saejax import cli  # noqa: E402

flags.DEFINE_string("workdir", None, "SAE training workdir (launch/train_sae.py's "
                    "--config.workdir)", required=True)
flags.DEFINE_string("member", None, "the dictionary of a sweep's workdir to analyse")
flags.DEFINE_integer("step", None, "checkpoint step (default latest)")
flags.DEFINE_string("out", None, "output folder (default <workdir>/analysis)")
flags.DEFINE_integer("tokens", 2_000_000, "tokens to analyse (capped by what the store holds)")
flags.DEFINE_integer("contexts", None, "contexts to analyse instead of --tokens")
flags.DEFINE_string("split", "val+train", "where the contexts come from: val, train, or "
                    "val+train (the validation split first, then training contexts)")
flags.DEFINE_bool("neurons", True, "also analyse the site's neurons (an MLP site), for the "
                  "side-by-side comparison")
flags.DEFINE_integer("ablation_features", 1024, "features (densest first) whose ablation "
                     "effect on log-likelihood is measured; each costs 4 LM forwards "
                     "(0 = every alive feature)")
flags.DEFINE_integer("top_k", None, "top-activating contexts kept per feature (default: "
                     "the statistics' default)")
flags.DEFINE_string("title", None, "dashboard title (default: the run's name)")
flags.DEFINE_enum("pass_form", "auto", ["auto", "sparse", "dense"], "the feature pass's form: "
                  "sparse reads each token's active features as events (a TopK dictionary's "
                  "k; any other's up to a cap probed on the first batch; same statistics); "
                  "auto picks it for TopK with k <= F/8 only")

FLAGS = flags.FLAGS


def check_split(workdir: str, member: str | None, step: int | None, split: str) -> None:
    """A usage error naming the store's splits if ``split`` is not one (before any work)."""
    from saejax.data.token_store import TokenStore
    from saejax.record import load_record

    try:
        record = load_record(workdir, step=step, member=member)
    except FileNotFoundError as e:
        raise cli.UsageError(f"--workdir: {e}") from None
    if record.lm is None or record.lm.token_store is None:
        return  # analyze_run says what is missing
    if split not in ("val", "train", "val+train"):
        raise cli.UsageError(f"--split={split!r} must be val, train or val+train")
    try:
        for name in split.split("+"):
            TokenStore.open(record.lm.token_store).rows(name)
    except KeyError as e:
        raise cli.UsageError(f"--split: {e.args[0]}") from None


def main(argv):
    del argv
    import dataclasses

    from absl import logging

    from saejax.analysis.features import FeatureStatsConfig
    from saejax.analysis.report import analyze_run, write_summary
    from saejax.metrics import quiet_orbax_logs

    quiet_orbax_logs()
    if FLAGS.contexts is not None and FLAGS.contexts < 1:
        raise cli.UsageError(f"--contexts={FLAGS.contexts} must be >= 1")
    if FLAGS.tokens < 1:
        raise cli.UsageError(f"--tokens={FLAGS.tokens} must be >= 1")
    if FLAGS.ablation_features < 0:
        raise cli.UsageError(f"--ablation_features={FLAGS.ablation_features} must be >= 0")
    if not os.path.isdir(FLAGS.workdir):
        raise cli.UsageError(f"--workdir: no directory {FLAGS.workdir!r}")
    config = FeatureStatsConfig(ablation_max_features=FLAGS.ablation_features or None,
                                pass_form=FLAGS.pass_form)
    if FLAGS.top_k is not None:
        config = dataclasses.replace(config, top_k=FLAGS.top_k)
    check_split(FLAGS.workdir, FLAGS.member, FLAGS.step, FLAGS.split)
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"analyze: {msg} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    logging.info("analysing %s%s", FLAGS.workdir, f" member {FLAGS.member}" if FLAGS.member else "")
    try:
        report = analyze_run(FLAGS.workdir, FLAGS.out, n_contexts=FLAGS.contexts,
                             n_tokens=FLAGS.tokens, split=FLAGS.split, config=config,
                             step=FLAGS.step, title=FLAGS.title, member=FLAGS.member,
                             progress=progress, neurons=FLAGS.neurons, show_progress=True)
    except FileNotFoundError as e:
        raise cli.UsageError(f"--workdir: {e}") from None
    summary = write_summary(report, FLAGS.workdir, FLAGS.member)
    with open(summary) as f:
        print(f.read())
    print(f"Open: {os.path.abspath(report['dashboard'])}")


if __name__ == "__main__":
    cli.run("analyze", main)
