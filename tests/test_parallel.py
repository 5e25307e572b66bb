"""Mesh construction, logical-axis rules and host -> global batches on 8 fake devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from saejax import parallel
from saejax.config import ConfigError, DistributedConfig, MeshConfig


@pytest.mark.parametrize("cfg,shape", [
    (MeshConfig(), (8, 1)), (MeshConfig(data=2, model=-1), (2, 4)),
    (MeshConfig(data=-1, model=8), (1, 8)), (MeshConfig(data=4, model=2), (4, 2)),
])
def test_make_mesh_fills_minus_one(cfg, shape):
    mesh = parallel.make_mesh(cfg)
    assert mesh.axis_names == ("data", "model")
    assert (mesh.shape["data"], mesh.shape["model"]) == shape
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize("cfg", [MeshConfig(data=3), MeshConfig(data=2, model=2),
                                 MeshConfig(model=3)])
def test_make_mesh_rejects_impossible_shapes(cfg):
    with pytest.raises(ConfigError, match="mesh"):
        parallel.make_mesh(cfg)


def test_logical_rules():
    assert parallel.logical_to_spec(("batch", "latent")) == PartitionSpec("data", "model")
    assert parallel.logical_to_spec(("batch", None, "embed")) == PartitionSpec("data", None, None)
    with pytest.raises(KeyError, match="unknown logical axis 'nope'"):
        parallel.logical_to_spec(("nope",))


def test_host_to_global_lands_rows_on_the_right_devices():
    mesh = parallel.make_mesh(MeshConfig(data=4, model=2))
    host = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    arr = parallel.host_to_global(host, mesh, ("batch", None))
    assert arr.shape == (8, 3)
    np.testing.assert_array_equal(np.asarray(arr), host)
    # Device at mesh position (i, j) holds rows [2i, 2i+2), replicated over j.
    for i in range(4):
        for j in range(2):
            dev = mesh.devices[i, j]
            shard = next(s for s in arr.addressable_shards if s.device == dev)
            np.testing.assert_array_equal(np.asarray(shard.data), host[2 * i:2 * i + 2])


def test_batch_divisibility_errors():
    mesh = parallel.make_mesh(MeshConfig())
    with pytest.raises(ConfigError, match="divisible by the mesh's 'data' axis size 8"):
        parallel.check_divisible("loader.batch_size", 12, mesh, "data")
    assert parallel.process_rows(mesh, 16) == (0, 16)
    with pytest.raises(ConfigError, match="batch size.*divisible"):
        parallel.process_rows(mesh, 12)


def test_process_rows_follow_the_devices_of_this_process():
    """One process holds every row: the union of its devices' rows, not one device's
    share (the two-process split is checked for real in tests/test_multihost.py)."""
    devs = jax.devices()
    mesh = parallel.make_mesh(MeshConfig(data=4, model=2))
    assert parallel.process_rows(mesh, 32) == (0, 32)
    # A mesh over 2 x 2 devices of 8: still this process's, all rows.
    small = parallel.make_mesh(MeshConfig(data=2, model=2), devices=devs[:4])
    assert parallel.process_rows(small, 8) == (0, 8)


@pytest.fixture
def distributed_calls(monkeypatch):
    """Records the kwargs of every ``jax.distributed.initialize`` call instead of making it."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for var in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_initialize_distributed_disabled_does_not_initialize(distributed_calls):
    parallel.initialize_distributed(DistributedConfig(enabled=False, heartbeat_timeout_s=17))
    assert distributed_calls == []


@pytest.mark.parametrize("address,n,pid", [("10.0.0.1:1234", 4, 2), ("10.0.0.1:1234", 2, 0)])
def test_initialize_distributed_passes_the_coordinator(distributed_calls, address, n, pid):
    parallel.initialize_distributed(DistributedConfig(
        enabled=True, coordinator_address=address, num_processes=n, process_id=pid,
        heartbeat_timeout_s=17))
    # process_id 0 is passed too (not dropped as falsy).
    assert distributed_calls == [dict(coordinator_address=address, num_processes=n,
                                      process_id=pid, heartbeat_timeout_seconds=17)]


def test_initialize_distributed_without_coordinator_lets_jax_autodetect(distributed_calls):
    parallel.initialize_distributed(DistributedConfig(enabled=True, heartbeat_timeout_s=23))
    assert distributed_calls == [dict(heartbeat_timeout_seconds=23)]
    parallel.initialize_distributed(DistributedConfig(enabled=True))
    assert distributed_calls[1] == dict(heartbeat_timeout_seconds=100)  # jax's default
