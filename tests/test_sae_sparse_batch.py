"""The sparse BatchTopK and Matryoshka step (saejax.sae.sparse_batch): the same features,
loss, gradients, running-threshold statistics and firing counts as the dense step on each
of the threshold's three paths, in the train step sharded over every mesh, inside a sweep
group, and through the automatic choice."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.sae import model, sparse, sparse_batch
from saejax.sae.config import SAEConfig
from saejax.sae.gradcheck import check_backward
from saejax.sae.step import init_state, make_train_step
from test_sae_sparse import assert_forward_close, group_and_solo_states


def mesh_of(devices, d, m):
    return jax.sharding.Mesh(np.array(devices[:d * m]).reshape(d, m), ("data", "model"))


def inputs(seed=0, b=512, d=32, loud=0, scale=5.0):
    """Rows of one norm (per-row counts near k: the candidates suffice), the first ``loud``
    of them 3x longer (they keep far more than 2 k features)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, d)).astype(np.float32)
    x *= scale / np.linalg.norm(x, axis=1, keepdims=True)
    x[:loud] *= 3
    return x


GROUPS = (16, 48, 64, 128)  # Matryoshka groups of F 256 whose bounds are not shard bounds


def problem(k=16, f=256, d=32, arch="batchtopk", **kw):
    cfg = SAEConfig(d_in=d, n_features=f, architecture=arch, k=k,
                    matryoshka_groups=GROUPS if arch == "matryoshka" and f == 256 else ())
    params = model.init_params(jax.random.PRNGKey(0), cfg, jnp.zeros((d,), jnp.float32))
    params = params.replace(b_enc=jnp.asarray(np.random.default_rng(1).standard_normal(f).astype(np.float32) * 0.1))
    return cfg, params, jnp.asarray(inputs(d=d, **kw))


