"""Feature statistics on a planted feature: density, top contexts, intervals, ablation."""

import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest

from saejax import parallel
from saejax.analysis import ablation, features, logits
from saejax.normalize import Normalizer
from saejax.sae.bundle import SAEBundle, load_bundle, save_bundle
from saejax.config import MeshConfig
from saejax.lm.config import ModelConfig
from saejax.lm.model import build_model
from saejax.sae.config import SAEConfig
from saejax.sae.model import SAEParams

V, T, D, N = 30, 16, 32, 64
P, Q = 7, 5                     # planted tokens of features 3 and 0
POS_DIM = 31                    # residual dimension carrying the position ramp
PLANTED = [(3, 2), (10, 15), (25, 9), (40, 0), (63, 12)]   # (row, position) of token P


@functools.cache
def planted_lm():
    """Token embedding e_tok (one-hot), position ramp t/T on POS_DIM: resid.pre is exact."""
    model = build_model(ModelConfig(vocab_size=V, max_len=T, d_model=D, n_heads=2, d_mlp=48,
                                    init_std=0.3), seed=0)
    model.wte[...] = jnp.eye(V, D)
    model.wpe[...] = jnp.zeros((T, D)).at[:, POS_DIM].set(jnp.arange(T) / T)
    return model


def planted_sae(norm_scale=1.0):
    """Feature 3 fires only on P (0.1 + 0.4 t/T), 0 only on Q, 1 never, 2 everywhere."""
    F = 8
    w = np.zeros((F, D), np.float32)
    b = np.full((F,), -1.0, np.float32)
    w[3, P], w[3, POS_DIM], b[3] = 1.0, 0.4, -0.9
    w[0, Q], b[0] = 1.0, -0.5
    w[2, POS_DIM], b[2] = 1.0, 0.05
    w_dec = np.eye(F, D, k=0, dtype=np.float32)
    w_dec[3] = np.eye(D)[P]
    # The SAE sees acts * norm_scale: scale the encoder so activations do not depend on it.
    params = SAEParams(W_enc=jnp.asarray(w / norm_scale), b_enc=jnp.asarray(b),
                       W_dec=jnp.asarray(w_dec), b_dec=jnp.zeros(D))
    return SAEBundle(params, SAEConfig(d_in=D, n_features=F), site="resid.pre",
                     normalizer=Normalizer(norm_scale))


def planted_tokens():
    rng = np.random.default_rng(0)
    toks = rng.integers(0, V, (N, T))
    toks[toks == P] = 1
    for r, t in PLANTED:
        toks[r, t] = P
    return toks.astype(np.int32)


CFG = features.FeatureStatsConfig(batch_size=16, top_k=8, n_intervals=4, samples_per_interval=3,
                                  interp=False,
                                  window_before=3, window_after=2, hist_bins=8,
                                  n_logit_tokens=3, ablation_contexts=2)


@pytest.fixture(scope="module")
def stats():
    return features.compute_feature_stats(planted_lm(), planted_sae(norm_scale=2.0),
                                          planted_tokens(), CFG,
                                          vocab=[f"t{i}" for i in range(V)])


def test_latent_sharded_and_single_device_runs_agree(stats):
    import jax

    for mesh in (parallel.make_mesh(MeshConfig(data=4, model=2)),
                 parallel.make_mesh(MeshConfig(data=1, model=1), devices=jax.devices()[:1])):
        other = features.compute_feature_stats(planted_lm(), planted_sae(norm_scale=2.0),
                                               planted_tokens(), CFG, mesh=mesh,
                                               vocab=[f"t{i}" for i in range(V)])
        assert other["density"] == stats["density"]
        for a, b in zip(other["features"], stats["features"], strict=True):
            assert a["top"] == b["top"] and a["hist"] == b["hist"]
            assert a["intervals"] == b["intervals"]  # same keys -> same random samples


def test_density_and_lists(stats):
    toks = planted_tokens()
    assert stats["density"][3] == pytest.approx(len(PLANTED) / (N * T))
    assert stats["density"][0] == pytest.approx(np.mean(toks == Q))
    assert stats["density"][2] == 1.0
    assert 1 in stats["silent"] and 3 not in stats["silent"]
    assert stats["dense"] == [0, 2]  # Q is ~1/V = 3% of tokens
    assert stats["meta"]["n_tokens"] == N * T
    l0 = np.asarray(stats["l0_hist"])
    assert l0.sum() == N * T
    want_l0 = 1 + np.mean(toks == Q) + len(PLANTED) / (N * T)
    assert stats["summary"]["mean_l0"] == pytest.approx(want_l0)


def test_top_contexts_are_the_planted_ones(stats):
    f = stats["features"][3]
    top = f["top"]
    assert len(top) == len(PLANTED)  # only firing examples are kept
    got = [(e["row"], e["pos"]) for e in top]
    assert got == sorted(PLANTED, key=lambda rp: -rp[1])  # activation grows with position
    for e in top:
        assert e["tokens"][e["center"]] == P
        assert e["act"] == pytest.approx(0.1 + 0.4 * e["pos"] / T, rel=1e-3)
        acts = np.asarray(e["acts"])
        assert acts[e["center"]] == pytest.approx(e["act"])
        assert np.count_nonzero(acts) == 1  # P appears once per planted context
        assert len(e["tokens"]) == 6
    assert f["max_act"] == pytest.approx(0.1 + 0.4 * 15 / T, rel=1e-3)
    assert sum(f["hist"]["counts"]) == len(PLANTED)


