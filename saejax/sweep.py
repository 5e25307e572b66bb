"""The sweep loop: N dictionaries trained from one activation stream, one checkpoint.

Per step the source yields one batch (the LM forward and the shuffle buffer run once for
all members), the run's normaliser scales it, and each group of equal-shape members
(:mod:`saejax.sae.sweep_step`) takes one jitted step. Everything a single run does happens
per member: its dead-feature strategy at its resampling steps (on one shared sample, so a
member sees what it would see alone), its metrics (``<workdir>/members/<name>/``:
metrics.jsonl, TensorBoard, eval.json, feature density), its evaluation. One orbax
checkpoint holds the stacked states, the source, the firing counts and the stream
positions, so re-running the command resumes the whole sweep exactly; its metadata is the
sweep's config and run record, from which :func:`saejax.record.load_sae` restores any one
member (``member=``). At every evaluation the sweep writes ``sweep.md``, ``sweep.json`` and
``sweep_pareto.png`` (L0 against loss recovered, or explained variance without an LM).

A member equals the same dictionary trained alone on the same stream with the same seed:
the group step runs each member's single-run program, and the stream, its normalisation
and the resampling samples are the single run's (members that resample at the same step
share one draw; a member whose ``resample_sample_size`` is smaller takes its first rows).

Legend: N members, B batch rows, D input width, F features.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from saejax import parallel
from saejax.checkpoint import Checkpointer
from saejax.config import ConfigError, from_config, resume_changes, to_dict
from saejax.loop import HostMetrics, NonFiniteError, run_steps
from saejax.metrics import MetricWriter, ProgressBar, is_writer_process
from saejax.record import CHECKPOINTS, SAERunRecord
from saejax.sae import sweep_step as sw
from saejax.sae.bundle import SAEBundle
from saejax.sae.step import make_dead_strategy, should_resample
from saejax.train import EVAL_FILE, INIT_SAMPLE_ROWS
from saejax.train_config import SweepConfig
from saejax.train_setup import RunEvaluation, check_provenance, new_record, open_source

SWEEP_FORMAT = 1
MEMBERS_DIR = "members"


def sweep_groups(cfg: SweepConfig) -> list[sw.Group]:
    """The sweep's groups (members of one shape), in order of their first member."""
    names = cfg.member_names
    return sw.make_groups(names, [cfg.member(n).sae for n in names])


def sweep_metadata(cfg: SweepConfig, record: SAERunRecord) -> dict[str, Any]:
    """What the checkpoint's metadata holds: the sweep's config and run record (whose config
    is the shared part, :meth:`SweepConfig.base`) and the group layout."""
    return {"sweep": SWEEP_FORMAT, "config": to_dict(cfg), "record": record.to_dict(),
            "groups": [list(g.names) for g in sweep_groups(cfg)]}


def _group_key(i: int) -> str:
    return f"group{i}"


