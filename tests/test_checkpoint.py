"""Checkpointer: async keep-N saves of (state, data state, metadata); resharded restore."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from saejax import parallel
from saejax.checkpoint import Checkpointer, abstract_with_shardings
from saejax.config import MeshConfig


@struct.dataclass
class State:
    step: jax.Array
    w: jax.Array  # [F, D], sharded over F ("latent") like an SAE dictionary
    b: jax.Array


def _state(mesh, step, scale=1.0):
    w = scale * jnp.arange(64.0 * 8).reshape(64, 8)
    return State(step=jnp.asarray(step, jnp.int32),
                 w=jax.device_put(w, parallel.named_sharding(mesh, ("latent", None))),
                 b=jax.device_put(jnp.ones(8) * scale, parallel.replicated(mesh)))


def test_roundtrip_keep_n_and_json_items(tmp_path):
    mesh = parallel.make_mesh(MeshConfig(data=2, model=4))
    with Checkpointer(tmp_path / "ckpt", keep=2) as ckpt:
        assert ckpt.latest_step() is None
        for step in (1, 2, 3):
            assert ckpt.save(step, _state(mesh, step, scale=step),
                             data_state={"iterator": {"index": 10 * step}},
                             metadata={"config": {"lr": 1e-3}, "step": step})
        assert not ckpt.save(3, _state(mesh, 3))  # existing step: refused without force
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
        shardings = State(step=parallel.replicated(mesh),
                          w=parallel.named_sharding(mesh, ("latent", None)),
                          b=parallel.replicated(mesh))
        abstract = abstract_with_shardings(jax.eval_shape(lambda: _state(mesh, 0)), shardings)
        state, data, meta = ckpt.restore(abstract)
        assert int(state.step) == 3 and data == {"iterator": {"index": 30}}
        assert meta == {"config": {"lr": 1e-3}, "step": 3}
        np.testing.assert_array_equal(state.w, 3 * np.arange(64.0 * 8).reshape(64, 8))
        state2, _, _ = ckpt.restore(abstract, step=2)
        np.testing.assert_array_equal(state2.b, 2 * np.ones(8))
        assert ckpt.restore_metadata(2)["step"] == 2


def test_restore_onto_a_different_mesh(tmp_path):
    mesh_a = parallel.make_mesh(MeshConfig(data=2, model=4))
    with Checkpointer(tmp_path, keep=1) as ckpt:
        ckpt.save(5, _state(mesh_a, 5, scale=5.0))
    # Restore on 8-way model sharding, and on a single device.
    mesh_b = parallel.make_mesh(MeshConfig(data=1, model=8))
    mesh_c = parallel.make_mesh(MeshConfig(data=1, model=1), devices=jax.devices()[:1])
    for mesh in (mesh_b, mesh_c):
        target = State(step=parallel.replicated(mesh),
                       w=parallel.named_sharding(mesh, ("latent", None)),
                       b=parallel.replicated(mesh))
        abstract = abstract_with_shardings(jax.eval_shape(lambda: _state(mesh_a, 0)), target)
        with Checkpointer(tmp_path) as ckpt:
            state, _, _ = ckpt.restore(abstract)
        assert state.w.sharding == target.w
        np.testing.assert_array_equal(state.w, 5 * np.arange(64.0 * 8).reshape(64, 8))


def test_half_written_steps_are_ignored_and_missing_checkpoint_raises(tmp_path):
    mesh = parallel.make_mesh(MeshConfig())
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore(jax.eval_shape(lambda: _state(mesh, 0)))
        ckpt.save(4, _state(mesh, 4))
    os.makedirs(tmp_path / "9.orbax-checkpoint-tmp-123" / "state")  # a killed async write
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 4
