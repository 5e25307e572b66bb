"""Many dictionaries in one jitted step: a sweep group of equal-shape SAEs, stacked.

A sweep trains N dictionaries on one activation stream (:mod:`saejax.sweep`). Members whose
configs differ only in :data:`SWEPT` fields (learning rate, L1 / L0 / AuxK coefficients, k,
seed) have states of one shape; they form a :class:`Group` whose states are stacked along
a leading member axis and trained by one jitted step: a ``lax.fori_loop`` over the members,
each iteration the ordinary single-SAE step (:func:`saejax.sae.step.train_step_fn`) on
member i's slice, written back in place. Fields on which the members agree stay Python
constants, so the member's program is the single run's; the fields that differ are read
from per-member arrays inside the loop (a traced copy of the config, :func:`traced_config`).
A group whose members differ in k runs the top-k of the largest k and keeps each member's
own k of it (the values are exact, as during k annealing).

Why a loop and not ``vmap``: under ``vmap`` every ``lax.cond`` with a per-member predicate
becomes a select that computes both branches, so AuxK (skipped while nothing is dead) and
BatchTopK's rare whole-row and whole-batch threshold paths would run at every step for
every member. The loop keeps each member's step what it is alone and its working set one
member's; the stacked state is updated in place (``dynamic_update_slice`` on the carry).

The step kernel (dense, or the sparse one of TopK, BatchTopK and Matryoshka,
:mod:`saejax.sae.sparse`) is one per group:
``step_kernel = "auto"`` decides by the group's largest k, so a member whose own k would
pick the other kernel alone equals its solo run to float rounding instead of bit for bit
(set ``step_kernel`` explicitly to pin it).

Sharding: a group has one of two layouts (:data:`LAYOUTS`, ``SweepConfig.member_sharding``):

- "features": each member's arrays are sharded exactly as a single run's (the dictionary
  split over the "latent" rule's mesh axis, "model"; the batch over "data") and the
  loop runs every member on every device. It runs on any mesh a single run does.
- "members": the member axis is split over "model" and each device holds whole
  dictionaries of N / M members (M the size of "model"; N must divide). The step is a
  ``shard_map`` manual over "model" only: each device loops over its own members with the
  single step, the batch still split over "data" (automatic inside), and nothing crosses
  "model" (the "features" layout sums partial reconstructions and gathers top-k candidates
  over it at every step). Each member then runs as it would alone on a data x 1 mesh.

"auto" picks "members" where "model" has more than one device, N divides over it and the
estimate (:func:`estimate_sweep_memory`) fits; else "features". With one device on "model"
the two are the same. Sharded equals one device in both.

Legend: N members, B batch, D input width, F features.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float

from saejax.config import ConfigError
from saejax.parallel import check_divisible, logical_to_spec, named_sharding
from saejax.sae import gradcheck, memory, registry, schedule
from saejax.sae.config import SAEConfig
from saejax.sae.step import (BATCH_AXES, TrainState, abstract_state, check_kernel, check_live,
                             check_mesh, init_state, make_optimizer, metric_shardings,
                             state_shardings, train_step_fn)

# SAEConfig fields in which the members of one group may differ. ``seed`` only changes the
# initial state; the others are read inside the step (TRACED).
SWEPT = ("lr", "l1_coefficient", "l0_coefficient", "aux_coefficient", "k", "seed")
TRACED = ("lr", "l1_coefficient", "l0_coefficient", "aux_coefficient", "k")
# How a group's stack is laid out over the mesh (module docstring); "auto" chooses.
LAYOUTS = ("features", "members")


def group_key(config: SAEConfig) -> tuple:
    """What members must share to be stacked: every field but the :data:`SWEPT` ones."""
    return tuple((f.name, getattr(config, f.name)) for f in dataclasses.fields(config)
                 if f.name not in SWEPT)


def traced_config(config: SAEConfig, values: dict[str, Any]) -> SAEConfig:
    """A copy of ``config`` whose ``values`` fields hold traced scalars (no validation:
    the concrete member configs were validated; only the step's arithmetic reads them)."""
    out = copy.copy(config)
    for name, value in values.items():
        object.__setattr__(out, name, value)
    return out


@dataclasses.dataclass(frozen=True)
class Group:
    """Members of one shape, trained by one step.

    Attributes:
      names: member names, in stacking order.
      configs: their SAE configs (equal but for :data:`SWEPT` fields).
      layout: "features" or "members" (:data:`LAYOUTS`; module docstring).
    """

    names: tuple[str, ...]
    configs: tuple[SAEConfig, ...]
    layout: str = "features"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ConfigError(f"group layout {self.layout!r} must be one of {LAYOUTS}")

    @property
    def config(self) -> SAEConfig:
        return self.configs[0]

    @property
    def size(self) -> int:
        return len(self.configs)

    @property
    def traced(self) -> tuple[str, ...]:
        """The TRACED fields whose values differ between members."""
        return tuple(f for f in TRACED if len({getattr(c, f) for c in self.configs}) > 1)

    @property
    def k_max(self) -> int:
        return max(c.k for c in self.configs)

    def hyper(self) -> dict[str, np.ndarray]:
        """Per-member values of the fields that differ ([N]; k as int32, the rest float32)."""
        return {f: np.asarray([getattr(c, f) for c in self.configs],
                              np.int32 if f == "k" else np.float32) for f in self.traced}


def make_groups(names: Sequence[str], configs: Sequence[SAEConfig]) -> list[Group]:
    """Members grouped by :func:`group_key`, groups in order of their first member."""
    keyed: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        keyed.setdefault(group_key(c), []).append(i)
    return [Group(tuple(names[i] for i in idx), tuple(configs[i] for i in idx))
            for idx in keyed.values()]


# ---------------------------------------------------------------------------------------
# Stacked states
# ---------------------------------------------------------------------------------------


def member_axis(mesh: Mesh) -> str | None:
    """The mesh axis a "members" layout splits the member axis over (the "latent" rule's,
    "model"), or None where it has one device."""
    axis = logical_to_spec(("latent",))[0]
    return axis if axis is not None and mesh.shape.get(axis, 1) > 1 else None


def choose_layout(group: Group, mesh: Mesh, requested: str) -> str:
    """The layout a group gets for ``SweepConfig.member_sharding`` = ``requested`` ("auto"
    here means "members" if the members divide over the mesh; the memory check may still
    fall back, :func:`layout_groups`).

    Raises:
      ConfigError: "members" asked for a group whose size does not divide over "model".
    """
    axis = member_axis(mesh)
    if requested == "features" or axis is None:
        return "features"
    fits = group.size % mesh.shape[axis] == 0
    if requested == "members" and not fits:
        raise ConfigError(
            f"member_sharding='members' needs each group's members to split evenly over mesh "
            f"axis {axis!r} ({mesh.shape[axis]} devices); the group {', '.join(group.names)} has "
            f"{group.size} (add or drop members, or use 'auto' or 'features')")
    return "members" if fits else "features"


def _stack_sharding(sh: NamedSharding, axis: str | None = None) -> NamedSharding:
    """A single run's sharding with a leading member axis: unsplit (``axis`` None), or split
    over ``axis`` with ``axis`` removed from the member's own dimensions (whole dictionaries)."""
    if axis is None:
        return NamedSharding(sh.mesh, PartitionSpec(None, *sh.spec))

    def drop(a):
        if isinstance(a, tuple):
            rest = tuple(x for x in a if x != axis)
            return rest or None
        return None if a == axis else a

    return NamedSharding(sh.mesh, PartitionSpec(axis, *(drop(a) for a in sh.spec)))


def _layout_axis(group: Group, mesh: Mesh) -> str | None:
    return member_axis(mesh) if group.layout == "members" else None


def stacked_shardings(group: Group, mesh: Mesh) -> TrainState:
    axis = _layout_axis(group, mesh)
    return jax.tree.map(lambda sh: _stack_sharding(sh, axis), state_shardings(group.config, mesh))


def counts_sharding(group: Group, mesh: Mesh) -> NamedSharding:
    """Sharding of the group's per-member feature counts [N, F]."""
    return _stack_sharding(named_sharding(mesh, ("latent",)), _layout_axis(group, mesh))


def abstract_stack(group: Group, mesh: Mesh) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the group's stacked state [N, ...]."""
    one = abstract_state(group.config, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct((group.size, *s.shape), s.dtype, sharding=sh),
                        one, stacked_shardings(group, mesh))


def init_stack(group: Group, mesh: Mesh, init_sample: Float[Array, "S D"]) -> TrainState:
    """Each member's fresh state (its own seed; b_dec = the sample's geometric median), stacked."""
    states = [init_state(c, mesh, init_sample) for c in group.configs]
    stack = jax.jit(lambda *s: jax.tree.map(lambda *xs: jnp.stack(xs), *s),
                    out_shardings=stacked_shardings(group, mesh))
    return stack(*states)


def member_getter(group: Group, mesh: Mesh) -> Callable[[TrainState, int], TrainState]:
    """``get(stack, i)``: member i's state, sharded as a single run's (a copy)."""
    fn = jax.jit(lambda s, i: jax.tree.map(lambda a: a[i], s),
                 out_shardings=state_shardings(group.config, mesh))
    return lambda stack, i: fn(stack, jnp.int32(i))


def member_setter(group: Group, mesh: Mesh) -> Callable[[TrainState, TrainState, int], TrainState]:
    """``set(stack, state, i)``: the stack with member i replaced (stack donated)."""
    fn = jax.jit(lambda s, m, i: jax.tree.map(lambda a, v: a.at[i].set(v), s, m),
                 out_shardings=stacked_shardings(group, mesh), donate_argnums=0)
    return lambda stack, state, i: fn(stack, state, jnp.int32(i))


# ---------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------


def group_step_fn(group: Group, anneal: bool = False, sparse: bool = False, mesh: Mesh | None = None):
    """The un-jitted step of a group: ``(stack, batch) -> (stack, metrics [N, ...])``."""
    config = group.config
    hyper = {f: jnp.asarray(v) for f, v in group.hyper().items()}
    traced = group.traced
    k_max = group.k_max if "k" in traced else None

    def member(state: TrainState, x: Float[Array, "B D"], i) -> tuple[TrainState, dict]:
        cfg = traced_config(config, {f: hyper[f][i] for f in traced}) if traced else config
        return train_step_fn(cfg, make_optimizer(cfg), anneal, k_max, sparse, mesh)(state, x)

    def loop(stack: TrainState, x: Float[Array, "B D"], first=0):
        """Every member of ``stack`` in turn (``first``: the global index of its first)."""
        n = jax.tree.leaves(stack)[0].shape[0]
        one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stack)
        shapes = jax.eval_shape(member, one, x, 0)[1]
        metrics = jax.tree.map(lambda s: jnp.zeros((n, *s.shape), s.dtype), shapes)

        def body(i, carry):
            stack, metrics = carry
            state, m = member(jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False),
                                           stack), x, first + i)
            put = lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, i, 0)  # noqa: E731
            return jax.tree.map(put, stack, state), jax.tree.map(put, metrics, m)

        return jax.lax.fori_loop(0, n, body, (stack, metrics))

    axis = _layout_axis(group, mesh) if mesh is not None else None
    if axis is None:
        return loop

    n_local = group.size // mesh.shape[axis]

    def local(stack: TrainState, x: Float[Array, "B D"]):
        # This device's members (whole dictionaries); "data" stays automatic in here.
        return loop(stack, x, jax.lax.axis_index(axis) * n_local)

    def step(stack: TrainState, x: Float[Array, "B D"]):
        spec = PartitionSpec(axis)
        return jax.shard_map(local, mesh=mesh, in_specs=(spec, PartitionSpec()), out_specs=(spec, spec),
                             axis_names={axis}, check_vma=False)(stack, x)

    return step


