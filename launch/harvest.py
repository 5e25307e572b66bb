"""Harvests LM activations into a tensorstore activation store (resumable; multi-process).

    python launch/harvest.py --config=experiments/harvest.py \
        --config.lm_dir=runs/lm/paper --config.out_dir=runs/acts/paper

Re-running the same command after a kill resumes at the first uncommitted chunk.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from saejax import parallel  # noqa: E402
from saejax.config import ConfigError, from_config  # noqa: E402
from saejax.metrics import quiet_orbax_logs  # noqa: E402
from saejax.train_config import HarvestConfig  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/harvest.py", "harvest config")


@parallel.exit_hard_on_error("harvest")
def main(argv):
    del argv
    quiet_orbax_logs()
    try:
        cfg = from_config(HarvestConfig, _CONFIG.value)
    except ConfigError as e:
        sys.exit(f"harvest: {e}")
    parallel.initialize_distributed(cfg.distributed)
    from saejax.harvest import run_harvest
    from saejax.data.token_store import StoreError

    try:
        out = run_harvest(cfg)
    except (ConfigError, StoreError, FileNotFoundError) as e:
        parallel.exit_with_error("harvest", e)
    if out.get("stats"):
        print(json.dumps({"rows": out["stats"]["rows"], "mean_norm": out["stats"]["mean_norm"],
                          "norm_scale": out["stats"]["norm_scale"], **out["summary"]}, indent=1))


if __name__ == "__main__":
    app.run(main)
