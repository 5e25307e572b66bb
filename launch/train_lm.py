"""Trains (or resumes) the transformer LM on a token store.

    python launch/train_lm.py --config=experiments/lm_paper.py [--config.num_steps=2000]

Re-running the same command resumes from the latest checkpoint in ``config.workdir``
(parameters, optimizer state and loader position). SIGTERM/SIGINT save a checkpoint first.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from saejax import cli, parallel  # noqa: E402
from saejax.config import from_config  # noqa: E402
from saejax.lm.config import LMTrainConfig  # noqa: E402
from saejax.metrics import quiet_orbax_logs  # noqa: E402

_ALLOW = cli.define_allow_changes()
_CONFIG = config_flags.DEFINE_config_file("config", "experiments/lm_paper.py",
                                          "LM training config file (experiments/lm_*.py)")
flags.DEFINE_integer("stop_at", None, "stop (checkpointing) after this step; the LR schedule "
                     "still spans config.num_steps")


def main(argv):
    del argv
    quiet_orbax_logs()
    config = from_config(LMTrainConfig, _CONFIG.value)
    parallel.initialize_distributed(config.distributed)
    from saejax.lm.train import train

    summary = train(config, allow_changes=tuple(_ALLOW.value), stop_at=flags.FLAGS.stop_at)
    print(json.dumps(summary))
    if summary["interrupted"]:
        print(f"train_lm: interrupted by {summary['interrupted']} at step {summary['step']}; "
              f"checkpoint saved; re-run the same command to resume", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run("train_lm", main)
