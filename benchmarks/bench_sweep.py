"""Sweeps: the cost of N stacked members against N separate runs.

Two measurements, one process, one device, float32, alternating rounds:

1. **Step**: the group step of N equal-shape members (``sweep_step.make_group_step``)
   against the sum of each member's own jitted step (``make_train_step``). Mode "lr-seed":
   members differ in lr and seed; "knob": also in k (TopK: the group's top-k runs with the
   largest k) or the L1 coefficient. Target: group step <= 1.05 x N single steps.
2. **On the fly** (with ``--lm``): per batch, the LM forward and shuffle buffer
   (``OnTheFlySource.next``) plus the SAE step. N separate runs pay the source N times;
   the sweep pays it once: separate = N x (source + step), sweep = source + group step.

    python benchmarks/bench_sweep.py --members 8 --features 4096 --lm runs/demo/lm

Writes a JSON line per measurement to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from saejax import parallel  # noqa: E402
from saejax.config import MeshConfig  # noqa: E402
from saejax.sae import sweep_step as sw  # noqa: E402
from saejax.sae.config import SAEConfig  # noqa: E402
from saejax.sae.step import init_state, make_train_step  # noqa: E402


def member_configs(arch: str, n: int, features: int, d: int, mode: str = "lr-seed") -> list[SAEConfig]:
    """N members of one shape. "lr-seed": equal but for lr and seed (the step programs are
    the same); "knob": k (TopK, BatchTopK) or the L1 coefficient (ReLU) differs as well."""
    base = SAEConfig(d_in=d, n_features=features, architecture=arch, k=24, l1_coefficient=1e-2,
                     dead_strategy="none")
    out = []
    for i in range(n):
        knob = {}
        if mode == "knob":
            knob = {"k": 16 + 4 * (i % 4)} if arch in ("topk", "batchtopk") else \
                {"l1_coefficient": 3e-3 * (1 + i)}
        out.append(dataclasses.replace(base, lr=1e-3 * (1 + 0.25 * i), seed=i, **knob))
    return out


def time_calls(fn, state, batches, repeats):
    """Median seconds per call (state threaded through; the first call compiles)."""
    state, m = fn(state, batches[0])
    jax.block_until_ready(m)
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        state, m = fn(state, batches[(r + 1) % len(batches)])
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), state


def _distinct(configs):
    """Member configs without the seed (which only changes the initial state), deduplicated."""
    out = []
    for c in configs:
        c0 = dataclasses.replace(c, seed=0, lr=1e-3)  # lr: a constant of the same program
        if c0 not in out:
            out.append(c0)
    return out


def bench_step(arch, n, features, d, batch, repeats, rounds, mode):
    mesh = parallel.make_mesh(MeshConfig(data=1, model=1))
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(np.abs(rng.standard_normal((batch, d))).astype(np.float32)) for _ in range(3)]
    configs = member_configs(arch, n, features, d, mode)
    (group,) = sw.make_groups([f"m{i}" for i in range(n)], configs)
    singles = {c: [make_train_step(c, mesh), init_state(c, mesh, batches[0]), []] for c in _distinct(configs)}
    gstep = sw.make_group_step(group, mesh)
    sn = sw.init_stack(group, mesh, batches[0])
    many = []
    for _ in range(rounds):
        for entry in singles.values():
            t, entry[1] = time_calls(entry[0], entry[1], batches, repeats)
            entry[2].append(t)
        t, sn = time_calls(gstep, sn, batches, repeats)
        many.append(t)
    single = {c: float(np.median(e[2])) for c, e in singles.items()}
    # N separate runs: each member's own single step.
    n_singles = sum(single[dataclasses.replace(c, seed=0, lr=1e-3)] for c in configs)
    tn = float(np.median(many))
    return {"bench": "step", "arch": arch, "mode": mode, "members": n, "features": features,
            "batch": batch, "single_ms": [round(1e3 * v, 1) for v in single.values()],
            "n_singles_ms": 1e3 * n_singles, "group_ms": 1e3 * tn, "ratio": tn / n_singles,
            "traced": list(group.traced), "device": str(jax.devices()[0])}


def bench_on_the_fly(lm_dir, arch, n, features, repeats, rounds):
    """Per batch: source only, source + one member's step, source + the group step."""
    from experiments import sae_demo
    from saejax.config import from_config
    from saejax.train_config import SAETrainConfig
    from saejax.train_setup import new_record, open_source

    cd = sae_demo.get_config(arch)
    cd.lm.dir = lm_dir
    cd.sae.n_features = features
    cd.mesh.data = 1
    cfg = from_config(SAETrainConfig, cd)
    mesh, lm, source = open_source(cfg)
    record = new_record(cfg, lm, source)
    norm = record.normalizer
    prep = jax.jit(lambda x: norm.apply(x.astype(jnp.float32)))
    init = prep(jnp.asarray(source.init_sample(4096)))
    configs = member_configs(arch, n, features, cfg.sae.d_in)
    configs = [dataclasses.replace(c, **{f: getattr(cfg.sae, f) for f in ("k", "l1_coefficient")})
               for c in configs]
    (group,) = sw.make_groups([f"m{i}" for i in range(n)], configs)
    single, gstep = make_train_step(configs[0], mesh), sw.make_group_step(group, mesh)
    s1, sn = init_state(configs[0], mesh, init), sw.init_stack(group, mesh, init)
    dev = source.init_device_state()

    def loop(fn, state, steps):
        nonlocal dev
        t0 = time.perf_counter()
        for _ in range(steps):
            dev, batch = source.next(dev)
            x = prep(batch)
            if fn is None:
                jax.block_until_ready(x)
            else:
                state, m = fn(state, x)
                jax.block_until_ready(m["loss"])
        return (time.perf_counter() - t0) / steps, state

    # Warm-up (compilation, a buffer refill), then alternating rounds.
    _, s1 = loop(single, s1, 2)
    _, sn = loop(gstep, sn, 2)
    src, one, many = [], [], []
    for _ in range(rounds):
        t, _ = loop(None, None, repeats)
        src.append(t)
        t, s1 = loop(single, s1, repeats)
        one.append(t)
        t, sn = loop(gstep, sn, repeats)
        many.append(t)
    t_src, t_one, t_many = (float(np.median(v)) for v in (src, one, many))
    return {"bench": "on_the_fly", "arch": arch, "members": n, "features": features,
            "batch": cfg.batch_size, "source_ms": 1e3 * t_src, "source_plus_step_ms": 1e3 * t_one,
            "sweep_step_ms": 1e3 * t_many, "separate_runs_ms": 1e3 * n * t_one,
            "speedup_vs_separate": n * t_one / t_many,
            "sweep_vs_target": t_many / (1.05 * n * (t_one - t_src) + t_src),
            "device": str(jax.devices()[0])}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--arch", default="relu,topk")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default="lr-seed,knob")
    p.add_argument("--lm", default="", help="demo LM workdir for the on-the-fly measurement")
    p.add_argument("--lm-repeats", type=int, default=32,
                   help="batches per on-the-fly round (the demo buffer refills every 16)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    rows = []
    for arch in a.arch.split(","):
        for mode in a.modes.split(","):
            rows.append(bench_step(arch, a.members, a.features, a.d, a.batch, a.repeats, a.rounds, mode))
            print(json.dumps(rows[-1]), flush=True)
        if a.lm:
            rows.append(bench_on_the_fly(a.lm, arch, a.members, a.features, a.lm_repeats, a.rounds))
            print(json.dumps(rows[-1]), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
