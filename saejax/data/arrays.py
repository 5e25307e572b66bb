"""Bring your own activations: arrays or .npy files of rows [N, D] -> an activation store.

A researcher with activations from any model writes them once into an activation store
(:mod:`saejax.data.activation_store`: whole checksummed chunks, resumable, with the
statistics the normaliser needs) and trains on it like on a harvested store
(``source.kind="arrays"`` does this in ``<workdir>/activations``).

Legend: N rows, D activation width.
"""

from __future__ import annotations

import glob
import os
import shutil
import zlib
from collections.abc import Sequence

import numpy as np
from absl import logging

from saejax.config import ConfigError


def expand_paths(spec: str) -> list[str]:
    """Files named by a path, a glob, or several separated by commas (each glob sorted).

    Raises:
      ConfigError: a part matches no file.
    """
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        found = sorted(glob.glob(os.path.expanduser(part)))
        if not found:
            raise ConfigError(f"no .npy file matches {part!r} (source.paths / eval_paths)")
        out += found
    if not out:
        raise ConfigError(f"no .npy files named by {spec!r} (source.paths / eval_paths)")
    return out


def _open_arrays(arrays) -> tuple[list[np.ndarray], list[dict], list[str]]:
    """(arrays, descriptions, names): .npy files memory-mapped, in-memory arrays as they are.

    Files are described by path, shape, dtype and size (not their modification time: a
    copied or re-synced file still matches the store written from it); arrays in memory by
    their row count and one crc32 over their float32 rows in order (so the same rows split
    differently describe the same data).
    """
    if isinstance(arrays, str):
        arrays = expand_paths(arrays)
    if isinstance(arrays, np.ndarray) or not isinstance(arrays, Sequence):
        arrays = [arrays]
    out, desc, names, memory = [], [], [], None
    for i, a in enumerate(arrays):
        name = f"array {i}"
        if isinstance(a, (str, os.PathLike)):
            name = path = os.path.abspath(os.fspath(a))
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read activations from {path!r} as a .npy array: "
                                  f"{e}") from None
            st = os.stat(path)
            desc.append({"path": path, "shape": list(arr.shape), "dtype": str(arr.dtype),
                         "bytes": st.st_size})
        else:
            arr = np.asarray(a)
        if arr.ndim != 2 or not arr.shape[0] or not arr.shape[1]:
            raise ConfigError(f"activations {name} have shape {arr.shape}: expected rows [N, D] "
                              f"with N, D > 0")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ConfigError(f"activations {name} have dtype {arr.dtype}: expected "
                              f"floating-point rows")
        if not isinstance(a, (str, os.PathLike)):
            if memory is None:
                memory = {"memory_rows": 0, "crc32": 0}
                desc.append(memory)
            memory["memory_rows"] += len(arr)
            memory["crc32"] = zlib.crc32(np.ascontiguousarray(arr, np.float32).view(np.uint8),
                                         memory["crc32"])
        out.append(arr)
        names.append(name)
    widths = {a.shape[1] for a in out}
    if len(widths) != 1:
        raise ConfigError(f"the activation arrays have different widths {sorted(widths)}")
    return out, desc, names


