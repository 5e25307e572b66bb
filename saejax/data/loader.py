"""Grain pipeline over a chunked store: windowed shuffle, per-process shards, global batches.

Reading rows one at a time from tensorstore is orders of magnitude too slow, so the
pipeline reads whole chunks: each epoch it permutes this process's chunks, groups them
into windows of ``window_chunks`` chunks, reads a window with one read per chunk and
permutes the rows inside the window. Batch ``j`` of the grain ``MapDataset`` is a pure
function of ``(seed, j)``, so the iterator's state is one integer and a restored iterator
yields exactly the batches the original would have.

Multi-process: every process computes the same plan for the whole split (chunk order,
windows, row permutations) and loads only its rows ``[lo, hi)`` of each *global* batch
(:func:`saejax.parallel.process_rows`, from the mesh); :func:`saejax.parallel.host_to_global`
assembles the global batch on the mesh. Batch ``j`` is therefore the same rows in the same
order for any number of processes, and a loader state saved by an N-process run restores
in an M-process run. The price: with shuffling, a process reads every window a batch
touches (each process reads the whole stream and keeps ``(hi - lo) / B`` of it), which the
chunk cache and the store's read rate (benchmarks/RESULTS.md) make affordable up to tens of
processes.

Legend: B global batch, b = hi - lo this process's rows of it, T tokens per context.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable

import grain
import jax
import numpy as np

from saejax import parallel
from saejax.config import ConfigError, check_nonnegative, check_positive
from saejax.data.token_store import TokenStore

ReadRows = Callable[[int, int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """Token-store loader. ``batch_size`` is global (all processes together)."""

    batch_size: int = 64
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    window_chunks: int = 4
    prefetch: int = 2

    def __post_init__(self):
        check_positive("loader.batch_size", self.batch_size)
        if self.num_epochs is not None:
            check_positive("loader.num_epochs", self.num_epochs)
        check_positive("loader.window_chunks", self.window_chunks)
        check_nonnegative("loader.prefetch", self.prefetch)


class ChunkShuffleBatches(grain.MapDataset):
    """Batch ``j`` -> rows ``[lo, hi)`` of global batch ``j`` (all of it by default).

    Args:
      read_rows: reads rows [start, stop) of the split (one tensorstore read).
      num_rows: rows in the split.
      chunk_rows: the store's rows per chunk (reads never cross a chunk).
      batch_size: rows per global batch.
      seed: shuffle seed (the same on every process).
      shuffle: permute chunk order and rows within windows every epoch.
      num_epochs: None repeats forever.
      window_chunks: chunks mixed together by the row permutation.
      rows: this process's slice ``(lo, hi)`` of every global batch.
      batch_field: the config field that set ``batch_size``, for error messages.
    """

    def __init__(self, read_rows: ReadRows, num_rows: int, chunk_rows: int, batch_size: int, *,
                 seed: int, shuffle: bool, num_epochs: int | None, window_chunks: int,
                 rows: tuple[int, int] | None = None, batch_field: str = "loader.batch_size"):
        super().__init__()
        self.batches_per_epoch = num_rows // batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"config field {batch_field!r} = {batch_size} is invalid: the split has "
                f"only {num_rows} rows")
        lo, hi = rows or (0, batch_size)
        if not 0 <= lo < hi <= batch_size:
            raise ValueError(f"rows {(lo, hi)} are not a slice of a {batch_size}-row batch")
        self._slice = (lo, hi)
        self._read = read_rows
        self._batch = batch_size
        self._seed, self._shuffle, self._epochs = seed, shuffle, num_epochs
        self._blocks = [(s, min(s + chunk_rows, num_rows)) for s in range(0, num_rows, chunk_rows)]
        self._window_chunks = window_chunks
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._epoch_plan: dict[int, tuple[list[list[tuple[int, int]]], np.ndarray]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        if self._epochs is None:
            return sys.maxsize
        return self._epochs * self.batches_per_epoch

    def __str__(self) -> str:
        return f"ChunkShuffleBatches(B={self._batch}, slice={self._slice})"

    def _plan(self, epoch: int) -> tuple[list[list[tuple[int, int]]], np.ndarray]:
        """Windows of blocks for an epoch, and the cumulative row count at window ends."""
        if epoch not in self._epoch_plan:
            order = np.arange(len(self._blocks))
            if self._shuffle:
                order = np.random.default_rng([self._seed, epoch]).permutation(order)
            w = self._window_chunks
            windows = [[self._blocks[i] for i in order[k:k + w]] for k in range(0, len(order), w)]
            ends = np.cumsum([sum(b - a for a, b in win) for win in windows])
            self._epoch_plan = {epoch: (windows, ends)}  # keep one epoch's plan
        return self._epoch_plan[epoch]

    def _window(self, epoch: int, w: int, blocks: list[tuple[int, int]]) -> np.ndarray:
        key = (epoch, w)
        if key not in self._cache:
            rows = np.concatenate([self._read(a, b) for a, b in blocks])
            if self._shuffle:
                rows = rows[np.random.default_rng([self._seed, epoch, w]).permutation(len(rows))]
            self._cache[key] = rows
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return self._cache[key]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range ({len(self)} batches)")
        epoch, j = divmod(index, self.batches_per_epoch)
        with self._lock:
            windows, ends = self._plan(epoch)
            lo, hi = self._slice
            pos = np.arange(j * self._batch + lo, j * self._batch + hi)
            win_of = np.searchsorted(ends, pos, side="right")
            out = []
            for w in np.unique(win_of):
                start = ends[w - 1] if w else 0
                rows = self._window(epoch, int(w), windows[w])
                out.append(rows[pos[win_of == w] - start])
            return np.concatenate(out)


class BatchLoader:
    """Iterates a :class:`ChunkShuffleBatches` and returns global batches on the mesh.

    ``get_state()`` is JSON-serialisable (store it in the checkpoint); ``set_state``
    continues with exactly the batches the saved loader would have produced, and refuses a
    state saved for a different data stream.
    """

    def __init__(self, dataset: ChunkShuffleBatches, mesh: jax.sharding.Mesh,
                 axes: tuple[str | None, ...], identity: dict, prefetch: int):
        self.dataset, self.mesh, self._axes, self._ident = dataset, mesh, axes, identity
        read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
        self._iter = iter(dataset.to_iter_dataset(read))

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset.batches_per_epoch

    def next_local(self) -> np.ndarray:
        """This process's rows of the next batch, as NumPy."""
        return next(self._iter)

    def __iter__(self):
        return self

    def __next__(self) -> jax.Array:
        return parallel.host_to_global(self.next_local(), self.mesh, self._axes)

    def get_state(self) -> dict:
        return {"iterator": self._iter.get_state(), **self._ident}

    def set_state(self, state: dict) -> None:
        diff = {k: (state.get(k), v) for k, v in self._ident.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"loader state was saved for a different data stream; "
                             f"(saved, now) differ in {diff}")
        self._iter.set_state(state["iterator"])


