"""The streaming analysis pass against brute force on a small random run: top-k, density,
the reservoir (histogram, interval samples), near-duplicate removal, the token tables of
the interpretability score, neighbours (decoder cosine, co-activation), neurons, and the
meshes (sharded == one device)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import parallel
from saejax.analysis import features, logits, neighbours, neurons
from saejax.analysis.feature_passes import run_pass
from saejax.config import ConfigError, MeshConfig
from saejax.lm.config import ModelConfig
from saejax.lm.model import build_model, forward, split_lm
from saejax.sae.bundle import SAEBundle
from saejax.sae.config import SAEConfig
from saejax.sae.model import SAEParams

V, T, D, M, F, N = 40, 16, 32, 24, 16, 64
SITE = "blocks.0.mlp.post"


@functools.cache
def lm():
    return build_model(ModelConfig(vocab_size=V, max_len=T, d_model=D, n_heads=2, d_mlp=M,
                                   init_std=0.3), seed=1)


@functools.cache
def sae():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(F, M)).astype(np.float32)
    params = SAEParams(W_enc=jnp.asarray(w), b_enc=jnp.asarray(rng.normal(size=F) - 1.5,
                                                                  jnp.float32),
                       W_dec=jnp.asarray(w / np.linalg.norm(w, axis=1, keepdims=True)),
                       b_dec=jnp.zeros(M))
    return SAEBundle(params, SAEConfig(d_in=M, n_features=F), site=SITE)


@functools.cache
def tokens():
    rng = np.random.default_rng(1)
    toks = rng.integers(0, V, (N, T)).astype(np.int32)
    toks[8:16] = toks[0]  # repeated contexts: near-duplicates for the top lists
    return toks


def brute_acts(bundle):
    graphdef, params = split_lm(lm())
    (acts,) = forward(graphdef, params, jnp.asarray(tokens()), sites=(SITE,),
                      logits=False).acts.values()
    return np.asarray(bundle.encode(acts.reshape(-1, acts.shape[-1])))   # [N*T, F]


def cfg(**kw):
    base = dict(batch_size=8, top_k=6, n_intervals=3, samples_per_interval=2, window_before=3,
                window_after=1, hist_bins=4, n_logit_tokens=3, ablation_contexts=0,
                reservoir=16, interp=True, interp_min_firings=3, neighbours=3,
                coact_tokens=N * T)
    return features.FeatureStatsConfig(**(base | kw))


@pytest.fixture(scope="module")
def raw_pass():
    graphdef, params = split_lm(lm())
    mesh = parallel.make_mesh(MeshConfig())
    return run_pass(graphdef, jax.device_put(params, parallel.replicated(mesh)),
                    sae().on_mesh(mesh), tokens(), mesh, batch=8, top=10, reservoir=16,
                    before=3, width=5, vocab=V, seed=0, active_tokens=N * T, n_active=F)


def test_streaming_top_k_and_density_equal_brute_force(raw_pass):
    # The brute force encodes all tokens in one matmul, the pass 8 contexts at a time:
    # activations agree to f32 rounding of sums of terms ~10 (atol 1e-4).
    state, _ = raw_pass
    f = brute_acts(sae())
    np.testing.assert_array_equal(state.count, (f > 0).sum(0))
    np.testing.assert_allclose(state.act_sum, f.sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(state.l0_hist, np.bincount((f > 0).sum(1), minlength=F + 1))
    want_val = -np.sort(-f, axis=0)[:10].T                          # [F, 10]
    np.testing.assert_allclose(state.top_val, want_val, rtol=1e-5, atol=1e-4)
    for i in range(F):  # positions hold those values (ties aside)
        np.testing.assert_allclose(f[state.top_pos[i], i], state.top_val[i], rtol=1e-5, atol=1e-4)
        for p, w in zip(state.top_pos[i], state.top_win[i], strict=True):
            row, t = divmod(int(p), T)
            s = min(max(t - 3, 0), T - 5)
            np.testing.assert_allclose(w, f[row * T + s:row * T + s + 5, i], rtol=1e-5,
                                       atol=1e-4)


def test_reservoir_is_a_sample_of_firings(raw_pass):
    state, _ = raw_pass
    f = brute_acts(sae())
    for i in range(F):
        valid = state.res_pri[i] >= 0
        fired = np.flatnonzero(f[:, i] > 0)
        assert valid.sum() == min(16, fired.size)   # M samples, or every firing
        pos = state.res_pos[i][valid]
        assert len(set(pos.tolist())) == pos.size and np.all(f[pos, i] > 0)
        np.testing.assert_allclose(state.res_act[i][valid], f[pos, i], rtol=1e-5, atol=1e-4)
        assert np.all(np.diff(state.res_pri[i][valid]) <= 0)


def test_token_tables_count_firings(raw_pass):
    state, _ = raw_pass
    f = brute_acts(sae())
    toks = tokens().reshape(-1)
    half = np.repeat(np.arange(N) % 2, T)          # a context's half is its row's parity
    prev = np.concatenate([[0], toks[:-1]])
    has_prev = np.tile(np.arange(T) > 0, N)
    tb = state.tables
    for h in (0, 1):
        sel = half == h
        np.testing.assert_array_equal(tb.tok_cur[h], np.bincount(toks[sel], minlength=V))
        np.testing.assert_array_equal(tb.tok_prev[h], np.bincount(prev[sel & has_prev], minlength=V))
        for i in range(F):
            on = sel & (f[:, i] > 0)
            np.testing.assert_array_equal(tb.fire_cur[h, :, i], np.bincount(toks[on], minlength=V))
            np.testing.assert_array_equal(tb.fire_prev[h, :, i],
                                          np.bincount(prev[on & has_prev], minlength=V))


def test_stats_top_lists_drop_near_duplicates_and_histograms_are_exact():
    f = brute_acts(sae())
    s = features.compute_feature_stats(lm(), sae(), tokens(), cfg(interp=False, neighbours=0))
    off = features.compute_feature_stats(lm(), sae(), tokens(),
                                         cfg(interp=False, neighbours=0, dedup=False))
    dropped = 0
    for i in range(F):
        keys = [(e["row"], e["pos"]) for e in s["features"][i]["top"]]
        local = [tuple(tokens()[r, max(t - 3, 0):t + 1]) for r, t in keys]
        assert len(set(local)) == len(local)              # one example per local context
        acts = [e["act"] for e in s["features"][i]["top"]]
        assert acts == sorted(acts, reverse=True)
        raw = [(e["row"], e["pos"]) for e in off["features"][i]["top"]]
        dropped += len(set(raw) - set(keys))
        n_fired = int((f[:, i] > 0).sum())
        hist = s["features"][i]["hist"]
        if n_fired <= 16:
            assert not hist["estimated"] and sum(hist["counts"]) == n_fired
        else:
            assert hist["estimated"] and abs(sum(hist["counts"]) - n_fired) <= 4
        for iv in s["features"][i]["intervals"]:
            for e in iv["examples"]:
                assert iv["lo"] - 1e-3 <= e["act"] <= iv["hi"] + 1e-3 and e["act"] > 0
    assert dropped > 0   # rows 8..15 repeat row 0: their contexts are duplicates


def test_neighbours_equal_brute_force(raw_pass):
    _, active = raw_pass
    f = brute_acts(sae())
    fired = f > 0
    ids, jac, info = neighbours.coactivation(active, F, 3)
    assert info == {"tokens": N * T, "truncated": int(np.sum(fired.all(1)))}
    inter = fired.T.astype(int) @ fired.astype(int)
    union = fired.sum(0)[:, None] + fired.sum(0)[None, :] - inter
    want = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    np.fill_diagonal(want, -1)
    for i in range(F):
        order = np.lexsort((np.arange(F), -want[i]))[:3]
        keep = want[i, order] > 0
        np.testing.assert_array_equal(ids[i][:keep.sum()], order[keep])
        np.testing.assert_allclose(jac[i][:keep.sum()], want[i, order][keep], rtol=1e-5)
    d = np.asarray(sae().params.W_dec)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    cos = d @ d.T
    np.fill_diagonal(cos, -np.inf)
    nid, ncos = neighbours.nearest_by_cosine(sae().directions(), 3, chunk=5)
    np.testing.assert_array_equal(nid, np.argsort(-cos, axis=1)[:, :3])
    np.testing.assert_allclose(ncos, -np.sort(-cos, axis=1)[:, :3], rtol=1e-5)


def test_neurons_are_units_of_the_identity_dictionary():
    nb = neurons.neuron_bundle(lm(), SITE)
    assert nb.n_features == M and neurons.site_width(lm(), "blocks.0.resid.pre") == D
    f = brute_acts(nb)
    graphdef, params = split_lm(lm())
    (acts,) = forward(graphdef, params, jnp.asarray(tokens()), sites=(SITE,),
                      logits=False).acts.values()
    np.testing.assert_allclose(f, np.maximum(np.asarray(acts).reshape(-1, M), 0), rtol=1e-6)
    s = features.compute_feature_stats(lm(), nb, tokens(), cfg(), unit="neuron")
    assert s["meta"]["unit"] == "neuron" and len(s["features"]) == M
    np.testing.assert_allclose(s["density"], (f > 0).mean(0))
    w_out = np.asarray(lm().blocks[0].mlp.w_out[...])
    le = logits.feature_logit_effects(lm(), nb, k=3, fold_ln=False)
    want = w_out @ np.asarray(logits.unembedding(lm()))
    np.testing.assert_allclose(le["top_values"], -np.sort(-want, axis=1)[:, :3], rtol=1e-4,
                               atol=1e-5)
    # Neighbours by decoder cosine compare the output weights.
    w = w_out / np.linalg.norm(w_out, axis=1, keepdims=True)
    cos = w @ w.T
    np.fill_diagonal(cos, -np.inf)
    alive = [i for i in range(M) if s["features"][i]["neighbours"]["decoder"]]
    for i in alive:
        assert s["features"][i]["neighbours"]["decoder"][0][0] == int(np.argmax(cos[i]))


def test_sharded_equals_one_device():
    c = cfg()
    ref = features.compute_feature_stats(lm(), sae(), tokens(), c,
                                         mesh=parallel.make_mesh(MeshConfig(data=1, model=1),
                                                                 devices=jax.devices()[:1]))
    for shape in ((4, 2), (1, 8)):
        got = features.compute_feature_stats(lm(), sae(), tokens(), c,
                                             mesh=parallel.make_mesh(MeshConfig(*shape)))
        # The same selections; activations to f32 rounding (a mesh with a model axis splits
        # the LM's reductions differently).
        assert got["density"] == ref["density"]
        for a, b in zip(got["features"], ref["features"], strict=True):
            assert _examples(a["top"]) == _examples(b["top"])
            np.testing.assert_allclose(_acts(a["top"]), _acts(b["top"]), rtol=1e-3, atol=1e-4)
            ia = [e for iv in a["intervals"] for e in iv["examples"]]
            ib = [e for iv in b["intervals"] for e in iv["examples"]]
            assert _examples(ia) == _examples(ib)
            np.testing.assert_allclose(_acts(ia), _acts(ib), rtol=1e-3, atol=1e-4)
            assert a["hist"] == b["hist"] and a["interp"] == b["interp"]
            assert a["neighbours"]["coact"] == b["neighbours"]["coact"]
            assert [j for j, _ in a["neighbours"]["decoder"]] == \
                [j for j, _ in b["neighbours"]["decoder"]]


def _examples(exs):
    return [(e["row"], e["pos"], e["tokens"], e["center"]) for e in exs]


def _acts(exs):
    return np.asarray([[e["act"]] + e["acts"] for e in exs], np.float64).reshape(-1)


def test_bad_settings_fail_in_one_line():
    with pytest.raises(ConfigError, match="reservoir"):
        features.compute_feature_stats(lm(), sae(), tokens(), cfg(reservoir=10_000))
    with pytest.raises(ConfigError, match="unit"):
        features.compute_feature_stats(lm(), sae(), tokens(), cfg(), unit="neurone")


def test_a_reservoir_larger_than_a_batchs_candidates_is_flagged_estimated():
    """Reservoir M 64 with 16 candidates per batch: a unit firing more than 16 times in a
    batch gets a histogram scaled to its firing count and flagged, and its interval
    samples are still real firings of the right activation."""
    f = brute_acts(sae())
    s = features.compute_feature_stats(lm(), sae(), tokens(),
                                       cfg(reservoir=64, interp=False, neighbours=0))
    per_batch = np.add.reduceat(f > 0, np.arange(0, N * T, 8 * T), axis=0)   # [batches, F]
    crowded = [i for i in range(F) if per_batch[:, i].max() > 16]
    assert crowded                                   # the random dictionary has such units
    for i in crowded:
        hist = s["features"][i]["hist"]
        n_fired = int((f[:, i] > 0).sum())
        assert hist["estimated"]
        assert abs(sum(hist["counts"]) - n_fired) <= len(hist["counts"]) / 2 + 1
        for iv in s["features"][i]["intervals"]:
            for e in iv["examples"]:
                assert f[e["row"] * T + e["pos"], i] == pytest.approx(e["act"], rel=1e-3, abs=1e-3)


def test_interpretability_tables_too_large_are_skipped_with_a_reason():
    s = features.compute_feature_stats(lm(), sae(), tokens(),
                                       cfg(neighbours=0, interp_max_table_bytes=1000))
    assert s["summary"]["interp"] is None and all(f["interp"] is None for f in s["features"])
    assert "exceed interp_max_table_bytes" in s["meta"]["interp_skipped"]
    ok = features.compute_feature_stats(lm(), sae(), tokens(), cfg(neighbours=0))
    assert ok["meta"]["interp_skipped"] is None and ok["summary"]["interp"]["n_scored"] > 0