def _rows(arrays: list[np.ndarray], names: list[str], start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the arrays laid end to end (float32, checked finite)."""
    parts, offset = [], 0
    for a, name in zip(arrays, names, strict=True):
        lo, hi = max(start - offset, 0), min(stop - offset, len(a))
        if lo < hi:
            part = np.asarray(a[lo:hi], np.float32)
            bad = ~np.isfinite(part)
            if bad.any():
                row = lo + int(np.flatnonzero(bad.any(axis=1))[0])
                raise ConfigError(f"activations {name} hold NaN or Inf (first at row {row}); "
                                  f"an SAE cannot train on them")
            parts.append(part)
        offset += len(a)
    return np.concatenate(parts)


def _chunk_rows(n: int, batch: int, target: int) -> int:
    """Rows per chunk: a multiple of ``batch`` near ``target`` that drops the fewest rows.

    With C = ceil(batches / target batches) chunks of floor(batches / C) batches each, fewer
    than C batches (plus N mod batch rows) are dropped, instead of up to a whole chunk.
    """
    batches = n // batch
    per_chunk = max(1, target // batch)
    chunks = -(-batches // per_chunk)
    return batches // chunks * batch


def write_array_store(arrays, out_dir: str, *, batch_size: int, dtype: str = "float32",
                      chunk_mb: float = 16.0, site: str | None = None,
                      overwrite: bool = False, d_in: int | None = None):
    """Writes activations (arrays or .npy files, rows [N, D]) into an activation store.

    Rows are kept in order; chunks hold a multiple of ``batch_size`` rows (about
    ``chunk_mb``, sized so that fewer than one batch per chunk is dropped at the end; the
    dropped rows are logged and recorded in the store's plan). A complete store with the
    same plan (the same files and sizes, or the same array contents) is reused; a
    half-written one resumes; a different one is refused unless ``overwrite``.

    Args:
      arrays: a numpy array, a list of them, or .npy paths / globs (a str may list several,
        separated by commas).
      out_dir: the store directory.
      batch_size: the SAE batch it will feed.
      dtype: "float32" or "bfloat16" on disk.
      chunk_mb: target chunk size.
      site: the site label the activations come from (None: unknown).
      d_in: when given, the width the activations must have (checked before writing).

    Returns:
      The opened :class:`~saejax.data.activation_store.ActivationStore`.

    Raises:
      ConfigError: arrays of the wrong shape or dtype, NaN/Inf values, fewer rows than one
        batch, or ``out_dir`` holding a store written from other activations.
    """
    import jax

    from saejax.data.activation_store import (ActivationStore, ActivationStoreWriter,
                                              chunk_rows_for)
    from saejax.data.token_store import StoreExistsError

    if jax.process_count() > 1:
        raise ConfigError("source.kind='arrays' writes its store from one process; in a "
                          "multi-process run write it first (saejax.data.arrays."
                          "write_array_store) and train with source.kind='store'")
    mats, desc, names = _open_arrays(arrays)
    n, d = sum(len(a) for a in mats), mats[0].shape[1]
    if d_in is not None and d != d_in:
        raise ConfigError(f"config field 'sae.d_in' = {d_in} is invalid: the arrays "
                          f"activations have width {d}")
    if n < batch_size:
        raise ConfigError(f"the activations hold {n} rows, fewer than one batch "
                          f"(batch_size {batch_size})")
    chunk_rows = _chunk_rows(n, batch_size, chunk_rows_for(d, dtype, batch_size, chunk_mb))
    rows = n // chunk_rows * chunk_rows
    if rows < n:
        logging.warning("activation store %s: dropping the last %d of %d rows (chunks of %d "
                        "rows, a multiple of the batch)", out_dir, n - rows, n, chunk_rows)
    plan = {"rows": rows, "d": d, "dtype": dtype, "chunk_rows": chunk_rows, "site": site,
            "source": {"kind": "arrays", "inputs": desc, "dropped_rows": n - rows}}
    new_dirs = []  # the parents of out_dir that this call creates, innermost first
    parent = os.path.dirname(os.path.abspath(out_dir))
    while parent and not os.path.exists(parent):
        new_dirs.append(parent)
        parent = os.path.dirname(parent)
    try:
        writer = ActivationStoreWriter(out_dir, plan, overwrite=overwrite)
    except StoreExistsError as e:
        raise ConfigError(f"{out_dir!r} holds an activation store written from other "
                          f"activations ({e}); train in a new workdir, or delete it to "
                          f"rewrite it from these") from None
    done = writer.committed()
    try:
        for c in range(writer.n_chunks):
            if c not in done:
                writer.write_chunk(c, _rows(mats, names, c * chunk_rows, (c + 1) * chunk_rows))
    except ConfigError:
        if not done:  # written by this call only: nothing worth resuming
            shutil.rmtree(out_dir, ignore_errors=True)
            for d in new_dirs:  # and the parents it created, if empty
                if os.path.isdir(d) and not os.listdir(d):
                    os.rmdir(d)
        raise
    writer.finalize()
    return ActivationStore.open(out_dir)
