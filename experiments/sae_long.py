"""The longer CPU dictionary (about one hour on a 2-core machine): 4,096 features at L0 20.

    python launch/train_sae.py --config=experiments/sae_long.py --config.lm.dir=runs/lm/paper

Aims at the issue's longer target: >= 90% loss recovered at L0 <= 20 with <= 5% dead
features. TopK with k = 20 fixes L0; 3,000 steps of 4,096 activations (12.3M tokens, about
3.5 passes over the default corpus's training split, activations produced on the fly
through the device shuffle buffer); Adam lr 3e-4; neuron resampling every 500 steps up to
2,500 with dead = silent for 200 steps = 819,200 inputs (the paper's resampling sample
size) and the loss computed on 262,144 sampled inputs; AuxK (Gao et al.) with aux_k 256.

Measured 2026-11-25 (benchmarks/RESULTS.md), 2-core VM. With AuxK: 59 min, **96.9% loss
recovered at L0 20, 13.5% dead** at step 3,000. Without AuxK (``--config.sae.aux_k=0``):
56 min, 96.4% at L0 20, 30.1% dead. AuxK halves the dead fraction, but the <= 5% target
is still missed: dead features come back after each resample and drift to 7-15% within
500 steps.
With BatchTopK (argument "batchtopk"): at lr 3e-4 (2026-12-01) 96.5% at L0 19.7, 0.0% dead,
29 min on this project's faster 2-core VM; at lr 1e-3 (2026-12-03, its setting now)
**97.9% at L0 18.8, 0.8% dead**, 47 min on a slow 2-core VM shared with other jobs: the
issue's >= 97% at L0 <= 20 with <= 2% dead.
Argument "relu" trains the paper's ReLU + L1 (lambda 1e-2) on the same schedule instead;
"batchtopk" trains BatchTopK (k = 20 on average, AuxK 256) at lr 1e-3 decayed linearly to
0 over the last 20% of steps.
benchmarks/RESULTS.md records what a run reached and how long it took.
"""

import ml_collections

from experiments import sae_paper


def get_config(arch: str = "topk") -> ml_collections.ConfigDict:
    c = sae_paper.get_config("a1")
    c.sae.update(architecture=arch, k=20, l1_coefficient=1e-2, lr=3e-4,
                 resample_steps=(500, 1000, 1500, 2000, 2500), dead_window=200,
                 resample_sample_size=262_144, resample_chunk_size=8192,
                 geometric_median_iters=100, aux_k=256 if arch in ("topk", "batchtopk") else 0)
    if arch == "batchtopk":
        # Bussmann et al.'s BatchTopK with the April update's learning-rate decay (last 20%);
        # lr 1e-3 measured 97.9% against 96.5% at 3e-4 (lr 2e-3: 93.9% at step 1,000, 83.2% at
        # step 2,000; stopped).
        c.sae.update(lr=1e-3, lr_decay_fraction=0.2)
    c.lm.dir = "runs/lm/paper"
    c.workdir = f"runs/sae/long_{arch}"
    c.batch_size = 4096
    c.num_steps = 3000
    c.source.update(lm_batch_size=32, buffer_rows=4096 * 32, norm_sample_contexts=256)
    c.eval.update(every=1000, contexts=1024, batch_contexts=32)
    c.log_every = 50
    c.checkpoint.every = 250
    return c
