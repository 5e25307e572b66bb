"""The sparse TopK step (saejax.sae.sparse): equal to the dense step (loss, gradients,
metrics, AuxK, k annealing), sharded equal to one device, the cost model and its refusals."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.config import ConfigError
from saejax.sae import model, sparse
from saejax.sae import sweep_step as sw
from saejax.sae.config import SAEConfig
from saejax.sae.gradcheck import check_backward
from saejax.sae.step import init_state, make_train_step


def mesh_of(devices, d, m):
    return jax.sharding.Mesh(np.array(devices[:d * m]).reshape(d, m), ("data", "model"))


def problem(seed=0, b=512, d=32, f=256):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, d)).astype(np.float32) * 2 + 0.3)
    cfg = SAEConfig(d_in=d, n_features=f, architecture="topk", k=8)
    params = model.init_params(jax.random.PRNGKey(seed), cfg, jnp.full((d,), 0.1, jnp.float32))
    params = params.replace(b_enc=jnp.asarray(rng.standard_normal(f).astype(np.float32) * 0.1))
    return cfg, params, x


@pytest.mark.parametrize("case", ["plain", "annealed_k", "auxk", "bf16"])
def test_sparse_forward_backward_equals_the_dense_one(case):
    cfg, params, x = problem()
    stale, ctx = None, None
    if case == "annealed_k":
        cfg = dataclasses.replace(cfg, k_anneal_start=24, k_anneal_fraction=0.5, total_steps=100)
        ctx = model.train_context(cfg, jnp.int32(20), anneal=True)  # k_t between 24 and 8
        assert 8 < int(ctx.k) < 24
    if case == "auxk":
        cfg = dataclasses.replace(cfg, aux_k=16, dead_window=5)
        stale = jnp.asarray(np.random.default_rng(1).integers(0, 10, cfg.n_features), jnp.int32)
        assert int(jnp.sum(stale >= 5)) > 16
    if case == "bf16":
        cfg = dataclasses.replace(cfg, precision="bf16")
    dense = model.forward_backward(params, x, cfg, stale=stale, ctx=ctx, sparse=False)
    sp = model.forward_backward(params, x, cfg, stale=stale, ctx=ctx, sparse=True)
    assert sp.f is None and dense.active is None
    a, idx = sp.active
    f_sparse = jnp.zeros_like(dense.f).at[jnp.arange(x.shape[0])[:, None], idx].set(a)
    np.testing.assert_array_equal(np.asarray(f_sparse), np.asarray(dense.f))
    if case == "auxk":
        assert float(sp.aux_loss) > 0
    assert_forward_close(sp, dense)


def assert_forward_close(sp, dense, tol=1e-5):
    """Loss, its parts, x_hat and the gradients of a sparse and a dense forward_backward.

    Float32 sums in another order (k gathered rows vs a matmul over F): differences at the
    scale of float32 rounding of the largest entries (with bf16 both round the same inputs).
    """
    for name in ("loss", "mse", "aux_loss", "x_hat"):
        want = np.asarray(getattr(dense, name))
        np.testing.assert_allclose(np.asarray(getattr(sp, name)), want, rtol=tol,
                                   atol=0.1 * tol * np.max(np.abs(want)), err_msg=name)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        want = np.asarray(getattr(dense.grads, name))
        np.testing.assert_allclose(np.asarray(getattr(sp.grads, name)), want, rtol=tol,
                                   atol=0.1 * tol * np.max(np.abs(want)), err_msg=name)


def test_the_sparse_backward_passes_the_autodiff_check():
    check_backward(SAEConfig(d_in=32, n_features=256, architecture="topk", k=8), sparse=True)


@pytest.mark.parametrize("shape", [(1, 1), (8, 1), (4, 1), (2, 4), (1, 8)])
def test_sparse_steps_equal_dense_steps_on_one_device(shape, devices):
    """12 steps with AuxK live: parameters, Adam state and metrics as the dense step's on
    one device (float tolerance), on one device, data-parallel and with the dictionary
    split over "model" (the kernel's shard_map, top k merged across slices)."""
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((12, 512, 32)).astype(np.float32) * 2
    cfg = SAEConfig(d_in=32, n_features=1024, architecture="topk", k=4, aux_k=16, dead_window=2)
    one = mesh_of(devices, 1, 1)
    ref, dense = init_state(dataclasses.replace(cfg, step_kernel="dense"), one, xs[0]), \
        make_train_step(dataclasses.replace(cfg, step_kernel="dense"), one)
    mesh = mesh_of(devices, *shape)
    sp_cfg = dataclasses.replace(cfg, step_kernel="sparse")
    st, step = init_state(sp_cfg, mesh, xs[0]), make_train_step(sp_cfg, mesh)
    aux = []
    for t in range(12):
        ref, m_ref = dense(ref, jnp.asarray(xs[t]))
        st, m = step(st, jnp.asarray(xs[t]))
        aux.append(float(m["aux_loss"]))
        for k in ("l0", "frac_dead", "feature_counts"):
            np.testing.assert_array_equal(np.asarray(m[k]), np.asarray(m_ref[k]), err_msg=f"{k} step {t}")
        np.testing.assert_allclose(float(m["loss"]), float(m_ref["loss"]), rtol=1e-5)
    assert max(aux) > 0  # AuxK ran
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, st)),
                    jax.tree.leaves(jax.tree.map(np.asarray, ref)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def group_and_solo_states(configs, mesh, xs):
    """(each member's state after a sweep group's steps on ``xs``, its own run's state)."""
    (group,) = sw.make_groups([f"m{i}" for i in range(len(configs))], configs)
    stack, gstep = sw.init_stack(group, mesh, xs[0]), sw.make_group_step(group, mesh)
    for x in xs:
        stack, _ = gstep(stack, jnp.asarray(x))
    get = sw.member_getter(group, mesh)
    for i, c in enumerate(configs):
        alone, step = init_state(c, mesh, xs[0]), make_train_step(c, mesh)
        for x in xs:
            alone, _ = step(alone, jnp.asarray(x))
        yield get(stack, i), alone


@pytest.mark.parametrize("shape", [(1, 1), (8, 1)])
def test_a_sweep_group_runs_the_sparse_step_member_for_member(shape, devices):
    """Bit for bit on one device; data-parallel (the kernel's shard_map inside the group's
    loop) to float rounding: XLA orders the gradient sums of the loop body differently."""
    mesh = mesh_of(devices, *shape)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((6, 256, 32)).astype(np.float32)
    base = SAEConfig(d_in=32, n_features=256, architecture="topk", k=4, step_kernel="sparse")
    configs = [base, dataclasses.replace(base, k=8, lr=3e-3, seed=1)]
    for member, alone in group_and_solo_states(configs, mesh, xs):
        for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(alone), strict=True):
            if shape == (1, 1):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            else:
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_the_cost_model_and_the_override():
    topk = SAEConfig(d_in=512, n_features=4096, architecture="topk", k=32)
    assert sparse.use_sparse(topk, backend="cpu")
    assert not sparse.use_sparse(dataclasses.replace(topk, n_features=512), backend="cpu")
    assert not sparse.use_sparse(dataclasses.replace(topk, step_kernel="dense"), backend="cpu")
    assert sparse.use_sparse(dataclasses.replace(topk, n_features=512, step_kernel="sparse"), backend="cpu")
    # k annealing starts at the larger k, which decides.
    assert not sparse.use_sparse(dataclasses.replace(topk, k_anneal_start=256, k_anneal_fraction=0.1,
                                                     total_steps=100), backend="cpu")
    # BatchTopK and Matryoshka have their sparse step (tests/test_sae_sparse_batch.py).
    assert sparse.use_sparse(SAEConfig(d_in=512, n_features=65536, architecture="batchtopk", k=32),
                             backend="cpu")
    assert not sparse.use_sparse(SAEConfig(d_in=512, n_features=65536, architecture="jumprelu"), backend="cpu")


