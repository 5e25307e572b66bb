"""A dictionary on your own activations: .npy files of rows [N, D], no saejax LM needed.

    python launch/train_sae.py --config=experiments/sae_arrays.py \
        --config.source.paths='acts/train_*.npy' --config.source.eval_paths=acts/val.npy \
        --config.sae.d_in=768 --config.workdir=runs/sae/mine

The files are written once into an activation store in ``<workdir>/activations`` (whole
chunks, checksummed, resumable; the remainder below one chunk is dropped and logged), then
read like a harvested store. Inputs are normalised to E||x|| = sqrt(d_in). Evaluation
reports MSE, explained variance, L0 and dead / dense features on ``source.eval_paths``
(in-sample rows of the training data when unset). Give ``--config.lm.dir`` and
``--config.lm.site`` if the activations came from a saejax LM to also get loss recovered.
TopK (k 32) with AuxK, 4,096 features, 2,000 steps of 4,096 rows.
"""

import ml_collections

from experiments import sae_paper


def get_config() -> ml_collections.ConfigDict:
    c = sae_paper.get_config("a1")
    c.sae.update(architecture="topk", k=32, aux_k=256, lr=3e-4, resample_steps=(),
                 dead_window=200)
    c.lm.dir = None  # the default; sae_paper sets the paper LM
    c.source = sae_paper.source("arrays")
    c.workdir = "runs/sae/arrays"
    c.batch_size = 4096
    c.num_steps = 2000
    c.eval.update(every=500, rows=65_536)
    c.log_every = 50
    c.checkpoint.every = 250
    return c
