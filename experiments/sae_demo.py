"""The demo dictionary: 4,096 features (paper A/1 shape) on the demo LM's 512 MLP neurons,
sized for a 2-core CPU budget (~10 minutes).

    python launch/train_sae.py --config=experiments/sae_demo.py --config.lm_dir=runs/demo/lm

Inputs normalised to E||x|| = sqrt(512); batch 4,096; neuron resampling on a schedule
scaled to the run (every 250 steps up to step 1,000, dead = silent for 200 steps, loss
on 131,072 sampled inputs). Argument "topk" (default: TopK, k = 24) or "relu" (the
paper's ReLU + L1). See benchmarks/RESULTS.md for what it reaches.
"""

import ml_collections

from experiments import sae_paper


def get_config(arch: str = "topk") -> ml_collections.ConfigDict:
    c = sae_paper.get_config("a1")
    c.sae.update(architecture=arch, k=24, l1_coefficient=1e-2, lr=1e-3,
                 resample_steps=(250, 500, 750, 1000), dead_window=200,
                 resample_sample_size=131_072, resample_chunk_size=8192,
                 geometric_median_iters=50)
    c.lm_dir = "runs/demo/lm"
    c.workdir = f"runs/demo/sae_{arch}"
    c.batch_size = 4096
    c.num_steps = 1500
    c.lm_batch_size = 32
    c.buffer_rows = 4096 * 32
    c.norm_sample_contexts = 256
    c.eval_every = 500
    c.eval_contexts = 256
    c.eval_batch_contexts = 32
    c.log_every = 25
    c.checkpoint_every = 250
    return c
