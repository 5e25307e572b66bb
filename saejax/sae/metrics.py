"""Dictionary-recovery metrics against known ground-truth directions.

Legend: F learned features, G true features, D input width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from saejax.sae.model import unit_rows


@jax.jit
def max_cosine(learned: Float[Array, "F D"], true: Float[Array, "G D"]) -> Float[Array, " G"]:
    """For each true direction, the best cosine similarity with any learned direction."""
    sims = jnp.dot(unit_rows(true), unit_rows(learned).T, precision=jax.lax.Precision.HIGHEST)
    return jnp.max(sims, axis=-1)


def mmcs(learned: Float[Array, "F D"], true: Float[Array, "G D"]) -> float:
    """Mean max cosine similarity: mean over true features of their best learned match."""
    return float(jnp.mean(max_cosine(learned, true)))


def fraction_recovered(learned: Float[Array, "F D"], true: Float[Array, "G D"],
                       threshold: float = 0.9) -> float:
    """Fraction of true features with some learned direction at cosine >= ``threshold``."""
    return float(jnp.mean(max_cosine(learned, true) >= threshold))
