"""LLM-free interpretability scores: count tables (sharded too), planted units, exact AUROC."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import parallel
from saejax.analysis import interp
from saejax.config import MeshConfig


def brute_tables(batches, v, f):
    """Counts per token with numpy loops over (context, position)."""
    fc, fp = np.zeros((2, v, f), np.int64), np.zeros((2, v, f), np.int64)
    tc, tp = np.zeros((2, v), np.int64), np.zeros((2, v), np.int64)
    for tokens, fired, half in batches:
        b, t = tokens.shape
        fired = fired.reshape(b, t, f)
        for i in range(b):
            h = half[i]
            for j in range(t):
                fc[h, tokens[i, j]] += fired[i, j]
                tc[h, tokens[i, j]] += 1
                if j:
                    fp[h, tokens[i, j - 1]] += fired[i, j]
                    tp[h, tokens[i, j - 1]] += 1
    return interp.TokenTables(fc, fp, tc, tp)


def random_batches(rng, n, b, t, v, f, density=0.3):
    return [(rng.integers(0, v, (b, t)).astype(np.int32), rng.random((b * t, f)) < density,
             rng.integers(0, 2, b).astype(np.int32)) for _ in range(n)]


def run_update(batches, v, f, mesh=None):
    tables = interp.init_tables(v, f)
    fn = jax.jit(interp.update_tables)
    if mesh is not None:
        tab_sh = interp.TokenTables(*(parallel.named_sharding(mesh, ax) for ax in (
            (None, None, "latent"), (None, None, "latent"), (None, None), (None, None))))
        tables = jax.device_put(tables, tab_sh)
        fn = jax.jit(interp.update_tables, out_shardings=tab_sh)
    for tokens, fired, half in batches:
        if mesh is not None:
            tokens = jax.device_put(tokens, parallel.named_sharding(mesh, ("batch", None)))
            half = jax.device_put(half, parallel.named_sharding(mesh, ("batch",)))
            fired = jax.device_put(fired, parallel.named_sharding(mesh, ("batch", "latent")))
        tables = fn(tables, tokens, fired, half)
    if mesh is not None:
        assert tables.fire_cur.sharding.spec == parallel.logical_to_spec((None, None, "latent"))
    return jax.tree.map(np.asarray, tables)


@pytest.mark.parametrize("mesh_shape", [None, (1, 8), (4, 2)])
def test_update_tables_matches_brute_force(mesh_shape):
    rng = np.random.default_rng(0)
    v, f = 11, 16
    # 3 * 20 = 60 rows per batch: not a multiple of the scan chunk when it is smaller
    batches = random_batches(rng, 3, 4, 15, v, f)
    batches[0][0][0, :3] = [v, -1, 3]  # out-of-range ids are dropped (and their successor)
    mesh = None if mesh_shape is None else parallel.make_mesh(MeshConfig(*mesh_shape))
    got = run_update(batches, v, f, mesh)
    clean = [(np.where((tk >= 0) & (tk < v), tk, 0), fd, h) for tk, fd, h in batches]
    want = brute_tables(clean, v, f)
    # subtract what the brute force counted for the two invalid ids (replaced by 0 above)
    tk, fd, h = batches[0]
    for j in (0, 1):
        want.fire_cur[h[0], 0] -= fd[j]
        want.tok_cur[h[0], 0] -= 1
        want.fire_prev[h[0], 0] -= fd[j + 1]
        want.tok_prev[h[0], 0] -= 1
    for name, a, b in zip(interp.TokenTables._fields, got, want, strict=True):
        assert a.dtype == np.int32, name
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_update_tables_chunked_scan(monkeypatch):
    """Several scan steps and a padded last chunk give the same counts."""
    rng = np.random.default_rng(1)
    batches = random_batches(rng, 2, 5, 13, 7, 8)
    want = run_update(batches, 7, 8)
    monkeypatch.setattr(interp, "_CHUNK", 16)     # 65 rows -> 5 chunks, 15 rows of padding
    got = run_update(batches, 7, 8)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


# Planted units on random token streams.
V, T, N = 64, 32, 800
MONO, POLY, PREV, SET, RARE, DEAD = range(6)


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, (N, T)).astype(np.int32)
    half = (rng.random(N) < 0.5).astype(np.int32)
    prev = np.pad(tokens[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    u = rng.random((6, N, T))
    fired = np.zeros((6, N, T), bool)
    fired[MONO] = np.where(tokens == 7, u[MONO] < 0.98, u[MONO] < 0.0005)   # token 7 + noise
    fired[POLY] = u[POLY] < 0.3                                      # unrelated to identity
    fired[PREV] = np.where(prev == 12, u[PREV] < 0.95, u[PREV] < 0.001)
    fired[SET] = ((tokens == 3) | ((tokens == 5) & (u[SET] < 0.9))
                  | ((tokens == 9) & (u[SET] < 0.8)))
    fired[RARE] = (tokens == 1) & (u[RARE] < 0.01)                   # ~2 firings per half
    fired = fired.reshape(6, -1).T
    tables = run_update([(tokens[i:i + 100], fired[i * T:(i + 100) * T], half[i:i + 100])
                         for i in range(0, N, 100)], V, 6)
    return tables, interp.score_units(tables, max_tokens=5)


def test_planted_units(planted):
    tables, s = planted
    assert (s["firings_fit"] + s["firings_heldout"] > 0).sum() == 5
    recs = interp.unit_records(s)
    mono = recs[MONO]
    assert mono["kind"] == "token" and mono["tokens"] == [7]
    assert mono["auroc"] > 0.95 and mono["f1"] > 0.9 and mono["precision"] > 0.9
    # Random 30% firing: the half-0 top rates are noise, so held-out AUROC ~ 0.5 and the
    # best <= 5-token rule covers at most ~5/64 of the 30% firing tokens.
    poly = recs[POLY]
    assert poly["auroc"] < 0.6 and poly["f1"] < 0.5
    assert mono["auroc"] > poly["auroc"] + 0.3 and mono["f1"] > poly["f1"] + 0.4
    prev = recs[PREV]
    assert prev["kind"] == "prev_token" and prev["tokens"] == [12]
    assert prev["auroc"] > 0.95 and prev["f1"] > 0.9
    assert s["fit_f1"][PREV] > 0.9
    assert recs[SET]["kind"] == "token" and recs[SET]["tokens"] == [3, 5, 9]
    assert recs[SET]["precision"] == pytest.approx(0.9, abs=0.05)
    assert recs[RARE] is None and recs[DEAD] is None
    assert s["kind"][RARE] == -1 and np.isnan(s["auroc"][RARE]) and np.isnan(s["f1"][DEAD])
    assert (s["tokens"][RARE] == -1).all()
    json.dumps(recs, allow_nan=False)
    small = interp.score_units(tables, max_tokens=5, block=1)   # sparse units: packed path
    for name in s:
        np.testing.assert_array_equal(small[name], s[name], err_msg=name)


def test_summarize(planted):
    _, s = planted
    summ = interp.summarize(s)
    json.dumps(summ, allow_nan=False)
    assert summ["n_scored"] == 4 and summ["n_units"] == 6 and summ["n_prev_token"] == 1
    assert summ["frac_auroc_ge_0.9"] == 0.75
    assert summ["auroc_median"] > 0.9
    empty = interp.score_units(planted[0], min_firings=10 ** 6)
    assert all(r is None for r in interp.unit_records(empty))
    summ = interp.summarize(empty)
    assert summ["n_scored"] == 0 and summ["auroc_median"] is None
    json.dumps(summ, allow_nan=False)


def reference_explanation(fire, tok, pos, k):
    """One unit: ranking by Python's sort, the best half-0 F1 prefix (``pos`` firings)."""
    cands = sorted((v for v in range(len(tok)) if fire[v] > 0),
                   key=lambda v: (-fire[v] / tok[v], -fire[v], v))[:k]
    best, best_f1, tp, flagged = [], -1.0, 0, 0
    for j, v in enumerate(cands):
        tp, flagged = tp + fire[v], flagged + tok[v]
        if 2 * tp / (flagged + pos) > best_f1:
            best, best_f1 = cands[:j + 1], 2 * tp / (flagged + pos)
    return best, best_f1


