"""The paper's architecture: ReLU features with an L1 penalty (Bricken et al. 2023).

Legend: B batch, F features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from saejax.sae.registry import Architecture, register_architecture


def relu_activation(pre: Float[Array, "B F"], config) -> Float[Array, "B F"]:
    del config
    return jax.nn.relu(pre)


def l1_penalty(f: Float[Array, "B F"], config) -> Float[Array, " B"]:
    """lambda * sum_features |f| per input (f >= 0 after the ReLU, so |f| = f)."""
    return config.l1_coefficient * jnp.sum(jnp.abs(f), axis=-1)


RELU = register_architecture(Architecture(name="relu", activation=relu_activation, penalty=l1_penalty,
                                           feature_major=True))
