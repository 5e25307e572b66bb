"""The transformer language model: model, activation sites and interventions, training,
generation, Hugging Face import (GPT-2 onto the model; GPT-NeoX / Pythia and Llama onto its
rotary sibling in ``families.py``), GPT-2 export and restore-for-analysis.

    from saejax.lm import ModelConfig, build_model, sites
    model = build_model(ModelConfig(vocab_size=4096))
    out = model(tokens, sites=("mlp.post",), interventions=(sites.Ablate.zero("mlp.post"),))
"""

from saejax.lm.config import LMTrainConfig, ModelConfig, OptimConfig
from saejax.lm.model import (
    Output,
    Transformer,
    abstract_model,
    build_model,
    forward,
    init_params,
    param_shardings,
    split_params,
)
from saejax.lm.sites import SITE_KINDS, Ablate, Add, Clamp, Replace, site_name

__all__ = [
    "LMTrainConfig", "ModelConfig", "OptimConfig", "Output", "Transformer", "abstract_model",
    "build_model", "forward", "init_params", "param_shardings", "split_params", "SITE_KINDS", "Ablate", "Add",
    "Clamp", "Replace", "site_name",
]
