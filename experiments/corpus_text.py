"""Your own text: a directory (recursive), a file or a glob -> BPE tokens.

    python launch/build_corpus.py --config=experiments/corpus_text.py \
        --config.corpus.path=/path/to/texts --config.corpus.out_dir=runs/corpus/mine

For JSON lines set --config.corpus.source=jsonl (and --config.corpus.text_field=...).
To reuse a tokenizer: --config.tokenizer.kind=file --config.tokenizer.path=tokenizer.json.
Binary and unreadable files are skipped and counted; invalid UTF-8 is replaced and counted
(see the "report" section of the store's metadata.json).
"""

import ml_collections

from experiments import corpus_stdlib


def get_config() -> ml_collections.ConfigDict:
    c = corpus_stdlib.get_config()
    c.corpus.source = "text"
    c.corpus.out_dir = "runs/corpus/text"
    return c
