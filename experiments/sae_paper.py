"""The paper's dictionaries on the 512-neuron MLP (Bricken et al. 2023, runs A/0 .. A/5).

    python launch/train_sae.py --config=experiments/sae_paper.py:a1 \
        --config.lm_dir=runs/lm/paper --config.workdir=runs/sae/a1

Argument: a0 (512 features), a1 (4,096), a2 (16,384), a3 (32,768), a4 (65,536),
a5 (131,072). Batch 8,192 activations, Adam lr 1e-4, neuron resampling at 25k/50k/75k/100k
steps (dead = silent for 12,500 steps, loss on 819,200 sampled inputs), inputs normalised
to E||x|| = sqrt(512). The paper reports 79% loss recovered for A/1 and 94.5% for A/5
(on a model trained for 100B Pile tokens; saejax's default LM is far smaller). These runs
are sized for accelerators: at A/1 one step is ~86 GFLOP.
"""

import ml_collections

from experiments import common

SIZES = {"a0": 512, "a1": 4096, "a2": 16_384, "a3": 32_768, "a4": 65_536, "a5": 131_072}


def get_config(run: str = "a1") -> ml_collections.ConfigDict:
    if run not in SIZES:
        raise ValueError(f"unknown paper run {run!r}; choose one of {sorted(SIZES)}")
    c = ml_collections.ConfigDict()
    c.sae = ml_collections.ConfigDict(dict(
        d_in=512, n_features=SIZES[run], architecture="relu", dead_strategy="resample",
        l1_coefficient=4e-3, k=32, lr=1e-4, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
        precision="f32", resample_steps=(25_000, 50_000, 75_000, 100_000), dead_window=12_500,
        resample_sample_size=819_200, resample_chunk_size=8_192, resample_encoder_scale=0.2,
        dense_threshold=0.01, geometric_median_iters=100, seed=0))
    c.lm_dir = "runs/lm/paper"
    c.site = "mlp.post"
    c.source = "onthefly"
    c.activation_store = ml_collections.FieldReference(None, field_type=str)
    c.workdir = f"runs/sae/{run}"
    c.batch_size = 8192
    c.num_steps = 125_000
    c.lm_batch_size = 64
    c.buffer_rows = 8192 * 64
    c.normalize = True
    c.norm_sample_contexts = 256
    c.loader = ml_collections.ConfigDict(dict(batch_size=64, seed=0, shuffle=True,
                                              num_epochs=ml_collections.FieldReference(None, field_type=int),
                                              window_chunks=4, prefetch=2))
    c.eval_every = 5000
    c.eval_contexts = 512
    c.eval_batch_contexts = 64
    c.log_every = 100
    c.checkpoint_every = 5000
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.progress_bar = True
    c.mesh = common.mesh()
    c.distributed = common.distributed()
    return c
