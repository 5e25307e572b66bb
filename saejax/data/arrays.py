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
import zlib
from collections.abc import Sequence

import numpy as np
from absl import logging

from saejax.config import ConfigError


def expand_paths(spec: str) -> list[str]:
    """Files named by a path, a glob, or several separated by commas (each glob sorted).

    Raises:
      FileNotFoundError: a part matches no file.
    """
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        found = sorted(glob.glob(os.path.expanduser(part)))
        if not found:
            raise FileNotFoundError(f"no .npy file matches {part!r}")
        out += found
    if not out:
        raise FileNotFoundError(f"no .npy files named by {spec!r}")
    return out


def _open_arrays(arrays) -> tuple[list[np.ndarray], list[dict]]:
    """(arrays, descriptions): .npy files memory-mapped, in-memory arrays as they are.

    Files are described by path, shape, dtype, size and modification time; arrays in memory
    by their row count and one crc32 over their float32 rows in order (so the same rows
    split differently describe the same data).
    """
    if isinstance(arrays, str):
        arrays = expand_paths(arrays)
    if isinstance(arrays, np.ndarray) or not isinstance(arrays, Sequence):
        arrays = [arrays]
    out, desc, memory = [], [], None
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
                         "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
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
    widths = {a.shape[1] for a in out}
    if len(widths) != 1:
        raise ConfigError(f"the activation arrays have different widths {sorted(widths)}")
    return out, desc


def _rows(arrays: list[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the arrays laid end to end."""
    parts, offset = [], 0
    for a in arrays:
        lo, hi = max(start - offset, 0), min(stop - offset, len(a))
        if lo < hi:
            parts.append(np.asarray(a[lo:hi], np.float32))
        offset += len(a)
    return np.concatenate(parts)


def write_array_store(arrays, out_dir: str, *, batch_size: int, dtype: str = "float32",
                      chunk_mb: float = 16.0, site: str | None = None,
                      overwrite: bool = False):
    """Writes activations (arrays or .npy files, rows [N, D]) into an activation store.

    Rows are kept in order; chunks hold a multiple of ``batch_size`` rows, so the last
    ``N mod chunk_rows`` rows are dropped (logged, and recorded in the store's plan). A
    complete store with the same plan (same files, sizes and times, or the same array
    contents) is reused; a half-written one resumes; a different one is refused unless
    ``overwrite``.

    Args:
      arrays: a numpy array, a list of them, or .npy paths / globs (a str may list several,
        separated by commas).
      out_dir: the store directory.
      batch_size: the SAE batch it will feed.
      dtype: "float32" or "bfloat16" on disk.
      chunk_mb: target chunk size.
      site: the site label the activations come from (None: unknown).

    Returns:
      The opened :class:`~saejax.data.activation_store.ActivationStore`.

    Raises:
      ConfigError: arrays of the wrong shape or dtype, or fewer rows than one batch.
    """
    from saejax.data.activation_store import (ActivationStore, ActivationStoreWriter,
                                              chunk_rows_for)

    import jax

    if jax.process_count() > 1:
        raise ConfigError("source.kind='arrays' writes its store from one process; in a "
                          "multi-process run write it first (saejax.activations."
                          "write_array_store) and train with source.kind='store'")
    mats, desc = _open_arrays(arrays)
    n, d = sum(len(a) for a in mats), mats[0].shape[1]
    chunk_rows = min(chunk_rows_for(d, dtype, batch_size, chunk_mb), n // batch_size * batch_size)
    if chunk_rows == 0:
        raise ConfigError(f"the activations hold {n} rows, fewer than one batch "
                          f"(batch_size {batch_size})")
    rows = n // chunk_rows * chunk_rows
    if rows < n:
        logging.warning("activation store %s: dropping the last %d of %d rows (chunks of %d "
                        "rows, a multiple of the batch)", out_dir, n - rows, n, chunk_rows)
    plan = {"rows": rows, "d": d, "dtype": dtype, "chunk_rows": chunk_rows, "site": site,
            "source": {"kind": "arrays", "inputs": desc, "dropped_rows": n - rows}}
    writer = ActivationStoreWriter(out_dir, plan, overwrite=overwrite)
    done = writer.committed()
    for c in range(writer.n_chunks):
        if c not in done:
            writer.write_chunk(c, _rows(mats, c * chunk_rows, (c + 1) * chunk_rows))
    writer.finalize()
    return ActivationStore.open(out_dir)
