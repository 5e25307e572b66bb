"""The native top-k (saejax.native) equals lax.top_k: values, indices, order and ties."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from saejax import native
from saejax.native import topk as native_topk


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def _same(x, k):
    want_v, want_i = jax.lax.top_k(x, k)
    got_v, got_i = jax.jit(native.top_k, static_argnums=1)(x, k)
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))


def test_builds_and_is_used():
    # CI and the development machines have a C++ compiler: a build that silently fell back
    # to lax.top_k would make every other test here compare lax.top_k with itself.
    if os.environ.get("SAEJAX_NATIVE") == "0":
        pytest.skip("SAEJAX_NATIVE=0")
    assert native.available(), native.build_error()
    x = jnp.zeros((4, 64), jnp.float32)
    assert native_topk.TARGET in _hlo(lambda v: native.top_k(v, 8), x)
    # Other dtypes take lax.top_k.
    assert native_topk.TARGET not in _hlo(lambda v: native.top_k(v, 8), x.astype(jnp.bfloat16))


@pytest.mark.parametrize("n,k", [(4096, 32), (4096, 64), (1000, 7), (300, 32), (64, 64), (50, 1)])
def test_random_rows(n, k):
    # n 4,096: the block path (blocks of n / 4k); 300 at k 32 and k = n: every entry a candidate.
    x = np.random.default_rng(n + k).normal(size=(96, n)).astype(np.float32)
    _same(x, k)


@pytest.mark.parametrize("k", [1, 32, 100])
def test_ties(k):
    # Few distinct values: ties at and across the k-th value, decided by the lower index.
    rng = np.random.default_rng(k)
    x = rng.integers(-2, 3, size=(64, 2048)).astype(np.float32)
    x[0] = 1.0                       # a whole row tied
    x[1, :] = 0.0
    x[1, ::7] = -0.0                 # -0.0 sorts below +0.0, as in XLA's total order
    _same(x, k)


def test_special_values():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4096)).astype(np.float32)
    specials = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, np.finfo(np.float32).max,
                         np.finfo(np.float32).tiny, -np.finfo(np.float32).tiny], np.float32)
    for r in range(16):
        x[r, rng.choice(4096, specials.size, replace=False)] = specials
    x[3, 100:200] = np.inf           # more than k entries at +inf
    x[4, :] = -np.inf
    for k in (1, 9, 32):
        _same(x, k)


def test_leading_dims_and_vmap():
    x = np.random.default_rng(1).normal(size=(3, 5, 2048)).astype(np.float32)
    _same(x, 16)
    got = jax.jit(jax.vmap(lambda r: native.top_k(r, 16)))(x)
    want = jax.vmap(lambda r: jax.lax.top_k(r, 16))(x)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_inside_shard_map():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(64, 4096)).astype(np.float32))
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    fn = jax.jit(jax.shard_map(lambda v: native.top_k(v, 32), mesh=mesh, in_specs=P("data"),
                               out_specs=(P("data"), P("data"))))
    got = fn(x)
    want = jax.lax.top_k(x, 32)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


def test_gradient_equals_lax():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 512)).astype(np.float32))
    w = jnp.arange(16, dtype=jnp.float32)
    loss = lambda fn: lambda v: jnp.sum(jnp.square(fn(v, 16)[0]) * w)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(jax.grad(loss(native.top_k))(x)),
                                  np.asarray(jax.grad(loss(jax.lax.top_k))(x)))


def test_failed_build_says_why(tmp_path):
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        native_topk.build(cxx="no-such-compiler-xyz", out_dir=tmp_path)
    fake = tmp_path / "broken-cxx"
    fake.write_text("#!/bin/sh\necho 'fatal: broken compiler' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="could not build topk.cc: fatal: broken compiler"):
        native_topk.build(cxx=str(fake), out_dir=tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.so"))  # nothing half-built is left


def test_disabled_falls_back(monkeypatch):
    monkeypatch.setattr(native_topk, "_load", lambda: (False, "off"))
    x = jnp.ones((4, 64), jnp.float32)
    assert native_topk.TARGET not in _hlo(lambda v: native.top_k(v, 8), x)
    _same(np.random.default_rng(4).normal(size=(4, 64)).astype(np.float32), 8)


def test_the_sparse_kernel_selects_with_it(devices):
    # The sparse TopK step's selection (and BatchTopK's, through the same _select) runs the
    # native kernel, on one device and inside the kernel's shard_map.
    if os.environ.get("SAEJAX_NATIVE") == "0":
        pytest.skip("SAEJAX_NATIVE=0")
    from saejax.sae import model, sparse
    from saejax.sae.config import SAEConfig

    cfg = SAEConfig(d_in=16, n_features=256, architecture="topk", k=8)
    params = model.init_params(jax.random.PRNGKey(0), cfg, jnp.zeros((16,), jnp.float32))
    x = jnp.ones((64, 16), jnp.float32)
    mesh = Mesh(np.array(devices).reshape(2, 4), ("data", "model"))
    for m in (None, mesh):
        assert native_topk.TARGET in _hlo(lambda p, xx: sparse.core(p, xx, 8, 8, "f32", m), params, x)  # noqa: B023


def test_an_unwritable_cache_falls_back_to_a_temporary_folder(tmp_path, monkeypatch):
    if os.environ.get("SAEJAX_NATIVE") == "0":
        pytest.skip("SAEJAX_NATIVE=0")
    blocker = tmp_path / "file"
    blocker.write_text("")                      # a file where the cache folder should be
    monkeypatch.setenv("SAEJAX_NATIVE_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(native_topk.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    lib = native_topk.build()
    assert lib.parent == tmp_path / "tmp" / f"saejax-native-{os.getuid()}" and lib.exists()