def train_sweep(cfg: SweepConfig, *, activations=None, allow_changes: tuple[str, ...] = (),
                stop_at: int | None = None) -> dict[str, Any]:
    """Trains (or resumes) every member of the sweep ``cfg`` from one activation stream.

    Args / raises: as :func:`saejax.train.train`; in addition ConfigError when the sweep's
    estimated memory exceeds the device's (:func:`saejax.sae.sweep_step.check_sweep_memory`).

    Returns:
      A summary: final step, interruption, seconds, tokens/s, ``members``: per member its
      last training window and evaluation, and ``bundles``: name -> SAEBundle.
    """
    t_start = time.perf_counter()
    base = cfg.base()
    mesh, lm, source = open_source(base, activations)
    check_provenance(base, lm, source)
    groups = sw.layout_groups(sweep_groups(cfg), mesh, cfg.member_sharding, cfg.batch_size,
                              cfg.sweep_memory_limit_bytes)
    memory = sw.check_sweep_memory(groups, mesh, cfg.batch_size, cfg.sweep_memory_limit_bytes)
    logging.info("sweep of %d members in %d group(s) (layouts: %s); estimated %.2f GiB per device",
                 len(cfg.members), len(groups), ", ".join(g.layout for g in groups),
                 memory["total"] / 2 ** 30)
    steps = [sw.make_group_step(g, mesh) for g in groups]
    getters = [sw.member_getter(g, mesh) for g in groups]
    setters = [sw.member_setter(g, mesh) for g in groups]
    members = [(gi, i, name, cfg.member(name)) for gi, g in enumerate(groups)
               for i, name in enumerate(g.names)]
    strategies = {name: make_dead_strategy(mc.sae, mesh) for _, _, name, mc in members}
    ckpt = Checkpointer(os.path.join(cfg.workdir, CHECKPOINTS), keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    abstract = {"groups": {_group_key(gi): sw.abstract_stack(g, mesh) for gi, g in enumerate(groups)},
                "source": source.abstract_device_state(),
                "counts": {_group_key(gi): jax.ShapeDtypeStruct((g.size, g.config.n_features), jnp.int32,
                                                                sharding=sw.counts_sharding(g, mesh))
                           for gi, g in enumerate(groups)}}
    where = f"the sweep in {cfg.workdir!r}"
    if ckpt.latest_step() is not None:
        try:  # refuse a changed config (or a single run's workdir) before reading any array
            _resumed_record(ckpt.restore_metadata(), cfg, ckpt.latest_step(), allow_changes, where)
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001 - a damaged newest step: restore() skips it
            pass
        state, data_state, meta = ckpt.restore(abstract)
        record = _resumed_record(meta, cfg, ckpt.restored_step, allow_changes, where)
        check_provenance(base, lm, source, record)
        source.set_state(data_state["source"])
        logging.info("resumed the sweep in %s at step %d", cfg.workdir, ckpt.restored_step)
    else:
        record = new_record(base, lm, source)
        init = record.normalizer.apply(source.init_sample(INIT_SAMPLE_ROWS))
        state = {"groups": {_group_key(gi): sw.init_stack(g, mesh, init) for gi, g in enumerate(groups)},
                 "source": source.init_device_state(),
                 "counts": {_group_key(gi): jax.device_put(np.zeros((g.size, g.config.n_features), np.int32),
                                                           sw.counts_sharding(g, mesh))
                            for gi, g in enumerate(groups)}}
    normalizer = record.normalizer
    prep = jax.jit(lambda x: normalizer.apply(x.astype(jnp.float32)),
                   out_shardings=parallel.named_sharding(mesh, ("batch", "d_in")))
    add_counts = jax.jit(lambda c, m: c + m, donate_argnums=0)
    evaluation = RunEvaluation(base, record, lm, source, mesh)
    start = int(jax.device_get(state["groups"][_group_key(0)].step[0]))
    end = cfg.num_steps if stop_at is None else min(stop_at, cfg.num_steps)
    member_dirs = {name: os.path.join(cfg.workdir, MEMBERS_DIR, name) for _, _, name, _ in members}
    writers = {name: MetricWriter(d, resume_step=start if start else -1) for name, d in member_dirs.items()}
    bar = ProgressBar(cfg.num_steps, start_step=start, enabled=cfg.progress_bar)
    summary: dict[str, Any] = {"interrupted": None, "resample_seconds": 0.0,
                               "members": {name: {"eval": None, "train": {}, "resamples": []}
                                           for _, _, name, _ in members}}

    def member_state(gi: int, i: int):
        return getters[gi](state["groups"][_group_key(gi)], i)

    def bundle(gi: int, i: int, name: str) -> SAEBundle:
        return SAEBundle(member_state(gi, i).params, cfg.member(name).sae, normalizer, record.site)

    def run_eval(step: int, log: bool = True) -> None:
        for gi, i, name, _ in members:
            out = evaluation(bundle(gi, i, name))
            density = out.pop("feature_density")
            out["step"] = step
            summary["members"][name]["eval"] = out
            if not log:
                continue
            writers[name].write_scalars(step, {f"eval/{k}": v for k, v in out.items() if k != "step"
                                               and isinstance(v, (int, float)) and not isinstance(v, bool)})
            if is_writer_process():
                os.makedirs(member_dirs[name], exist_ok=True)
                np.save(os.path.join(member_dirs[name], "feature_density.npy"), density)
                with open(os.path.join(member_dirs[name], EVAL_FILE), "w") as f:
                    json.dump(out, f, indent=1)
        if log:
            write_report(cfg, summary["members"], groups)

    def fetch(metrics: dict) -> dict[str, float]:
        """One transfer; per-member scalars named ``<member>/<metric>``."""
        host = jax.device_get({gi: {k: v for k, v in m.items() if k != "feature_counts"}
                               for gi, m in metrics.items()})
        out: dict[str, float] = {}
        for gi, i, name, _ in members:
            for k, v in host[gi].items():
                out[f"{name}/{k}"] = float(v[i])
        out["nonfinite"] = float(any(out[f"{name}/nonfinite"] for _, _, name, _ in members))
        return out

    def report(done: int, avg: dict, last: dict, tokens_per_s: float) -> None:
        for name, w in writers.items():
            prefix = f"{name}/"
            w.write_scalars(done, {**{f"train/{k[len(prefix):]}": v for k, v in avg.items()
                                      if k.startswith(prefix) and not k.endswith("/nonfinite")},
                                   "perf/tokens_per_s": tokens_per_s})
            summary["members"][name]["train"] = {k[len(prefix):]: v for k, v in avg.items()
                                                 if k.startswith(prefix)}
        l0 = [avg[f"{n}/l0"] for n in writers]
        bar.update(done, {"members": len(writers), "L0 min": min(l0), "L0 max": max(l0),
                          "tok/s": tokens_per_s})

    def stop_nonfinite(e: NonFiniteError) -> None:
        ckpt.wait()
        raise NonFiniteError(f"{e}; the update was not applied. Stopping the sweep; the last good "
                             f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory} "
                             f"(check the activations for NaN/Inf and lower that member's sae.lr).") from None

    host = HostMetrics(log_every=cfg.log_every, end=cfg.num_steps, tokens_per_step=cfg.batch_size,
                       report=report, on_nonfinite=stop_nonfinite,
                       finite_keys=tuple(f"{name}/loss" for _, _, name, _ in members), fetch=fetch)
    if start:
        host.set_state(data_state["metrics"])

    def step(i: int):
        nonlocal state
        dev, batch = source.next(state["source"])
        x = prep(batch)
        groups_next, counts, metrics = {}, {}, {}
        for gi, gstep in enumerate(steps):
            key = _group_key(gi)
            groups_next[key], metrics[gi] = gstep(state["groups"][key], x, step=i)
            counts[key] = add_counts(state["counts"][key], metrics[gi]["feature_counts"])
        state = {"groups": groups_next, "source": dev, "counts": counts}
        return metrics

    def resampling(done: int) -> list:
        return [(gi, i, name, mc) for gi, i, name, mc in members if should_resample(mc.sae, done)]

    def at_sync(done: int) -> None:
        nonlocal state
        due = resampling(done)
        if due:
            t0 = time.perf_counter()
            size = max(mc.sae.resample_sample_size for *_, mc in due)
            sample = prep(source.resample_sample(size))  # one draw for every member due now
            for gi, i, name, mc in due:
                t1 = time.perf_counter()
                own = sample[:mc.sae.resample_sample_size] if mc.sae.resample_sample_size < size else sample
                new, info = strategies[name](member_state(gi, i), own)
                key = _group_key(gi)
                state["groups"][key] = setters[gi](state["groups"][key], new, i)
                n_dead = int(info["n_dead"]) if "n_dead" in info else 0
                dt = time.perf_counter() - t1
                summary["members"][name]["resamples"].append({"step": done, "n_dead": n_dead, "seconds": dt})
                writers[name].write_scalars(done, {"resample/n_dead": n_dead, "perf/resample_seconds": dt})
            summary["resample_seconds"] += time.perf_counter() - t0
            logging.info("step %d: resampled %d member(s)", done, len(due))
        if done % cfg.eval.every == 0:
            run_eval(done)
            for gi, g in enumerate(groups):
                key = _group_key(gi)
                density = parallel.to_host(state["counts"][key]) / (cfg.eval.every * cfg.batch_size)
                for i, name in enumerate(g.names):
                    summary["members"][name]["train_density"] = density[i]
                    if is_writer_process():
                        np.save(os.path.join(member_dirs[name], "train_feature_density.npy"), density[i])
                state["counts"][key] = jnp.zeros_like(state["counts"][key])

    def save(done: int) -> None:
        for w in writers.values():
            w.flush()
        ckpt.save(done, state, data_state={"source": source.get_state(), "metrics": host.get_state()},
                  metadata=sweep_metadata(cfg, record))

    try:
        result = run_steps(
            start, end, step=step, metrics=host, checkpoint_every=cfg.checkpoint.every, save=save,
            saved_steps=ckpt.all_steps,
            current_step=lambda: int(jax.device_get(state["groups"][_group_key(0)].step[0])),
            sync_at=lambda done: bool(resampling(done)) or done % cfg.eval.every == 0,
            at_sync=at_sync)
        final, summary["interrupted"] = result.final_step, result.interrupted
        first = summary["members"][members[0][2]]["eval"]
        if final == cfg.num_steps and (first is None or first["step"] != final):
            run_eval(final, log=start < final)
    finally:
        ckpt.close()
        for w in writers.values():
            w.close()
        bar.close()
    summary.update(step=final, tokens_per_s=host.tokens_per_s, seconds=time.perf_counter() - t_start,
                   memory=memory, bundles={name: bundle(gi, i, name) for gi, i, name, _ in members})
    return summary


