"""Grain loader over the token store: coverage, shuffling, sharding, exact restore."""

import collections

import jax
import numpy as np
import pytest

from saejax import parallel
from saejax.config import ConfigError, MeshConfig
from saejax.data.corpus import CorpusConfig, CorpusJobConfig
from saejax.data.loader import LoaderConfig
from saejax.data.tokenizer import TokenizerConfig
from saejax.data.corpus import build_token_store
from saejax.data.loader import ChunkShuffleBatches, TokenLoader


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    src = root / "src"
    src.mkdir()
    for i in range(50):
        (src / f"{i:02d}.txt").write_text(f"document {i} " * (20 + i))
    job = CorpusJobConfig(
        corpus=CorpusConfig(source="text", path=str(src), seq_len=16, val_fraction=0.2,
                            out_dir=str(root / "store"), chunk_mb=0.002),
        tokenizer=TokenizerConfig(kind="byte"))
    s = build_token_store(job)
    assert s.rows("train") // s.chunk_rows >= 8  # many chunks, so windows matter
    return s


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(MeshConfig(data=4, model=2))


def as_set(rows):
    return {r.tobytes() for r in np.asarray(rows)}


def multiset(rows):
    return collections.Counter(r.tobytes() for r in np.asarray(rows))


def row_ids(a, b):
    """A fake split whose row i holds the value i, so positions are unambiguous."""
    return np.arange(a, b, dtype=np.int32)[:, None]


def test_global_batches_are_sharded_over_data(store, mesh):
    loader = TokenLoader(store, "train", LoaderConfig(batch_size=32, prefetch=0), mesh)
    batch = next(loader)
    assert batch.shape == (32, 16) and batch.dtype == np.int32
    assert batch.sharding.spec == jax.sharding.PartitionSpec("data", None)
    host = np.asarray(batch)
    for shard in batch.addressable_shards:
        rows = shard.index[0]
        np.testing.assert_array_equal(np.asarray(shard.data), host[rows])
        i, _ = np.argwhere(mesh.devices == shard.device)[0]
        assert (rows.start, rows.stop) == (8 * i, 8 * i + 8)


def test_one_epoch_covers_every_row_once_in_shuffled_order(store, mesh):
    n = store.rows("train")
    bs = 8
    loader = TokenLoader(store, "train", LoaderConfig(batch_size=bs, num_epochs=1, seed=3), mesh)
    got = np.concatenate([np.asarray(b) for b in loader])
    assert len(got) == (n // bs) * bs
    full = store.read("train", 0, n)
    assert not multiset(got) - multiset(full)  # a sub-multiset: no row twice
    assert not np.array_equal(got, full[: len(got)])  # shuffled


def test_window_shuffle_covers_rows_once_and_mixes_chunks():
    n, chunk = 1000, 50
    ds = ChunkShuffleBatches(row_ids, n, chunk, 10, seed=0, shuffle=True, num_epochs=2,
                             window_chunks=4)
    assert len(ds) == 2 * 100
    epoch0 = np.concatenate([ds[j] for j in range(100)]).ravel()
    epoch1 = np.concatenate([ds[j] for j in range(100, 200)]).ravel()
    np.testing.assert_array_equal(np.sort(epoch0), np.arange(n))
    np.testing.assert_array_equal(np.sort(epoch1), np.arange(n))
    assert not np.array_equal(epoch0, epoch1)
    # Each window of 4 chunks (200 rows) is a permutation of 4 whole chunks ...
    for w in range(5):
        chunks = set(epoch0[w * 200:(w + 1) * 200] // chunk)
        assert len(chunks) == 4
    # ... and one batch draws from several of them.
    assert len(set(ds[0].ravel() // chunk)) > 1


def test_epochs_repeat_with_new_order(store, mesh):
    cfg = LoaderConfig(batch_size=8, seed=0, prefetch=0)
    loader = TokenLoader(store, "train", cfg, mesh)
    per_epoch = loader.batches_per_epoch
    e0 = np.concatenate([loader.next_local() for _ in range(per_epoch)])
    e1 = np.concatenate([loader.next_local() for _ in range(per_epoch)])
    assert as_set(e0) == as_set(e1)
    assert not np.array_equal(e0, e1)


def test_unshuffled_validation_reads_in_order(store, mesh):
    loader = TokenLoader(store, "val", LoaderConfig(batch_size=8, shuffle=False, num_epochs=1),
                         mesh)
    got = np.concatenate([np.asarray(b) for b in loader])
    np.testing.assert_array_equal(got, store.read("val", 0, len(got)))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_restored_iterator_yields_the_same_next_batches(store, mesh, prefetch):
    cfg = LoaderConfig(batch_size=16, seed=7, prefetch=prefetch)
    a = TokenLoader(store, "train", cfg, mesh)
    for _ in range(a.batches_per_epoch + 3):  # cross an epoch boundary
        next(a)
    state = a.get_state()
    want = [np.asarray(next(a)) for _ in range(5)]
    b = TokenLoader(store, "train", cfg, mesh)
    b.set_state(state)
    for w in want:
        np.testing.assert_array_equal(np.asarray(next(b)), w)


def test_state_from_a_different_stream_is_refused(store, mesh):
    a = TokenLoader(store, "train", LoaderConfig(batch_size=16, seed=1), mesh)
    b = TokenLoader(store, "train", LoaderConfig(batch_size=16, seed=2), mesh)
    with pytest.raises(ValueError, match="different data stream.*seed"):
        b.set_state(a.get_state())


def test_process_slices_reassemble_the_single_process_batches():
    """Three processes holding rows [0,4), [4,8), [8,12) of each 12-row batch see exactly
    the single-process stream, cut into their slices: the order ignores the process count."""
    n = 1000
    kw = dict(seed=0, shuffle=True, num_epochs=2, window_chunks=2)
    whole = ChunkShuffleBatches(row_ids, n, 64, 12, **kw)
    parts = [ChunkShuffleBatches(row_ids, n, 64, 12, rows=(4 * i, 4 * i + 4), **kw)
             for i in range(3)]
    assert all(len(p) == len(whole) == 2 * (n // 12) for p in parts)
    for j in (0, 1, 40, len(whole) - 1):
        np.testing.assert_array_equal(np.concatenate([p[j] for p in parts]), whole[j])
    with pytest.raises(ValueError, match="not a slice"):
        ChunkShuffleBatches(row_ids, n, 64, 12, rows=(8, 16), **kw)


def test_loader_state_does_not_pin_the_process_count(store, mesh):
    """A state saved by a loader feeding a slice restores into one feeding another slice
    (a run resumed with a different process count continues the same stream)."""
    cfg = LoaderConfig(batch_size=16, seed=5, prefetch=0)
    a = TokenLoader(store, "train", cfg, mesh)
    for _ in range(3):
        next(a)
    state = a.get_state()
    assert "processes" not in state
    want = np.asarray(next(a))
    b = TokenLoader(store, "train", cfg, mesh)
    b.set_state(state)
    np.testing.assert_array_equal(np.asarray(next(b)), want)


def test_batch_larger_than_split_is_a_clear_error(store, mesh):
    with pytest.raises(ConfigError, match="loader.batch_size.*only"):
        TokenLoader(store, "val", LoaderConfig(batch_size=8 * 10_000), mesh)
    with pytest.raises(ConfigError, match="divisible"):
        TokenLoader(store, "val", LoaderConfig(batch_size=10), mesh)