def test_refusals_are_one_line():
    with pytest.raises(ConfigError, match=r"'sae.step_kernel' = 'sparse' is invalid: cannot be 'sparse': "
                                          r"architecture 'relu' has no sparse step"):
        SAEConfig(d_in=8, n_features=64, step_kernel="sparse")


@pytest.mark.parametrize("shape", [(2, 4), (1, 8), (8, 1)])
def test_the_sharded_kernel_equals_one_device(shape, devices):
    """The kernel itself under shard_map (annealed k, bf16 too): the same selected features
    as one device, bit for bit, and the loss and gradients to float rounding."""
    cfg, params, x = problem(f=512)
    mesh = mesh_of(devices, *shape)
    for k, precision in ((8, "f32"), (jnp.int32(5), "f32"), (8, "bf16")):
        one = sparse.core(params, x, k, 8, precision, None)
        shard = jax.jit(lambda p, xx: sparse.core(p, xx, k, 8, precision, mesh))(params, x)  # noqa: B023
        for i in (0, 1):  # a, idx
            np.testing.assert_array_equal(np.asarray(shard[i]), np.asarray(one[i]))
        for got, want in zip(shard[2:], one[2:], strict=True):
            want = np.asarray(want)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6 * np.max(np.abs(want)))
    # Slices narrower than k (64 features in 8 slices of 8, k 16): each offers all it has.
    _, params, x = problem(f=64)
    one = sparse.core(params, x, 16, 16, "f32", None)
    shard = jax.jit(lambda p, xx: sparse.core(p, xx, 16, 16, "f32", mesh_of(devices, 1, 8)))(params, x)
    np.testing.assert_array_equal(np.asarray(shard[1]), np.asarray(one[1]))
    np.testing.assert_allclose(np.asarray(shard[5]), np.asarray(one[5]), rtol=1e-5, atol=1e-7)