def _resumed_record(meta: dict, cfg: SweepConfig, step: int, allowed, where: str) -> SAERunRecord:
    """The sweep's run record at ``step``, its config compared with ``cfg`` (as a single run's)."""
    if meta.get("sweep") != SWEEP_FORMAT:
        raise ConfigError(f"{where} holds no sweep checkpoint (a single run's, or another "
                          f"format): use a new workdir for the sweep")
    from saejax.record import ALWAYS_ALLOWED

    # The saved config read back first: fields added to saejax since take their defaults.
    saved = to_dict(from_config(SweepConfig, meta["config"]))
    changes = resume_changes(saved, to_dict(cfg), step, (*ALWAYS_ALLOWED, *allowed), where)
    record = SAERunRecord.from_dict(meta["record"], where=where)
    if changes:
        import dataclasses

        record = dataclasses.replace(record, config=cfg.base(), changes=record.changes + tuple(changes))
    return record


# ---------------------------------------------------------------------------------------
# The sweep's report: one table and a Pareto plot across members
# ---------------------------------------------------------------------------------------


def report_rows(cfg: SweepConfig, members: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for name in cfg.member_names:
        c = cfg.member(name).sae
        e = members[name].get("eval") or {}
        rows.append({"member": name, "architecture": c.architecture, "features": c.n_features,
                     "k": c.k if c.architecture in ("topk", "batchtopk", "matryoshka") else None,
                     "l1_coefficient": c.l1_coefficient, "l0_coefficient": c.l0_coefficient,
                     "lr": c.lr, "seed": c.seed, "step": e.get("step"), "l0": e.get("l0"),
                     "frac_loss_recovered": e.get("frac_loss_recovered"),
                     "explained_variance": e.get("explained_variance"),
                     "dead_features": e.get("dead_features"), "dense_features": e.get("dense_features")})
    return rows


def write_report(cfg: SweepConfig, members: dict[str, dict], groups) -> None:
    """``sweep.json``, ``sweep.md`` (one row per member) and ``sweep_pareto.png``."""
    if not is_writer_process():
        return
    rows = report_rows(cfg, members)
    os.makedirs(cfg.workdir, exist_ok=True)
    with open(os.path.join(cfg.workdir, "sweep.json"), "w") as f:
        json.dump({"rows": rows, "groups": [list(g.names) for g in groups]}, f, indent=1)
    fmt = lambda v, p: "" if v is None else (f"{v:{p}}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| member | architecture | features | k | l1 | l0 coef | lr | seed | L0 | loss recovered "
             "| explained variance | silent on held-out | dense |", "|" + "---|" * 13]
    for r in rows:
        rec = r["frac_loss_recovered"]
        lines.append(f"| {r['member']} | {r['architecture']} | {r['features']} | {fmt(r['k'], 'd')} | "
                     f"{fmt(r['l1_coefficient'], '.3g')} | {fmt(r['l0_coefficient'], '.3g')} | "
                     f"{fmt(r['lr'], '.3g')} | {r['seed']} | {fmt(r['l0'], '.1f')} | "
                     f"{'' if rec is None else f'{100 * rec:.1f}%'} | {fmt(r['explained_variance'], '.3f')} | "
                     f"{fmt(r['dead_features'], 'd')} | {fmt(r['dense_features'], 'd')} |")
    step = max((r["step"] or 0) for r in rows)
    text = (f"# Sweep {os.path.basename(os.path.abspath(cfg.workdir))}: {len(rows)} dictionaries, "
            f"step {step} of {cfg.num_steps}\n\nGroups trained by one step each: "
            + "; ".join("[" + ", ".join(g.names) + "]" for g in groups) + "\n\n" + "\n".join(lines) + "\n")
    with open(os.path.join(cfg.workdir, "sweep.md"), "w") as f:
        f.write(text)
    _pareto_plot(rows, os.path.join(cfg.workdir, "sweep_pareto.png"))


def _pareto_plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ykey = "frac_loss_recovered" if any(r["frac_loss_recovered"] is not None for r in rows) \
        else "explained_variance"
    pts = [r for r in rows if r["l0"] is not None and r[ykey] is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arch in sorted({r["architecture"] for r in pts}):
        mine = [r for r in pts if r["architecture"] == arch]
        ax.scatter([r["l0"] for r in mine], [r[ykey] for r in mine], label=arch, s=30)
        for r in mine:
            ax.annotate(r["member"], (r["l0"], r[ykey]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    if pts and min(r["l0"] for r in pts) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("L0 (active features per token, held out)")
    ax.set_ylabel("loss recovered" if ykey == "frac_loss_recovered" else "explained variance")
    ax.set_title("Sweep: sparsity against reconstruction")
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
