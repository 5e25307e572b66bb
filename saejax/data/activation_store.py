"""Activation store: LM activations [N, D] in a tensorstore zarr3 array, written by chunks.

Layout::

    metadata.json        plan (rows, D, dtype, chunk_rows, chunks per process), source
                         (LM checkpoint identity, site, token range), status, final statistics
    acts.zarr/           [N, D] float32 or bfloat16, chunks of [chunk_rows, D] (~16 MB)
    chunks/000123.json   one commit record per chunk: rows, crc32, partial statistics

Every jax process writes its own contiguous range of chunks. A chunk counts as written only
once its commit record exists (written atomically after the data), so a killed harvest
resumes at the first chunk without a record, and a chunk whose bytes do not match its
crc32 is detected when read (:class:`CorruptStoreError`), never trained on.

Legend: N rows (one per token), D activation width, R rows per chunk.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
import zlib
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts
from jaxtyping import Float

from saejax.data.token_store import (CorruptStoreError, IncompleteStoreError, StoreExistsError,
                                     StoreError, read_metadata, write_json_atomic)
from saejax.normalize import ActivationStats, Normalizer

METADATA_FILE = "metadata.json"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def chunk_rows_for(d: int, dtype: str, batch_size: int, chunk_mb: float = 16.0) -> int:
    """Rows per chunk: about ``chunk_mb`` MB, and a multiple of ``batch_size``."""
    per_row = d * DTYPES[dtype].itemsize
    rows = int(chunk_mb * 2**20) // per_row
    return max(batch_size, rows // batch_size * batch_size)


def crc32(block: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(block).view(np.uint8))


def _spec(directory: str) -> dict:
    return {"driver": "zarr3",
            "kvstore": {"driver": "file", "path": os.path.join(os.path.abspath(directory), "acts.zarr")}}


def _record_path(directory: str, index: int) -> str:
    return os.path.join(directory, "chunks", f"{index:06d}.json")


def _wait_for(path: str, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} ({path})")
        time.sleep(0.05)


class ActivationStoreWriter:
    """Creates (or resumes) a store and commits chunks; one writer per jax process.

    Process 0 creates the array and metadata; the others wait for them. Chunk ``i`` belongs
    to process ``i // chunks_per_process``.

    Args:
      directory: store directory (shared by all processes).
      plan: ``rows``, ``d``, ``dtype`` ("float32" | "bfloat16"), ``chunk_rows``, plus any
        description of the source (``site``, ``lm``, ``tokens``...). A store with the same
        plan resumes; a different one is refused unless ``overwrite``.
      process_index, process_count: this process and how many write.
    """

    def __init__(self, directory: str, plan: dict[str, Any], *, process_index: int = 0,
                 process_count: int = 1, overwrite: bool = False, timeout: float = 600.0):
        rows, chunk_rows = int(plan["rows"]), int(plan["chunk_rows"])
        if rows <= 0 or rows % chunk_rows:
            raise ValueError(f"activation store rows ({rows}) must be a positive multiple of "
                             f"chunk_rows ({chunk_rows})")
        n_chunks = rows // chunk_rows
        if n_chunks % process_count:
            raise ValueError(f"{n_chunks} chunks do not split evenly over {process_count} processes")
        if plan["dtype"] not in DTYPES:
            raise ValueError(f"activation dtype {plan['dtype']!r} must be one of {list(DTYPES)}")
        self.directory, self.plan = directory, dict(plan)
        self.chunk_rows, self.n_chunks = chunk_rows, n_chunks
        self.process_index, self.process_count = process_index, process_count
        self.chunks_per_process = n_chunks // process_count
        meta_path = os.path.join(directory, METADATA_FILE)
        if process_index == 0:
            self._create_or_resume(overwrite)
        else:
            _wait_for(meta_path, timeout, "process 0 to create the activation store")
            meta = read_metadata(directory)
            if meta["plan"] != self.plan:
                raise StoreExistsError(f"activation store {directory!r} was created with a "
                                       f"different plan than this process's")
        self.array = ts.open(_spec(directory), open=True, read=True, write=True).result()

    def _create_or_resume(self, overwrite: bool) -> None:
        try:
            meta = read_metadata(self.directory)
        except CorruptStoreError:  # a damaged metadata.json: replaced only when asked to
            if not overwrite:
                raise
            meta = {"kind": "activation_store", "plan": None}
        if meta is not None and meta.get("kind") != "activation_store":
            what = "token store" if meta.get("kind") == "token_store" else repr(meta.get("kind"))
            raise StoreExistsError(f"refusing to write an activation store into "
                                   f"{self.directory!r}: it holds a {what}; choose another "
                                   f"out_dir")
        if meta is not None and not overwrite:
            if meta.get("plan") != self.plan:
                diff = sorted(k for k in set(meta.get("plan", {})) | set(self.plan)
                              if meta.get("plan", {}).get(k) != self.plan.get(k))
                raise StoreExistsError(
                    f"refusing to overwrite activation store {self.directory!r}: it was "
                    f"written with a different plan (differing: {diff}); choose another "
                    f"directory or pass overwrite")
            return  # same plan: resume
        if meta is None and os.path.isdir(self.directory) and os.listdir(self.directory) \
                and not overwrite:
            raise StoreExistsError(f"refusing to write an activation store into non-empty "
                                   f"{self.directory!r}, which is not one")
        if os.path.isdir(self.directory):
            shutil.rmtree(self.directory)
        os.makedirs(os.path.join(self.directory, "chunks"))
        spec = _spec(self.directory)
        spec["metadata"] = {
            "shape": [self.plan["rows"], self.plan["d"]], "data_type": self.plan["dtype"],
            "chunk_grid": {"name": "regular",
                           "configuration": {"chunk_shape": [self.chunk_rows, self.plan["d"]]}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        }
        ts.open(spec, create=True).result()
        write_json_atomic(os.path.join(self.directory, METADATA_FILE),
                          {"kind": "activation_store", "status": "writing", "plan": self.plan,
                           "n_chunks": self.n_chunks, "process_count": self.process_count})

    def my_chunks(self) -> range:
        lo = self.process_index * self.chunks_per_process
        return range(lo, lo + self.chunks_per_process)

    def committed(self) -> set[int]:
        names = glob.glob(os.path.join(self.directory, "chunks", "*.json"))
        return {int(os.path.basename(n)[:-5]) for n in names}

    def resume_position(self) -> int:
        """How many chunks *every* process has committed: all restart from there together
        (the harvest's jitted steps are collective, so processes must stay in step)."""
        done = self.committed()
        counts = []
        for p in range(self.process_count):
            lo = p * self.chunks_per_process
            k = 0
            while k < self.chunks_per_process and lo + k in done:
                k += 1
            counts.append(k)
        return min(counts)

    def write_chunk(self, index: int, block: Float[np.ndarray, "R D"]) -> None:
        """Writes chunk ``index`` and then its commit record (crc32 and statistics)."""
        if index not in self.my_chunks():
            raise ValueError(f"chunk {index} belongs to another process")
        dtype = DTYPES[self.plan["dtype"]]
        block = np.asarray(block)
        if block.shape != (self.chunk_rows, self.plan["d"]):
            raise ValueError(f"chunk {index} has shape {block.shape}, expected "
                             f"{(self.chunk_rows, self.plan['d'])}")
        if not np.isfinite(block).all():
            raise ValueError(f"chunk {index} contains NaN or Inf activations; not writing it")
        stored = block.astype(dtype)
        lo = index * self.chunk_rows
        self.array[lo:lo + self.chunk_rows].write(stored).result()
        x = stored.astype(np.float64)
        write_json_atomic(_record_path(self.directory, index), {
            "index": index, "rows": self.chunk_rows, "crc32": crc32(stored),
            "process": self.process_index, "sum_norm": float(np.linalg.norm(x, axis=1).sum()),
            "sum_sq_norm": float((x * x).sum()), "sum": x.sum(0).tolist()})

    def finalize(self, timeout: float = 600.0) -> dict:
        """Process 0: waits for every chunk record, then marks the store complete."""
        if self.process_index != 0:
            return {}
        for i in range(self.n_chunks):
            _wait_for(_record_path(self.directory, i), timeout, f"chunk {i}")
        meta = read_metadata(self.directory)
        records = [_read_record(self.directory, i) for i in range(self.n_chunks)]
        stats = ActivationStats.from_sums(
            sum(r["rows"] for r in records), sum(r["sum_norm"] for r in records),
            sum(r["sum_sq_norm"] for r in records), np.sum([r["sum"] for r in records], axis=0))
        # The scale that makes E||x|| = sqrt(D), for information (the run computes its own
        # from these statistics, saejax.normalize); 1.0 for all-zero activations.
        scale = Normalizer.from_stats(stats).scale if stats.mean_norm > 0 else 1.0
        meta["stats"] = {**stats.to_dict(), "norm_scale": scale}
        meta["crc32"] = [r["crc32"] for r in records]
        meta["status"] = "complete"
        write_json_atomic(os.path.join(self.directory, METADATA_FILE), meta)
        return meta


def _read_record(directory: str, index: int) -> dict:
    with open(_record_path(directory, index)) as f:
        return json.load(f)


class ActivationStore:
    """Read access to a completed activation store; whole-chunk reads, crc32-checked."""

    def __init__(self, directory: str, metadata: dict):
        self.directory, self.metadata = directory, metadata
        plan = metadata["plan"]
        self.rows, self.d = int(plan["rows"]), int(plan["d"])
        self.chunk_rows, self.dtype = int(plan["chunk_rows"]), plan["dtype"]
        self.array = ts.open(_spec(directory), open=True, read=True).result()
        self._verified: set[int] = set()

    @classmethod
    def open(cls, directory: str) -> ActivationStore:
        meta = read_metadata(directory)
        if meta is None:
            raise FileNotFoundError(f"no activation store at {directory!r} ({METADATA_FILE} "
                                    f"missing); harvest one with launch/harvest.py")
        if meta.get("kind") != "activation_store":
            raise StoreError(f"{directory!r} holds a {meta.get('kind')!r}, not an activation store")
        if meta.get("status") != "complete":
            done = len(glob.glob(os.path.join(directory, "chunks", "*.json")))
            raise IncompleteStoreError(
                f"activation store {directory!r} is half-written ({done}/{meta['n_chunks']} chunks "
                f"committed); re-run the same harvest command to resume it")
        return cls(directory, meta)

    @property
    def stats(self) -> dict:
        return self.metadata["stats"]

    def statistics(self) -> ActivationStats:
        """The normalisation statistics merged from every chunk's commit record."""
        return ActivationStats.from_dict(self.stats)

    @property
    def fingerprint(self) -> str:
        """A short identity of the store's contents (a hash of the chunk checksums)."""
        import hashlib

        return hashlib.sha256(json.dumps(self.metadata["crc32"]).encode()).hexdigest()[:16]

    def read_chunk(self, index: int) -> np.ndarray:
        """Chunk ``index`` as stored (float32 or bfloat16), after checking its crc32."""
        lo = index * self.chunk_rows
        block = self.array[lo:lo + self.chunk_rows].read().result()
        if crc32(block) != self.metadata["crc32"][index]:
            raise CorruptStoreError(f"activation store {self.directory!r}: chunk {index} (rows "
                                    f"{lo}:{lo + self.chunk_rows}) fails its crc32 check; it is "
                                    f"corrupt and will not be trained on: rebuild the store "
                                    f"(launch/harvest.py with --config.overwrite=true)")
        return block

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) within one chunk, read as the whole chunk and checked."""
        index = start // self.chunk_rows
        if (stop - 1) // self.chunk_rows != index:
            raise ValueError(f"rows [{start}, {stop}) cross a chunk boundary")
        block = self.read_chunk(index)
        lo = index * self.chunk_rows
        return block[start - lo:stop - lo]

    def verify(self) -> None:
        for i in range(len(self.metadata["crc32"])):
            self.read_chunk(i)
