"""A dictionary on an imported Hugging Face model (GPT-2, GPT-NeoX / Pythia or Llama), read
from a local ``save_pretrained`` folder (nothing is downloaded).

    python launch/build_corpus.py --config=experiments/corpus_text.py \
        --config.corpus.path=/path/to/texts --config.corpus.out_dir=runs/corpus/pythia \
        --config.tokenizer.kind=file --config.tokenizer.path=/path/to/pythia-70m/tokenizer.json
    python launch/train_sae.py --config=experiments/sae_hf.py:mlp \
        --config.lm.dir=/path/to/pythia-70m --config.lm.store_dir=runs/corpus/pythia \
        --config.lm.site=blocks.3.mlp.post --config.sae.d_in=2048

Argument "mlp" (default; site ``blocks.0.mlp.post``: the MLP neurons, or for a SwiGLU
model ``act(gate) * up``, the down projection's input; set ``sae.d_in`` to the model's
``intermediate_size``) or "resid" (``blocks.0.resid.post``; ``sae.d_in`` = ``hidden_size``).
The token store must be tokenized with the model's own tokenizer (``tokenizer.json``);
ids beyond the model's vocabulary are refused, and a wrong ``sae.d_in`` is refused naming
the site's width. TopK (k = 32) with AuxK, 8,192 features, 20,000 steps of 4,096 activations
through the shuffle buffer; evaluation splices the dictionary into the imported model on
the store's validation split. To harvest first instead: ``launch/harvest.py
--config=experiments/harvest.py --config.lm_dir=... --config.store_dir=... --config.site=...``.
"""

import ml_collections

from experiments import sae_paper

SITES = {"mlp": "blocks.0.mlp.post", "resid": "blocks.0.resid.post"}


def get_config(site: str = "mlp") -> ml_collections.ConfigDict:
    if site not in SITES:
        raise ValueError(f"unknown site argument {site!r}; choose one of {sorted(SITES)}")
    c = sae_paper.get_config("a1")
    c.sae.update(d_in=2048 if site == "mlp" else 512, n_features=8192, architecture="topk",
                 dead_strategy="none", k=32, aux_k=256, lr=2e-4, resample_steps=(),
                 geometric_median_iters=50)
    c.lm.dir = "runs/hf/model"
    c.lm.site = SITES[site]
    c.lm.store_dir = "runs/corpus/hf"
    c.workdir = f"runs/sae/hf_{site}"
    c.batch_size = 4096
    c.num_steps = 20_000
    c.source.update(lm_batch_size=32, buffer_rows=4096 * 32, norm_sample_contexts=256)
    c.eval.update(every=2500, contexts=512, batch_contexts=32)
    c.log_every = 50
    c.checkpoint.every = 2500
    return c