def test_scores_match_brute_force_on_individual_tokens():
    """Explanations, precision/recall/F1 and AUROC (with many ties) against per-token sums."""
    rng = np.random.default_rng(3)
    v, f, b, t = 9, 24, 60, 6
    tokens = rng.integers(0, v, (b, t)).astype(np.int32)
    tokens[tokens == 8] = 7                    # token 8 never occurs: unseen in both halves
    half = (np.arange(b) % 2).astype(np.int32)
    # firing depends (coarsely) on the token or the previous token: rates tie often
    prev = np.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    p_tok = rng.choice([0.0, 0.25, 0.5, 1.0], (f, v))
    key = np.where(np.arange(f)[:, None, None] % 2 == 0, tokens, prev)    # [F, B, T]
    fired = rng.random((f, b, t)) < np.take_along_axis(p_tok, key.reshape(f, -1), 1).reshape(
        f, b, t)
    fired[:, :, 0] |= rng.random((f, b)) < 0.3                # some firing at position 0
    tables = brute_tables([(tokens, fired.reshape(f, -1).T, half)], v, f)
    k = 3
    s = interp.score_units(tables, max_tokens=k, min_firings=5, block=5)
    assert (s["kind"] >= 0).sum() >= f - 4
    first_pos = np.zeros((b, t), bool)
    first_pos[:, 0] = True
    for u in range(f):
        if s["kind"][u] < 0:
            continue
        pos = tables.fire_cur[0, :, u].sum()
        tok_expl = [reference_explanation(tables[kd][0, :, u], tables[kd + 2][0], pos, k)
                    for kd in (0, 1)]
        kind = int(tok_expl[1][1] > tok_expl[0][1])
        assert s["kind"][u] == kind, u
        expl = tok_expl[kind][0]
        assert s["tokens"][u].tolist() == expl + [-1] * (k - len(expl)), u
        assert s["fit_f1"][u] == pytest.approx(tok_expl[kind][1])
        # held-out tokens, one by one
        keyed = tokens if kind == 0 else prev
        valid = ~first_pos if kind == 1 else np.ones_like(first_pos)
        rate = tables[kind][0, :, u] / np.maximum(tables[kind + 2][0], 1)
        held = half[:, None].repeat(t, 1) == 1
        y = fired[u][held]
        flag = (np.isin(keyed, expl) & valid)[held]
        score = np.where(valid, rate[keyed], 0.0)[held]
        tp = (y & flag).sum()
        assert s["precision"][u] == pytest.approx(tp / flag.sum() if flag.sum() else 0.0)
        assert s["recall"][u] == pytest.approx(tp / y.sum())
        assert s["f1"][u] == pytest.approx(2 * tp / (flag.sum() + y.sum()))
        sp, sn = score[y][:, None], score[~y][None, :]
        want = np.mean((sp > sn) + 0.5 * (sp == sn))
        assert s["auroc"][u] == pytest.approx(want, abs=1e-12), u
    recs = interp.unit_records(s)
    json.dumps(recs, allow_nan=False)
    json.dumps(interp.summarize(s), allow_nan=False)


