"""A tiny SAE run for tests and smoke checks, on the tiny LM (experiments/lm_tiny.py).

    python launch/train_sae.py --config=experiments/sae_tiny.py --config.lm.dir=runs/lm/tiny

60 steps of 256 activations (d_in 64 -> 256 features), resampling at steps 20 and 40,
in seconds on a CPU. A plumbing check, not a dictionary worth reading.
"""

import ml_collections

from experiments import sae_paper


def get_config() -> ml_collections.ConfigDict:
    c = sae_paper.get_config("a0")
    c.sae.update(d_in=64, n_features=256, l1_coefficient=1e-3, lr=1e-3, resample_steps=(20, 40),
                 dead_window=10, resample_sample_size=1024, resample_chunk_size=256,
                 geometric_median_iters=20)
    c.lm.dir = "runs/lm/tiny"
    c.workdir = "runs/sae/tiny"
    c.batch_size = 256
    c.num_steps = 60
    c.source.update(lm_batch_size=16, buffer_rows=2048, norm_sample_contexts=32, window_chunks=2)
    c.eval.update(every=30, contexts=16, batch_contexts=8, rows=1024)
    c.log_every = 10
    c.checkpoint.update(every=10, keep=2)
    return c
