"""SAE pipeline throughput: SAE-only vs from-store vs on-the-fly, and resampling's share.

    python benchmarks/bench_pipeline.py [--features=4096,16384] [--steps=20]

On one device (the CPU here) with the paper's shapes: a 1-layer LM (d_model 128, 512 ReLU
neurons; random weights: throughput does not depend on them) over the default token
store, SAE d_in 512, batch 4096. Prints a markdown table for benchmarks/RESULTS.md.

- SAE-only: the jitted step on a batch already on the device.
- on the fly: LM forward + device shuffle buffer + step (the training loop's source).
- from store: ActivationLoader over a harvested float32 store + step; and the loader alone
  (rows/s it can deliver vs rows/s a step consumes).
- resampling: one resample (sample of the paper's 819,200 inputs produced on the fly +
  loss + draws) against the paper's 25,000 steps between resamples.
"""

import dataclasses
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_FEATURES = flags.DEFINE_list("features", ["4096", "16384"], "dictionary sizes")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps per measurement")
_BATCH = flags.DEFINE_integer("batch_size", 4096, "SAE batch (rows)")
_SAMPLE = flags.DEFINE_integer("resample_sample", 819_200, "resample sample rows")
_STORE = flags.DEFINE_string("token_store", "runs/demo/corpus", "token store (built if missing)")


def _time(fn, steps):
    fn()  # compile / warm up
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn()
    import jax
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from saejax import parallel
    from saejax.activations import LMSource, OnTheFlySource, lm_producer
    from saejax.harvest import harvest, harvest_chunk_rows
    from saejax.config import MeshConfig
    from saejax.data.corpus import CorpusConfig, CorpusJobConfig
    from saejax.data.loader import LoaderConfig
    from saejax.data.activation_store import ActivationStore, ActivationStoreWriter
    from saejax.data.corpus import build_token_store
    from saejax.data.loader import ActivationLoader, TokenLoader
    from saejax.lm.config import ModelConfig
    from saejax.lm.model import build_model, split_params
    from saejax.sae.config import SAEConfig
    from saejax.sae.resample import make_resample
    from saejax.sae.step import init_state, make_train_step

    mesh = parallel.make_mesh(MeshConfig())
    try:
        from saejax.data.token_store import TokenStore
        store = TokenStore.open(_STORE.value)
    except FileNotFoundError:
        store = build_token_store(CorpusJobConfig(corpus=CorpusConfig(out_dir=_STORE.value)))
    lm = build_model(ModelConfig(vocab_size=store.vocab_size, max_len=store.seq_len), seed=0)
    graphdef, lm_params = split_params(lm)
    producer = lm_producer(graphdef, lm_params, "mlp.post", mesh, context_len=store.seq_len)
    B, T = _BATCH.value, store.seq_len
    lm_batch = B // T  # one LM call per SAE batch of rows
    tokens = TokenLoader(store, "train", LoaderConfig(batch_size=lm_batch), mesh)

    # Peak: a large f32 matmul in this run.
    a = jnp.ones((4096, 4096), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    peak = 2 * 4096**3 / _time(lambda: mm(a), 10)

    def measure(f: int, tmp: str):
        cfg = SAEConfig(d_in=512, n_features=f, resample_sample_size=_SAMPLE.value)
        x0 = np.asarray(producer(next(tokens)))
        state = init_state(cfg, mesh, x0)
        step = make_train_step(cfg, mesh)
        batch = parallel.host_to_global(x0[:B], mesh, ("batch", None))
        holder = {"s": state}

        def sae_only():
            holder["s"], m = step(holder["s"], batch)
            return m["loss"]

        t_sae = _time(sae_only, _STEPS.value)
        flops = 5 * 2 * B * 512 * f

        # The training loop's source: LM -> shuffle buffer, refills counted on the host.
        lm_src = LMSource(graphdef, lm_params, {}, "blocks.0.mlp.post", store, T, producer, 512)
        fly = OnTheFlySource(lm_src, mesh, batch_size=B, lm_batch_size=lm_batch,
                             buffer_rows=B * 32, norm_sample_contexts=lm_batch, seed=0)
        bstate = {"dev": fly.init_device_state()}

        def onthefly():
            bstate["dev"], xb = fly.next(bstate["dev"])
            holder["s"], m = step(holder["s"], xb)
            return m["loss"]

        # Time whole refill cycles so the refill cost is averaged in.
        t_fly = _time(onthefly, max(_STEPS.value, fly.buffer.batches_per_refill))

        # Store: harvest 16 chunks once (rows a multiple of the batch).
        sdir = os.path.join(tmp, f"acts{f}")
        chunk = harvest_chunk_rows(T, lm_batch, B, 512, "float32")
        plan = {"rows": chunk * 16, "d": 512, "dtype": "float32", "chunk_rows": chunk}
        writer = ActivationStoreWriter(sdir, plan)
        t0 = time.perf_counter()
        harvest(writer, producer, lambda a_, b_: store.read("train", a_, b_), mesh,
                contexts_per_step=lm_batch, seq_len=T)
        writer.finalize()
        t_harvest = time.perf_counter() - t0
        astore = ActivationStore.open(sdir)
        loader = ActivationLoader(astore, LoaderConfig(batch_size=B, window_chunks=4), mesh)

        def from_store():
            holder["s"], m = step(holder["s"], next(loader))
            return m["loss"]

        t_store = _time(from_store, _STEPS.value)
        reader = ActivationLoader(astore, LoaderConfig(batch_size=B, window_chunks=4,
                                                       seed=1), mesh)
        t_read = _time(lambda: next(reader), 4 * _STEPS.value)

        # Resampling: a paper-sized sample produced on the fly, then the resample.
        resample = make_resample(cfg, mesh)
        sample_tokens = TokenLoader(store, "train", dataclasses.replace(
            LoaderConfig(batch_size=lm_batch), seed=1), mesh)

        def one_resample():
            parts = [producer(next(sample_tokens)) for _ in range(-(-_SAMPLE.value // B))]
            sample = jnp.concatenate(parts)[:_SAMPLE.value]
            holder["s"], info = resample(holder["s"], sample)
            return info["n_dead"]

        t_res = _time(one_resample, 1)
        share = t_res / (t_res + 25_000 * t_fly)

        return (f, B / t_sae, flops / t_sae / peak, B / t_fly, t_sae / t_fly,
                     B / t_store, B / t_read, t_sae / t_read, t_res, share,
                     plan["rows"] / t_harvest)

    tmp = tempfile.mkdtemp(prefix="saejax-bench-")
    try:
        rows = [measure(f, tmp) for f in map(int, _FEATURES.value)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {jax.device_count()} "
          f"{jax.default_backend()} device(s), jax {jax.__version__}; measured f32 matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s; batch {B}, d_in 512\n")
    print("| F | SAE-only tok/s (% of peak) | on-the-fly tok/s (vs SAE-only) | from-store tok/s | "
          "store read rows/s (x step need) | resample s (share at 25k-step spacing) | "
          "harvest rows/s |")
    print("|---|---|---|---|---|---|---|")
    for (f, sae, mfu, fly, fly_ratio, st, rd, rd_ratio, res, share, hv) in rows:
        print(f"| {f} | {sae:,.0f} ({100 * mfu:.0f}%) | {fly:,.0f} ({100 * fly_ratio:.0f}%) | "
              f"{st:,.0f} | {rd:,.0f} ({rd_ratio:.0f}x) | {res:.2f} ({100 * share:.3f}%) | "
              f"{hv:,.0f} |")


if __name__ == "__main__":
    app.run(main)
