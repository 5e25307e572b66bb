"""Exports a trained dictionary to another tool's format (SAELens).

    python launch/export.py --workdir=runs/sae/tiny --format=saelens --out=exports/tiny
    python launch/export.py --workdir=runs/demo/sweep --member=topk_k24 --out=exports/k24

Writes a SAELens SAE folder (cfg.json, sae_weights.safetensors, sparsity.safetensors) that
``sae_lens.SAE.load_from_disk`` reads (:mod:`saejax.interop.saelens`: the input
normalisation folded into the weights, BatchTopK and Matryoshka as JumpReLU, the site as its
TransformerLens hook name). The run's latest checkpoint is exported, or ``--step``.

Metadata: ``model_name`` defaults to the LM directory's name and ``context_size`` to the
positions per context the LM ran (min of the token store's seq_len and the LM's max_len);
``--model_name`` / ``--context_size`` override them. ``--density=train`` (the default)
writes sparsity.safetensors from the run's training density over its last evaluation
window (``<workdir>/train_feature_density.npy``, the counterpart of SAELens' sparsity over
its last feature-sampling window; skipped with a warning when the run has none);
``--density=none`` writes none; ``--density=file.npy`` takes [F] firing fractions.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from saejax import cli  # noqa: E402

flags.DEFINE_string("workdir", None, "SAE training workdir (launch/train_sae.py's "
                    "--config.workdir)", required=True)
flags.DEFINE_integer("step", None, "checkpoint step (default latest)")
flags.DEFINE_string("member", None, "the dictionary of a sweep's workdir to export")
flags.DEFINE_enum("format", "saelens", ["saelens"], "export format")
flags.DEFINE_string("out", None, "output folder", required=True)
flags.DEFINE_string("model_name", None, "metadata.model_name (default: the LM directory's name)")
flags.DEFINE_integer("context_size", None, "metadata.context_size (default: the positions per "
                     "context the LM ran)")
flags.DEFINE_string("density", "train", "'train' (the run's last evaluation window), 'none', "
                    "or a .npy of [F] firing fractions")
flags.DEFINE_bool("overwrite", False, "replace an export already in --out")

FLAGS = flags.FLAGS
DENSITY_FILE = "train_feature_density.npy"  # written by saejax.train at each evaluation
WARNINGS: list[str] = []


def lm_facts(record) -> tuple[str | None, int | None]:
    """(model name, positions per context) of the run's LM, from metadata only."""
    from saejax.checkpoint import Checkpointer
    from saejax.data.token_store import read_metadata
    from saejax.lm.restore import checkpoint_dir

    if record.lm is None:
        return None, None
    lm_dir = record.lm.dir
    name = os.path.basename(os.path.normpath(lm_dir))
    lengths = []
    try:
        hf_config = os.path.join(lm_dir, "config.json")
        if os.path.isfile(hf_config):
            with open(hf_config) as f:
                lengths.append(json.load(f).get("n_positions"))
        else:
            ckpt = Checkpointer(checkpoint_dir(lm_dir), async_save=False, read_only=True)
            try:
                lengths.append(ckpt.restore_metadata(record.lm.step)["model"]["max_len"])
            finally:
                ckpt.close()
        store = read_metadata(record.lm.token_store) if record.lm.token_store else None
        lengths.append(store.get("seq_len") if store else None)
    except (OSError, ValueError, KeyError) as e:
        WARNINGS.append(f"could not read the LM's context length ({e}); metadata.context_size "
                        f"is null (pass --context_size)")
        return name, None
    known = [int(n) for n in lengths if n]
    return name, min(known) if known else None


def read_density(workdir: str, n_features: int):
    import numpy as np

    if FLAGS.density == "none":
        return None
    path = os.path.join(workdir, DENSITY_FILE) if FLAGS.density == "train" else FLAGS.density
    if not os.path.isfile(path):
        if FLAGS.density == "train" and not FLAGS["density"].present:
            WARNINGS.append(f"{workdir!r} has no {DENSITY_FILE} (no evaluation ran); wrote no "
                            f"sparsity.safetensors")
            return None
        raise cli.UsageError(f"--density: no file {path!r}")
    try:
        density = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise cli.UsageError(f"--density: {path!r} is not a .npy array ({e})") from None
    if not isinstance(density, np.ndarray):  # an .npz archive
        density.close()
        raise cli.UsageError(f"--density: {path!r} is not a .npy array (an .npz archive)")
    if density.shape != (n_features,):
        raise cli.UsageError(f"--density: {path!r} has shape {density.shape}, the dictionary has "
                             f"{n_features} features")
    return density


def main(argv):
    del argv
    from saejax.interop.saelens import export_saelens
    from saejax.metrics import quiet_orbax_logs
    from saejax.record import load_sae

    quiet_orbax_logs()
    if FLAGS.context_size is not None and FLAGS.context_size < 1:
        raise cli.UsageError(f"--context_size={FLAGS.context_size} must be >= 1")
    try:
        bundle, record = load_sae(FLAGS.workdir, step=FLAGS.step, member=FLAGS.member)
    except FileNotFoundError as e:
        raise cli.UsageError(f"--workdir: {e}") from None
    # A sweep member's files (its training density) live in <workdir>/members/<name>.
    files = os.path.join(FLAGS.workdir, "members", FLAGS.member) if FLAGS.member else FLAGS.workdir
    density = read_density(files, bundle.n_features)
    if density is not None and FLAGS.density == "train" and FLAGS.step is not None:
        WARNINGS.append(f"the training density is the run's last evaluation window, not "
                        f"necessarily step {FLAGS.step}'s; --density=none omits it")
    model_name, context_size = lm_facts(record)
    try:
        out = export_saelens(FLAGS.out, bundle, model_name=FLAGS.model_name or model_name,
                             context_size=FLAGS.context_size or context_size, density=density,
                             overwrite=FLAGS.overwrite)
    except FileExistsError as e:
        raise cli.UsageError(f"--out: {e}") from None
    summary = {"out": out, "format": FLAGS.format, "step": record.step,
               "architecture": bundle.config.architecture, "sparsity": density is not None}
    if FLAGS.member:
        summary["member"] = FLAGS.member
    print(json.dumps(summary))
    for line in WARNINGS:  # after the export: an error stays the only line on stderr
        print(f"export: warning: {line}", file=sys.stderr)


if __name__ == "__main__":
    cli.run("export", main)
