"""Device mesh, logical-axis sharding rules, multi-host initialisation, global batches.

Mesh axis names ("data", "model") appear only in this module. Everything else names
*logical* axes ("batch", "latent", "d_in", ...) and asks :func:`named_sharding` for a
``NamedSharding``; :data:`LOGICAL_RULES` is the one table that maps them to mesh axes.

Legend: B batch (rows of a global batch), T sequence, D input width, F dictionary features.
"""

from __future__ import annotations

import math
import os
import sys
import typing
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from saejax.config import ConfigError, DistributedConfig, MeshConfig

DATA = "data"
MODEL = "model"
MESH_AXES = (DATA, MODEL)

# Logical axis -> mesh axis (None = replicated). Activations and batches shard over
# "data"; the SAE dictionary (latent axis) shards over "model"; the small LM is
# replicated over "model" and data-parallel over "data".
LOGICAL_RULES: Mapping[str, str | None] = {
    "batch": DATA,
    "latent": MODEL,
    "seq": None,
    "d_in": None,
    "embed": None,
    "mlp": None,
    "heads": None,
    "head_dim": None,
    "vocab": None,
}


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
    """Builds the ("data", "model") mesh.

    Args:
      config: mesh sizes; one of them may be -1 to take the remaining devices.
      devices: devices to use (default: all of ``jax.devices()``, across processes).

    Returns:
      A ``Mesh`` with automatic (GSPMD) axis types.

    Raises:
      ConfigError: if the sizes do not multiply to the number of devices.
    """
    config = config or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data, model = config.data, config.model
    if data == -1:
        if n % model:
            raise ConfigError(f"config field 'mesh.model' = {model} is invalid: must divide the "
                              f"{n} available devices")
        data = n // model
    elif model == -1:
        if n % data:
            raise ConfigError(f"config field 'mesh.data' = {data} is invalid: must divide the "
                              f"{n} available devices")
        model = n // data
    if data * model != n:
        raise ConfigError(f"config field 'mesh' = (data={data}, model={model}) is invalid: "
                          f"data * model must equal the {n} available devices (or use -1)")
    # Order devices as jax.make_mesh would (ICI-aware on TPU), then build an Auto mesh.
    try:
        grid = mesh_utils.create_device_mesh((data, model), devices=devices)
    except Exception:  # noqa: BLE001 - topology helper unavailable for these devices
        grid = np.asarray(devices, dtype=object).reshape(data, model)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def logical_to_spec(axes: Sequence[str | None], rules: Mapping[str, str | None] = LOGICAL_RULES
                    ) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec`` over mesh axes.

    Raises:
      KeyError: for a logical axis the rules table does not know.
    """
    out = []
    for ax in axes:
        if ax is None:
            out.append(None)
            continue
        if ax not in rules:
            raise KeyError(f"unknown logical axis {ax!r}; known: {sorted(rules)}")
        out.append(rules[ax])
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, axes: Sequence[str | None]) -> NamedSharding:
    """``NamedSharding`` on ``mesh`` for an array whose dimensions have these logical names."""
    return NamedSharding(mesh, logical_to_spec(axes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def check_divisible(name: str, value: int, mesh: Mesh, axis: str) -> None:
    """Raises ConfigError unless ``value`` divides evenly over mesh ``axis``."""
    size = mesh.shape[axis]
    if value % size:
        raise ConfigError(f"config field {name!r} = {value} is invalid: must be divisible by the "
                          f"mesh's {axis!r} axis size {size}")


def host_to_global(local: np.ndarray, mesh: Mesh, axes: Sequence[str | None]) -> jax.Array:
    """Assembles this process's slice of a batch into one global array on the mesh.

    Each process passes its own rows (``global_rows / process_count`` of them); the result
    is sharded by ``axes`` (leading axis normally "batch").
    """
    sharding = named_sharding(mesh, axes)
    local = np.asarray(local)
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def global_to_local(arr: jax.Array) -> np.ndarray:
    """This process's rows of a global array sharded over its leading axis, in order.

    The inverse of :func:`host_to_global`; replicas (e.g. over "model") are read once.
    """
    shards = {}
    for s in arr.addressable_shards:
        shards.setdefault(s.index[0].start or 0, s)
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def process_batch_size(global_batch: int) -> int:
    """Rows each process loads for a global batch; errors clearly if it does not split."""
    p = jax.process_count()
    if global_batch % p:
        raise ConfigError(f"global batch size {global_batch} is not divisible by the "
                          f"{p} jax processes")
    return global_batch // p


def _autodetected_cluster() -> bool:
    """True inside an environment jax.distributed can configure itself from."""
    env = os.environ
    return any(k in env for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                                  "OMPI_COMM_WORLD_SIZE"))


def initialize_distributed(config: DistributedConfig) -> None:
    """Calls ``jax.distributed.initialize`` when enabled; logs the process layout.

    With ``enabled`` and no address/counts, jax auto-detects TPU VMs, SLURM and Open MPI.
    Must run before anything touches ``jax.devices()``.
    """
    if config.enabled:
        kwargs = {}
        if config.coordinator_address:
            kwargs["coordinator_address"] = config.coordinator_address
        if config.num_processes is not None:
            kwargs["num_processes"] = config.num_processes
        if config.process_id is not None:
            kwargs["process_id"] = config.process_id
        if not kwargs and not _autodetected_cluster():
            logging.warning("distributed.enabled but no coordinator given and no cluster "
                            "environment detected; jax will try to auto-detect anyway")
        jax.distributed.initialize(**kwargs)
    logging.info("jax process %d/%d: %d local devices, %d global devices (%s)",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.default_backend())


def exit_with_error(prog: str, error: BaseException) -> typing.NoReturn:
    """Ends a launch script on a fatal error, without hanging a multi-process run.

    ``sys.exit`` after ``jax.distributed.initialize`` waits at jax's shutdown barrier for
    every other process (up to 300 s) when only this one failed; a hard exit lets the
    launcher see the failure at once.
    """
    logging.error("%s: %s", prog, error)
    if jax.process_count() > 1:
        logging.flush()
        sys.stderr.write(f"{prog}: {error}\n")
        sys.stderr.flush()
        os._exit(1)
    sys.exit(f"{prog}: {error}")


def mesh_summary(mesh: Mesh) -> str:
    return " x ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({math.prod(mesh.shape.values())} devices)"
