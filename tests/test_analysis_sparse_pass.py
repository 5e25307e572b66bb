"""The analysis pass's sparse form (a TopK dictionary's k active features per token; any
other dictionary's active features up to a cap) against its dense form and brute force: the
same counts, top lists, reservoir, token tables and active lists; on one device and on
meshes; the automatic choice and its bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import parallel
from saejax.analysis.feature_passes import run_pass, use_sparse
from saejax.config import ConfigError, MeshConfig
from saejax.lm.config import ModelConfig
from saejax.lm.model import build_model, forward, split_lm
from saejax.sae.bundle import SAEBundle
from saejax.sae.config import SAEConfig
from saejax.sae.model import SAEParams

V, T, D, M, F, N, K = 40, 16, 32, 24, 16, 64, 3
SITE = "blocks.0.mlp.post"
TOP, RES = 10, 16          # a unit fires ~24 times per batch of 128 tokens: more than TOP


@functools.cache
def lm():
    return build_model(ModelConfig(vocab_size=V, max_len=T, d_model=D, n_heads=2, d_mlp=M,
                                   init_std=0.3), seed=1)


def topk_sae(k=K, architecture="topk"):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(F, M)).astype(np.float32)
    extra = {"jumprelu": {"threshold": jnp.asarray(rng.uniform(0.0, 2.0, F), jnp.float32)},
             "batchtopk": {"threshold": jnp.asarray(0.7, jnp.float32)}}.get(architecture, {})
    params = SAEParams(W_enc=jnp.asarray(w), b_enc=jnp.asarray(rng.normal(size=F) - 0.5,
                                                                  jnp.float32),
                       W_dec=jnp.asarray(w / np.linalg.norm(w, axis=1, keepdims=True)),
                       b_dec=jnp.zeros(M), extra=extra)
    return SAEBundle(params, SAEConfig(d_in=M, n_features=F, architecture=architecture, k=k),
                     site=SITE)


@functools.cache
def tokens():
    return np.random.default_rng(1).integers(0, V, (N, T)).astype(np.int32)


def one_pass(sae, sparse, mesh=None, event_cap=None, cap=None, budget=None, info=None):
    mesh = mesh or parallel.make_mesh(MeshConfig())
    graphdef, params = split_lm(lm())
    return run_pass(graphdef, jax.device_put(params, parallel.replicated(mesh)),
                    sae.on_mesh(mesh), tokens(), mesh, batch=8, top=TOP, reservoir=RES,
                    before=3, width=5, vocab=V, seed=0, active_tokens=N * T // 2, n_active=5,
                    sparse=sparse, event_cap=event_cap, cap=cap, budget=budget, info=info)


def brute_acts(sae):
    graphdef, params = split_lm(lm())
    (acts,) = forward(graphdef, params, jnp.asarray(tokens()), sites=(SITE,),
                      logits=False).acts.values()
    return np.asarray(sae.encode(acts.reshape(-1, acts.shape[-1])))


def assert_same_pass(a, b, atol=0.0):
    (sa, act_a), (sb, act_b) = a, b
    np.testing.assert_array_equal(sa.count, sb.count)
    np.testing.assert_allclose(sa.act_sum, sb.act_sum, rtol=1e-5)
    np.testing.assert_array_equal(sa.l0_hist, sb.l0_hist)
    for i in range(F):
        # Valid entries: a fired example (value > 0) and a drawn firing (priority >= 0). The
        # dense form pads with value-0 rows, the sparse one with -1: neither is read.
        va, vb = sa.top_val[i] > 0, sb.top_val[i] > 0
        np.testing.assert_array_equal(va, vb)
        np.testing.assert_array_equal(sa.top_pos[i][va], sb.top_pos[i][vb])
        np.testing.assert_allclose(sa.top_val[i][va], sb.top_val[i][vb], atol=atol)
        np.testing.assert_allclose(sa.top_win[i][va], sb.top_win[i][vb], atol=atol)
        ra, rb = sa.res_pri[i] >= 0, sb.res_pri[i] >= 0
        np.testing.assert_array_equal(ra, rb)
        for name in ("res_pri", "res_pos"):
            np.testing.assert_array_equal(getattr(sa, name)[i][ra], getattr(sb, name)[i][rb])
        np.testing.assert_allclose(sa.res_act[i][ra], sb.res_act[i][rb], atol=atol)
        np.testing.assert_allclose(sa.res_win[i][ra], sb.res_win[i][rb], atol=atol)
    for x, y in zip(sa.tables, sb.tables, strict=True):
        np.testing.assert_array_equal(x, y)
    assert len(act_a) == len(act_b) == 4          # 512 of 1,024 tokens, 128 per batch
    for (v1, i1), (v2, i2) in zip(act_a, act_b, strict=True):
        np.testing.assert_allclose(v1, v2, atol=atol)
        on = v1 > 0
        np.testing.assert_array_equal(i1[on], i2[on])


@pytest.mark.parametrize("k", [K, F])      # k = F: every feature is a candidate on every token
def test_sparse_pass_equals_dense_pass(k):
    sae = topk_sae(k)
    dense, sparse = one_pass(sae, False), one_pass(sae, True)
    assert_same_pass(dense, sparse)
    state = sparse[0]
    f = brute_acts(sae)
    np.testing.assert_array_equal(state.count, (f > 0).sum(0))
    assert state.count.max() > 2 * TOP        # the per-unit cut of the events was exercised
    for i in range(F):                        # the top lists are the brute-force top lists
        want = np.sort(f[:, i][f[:, i] > 0])[::-1][:TOP]
        np.testing.assert_allclose(state.top_val[i][:want.size], want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1, 8)])
def test_sparse_pass_sharded_equals_one_device(shape):
    sae = topk_sae()
    ref = one_pass(sae, True, parallel.make_mesh(MeshConfig(data=1, model=1),
                                                 devices=jax.devices()[:1]), event_cap=100)
    # Positions and counts equal; activations to f32 rounding (a model axis splits the LM's
    # reductions differently). Cap 100: batches of both selections (see below).
    got = one_pass(sae, True, parallel.make_mesh(MeshConfig(*shape)), event_cap=100)
    assert got[0].compacted == ref[0].compacted > 0
    assert_same_pass(got, ref, atol=1e-4)


def test_automatic_choice_and_bad_input():
    assert not use_sparse(topk_sae(K))                 # 8 k > F: dense
    assert use_sparse(topk_sae(2))                     # 8 k <= F: sparse
    assert not use_sparse(topk_sae(K, "relu"))         # not TopK: dense unless asked
    assert use_sparse(topk_sae(K), True) and not use_sparse(topk_sae(2), False)
    assert use_sparse(topk_sae(K, "relu"), True)
    with pytest.raises(ValueError, match="k-sparse"):
        topk_sae(K, "relu").encode_sparse(jnp.zeros((2, M)))
    with pytest.raises(ValueError, match=r"cap must be in \[1, 16\]"):
        one_pass(topk_sae(K, "jumprelu"), True, cap=0)


@pytest.mark.parametrize("cap", [1, 100, 10_000])
def test_selection_from_few_events_equals_selection_from_all(cap):
    # cap 1: (almost) every batch selects from all events; 10,000: every batch from the few
    # above the lists' minimum; 100: both, batch by batch.
    sae = topk_sae()
    got = one_pass(sae, True, event_cap=cap)
    n_batches = N // 8
    if cap == 10_000:
        assert got[0].compacted == n_batches
    elif cap == 100:
        assert 0 < got[0].compacted < n_batches
    else:
        assert got[0].compacted == 0
    assert_same_pass(got, one_pass(sae, False))


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_feature_stats_are_the_same_in_both_forms(arch):
    from saejax.analysis.features import FeatureStatsConfig, compute_feature_stats

    cfg = dict(batch_size=8, top_k=6, n_intervals=3, samples_per_interval=2, window_before=3,
               window_after=1, hist_bins=4, n_logit_tokens=3, ablation_contexts=0,
               reservoir=16, interp=True, interp_min_firings=3, neighbours=3, coact_tokens=N * T)
    sae = topk_sae(K, arch)
    got = {form: compute_feature_stats(lm(), sae, tokens(), FeatureStatsConfig(**cfg, pass_form=form))
           for form in ("sparse", "dense")}
    s, d = got["sparse"], got["dense"]
    assert (s["meta"]["pass_form"], d["meta"]["pass_form"]) == ("sparse", "dense")
    assert s["meta"]["pass_cap"] == (K if arch == "topk" else 16) and d["meta"]["pass_cap"] == 0
    assert d["meta"]["pass_budget"] == 0
    assert s["meta"]["pass_budget"] == 0 if arch == "topk" else 8 <= s["meta"]["pass_budget"] <= 16
    assert s["density"] == d["density"] and s["l0_hist"] == d["l0_hist"]
    assert s["summary"]["interp"] == d["summary"]["interp"]
    for a, b in zip(s["features"], d["features"], strict=True):
        for key in ("top", "intervals", "hist", "interp", "neighbours"):
            assert a[key] == b[key], key
    with pytest.raises(ConfigError, match="pass_form"):
        FeatureStatsConfig(pass_form="fast")


def per_token_l0(sae):
    return (brute_acts(sae) > 0).sum(axis=1)


# 20 s each: JumpReLU in the default suite, the others (the same code path) behind `slow`.
@pytest.mark.parametrize("arch", ["jumprelu", pytest.param("batchtopk", marks=pytest.mark.slow),
                                  pytest.param("relu", marks=pytest.mark.slow)])
def test_capped_sparse_pass_equals_dense_pass(arch):
    """A dictionary with a varying number of active units per token (JumpReLU; BatchTopK's
    inference form; ReLU): the capped sparse form equals the dense form whether no batch,
    some batches or every batch has a token over the cap, or more events than the budget
    (those run the dense form), with the events compacted into the budget or not."""
    sae = topk_sae(K, arch)
    per_token = per_token_l0(sae).reshape(N // 8, -1)        # batches of 8 x 16 tokens
    l0 = per_token.max(axis=1)                               # the most per token, per batch
    per_batch = per_token.sum(axis=1)                        # events per batch
    dense = one_pass(sae, False)
    n_batches = N // 8
    mid = int(np.median(l0))
    for cap, dense_batches in ((int(l0.max()), 0), (mid, int((l0 > mid).sum())), (1, n_batches)):
        info = {}
        got = one_pass(sae, True, cap=cap, info=info)
        assert info == {"form": "sparse", "cap": cap, "budget": 0}
        assert int(got[0].dense_batches) == dense_batches
        assert_same_pass(got, dense, atol=1e-6)
    assert 0 < int((l0 > mid).sum()) < n_batches     # the middle cap mixed both forms
    # Compacted events: a budget per token (x 128 tokens) that every batch fits, and one
    # below it that some batches exceed (here all: the batches hold 657-749 events).
    cap = int(l0.max())
    fits = -(-int(per_batch.max()) // 128)
    assert fits < cap and (per_batch > 128 * (fits - 1)).any()
    for budget in (fits, fits - 1):
        got = one_pass(sae, True, cap=cap, budget=budget)
        assert int(got[0].dense_batches) == int((per_batch > 128 * budget).sum())
        assert_same_pass(got, dense, atol=1e-6)
    # The probed cap and budget: twice the first batch's most and 1.5 times its mean,
    # rounded up to powers of two (8 to F).
    info = {}
    one_pass(sae, True, info=info)
    pow2 = lambda n: min(F, max(8, 1 << (int(n) - 1).bit_length()))  # noqa: E731
    assert (info["cap"], info["budget"]) == (pow2(2 * l0[0]), min(info["cap"], pow2(np.ceil(1.5 * per_token[0].mean()))))
    info = {}
    one_pass(sae, None, info=info)                   # auto: dense for all but TopK
    assert info == {"form": "dense", "cap": 0, "budget": 0}


@pytest.mark.parametrize("shape", [(2, 4)])
def test_capped_sparse_pass_sharded_equals_one_device(shape):
    # Some batches over the cap, the rest compacted into the budget.
    sae = topk_sae(K, "jumprelu")
    per_token = per_token_l0(sae).reshape(N // 8, -1)
    cap = int(np.median(per_token.max(axis=1)))
    budget = -(-int(per_token.sum(axis=1).max()) // 128)
    assert budget < cap
    kw = dict(event_cap=100, cap=cap, budget=budget)
    ref = one_pass(sae, True, parallel.make_mesh(MeshConfig(data=1, model=1), devices=jax.devices()[:1]), **kw)
    got = one_pass(sae, True, parallel.make_mesh(MeshConfig(*shape)), **kw)
    assert got[0].dense_batches == ref[0].dense_batches > 0
    assert_same_pass(got, ref, atol=1e-4)
