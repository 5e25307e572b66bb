"""The device shuffle buffer: activation rows from many contexts, each served exactly once.

Rows of one context are strongly correlated, so on-the-fly activations go through a
:class:`ShuffleBuffer` that lives on the devices (sharded over "data"), mixes many contexts
and serves each row exactly once (sampling without replacement).

Legend: S data-parallel shards, N buffer rows per shard, D activation width,
b SAE batch rows per shard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from saejax import parallel
from saejax.config import ConfigError


class BufferState(NamedTuple):
    """Checkpointable buffer state: the rows and how far serving has got."""

    rows: Float[Array, "S N D"]
    served: Int[Array, ""]   # batches served since the last refill
    refills: Int[Array, ""]  # refills so far (seeds the permutations)


class ShuffleBuffer:
    """A device-resident shuffle buffer of activation rows, sharded over "data".

    Each data shard holds ``N = capacity / S`` rows. After every refill the rows of each
    shard are permuted; batches are then cut, in order, from the first half of the shard
    (``b`` rows per shard per batch, so no data crosses devices). When that half has been
    served it is overwritten with fresh rows and the whole shard is permuted again. Every
    produced row is therefore served exactly once (without replacement), and a row stays in
    the buffer for a geometric number of refills, so a batch mixes tokens from about
    ``capacity / T`` contexts.

    Args:
      mesh: the device mesh.
      capacity: rows in the buffer (all shards); a multiple of 2 * batch_size.
      d: activation width.
      batch_size: global SAE batch (rows).
      seed: permutation seed.
    """

    def __init__(self, mesh: jax.sharding.Mesh, capacity: int, d: int, batch_size: int,
                 seed: int = 0):
        s = parallel.data_parallel_size(mesh)
        if batch_size % s:
            raise ConfigError(f"config field 'batch_size' = {batch_size} is invalid: must be "
                              f"divisible by the {s} data-parallel shards")
        if capacity % (2 * batch_size):
            raise ConfigError(f"config field 'source.buffer_rows' = {capacity} is invalid: must "
                              f"be a multiple of 2 x batch_size ({2 * batch_size})")
        self.mesh, self.d, self.seed = mesh, d, seed
        self.shards = s
        self.rows_per_shard = capacity // s
        self.half = self.rows_per_shard // 2
        self.b = batch_size // s
        self.batches_per_refill = self.half // self.b
        self.refill_rows = capacity // 2
        self._sharding = parallel.named_sharding(mesh, ("batch", None, None))
        rep = parallel.replicated(mesh)
        self._state_shardings = BufferState(self._sharding, rep, rep)
        batch_sharding = parallel.named_sharding(mesh, ("batch", None))
        spec = parallel.logical_to_spec(("batch", None, None))
        key_spec = parallel.logical_to_spec(("batch",))

        def permute(rows, keys):
            def local(r, k):  # one data shard: rows [1, N, D], keys [1]
                return jnp.take(r[0], jax.random.permutation(k[0], r.shape[1]), axis=0)[None]
            return jax.shard_map(local, mesh=mesh, in_specs=(spec, key_spec),
                                 out_specs=spec)(rows, keys)

        def write(state: BufferState, new, offset):
            new = new.reshape(s, -1, d).astype(state.rows.dtype)  # shard-local reshape
            rows = jax.lax.dynamic_update_slice_in_dim(state.rows, new, offset, axis=1)
            return state._replace(rows=rows)

        def refill(state: BufferState, new):
            state = write(state, new, 0)
            key = jax.random.fold_in(jax.random.key(seed), state.refills)
            rows = permute(state.rows, jax.random.split(key, s))
            return BufferState(rows, jnp.zeros((), jnp.int32), state.refills + 1)

        def take(state: BufferState):
            start = state.served * self.b
            batch = jax.lax.dynamic_slice_in_dim(state.rows, start, self.b, axis=1)
            batch = jax.lax.with_sharding_constraint(batch.reshape(-1, d), batch_sharding)
            return state._replace(served=state.served + 1), batch

        sh = self._state_shardings
        self._write = jax.jit(write, out_shardings=sh, donate_argnums=0)
        self._refill = jax.jit(refill, out_shardings=sh, donate_argnums=0)
        self._take = jax.jit(take, out_shardings=(sh, batch_sharding), donate_argnums=0)

    def empty(self, dtype=jnp.float32) -> BufferState:
        rows = jax.jit(lambda: jnp.zeros((self.shards, self.rows_per_shard, self.d), dtype),
                       out_shardings=self._sharding)()
        # Start "fully served" so the first take triggers a refill of the first half.
        return BufferState(rows, jnp.asarray(self.batches_per_refill, jnp.int32),
                           jnp.zeros((), jnp.int32))

    def abstract_state(self, dtype=jnp.float32) -> BufferState:
        """ShapeDtypeStructs with shardings, for restoring a checkpointed buffer."""
        rows = jax.ShapeDtypeStruct((self.shards, self.rows_per_shard, self.d), dtype,
                                    sharding=self._sharding)
        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=parallel.replicated(self.mesh))
        return BufferState(rows, scalar, scalar)

    def _collect(self, produce_rows: Callable[[], Float[Array, "R D"]]) -> Float[Array, "M D"]:
        """Enough fresh rows for half a buffer, from repeated producer calls."""
        parts, n = [], 0
        while n < self.refill_rows:
            rows = produce_rows()
            if rows.shape[-1] != self.d:
                raise ValueError(f"producer returned width {rows.shape[-1]}, buffer expects {self.d}")
            parts.append(rows)
            n += rows.shape[0]
        if n != self.refill_rows:
            raise ConfigError(f"config field 'source.buffer_rows' = {2 * self.refill_rows} is "
                              f"invalid: half of it must be a multiple of the rows one LM call "
                              f"produces ({parts[0].shape[0]} = source.lm_batch_size x context)")
        # Concatenate shard by shard so every shard gets its own rows (no cross-device move).
        parts = [p.reshape(self.shards, -1, self.d) for p in parts]
        return jnp.concatenate(parts, axis=1).reshape(-1, self.d)

    def fill(self, state: BufferState, produce_rows: Callable[[], Float[Array, "R D"]]
             ) -> BufferState:
        """Warm-up: fills the second half (the first is filled by the first refill)."""
        return self._write(state, self._collect(produce_rows), self.half)

    def needs_refill(self, served: int) -> bool:
        """True when ``served`` batches (the host's count since the last refill) drained half."""
        return served >= self.batches_per_refill

    def refill(self, state: BufferState, produce_rows: Callable[[], Float[Array, "R D"]]
               ) -> BufferState:
        """Overwrites the served half with fresh rows and permutes every shard again."""
        return self._refill(state, self._collect(produce_rows))

    def take(self, state: BufferState) -> tuple[BufferState, Float[Array, "B D"]]:
        """The next batch [batch_size, D] sharded over "batch" (no refill check)."""
        return self._take(state)

    def next_batch(self, state: BufferState, produce_rows: Callable[[], Float[Array, "R D"]]
                   ) -> tuple[BufferState, Float[Array, "B D"]]:
        """The next batch [batch_size, D] sharded over "batch"; refills when half drained.

        ``produce_rows`` is called only on refills (``batches_per_refill`` batches apart).
        This reads ``state.served`` from the device (a sync); a loop that calls it every
        step keeps the count on the host instead (:meth:`needs_refill`, :meth:`refill`,
        :meth:`take`, as :class:`saejax.activations.OnTheFlySource` does).
        """
        if self.needs_refill(int(state.served)):
            state = self.refill(state, produce_rows)
        return self.take(state)
