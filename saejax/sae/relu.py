"""The paper's architecture: ReLU features with an L1 penalty (Bricken et al. 2023).

With ``SAEConfig.decoder = "free"`` it is Anthropic's April 2024 update instead: the
decoder is unconstrained and the penalty weights each feature by its decoder norm,
lambda sum_i f_i ||d_i|| (as dictionary_learning's ``StandardTrainerAprilUpdate`` and
SAELens' standard SAE encode it; the update's own text was not available, see
FAMILIES.md section 5). Use it with ``init = "tied"``, ``init_decoder_norm = 0.1``,
``sparsity_warmup_fraction = 0.05``, ``lr_decay_fraction = 0.2`` and ``dead_strategy =
"none"`` for the update's recipe (experiments/sae_families.py).

Legend: B batch, F features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from saejax.sae.registry import Architecture, register_architecture


def relu_activation(pre: Float[Array, "B F"], side, ctx) -> tuple[Float[Array, "B F"], dict]:
    del side, ctx
    return jax.nn.relu(pre), {}


def l1_penalty(pre, f: Float[Array, "B F"], side, ctx) -> Float[Array, " B"]:
    """lambda * sum_features |f| per input (f >= 0 after the ReLU, so |f| = f); with a free
    decoder lambda * sum_features f ||d_i||. lambda includes the warm-up factor."""
    del pre
    w = f * side["dec_norm"] if "dec_norm" in side else f
    return (ctx.config.l1_coefficient * ctx.sparsity) * jnp.sum(jnp.abs(w), axis=-1)


RELU = register_architecture(Architecture(name="relu", activation=relu_activation, penalty=l1_penalty,
                                          feature_major=True, uses_l1=True))
