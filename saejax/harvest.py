"""Harvest: run the LM over a token range and write its activations to an activation store.

Every jax process writes its own contiguous range of chunks; a killed harvest resumes at
the first chunk every process has not committed (see :mod:`saejax.data.activation_store`).

Legend: T sequence, D activation width.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from saejax import parallel
from saejax.activations import Producer, restore_lm_source
from saejax.config import ConfigError


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
    src = restore_lm_source(cfg.lm_dir, cfg.site, mesh, store_dir=cfg.store_dir,
                            fields=("lm_dir", "site", "store_dir"))
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
                                 "store": store.metadata["fingerprint"],
                                 "run_id": meta.get("run_id")},
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
