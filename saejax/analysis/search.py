"""Concept search: which features fire selectively on a few example texts?

    hits = concept_search(lm, sae, ["for x in range(10):", "for key in d:"],
                          ["while True:"], tokenizer=tok, stats=stats)
    hits[0] == {"id": 738, "score": 0.81, "hit_examples": 1.0, "hit_counter": 0.0, ...}

A vague concept ("loops over a range", "an error message") is given as examples and,
optionally, counter-examples (texts that share surface features but not the concept). Each
text is run through the LM and the dictionary; per text and feature we take the largest
activation over its tokens. For feature i:

* ``hit_examples``: the fraction of examples on which i fires;
* ``hit_counter``: the fraction of counter-examples on which it fires (0 without any);
* ``baseline``: how often it would fire on a random stretch of text of the examples'
  lengths, ``1 - (1 - density_i)^len`` averaged over the examples, from the analysed
  tokens' density (``stats``; 0 without it) — a dense feature fires on anything;
* ``strength``: the mean over examples of the largest activation divided by the feature's
  maximum on the analysed tokens (``stats``; else its maximum over the given texts),
  capped at 1;
* ``score = strength * (hit_examples - max(hit_counter, baseline))``, in [-1, 1].

Features are ranked by score (ties: lower id). ``where`` names, per example, the token at
which the feature fired most (its string when a tokenizer or vocabulary is at hand).

Legend: E examples, C counter-examples, L tokens per text (padded), F features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saejax import parallel
from saejax.config import ConfigError, MeshConfig
from saejax.lm.model import forward, lm_module, split_lm
from saejax.sae.bundle import SAEBundle


def _ids(texts: Sequence[str | Sequence[int]], tokenizer, max_len: int) -> list[list[int]]:
    out = []
    for j, t in enumerate(texts):
        if isinstance(t, str):
            if tokenizer is None:
                raise ConfigError("concept search: text examples need a tokenizer (or pass "
                                  "token-id lists)")
            ids = list(tokenizer.encode(t))
        else:
            ids = [int(x) for x in t]
        if not ids:
            raise ConfigError(f"concept search: example {j} encodes to no tokens")
        out.append(ids[:max_len])
    return out


def max_activations(lm, sae: SAEBundle, texts: Sequence[Sequence[int]], *,
                    mesh: jax.sharding.Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(max activation [N, F], its position [N, F]) over each token-id list's tokens."""
    mesh = mesh or parallel.make_mesh(MeshConfig())
    graphdef, params = split_lm(lm)
    n, length = len(texts), max(len(t) for t in texts)
    dp = parallel.data_parallel_size(mesh)
    rows = -(-n // dp) * dp
    tokens = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), bool)
    for j, t in enumerate(texts):
        tokens[j, :len(t)], mask[j, :len(t)] = t, True

    @jax.jit
    def run(params, sae, tokens, mask):
        (acts,) = forward(graphdef, params, tokens, sites=(sae.site,),
                          logits=False).acts.values()
        f = jnp.where(mask[..., None], sae.encode(acts), -jnp.inf)   # [N, L, F]
        return f.max(axis=1), f.argmax(axis=1)

    sh = parallel.named_sharding(mesh, ("batch", None))
    m, pos = run(jax.device_put(params, parallel.replicated(mesh)), sae.on_mesh(mesh),
                 jax.device_put(tokens, sh), jax.device_put(mask, sh))
    return np.asarray(m)[:n], np.asarray(pos)[:n]


def concept_search(lm, sae: SAEBundle, examples: Sequence[str | Sequence[int]],
                   counter_examples: Sequence[str | Sequence[int]] = (), *, tokenizer=None,
                   stats: dict | None = None, vocab: Sequence[str] | None = None,
                   top: int = 20, mesh: jax.sharding.Mesh | None = None) -> list[dict[str, Any]]:
    """The ``top`` features ranked by selectivity for the examples (module docstring).

    Args:
      lm: the LM.
      sae: the dictionary.
      examples: texts (with ``tokenizer``) or token-id lists showing the concept.
      counter_examples: texts or token-id lists without it.
      tokenizer: encodes text examples (and names the ``where`` tokens).
      stats: the run's unit statistics (:func:`saejax.analysis.features.compute_feature_stats`
        or ``load_stats``) for density baselines and activation scales.
      vocab: display strings per token id (default: ``stats["vocab"]``).
      top: features returned.
      mesh: device mesh.

    Returns:
      [{"id", "score", "hit_examples", "hit_counter", "baseline", "strength",
        "max_acts" [E], "where" [E]}] best first.
    """
    if not examples:
        raise ConfigError("concept search: give at least one example")
    max_len = lm_module(lm).cfg.max_len
    pos_ids = _ids(examples, tokenizer, max_len)
    neg_ids = _ids(counter_examples, tokenizer, max_len)
    acts, where = max_activations(lm, sae, pos_ids + neg_ids, mesh=mesh)
    a_pos, a_neg = acts[:len(pos_ids)], acts[len(pos_ids):]
    F = sae.n_features
    if stats is not None:
        if len(stats["density"]) != F:
            raise ConfigError(f"concept search: stats describe {len(stats['density'])} units, "
                              f"the dictionary has {F}")
        density = np.asarray(stats["density"], np.float64)
        scale = np.asarray([x or 0.0 for x in stats["max_act"]], np.float64)
        lengths = np.asarray([len(t) for t in pos_ids], np.float64)
        baseline = np.mean(1.0 - (1.0 - density[None, :]) ** lengths[:, None], axis=0)
        vocab = vocab or stats.get("vocab")
    else:
        scale, baseline = np.zeros(F), np.zeros(F)
    scale = np.where(scale > 0, scale, np.max(np.maximum(acts, 0), axis=0))
    fired_pos = a_pos > 0
    hit_pos = fired_pos.mean(axis=0)
    hit_neg = (a_neg > 0).mean(axis=0) if len(neg_ids) else np.zeros(F)
    strength = np.mean(np.minimum(np.maximum(a_pos, 0) / np.maximum(scale, 1e-12), 1.0), axis=0)
    score = strength * (hit_pos - np.maximum(hit_neg, baseline))
    order = np.lexsort((np.arange(F), -score))[:top]

    def name(tid: int) -> str | int:
        if vocab is not None and 0 <= tid < len(vocab):
            return vocab[tid]
        if tokenizer is not None:
            try:
                return tokenizer.decode([tid])
            except Exception:  # noqa: BLE001 - an id the tokenizer cannot decode alone
                pass
        return tid

    return [{"id": int(i), "score": round(float(score[i]), 4),
             "hit_examples": round(float(hit_pos[i]), 4),
             "hit_counter": round(float(hit_neg[i]), 4),
             "baseline": round(float(baseline[i]), 4), "strength": round(float(strength[i]), 4),
             "max_acts": [round(float(x), 4) for x in a_pos[:, i]],
             "where": [name(pos_ids[e][where[e, i]]) if fired_pos[e, i] else None
                       for e in range(len(pos_ids))]}
            for i in order]
