"""LM train-step throughput: tokens/s and achieved FLOP/s against a measured f32 matmul peak.

    .venv/bin/python benchmarks/bench_lm.py                  # paper model, f32 and bf16, B=64
    .venv/bin/python benchmarks/bench_lm.py --batch 32,128 --devices 2

The f32 matmul peak is measured in the same process first (best time of a square
``jnp.dot``), then the jitted, donated train step (AdamW, clipping, data-parallel over
``--devices`` fake CPU devices) is timed on random tokens. FLOPs per step count the matmuls
only, forward x 3 (forward + two backward products): per token 2 * (3*D*D + D*D + 2*D*M +
D*V) + 2 * 2 * T * D (attention scores and mixing over the full, masked T x T). Embedding
lookups, LayerNorm, softmax and Adam are not counted. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=1, help="fake CPU devices (data parallel)")
    p.add_argument("--batch", type=str, default="64", help="global batch sizes, comma separated")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (model sees T-1)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--precisions", type=str, default="f32,bf16")
    p.add_argument("--steps", type=int, default=20, help="timed steps per config")
    p.add_argument("--peak-n", type=int, default=2048, help="size of the square peak matmul")
    return p.parse_args()


def main():
    args = _parse()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    import numpy as np

    from saejax import parallel
    from saejax.config import MeshConfig
    from saejax.lm.config import ModelConfig, OptimConfig
    from saejax.lm.train import init_train_state

    def best_time(fn, *a, reps=5):
        jax.block_until_ready(fn(*a))
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append(time.perf_counter() - t)
        return min(times)

    n = args.peak_n
    x = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(lambda a, b: a @ b)
    peak = 2 * n**3 / best_time(dot, x, x)
    mesh = parallel.make_mesh(MeshConfig(data=args.devices), jax.devices()[:args.devices])
    rows = [f"f32 matmul peak ({n}x{n} dot, best of 5): {peak / 1e9:.1f} GFLOP/s on "
            f"{args.devices} device(s), {jax.default_backend()}", "",
            "| model | batch x T | precision | step ms | tokens/s | GFLOP/s | % of f32 peak |",
            "|---|---|---|---|---|---|---|"]
    for precision in args.precisions.split(","):
        dtype = {"f32": "float32", "bf16": "bfloat16"}[precision]
        cfg = ModelConfig(vocab_size=args.vocab, max_len=args.seq_len, compute_dtype=dtype)
        for batch in [int(b) for b in args.batch.split(",")]:
            state, fns = init_train_state(cfg, OptimConfig(), 1000, mesh, seed=0)
            tokens = np.random.default_rng(0).integers(0, args.vocab, (batch, args.seq_len))
            tokens = jax.device_put(jnp.asarray(tokens, jnp.int32), fns.batch_sharding)
            state, m = fns.train_step(state, tokens)  # compile
            jax.block_until_ready(m)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, m = fns.train_step(state, tokens)
            jax.block_until_ready((state, m))
            step_s = (time.perf_counter() - t0) / args.steps
            T, D, M, V = args.seq_len - 1, cfg.d_model, cfg.d_mlp, cfg.vocab_size
            per_token = 2 * (4 * D * D + 2 * D * M + D * V) + 4 * T * D
            flops = 3 * per_token * batch * T
            rows.append(f"| 1L d{D} m{M} h{cfg.n_heads} V{V} | {batch} x {T} | {precision} | "
                        f"{step_s * 1e3:.1f} | {batch * T / step_s:,.0f} | "
                        f"{flops / step_s / 1e9:.1f} | {100 * flops / step_s / peak:.0f}% |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