def test_k_equal_to_f_and_ties_at_zero_equal_the_dense_path():
    """k = F (every feature kept), and rows with fewer than k positive pre-activations (the
    k-th value ties at or below 0): both paths give the same features, loss and gradients."""
    cfg, params, x = problem(f=64)
    for k, shift in ((64, 0.0), (16, -3.0)):
        c = dataclasses.replace(cfg, k=k)
        p = params.replace(b_enc=params.b_enc + shift)  # shift -3: most rows < k positive
        dense = model.forward_backward(p, x, c, sparse=False)
        sp = model.forward_backward(p, x, c, sparse=True)
        a, idx = sp.active
        if shift:
            assert float(jnp.mean(jnp.sum(dense.f > 0, axis=-1) < k)) > 0.5
        f_sparse = jnp.zeros_like(dense.f).at[jnp.arange(x.shape[0])[:, None], idx].set(a)
        np.testing.assert_array_equal(np.asarray(f_sparse), np.asarray(dense.f))
        np.testing.assert_allclose(float(sp.loss), float(dense.loss), rtol=1e-5)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            want = np.asarray(getattr(dense.grads, name))
            np.testing.assert_allclose(np.asarray(getattr(sp.grads, name)), want, rtol=1e-5,
                                       atol=1e-6 * np.max(np.abs(want)), err_msg=name)


def test_positive_ties_keep_exactly_k_lowest_index_first():
    """Two identical dictionary rows tie at every input. The sparse path keeps exactly k
    (the lower index wins, as lax.top_k and torch.topk do); the dense path keeps every entry
    tied with the k-th value, so its L0 is k + 1 where the tie straddles the k-th place.
    Measure zero for trained dictionaries; the documented difference between the paths."""
    cfg, params, x = problem(f=64)
    cfg = dataclasses.replace(cfg, k=1)
    w = params.W_enc.at[1].set(params.W_enc[0]).at[:2].multiply(50.0)  # rows 0, 1 win every input
    p = params.replace(W_enc=w, b_enc=params.b_enc.at[1].set(params.b_enc[0]))
    dense = model.forward_backward(p, x, cfg, sparse=False)
    sp = model.forward_backward(p, x, cfg, sparse=True)
    a, idx = sp.active
    won = np.asarray(dense.f[:, 0] > 0)
    assert won.mean() > 0.2
    np.testing.assert_array_equal(np.asarray(idx[won, 0]), 0)
    np.testing.assert_array_equal(np.asarray(jnp.sum(dense.f > 0, axis=-1))[won], 2)