def make_group_step(group: Group, mesh: Mesh):
    """``step(stack, batch, step=None) -> (stack, metrics)`` for a group, jitted, stack donated.

    Metrics are the single step's with a leading member axis (``feature_counts`` [N, F]).

    Raises:
      ConfigError: the dictionary does not split over the mesh, or a batch of the wrong shape.
      RuntimeError: the architecture's backward disagrees with autodiff (as a single run).
    """
    config = group.config
    check_mesh(config, mesh)
    for c in group.configs:
        c.check_schedule()
    sparse = check_kernel(dataclasses.replace(config, k=group.k_max), mesh)  # the largest k decides
    gradcheck.check_backward(config, sparse=sparse)
    s_sh = stacked_shardings(group, mesh)
    b_sh = named_sharding(mesh, BATCH_AXES)

    def build(anneal: bool):
        fn = group_step_fn(group, anneal, sparse, mesh)
        names = jax.eval_shape(fn, abstract_stack(group, mesh),
                               jax.ShapeDtypeStruct((8, config.d_in), jnp.float32))[1].keys()
        m_sh = {k: _stack_sharding(v, _layout_axis(group, mesh)) for k, v in metric_shardings(mesh, names).items()}
        return jax.jit(fn, in_shardings=(s_sh, b_sh), out_shardings=(s_sh, m_sh), donate_argnums=0)

    jitted = build(False)
    k_final = schedule.k_final_step(config)
    annealing = build(True) if k_final > 0 else None
    batch_axis = b_sh.spec[0]
    batch_wide = registry.get_architecture(config.architecture).batch_wide

    def step(stack: TrainState, batch: Float[Array, "B D"], step: int | None = None):
        shape = np.shape(batch)
        if len(shape) != 2 or shape[1] != config.d_in:
            raise ConfigError(f"batch has shape {shape}; expected a 2-D [B, {config.d_in}] array")
        if batch_axis is not None:
            check_divisible("batch size", shape[0], mesh, batch_axis)
        if batch_wide and shape[0] * config.n_features >= 2 ** 31:
            raise ConfigError(f"batch size {shape[0]} x sae.n_features={config.n_features} must be "
                              f"< 2^31 for architecture {config.architecture!r}; use a smaller batch")
        check_live(stack)
        if annealing is not None:
            if (int(stack.step[0]) if step is None else step) < k_final:
                return annealing(stack, batch)
        return jitted(stack, batch)

    step.jitted = jitted
    return step


