"""The paper's subject model (1 layer, d_model 128, 4 heads, 512 ReLU) on the stdlib corpus.

    python launch/build_corpus.py --config=experiments/corpus_stdlib.py
    python launch/train_lm.py --config=experiments/lm_paper.py

Expect a validation loss far below the unigram baseline: measured 2026-11-25, val 2.61
nats/token at step 800 (6.5M tokens, batch 64 x 127) against the unigram baseline 6.46 (BPE-4096
stdlib corpus); 30 min wall on a 2-core machine shared with two other jobs (load 7-10, 3.5-6k
tokens/s); an idle 2-core machine is several times faster. Checkpoints, TensorBoard events and
metrics.jsonl go to runs/lm/paper; re-running the same command resumes (or returns at once when
finished). For a longer run raise --config.num_steps (the LR schedule spans num_steps).
"""

import ml_collections

from experiments import common


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=0,  # taken from the token store
        max_len=128, d_model=128, n_heads=4,
        d_head=ml_collections.FieldReference(None, field_type=int),
        d_mlp=512, n_layers=1, activation="relu", layer_norm_eps=1e-5,
        tie_embeddings=False, compute_dtype="float32", init_std=0.02))
    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-3, warmup_steps=100, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.1, grad_clip=1.0))
    c.loader = ml_collections.ConfigDict(dict(
        batch_size=64, seed=0, shuffle=True,
        num_epochs=ml_collections.FieldReference(None, field_type=int),
        window_chunks=4, prefetch=2))
    c.mesh = common.mesh()
    c.distributed = common.distributed()
    c.store_dir = "runs/corpus/stdlib"
    c.workdir = "runs/lm/paper"
    c.num_steps = 800
    c.seed = 0
    c.log_every = 10
    c.eval_every = 200
    c.eval_batches = 0  # the whole validation split
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.progress_bar = True
    return c
