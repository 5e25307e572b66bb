"""A tiny LM that trains in seconds: tests, CI and smoke runs on any token store.

    python launch/build_corpus.py --config=experiments/corpus_stdlib.py \
        --config.tokenizer.kind=byte --config.corpus.out_dir=runs/corpus/stdlib_byte
    python launch/train_lm.py --config=experiments/lm_tiny.py \
        --config.store_dir=runs/corpus/stdlib_byte

Expect the loss to fall from ln(vocab) (~5.5 for bytes) toward the unigram baseline within
the 40 steps (a few seconds); it is a plumbing check, not a model.
"""

import ml_collections

from experiments import lm_paper


def get_config() -> ml_collections.ConfigDict:
    c = lm_paper.get_config()
    c.model.update(max_len=32, d_model=32, n_heads=2, d_mlp=64)
    c.optim.update(lr=1e-2, warmup_steps=5)
    c.loader.update(batch_size=16, window_chunks=2)
    c.workdir = "runs/lm/tiny"
    c.num_steps = 40
    c.log_every = 5
    c.eval_every = 20
    c.eval_batches = 2
    c.checkpoint_every = 10
    c.keep_checkpoints = 2
    return c
