"""Concept search: rank a trained run's features by how selectively they fire on examples.

    python launch/search.py --workdir=runs/demo/sae \
        --example="for i in range(10):" --example="for key in table:" \
        --counter="while True:" --top=10

Prints one row per feature: score, the fraction of examples and counter-examples it fires
on, its baseline (how often it fires on any text of that length, from the run's analysis),
and the token where it fired most in each example; ``--json`` prints the list instead.
When the run has been analysed (``launch/analyze.py`` or ``make demo``, wherever the report
went; ``--stats`` names another ``features.json``) the densities and activation scales come
from there, and a last line gives the dashboard's page address for any feature. Method:
:mod:`saejax.analysis.search`.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from saejax import cli  # noqa: E402

flags.DEFINE_string("workdir", None, "SAE training workdir", required=True)
flags.DEFINE_string("member", None, "the dictionary of a sweep's workdir")
flags.DEFINE_integer("step", None, "checkpoint step (default latest)")
flags.DEFINE_multi_string("example", [], "a text showing the concept (repeat the flag)")
flags.DEFINE_multi_string("counter", [], "a text without the concept (repeat the flag)")
flags.DEFINE_string("stats", None, "features.json of the run's analysis (default: the run's "
                    "latest analysis, when there is one)")
flags.DEFINE_integer("top", 10, "features to print")
flags.DEFINE_bool("json", False, "print JSON instead of a table")

FLAGS = flags.FLAGS


def _show(s) -> str:
    if s is None:
        return "-"
    return repr(s)[1:-1] if isinstance(s, str) else str(s)


def main(argv):
    del argv
    from saejax.metrics import quiet_orbax_logs

    quiet_orbax_logs()
    if not FLAGS.example:
        raise cli.UsageError("--example: give at least one example text")
    if FLAGS.top < 1:
        raise cli.UsageError(f"--top={FLAGS.top} must be >= 1")
    if not os.path.isdir(FLAGS.workdir):
        raise cli.UsageError(f"--workdir: no directory {FLAGS.workdir!r}")
    from saejax.analysis import features
    from saejax.analysis.report import latest_stats
    from saejax.analysis.restore import restore_run
    from saejax.analysis.search import concept_search

    stats_path = FLAGS.stats or latest_stats(FLAGS.workdir, FLAGS.member)
    stats = None
    if stats_path and os.path.isfile(stats_path):
        stats = features.load_stats(stats_path)
    elif FLAGS.stats:
        raise cli.UsageError(f"--stats: no file {FLAGS.stats!r}")
    try:
        run = restore_run(FLAGS.workdir, member=FLAGS.member, step=FLAGS.step)
    except FileNotFoundError as e:
        raise cli.UsageError(f"--workdir: {e}") from None
    hits = concept_search(run.lm, run.sae, FLAGS.example, FLAGS.counter, tokenizer=run.tokenizer,
                          stats=stats, top=FLAGS.top, mesh=run.mesh)
    if FLAGS.json:
        print(json.dumps(hits, indent=1))
        return
    page = os.path.join(os.path.dirname(stats_path or ""), "dashboard", "feature.html")
    print(f"{'feature':>8} {'score':>6} {'examples':>8} {'counter':>7} {'baseline':>8}  "
          "fires most at")
    for h in hits:
        print(f"{h['id']:>8} {h['score']:>6.3f} {h['hit_examples']:>8.2f} "
              f"{h['hit_counter']:>7.2f} {h['baseline']:>8.3f}  "
              + ", ".join(_show(w) for w in h["where"]))
    if stats is None:
        print("(no analysis found: baselines are 0; run launch/analyze.py first for "
              "density-aware scores)")
    elif os.path.isfile(page):
        print(f"Pages: file://{os.path.abspath(page)}?id=<feature>")


if __name__ == "__main__":
    cli.run("search", main)
