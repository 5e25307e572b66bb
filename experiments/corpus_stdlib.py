"""The embedded default corpus: this Python's standard library source -> BPE-4096 tokens.

    python launch/build_corpus.py --config=experiments/corpus_stdlib.py

Expect ~12 MB of source (about 730 files without tests), ~3.5M tokens at ~3.6 bytes/token,
~26k train and ~1k validation contexts of 128 tokens, built in about 10 s on 2 CPU cores.
Nothing is downloaded: every machine with Python has this text.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.corpus = ml_collections.ConfigDict(dict(
        source="stdlib", path=ml_collections.FieldReference(None, field_type=str),
        text_field="text", seq_len=128, val_fraction=0.05, seed=0,
        out_dir="runs/corpus/stdlib", chunk_mb=16.0, overwrite=False))
    c.tokenizer = ml_collections.ConfigDict(dict(
        kind="bpe", vocab_size=4096, path=ml_collections.FieldReference(None, field_type=str),
        eot_token="<|endoftext|>"))
    return c