# ---------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------


def _device_bytes(abstract: Any) -> int:
    """Bytes one device holds of the arrays ``abstract`` describes (shards, not totals)."""
    total = 0
    for s in jax.tree.leaves(abstract):
        shape = s.sharding.shard_shape(s.shape) if s.sharding is not None else s.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
    return total


def available_bytes(mesh: Mesh) -> tuple[int, str]:
    """(bytes one device may use, where the number comes from)."""
    dev = mesh.devices.flat[0]
    stats = None
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics
        pass
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{dev.platform} device memory limit"
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    n_local = max(1, len(jax.local_devices()))
    return phys // n_local, f"host memory / {n_local} local devices"


def member_mesh(group: Group, mesh: Mesh) -> Mesh:
    """The mesh one member's step sees: ``mesh`` ("features"), or its first column along the
    member axis ("members": the member's dictionary whole, the batch split as before)."""
    axis = _layout_axis(group, mesh)
    if axis is None:
        return mesh
    devices = np.take(mesh.devices, [0], axis=mesh.axis_names.index(axis))
    return Mesh(devices, mesh.axis_names, axis_types=mesh.axis_types)


def estimate_sweep_memory(groups: Sequence[Group], mesh: Mesh, batch_size: int) -> dict[str, int]:
    """Bytes per device: the stacked states (``jax.eval_shape``), the per-feature firing
    counts, and the largest single member's step working set (the loop runs one member at a
    time; :func:`saejax.sae.memory.estimate_memory` without the state it already counted;
    in the "members" layout with the member's dictionary whole)."""
    states = sum(_device_bytes(abstract_stack(g, mesh)) for g in groups)
    counts = sum(_device_bytes(jax.ShapeDtypeStruct(
        (g.size, g.config.n_features), jnp.int32, sharding=counts_sharding(g, mesh))) for g in groups)
    working = 0
    for g in groups:
        one = memory.estimate_memory(g.config, member_mesh(g, mesh), batch_size)
        working = max(working, one["update_copy"] + one["batch"] + one["activations"])
    return {"states": states, "counts": counts, "step_working_set": working,
            "total": states + counts + working}


