"""The SAE training loop: the one place activations, the SAE step, checkpoints, metrics and
evaluation meet.

Per step: the activation source (:mod:`saejax.activations`: the LM through a device
shuffle buffer, an activation store, or the user's arrays) yields a batch [B, D]; the
run's normaliser scales it and the jitted, sharded SAE step trains on it. The host side
(one-step-late metric reads, non-finite stop, windows, checkpoint cadence, signals) is
:mod:`saejax.loop`, shared with the LM trainer. At the resampling steps the dead-feature
strategy runs on a fresh sample; every ``eval.every`` steps the dictionary is evaluated
(spliced into the LM on held-out tokens, or on held-out activations without an LM).
Checkpoints hold the SAE state, the source's device state (shuffle buffer), the window's
firing counts, every stream's position and the run record (:mod:`saejax.record`), so
re-running the same command resumes bit-exactly.

Legend: B batch rows, D input width, F features, S resample sample rows.
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
from saejax.config import ConfigError
from saejax.loop import HostMetrics, NonFiniteError, run_steps
from saejax.metrics import MetricWriter, ProgressBar, is_writer_process
from saejax.record import CHECKPOINTS, SAERunRecord
from saejax.sae.bundle import SAEBundle
from saejax.sae.step import (abstract_state, init_state, make_dead_strategy, make_train_step,
                             should_resample)
from saejax.train_config import SAETrainConfig
from saejax.train_setup import RunEvaluation, check_provenance, new_record, open_source

EVAL_FILE = "eval.json"
INIT_SAMPLE_ROWS = 16_384  # rows for the geometric-median initialisation of b_dec


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def train(cfg: SAETrainConfig, *, activations=None, allow_changes: tuple[str, ...] = (),
          stop_at: int | None = None) -> dict[str, Any]:
    """Trains (or resumes) the dictionary ``cfg`` describes.

    Args:
      cfg: the run; ``cfg.workdir`` holds checkpoints, metrics and evaluation results.
      activations: with ``cfg.source.kind == "arrays"``, the activations themselves (a numpy
        array [N, D] or a list of them) instead of ``cfg.source.paths``; written once into
        ``<workdir>/activations``.
      allow_changes: config fields (or sections) that may differ from the checkpoint's when
        resuming, e.g. ("num_steps",) to extend a run; the run record keeps each change
        with its step. Other changes are refused.
      stop_at: stop (with a checkpoint) after this step; for tests of interruption.

    Returns:
      A summary: final step, last training metrics, last evaluation, the window's training
      density, timings, and the final ``bundle`` (:class:`~saejax.sae.bundle.SAEBundle`).

    Raises:
      NonFiniteError: a NaN/Inf loss or gradient (the last good checkpoint stays intact).
      ConfigError: inconsistent settings (e.g. ``sae.d_in`` != the activations' width).
    """
    t_start = time.perf_counter()
    mesh, lm, source = open_source(cfg, activations)
    check_provenance(cfg, lm, source)  # a store from another LM or site: refused at once
    train_step = make_train_step(cfg.sae, mesh)  # a dictionary that does not split: refused
    dead_strategy = make_dead_strategy(cfg.sae, mesh)
    ckpt = Checkpointer(os.path.join(cfg.workdir, CHECKPOINTS), keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    counts_sharding = parallel.named_sharding(mesh, ("latent",))
    abstract = {"sae": abstract_state(cfg.sae, mesh), "source": source.abstract_device_state(),
                "counts": jax.ShapeDtypeStruct((cfg.sae.n_features,), jnp.int32,
                                               sharding=counts_sharding)}
    if ckpt.latest_step() is not None:
        # The record first: a checkpoint of an older layout fails here in one line.
        where = f"the run in {cfg.workdir!r}"
        try:  # refuse a changed config before reading any array
            SAERunRecord.from_dict(ckpt.restore_metadata(), where=where).resumed_with(
                cfg, ckpt.latest_step(), allow_changes, where)
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001 - a damaged newest step: restore() skips it
            pass
        state, data_state, meta = ckpt.restore(abstract)  # the newest step that restores
        record = SAERunRecord.from_dict(meta, where=where).resumed_with(
            cfg, ckpt.restored_step, allow_changes, where)
        check_provenance(cfg, lm, source, record)  # the data the run started on
        source.set_state(data_state["source"])
        logging.info("resumed %s at step %d", cfg.workdir, int(state["sae"].step))
    else:
        record = new_record(cfg, lm, source)
        init = record.normalizer.apply(source.init_sample(INIT_SAMPLE_ROWS))
        state = {"sae": init_state(cfg.sae, mesh, init), "source": source.init_device_state(),
                 "counts": jax.device_put(np.zeros(cfg.sae.n_features, np.int32), counts_sharding)}
    normalizer = record.normalizer
    prep = jax.jit(lambda x: normalizer.apply(x.astype(jnp.float32)),
                   out_shardings=parallel.named_sharding(mesh, ("batch", "d_in")))
    add_counts = jax.jit(lambda c, m: c + m, donate_argnums=0)
    evaluation = RunEvaluation(cfg, record, lm, source, mesh)

    def bundle() -> SAEBundle:
        return SAEBundle(state["sae"].params, cfg.sae, normalizer, record.site)

    def run_eval(step: int, log: bool = True) -> dict:
        """Evaluates; ``log=False`` (a completed run re-run) only returns the numbers."""
        out = evaluation(bundle())
        density = out.pop("feature_density")
        if not log:
            return {**out, "step": step}
        writer.write_scalars(step, {f"eval/{k}": v for k, v in out.items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
        alive = density[density > 0]
        if alive.size:
            writer.write_histogram(step, "eval/log10_feature_density", np.log10(alive))
        out["step"] = step
        if is_writer_process():
            os.makedirs(cfg.workdir, exist_ok=True)
            np.save(os.path.join(cfg.workdir, "feature_density.npy"), density)
            with open(os.path.join(cfg.workdir, EVAL_FILE), "w") as f:
                json.dump(out, f, indent=1)
        return out

    start = int(jax.device_get(state["sae"].step))
    end = cfg.num_steps if stop_at is None else min(stop_at, cfg.num_steps)
    # Drops what a dead run logged after the restored step (everything, on a fresh start).
    writer = MetricWriter(cfg.workdir, resume_step=start if start else -1)
    bar = ProgressBar(cfg.num_steps, start_step=start, enabled=cfg.progress_bar)
    summary: dict[str, Any] = {"eval": None, "interrupted": None, "resample_seconds": 0.0,
                               "resamples": [], "train_density": None}

    def report(done: int, avg: dict, last: dict, tokens_per_s: float) -> None:
        writer.write_scalars(done, {**{f"train/{k}": v for k, v in avg.items()},
                                    "perf/tokens_per_s": tokens_per_s})
        bar.update(done, {"loss": avg["loss"], "L0": avg["l0"], "dead%": 100 * avg["frac_dead"],
                          "tok/s": tokens_per_s})

    def stop_nonfinite(e: NonFiniteError) -> None:
        ckpt.wait()
        raise NonFiniteError(f"{e}; the update was not applied. Stopping; the last good "
                             f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory} "
                             f"(check the activations for NaN/Inf and lower sae.lr).") from None

    # end = num_steps, not stop_at: a run stopped early reports no partial window (its sums
    # go into the checkpoint and the resumed run completes the window).
    host = HostMetrics(log_every=cfg.log_every, end=cfg.num_steps,
                       tokens_per_step=cfg.batch_size, report=report,
                       on_nonfinite=stop_nonfinite, skip=("feature_counts",))
    if start:
        host.set_state(data_state["metrics"])

    def step(i: int):
        nonlocal state
        dev, batch = source.next(state["source"])
        sae_state, metrics = train_step(state["sae"], prep(batch), step=i)
        state = {"sae": sae_state, "source": dev,
                 "counts": add_counts(state["counts"], metrics["feature_counts"])}
        return metrics

    def at_sync(done: int) -> None:
        nonlocal state
        if should_resample(cfg.sae, done):
            t0 = time.perf_counter()
            sample = prep(source.resample_sample(cfg.sae.resample_sample_size))
            sae_state, info = dead_strategy(state["sae"], sample)
            state = {**state, "sae": sae_state}
            n_dead = int(info["n_dead"]) if "n_dead" in info else 0
            dt = time.perf_counter() - t0
            summary["resample_seconds"] += dt
            summary["resamples"].append({"step": done, "n_dead": n_dead, "seconds": dt})
            writer.write_scalars(done, {"resample/n_dead": n_dead, "perf/resample_seconds": dt})
            logging.info("step %d: resampled %d dead features in %.2f s", done, n_dead, dt)
        if done % cfg.eval.every == 0:
            summary["eval"] = run_eval(done)
            # Density over the window since the last evaluation; the counts are part of the
            # checkpointed state, so a resumed run reports the same numbers.
            density = parallel.to_host(state["counts"]) / (cfg.eval.every * cfg.batch_size)
            summary["train_density"] = density
            alive = density[density > 0]
            if alive.size:
                writer.write_histogram(done, "train/log10_feature_density", np.log10(alive))
            if is_writer_process():
                np.save(os.path.join(cfg.workdir, "train_feature_density.npy"), density)
            state = {**state, "counts": jnp.zeros_like(state["counts"])}

    def save(done: int) -> None:
        writer.flush()  # every record up to ``done`` is on disk before the checkpoint commits
        ckpt.save(done, state, data_state={"source": source.get_state(),
                                           "metrics": host.get_state()},
                  metadata=record.to_dict())

    try:
        result = run_steps(
            start, end, step=step, metrics=host, checkpoint_every=cfg.checkpoint.every,
            save=save, saved_steps=ckpt.all_steps,
            current_step=lambda: int(jax.device_get(state["sae"].step)),
            sync_at=lambda done: should_resample(cfg.sae, done) or done % cfg.eval.every == 0,
            at_sync=at_sync)
        final, summary["interrupted"] = result.final_step, result.interrupted
        if final == cfg.num_steps and (summary["eval"] is None or summary["eval"]["step"] != final):
            summary["eval"] = run_eval(final, log=start < final)
    finally:
        ckpt.close()
        writer.close()
        bar.close()
    summary.update(step=final, train=host.last, tokens_per_s=host.tokens_per_s,
                   seconds=time.perf_counter() - t_start, bundle=bundle())
    if summary["eval"]:
        _log_eval(final, summary["eval"])
    return summary


def _log_eval(step: int, e: dict) -> None:
    head = (f"loss recovered {100 * e['frac_loss_recovered']:.1f}% (mean-ablation "
            f"{100 * e['frac_loss_recovered_mean_ablation']:.1f}%), "
            if "frac_loss_recovered" in e else "")
    logging.info("step %d: %sL0 %.1f, silent on held-out %d, dense %d, explained variance "
                 "%.3f", step, head, e["l0"], e["dead_features"], e["dense_features"],
                 e["explained_variance"])
