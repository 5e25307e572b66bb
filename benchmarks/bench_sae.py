"""SAE train-step throughput: tokens/s and achieved FLOP/s against a measured matmul peak.

    .venv/bin/python benchmarks/bench_sae.py                       # full table (1 and 8 devices)
    .venv/bin/python benchmarks/bench_sae.py --devices 1 --features 4096 --precisions f32

Each device count runs in its own subprocess, because the number of (fake) CPU devices
must be fixed before jax is imported. In each process the f32 matmul peak is measured
first (best time of a large square ``jnp.dot`` and of the step-shaped [B, D] @ [D, F]
product), then the jitted step is timed, interleaved with the step-shaped matmul. FLOPs per step are counted as 5 matmuls of
2 * B * D * F (two forward, dW_dec, dF, dW_enc); elementwise work, Adam and metrics are not
counted, so the percentage is the fraction of matmul peak the whole step achieves.
Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=str, default="1,8", help="device counts, comma separated")
    p.add_argument("--meshes8", type=str, default="8x1,1x8", help="data x model meshes for 8 devices")
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--features", type=str, default="4096,16384,65536")
    p.add_argument("--precisions", type=str, default="f32,bf16")
    p.add_argument("--architectures", type=str, default="relu",
                   help="SAE architectures, comma separated (k = 32 where k applies)")
    p.add_argument("--kernels", type=str, default="auto",
                   help="step kernels (auto,dense,sparse; sparse only for topk, batchtopk and "
                        "matryoshka); flops of the sparse step are reported as the dense step's "
                        "(dense-equivalent)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--reps", type=int, default=10, help="timed steps (at most; see --max-seconds)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="stop timing a config after this")
    p.add_argument("--malloc-hugetlb", type=int, default=1,
                   help="1: run children with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge "
                        "pages for large buffers; ~3x faster [B, F] elementwise passes on XLA:CPU)")
    p.add_argument("--ground-truth", type=int, default=1,
                   help="1: also train on a larger synthetic problem and report MMCS / recovery")
    p.add_argument("--gt-d", type=int, default=64)
    p.add_argument("--gt-true", type=int, default=256)
    p.add_argument("--gt-features", type=int, default=512)
    p.add_argument("--gt-active", type=float, default=4.0)
    p.add_argument("--gt-steps", type=int, default=3000)
    p.add_argument("--gt-batch", type=int, default=512)
    p.add_argument("--gt-l1", type=float, default=1e-2)
    p.add_argument("--only-ground-truth", action="store_true")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args()


def _child(args) -> list[dict]:
    n = args.child
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    import jax
    jax.config.update("jax_num_cpu_devices", n)
    import jax.numpy as jnp
    import numpy as np

    from saejax.config import MeshConfig
    from saejax.parallel import make_mesh, named_sharding
    from saejax.sae import SAEConfig, init_state, make_train_step

    assert jax.device_count() == n, jax.devices()

    def best_time(fn, *a, reps=5, max_s=20.0):
        jax.block_until_ready(fn(*a))
        times, start = [], time.perf_counter()
        while len(times) < reps and (time.perf_counter() - start < max_s or len(times) < 2):
            t = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append(time.perf_counter() - t)
        return min(times), float(np.median(times)), len(times)

    dot = jax.jit(jnp.dot)
    k = jax.random.PRNGKey(0)
    sq = jax.random.normal(k, (2048, 2048), jnp.float32)
    t_sq, _, _ = best_time(dot, sq, sq, reps=8)
    b, d = args.batch, args.d_in
    xa = jax.random.normal(k, (b, d), jnp.float32)
    peaks = {"square 2048^3": 2 * 2048 ** 3 / t_sq}
    rows = []
    meshes = [(1, 1)] if n == 1 else [tuple(int(v) for v in m.split("x")) for m in args.meshes8.split(",")]
    for f in [int(v) for v in args.features.split(",")]:
        wb = jax.random.normal(k, (d, f), jnp.float32)
        jax.block_until_ready(dot(xa, wb))
        for prec, arch, (data, model), kern in [(p_, a_, m_, k_) for p_ in args.precisions.split(",")
                                                for a_ in args.architectures.split(",") for m_ in meshes
                                                for k_ in args.kernels.split(",")]:
            if kern == "sparse" and (arch not in ("topk", "batchtopk", "matryoshka") or model > 1):
                continue
            from saejax.sae.sparse import use_sparse

            mesh = make_mesh(MeshConfig(data=data, model=model))
            cfg = SAEConfig(d_in=d, n_features=f, precision=prec, architecture=arch, k=32,
                            step_kernel=kern)
            x = jax.device_put(jax.random.normal(k, (b, d), jnp.float32) + 1.0,
                               named_sharding(mesh, ("batch", "d_in")))
            state = init_state(cfg, mesh, x[:1024])
            step = make_train_step(cfg, mesh)
            state, m = step(state, x)  # compile + warm-up
            jax.block_until_ready(state)
            # Interleave step and step-shaped matmul timings: on a shared machine the
            # paired ratio is robust to load that comes and goes.
            times, mm_times, paths, start = [], [], [], time.perf_counter()
            while len(times) < args.reps and (time.perf_counter() - start < args.max_seconds or len(times) < 3):
                t = time.perf_counter()
                state, m = step(state, x)
                jax.block_until_ready(state)
                times.append(time.perf_counter() - t)
                if "threshold_path" in m:  # BatchTopK: 0 candidates, 1 dense rows, 2 whole batch
                    paths.append(float(m["threshold_path"]))
                t = time.perf_counter()
                jax.block_until_ready(dot(xa, wb))
                mm_times.append(time.perf_counter() - t)
            del state, m
            t = min(times)
            key = f"[{b},{d}]@[{d},{f}]"
            peaks[key] = max(peaks.get(key, 0.0), 2 * b * d * f / min(mm_times))
            paired = float(np.median(5 * np.asarray(mm_times) / np.asarray(times)))
            rows.append(dict(devices=n, mesh=f"{data}x{model}", d=d, f=f, precision=prec, batch=b, architecture=arch,
                             kernel=("sparse" if use_sparse(cfg, mesh) else "dense") + f" ({kern})"
                             + (f", threshold path {np.mean(paths):.1f}" if paths else ""),
                             reps=len(times), best_s=t, median_s=float(np.median(times)),
                             tokens_per_s=b / t, flops=5 * 2 * b * d * f / t, paired=paired))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del wb
    t_sq2, _, _ = best_time(dot, sq, sq, reps=8)
    peaks["square 2048^3"] = max(peaks["square 2048^3"], 2 * 2048 ** 3 / t_sq2)
    peak = max(peaks.values())
    for r in rows:
        r["peak"] = peak
        r["peaks"] = peaks
    return rows


def _ground_truth(args) -> dict:
    """Trains the paper's SAE (L1, resampling) on synthetic data with known directions."""
    import jax

    from saejax.config import MeshConfig
    from saejax.parallel import make_mesh
    from saejax.sae import SAEConfig, init_state, make_resample, make_train_step, metrics, should_resample, synthetic

    sc = synthetic.SyntheticConfig(d_in=args.gt_d, n_true_features=args.gt_true, mean_active=args.gt_active,
                                   noise_std=0.01, seed=0)
    t = synthetic.true_directions(sc)
    n_resample = 4
    every = args.gt_steps // (2 * n_resample)
    cfg = SAEConfig(d_in=args.gt_d, n_features=args.gt_features, l1_coefficient=args.gt_l1, lr=1e-3,
                    resample_steps=tuple(every * (i + 1) for i in range(n_resample)), dead_window=every // 2,
                    resample_sample_size=16 * args.gt_batch, resample_chunk_size=args.gt_batch)
    mesh = make_mesh(MeshConfig(data=1, model=1), devices=jax.devices()[:1])
    root = jax.random.PRNGKey(1)
    gen = jax.jit(lambda k, n: synthetic.sample(sc, k, n, t), static_argnums=1)
    state = init_state(cfg, mesh, gen(jax.random.PRNGKey(2), 4096))
    step, resample = make_train_step(cfg, mesh), make_resample(cfg, mesh)
    start = time.perf_counter()
    for i in range(args.gt_steps):
        state, m = step(state, gen(jax.random.fold_in(root, i), args.gt_batch))
        if should_resample(cfg, i + 1):
            state, _ = resample(state, gen(jax.random.fold_in(root, 10**8 + i), cfg.resample_sample_size))
    m = jax.device_get(m)
    return dict(d=args.gt_d, true=args.gt_true, f=args.gt_features, active=args.gt_active, steps=args.gt_steps,
                batch=args.gt_batch, l1=args.gt_l1, seconds=time.perf_counter() - start,
                mmcs=metrics.mmcs(state.params.W_dec, t), recovered=metrics.fraction_recovered(state.params.W_dec, t),
                l0=float(m["l0"]), ev=float(m["explained_variance"]), frac_dead=float(m["frac_dead"]))


