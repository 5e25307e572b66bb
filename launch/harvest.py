"""Harvests LM activations into a tensorstore activation store (resumable; multi-process).

    python launch/harvest.py --config=experiments/harvest.py \
        --config.lm_dir=runs/lm/paper --config.out_dir=runs/acts/paper

Re-running the same command after a kill resumes at the first uncommitted chunk.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ml_collections import config_flags  # noqa: E402

from saejax import cli, parallel  # noqa: E402
from saejax.config import from_config  # noqa: E402
from saejax.metrics import quiet_orbax_logs  # noqa: E402
from saejax.train_config import HarvestConfig  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/harvest.py", "harvest config")


def main(argv):
    del argv
    quiet_orbax_logs()
    cfg = from_config(HarvestConfig, _CONFIG.value)
    parallel.initialize_distributed(cfg.distributed)
    from saejax.harvest import run_harvest

    out = run_harvest(cfg)
    if out.get("stats"):
        print(json.dumps({"rows": out["stats"]["rows"], "mean_norm": out["stats"]["mean_norm"],
                          "norm_scale": out["stats"]["norm_scale"], **out["summary"]}, indent=1))


if __name__ == "__main__":
    cli.run("harvest", main)
