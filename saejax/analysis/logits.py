"""Logit effects of features: the decoder direction pushed through to the unembedding.

The paper's logit weights of feature i are ``W_U W_out d_i``: the dictionary vector in the
MLP's neuron space, mapped by the MLP output matrix into the residual stream and read by
the unembedding. This is the *direct* effect only (later layers, if any, are skipped), and
it ignores the final LayerNorm. saejax offers one refinement (``fold_ln=True``): the
LayerNorm's linear part is folded in, i.e. the residual direction r is mean-centred and
multiplied by the LayerNorm scale gamma before W_U:

    direct  (paper):  logits_i = r_i @ W_U
    fold_ln:          logits_i = ((r_i - mean(r_i)) * gamma) @ W_U

For a model whose final norm is an RMSNorm (an imported Llama, :mod:`saejax.lm.families`)
there is no mean to remove: ``fold_ln`` multiplies by gamma only.

Both drop the LayerNorm's data-dependent 1/sigma (a positive per-token factor, so the
token ranking is unchanged by it) and its bias (the same for every feature). Effects are
per unit of feature activation in SAE units, so they start from the decoder vectors in the
LM's units (``SAEBundle.directions``, which divides by the normalisation constant).

Sites: "mlp.post" uses W_out of the site's layer; residual-stream-width sites ("mlp.out",
"attn.out", "resid.*") use the decoder vector directly; "mlp.pre" has no linear path
(the MLP nonlinearity sits between it and the residual stream) and is rejected.

Legend: F features, C features per chunk, M MLP width, D d_model, V vocab, K tokens kept.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from saejax.lm.model import lm_module
from saejax.lm.sites import canonical_site, site_layer_and_kind
from saejax.sae.bundle import SAEBundle

_RESIDUAL_KINDS = ("resid.pre", "attn.out", "resid.mid", "mlp.out", "resid.post")


def residual_directions(lm, sae: SAEBundle) -> Float[Array, "F D"]:
    """Each feature's effect on the residual stream per unit activation (LM units)."""
    model = lm_module(lm)
    layer, kind = site_layer_and_kind(canonical_site(sae.site, model.cfg.n_layers))
    w_dec = sae.directions()
    if kind == "mlp.post":
        return w_dec @ model.blocks[layer].mlp.w_out[...].astype(jnp.float32)
    if kind in _RESIDUAL_KINDS:
        return w_dec
    raise ValueError(f"logit effects need a site with a linear path to the residual stream "
                     f"(mlp.post or a residual-width site); got {sae.site!r}")


def unembedding(lm) -> Float[Array, "D V"]:
    model = lm_module(lm)
    w_u = model.wte[...].T if model.cfg.tie_embeddings else model.w_u[...]
    return w_u.astype(jnp.float32)


def _centres(lm) -> bool:
    """Whether the final norm subtracts the mean (LayerNorm: has a bias; RMSNorm: does not)."""
    return hasattr(lm_module(lm).ln_f, "bias")


@functools.partial(jax.jit, static_argnames=("k", "fold_ln", "centre"))
def _top_bottom(dirs: Float[Array, "C D"], gamma: Float[Array, " D"], w_u: Float[Array, "D V"],
                *, k: int, fold_ln: bool, centre: bool = True):
    if fold_ln:
        dirs = ((dirs - dirs.mean(-1, keepdims=True)) if centre else dirs) * gamma
    logits = jnp.dot(dirs, w_u, precision=jax.lax.Precision.HIGHEST)
    top_v, top_i = jax.lax.top_k(logits, k)
    bot_v, bot_i = jax.lax.top_k(-logits, k)
    return top_i, top_v, bot_i, -bot_v


def logit_vector(lm, sae: SAEBundle, feature: int, *, fold_ln: bool = True) -> Float[Array, " V"]:
    """The full logit effect of one feature (see the module docstring)."""
    r = residual_directions(lm, sae)[feature]
    if fold_ln:
        r = ((r - r.mean()) if _centres(lm) else r) * lm_module(lm).ln_f.scale[...]
    return jnp.dot(r, unembedding(lm), precision=jax.lax.Precision.HIGHEST)


def feature_logit_effects(lm, sae: SAEBundle, *, k: int = 10, fold_ln: bool = True,
                          chunk: int = 1024) -> dict[str, np.ndarray]:
    """Top-k and bottom-k logit effects of every feature, computed ``chunk`` features at a time.

    Returns:
      {"top_ids", "top_values", "bottom_ids", "bottom_values"}: numpy arrays [F, k]; values
      are logit changes per unit feature activation, highest first / lowest first.
    """
    dirs = residual_directions(lm, sae)
    w_u = unembedding(lm)
    k = min(k, w_u.shape[1])
    gamma = lm_module(lm).ln_f.scale[...].astype(jnp.float32)
    n = dirs.shape[0]
    chunk = min(chunk, n)
    pad = (-n) % chunk  # fixed chunk shape: one compilation
    dirs = jnp.concatenate([dirs, jnp.zeros((pad, dirs.shape[1]), dirs.dtype)])
    centre = _centres(lm)
    parts = [_top_bottom(dirs[s:s + chunk], gamma, w_u, k=k, fold_ln=fold_ln, centre=centre)
             for s in range(0, n + pad, chunk)]
    names = ("top_ids", "top_values", "bottom_ids", "bottom_values")
    return {name: np.concatenate([np.asarray(p[j]) for p in parts])[:n]
            for j, name in enumerate(names)}


def top_token_ids(lm, sae: SAEBundle, feature: int, k: int = 10, *, fold_ln: bool = True
                  ) -> Int[Array, " K"]:
    """The k tokens whose logits one feature raises most."""
    return jax.lax.top_k(logit_vector(lm, sae, feature, fold_ln=fold_ln), k)[1]
