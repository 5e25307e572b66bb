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


def optimizer_shardings(optimizer, abstract_params, param_shardings, mesh: Mesh):
    """Shardings of ``optimizer``'s state: each moment like its parameter, the rest replicated.

    ``jax.jit(optimizer.init)`` alone returns replicated moments; derive them from the
    parameters' shardings instead (one helper for the SAE and the LM).

    Args:
      optimizer: an ``optax.GradientTransformation``.
      abstract_params: the parameters (arrays or ShapeDtypeStructs).
      param_shardings: a matching pytree of shardings.
      mesh: the mesh (replicated sharding for step counts and other non-moment leaves).
    """
    import optax

    abstract = jax.eval_shape(optimizer.init, abstract_params)
    return optax.tree_utils.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract, param_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def check_divisible(name: str, value: int, mesh: Mesh, axis: str) -> None:
    """Raises ConfigError unless ``value`` divides evenly over mesh ``axis``."""
    size = mesh.shape[axis]
    if value % size:
        raise ConfigError(f"config field {name!r} = {value} is invalid: must be divisible by the "
                          f"mesh's {axis!r} axis size {size}")


def to_host(x):
    """A global array (or pytree of them) as NumPy on every process.

    Arrays held entirely by this process are copied as they are; arrays with shards on
    other processes (e.g. a per-feature vector split over a "model" axis that spans hosts)
    are gathered, which is a collective: every process must call it.
    """
    from jax.experimental import multihost_utils

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(one, x)


def process_rows(mesh: Mesh, global_rows: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a global batch (sharded over "batch") held by this process.

    The slice follows the mesh, not the process index: it is the union of the batch rows of
    this process's devices, so a data loader that feeds each process exactly these rows of
    the *global* batch sees the same data for any number of processes. When the "model" axis
    spans processes, several processes hold (and must load) the same rows.

    Raises:
      ConfigError: if ``global_rows`` does not split over the "data" axis, or this
        process's rows are not one contiguous range (a device order jax would not build).
    """
    check_divisible("batch size", global_rows, mesh, DATA)
    index_map = named_sharding(mesh, ("batch",)).addressable_devices_indices_map((global_rows,))
    spans = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop)
                    for s in index_map.values()})
    lo, hi = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != hi - lo:
        raise ConfigError(f"process {jax.process_index()} holds non-contiguous rows {spans} of "
                          f"the batch on mesh {dict(mesh.shape)}; order the mesh's devices so "
                          f"each process's devices are adjacent along 'data'")
    return lo, hi


def host_to_global(local: np.ndarray, mesh: Mesh, axes: Sequence[str | None]) -> jax.Array:
    """Assembles this process's rows of a batch into one global array on the mesh.

    Each process passes rows ``process_rows(mesh, B)`` of the global batch (all of it in a
    single-process run); the result is sharded by ``axes`` (leading axis "batch").
    """
    sharding = named_sharding(mesh, axes)
    local = np.asarray(local)
    shards = mesh.shape[DATA]
    lo, hi = process_rows(mesh, shards)  # this process's data shards, in units of one
    if local.shape[0] % (hi - lo):
        raise ConfigError(f"this process's {local.shape[0]} rows do not split over its "
                          f"{hi - lo} data shards")
    global_shape = (local.shape[0] // (hi - lo) * shards,) + local.shape[1:]
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def global_to_local(arr: jax.Array) -> np.ndarray:
    """This process's rows of a global array sharded over its leading axis, in order.

    The inverse of :func:`host_to_global`; replicas (e.g. over "model") are read once.
    """
    shards = {}
    for s in arr.addressable_shards:
        shards.setdefault(s.index[0].start or 0, s)
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


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
        jax.distributed.initialize(**kwargs,
                                   heartbeat_timeout_seconds=config.heartbeat_timeout_s)
    logging.info("jax process %d/%d: %d local devices, %d global devices (%s)",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.default_backend())


def exit_with_error(prog: str, error: BaseException | str, code: int = 1) -> typing.NoReturn:
    """Ends a launch script on a fatal error (one line on stderr, exit ``code``) without
    hanging a multi-process run.

    ``sys.exit`` after ``jax.distributed.initialize`` waits at jax's shutdown barrier for
    every other process (up to 300 s) when only this one failed; a hard exit lets the
    launcher see the failure at once.
    """
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        error = f"process {jax.process_index()} of {jax.process_count()} stopped: {error}"
        logging.error("%s: %s", prog, error)
        logging.flush()
        sys.stderr.write(f"{prog}: {error}\n")
        sys.stderr.flush()
        os._exit(code)
    sys.stderr.write(f"{prog}: {error}\n")
    sys.exit(code)


def mesh_summary(mesh: Mesh) -> str:
    return " x ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({math.prod(mesh.shape.values())} devices)"
