"""Feature ablation: the change in next-token log-likelihood when one feature is removed.

For feature i and a context, the site's activations become ``acts - f_i(acts) * d_i`` at
every position (``f_i`` in SAE units from ``SAEBundle.encode``, ``d_i`` in LM units from
``SAEBundle.directions``), everything downstream is recomputed, and
the log-probability of each actual next token is compared with the clean run:

    delta[t] = log p_ablated(x[t+1] | x[:t+1]) - log p_clean(x[t+1] | x[:t+1])

Negative deltas mean the feature helped predict the text. The summary averages delta over
all positions of a feature's top contexts and over the positions where the feature fires
(for a site in the last layer only those positions can change).

Legend: P (feature, context) pairs per batch, T sequence, D site width, F features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from saejax import parallel
from saejax.lm.model import forward, split_lm
from saejax.lm.sites import Replace
from saejax.sae.bundle import SAEBundle


def _next_token_logp(logits: Float[Array, "P T V"], tokens: Int[Array, "P T"]
                     ) -> Float[Array, "P T1"]:
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def make_clean_fn(graphdef, mesh):
    """Jitted ``(lm_params, tokens [P, T]) -> log p of each next token [P, T-1]``."""
    out = parallel.named_sharding(mesh, ("batch", None))

    def run(lm_params, tokens):
        logits = forward(graphdef, lm_params, tokens).logits
        return jax.lax.with_sharding_constraint(_next_token_logp(logits, tokens), out)

    return jax.jit(run)


def make_ablation_fn(graphdef, site: str, mesh):
    """Jitted ``(lm_params, sae, tokens [P, T], feats [P]) -> (logp, fired)``.

    ``sae`` is an :class:`~saejax.sae.bundle.SAEBundle` reading ``site``.
    logp: [P, T-1] next-token log-likelihood with feature ``feats[p]`` removed from row p;
    fired: [P, T-1] whether that feature was active at the predicting position.
    """
    out = parallel.named_sharding(mesh, ("batch", None))

    def run(lm_params, sae, tokens, feats):
        seen = []  # the feature's clean activations, recorded while tracing the intervention

        def remove(_, acts):
            fi = jnp.take_along_axis(sae.encode(acts), feats[:, None, None], axis=2)[..., 0]
            seen.append(fi)
            d = sae.directions()[feats]  # [P, D], LM units
            return acts - fi[..., None] * d[:, None, :]

        logits = forward(graphdef, lm_params, tokens,
                         interventions=(Replace(site, remove, None),)).logits
        logp = _next_token_logp(logits, tokens)
        fired = seen[0][:, :-1] > 0
        return (jax.lax.with_sharding_constraint(logp, out),
                jax.lax.with_sharding_constraint(fired, out))

    return jax.jit(run)


def ablation_effects(lm, sae: SAEBundle, tokens: np.ndarray, pairs: list[tuple[int, int]], *,
                     batch_size: int, mesh: jax.sharding.Mesh) -> tuple[np.ndarray, np.ndarray]:
    """Ablation deltas for (feature, context row) pairs.

    The clean log-likelihoods are computed once per distinct row, the ablated ones once
    per pair.

    Args:
      lm: the LM.
      sae: the dictionary.
      tokens: int [N, T] contexts; pairs index its rows.
      pairs: (feature id, row) pairs.
      batch_size: rows / pairs per jitted call (a multiple of the data-parallel size); the
        last batch is padded, so each function compiles once.
      mesh: device mesh.

    Returns:
      (delta [n_pairs, T-1], fired [n_pairs, T-1]) as numpy arrays.
    """
    seq_len = tokens.shape[1]
    if not pairs:
        return np.zeros((0, seq_len - 1), np.float32), np.zeros((0, seq_len - 1), bool)
    graphdef, lm_params = split_lm(lm)
    sae_m = sae.on_mesh(mesh)
    lm_params = jax.device_put(lm_params, parallel.replicated(mesh))
    sharding = parallel.named_sharding(mesh, ("batch", None))

    def batches(*cols):
        n = len(cols[0])
        pad = (-n) % batch_size
        cols = [np.concatenate([c, np.zeros(pad, c.dtype)]) for c in cols]
        for s in range(0, n + pad, batch_size):
            yield [c[s:s + batch_size] for c in cols]

    def put_rows(rows):
        return jax.device_put(np.ascontiguousarray(tokens[rows], np.int32), sharding)

    rows = np.unique([p[1] for p in pairs]).astype(np.int64)
    clean_fn = make_clean_fn(graphdef, mesh)
    clean = np.concatenate([np.asarray(clean_fn(lm_params, put_rows(r)))
                            for (r,) in batches(rows)])[:len(rows)]
    clean_of = dict(zip(rows.tolist(), clean, strict=True))

    fn = make_ablation_fn(graphdef, sae.site, mesh)
    feats = np.asarray([p[0] for p in pairs], np.int32)
    prow = np.asarray([p[1] for p in pairs], np.int64)
    logps, fired = [], []
    for f, r in batches(feats, prow):
        lp, fi = fn(lm_params, sae_m, put_rows(r),
                    jax.device_put(f, parallel.named_sharding(mesh, ("batch",))))
        logps.append(np.asarray(lp))
        fired.append(np.asarray(fi))
    n = len(pairs)
    logp = np.concatenate(logps)[:n]
    delta = logp - np.stack([clean_of[int(r)] for r in prow])
    return delta, np.concatenate(fired)[:n]


def ablation_summary(lm, sae: SAEBundle, tokens: np.ndarray, pairs: list[tuple[int, int]], *,
                     batch_size: int, mesh: jax.sharding.Mesh) -> dict[int, dict]:
    """Per feature: mean delta log-likelihood over its contexts (all / firing positions).

    Returns:
      feature id -> {"delta_logp_all", "delta_logp_active" (None if it never fired at a
      predicting position), "contexts"}.
    """
    delta, fired = ablation_effects(lm, sae, tokens, pairs, batch_size=batch_size, mesh=mesh)
    by_feature: dict[int, list[int]] = {}
    for j, (i, _) in enumerate(pairs):
        by_feature.setdefault(i, []).append(j)
    out = {}
    for i, js in by_feature.items():
        d, m = delta[js], fired[js]
        out[i] = {"delta_logp_all": float(f"{d.mean():.4g}"),
                  "delta_logp_active": float(f"{d[m].mean():.4g}") if m.any() else None,
                  "contexts": len(js)}
    return out
