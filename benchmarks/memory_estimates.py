"""Per-device memory and per-step communication of SAE training at paper scale and beyond.

    .venv/bin/python benchmarks/memory_estimates.py            # estimate table + compiled check
    .venv/bin/python benchmarks/memory_estimates.py --no-compile

Part 1 (no devices, no memory): for each (F features, D inputs, global batch B, mesh
data x model) the train state's shapes and shardings come from ``jax.eval_shape``
(``saejax.sae.step.abstract_state`` on a ``jax.sharding.AbstractMesh``), so params, Adam
moments and firing counters per device are exact; batch, [B, F] activations and the
donated update's copies come from ``saejax.sae.memory.estimate_memory``. Communication is
counted for a ring all-reduce (each device sends 2 (n-1)/n x the payload):

* "data" (data parallelism): every step all-reduces the gradient of the device's whole
  dictionary shard (W_enc, W_dec, b_enc: 4 (2 F/m D + F/m) bytes) and the per-feature firing
  counts over the n = data devices that hold the same shard.
* "model" (dictionary sharding): the decoder's partial sums x_hat [B/d, D] (f32) are
  all-reduced over the n = model devices; b_dec's gradient ([D]) and scalars are negligible.

FLOPs/byte = the step's matmul FLOPs per device (5 x 2 B D F / devices) over the bytes it
sends: above the accelerator's FLOP/s over its interconnect bandwidth (hundreds on TPU ICI
and NVLink) the step is compute-bound.

Part 2 (``--compile``, default on; 8 fake CPU devices, ~5 s per mesh): compiles the real
jitted train step for F=131,072, D=512, B=8192 on meshes (1,8), (8,1), (2,4) with abstract
inputs and reports XLA's own per-device memory (arguments + temporaries, from
``compiled.memory_analysis()``) and the all-reduce payload read from the compiled HLO,
as a check of part 1. XLA:CPU's buffer assignment differs from TPU/GPU in detail.
Prints markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 1024**3

# (label, F, D, global batch, [(data, model), ...])
PAPER = [("A/1 paper: 131,072 x 512", 131_072, 512, 8192, [(1, 1), (8, 1), (1, 8), (2, 4)])]
BEYOND = [
    ("1M x 4096", 1 << 20, 4096, 4096, [(64, 1), (8, 8), (2, 32), (1, 64)]),
    ("4M x 4096", 1 << 22, 4096, 4096, [(256, 1), (16, 16), (4, 64), (1, 256)]),
    ("16M x 4096", 1 << 24, 4096, 4096, [(1024, 1), (16, 64), (4, 256), (1, 1024)]),
]


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    n_features: int
    d_in: int
    batch: int
    data: int
    model: int
    params: int
    optimizer: int
    counters: int
    batch_and_acts: int
    update_copy: int
    total: int
    dp_bytes: float
    mp_bytes: float
    flops_per_device: float

    @property
    def devices(self) -> int:
        return self.data * self.model

    @property
    def comm_bytes(self) -> float:
        return self.dp_bytes + self.mp_bytes


def abstract_mesh(data: int, model: int):
    """A ("data", "model") mesh with no devices behind it (shapes and shardings only)."""
    from jax.sharding import AbstractMesh, AxisType

    from saejax.parallel import MESH_AXES
    return AbstractMesh((data, model), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def _state_bytes_per_device(state) -> dict[str, int]:
    """Bytes of each part of an abstract (sharded) train state on one device."""
    import jax

    def nbytes(tree) -> int:
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                   for x in jax.tree.leaves(tree))

    return {"params": nbytes(state.params), "optimizer": nbytes(state.opt_state),
            "counters": nbytes(state.last_fired) + nbytes((state.key, state.step))}


def ring_bytes(payload: float, n: int) -> float:
    """Bytes each device sends in a ring all-reduce of ``payload`` bytes over ``n`` devices."""
    return 2.0 * (n - 1) / n * payload if n > 1 else 0.0


def estimate_row(label: str, n_features: int, d_in: int, batch: int, data: int, model: int) -> Row:
    """One table row: exact state bytes from eval_shape, the rest from estimate_memory."""
    from saejax.sae.config import SAEConfig
    from saejax.sae.memory import estimate_memory
    from saejax.sae.step import abstract_state

    config = SAEConfig(d_in=d_in, n_features=n_features)
    mesh = abstract_mesh(data, model)
    state = _state_bytes_per_device(abstract_state(config, mesh))
    est = estimate_memory(config, mesh, batch)
    f_local, b_local = n_features // model, batch // data
    grad_payload = 4 * (2 * f_local * d_in + f_local) + 4 * f_local  # + firing counts
    act_payload = 4 * b_local * d_in
    total = (state["params"] + state["optimizer"] + state["counters"] + est["batch"]
             + est["activations"] + est["update_copy"])
    return Row(label=label, n_features=n_features, d_in=d_in, batch=batch, data=data, model=model,
               params=state["params"], optimizer=state["optimizer"], counters=state["counters"],
               batch_and_acts=est["batch"] + est["activations"], update_copy=est["update_copy"],
               total=total, dp_bytes=ring_bytes(grad_payload, data),
               mp_bytes=ring_bytes(act_payload, model),
               flops_per_device=10.0 * batch * d_in * n_features / (data * model))


def all_rows(groups=PAPER + BEYOND) -> list[Row]:
    return [estimate_row(label, f, d, b, dm, mm) for label, f, d, b, meshes in groups
            for dm, mm in meshes]


def fmt_bytes(n: float) -> str:
    if n == 0:
        return "0"
    if n >= GIB:
        return f"{n / GIB:,.2f} GiB"
    return f"{n / 1024**2:,.1f} MiB"


def fits(total: int) -> str:
    """The smallest common accelerator memory (16 GiB: TPU v5e / v2-v3 core; 80 GiB: H100)."""
    return "16 GiB" if total <= 16 * GIB else ("80 GiB" if total <= 80 * GIB else "neither")


def estimate_table(rows: list[Row]) -> str:
    head = ("| dictionary F x D, batch | mesh data x model | params | Adam m+v | counters | "
            "batch + [B,F] acts | update copies | **total / device** | fits in | "
            "grad all-reduce sent | act all-reduce sent | FLOPs / byte sent |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        ratio = f"{r.flops_per_device / r.comm_bytes:,.0f}" if r.comm_bytes else "-"
        lines.append(
            f"| {r.label}, B={r.batch:,} | {r.data} x {r.model} | {fmt_bytes(r.params)} | "
            f"{fmt_bytes(r.optimizer)} | {fmt_bytes(r.counters)} | {fmt_bytes(r.batch_and_acts)} | "
            f"{fmt_bytes(r.update_copy)} | **{fmt_bytes(r.total)}** | {fits(r.total)} | "
            f"{fmt_bytes(r.dp_bytes)} | {fmt_bytes(r.mp_bytes)} | {ratio} |")
    return "\n".join(lines)


_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def all_reduce_payloads(hlo_text: str) -> list[int]:
    """Bytes of each all-reduce in compiled HLO text (its result shape, tuples summed)."""
    out = []
    for line in hlo_text.splitlines():
        m = re.match(r"\s*%?\S+ = (.*?) all-reduce(?:-start)?\(", line)
        if not m:
            continue
        out.append(sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
                       for t, dims in _SHAPE.findall(m.group(1))))
    return out


def compiled_rows(n_features: int = 131_072, d_in: int = 512, batch: int = 8192,
                  meshes=((1, 8), (8, 1), (2, 4))) -> list[dict]:
    """Compiles the real train step on fake CPU devices; XLA's memory and all-reduce bytes."""
    import jax
    import jax.numpy as jnp

    from saejax.config import MeshConfig
    from saejax.parallel import make_mesh, named_sharding
    from saejax.sae.config import SAEConfig
    from saejax.sae.memory import estimate_memory
    from saejax.sae.step import BATCH_AXES, abstract_state, make_train_step

    config = SAEConfig(d_in=d_in, n_features=n_features)
    out = []
    for data, model in meshes:
        mesh = make_mesh(MeshConfig(data=data, model=model), jax.devices()[: data * model])
        t0 = time.perf_counter()
        step = make_train_step(config, mesh)
        x = jax.ShapeDtypeStruct((batch, d_in), jnp.float32, sharding=named_sharding(mesh, BATCH_AXES))
        compiled = step.jitted.lower(abstract_state(config, mesh), x).compile()
        mem = compiled.memory_analysis()
        payloads = all_reduce_payloads(compiled.as_text())
        out.append({"mesh": (data, model), "compile_s": time.perf_counter() - t0,
                    "arguments": mem.argument_size_in_bytes, "temp": mem.temp_size_in_bytes,
                    "xla_total": mem.argument_size_in_bytes + mem.temp_size_in_bytes
                    + mem.output_size_in_bytes - mem.alias_size_in_bytes,
                    "estimate": estimate_memory(config, mesh, batch)["total"],
                    "all_reduce_bytes": sum(payloads), "largest": max(payloads, default=0),
                    "payloads": payloads,
                    "n_all_reduce": len(payloads)})
    return out


