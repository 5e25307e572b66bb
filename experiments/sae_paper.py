"""The paper's dictionaries on the 512-neuron MLP (Bricken et al. 2023, runs A/0 .. A/5).

    python launch/train_sae.py --config=experiments/sae_paper.py:a1 \
        --config.lm.dir=runs/lm/paper --config.workdir=runs/sae/a1

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


def source(kind: str = "lm") -> ml_collections.ConfigDict:
    """The source section: LM activations on the fly (8,192 x 64 rows of shuffle buffer).

    Kind-specific paths stay None unless their kind is chosen (``source.store_dir`` for
    "store", ``source.paths`` for "arrays").
    """
    opt_str = lambda: ml_collections.FieldReference(None, field_type=str)  # noqa: E731
    return ml_collections.ConfigDict(dict(
        kind=kind, normalize=True, seed=0, shuffle=True, lm_batch_size=64,
        buffer_rows=8192 * 64, norm_sample_contexts=256, store_dir=opt_str(), paths=opt_str(),
        eval_store_dir=opt_str(), eval_paths=opt_str(), window_chunks=4, prefetch=2,
        chunk_mb=16.0))


def get_config(run: str = "a1") -> ml_collections.ConfigDict:
    if run not in SIZES:
        raise ValueError(f"unknown paper run {run!r}; choose one of {sorted(SIZES)}")
    c = ml_collections.ConfigDict()
    c.sae = ml_collections.ConfigDict(dict(
        d_in=512, n_features=SIZES[run], architecture="relu", dead_strategy="resample",
        l1_coefficient=4e-3, k=32, lr=1e-4, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
        precision="f32", resample_steps=(25_000, 50_000, 75_000, 100_000), dead_window=12_500,
        resample_sample_size=819_200, resample_chunk_size=8_192, resample_encoder_scale=0.2,
        dense_threshold=0.01, aux_k=0, aux_coefficient=1 / 32, aux_candidates=1024,
        geometric_median_iters=100, seed=0,
        # The newer families and the schedules (saejax/sae/config.py documents each field).
        l0_coefficient=1e-3, target_l0=0.0, jumprelu_bandwidth=0.001, jumprelu_init_threshold=0.001,
        jumprelu_threshold_param="raw", threshold_ema=0.01, matryoshka_groups=(), decoder="unit",
        init="default", init_decoder_norm=1.0, total_steps=0, lr_warmup_steps=0,
        lr_decay_fraction=0.0, sparsity_warmup_fraction=0.0, k_anneal_start=0,
        k_anneal_fraction=0.0, grad_clip=0.0))
    c.lm = ml_collections.ConfigDict(dict(
        dir=ml_collections.FieldReference("runs/lm/paper", field_type=str), site="mlp.post",
        store_dir=ml_collections.FieldReference(None, field_type=str)))
    c.source = source()
    c.eval = ml_collections.ConfigDict(dict(every=5000, contexts=512, batch_contexts=64,
                                            rows=65_536))
    c.checkpoint = ml_collections.ConfigDict(dict(every=5000, keep=3, async_save=True))
    c.workdir = f"runs/sae/{run}"
    c.batch_size = 8192
    c.num_steps = 125_000
    c.log_every = 100
    c.progress_bar = True
    c.mesh = common.mesh()
    c.distributed = common.distributed()
    return c
