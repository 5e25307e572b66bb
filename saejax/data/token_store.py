"""Token store: packed contexts [N, T] in tensorstore zarr3 arrays, one per split.

Layout of a store directory::

    metadata.json        status ("writing" | "complete"), settings fingerprint, tokenizer,
                         manifest, counts, per-split rows and per-chunk sha256 checksums
    tokenizer_info.json  (+ tokenizer.json for BPE / user tokenizers)
    train.zarr/ val.zarr/

``metadata.json`` is rewritten atomically after every chunk lands, so a killed build
leaves a store that says exactly how far it got: opening it for reading raises
:class:`IncompleteStoreError`, and re-running the same build resumes after the last
committed chunk (re-deriving earlier chunks and checking their checksums).

Reads are verified: the first read that touches a chunk reads the whole chunk, checks its
sha256 against the metadata and its token ids against the vocabulary, and raises
:class:`CorruptStoreError` naming the file and how to rebuild it; later reads of the chunk
trust that check (benchmarks/RESULTS.md measures the cost).

Legend: N contexts (rows), T tokens per context.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import tensorstore as ts

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SPLITS = ("train", "val")


class StoreError(RuntimeError):
    """Base class of store errors."""


class IncompleteStoreError(StoreError):
    """The store was not completely written (interrupted build)."""


class CorruptStoreError(StoreError):
    """Stored data does not match its recorded checksums or shape."""


class StoreExistsError(StoreError):
    """A store with different settings is in the way and overwrite was not requested."""


def open_named(open_fn, directory: str, field: str):
    """``open_fn(directory)`` for a store a config field names: nothing there, a half-written
    store or the wrong kind of store is a ConfigError naming the field (the user points at
    the wrong place); a corrupt store stays a :class:`CorruptStoreError`."""
    from saejax.config import ConfigError

    try:
        return open_fn(directory)
    except (FileNotFoundError, StoreError) as e:
        if isinstance(e, CorruptStoreError):
            raise
        raise ConfigError(f"config field {field!r} = {directory!r} is invalid: {e}") from None


def chunk_checksum(block: np.ndarray) -> str:
    """sha256 of a block's bytes (read in place: no copy of the block)."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(block)).cast("B")).hexdigest()


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metadata(directory: str) -> dict | None:
    """A store's metadata.json, or None if it has none.

    Raises:
      CorruptStoreError: the file is not valid JSON (the message names it).
    """
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptStoreError(f"{path} is not valid JSON ({e}); the store's metadata is "
                                f"damaged: rebuild the store") from None
    if not isinstance(meta, dict):
        raise CorruptStoreError(f"{path} holds a {type(meta).__name__}, not a store's metadata "
                                f"record; rebuild the store")
    return meta


def _spec(directory: str, split: str) -> dict:
    return {"driver": "zarr3", "kvstore": {"driver": "file",
                                           "path": os.path.join(os.path.abspath(directory), f"{split}.zarr")}}


def create_array(directory: str, split: str, seq_len: int, chunk_rows: int, dtype: str
                 ) -> ts.TensorStore:
    spec = _spec(directory, split)
    spec["metadata"] = {
        "shape": [0, seq_len], "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_rows, seq_len]}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
    }
    return ts.open(spec, create=True, delete_existing=True).result()


def open_array(directory: str, split: str, *, write: bool = False) -> ts.TensorStore:
    kwargs = {"open": True, "read": True, "write": write}
    return ts.open(_spec(directory, split), **kwargs).result()


