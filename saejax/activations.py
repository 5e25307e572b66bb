"""LM -> activations: the jitted producer, the device shuffle buffer, harvest to a store.

On the fly, the producer runs the LM over token batches and returns one activation row per
token. Rows of one context are strongly correlated, so they go through a
:class:`ShuffleBuffer` that lives on the devices (sharded over "data"), mixes many contexts
and serves each row exactly once (sampling without replacement). ``harvest`` instead writes
the producer's rows to an activation store.

Legend: B token batch (contexts), T sequence, D activation width, S data-parallel shards,
N buffer rows per shard, b SAE batch rows per shard.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jaxtyping import Array, Float, Int

from saejax import parallel
from saejax.config import ConfigError

Producer = Callable[[Int[Array, "B T"]], Float[Array, "BT D"]]


def lm_producer(graphdef, params, site: str, mesh: jax.sharding.Mesh,
                context_len: int | None = None) -> Producer:
    """A jitted function tokens [B, T] -> activations [B*T', D] at ``site`` (float32).

    The forward stops after the site's layer (no logits). Rows keep the token batch's
    sharding over "batch", so no data moves between devices. With ``context_len`` only the
    first T' = context_len positions of each context are run (the LM's own context).
    """
    from saejax.lm.model import forward

    out_sharding = parallel.named_sharding(mesh, ("batch", None))

    @jax.jit
    def produce(tokens):
        tokens = tokens[:, :context_len]
        (acts,) = forward(graphdef, params, tokens, sites=(site,), logits=False).acts.values()
        acts = acts.reshape(-1, acts.shape[-1]).astype(jnp.float32)
        return jax.lax.with_sharding_constraint(acts, out_sharding)

    return produce


class LMSource(NamedTuple):
    """A restored LM ready to produce activations at one site."""

    graphdef: Any
    params: Any
    meta: dict          # the LM checkpoint's metadata (store_dir, step, ...)
    site: str           # canonical site name
    store: Any          # the token store the LM trained on
    context: int        # positions run per context (min of store seq_len and max_len)
    produce: Producer
    width: int          # D, the site's activation width


def restore_lm_source(lm_dir: str, site: str, mesh: jax.sharding.Mesh) -> LMSource:
    """Restores an LM training run and builds its jitted producer at ``site``."""
    from saejax.data.token_store import TokenStore
    from saejax.lm.model import split_params
    from saejax.lm.restore import load_lm
    from saejax.lm.sites import canonical_site

    lm, meta = load_lm(lm_dir, mesh=mesh)
    graphdef, params = split_params(lm)
    site = canonical_site(site, lm.cfg.n_layers)
    store = TokenStore.open(meta["store_dir"])
    context = min(store.seq_len, lm.cfg.max_len)
    produce = lm_producer(graphdef, params, site, mesh, context_len=context)
    probe = jax.ShapeDtypeStruct((parallel.data_parallel_size(mesh), store.seq_len), jnp.int32)
    d = jax.eval_shape(produce, probe).shape[-1]
    return LMSource(graphdef, params, meta, site, store, context, produce, int(d))


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
            raise ConfigError(f"buffer batch size {batch_size} is not divisible by the "
                              f"{s} data-parallel shards")
        if capacity % (2 * batch_size):
            raise ConfigError(f"config field 'buffer_rows' = {capacity} is invalid: must be a "
                              f"multiple of 2 x batch size ({2 * batch_size})")
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
            raise ConfigError(f"producer rows per call ({parts[0].shape[0]}) must divide half "
                              f"the buffer ({self.refill_rows} rows)")
        # Concatenate shard by shard so every shard gets its own rows (no cross-device move).
        parts = [p.reshape(self.shards, -1, self.d) for p in parts]
        return jnp.concatenate(parts, axis=1).reshape(-1, self.d)

    def fill(self, state: BufferState, produce_rows: Callable[[], Float[Array, "R D"]]
             ) -> BufferState:
        """Warm-up: fills the second half (the first is filled by the first refill)."""
        return self._write(state, self._collect(produce_rows), self.half)

    def next_batch(self, state: BufferState, produce_rows: Callable[[], Float[Array, "R D"]]
                   ) -> tuple[BufferState, Float[Array, "B D"]]:
        """The next batch [batch_size, D] sharded over "batch"; refills when half drained.

        ``produce_rows`` is called only on refills (``batches_per_refill`` batches apart).
        """
        if int(state.served) >= self.batches_per_refill:
            state = self._refill(state, self._collect(produce_rows))
        return self._take(state)


# ---------------------------------------------------------------------------------------
# Harvest to an activation store
# ---------------------------------------------------------------------------------------


def harvest_chunk_rows(seq_len: int, contexts_per_step: int, sae_batch: int, d: int,
                       dtype: str, chunk_mb: float = 16.0) -> int:
    """Chunk rows: ~chunk_mb MB, a multiple of both the SAE batch and one harvest step."""
    from saejax.data.activation_store import DTYPES

    step_rows = seq_len * contexts_per_step
    unit = step_rows * sae_batch // math.gcd(step_rows, sae_batch)
    target = int(chunk_mb * 2**20) // (d * DTYPES[dtype].itemsize)
    return max(unit, target // unit * unit)


def harvest(writer, produce: Producer, read_tokens: Callable[[int, int], np.ndarray],
            mesh: jax.sharding.Mesh, *, contexts_per_step: int, seq_len: int, seed: int = 0,
            log_every_s: float = 10.0) -> dict:
    """Runs the producer over this process's contexts and writes its chunks, resumably.

    Process p owns chunks ``writer.my_chunks()``; chunk c holds the activations of the
    contexts [c * k, (c + 1) * k) of the token range (k = chunk_rows / T), rows permuted
    within the chunk (seeded by ``seed`` and c) so a chunk is not context-ordered. All
    processes restart at ``writer.resume_position()`` and advance in lock step (the
    producer is a collective jitted call).

    Args:
      writer: an ``ActivationStoreWriter``.
      produce: tokens [B, T] (global) -> activations [B * T, D] (global, sharded by row).
      read_tokens: reads contexts [a, b) of the token range as int32 [b - a, T].
      mesh: the mesh the producer runs on.
      contexts_per_step: global contexts per producer call.
      seq_len: tokens per context.

    Returns:
      A summary: chunks written, rows, seconds, rows/s.
    """
    procs = writer.process_count
    local_ctx = contexts_per_step // procs
    lo, hi = parallel.process_rows(mesh, contexts_per_step)
    if hi - lo != local_ctx:
        raise ConfigError(
            f"harvest needs every process to hold its own rows of the batch, but on mesh "
            f"{dict(mesh.shape)} process {writer.process_index} of {procs} holds {hi - lo} of "
            f"{contexts_per_step}: keep the 'model' axis within one process (e.g. "
            f"mesh.model <= local devices)")
    ctx_per_chunk = writer.chunk_rows // seq_len
    if writer.chunk_rows % (seq_len * local_ctx):
        raise ConfigError(f"chunk rows {writer.chunk_rows} must be a multiple of the rows one "
                          f"process produces per step ({seq_len * local_ctx})")
    steps_per_chunk = ctx_per_chunk // local_ctx
    start = writer.resume_position()
    mine = writer.my_chunks()
    if start:
        logging.info("harvest: resuming at chunk %d of %d per process", start, len(mine))
    t0, last, rows_done = time.perf_counter(), time.perf_counter(), 0
    for k in range(start, len(mine)):
        chunk = mine[k]
        parts = []
        for s in range(steps_per_chunk):
            a = chunk * ctx_per_chunk + s * local_ctx
            tokens = parallel.host_to_global(read_tokens(a, a + local_ctx), mesh, ("batch", None))
            parts.append(parallel.global_to_local(produce(tokens)))
        block = np.concatenate(parts)
        block = block[np.random.default_rng([seed, chunk]).permutation(len(block))]
        if chunk not in writer.committed():
            writer.write_chunk(chunk, block)
        rows_done += len(block)
        if time.perf_counter() - last > log_every_s:
            last = time.perf_counter()
            rate = rows_done / (last - t0)
            left = (len(mine) - k - 1) * writer.chunk_rows / max(rate, 1e-9)
            logging.info("harvest: chunk %d/%d, %.0f rows/s, ETA %.0f s", k + 1, len(mine),
                         rate, left)
    dt = time.perf_counter() - t0
    return {"chunks": len(mine) - start, "rows": rows_done, "seconds": dt,
            "rows_per_s": rows_done / dt if dt else float("nan")}



def run_harvest(cfg) -> dict:
    """``launch/harvest.py``: restore the LM, run it over a token range, write the store.

    Args:
      cfg: a ``saejax.train_config.HarvestConfig``.

    Returns:
      The completed store's metadata (on process 0) plus a summary of this run.
    """
    from saejax.data.activation_store import ActivationStoreWriter

    mesh = parallel.make_mesh(cfg.mesh)
    src = restore_lm_source(cfg.lm_dir, cfg.site, mesh)
    store, context, produce, d, site, meta = (src.store, src.context, src.produce, src.width,
                                              src.site, src.meta)
    procs = jax.process_count()
    available = store.rows(cfg.split) - cfg.start_context
    n_ctx = cfg.num_contexts or available
    if n_ctx > available:
        raise ConfigError(f"config field 'num_contexts' = {cfg.num_contexts} is invalid: only "
                          f"{available} contexts of split {cfg.split!r} remain after "
                          f"start_context={cfg.start_context}")
    # From the global step (not the per-process one), so the store's layout - and the
    # SAE's data order - does not depend on the process count.
    chunk_rows = harvest_chunk_rows(context, cfg.lm_batch_size, cfg.sae_batch_size, d,
                                    cfg.dtype, cfg.chunk_mb)
    unit = chunk_rows * procs
    rows = n_ctx * context // unit * unit
    if rows == 0:
        raise ConfigError(f"{n_ctx} contexts give {n_ctx * context} rows, fewer than one chunk "
                          f"per process ({unit} rows); harvest more contexts or lower chunk_mb")
    n_used = rows // context
    plan = {"rows": rows, "d": int(d), "dtype": cfg.dtype, "chunk_rows": chunk_rows,
            "site": site, "lm": {"dir": os.path.abspath(cfg.lm_dir), "step": meta.get("step"),
                                 "store": store.metadata["fingerprint"]},
            "tokens": {"store_dir": meta["store_dir"], "split": cfg.split,
                       "contexts": [cfg.start_context, cfg.start_context + n_used],
                       "positions": context},
            "seed": cfg.seed}
    writer = ActivationStoreWriter(cfg.out_dir, plan, process_index=jax.process_index(),
                                   process_count=procs, overwrite=cfg.overwrite)
    a0 = cfg.start_context

    def read(a, b):
        return store.read(cfg.split, a0 + a, a0 + b)

    summary = harvest(writer, produce, read, mesh, contexts_per_step=cfg.lm_batch_size,
                      seq_len=context, seed=cfg.seed)
    out = writer.finalize()
    logging.info("harvest: %s", summary)
    return {**out, "summary": summary}
