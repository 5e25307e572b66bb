"""Ground-truth data: sparse non-negative combinations of known unit directions plus noise.

x = sum_g c_g t_g + noise, with G true unit directions t_g in R^D, each feature active
independently with probability ``mean_active / G``, active coefficients ~ U(0.5, 1.5)
(bounded away from 0 so an active feature is visible), and isotropic Gaussian noise.

A harder setting (``frequency_power`` > 0, ``pair_fraction`` > 0): feature g fires with
probability proportional to (g + 1)^-power (scaled so the mean number active stays
``mean_active``; capped at 1), and the first ``pair_fraction`` of the features form pairs
(2j, 2j + 1) whose second member also fires with probability ``pair_prob`` whenever the
first does. With both at 0 the stream is the plain one, draw for draw.

Legend: N rows, D input width, G true features.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from saejax.config import check, check_nonnegative, check_positive


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Synthetic activations with a known dictionary.

    Attributes:
      d_in: width D.
      n_true_features: number G of true directions.
      mean_active: expected number of active true features per row.
      noise_std: standard deviation of the added Gaussian noise, per element.
      seed: seed of the directions and of the default data stream.
      frequency_power: power-law exponent of the firing frequencies (0 = all equal).
      pair_fraction: fraction of the features that form co-firing pairs (0 = none).
      pair_prob: probability that a pair's second feature fires with its first.
    """

    d_in: int = 64
    n_true_features: int = 256
    mean_active: float = 4.0
    noise_std: float = 0.01
    seed: int = 0
    frequency_power: float = 0.0
    pair_fraction: float = 0.0
    pair_prob: float = 0.5

    def __post_init__(self):
        check_positive("synthetic.d_in", self.d_in)
        check_positive("synthetic.n_true_features", self.n_true_features)
        check("synthetic.mean_active", self.mean_active,
              isinstance(self.mean_active, (int, float)) and 0 < self.mean_active <= self.n_true_features,
              f"must be in (0, synthetic.n_true_features={self.n_true_features}]")
        check_nonnegative("synthetic.noise_std", self.noise_std)
        check_nonnegative("synthetic.seed", self.seed)
        check_nonnegative("synthetic.frequency_power", self.frequency_power)
        check("synthetic.pair_fraction", self.pair_fraction,
              isinstance(self.pair_fraction, (int, float)) and 0 <= self.pair_fraction <= 1, "must be in [0, 1]")
        check("synthetic.pair_prob", self.pair_prob,
              isinstance(self.pair_prob, (int, float)) and 0 <= self.pair_prob <= 1, "must be in [0, 1]")


def firing_probabilities(config: SyntheticConfig) -> Float[Array, " G"]:
    """Each true feature's probability of firing on its own (before pairing)."""
    g = config.n_true_features
    if config.frequency_power <= 0:
        return jnp.full((g,), config.mean_active / g, jnp.float32)
    w = jnp.arange(1, g + 1, dtype=jnp.float32) ** (-config.frequency_power)
    return jnp.minimum(1.0, config.mean_active * w / jnp.sum(w))


def true_directions(config: SyntheticConfig) -> Float[Array, "G D"]:
    """The G unit-norm ground-truth directions (random Gaussian, normalised)."""
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
    t = jax.random.normal(key, (config.n_true_features, config.d_in), jnp.float32)
    return t / jnp.linalg.norm(t, axis=-1, keepdims=True)


def sample(config: SyntheticConfig, key: Array, n: int,
           directions: Float[Array, "G D"] | None = None) -> Float[Array, "N D"]:
    """``n`` synthetic activation rows.

    Args:
      config: generator config.
      key: RNG key for this batch (e.g. ``fold_in(root, step)``).
      n: rows.
      directions: the true directions (default: :func:`true_directions`).
    """
    t = true_directions(config) if directions is None else directions
    k_on, k_mag, k_noise = jax.random.split(key, 3)
    g = config.n_true_features
    if config.frequency_power > 0:
        on = jax.random.bernoulli(k_on, firing_probabilities(config), (n, g))
    else:
        on = jax.random.bernoulli(k_on, config.mean_active / g, (n, g))
    n_pairs = int(config.pair_fraction * g) // 2
    if n_pairs:
        follow = jax.random.bernoulli(jax.random.fold_in(key, 7), config.pair_prob, (n, n_pairs))
        second = on[:, 1:2 * n_pairs:2] | (on[:, 0:2 * n_pairs:2] & follow)
        on = on.at[:, 1:2 * n_pairs:2].set(second)
    mag = jax.random.uniform(k_mag, (n, g), jnp.float32, 0.5, 1.5)
    coeff = jnp.where(on, mag, 0.0)
    noise = config.noise_std * jax.random.normal(k_noise, (n, config.d_in), jnp.float32)
    return coeff @ t + noise