def layout_groups(groups: Sequence[Group], mesh: Mesh, requested: str, batch_size: int,
                  limit: int = 0) -> list[Group]:
    """The groups with their layouts for ``SweepConfig.member_sharding`` = ``requested``
    (:func:`choose_layout`); "auto" keeps "features" everywhere when the "members" layout's
    estimate would not fit in memory (``limit`` as in :func:`check_sweep_memory`).

    Raises:
      ConfigError: as :func:`choose_layout`.
    """
    chosen = [dataclasses.replace(g, layout=choose_layout(g, mesh, requested)) for g in groups]
    if requested == "auto" and any(g.layout == "members" for g in chosen):
        avail = limit or available_bytes(mesh)[0]
        if estimate_sweep_memory(chosen, mesh, batch_size)["total"] > avail:
            return [dataclasses.replace(g, layout="features") for g in groups]
    return chosen


def check_sweep_memory(groups: Sequence[Group], mesh: Mesh, batch_size: int,
                       limit: int = 0) -> dict[str, int]:
    """Raises ConfigError at setup when the sweep's estimate exceeds the device's memory.

    ``limit``: bytes per device to allow (0: the device's limit, or host memory divided by
    the local devices on a CPU).
    """
    est = estimate_sweep_memory(groups, mesh, batch_size)
    avail, where = (limit, "sweep_memory_limit_bytes") if limit else available_bytes(mesh)
    if est["total"] > avail:
        gib = lambda b: f"{b / 2 ** 30:.2f} GiB"  # noqa: E731
        n = sum(g.size for g in groups)
        raise ConfigError(
            f"the sweep of {n} dictionaries needs an estimated {gib(est['total'])} "
            f"({est['total']:,} bytes) per device (stacked states {gib(est['states'])}, "
            f"counts {gib(est['counts'])}, one step's working set {gib(est['step_working_set'])}), "
            f"more than the {gib(avail)} available ({where}); drop members, split the sweep, "
            f"or shard the dictionaries over more devices (mesh.model)")
    return est
