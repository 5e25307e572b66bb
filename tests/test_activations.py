"""Device shuffle buffer, activation store round trip, corruption, harvest resume."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import parallel
from saejax.buffer import ShuffleBuffer
from saejax.harvest import harvest, harvest_chunk_rows
from saejax.config import MeshConfig
from saejax.data.loader import LoaderConfig
from saejax.data.activation_store import ActivationStore, ActivationStoreWriter
from saejax.data.loader import ActivationLoader
from saejax.data.token_store import CorruptStoreError, IncompleteStoreError, StoreExistsError

T = 16


def tagged_producer(mesh, contexts_per_call):
    """Rows [context id, position]: lets tests see which context each row came from."""
    state = {"next": 0}

    def produce():
        c0 = state["next"]
        state["next"] += contexts_per_call
        ids = np.stack(np.meshgrid(np.arange(c0, c0 + contexts_per_call), np.arange(T),
                                   indexing="ij"), -1).reshape(-1, 2).astype(np.float32)
        return parallel.host_to_global(ids, mesh, ("batch", None))

    return produce, state


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2), (1, 8)])
def test_buffer_mixes_contexts_and_serves_each_row_once(mesh_shape):
    mesh = parallel.make_mesh(MeshConfig(*mesh_shape))
    buf = ShuffleBuffer(mesh, capacity=2048, d=2, batch_size=64, seed=0)
    produce, counter = tagged_producer(mesh, contexts_per_call=8)
    state = buf.fill(buf.empty(), produce)
    served = []
    for _ in range(5 * buf.batches_per_refill):
        state, batch = buf.next_batch(state, produce)
        assert batch.shape == (64, 2)
        assert batch.sharding.spec == parallel.logical_to_spec(("batch", None))
        served.append(np.asarray(batch))
    rows = np.concatenate(served)
    keys = rows[:, 0] * T + rows[:, 1]
    assert len(np.unique(keys)) == len(keys)             # without replacement
    assert keys.max() < counter["next"] * T              # only produced rows
    contexts_per_batch = [len(np.unique(b[:, 0])) for b in served[buf.batches_per_refill:]]
    # A producer call holds 8 contexts (a batch of 64 rows straight from it would hold 4);
    # the buffer holds 128 contexts, and a batch draws from most of what it can.
    assert min(contexts_per_batch) >= 20, contexts_per_batch
    # The largest share of one context in any batch stays small.
    assert max(np.bincount(b[:, 0].astype(int)).max() for b in served) <= 8


def test_buffer_state_resumes_identically():
    mesh = parallel.make_mesh(MeshConfig(4, 2))
    buf = ShuffleBuffer(mesh, capacity=512, d=2, batch_size=32, seed=3)
    produce, counter = tagged_producer(mesh, contexts_per_call=4)
    state = buf.fill(buf.empty(), produce)
    for _ in range(11):
        state, _ = buf.next_batch(state, produce)
    saved = jax.tree.map(np.asarray, state)
    saved_counter = dict(counter)
    want = []
    for _ in range(20):
        state, b = buf.next_batch(state, produce)
        want.append(np.asarray(b))
    # Restore: arrays onto the buffer's shardings, producer at the same position.
    abstract = buf.abstract_state()
    restored = jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), saved, abstract)
    produce2, counter2 = tagged_producer(mesh, contexts_per_call=4)
    counter2.update(saved_counter)
    for w in want:
        restored, b = buf.next_batch(restored, produce2)
        np.testing.assert_array_equal(np.asarray(b), w)


def write_store(directory, n_chunks=4, rows=64, d=8, dtype="float32", procs=1, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(n_chunks * rows, d)).astype(np.float32)
    plan = {"rows": n_chunks * rows, "d": d, "dtype": dtype, "chunk_rows": rows, "site": "test"}
    writers = [ActivationStoreWriter(directory, plan, process_index=p, process_count=procs)
               for p in range(procs)]
    for w in writers:
        for c in w.my_chunks():
            w.write_chunk(c, data[c * rows:(c + 1) * rows])
    writers[0].finalize()
    return data, plan


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_store_round_trip_and_statistics(tmp_path, dtype):
    data, _ = write_store(str(tmp_path / "s"), dtype=dtype, procs=2)
    store = ActivationStore.open(str(tmp_path / "s"))
    got = np.concatenate([store.read_chunk(i) for i in range(4)]).astype(np.float32)
    want = data.astype(jnp.bfloat16).astype(np.float32) if dtype == "bfloat16" else data
    np.testing.assert_array_equal(got, want)
    assert store.stats["mean_norm"] == pytest.approx(np.linalg.norm(want, axis=1).mean(), rel=1e-6)
    assert store.stats["norm_scale"] == pytest.approx(np.sqrt(8) / store.stats["mean_norm"])
    np.testing.assert_allclose(store.stats["mean"], want.mean(0), rtol=1e-5, atol=1e-6)


def test_half_written_and_conflicting_stores(tmp_path):
    d = str(tmp_path / "s")
    plan = {"rows": 128, "d": 4, "dtype": "float32", "chunk_rows": 64}
    w = ActivationStoreWriter(d, plan)
    w.write_chunk(0, np.ones((64, 4), np.float32))
    with pytest.raises(IncompleteStoreError, match="1/2 chunks"):
        ActivationStore.open(d)
    assert ActivationStoreWriter(d, plan).resume_position() == 1
    with pytest.raises(StoreExistsError, match="different plan.*'d'"):
        ActivationStoreWriter(d, {**plan, "d": 8})
    with pytest.raises(ValueError, match="NaN"):
        w.write_chunk(1, np.full((64, 4), np.nan, np.float32))


def test_corrupt_chunk_is_detected_not_trained_on(tmp_path):
    d = str(tmp_path / "s")
    write_store(d)
    path = os.path.join(d, "acts.zarr", "c", "2", "0")
    raw = bytearray(open(path, "rb").read())
    raw[100] ^= 0x40
    open(path, "wb").write(bytes(raw))
    mesh = parallel.make_mesh(MeshConfig())
    loader = ActivationLoader(d, LoaderConfig(batch_size=64, shuffle=False, num_epochs=1,
                                              window_chunks=1, prefetch=0), mesh)
    next(loader), next(loader)
    with pytest.raises(CorruptStoreError, match="chunk 2"):
        next(loader)


def test_activation_loader_batches_and_restore(tmp_path):
    d = str(tmp_path / "s")
    data, _ = write_store(d, n_chunks=8, rows=32)
    mesh = parallel.make_mesh(MeshConfig(4, 2))
    cfg = LoaderConfig(batch_size=16, seed=1, window_chunks=2)
    loader = ActivationLoader(d, cfg, mesh)
    epoch = np.concatenate([np.asarray(next(loader)) for _ in range(loader.batches_per_epoch)])
    np.testing.assert_array_equal(np.sort(epoch, axis=0), np.sort(data, axis=0))
    state = loader.get_state()
    want = [np.asarray(next(loader)) for _ in range(3)]
    again = ActivationLoader(d, cfg, mesh)
    again.set_state(state)
    for w in want:
        np.testing.assert_array_equal(np.asarray(next(again)), w)


def fake_lm(mesh, d=8):
    """A jitted 'LM': token t at position p -> a fixed random row, so output is checkable."""
    table = jax.random.normal(jax.random.key(0), (300, d))
    out = parallel.named_sharding(mesh, ("batch", None))

    @jax.jit
    def produce(tokens):
        acts = table[tokens] + jnp.arange(tokens.shape[1])[None, :, None] * 0.01
        return jax.lax.with_sharding_constraint(acts.reshape(-1, d), out)

    return produce, table


def test_harvest_writes_every_context_and_resumes_after_a_kill(tmp_path):
    mesh = parallel.make_mesh(MeshConfig(4, 2))
    tokens = np.random.default_rng(0).integers(0, 300, size=(64, T)).astype(np.int32)
    read = lambda a, b: tokens[a:b]  # noqa: E731
    produce, table = fake_lm(mesh)
    chunk_rows = harvest_chunk_rows(T, 4, 32, 8, "float32", chunk_mb=0.004)
    assert chunk_rows % 32 == 0 and chunk_rows % (4 * T) == 0
    rows = 64 * T // chunk_rows * chunk_rows
    plan = {"rows": rows, "d": 8, "dtype": "float32", "chunk_rows": chunk_rows}

    ref_dir = str(tmp_path / "ref")
    ref = ActivationStoreWriter(ref_dir, plan)
    harvest(ref, produce, read, mesh, contexts_per_step=4, seq_len=T)
    ref.finalize()

    calls = {"n": 0}

    def dying(tokens_):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("killed")
        return produce(tokens_)

    d = str(tmp_path / "s")
    with pytest.raises(KeyboardInterrupt):
        harvest(ActivationStoreWriter(d, plan), dying, read, mesh, contexts_per_step=4, seq_len=T)
    w = ActivationStoreWriter(d, plan)
    done = w.resume_position()
    assert 0 < done < w.n_chunks
    summary = harvest(w, produce, read, mesh, contexts_per_step=4, seq_len=T)
    assert summary["chunks"] == w.n_chunks - done
    w.finalize()
    a, b = ActivationStore.open(ref_dir), ActivationStore.open(d)
    assert a.metadata["crc32"] == b.metadata["crc32"]
    # Chunk c holds exactly the activations of its contexts (rows permuted within it).
    ctx = chunk_rows // T
    for c in range(w.n_chunks):
        expect = np.asarray(produce(jnp.asarray(tokens[c * ctx:(c + 1) * ctx])))
        got = b.read_chunk(c)
        np.testing.assert_array_equal(np.sort(got, axis=0), np.sort(expect, axis=0))
        assert not np.array_equal(got, expect)  # permuted within the chunk