def _shard_dataset(read_rows: ReadRows, num_rows: int, chunk_rows: int, config: LoaderConfig,
                   mesh: jax.sharding.Mesh, batch_field: str) -> ChunkShuffleBatches:
    parallel.check_divisible(batch_field, config.batch_size, mesh, parallel.DATA)
    return ChunkShuffleBatches(
        read_rows, num_rows, chunk_rows, config.batch_size, seed=config.seed,
        shuffle=config.shuffle, num_epochs=config.num_epochs, window_chunks=config.window_chunks,
        rows=parallel.process_rows(mesh, config.batch_size), batch_field=batch_field)


def _identity(config: LoaderConfig, **kw) -> dict:
    # No process count: the stream is the same for any number of processes.
    return {**kw, "batch_size": config.batch_size, "seed": config.seed, "shuffle": config.shuffle,
            "window_chunks": config.window_chunks}


class TokenLoader(BatchLoader):
    """Global token batches ``Int[Array, "B T"]`` (int32) sharded over "batch".

    Example::

        loader = TokenLoader(store_dir, "train", LoaderConfig(batch_size=64), mesh)
        batch = next(loader)
        state = loader.get_state()
        loader.set_state(state)

    ``batch_field`` names the config field behind ``config.batch_size`` in error messages.
    """

    def __init__(self, store: TokenStore | str, split: str, config: LoaderConfig,
                 mesh: jax.sharding.Mesh, *, batch_field: str = "loader.batch_size"):
        self.store = TokenStore.open(store) if isinstance(store, str) else store
        self.split, self.config = split, config
        dataset = _shard_dataset(lambda a, b: self.store.read(split, a, b), self.store.rows(split),
                                 self.store.chunk_rows, config, mesh, batch_field)
        ident = _identity(config, store=self.store.metadata["fingerprint"], split=split)
        super().__init__(dataset, mesh, ("batch", None), ident, config.prefetch)


class ActivationLoader(BatchLoader):
    """Global activation batches ``Float[Array, "B D"]`` sharded over "batch".

    Rows come back in the stored dtype (float32 or bfloat16); every chunk is read whole and
    its crc32 checked, so a corrupt chunk raises instead of being trained on.
    """

    def __init__(self, store, config: LoaderConfig, mesh: jax.sharding.Mesh, *,
                 batch_field: str = "loader.batch_size"):
        from saejax.data.activation_store import ActivationStore

        self.store = ActivationStore.open(store) if isinstance(store, str) else store
        self.config = config
        dataset = _shard_dataset(self.store.read_rows, self.store.rows, self.store.chunk_rows,
                                 config, mesh, batch_field)
        ident = _identity(config, store=self.store.metadata["crc32"][:4],
                          rows=self.store.rows)
        super().__init__(dataset, mesh, ("batch", None), ident, config.prefetch)
