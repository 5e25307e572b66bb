"""Feature splitting across two runs on the same site: which features of the smaller
dictionary reappear in the larger one as families of more specific features.

    python launch/split.py --small=runs/sae/f512 --large=runs/demo/sae --out=split.md
    python launch/split.py --small=runs/demo/sweep --small_member=topk_k24 \
        --large=runs/sae/f16k --min_cosine=0.6 --rows=30

Matches every large-dictionary feature to its nearest small-dictionary feature by decoder
cosine (:mod:`saejax.analysis.splitting`) and prints a Markdown table of the small
features that split most (``--out`` also writes it, ``--html`` as HTML), then a one-line
summary (split / carried over / unmatched / orphans). Labels are the features' top tokens
when the runs have been analysed (``launch/analyze.py``).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from saejax import cli  # noqa: E402

flags.DEFINE_string("small", None, "SAE workdir of the smaller dictionary", required=True)
flags.DEFINE_string("large", None, "SAE workdir of the larger dictionary", required=True)
flags.DEFINE_string("small_member", None, "sweep member of --small")
flags.DEFINE_string("large_member", None, "sweep member of --large")
flags.DEFINE_float("min_cosine", 0.5, "a large feature whose best cosine is below this has "
                   "no parent")
flags.DEFINE_integer("rows", 50, "small features shown (most children first)")
flags.DEFINE_string("out", None, "also write the table to this file (.md, or .html)")
flags.DEFINE_bool("json", False, "print the full match as JSON instead of the table")

FLAGS = flags.FLAGS


def _labels(workdir: str, member: str | None) -> dict[int, str]:
    """Each feature's top token, from the run's analysis when there is one."""
    from saejax.analysis import features
    from saejax.analysis.report import latest_stats

    path = latest_stats(workdir, member)
    if path is None:
        return {}
    stats = features.load_stats(path)
    vocab = stats.get("vocab") or []
    out = {}
    for f in stats["features"]:
        if f["top"] and vocab:
            ex = f["top"][0]
            out[f["id"]] = repr(vocab[ex["tokens"][ex["center"]]])[1:-1]
    return out


def main(argv):
    del argv
    from saejax.metrics import quiet_orbax_logs

    quiet_orbax_logs()
    if not 0.0 <= FLAGS.min_cosine <= 1.0:
        raise cli.UsageError(f"--min_cosine={FLAGS.min_cosine} must be in [0, 1]")
    if FLAGS.rows < 1:
        raise cli.UsageError(f"--rows={FLAGS.rows} must be >= 1")
    for name in ("small", "large"):
        if not os.path.isdir(getattr(FLAGS, name)):
            raise cli.UsageError(f"--{name}: no directory {getattr(FLAGS, name)!r}")
    from saejax.analysis.splitting import match_features, splitting_table
    from saejax.record import load_sae

    try:
        small, _ = load_sae(FLAGS.small, member=FLAGS.small_member)
        large, _ = load_sae(FLAGS.large, member=FLAGS.large_member)
    except FileNotFoundError as e:
        raise cli.UsageError(str(e)) from None
    if small.site != large.site or small.config.d_in != large.config.d_in:
        raise cli.UsageError(f"--small reads {small.site!r} (width {small.config.d_in}) and "
                             f"--large {large.site!r} (width {large.config.d_in}): splitting "
                             "compares dictionaries of one site")
    match = match_features(small.directions(), large.directions(), min_cosine=FLAGS.min_cosine)
    if FLAGS.json:
        print(json.dumps(match))
        return
    names = {"small_name": f"small ({small.n_features:,})",
             "large_name": f"large ({large.n_features:,})",
             "labels": {"small": _labels(FLAGS.small, FLAGS.small_member),
                        "large": _labels(FLAGS.large, FLAGS.large_member)}}
    table = splitting_table(match, max_rows=FLAGS.rows, **names)
    print(table)
    s = match["summary"]
    print(f"{s['split']} small features split, {s['carried']} carried over, {s['unmatched']} "
          f"unmatched; {s['orphans']} large features have no parent (cosine < "
          f"{FLAGS.min_cosine})")
    if FLAGS.out:
        html = FLAGS.out.endswith(".html")
        with open(FLAGS.out, "w") as f:
            f.write(splitting_table(match, fmt="html" if html else "markdown",
                                    max_rows=FLAGS.rows, **names))


if __name__ == "__main__":
    cli.run("split", main)