class TokenStore:
    """Read access to a completed token store.

    Use :meth:`open`; it refuses half-written stores. ``read`` returns int32 tokens, each
    chunk verified on its first read (``verify_reads=False`` skips that, for benchmarks).
    """

    def __init__(self, directory: str, metadata: dict, *, verify_reads: bool = True):
        self.directory = directory
        self.metadata = metadata
        self.verify_reads = verify_reads
        self._arrays: dict[str, ts.TensorStore] = {}
        self._verified: set[tuple[str, int]] = set()

    @classmethod
    def open(cls, directory: str, *, verify_reads: bool = True) -> TokenStore:
        meta = read_metadata(directory)
        if meta is None:
            raise FileNotFoundError(f"no token store at {directory!r} ({METADATA_FILE} missing); "
                                    f"build one with launch/build_corpus.py")
        if meta.get("kind") != "token_store":
            raise StoreError(f"{directory!r} holds a {meta.get('kind')!r}, not a token store")
        if meta.get("status") != "complete":
            done = {s: meta["splits"][s]["rows"] for s in meta.get("splits", {})}
            raise IncompleteStoreError(
                f"token store {directory!r} is half-written (status={meta.get('status')!r}, rows "
                f"committed so far: {done}); re-run the same build_corpus command to resume it, "
                f"or set corpus.overwrite=true to start over")
        store = cls(directory, meta, verify_reads=verify_reads)
        for split, info in meta["splits"].items():
            if info["rows"] and store.array(split).shape[0] < info["rows"]:
                raise CorruptStoreError(f"{directory}/{split}.zarr has {store.array(split).shape[0]} "
                                        f"rows but the metadata records {info['rows']}")
        return store

    # -- properties ---------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return int(self.metadata["seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.metadata["tokenizer"]["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.metadata["tokenizer"]["eot_id"])

    @property
    def chunk_rows(self) -> int:
        return int(self.metadata["chunk_rows"])

    def rows(self, split: str) -> int:
        self._check_split(split)
        return int(self.metadata["splits"][split]["rows"])

    def tokenizer(self):
        from saejax.data.tokenizer import load_tokenizer
        return load_tokenizer(self.directory)

    # -- reads --------------------------------------------------------------------------
    def _check_split(self, split: str) -> None:
        if split not in self.metadata["splits"]:
            raise KeyError(f"token store has no split {split!r}; it has "
                           f"{sorted(self.metadata['splits'])}")

    def array(self, split: str) -> ts.TensorStore:
        self._check_split(split)
        if split not in self._arrays:
            self._arrays[split] = open_array(self.directory, split)
        return self._arrays[split]

    def read(self, split: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a split as int32 [stop - start, T] (one tensorstore read).

        A chunk not read before is read whole and verified first (:meth:`check_chunk`).
        """
        n = self.rows(split)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"rows [{start}, {stop}) out of range for split {split!r} with {n} rows")
        if self.verify_reads and stop > start:
            first, last = start // self.chunk_rows, (stop - 1) // self.chunk_rows
            if first == last and (split, first) not in self._verified:
                block = self.check_chunk(split, first)  # the whole chunk: slice it
                lo = first * self.chunk_rows
                return block[start - lo:stop - lo].astype(np.int32)
            for i in range(first, last + 1):
                if (split, i) not in self._verified:
                    self.check_chunk(split, i)
        return self.array(split)[start:stop].read().result().astype(np.int32)

    def check_chunk(self, split: str, index: int) -> np.ndarray:
        """Reads chunk ``index`` whole and checks its sha256 and its token ids.

        Raises:
          CorruptStoreError: naming the file, the chunk and how to rebuild the store.
        """
        info = self.metadata["splits"][split]
        lo = index * self.chunk_rows
        hi = min(lo + self.chunk_rows, info["rows"])
        block = self.array(split)[lo:hi].read().result()
        where = f"token store {self.directory!r}: {split}.zarr chunk {index} (rows {lo}:{hi})"
        fix = ("rebuild it with launch/build_corpus.py and corpus.overwrite=true (the settings "
               "it was built with are in its metadata.json)")
        if chunk_checksum(block) != info["chunks"][index]:
            raise CorruptStoreError(f"{where} does not match its recorded sha256: the store is "
                                    f"corrupt; {fix}")
        if block.size and int(block.max()) >= self.vocab_size:
            raise CorruptStoreError(f"{where} holds token id {int(block.max())}, outside the "
                                    f"vocabulary of {self.vocab_size}; {fix}")
        self._verified.add((split, index))
        return block

    def verify(self, splits: tuple[str, ...] | None = None) -> None:
        """Re-reads every chunk and checks it (sha256, token ids), verified before or not.

        Raises:
          CorruptStoreError: naming the first chunk that does not match.
        """
        for split in splits or tuple(self.metadata["splits"]):
            for i in range(len(self.metadata["splits"][split]["chunks"])):
                self.check_chunk(split, i)

    def __repr__(self) -> str:
        parts = ", ".join(f"{s}={self.rows(s)}" for s in self.metadata["splits"])
        return f"TokenStore({self.directory!r}, T={self.seq_len}, vocab={self.vocab_size}, {parts})"
