"""The one definition of a dead feature, shared by the step, AuxK and resampling, and of
the firing counts it is kept from."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def firing_counts(f: Float[Array, "B F"]) -> Int[Array, " F"]:
    """Inputs on which each feature fired (f != 0; features are non-negative, so f > 0).

    sum(|sign(f)|) in f32 (exact below 2^24 rows) is one fused read of f on XLA:CPU;
    sum(f > 0) first wrote a [B, F] f32 mask (19 vs 6 ms at B = F = 4,096). A NaN feature
    (a non-finite batch, which the step refuses anyway) counts as silent.
    """
    counts = jnp.sum(jnp.abs(jnp.sign(f)), axis=0)
    return jnp.where(jnp.isnan(counts), 0.0, counts).astype(jnp.int32)


def dead_mask(stale: Int[Array, " F"], config) -> Bool[Array, " F"]:
    """Dead = silent for at least ``config.dead_window`` steps.

    ``stale`` is ``step - last_fired`` per feature (``TrainState.last_fired``). The step's
    ``frac_dead``, AuxK's candidates and resampling's targets all call this.
    """
    return stale >= config.dead_window
