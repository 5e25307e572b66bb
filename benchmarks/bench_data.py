"""Data-layer throughput: corpus -> token store build, and loader tokens/s.

    python benchmarks/bench_data.py [--out_dir=runs/bench] [--steps=300]

Prints a markdown table (paste into benchmarks/RESULTS.md with date, machine, command).
"""

import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_OUT = flags.DEFINE_string("out_dir", None, "where stores are built (default: a temp dir)")
_STEPS = flags.DEFINE_integer("steps", 300, "loader batches to time")
_BATCH = flags.DEFINE_integer("batch_size", 256, "loader global batch (contexts)")


def main(argv):
    del argv
    import jax

    from saejax import parallel
    from saejax.config import MeshConfig
    from saejax.data.corpus import CorpusConfig, CorpusJobConfig
    from saejax.data.loader import LoaderConfig
    from saejax.data.tokenizer import TokenizerConfig
    from saejax.data.corpus import build_token_store
    from saejax.data.loader import TokenLoader

    out = _OUT.value or tempfile.mkdtemp(prefix="saejax-bench-")
    rows = []
    stores = {}
    for kind in ("byte", "bpe"):
        job = CorpusJobConfig(corpus=CorpusConfig(out_dir=os.path.join(out, kind), overwrite=True),
                              tokenizer=TokenizerConfig(kind=kind, vocab_size=4096))
        t0 = time.perf_counter()
        store = build_token_store(job)
        dt = time.perf_counter() - t0
        meta = store.metadata
        tokens = sum(meta["splits"][s]["tokens"] for s in meta["splits"])
        mb = meta["report"]["bytes_read"] / 1e6
        rows.append((f"build stdlib corpus, {kind} tokenizer", f"{dt:.2f} s",
                     f"{mb / dt:.2f} MB/s, {tokens / dt / 1e6:.2f} M tokens/s "
                     f"({mb:.1f} MB, {tokens / 1e6:.2f} M tokens)"))
        stores[kind] = store

    mesh = parallel.make_mesh(MeshConfig())
    store = stores["bpe"]
    for prefetch in (0, 2):
        loader = TokenLoader(store, "train", LoaderConfig(batch_size=_BATCH.value, prefetch=prefetch),
                             mesh)
        for _ in range(5):
            next(loader).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(_STEPS.value):
            batch = next(loader)
        batch.block_until_ready()
        dt = time.perf_counter() - t0
        tps = _STEPS.value * batch.size / dt
        rows.append((f"TokenLoader global batches [{_BATCH.value}, {store.seq_len}] on "
                     f"{jax.device_count()} {jax.default_backend()} devices, prefetch={prefetch}",
                     f"{dt / _STEPS.value * 1e3:.2f} ms/batch", f"{tps / 1e6:.1f} M tokens/s"))

    # Verified reads: a first epoch over the whole train split (every chunk read, and
    # checked, for the first time) with and without the per-chunk sha256 / vocabulary
    # check, each from a freshly opened store; alternating rounds, best of three.
    from saejax.data.token_store import TokenStore

    def epoch(verify: bool) -> float:
        fresh = TokenStore.open(store.directory, verify_reads=verify)
        loader = TokenLoader(fresh, "train", LoaderConfig(batch_size=_BATCH.value, prefetch=0,
                                                          num_epochs=1), mesh)
        t0 = time.perf_counter()
        for batch in loader:
            batch.block_until_ready()
        return time.perf_counter() - t0

    times = {True: [], False: []}
    for _ in range(3):
        for verify in (False, True):
            times[verify].append(epoch(verify))
    on, off = min(times[True]), min(times[False])
    rows.append((f"first epoch of the train split ({store.rows('train')} contexts), reads "
                 f"verified / unverified", f"{on:.3f} s / {off:.3f} s",
                 f"verification costs {100 * (on / off - 1):+.1f}%"))

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"jax {jax.__version__}\n")
    print("| what | time | throughput |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    app.run(main)
