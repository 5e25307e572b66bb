"""Concept search finds a planted feature; a dense feature and one that also fires on the
counter-examples rank below it; bad input fails in one line."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from saejax.analysis import features
from saejax.analysis.search import concept_search
from saejax.config import ConfigError
from saejax.lm.config import ModelConfig
from saejax.lm.model import build_model
from saejax.sae.bundle import SAEBundle
from saejax.sae.config import SAEConfig
from saejax.sae.model import SAEParams

V, T, D = 30, 16, 32
P, Q, R = 7, 5, 9     # the concept's token; a token of examples AND counter-examples; another


@functools.cache
def lm():
    model = build_model(ModelConfig(vocab_size=V, max_len=T, d_model=D, n_heads=2, d_mlp=48,
                                    init_std=0.3), seed=0)
    model.wte[...] = jnp.eye(V, D)   # resid.pre is the one-hot token (plus a zero position)
    model.wpe[...] = jnp.zeros((T, D))
    return model


@functools.cache
def sae():
    """Feature 4 fires on P; 1 on Q; 2 everywhere (dense); 0 on R; 3 never."""
    F = 6
    w = np.zeros((F, D), np.float32)
    b = np.full((F,), -1.0, np.float32)
    w[4, P], b[4] = 2.0, -0.5
    w[1, Q], b[1] = 3.0, -0.5
    b[2] = 0.3
    w[0, R], b[0] = 1.0, -0.5
    params = SAEParams(W_enc=jnp.asarray(w), b_enc=jnp.asarray(b),
                       W_dec=jnp.asarray(np.eye(F, D, dtype=np.float32)), b_dec=jnp.zeros(D))
    return SAEBundle(params, SAEConfig(d_in=D, n_features=F), site="resid.pre")


EXAMPLES = [[1, 2, P, 3, Q], [Q, 11, 12, P], [P, 4, 13, 14, 15, 16]]
COUNTER = [[1, 2, 3, Q], [Q, 11, 12, 8]]


def test_concept_search_finds_the_planted_feature():
    hits = concept_search(lm(), sae(), EXAMPLES, COUNTER, vocab=[f"t{i}" for i in range(V)])
    assert hits[0]["id"] == 4
    h = hits[0]
    assert h["hit_examples"] == 1.0 and h["hit_counter"] == 0.0 and h["score"] > 0.9
    assert h["where"] == [f"t{P}"] * 3
    assert h["max_acts"] == pytest.approx([1.5] * 3)
    by_id = {x["id"]: x for x in hits}
    # Q fires on two examples but on every counter-example; the dense feature everywhere.
    assert by_id[1]["score"] < 0 and by_id[2]["score"] <= 0
    assert by_id[3]["score"] == 0 and by_id[3]["where"] == [None] * 3


def test_without_counter_examples_density_baselines_demote_a_dense_feature():
    tokens = np.random.default_rng(0).integers(0, V, (32, T)).astype(np.int32)
    stats = features.compute_feature_stats(
        lm(), sae(), tokens, features.FeatureStatsConfig(batch_size=8, top_k=2, ablation_contexts=0,
                                                         interp=False, neighbours=0))
    plain = concept_search(lm(), sae(), EXAMPLES)
    assert {plain[0]["id"], plain[1]["id"]} == {2, 4}   # both fire on every example
    aware = concept_search(lm(), sae(), EXAMPLES, stats=stats)
    assert aware[0]["id"] == 4 and aware[0]["baseline"] < 0.5
    dense = next(x for x in aware if x["id"] == 2)
    assert dense["baseline"] == 1.0 and dense["score"] == 0.0


def test_bad_input_fails_in_one_line():
    with pytest.raises(ConfigError, match="at least one example"):
        concept_search(lm(), sae(), [])
    with pytest.raises(ConfigError, match="need a tokenizer"):
        concept_search(lm(), sae(), ["some text"])
    with pytest.raises(ConfigError, match="example 1 encodes to no tokens"):
        concept_search(lm(), sae(), [[1], []])
