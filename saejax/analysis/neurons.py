"""A site's neurons as a dictionary, so that they get the same statistics and dashboard as
features (the paper's comparison: are features more interpretable than neurons?).

    stats = compute_feature_stats(lm, neuron_bundle(lm, "blocks.0.mlp.post"), tokens,
                                  unit="neuron")

The bundle is the identity: W_enc = W_dec = I, no biases, ReLU, no normaliser. A neuron's
"activation" is then max(x_i, 0) (the paper's MLP uses ReLU neurons, for which this is the
activation itself; a GELU neuron's negative part is not counted as firing), its logit
effect is W_U W_out e_i (its output weights through the unembedding), and ablating it
subtracts max(x_i, 0) e_i from the site: zero ablation of a ReLU neuron.
"""

from __future__ import annotations

import jax.numpy as jnp

from saejax.lm.model import lm_module
from saejax.lm.sites import canonical_site, site_layer_and_kind
from saejax.sae.bundle import SAEBundle
from saejax.sae.config import SAEConfig
from saejax.sae.model import SAEParams


def site_width(lm, site: str) -> int:
    """The number of units at ``site`` (d_mlp for MLP sites, d_model otherwise)."""
    cfg = lm_module(lm).cfg
    _, kind = site_layer_and_kind(canonical_site(site, cfg.n_layers))
    return cfg.d_mlp if kind.startswith("mlp.p") else cfg.d_model


def has_neurons(lm, site: str | None) -> bool:
    """Whether ``site`` holds an MLP's neurons (``mlp.post``, after the nonlinearity)."""
    if not site:
        return False
    _, kind = site_layer_and_kind(canonical_site(site, lm_module(lm).cfg.n_layers))
    return kind == "mlp.post"


def neuron_bundle(lm, site: str) -> SAEBundle:
    """The identity dictionary of ``site``'s units (see the module docstring)."""
    d = site_width(lm, site)
    eye = jnp.eye(d, dtype=jnp.float32)
    params = SAEParams(W_enc=eye, b_enc=jnp.zeros(d), W_dec=eye, b_dec=jnp.zeros(d))
    return SAEBundle(params, SAEConfig(d_in=d, n_features=d, architecture="relu"), site=site)
