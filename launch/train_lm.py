"""Trains (or resumes) the transformer LM on a token store.

    python launch/train_lm.py --config=experiments/lm_paper.py [--config.num_steps=2000]

Re-running the same command resumes from the latest checkpoint in ``config.workdir``
(parameters, optimizer state and loader position). SIGTERM/SIGINT save a checkpoint first.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from saejax import parallel  # noqa: E402
from saejax.config import ConfigError, from_config  # noqa: E402
from saejax.lm.config import LMTrainConfig  # noqa: E402
from saejax.lm.train import train  # noqa: E402
from saejax.loop import NonFiniteError  # noqa: E402
from saejax.metrics import quiet_orbax_logs  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/lm_paper.py",
                                          "LM training config file (experiments/lm_*.py)")
flags.DEFINE_integer("stop_at", None, "stop (checkpointing) after this step; the LR schedule "
                     "still spans config.num_steps")


@parallel.exit_hard_on_error("train_lm")
def main(argv):
    del argv
    quiet_orbax_logs()
    try:
        config = from_config(LMTrainConfig, _CONFIG.value)
    except ConfigError as e:
        sys.exit(f"train_lm: {e}")
    parallel.initialize_distributed(config.distributed)
    try:
        summary = train(config, stop_at=flags.FLAGS.stop_at)
    except (NonFiniteError, ConfigError, FileNotFoundError, ValueError) as e:
        parallel.exit_with_error("train_lm", e)
    print(json.dumps(summary))
    if summary["interrupted"]:
        print(f"train_lm: interrupted by {summary['interrupted']} at step {summary['step']}; "
              f"checkpoint saved; re-run the same command to resume", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