@pytest.mark.parametrize("arch, case, path", [
    ("batchtopk", "candidates", 0), ("batchtopk", "loud_rows", 1), ("batchtopk", "too_many_loud", 2),
    ("batchtopk", "few_positive", 0), ("batchtopk", "ties", 1), ("batchtopk", "auxk", 1),
    ("batchtopk", "bf16", 1), ("batchtopk", "annealed_k", 0),
    ("matryoshka", "candidates", 0), ("matryoshka", "loud_rows", 1), ("matryoshka", "too_many_loud", 2),
    ("matryoshka", "auxk", 1), ("matryoshka", "bf16", 1),
])
def test_sparse_forward_backward_equals_the_dense_one(arch, case, path):
    kw = {"loud": 5} if case in ("loud_rows", "auxk", "bf16", "few_positive") else {}
    kw = {"loud": 100} if case == "too_many_loud" else kw
    cfg, params, x = problem(arch=arch, **kw)
    stale, ctx = None, None
    if case == "few_positive":  # fewer than B k positive pre-activations: t = 0
        params = params.replace(b_enc=params.b_enc - 4.0)
    if case == "ties":  # pre-activations on a coarse grid: many ties at the threshold
        x = jnp.round(x)
        params = params.replace(W_enc=jnp.round(params.W_enc * 8) / 8, b_enc=jnp.zeros_like(params.b_enc))
    if case == "auxk":
        cfg = dataclasses.replace(cfg, aux_k=16, dead_window=5)
        stale = jnp.asarray(np.random.default_rng(1).integers(0, 10, cfg.n_features), jnp.int32)
    if case == "bf16":
        cfg = dataclasses.replace(cfg, precision="bf16")
    if case == "annealed_k":
        cfg = dataclasses.replace(cfg, k=8, k_anneal_start=24, k_anneal_fraction=0.5, total_steps=100)
        ctx = model.train_context(cfg, jnp.int32(20), anneal=True)  # k_t between 24 and 8
        assert 8 < int(ctx.k) < 24
    dense = model.forward_backward(params, x, cfg, stale=stale, ctx=ctx, sparse=False)
    sp = model.forward_backward(params, x, cfg, stale=stale, ctx=ctx, sparse=True)
    assert sp.f is None and sp.active is None and dense.f is not None
    assert int(dense.stats["path"]) == int(sp.stats["path"]) == path
    kept = np.asarray(dense.f) > 0
    if case == "few_positive":
        assert float(dense.stats["kept_min"]) > 0 and kept.sum() < x.shape[0] * cfg.k
    if case == "ties":
        t = float(dense.stats["kept_min"])
        assert np.sum(np.asarray(dense.f) == t) > 1
    np.testing.assert_array_equal(np.asarray(sp.counts), kept.sum(0))
    np.testing.assert_array_equal(np.asarray(sp.stats["kept_min"]), np.asarray(dense.stats["kept_min"]))
    np.testing.assert_allclose(np.asarray(sp.l1_rows), np.asarray(dense.f).sum(-1), rtol=1e-6)
    if case == "auxk":
        assert float(sp.aux_loss) > 0
    if path == 1:  # some rows keep more features than the kernel's candidates hold
        assert kept.sum(1).max() > sparse_batch.width(cfg.k)
    assert_forward_close(sp, dense)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_kept_entries_the_packed_rows_cannot_hold_take_the_dense_path(arch, monkeypatch):
    """The gather-dots and scatter-adds run on the kept entries packed into
    packed_rows(b) x k slots: with room for fewer, the step is the dense one and says so
    (threshold path 2 where the dense step's own threshold took path 0); with exactly
    enough room, the kernel's own result."""
    cfg, params, x = problem(arch=arch)
    dense = model.forward_backward(params, x, cfg, sparse=False)
    kept = int((np.asarray(dense.f) > 0).sum())
    assert int(dense.stats["path"]) == 0 and kept > cfg.k
    # The r dense rows (any r rows on path 0, each keeping at most W) are not packed.
    packed_least = kept - sparse_batch.dense_rows(x.shape[0]) * sparse_batch.width(cfg.k)
    for rows, path in [((packed_least - 1) // cfg.k, 2), (-(-kept // cfg.k), 0)]:
        monkeypatch.setattr(sparse_batch, "packed_rows", lambda b, rows=rows: rows)
        sp = model.forward_backward(params, x, cfg, sparse=True)
        assert int(sp.stats["path"]) == path, rows
        np.testing.assert_array_equal(np.asarray(sp.counts), (np.asarray(dense.f) > 0).sum(0))
        assert_forward_close(sp, dense)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_the_sparse_backward_passes_the_autodiff_check(arch):
    from saejax.sae import gradcheck

    for k in (1, 8) if arch == "batchtopk" else (8,):
        gradcheck._CHECKED.clear()  # checked once per architecture and process otherwise
        check_backward(SAEConfig(d_in=32, n_features=4096, architecture=arch, k=k), sparse=True)


@pytest.mark.parametrize("arch, shape", [("batchtopk", (1, 1)), ("batchtopk", (2, 4)), ("matryoshka", (2, 4)),
                                         pytest.param("batchtopk", (8, 1), marks=pytest.mark.slow),
                                         pytest.param("batchtopk", (1, 8), marks=pytest.mark.slow),
                                         pytest.param("matryoshka", (1, 1), marks=pytest.mark.slow)])
def test_sparse_steps_equal_dense_steps_on_one_device(arch, shape, devices):
    """12 steps with AuxK live, the loud rows of every third batch taking the dense rows
    and batch 7 the dense fallback: parameters (the running threshold included), Adam
    state, firing counts and metrics as the dense step's on one device."""
    xs = np.stack([inputs(seed=t, loud=(200 if t == 7 else 4 * (t % 3 == 0))) for t in range(12)])
    # Matryoshka's default groups: the first (F / 16) lies inside one of the "model" slices.
    cfg = SAEConfig(d_in=32, n_features=4096, architecture=arch, k=16, aux_k=16, dead_window=2)
    one = mesh_of(devices, 1, 1)
    dense_cfg = dataclasses.replace(cfg, step_kernel="dense")
    ref, dense = init_state(dense_cfg, one, xs[0]), make_train_step(dense_cfg, one)
    mesh = mesh_of(devices, *shape)
    sp_cfg = dataclasses.replace(cfg, step_kernel="sparse")
    st, step = init_state(sp_cfg, mesh, xs[0]), make_train_step(sp_cfg, mesh)
    paths, aux = [], []
    for t in range(12):
        ref, m_ref = dense(ref, jnp.asarray(xs[t]))
        st, m = step(st, jnp.asarray(xs[t]))
        paths.append(int(m["threshold_path"]))
        aux.append(float(m["aux_loss"]))
        for key in ("l0", "frac_dead", "feature_counts"):
            np.testing.assert_array_equal(np.asarray(m[key]), np.asarray(m_ref[key]), err_msg=f"{key} step {t}")
        np.testing.assert_allclose(float(m["loss"]), float(m_ref["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m["l1"]), float(m_ref["l1"]), rtol=1e-5)
        if shape == (1, 1):  # sharded, each data shard may take r = its rows / 16 whole
            assert paths[-1] == int(m_ref["threshold_path"])
    assert {0, 1, 2} <= set(paths) if shape == (1, 1) else 2 in paths, paths
    assert max(aux) > 0  # AuxK ran
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, st)),
                    jax.tree.leaves(jax.tree.map(np.asarray, ref)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch, shape", [("batchtopk", (8, 1)),
                                         pytest.param("batchtopk", (1, 1), marks=pytest.mark.slow),
                                         pytest.param("matryoshka", (2, 4), marks=pytest.mark.slow)])
def test_a_sweep_group_runs_the_sparse_step_member_for_member(arch, shape, devices):
    """Members of different k share one program (a traced k, 2 k_max candidates)."""
    mesh = mesh_of(devices, *shape)
    xs = np.stack([inputs(seed=t, b=256, loud=2) for t in range(6)])
    base = SAEConfig(d_in=32, n_features=512, architecture=arch, k=4, step_kernel="sparse")
    configs = [base, dataclasses.replace(base, k=8, lr=3e-3, seed=1)]
    for c, (member, alone) in zip(configs, group_and_solo_states(configs, mesh, xs), strict=True):
        for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(alone), strict=True):
            if c.k == max(cc.k for cc in configs):  # the same program: bit for bit
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            else:  # 2 k_max candidates in the group, 2 k alone: ~1 ulp apart (measured 3e-8)
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_the_cost_model_counts_the_candidates():
    cfg = SAEConfig(d_in=512, n_features=4096, architecture="batchtopk", k=32)
    assert sparse.use_sparse(cfg, backend="cpu")                      # 4,096 >= 32 * 2 * 32
    assert not sparse.use_sparse(dataclasses.replace(cfg, n_features=1024), backend="cpu")
    assert sparse.use_sparse(dataclasses.replace(cfg, n_features=1024, step_kernel="sparse"), backend="cpu")
    # Matryoshka, with its kept entries packed, crosses over where BatchTopK does: F >= 32 * 2 k.
    mat = dataclasses.replace(cfg, architecture="matryoshka")
    assert sparse.use_sparse(dataclasses.replace(mat, n_features=2048), backend="cpu")
    assert not sparse.use_sparse(dataclasses.replace(mat, n_features=1024), backend="cpu")
    assert sparse.use_sparse(dataclasses.replace(mat, k_anneal_start=64, k_anneal_fraction=0.1), backend="cpu")
    assert not sparse.use_sparse(dataclasses.replace(mat, k_anneal_start=128, k_anneal_fraction=0.1),
                                 backend="cpu")  # counts the largest k: 4,096 < 32 * 2 * 128
    assert sparse.supports(dataclasses.replace(cfg, architecture="jumprelu")) is not None


def test_candidates_covering_the_dictionary_take_the_dense_path():
    cfg, params, x = problem(k=64, f=128)  # 2 k >= F
    dense = model.forward_backward(params, x, cfg, sparse=False)
    sp = model.forward_backward(params, x, cfg, sparse=True)
    np.testing.assert_array_equal(np.asarray(sp.counts), (np.asarray(dense.f) > 0).sum(0))
    np.testing.assert_array_equal(np.asarray(sp.grads.W_enc), np.asarray(dense.grads.W_enc))