def _print_ground_truth(g: dict) -> None:
    print()
    print("Ground truth (synthetic sparse non-negative combinations of known unit directions, noise 0.01):")
    print()
    print("| D | true features | mean active | SAE features | steps x batch | lambda | MMCS | recovered (cos >= 0.9) "
          "| L0 | explained var | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {g['d']} | {g['true']} | {g['active']:g} | {g['f']} | {g['steps']} x {g['batch']} | {g['l1']:g} "
          f"| {g['mmcs']:.3f} | {100 * g['recovered']:.1f}% | {g['l0']:.1f} | {g['ev']:.3f} | {g['seconds']:.0f} |")


def main():
    args = _parse()
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return
    if args.only_ground_truth:
        _print_ground_truth(_ground_truth(args))
        return
    rows = []
    for n in [int(v) for v in args.devices.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(n), "--meshes8", args.meshes8, "--d-in", str(args.d_in),
               "--features", args.features, "--precisions", args.precisions, "--batch", str(args.batch),
               "--reps", str(args.reps), "--max-seconds", str(args.max_seconds),
               "--architectures", args.architectures, "--kernels", args.kernels]
        env = dict(os.environ)
        if args.malloc_hugetlb:
            env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1"]))
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
        rows += json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    peaks = {}
    for r in rows:
        peaks.setdefault(r["devices"], r["peaks"])
    print()
    for n, p in peaks.items():
        print(f"f32 matmul peak measured in the {n}-device process: "
              + ", ".join(f"{k}: {v / 1e9:.1f} GFLOP/s" for k, v in p.items()))
    print()
    print(f"GLIBC_TUNABLES=glibc.malloc.hugetlb={args.malloc_hugetlb}; 5 matmuls x 2*B*D*F FLOPs per step; "
          "% of peak = best step FLOP/s / best measured f32 matmul FLOP/s; paired = median over reps of "
          "(5 x step-shaped matmul time) / (step time), timed back to back")
    print()
    print("| architecture | kernel | devices | mesh (data x model) | D | F | precision | batch | reps "
          "| step ms (best / median) | tokens/s | GFLOP/s | % of f32 matmul peak | paired |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['architecture']} | {r['kernel']} | {r['devices']} | {r['mesh']} | {r['d']} | {r['f']} "
              f"| {r['precision']} | {r['batch']} "
              f"| {r['reps']} | {1e3 * r['best_s']:.0f} / {1e3 * r['median_s']:.0f} | {r['tokens_per_s']:,.0f} "
              f"| {r['flops'] / 1e9:.1f} | {100 * r['flops'] / r['peak']:.0f}% | {100 * r['paired']:.0f}% |")
    if args.ground_truth:
        _print_ground_truth(_ground_truth(args))


if __name__ == "__main__":
    main()
