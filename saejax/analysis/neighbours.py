"""Each unit's neighbours: the nearest units by decoder cosine and by co-activation.

    out, info = unit_neighbours(lm, sae, active, k=5)   # active: from the analysis pass
    out[i] == {"decoder": [[j, cosine], ...], "coact": [[j, jaccard], ...]}

Decoder cosine compares the units' decoder vectors in the site's space (neurons, whose
decoder is the identity, compare their output weights in the residual stream instead).
Co-activation is the Jaccard index of the token sets where both units fire, counted on the
first tokens of the analysis pass (their per-token active lists, a sparse [tokens, F]
matrix, whose Gram matrix gives every pair's count without an [F, F] dense product).

Legend: F units, D directions' width, k neighbours, L active units per token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from saejax.analysis import logits
from saejax.sae.bundle import SAEBundle


def _round(x: float) -> float | None:
    x = float(x)
    return float(f"{x:.4g}") if math.isfinite(x) else None


def coactivation(active: list[tuple[np.ndarray, np.ndarray]], n_units: int, k: int
                 ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Each unit's ``k`` nearest units by co-activation (Jaccard index of the token sets
    where both fire), from per-token active lists; returns (ids [F, k], jaccard [F, k],
    info {tokens, truncated}). ``truncated`` counts tokens whose active list was full (their
    remaining units, if any, were not seen). Pairs with no co-activation are -1 / 0."""
    import scipy.sparse as sp

    ids = np.full((n_units, k), -1, np.int64)
    jac = np.zeros((n_units, k), np.float32)
    if not active:
        return ids, jac, {"tokens": 0, "truncated": 0}
    vals = np.concatenate([v for v, _ in active])
    idx = np.concatenate([i for _, i in active])
    on = vals > 0
    n_tok, L = vals.shape
    rows = np.repeat(np.arange(n_tok), L)[on.reshape(-1)]
    a = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, idx[on])), shape=(n_tok, n_units))
    co = (a.T @ a).tocsr()
    n = np.asarray(co.diagonal())
    for i in range(n_units):
        lo, hi = co.indptr[i], co.indptr[i + 1]
        j, c = co.indices[lo:hi], co.data[lo:hi]
        keep = j != i
        j, c = j[keep], c[keep]
        if j.size == 0:
            continue
        s = c / (n[i] + n[j] - c)
        order = np.lexsort((j, -s))[:k]
        ids[i, :order.size], jac[i, :order.size] = j[order], s[order]
    return ids, jac, {"tokens": int(n_tok), "truncated": int(np.sum(on.all(axis=1)))}


def unit_neighbours(lm, sae: SAEBundle, active, k: int, unit: str = "feature"
                    ) -> tuple[list[dict], dict]:
    """Per unit {"decoder": [[id, cosine]], "coact": [[id, jaccard]]} and the co-activation
    sample's size. Features compare decoder vectors; neurons (whose decoder is the identity)
    compare their output weights in the residual stream."""
    dirs = logits.residual_directions(lm, sae) if unit == "neuron" else sae.directions()
    dec_ids, dec_cos = nearest_by_cosine(dirs, k)
    co_ids, co_jac, info = coactivation(active, sae.n_features, k)
    out = []
    for i in range(sae.n_features):
        out.append({"decoder": [[int(j), _round(c)] for j, c in zip(dec_ids[i], dec_cos[i],
                                                                strict=True)],
                    "coact": [[int(j), _round(c)] for j, c in zip(co_ids[i], co_jac[i], strict=True)
                              if j >= 0]})
    return out, info


def nearest_by_cosine(dirs, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most similar other rows by cosine ([F, k] ids and cosines), computed
    ``chunk`` rows at a time (never the whole [F, F] matrix)."""
    d = jnp.asarray(dirs, jnp.float32)
    d = d / jnp.maximum(jnp.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    n = d.shape[0]
    k = min(k, n - 1)

    @jax.jit
    def block(rows, start):
        sim = jnp.dot(rows, d.T, precision=jax.lax.Precision.HIGHEST)
        own = start + jnp.arange(rows.shape[0])
        sim = jnp.where(jnp.arange(n)[None, :] == own[:, None], -jnp.inf, sim)
        return jax.lax.top_k(sim, k)

    chunk = min(chunk, n)
    pad = (-n) % chunk
    dp = jnp.concatenate([d, jnp.zeros((pad, d.shape[1]), d.dtype)])
    vals, ids = [], []
    for s in range(0, n + pad, chunk):
        v, i = block(dp[s:s + chunk], s)
        vals.append(np.asarray(v))
        ids.append(np.asarray(i))
    return np.concatenate(ids)[:n], np.concatenate(vals)[:n]


