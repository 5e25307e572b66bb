"""JumpReLU SAE (Rajamanoharan et al. 2024), trained as for Gemma Scope (arXiv 2408.05147).

    z = (x - b_dec) W_enc^T + b_enc,   f = ReLU(z) H(z - theta),   theta > 0 per feature
    loss = mean_D (x_hat - x)^2 + lambda s(t) sum_i H(z_i - theta_i)     (L0 penalty)

Straight-through estimators with the rectangle kernel K(u) = 1[-1/2 < u < 1/2] and
bandwidth epsilon (Gemma Scope eq. 3-4, SAELens' and dictionary_learning's code):

    df_i/dz_i := H(z_i - theta_i)                     (no STE on z)
    df_i/dtheta_i := -(theta_i / eps) K((z_i - theta_i) / eps)
    dH/dtheta_i := -(1 / eps) K((z_i - theta_i) / eps),   dH/dz := 0

summed over the batch. ``step`` is applied to the pre-activation z, not to the post-jump
f (dictionary_learning issue #55). Decisions where the sources differ (FAMILIES.md 1):

- Parametrisation: ``SAEConfig.jumprelu_threshold_param`` "raw" (default: theta itself,
  dictionary_learning and SAELens since PR #718: Adam moves theta by ~lr whatever its
  size, which matters for runs as short as the demo's) or "log" (the JumpReLU paper,
  App. J: tau = log theta, and autodiff supplies dtau = theta dtheta, the factor that
  Bussmann's code misses, BatchTopK issue #2).
- ReLU(z) H(z - theta) instead of z H(z - theta): equal for theta >= 0 (SAELens' inference
  form); a raw theta is projected onto theta >= 0 after each update.
- Units: Gemma Scope's theta_0 = epsilon = 0.001 assume E||x||^2 = 1; saejax's inputs have
  E||x|| = sqrt(D), so both are multiplied by sqrt(d_in) (0.0226 for 512 neurons;
  SAELens issue #494 shows the unscaled values barely move L0). lambda needs no scaling
  (FAMILIES.md 0: their sum-MSE equals saejax's mean-MSE under this scaling).
- Init (Gemma Scope 3.2, ``init = "default"``): W_dec rows random with unit norm,
  W_enc = W_dec^T (the "tied" init), b_enc = b_dec = 0 except that saejax starts b_dec at
  the geometric median like every architecture; theta = theta_0 for every feature.
- Quadratic target-L0 (Gemma Scope 2, eq. 5) with ``SAEConfig.target_l0`` > 0:
  lambda (2 / L0*) (||f||_0 - L0*)^2 per input, averaged over the batch (GS2's form;
  dictionary_learning's lambda (mean L0 / L0* - 1)^2 differs).
- The sparsity warm-up (Gemma Scope: 10,000 steps) is ``sparsity_warmup_fraction``;
  their Adam betas (0, 0.999) and lr 7e-5 are the config's (experiments/sae_families.py).
  Theta stays float32 (SAELens PR #728: a bf16 theta stops learning).

Legend: B batch, F features.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from saejax.sae.registry import Architecture, ParamSpec, register_architecture


def _rect(u: Array) -> Array:
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z: Float[Array, "B F"], theta: Float[Array, " F"], eps: float) -> Float[Array, "B F"]:
    """ReLU(z) H(z - theta), with the straight-through gradient for theta."""
    return jnp.where(z > theta, jax.nn.relu(z), 0.0)


def _jumprelu_fwd(z, theta, eps):
    return jumprelu(z, theta, eps), (z, theta)


def _jumprelu_bwd(eps, res, g):
    z, theta = res
    dz = jnp.where((z > theta) & (z > 0), g, 0.0)
    dtheta = jnp.sum(-(theta / eps) * _rect((z - theta) / eps) * g, axis=0)
    return dz, dtheta


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(z: Float[Array, "B F"], theta: Float[Array, " F"], eps: float) -> Float[Array, "B F"]:
    """H(z - theta), with dH/dz = 0 and the straight-through gradient for theta."""
    return (z > theta).astype(z.dtype)


def _step_fwd(z, theta, eps):
    return step(z, theta, eps), (z, theta)


def _step_bwd(eps, res, g):
    z, theta = res
    dtheta = jnp.sum(-(1.0 / eps) * _rect((z - theta) / eps) * g, axis=0)
    return jnp.zeros_like(z), dtheta


step.defvjp(_step_fwd, _step_bwd)


def units(config) -> float:
    """sqrt(d_in): Gemma Scope's units (E||x||^2 = 1) to saejax's (E||x|| = sqrt(D))."""
    return math.sqrt(config.d_in)


def threshold(side, config) -> Float[Array, " F"]:
    """theta in SAE input units, from the trained parameter."""
    if config.jumprelu_threshold_param == "log":
        return jnp.exp(side["log_threshold"])
    return side["threshold"]


def jumprelu_activation(pre: Float[Array, "B F"], side, ctx) -> tuple[Float[Array, "B F"], dict]:
    eps = ctx.config.jumprelu_bandwidth * units(ctx.config)
    return jumprelu(pre, threshold(side, ctx.config), eps), {}


def l0_penalty(pre: Float[Array, "B F"], f, side, ctx) -> Float[Array, " B"]:
    """lambda s(t) ||f||_0, or GS2's quadratic lambda s(t) (2 / L0*) (||f||_0 - L0*)^2."""
    del f
    c = ctx.config
    l0 = jnp.sum(step(pre, threshold(side, c), c.jumprelu_bandwidth * units(c)), axis=-1)
    lam = c.l0_coefficient * ctx.sparsity
    if c.target_l0 > 0:
        return lam * (2.0 / c.target_l0) * jnp.square(l0 - c.target_l0)
    return lam * l0


def jumprelu_params(config) -> dict[str, ParamSpec]:
    theta0 = config.jumprelu_init_threshold * units(config)
    if config.jumprelu_threshold_param == "log":
        return {"log_threshold": ParamSpec(per_feature=True, init=lambda c: math.log(theta0))}
    return {"threshold": ParamSpec(per_feature=True, init=lambda c: theta0)}


def nonnegative_threshold(extra, ctx) -> dict:
    """A raw theta is projected onto theta >= 0 after each update: below 0 the L0 term would
    count z in (theta, 0] that does not fire, and the STE's sign would flip."""
    if ctx.config.jumprelu_threshold_param == "log":
        return {}
    return {"threshold": jnp.maximum(extra["threshold"], 0.0)}


JUMPRELU = register_architecture(Architecture(
    name="jumprelu", activation=jumprelu_activation, penalty=l0_penalty, feature_major=True,
    params=jumprelu_params, constrain=nonnegative_threshold, default_init="tied"))