def compiled_table(rows: list[dict]) -> str:
    lines = ["| mesh data x model | XLA arguments | XLA temporaries | XLA total (args + temp + "
             "unaliased outputs) | estimate_memory total | all-reduces | payload / step | "
             "largest all-reduce |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['mesh'][0]} x {r['mesh'][1]} | {fmt_bytes(r['arguments'])} | "
                     f"{fmt_bytes(r['temp'])} | {fmt_bytes(r['xla_total'])} | "
                     f"{fmt_bytes(r['estimate'])} | {r['n_all_reduce']} | "
                     f"{fmt_bytes(r['all_reduce_bytes'])} | {fmt_bytes(r['largest'])} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also compile the real step on 8 fake CPU devices (part 2)")
    args = p.parse_args(argv)
    if args.compile:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["JAX_NUM_CPU_DEVICES"] = "8"  # read by jax at import, before any backend
    import jax

    print(f"jax {jax.__version__}; per-device bytes, f32 parameters and Adam state; "
          "[B, F] activations as estimate_memory counts them (f32 pre, f, d_f, d_pre)\n")
    print(estimate_table(all_rows()))
    if args.compile:
        if jax.device_count() < 8:
            sys.exit(f"--compile needs 8 devices, found {jax.device_count()}; run with --no-compile")
        print("\nCompiled check (real jitted step, F=131,072, D=512, B=8192, 8 fake CPU devices; "
              f"{jax.devices()[0].platform}):\n")
        print(compiled_table(compiled_rows()))


if __name__ == "__main__":
    main()