def test_top_tokens_ties_at_the_cut():
    """Many tokens tied at the k-th rate: the tie-break (more firings, then lower id) picks."""
    tok = np.array([4, 2, 4, 2, 8, 4, 1, 2])
    fire = np.array([[2, 1, 2, 1, 4, 2, 0, 2],       # rates .5 .5 .5 .5 .5 .5 0 1
                     [0, 0, 0, 0, 0, 0, 1, 0]])
    got = interp._top_tokens(fire, tok, 3)
    assert got.tolist() == [[7, 4, 0], [6, -1, -1]]


def test_update_tables_is_jnp_traceable_under_eval_shape():
    out = jax.eval_shape(interp.update_tables, interp.init_tables(5, 3),
                         jnp.zeros((2, 4), jnp.int32), jnp.zeros((8, 3), bool),
                         jnp.zeros((2,), jnp.int32))
    assert out.fire_cur.shape == (2, 5, 3) and out.tok_prev.shape == (2, 5)


def test_best_prefix_prefers_the_shortest_on_f1_ties():
    tok = np.array([2, 4, 100])
    fire = np.array([[2, 1, 3]])        # [0]: F1 4/8; [0, 1]: F1 6/12, a tie; [0, 1, 2]: less
    expl, f1 = interp._best_prefix(fire, tok, fire.sum(1), 3)
    assert expl.tolist() == [[0, -1, -1]] and f1.tolist() == [0.5]


@pytest.mark.parametrize("nnz", [3, 12, 60])
def test_top_tokens_matches_sorting(nnz):
    """Packed (few firing tokens per unit) and dense paths against a full Python sort."""
    rng = np.random.default_rng(nnz)
    v, c, k = 64, 40, 5
    tok = rng.integers(0, 6, v)
    fire = np.zeros((c, v), np.int64)
    for i in range(c):
        cols = rng.choice(v, rng.integers(0, nnz + 1), replace=False)
        fire[i, cols] = rng.integers(0, tok[cols] + 1)
    got = interp._top_tokens(fire, tok, k)
    for i in range(c):
        want = sorted((u for u in range(v) if fire[i, u] > 0),
                      key=lambda u: (-fire[i, u] / tok[u], -fire[i, u], u))[:k]
        assert got[i].tolist() == want + [-1] * (k - len(want)), i
