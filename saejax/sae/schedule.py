"""Training schedules of every architecture: learning rate, sparsity coefficient, k.

All are functions of the number of completed steps t (``TrainState.step`` before the
update, 0 for the first step) and of ``SAEConfig.total_steps`` T, computed inside the
jitted step, so a resumed run continues them exactly. The rules, and whose they are:

- learning rate: x min(1, (t + 1) / W) during a linear warm-up of W = ``lr_warmup_steps``
  steps (the first step already moves, like SAELens' LinearLR from 1/W; dictionary_learning
  starts at 0), and x min(1, (T - t) / (f T)) over the last fraction f =
  ``lr_decay_fraction`` (Anthropic's April 2024 update: 20%; dictionary_learning's
  ``get_lr_schedule``). Applied as a factor on Adam's update, so the optimizer state is the
  same with or without a schedule.
- sparsity coefficient (L1, L0): x min(1, t / (f T)) over the first fraction f =
  ``sparsity_warmup_fraction`` (April update: 5%; dictionary_learning's rule).
- k: from ``k_anneal_start`` k0 down to k over the first fraction f =
  ``k_anneal_fraction``: k_t = round(k0 (1 - p) + k p), p = t / (f T) (sparsify's
  ``get_current_k``). Until p reaches 1 the step runs a top-k of k0 and masks down to k_t;
  afterwards a second compiled step with the plain top-k of k takes over
  (:func:`k_final_step`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from saejax.sae.config import SAEConfig


def lr_factor(config: SAEConfig, t: Int[Array, ""]) -> Float[Array, ""]:
    """Multiplier of the learning rate at step t (1.0 without a schedule)."""
    tf = jnp.asarray(t, jnp.float32)
    out = jnp.ones((), jnp.float32)
    if config.lr_warmup_steps > 0:
        out = out * jnp.minimum(1.0, (tf + 1.0) / config.lr_warmup_steps)
    if config.lr_decay_fraction > 0:
        span = config.lr_decay_fraction * config.total_steps
        out = out * jnp.clip((config.total_steps - tf) / span, 0.0, 1.0)
    return out


def sparsity_factor(config: SAEConfig, t: Int[Array, ""]) -> Float[Array, ""]:
    """Multiplier of the sparsity coefficient at step t (1.0 without a warm-up)."""
    if config.sparsity_warmup_fraction <= 0:
        return jnp.ones((), jnp.float32)
    span = config.sparsity_warmup_fraction * config.total_steps
    return jnp.minimum(1.0, jnp.asarray(t, jnp.float32) / span)


def k_final_step(config: SAEConfig) -> int:
    """First step at which k equals its target (0 without annealing)."""
    if not config.k_anneal_start:
        return 0
    span = config.k_anneal_fraction * config.total_steps
    return int(-(-span // 1))


def current_k(config: SAEConfig, t: Int[Array, ""]) -> Int[Array, ""]:
    """k at step t (a traced int32; ``config.k`` without annealing)."""
    if not config.k_anneal_start:
        return jnp.asarray(config.k, jnp.int32)
    span = config.k_anneal_fraction * config.total_steps
    p = jnp.minimum(1.0, jnp.asarray(t, jnp.float32) / span)
    k = jnp.round(config.k_anneal_start * (1.0 - p) + config.k * p)
    return k.astype(jnp.int32)
