"""Trains a sparse autoencoder on activations (LM on the fly, a store, or .npy files); resumable.

    python launch/train_sae.py --config=experiments/sae_paper.py:a1 \
        --config.lm.dir=runs/lm/paper --config.workdir=runs/sae/a1

    # your own activations, no LM (experiments/sae_arrays.py):
    python launch/train_sae.py --config=experiments/sae_arrays.py \
        --config.source.paths='acts/*.npy' --config.sae.d_in=768 --config.workdir=runs/sae/mine

    # a sweep: many dictionaries from one activation pass (experiments/sae_sweep.py)
    python launch/train_sae.py --config=experiments/sae_sweep.py:demo --config.lm.dir=runs/demo/lm

Re-running the same command resumes exactly from the latest checkpoint. SIGTERM/SIGINT
save a checkpoint before exiting; a non-finite loss stops with the last good one intact.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ml_collections import config_flags  # noqa: E402

from saejax import cli, parallel  # noqa: E402
from saejax.config import from_config  # noqa: E402
from saejax.metrics import quiet_orbax_logs  # noqa: E402
from saejax.train_config import SAETrainConfig, SweepConfig  # noqa: E402

_ALLOW = cli.define_allow_changes()
_CONFIG = config_flags.DEFINE_config_file("config", "experiments/sae_tiny.py", "SAE config")


def main(argv):
    del argv
    quiet_orbax_logs()
    if "members" in _CONFIG.value:  # a sweep config
        cfg = from_config(SweepConfig, _CONFIG.value)
        parallel.initialize_distributed(cfg.distributed)
        from saejax.sweep import train_sweep

        summary = train_sweep(cfg, allow_changes=tuple(_ALLOW.value))
        shown = {k: v for k, v in summary.items() if k not in ("bundles", "members")}
        shown["members"] = {name: m["eval"] for name, m in summary["members"].items()}
        print(json.dumps(shown, indent=1, default=str))
        print(f"train_sae: sweep table in {os.path.join(cfg.workdir, 'sweep.md')}", file=sys.stderr)
    else:
        cfg = from_config(SAETrainConfig, _CONFIG.value)
        parallel.initialize_distributed(cfg.distributed)
        from saejax.train import train

        summary = train(cfg, allow_changes=tuple(_ALLOW.value))
        shown = {k: v for k, v in summary.items() if k not in ("train", "bundle", "train_density")}
        print(json.dumps(shown, indent=1, default=str))
    if summary["interrupted"]:
        print(f"train_sae: interrupted by {summary['interrupted']} at step {summary['step']}; "
              f"checkpoint saved; re-run the same command to resume", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run("train_sae", main)
