"""A sweep group's step in its two layouts: members split over "model", or each dictionary split.

One process with ``--devices`` XLA devices (on a CPU, host devices that share its cores) on
a ``1 x devices`` mesh; N equal-shape members (lr and seed differ). "features": every
device holds a slice of every member's dictionary and the step sums partial
reconstructions (and, for the sparse TopK kernel, gathers top-k candidates) over "model";
"members": every device trains N / devices whole dictionaries and nothing crosses "model".
Rounds alternate the layouts; each reports the median step time.

    python benchmarks/bench_sweep_layout.py --devices 2 --members 8 --features 4096

Writes a JSON line per measurement to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--arch", default="relu,topk")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="")
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import dataclasses

    import jax
    import numpy as np

    from benchmarks.bench_sweep import member_configs, time_calls
    from saejax import parallel
    from saejax.config import MeshConfig
    from saejax.sae import sweep_step as sw
    from saejax.sae.step import check_kernel

    if jax.device_count() != args.devices:
        raise SystemExit(f"asked for {args.devices} devices, jax has {jax.device_count()}")
    mesh = parallel.make_mesh(MeshConfig(data=1, model=args.devices))
    rng = np.random.default_rng(0)
    batches = [jax.device_put(rng.standard_normal((args.batch, args.d)).astype(np.float32),
                              parallel.named_sharding(mesh, ("batch", "d_in"))) for _ in range(2)]
    out = open(args.out, "a") if args.out else None
    for arch in args.arch.split(","):
        configs = member_configs(arch, args.members, args.features, args.d)
        (group,) = sw.make_groups([f"m{i}" for i in range(len(configs))], configs)
        steps = {}
        for layout in sw.LAYOUTS:
            g = dataclasses.replace(group, layout=sw.choose_layout(group, mesh, layout))
            steps[layout] = (g, sw.make_group_step(g, mesh).jitted)
        times = {layout: [] for layout in steps}
        for _ in range(args.rounds):
            for layout, (g, fn) in steps.items():
                stack = sw.init_stack(g, mesh, np.asarray(batches[0][:1024]))
                times[layout].append(time_calls(fn, stack, batches, args.repeats)[0])
                del stack
        rec = {"bench": "sweep_layout", "arch": arch, "members": args.members, "features": args.features,
               "d": args.d, "batch": args.batch, "devices": args.devices, "backend": jax.default_backend(),
               "kernel": "sparse" if check_kernel(group.config, mesh) else "dense",
               **{f"{layout}_ms": 1e3 * min(t) for layout, t in times.items()}}
        rec["features_over_members"] = rec["features_ms"] / rec["members_ms"]
        line = json.dumps(rec)
        print(line, flush=True)
        if out:
            out.write(line + "\n")


if __name__ == "__main__":
    main()
