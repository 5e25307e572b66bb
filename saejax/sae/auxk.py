"""AuxK (Gao et al. 2024, appendix A.2): dead TopK latents learn to reconstruct the residual.

A TopK latent that leaves every input's top k gets no gradient and stays dead. AuxK adds a
loss in which each input's ``aux_k`` largest pre-activations among *dead* features (silent
for ``dead_window`` steps) reconstruct the main model's residual e = x - x_hat (held
fixed), so those features move towards directions the dictionary still misses.
:func:`saejax.sae.model.forward_backward` calls :func:`auxk` (inside a ``lax.cond`` that
skips it while nothing is dead) and adds the returned rows into its gradients.

Legend: B batch, D input width, F features, M candidates (``aux_candidates``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from saejax.sae.config import SAEConfig
from saejax.sae.dead import dead_mask
from saejax.sae.matmul import mm as _mm


class AuxRows(NamedTuple):
    """AuxK loss and its gradient, for the candidate features ``idx`` only."""

    loss: Float[Array, ""]
    idx: Int[Array, " M"]
    W_dec: Float[Array, "M D"]
    W_enc: Float[Array, "M D"]
    b_enc: Float[Array, " M"]


def auxk(params: Any, x_bar: Float[Array, "B D"], residual: Float[Array, "B D"],
         stale: Int[Array, " F"], config: SAEConfig) -> AuxRows:
    """AuxK (Gao et al. 2024, A.2): the aux_k largest dead pre-activations reconstruct x - x_hat.

    loss = aux_coefficient * min(1, n_dead / aux_k) * mean_elements((z_aux W_dec - e)^2),
    e = x - x_hat held fixed, z_aux = ReLU of each input's aux_k largest pre-activations
    among dead features (no decoder bias: e already has it removed). Only the
    ``aux_candidates`` longest-dead features take part, so every array is [B, M] or [M, D]
    (the cost: five B x D x M products and a top-k over [B, M]).
    """
    p = config.precision
    b, d = x_bar.shape
    m = min(config.aux_candidates, config.n_features)
    dead = dead_mask(stale, config)
    _, idx = jax.lax.top_k(jnp.where(dead, stale, -1).astype(jnp.float32), m)   # longest dead first
    valid = dead[idx]
    # The candidates' pre-activations again, as a [B, D] x [D, M] product: cheaper on
    # XLA:CPU than gathering M columns of the [B, F] array (a transpose plus a gather).
    pre_c = _mm(x_bar, params.W_enc[idx], p, contract=(1, 1)) + params.b_enc[idx]
    pre_c = jnp.where(valid, pre_c, -jnp.inf)                                       # [B, M]
    kth = jnp.min(jax.lax.top_k(pre_c, config.aux_k)[0], axis=-1, keepdims=True)
    z = jnp.where(valid & (pre_c >= kth) & (pre_c > 0), pre_c, 0.0)
    w_dec_c = params.W_dec[idx]
    diff = _mm(z, w_dec_c, p) - residual
    scale = config.aux_coefficient * jnp.minimum(jnp.sum(dead) / config.aux_k, 1.0)
    d_ehat = diff * (2.0 * scale / (b * d))
    d_pre_c = jnp.where(z > 0, _mm(d_ehat, w_dec_c, p, contract=(1, 1)), 0.0)
    return AuxRows(loss=scale * jnp.mean(jnp.square(diff)), idx=idx,
                   W_dec=_mm(z, d_ehat, p, contract=(0, 0)),
                   W_enc=_mm(d_pre_c, x_bar, p, contract=(0, 0)), b_enc=jnp.sum(d_pre_c, axis=0))


def no_auxk(params: Any, x_bar: Float[Array, "B D"], residual: Float[Array, "B D"],
            stale: Int[Array, " F"], config: SAEConfig) -> AuxRows:
    """The same outputs with no dead feature: zero loss, zero rows."""
    del params, residual, stale
    m, d = min(config.aux_candidates, config.n_features), x_bar.shape[1]
    z = jnp.zeros((m, d), jnp.float32)
    return AuxRows(loss=jnp.zeros((), jnp.float32), idx=jnp.arange(m, dtype=jnp.int32), W_dec=z,
                   W_enc=z, b_enc=jnp.zeros((m,), jnp.float32))
