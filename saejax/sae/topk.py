"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per input, no L1.

Written as a registry entry to show the seam: the shared model code supplies the tied
bias, matmuls, unit-norm decoder and gradients. The gradient flows to the k kept
pre-activations only (the threshold is a stop-gradient). AuxK, which gives dead latents a
gradient again, lives in the shared model code (``SAEConfig.aux_k``; ``supports_auxk`` here).
While k is annealed (``SAEConfig.k_anneal_start``) the top-k runs with the starting k and
keeps the current k_t of its values.

Legend: B batch, F features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from saejax.sae.registry import Architecture, register_architecture


def kth_largest(pre: Float[Array, "B F"], ctx) -> Float[Array, "B 1"]:
    """Each row's k-th largest value (k = ``ctx.k``, possibly traced, <= ``ctx.k_max``)."""
    vals = jax.lax.top_k(pre, ctx.k_max)[0]
    # min over the k values, not ``[:, -1:]``: XLA:CPU turns top_k followed by that slice
    # into a full sort, ~45x slower at [4096, 4096] (2.7 s vs 0.06 s, measured).
    if not isinstance(ctx.k, int) or ctx.k != ctx.k_max:
        vals = jnp.where(jnp.arange(ctx.k_max) < ctx.k, vals, jnp.inf)  # sorted: keep the first k
    return jax.lax.stop_gradient(jnp.min(vals, axis=-1, keepdims=True))


def topk_activation(pre: Float[Array, "B F"], side, ctx) -> tuple[Float[Array, "B F"], dict]:
    """ReLU of the k largest pre-activations of each row; every other feature is 0.

    Ties at the k-th value keep all tied entries (measure-zero for real inputs).
    """
    del side
    kth = kth_largest(pre, ctx)
    return jnp.where(pre >= kth, jax.nn.relu(pre), 0.0), {}


TOPK = register_architecture(Architecture(name="topk", activation=topk_activation, penalty=None,
                                          supports_auxk=True, uses_k=True))
