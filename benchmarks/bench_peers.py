"""saejax against SAELens and EleutherAI sparsify: one training step on identical shapes.

    make bench-peers                                   # builds .venv-peers, then runs this
    .venv-peers/bin/python benchmarks/bench_peers.py --features 4096 --rounds 5

Needs one environment with saejax, torch, sae-lens and eai-sparsify (``make bench-peers``
builds ``.venv-peers``); a framework that fails to import or run is reported as failed.

Shapes: batch B (4096) x d_in D (512) f32 activations, F features (4096, 16384), Adam, on
the CPU. Two architectures:

- TopK (k = 32): saejax ``architecture="topk"`` with ``step_kernel="auto"`` (the cost model;
  the sparse kernel of saejax/sae/sparse.py when F >= 32 k on the CPU) and, as its own row,
  ``step_kernel="dense"``; sparsify's ``SparseCoder``; SAELens' ``TopKTrainingSAE``. The row
  "saejax (lax.top_k)" is saejax's step with XLA's own top-k in place of the native one
  (``SAEJAX_NATIVE=0``, saejax/native).
- ReLU + L1: saejax ``architecture="relu"``; SAELens' ``StandardTrainingSAE``. sparsify has
  no ReLU + L1 SAE.
- With ``--archs`` (not by default): BatchTopK (k = 32 on average) and Matryoshka on
  BatchTopK (saejax's default groups F/16, F/16, F/8, F/4, F/2, as SAELens' prefix widths
  F/16, F/8, F/4, F/2, F): saejax with ``step_kernel="auto"`` (saejax/sae/sparse_batch.py
  where the cost model picks it) and ``"dense"``; SAELens' ``BatchTopKTrainingSAE`` and
  ``MatryoshkaBatchTopKTrainingSAE``. sparsify has neither.

Each framework runs in its own subprocess (threads and allocators of one do not disturb
another), in rounds that rotate the order; a jax process measures the f32 matmul peak at the
start of each round. A process times each configuration's full training step as its own
trainer runs it (below), ``--warmup`` steps first, then the median of ``--steps`` steps;
the table takes the median over rounds. torch runs with ``--threads`` threads (default: the
usable cores); XLA:CPU uses all of them. Every process gets the same environment (``make``
exports ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, see the Makefile).

What one step is, per framework (read from the installed sources):

- saejax: the jitted ``make_train_step`` step: forward, hand-written backward, decoder-grad
  projection, Adam, unit-norm decoder rows, fired-feature counts and metrics. No clipping
  (``grad_clip`` 0 is saejax's default).
- sparsify 1.3.3, ``Trainer.fit`` with ``loss_fn="fvu"`` and ``optimizer="adam"`` (torch
  Adam; bitsandbytes is not installed): ``set_decoder_norm_to_unit_norm``, forward with the
  batch's total variance and the dead mask, did-fire update, backward of
  ``fvu + auxk_alpha auxk + multi_topk_fvu / 8``,
  ``remove_gradient_parallel_to_decoder_directions``, Adam step, zero_grad, linear warm-up
  scheduler step, dead-token counters. The language-model forward and hook are not part of it,
  nor is fit's ``torch.set_float32_matmul_precision("high")`` (TF32 where the hardware has
  it; left at "highest" so that all three run f32).
- SAELens: ``SAETrainer.step`` itself (``training_forward_pass`` with ``TrainStepInput`` and
  the coefficients, firing statistics, backward, ``clip_grad_norm_(1.0)``, Adam, scheduler
  steps) after ``maybe_reset_sparsity``, as ``SAETrainer.fit`` calls them.

AuxK is configured in all three TopK steps (saejax ``aux_k = d_in / 2``, sparsify
``auxk_alpha = 1/32``, SAELens' default ``aux_loss_coefficient = 1``); each computes it only
while some latent is dead, and none is within a benchmark's few steps, so no row pays for
the AuxK reconstruction.

``% peak`` counts the dense step's FLOPs, five B x D x F matmuls (2 B D F each), per second
against the best jax f32 matmul rate measured (a 2048^3 square and the step-shaped
[B, D] @ [D, F]); the sparse TopK kernels do fewer FLOPs, so theirs is a dense-equivalent
rate. ``x mm`` is the step time over one step-shaped matmul at that peak.

Writes JSON lines (``--jsonl``) and a markdown table (``--out``), and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

TAG = "PEERS_JSON "
FRAMEWORKS = ("saejax", "saejax-dense", "saejax-lax", "sparsify", "saelens")
ARCHS = ("topk", "relu", "batchtopk", "matryoshka")
K_ARCHS = ("topk", "batchtopk", "matryoshka")  # k active features (per input or on average)
VARIANTS = ("saejax-dense", "saejax-lax")  # saejax's step with one kernel choice changed
SUPPORTS = {"saejax": ARCHS, **dict.fromkeys(VARIANTS, K_ARCHS), "sparsify": ("topk",),
            "saelens": ARCHS}
LABEL = {"saejax": "saejax", "saejax-dense": "saejax (dense kernel)",
         "saejax-lax": "saejax (lax.top_k)", "sparsify": "sparsify", "saelens": "SAELens"}


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", type=str, default="4096,16384", help="dictionary sizes F, comma separated")
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32, help="TopK's active features per input")
    p.add_argument("--archs", type=str, default="topk,relu", help=", ".join(ARCHS))
    p.add_argument("--frameworks", type=str, default=",".join(FRAMEWORKS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (jax compiles in the first)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration and round")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop timing a configuration after this (at least 3 steps)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads; 0: the usable cores. On a machine with other load, torch's "
                        "OpenMP at all cores stalls at barriers (100x slower steps): measure on a quiet one")
    p.add_argument("--l1", type=float, default=5.0, help="SAELens' l1_coefficient (timing only)")
    p.add_argument("--peak-reps", type=int, default=8)
    p.add_argument("--out", type=str, default="benchmarks/out/peers.md")
    p.add_argument("--jsonl", type=str, default="benchmarks/out/peers.jsonl")
    p.add_argument("--child", type=str, default="", help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _emit(row: dict) -> None:
    print(TAG + json.dumps(row), flush=True)


def _data(args):
    import numpy as np

    rng = np.random.default_rng(0)
    return (rng.standard_normal((args.batch, args.d_in), dtype=np.float32) + 1.0).astype(np.float32)


def _time_steps(step, sync, args) -> list[float]:
    for _ in range(args.warmup):
        sync(step())
    times, start = [], time.perf_counter()
    while len(times) < args.steps and (time.perf_counter() - start < args.max_seconds or len(times) < 3):
        t = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t)
    return times


def _features(args) -> list[int]:
    return [int(v) for v in args.features.split(",")]


# --- jax: the matmul peak and saejax ---------------------------------------------------

def _child_peak(args) -> None:
    import jax
    import jax.numpy as jnp

    dot = jax.jit(jnp.dot)
    key = jax.random.PRNGKey(0)

    def best(a, b):
        jax.block_until_ready(dot(a, b))
        ts = []
        for _ in range(args.peak_reps):
            t = time.perf_counter()
            jax.block_until_ready(dot(a, b))
            ts.append(time.perf_counter() - t)
        return min(ts)

    sq = jax.random.normal(key, (2048, 2048), jnp.float32)
    rates = {"square 2048^3": 2 * 2048 ** 3 / best(sq, sq)}
    x = jax.random.normal(key, (args.batch, args.d_in), jnp.float32)
    for f in _features(args):
        w = jax.random.normal(key, (args.d_in, f), jnp.float32)
        rates[f"[{args.batch},{args.d_in}]@[{args.d_in},{f}]"] = 2 * args.batch * args.d_in * f / best(x, w)
    _emit(dict(kind="peak", round=args.round, flops=rates, jax=jax.__version__))


def _child_saejax(args, kernel: str, name: str) -> None:
    import jax
    import numpy as np

    from saejax.config import MeshConfig
    from saejax.parallel import make_mesh, named_sharding
    from saejax.sae import SAEConfig, init_state, make_train_step
    from saejax.sae import sparse as sparse_kernel

    mesh = make_mesh(MeshConfig(data=1, model=1))
    x = jax.device_put(_data(args), named_sharding(mesh, ("batch", "d_in")))
    for arch in _archs(args, name):
        for f in _features(args):
            extra = dict(k=args.k, aux_k=args.d_in // 2) if arch in K_ARCHS else {}
            cfg = SAEConfig(d_in=args.d_in, n_features=f, architecture=arch, precision="f32",
                            step_kernel=kernel, **extra)
            state = init_state(cfg, mesh, x[:1024])
            step = make_train_step(cfg, mesh)
            box = [state]

            def run(step=step, box=box):
                box[0], _ = step(box[0], x)
                return box[0]

            times = _time_steps(run, jax.block_until_ready, args)
            used = "sparse" if sparse_kernel.use_sparse(cfg, mesh) else "dense"
            _emit(_row(args, name, arch, f, times, kernel=f"{kernel} -> {used}",
                       versions=dict(jax=jax.__version__), dead=int(np.sum(
                           np.asarray(box[0].step) - np.asarray(box[0].last_fired) >= cfg.dead_window))))
            del state, box


# --- torch: sparsify and SAELens -------------------------------------------------------

def _torch(args):
    import torch

    threads = args.threads or _cores()
    torch.set_num_threads(threads)
    return torch, threads


def _child_sparsify(args) -> None:
    import importlib.metadata as md

    torch, threads = _torch(args)
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.utils import decoder_impl  # triton_decode, or eager_decode without triton
    from transformers import get_linear_schedule_with_warmup

    x = torch.from_numpy(_data(args))
    auxk_alpha = 1.0 / 32
    dead_feature_threshold = 10_000_000  # TrainConfig's default
    lr_warmup_steps = 1000  # TrainConfig's default
    for arch in _archs(args, "sparsify"):
        for f in _features(args):
            torch.manual_seed(0)
            cfg = SparseCoderConfig(activation="topk", num_latents=f, k=args.k, normalize_decoder=True)
            sae = SparseCoder(args.d_in, cfg, device="cpu", dtype=torch.float32)
            # Trainer.__init__, optimizer "adam" without bitsandbytes: torch Adam, the lr rule
            # 2e-4 / sqrt(F / 2^14), linear warm-up schedule.
            adam = torch.optim.Adam([dict(params=sae.parameters(), lr=2e-4 / (f / 2 ** 14) ** 0.5)])
            sched = get_linear_schedule_with_warmup(adam, lr_warmup_steps, 10 ** 9)
            num_tokens_since_fired = torch.zeros(f, dtype=torch.long)
            did_fire = torch.zeros(f, dtype=torch.bool)
            # Trainer.fit's hook at global_step 0: b_dec = the batch mean.
            sae.b_dec.data = x.mean(0).to(sae.dtype)
            avg = {"fvu": 0.0, "auxk": 0.0}  # fit's logging averages (a float() each)

            def run(sae=sae, adam=adam, sched=sched, counts=num_tokens_since_fired, did_fire=did_fire,
                    avg=avg):
                # Trainer.fit's hook (loss_fn "fvu", micro_acc_steps 1, one SAE):
                sae.set_decoder_norm_to_unit_norm()
                dead_mask = counts > dead_feature_threshold if auxk_alpha > 0 else None
                total_variance = (x - x.mean(0)).pow(2).sum()
                out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
                did_fire[out.latent_indices.flatten()] = True
                avg["fvu"] += float(out.fvu.detach())
                if auxk_alpha > 0:
                    avg["auxk"] += float(out.auxk_loss.detach())
                loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
                loss.div(1).backward()
                # ... then the training step in fit's batch loop (grad_acc_steps 1):
                sae.remove_gradient_parallel_to_decoder_directions()
                adam.step()
                adam.zero_grad()
                sched.step()
                sae.cfg.k = args.k  # get_current_k() without k decay
                with torch.no_grad():
                    counts += x.shape[0]
                    counts[did_fire] = 0
                    did_fire.zero_()
                return None

            times = _time_steps(run, lambda _: None, args)
            _emit(_row(args, "sparsify", arch, f, times, kernel=f"SparseCoder, {decoder_impl.__name__}",
                       versions=dict(torch=torch.__version__, sparsify=md.version("eai-sparsify")),
                       threads=threads, dead=int((num_tokens_since_fired > dead_feature_threshold).sum())))
            del sae, adam


def _child_saelens(args) -> None:
    torch, threads = _torch(args)
    import sae_lens
    from sae_lens import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, MatryoshkaBatchTopKTrainingSAE,
                          MatryoshkaBatchTopKTrainingSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig,
                          TopKTrainingSAE, TopKTrainingSAEConfig)
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    x = torch.from_numpy(_data(args))
    for arch in _archs(args, "saelens"):
        for f in _features(args):
            torch.manual_seed(0)
            if arch == "topk":
                sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=f, k=args.k,
                                                            dtype="float32", device="cpu"))
            elif arch == "batchtopk":
                sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=args.d_in, d_sae=f, k=args.k,
                                                                      dtype="float32", device="cpu"))
            elif arch == "matryoshka":
                # saejax's default groups [F/16, F/16, F/8, F/4, F/2] as SAELens' prefix widths.
                widths = [f // 16, f // 8, f // 4, f // 2, f]
                sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
                    d_in=args.d_in, d_sae=f, k=args.k, matryoshka_widths=widths, dtype="float32", device="cpu"))
            else:
                sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=args.d_in, d_sae=f,
                                                                    l1_coefficient=args.l1,
                                                                    dtype="float32", device="cpu"))
            # As LanguageModelSAERunnerConfig.to_sae_trainer_config builds it (lr 3e-4, its
            # lr_end default lr / 10, constant schedule).
            tcfg = SAETrainerConfig(total_training_samples=10 ** 12, train_batch_size_samples=args.batch,
                                    lr=3e-4, lr_end=3e-5, device="cpu")
            trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(()))

            def run(trainer=trainer):
                # SAETrainer.fit's loop body without wandb, checkpoints and the progress bar.
                trainer.maybe_reset_sparsity()
                out = trainer.step(x)
                trainer.n_training_steps += 1
                return out

            times = _time_steps(run, lambda _: None, args)
            kind = {"topk": "TopKTrainingSAE", "batchtopk": "BatchTopKTrainingSAE",
                    "matryoshka": "MatryoshkaBatchTopKTrainingSAE"}.get(arch, f"StandardTrainingSAE, l1 {args.l1}")
            _emit(_row(args, "saelens", arch, f, times, kernel=kind,
                       versions=dict(torch=torch.__version__, sae_lens=sae_lens.__version__),
                       threads=threads, dead=int(trainer.dead_neurons.sum())))
            del sae, trainer


def _archs(args, framework: str) -> list[str]:
    return [a for a in args.archs.split(",") if a in SUPPORTS[framework]]


def _row(args, framework, arch, f, times, **extra) -> dict:
    import numpy as np

    return dict(kind="step", framework=framework, arch=arch, round=args.round, d_in=args.d_in,
                features=f, batch=args.batch, k=args.k if arch in K_ARCHS else None, steps=len(times),
                median_s=float(np.median(times)), min_s=float(min(times)), times_s=[float(t) for t in times],
                **extra)


def _child(args) -> None:
    name = args.child
    if name == "peak":
        _child_peak(args)
    elif name in ("saejax", "saejax-dense", "saejax-lax"):
        _child_saejax(args, "dense" if name == "saejax-dense" else "auto", name)
    elif name == "sparsify":
        _child_sparsify(args)
    elif name == "saelens":
        _child_saelens(args)
    else:
        raise SystemExit(f"unknown framework {name!r}")


# --- the parent: rounds of subprocesses, the table -------------------------------------

def _run_child(args, name: str, rnd: int) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--round", str(rnd)]
    for a in ("features", "d_in", "batch", "k", "archs", "warmup", "steps", "max_seconds", "threads",
              "l1", "peak_reps"):
        cmd += [f"--{a.replace('_', '-')}", str(getattr(args, a))]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if name == "saejax-lax":
        env["SAEJAX_NATIVE"] = "0"  # the same step with XLA's top-k (saejax/native)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    rows = [json.loads(line[len(TAG):]) for line in proc.stdout.splitlines() if line.startswith(TAG)]
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        rows.append(dict(kind="error", framework=name, round=rnd, returncode=proc.returncode, error=err[-400:]))
        print(f"[bench_peers] {name} failed (exit {proc.returncode}): {err}", file=sys.stderr)
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        print(tail, file=sys.stderr)
    print(f"[bench_peers] round {rnd} {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    return rows


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {_cores()} usable cores"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "?"
    except OSError:
        return "?"


def _table(args, rows: list[dict]) -> str:
    import numpy as np

    peaks = [r for r in rows if r["kind"] == "peak"]
    steps = [r for r in rows if r["kind"] == "step"]
    errors = [r for r in rows if r["kind"] == "error"]
    peak = max((v for p in peaks for v in p["flops"].values()), default=float("nan"))
    versions: dict[str, str] = {}
    for r in steps:
        versions.update(r.get("versions", {}))
    threads = sorted({r["threads"] for r in steps if "threads" in r})
    lines = [
        f"saejax vs SAELens vs sparsify, one f32 Adam training step on the CPU "
        f"({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {_machine()}; "
        f"saejax {_git_commit()}, " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) +
        f"; torch threads {','.join(map(str, threads)) or '-'}).",
        "",
        f"B = {args.batch}, D = {args.d_in}, k = {args.k}; {args.rounds} rounds of one process per "
        f"framework, order rotated; per round the median of {args.steps} steps after {args.warmup} "
        f"warm-up steps; below the median over rounds (min over rounds in brackets). Matmul peak "
        f"(jax f32, best of a 2048^3 square and [B, D] @ [D, F], all rounds): {peak / 1e9:.1f} GFLOP/s. "
        f"`vs saejax` = step time / saejax's (> 1: slower than saejax). `% peak` = 5 x 2BDF FLOPs "
        f"per second / peak (dense-equivalent for sparse kernels); `x mm` = step time / one "
        f"[B, D] @ [D, F] at peak.",
        "",
        "| architecture | F | framework | step | ms / step | tokens/s | vs saejax | % peak | x mm |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in steps:
        groups.setdefault((r["arch"], r["features"], r["framework"]), []).append(r)

    def med(key):
        rs = groups.get(key)
        return None if not rs else float(np.median([r["median_s"] for r in rs]))

    for arch in [a for a in ARCHS if a in args.archs.split(",")]:
        for f in _features(args):
            base = med((arch, f, "saejax"))
            for fw in FRAMEWORKS:
                rs = groups.get((arch, f, fw))
                if not rs:
                    continue
                t = med((arch, f, fw))
                lo = min(r["min_s"] for r in rs)
                flops = 5 * 2 * args.batch * args.d_in * f
                ratio = f"{t / base:.2f}" if base else "-"
                lines.append(f"| {arch} | {f} | {LABEL[fw]} | {rs[0].get('kernel', '')} | {1e3 * t:.1f} "
                             f"({1e3 * lo:.1f}) | {args.batch / t:,.0f} | {ratio} | "
                             f"{100 * flops / t / peak:.1f} | {t / (2 * args.batch * args.d_in * f / peak):.1f} |")
    for fw in [fw for fw in args.frameworks.split(",") if fw in FRAMEWORKS]:
        for arch in [a for a in args.archs.split(",") if a not in SUPPORTS[fw] and fw not in VARIANTS]:
            lines.append(f"\n{LABEL[fw]} has no {arch} SAE (not run).")
    for e in errors:
        lines.append(f"\n{LABEL.get(e['framework'], e['framework'])} failed in round {e['round']} "
                     f"(exit {e['returncode']}): `{e['error']}`")
    dead = [r for r in steps if r.get("dead")]
    if dead:
        lines.append(f"\n{len(dead)} measurement(s) ended with dead latents (AuxK ran in some steps).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = _parse(argv)
    if args.child:
        _child(args)
        return
    frameworks = [fw for fw in args.frameworks.split(",") if fw]
    for fw in frameworks:
        if fw not in FRAMEWORKS:
            raise SystemExit(f"--frameworks: unknown {fw!r} (choose from {', '.join(FRAMEWORKS)})")
    frameworks = [fw for fw in frameworks if _archs(args, fw)]
    rows: list[dict] = []
    for rnd in range(args.rounds):
        rows += _run_child(args, "peak", rnd)
        shift = rnd % len(frameworks)
        for fw in frameworks[shift:] + frameworks[:shift]:
            rows += _run_child(args, fw, rnd)
    for path in (args.out, args.jsonl):
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(args.jsonl, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    table = _table(args, rows)
    with open(args.out, "w") as fh:
        fh.write(table)
    print(table)
    print(f"[bench_peers] wrote {args.out} and {args.jsonl}", file=sys.stderr)


if __name__ == "__main__":
    main()