def test_interval_samples_lie_in_their_intervals(stats):
    f = stats["features"][0]
    n_q = int(np.sum(planted_tokens() == Q))
    seen = 0
    for iv in f["intervals"]:
        for e in iv["examples"]:
            assert iv["lo"] - 1e-3 <= e["act"] <= iv["hi"] + 1e-3
            assert e["tokens"][e["center"]] == Q
            seen += 1
    assert 0 < seen <= min(n_q, 4 * 3)
    f2 = stats["features"][2]  # fires everywhere with 0.05 + t/T: every interval populated
    assert all(len(iv["examples"]) == 3 for iv in f2["intervals"])


def test_logit_effects_match_a_direct_computation(stats):
    model, sae = planted_lm(), planted_sae(norm_scale=2.0)
    r = np.asarray(sae.params.W_dec[3]) / 2.0  # resid.pre site: the decoder vector itself
    gamma = np.asarray(model.ln_f.scale[...])
    want = ((r - r.mean()) * gamma) @ np.asarray(model.w_u[...])
    got = stats["features"][3]["logits"]
    assert [t for t, _ in got["top"]] == list(np.argsort(-want)[:3])
    assert got["top"][0][1] == pytest.approx(want.max(), rel=1e-3)
    assert got["bottom"][0][1] == pytest.approx(want.min(), rel=1e-3)
    direct = logits.feature_logit_effects(model, sae, k=3, fold_ln=False)
    np.testing.assert_allclose(direct["top_values"][3], np.sort(r @ np.asarray(model.w_u[...]))[::-1][:3],
                               rtol=1e-5)


def test_ablation_is_causal_and_only_where_the_feature_fires(stats):
    model, sae, toks = planted_lm(), planted_sae(norm_scale=2.0), planted_tokens()
    mesh = parallel.make_mesh(MeshConfig())
    pairs = [(3, r) for r, _ in PLANTED] + [(1, 0), (1, 1), (1, 2)]
    delta, fired = ablation.ablation_effects(model, sae, toks, pairs, batch_size=8, mesh=mesh)
    for j, (_r, t) in enumerate(PLANTED):
        if t == T - 1:
            continue
        assert np.all(delta[j, :t] == 0)        # earlier predictions cannot change
        assert delta[j, t] != 0                 # the planted position's prediction does
        assert fired[j].sum() == 1 and fired[j, t]
    assert np.all(delta[len(PLANTED):] == 0)   # a dead feature ablates nothing
    abl = stats["features"][3]["ablation"]
    assert abl["contexts"] == 2 and abl["delta_logp_active"] is not None
    assert stats["features"][1]["ablation"] is None


def test_stats_round_trip_as_strict_json(stats, tmp_path):
    path = tmp_path / "features.json"
    features.save_stats(stats, str(path))
    text = path.read_text()
    assert "NaN" not in text
    assert features.load_stats(str(path)) == json.loads(text)


def test_ultralow_threshold_finds_the_valley():
    rng = np.random.default_rng(0)
    density = np.concatenate([10 ** rng.normal(-3, 0.3, 900), 10 ** rng.normal(-6.5, 0.2, 100),
                              np.zeros(20)])
    thr = features.ultralow_threshold(density)
    assert 10 ** -5.8 < thr < 10 ** -3.8
    assert features.ultralow_threshold(10 ** rng.normal(-3, 0.3, 900)) == 1e-6  # unimodal


def test_sae_export_round_trip(tmp_path):
    sae = planted_sae(norm_scale=3.0)
    save_bundle(str(tmp_path / "sae.npz"), sae, extra={"step": 5})
    back, extra = load_bundle(str(tmp_path / "sae.npz"))
    assert extra == {"step": 5} and back.site == "resid.pre" and back.norm_scale == 3.0
    assert back.config == sae.config
    np.testing.assert_array_equal(back.params.W_enc, sae.params.W_enc)


def test_the_interpretability_score_explains_the_planted_feature():
    """Feature 0 fires exactly on token Q: its explanation is Q, and it predicts held-out
    firing; feature 2 fires on every token (nothing to tell apart: not scored)."""
    import dataclasses

    stats = features.compute_feature_stats(
        planted_lm(), planted_sae(norm_scale=2.0), planted_tokens(),
        dataclasses.replace(CFG, interp=True, interp_min_firings=5), vocab=[f"t{i}" for i in range(V)])
    rec = stats["features"][0]["interp"]
    assert rec["kind"] == "token" and rec["tokens"] == [Q]
    assert rec["auroc"] == 1.0 and rec["precision"] == 1.0 and rec["recall"] == 1.0
    assert stats["features"][2]["interp"] is None and stats["features"][1]["interp"] is None
    assert stats["summary"]["interp"]["n_scored"] >= 1
