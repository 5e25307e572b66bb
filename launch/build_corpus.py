"""Builds a token store from a corpus config (resumable; refuses to clobber).

    python launch/build_corpus.py --config=experiments/corpus_stdlib.py \
        [--config.corpus.seq_len=256] [--config.tokenizer.kind=byte]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ml_collections import config_flags  # noqa: E402

from saejax import cli  # noqa: E402
from saejax.config import from_config  # noqa: E402
from saejax.data.corpus import CorpusJobConfig, build_token_store  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/corpus_stdlib.py",
                                          "corpus config file (experiments/corpus_*.py)")


def main(argv):
    del argv
    store = build_token_store(from_config(CorpusJobConfig, _CONFIG.value))
    meta = store.metadata
    print(store)
    print(json.dumps({"report": meta["report"],
                      "splits": {s: {k: v for k, v in i.items() if k != "chunks"}
                                 for s, i in meta["splits"].items()},
                      "tokenizer": meta["tokenizer"], "build_seconds": meta["build_seconds"]},
                     indent=1))


if __name__ == "__main__":
    cli.run("build_corpus", main)
