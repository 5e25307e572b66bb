"""Sharded SAE steps and resampling compute the same numbers as one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.config import MeshConfig
from saejax.parallel import make_mesh
from saejax.sae import SAEConfig, init_state, make_resample, make_train_step

D, F, B, S = 16, 64, 64, 512
CFG = SAEConfig(d_in=D, n_features=F, l1_coefficient=1e-2, lr=1e-3, dead_window=2,
                resample_steps=(3,), resample_sample_size=S, resample_chunk_size=128)
N_FORCED_DEAD = 12


def _run(mesh, x, sample):
    """Three steps with some features forced dead, a resample, one more step."""
    state = init_state(CFG, mesh, x)
    # Features 0..N-1 can never fire (huge negative bias), so they die after dead_window steps.
    b_enc = np.array(state.params.b_enc)
    b_enc[:N_FORCED_DEAD] = -1e3
    state = state.replace(params=state.params.replace(
        b_enc=jax.device_put(jnp.asarray(b_enc), state.params.b_enc.sharding)))
    step = make_train_step(CFG, mesh)
    resample = make_resample(CFG, mesh)
    plain = []
    for i in range(3):
        state, m = step(state, jnp.asarray(x[i * B:(i + 1) * B]))
        plain.append(jax.device_get(m))
    after_steps = jax.device_get(state)
    state, info = resample(state, jnp.asarray(sample))
    after_resample = jax.device_get(state)
    state, m = step(state, jnp.asarray(x[3 * B:4 * B]))
    plain.append(jax.device_get(m))
    return after_steps, after_resample, jax.device_get(state), plain, jax.device_get(info)


@pytest.fixture(scope="module")
def data():
    rng = np.random.RandomState(0)
    x = np.abs(rng.randn(4 * B, D)).astype(np.float32)
    sample = np.abs(rng.randn(S, D)).astype(np.float32)
    return x, sample


@pytest.fixture(scope="module")
def single(data):
    return _run(make_mesh(MeshConfig(data=1, model=1), devices=jax.devices()[:1]), *data)


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1, 8)])
def test_sharded_equals_single_device(shape, data, single):
    mesh = make_mesh(MeshConfig(data=shape[0], model=shape[1]))
    got = _run(mesh, *data)
    want = single
    info_got, info_want = got[4], want[4]
    assert int(info_want["n_dead"]) >= N_FORCED_DEAD
    np.testing.assert_array_equal(info_got["resampled"], info_want["resampled"])
    dead = info_want["resampled"]
    np.testing.assert_array_equal(info_got["drawn_index"][dead], info_want["drawn_index"][dead])
    for g_state, w_state in zip(got[:3], want[:3], strict=True):
        for path_leaf, w in zip(jax.tree_util.tree_leaves_with_path(g_state), jax.tree.leaves(w_state), strict=True):
            path, g = path_leaf
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))
    for mg, mw in zip(got[3], want[3], strict=True):
        for k in mw:
            np.testing.assert_allclose(mg[k], mw[k], rtol=2e-5, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("aux_k", [0, 3])
def test_topk_sharded_equals_single_device(aux_k):
    """TopK's top_k runs over the sharded latent axis; it must pick the same features. With
    AuxK, the candidate top_k, gathers and row scatters run over it too."""
    cfg = SAEConfig(d_in=D, n_features=F, architecture="topk", k=4, lr=1e-3, aux_k=aux_k,
                    aux_candidates=8, dead_window=5)
    x = np.abs(np.random.RandomState(1).randn(2 * B, D)).astype(np.float32)
    # Features 0..11 last fired 10 steps ago (dead), with distinct staleness so the 8 AuxK
    # candidates are well defined; the others fired in the last step.
    last_fired = np.full((F,), 10, np.int32)
    last_fired[:12] = np.arange(12) % 5
    out = []
    for mesh in (make_mesh(MeshConfig(data=1, model=1), devices=jax.devices()[:1]),
                 make_mesh(MeshConfig(data=2, model=4))):
        state = init_state(cfg, mesh, x)
        state = state.replace(step=jax.device_put(jnp.int32(10), state.step.sharding),
                              last_fired=jax.device_put(jnp.asarray(last_fired), state.last_fired.sharding))
        step = make_train_step(cfg, mesh)
        aux = []
        for i in range(2):
            state, m = step(state, jnp.asarray(x[i * B:(i + 1) * B]))
            aux.append(float(m["aux_loss"]))
        out.append((jax.device_get(state.params), jax.device_get(m), aux))
    (p1, m1, aux1), (p8, m8, aux8) = out
    # The forced-dead features are live after the first step (they fire on that batch).
    assert (aux1[0] > 0) if aux_k else (aux1 == [0.0, 0.0])
    np.testing.assert_allclose(aux8, aux1, rtol=2e-5)
    np.testing.assert_array_equal(m8["feature_counts"], m1["feature_counts"])
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
