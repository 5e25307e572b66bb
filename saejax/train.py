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

from saejax import evaluate, parallel
from saejax.activations import (ActivationSource, LMSource, OnTheFlySource, StoreSource,
                                restore_lm_source)
from saejax.data.activation_store import ActivationStore
from saejax.data.arrays import write_array_store
from saejax.data.token_store import CorruptStoreError
from saejax.checkpoint import Checkpointer, versions
from saejax.config import ConfigError
from saejax.data.loader import ActivationLoader, LoaderConfig, TokenLoader
from saejax.loop import HostMetrics, NonFiniteError, run_steps
from saejax.metrics import MetricWriter, ProgressBar, is_writer_process
from saejax.normalize import Normalizer
from saejax.record import CHECKPOINTS, LMIdentity, SAERunRecord
from saejax.sae.bundle import SAEBundle
from saejax.sae.step import (abstract_state, init_state, make_dead_strategy, make_train_step,
                             should_resample)
from saejax.train_config import SAETrainConfig

EVAL_FILE = "eval.json"
INIT_SAMPLE_ROWS = 16_384  # rows for the geometric-median initialisation of b_dec
ARRAYS_DIR, ARRAYS_EVAL_DIR = "activations", "activations_eval"


# ---------------------------------------------------------------------------------------
# Setup: the source, the record, the evaluation
# ---------------------------------------------------------------------------------------


def make_source(cfg: SAETrainConfig, mesh, lm: LMSource | None,
                activations=None) -> ActivationSource:
    """The configured activation source (arrays are written into a store in the workdir)."""
    src = cfg.source
    common = dict(batch_size=cfg.batch_size, seed=src.seed, shuffle=src.shuffle,
                  window_chunks=src.window_chunks, prefetch=src.prefetch)
    if src.kind == "lm":
        return OnTheFlySource(lm, mesh, lm_batch_size=src.lm_batch_size,
                              buffer_rows=src.buffer_rows,
                              norm_sample_contexts=src.norm_sample_contexts, **common)
    if src.kind == "store":
        from saejax.data.token_store import StoreError

        try:
            store = ActivationStore.open(src.store_dir)
        except (FileNotFoundError, StoreError) as e:
            if isinstance(e, CorruptStoreError):
                raise
            raise ConfigError(f"config field 'source.store_dir' = {src.store_dir!r} is "
                              f"invalid: {e}") from None
        return StoreSource(store, mesh, **common)
    store = write_array_store(src.paths if activations is None else activations,
                              os.path.join(cfg.workdir, ARRAYS_DIR), batch_size=cfg.batch_size,
                              chunk_mb=src.chunk_mb, site=lm.site if lm else None,
                              d_in=cfg.sae.d_in)
    return StoreSource(store, mesh, kind="arrays", **common)


def check_provenance(cfg: SAETrainConfig, lm: LMSource | None, source: ActivationSource,
                     record: SAERunRecord | None = None) -> None:
    """Refuses activations that do not belong to this run, in one line.

    A store harvested from an LM must come from the run's LM (same checkpoint step and token
    store) at the run's site; on a resume (``record`` given), the data must be the data the
    run started on (same store contents), so its normalisation still holds.

    Raises:
      ConfigError: naming the field and both values.
    """
    ident = source.identity()
    if lm is not None and ident["kind"] == "store":
        plan_site, plan_lm = ident.get("site"), ident.get("lm") or {}
        if plan_site is not None and plan_site != lm.site:
            raise ConfigError(f"config field 'source.store_dir' = {cfg.source.store_dir!r} is "
                              f"invalid: it holds activations of site {plan_site!r}, but the "
                              f"run reads {lm.site!r} (lm.site); harvest that site or set "
                              f"lm.site={plan_site!r}")
        if plan_lm:
            theirs = (plan_lm.get("step"), plan_lm.get("store"), plan_lm.get("run_id"))
            ours = (lm.meta.get("step"), lm.store.metadata.get("fingerprint"),
                    lm.meta.get("run_id"))
            if theirs != ours:
                raise ConfigError(
                    f"config field 'source.store_dir' = {cfg.source.store_dir!r} is invalid: it "
                    f"was harvested from another LM checkpoint (step, token store, run id) = "
                    f"{theirs} "
                    f"than lm.dir={cfg.lm.dir!r} {ours}; harvest it from this LM or point "
                    f"lm.dir at the one it came from ({plan_lm.get('dir')!r})")
    if record is not None and record.lm is not None and lm is not None:
        now = _lm_identity(cfg, lm).identity()
        if now != record.lm.identity():
            raise ConfigError(
                f"config field 'lm.dir' = {cfg.lm.dir!r} is invalid: the run in {cfg.workdir!r} "
                f"started on LM checkpoint (step, token store, run id) = "
                f"{record.lm.identity()}, and lm.dir now holds {now} (was the LM run "
                f"continued?); resume on the same LM checkpoint or start a new workdir")
    if record is not None and record.data.get("fingerprint") != ident.get("fingerprint"):
        raise ConfigError(f"the run in {cfg.workdir!r} started on other activations "
                          f"({record.data.get('kind')} {record.data.get('fingerprint')!r}, now "
                          f"{ident.get('fingerprint')!r}): its normalisation and data order "
                          f"no longer hold; resume it on its data or start a new workdir")


def _lm_identity(cfg: SAETrainConfig, lm: LMSource) -> LMIdentity:
    return LMIdentity(dir=os.path.abspath(cfg.lm.dir), step=lm.meta.get("step"),
                      token_store=lm.meta.get("store_dir"),
                      store_fingerprint=lm.store.metadata.get("fingerprint"),
                      run_id=lm.meta.get("run_id"))


def _new_record(cfg: SAETrainConfig, lm: LMSource | None, source: ActivationSource
                ) -> SAERunRecord:
    stats = source.statistics()
    identity = source.identity()
    lm_id = None
    if lm is not None:
        lm_id = _lm_identity(cfg, lm)
    return SAERunRecord(config=cfg, site=lm.site if lm else identity.get("site"), lm=lm_id,
                        data=identity, normalizer=Normalizer.from_stats(
                            stats, normalize=cfg.source.normalize),
                        stats=stats, versions=versions())


class _Evaluation:
    """Evaluates the current dictionary on fixed held-out data (same batches every time)."""

    def __init__(self, cfg: SAETrainConfig, record: SAERunRecord, lm: LMSource | None,
                 source: ActivationSource, mesh):
        self.cfg = cfg
        loader = LoaderConfig(batch_size=cfg.eval.batch_contexts, seed=cfg.source.seed,
                              shuffle=False, num_epochs=None, prefetch=0)
        splice = lambda bundle, acts: bundle.splice(acts)  # noqa: E731
        self.lm_params = None
        if lm is not None:
            self.loader = TokenLoader(lm.store, "val", loader, mesh,
                                      batch_field="eval.batch_contexts")
            self.n = cfg.eval.contexts // cfg.eval.batch_contexts
            self.step = evaluate.make_eval_step(lm.graphdef, lm.site, splice, lm.context)
            self.lm_params, self.mean = lm.params, jnp.asarray(record.stats.mean, jnp.float32)
            self.data = {"eval_data": "LM validation split", "eval_contexts": cfg.eval.contexts}
            return
        store, in_sample = self._held_out_store(source.activation_store(), record.site)
        if store.d != cfg.sae.d_in:
            raise ConfigError(f"config field 'sae.d_in' = {cfg.sae.d_in} is invalid: the "
                              f"held-out activations in {store.directory!r} have width {store.d}")
        self.loader = ActivationLoader(store, LoaderConfig(
            batch_size=cfg.batch_size, shuffle=False, num_epochs=None, prefetch=0), mesh,
            batch_field="batch_size")
        self.n = max(1, min(cfg.eval.rows, store.rows) // cfg.batch_size)
        self.step = evaluate.make_activation_eval_step(splice)
        self.data = {"eval_data": os.path.abspath(store.directory), "eval_in_sample": in_sample}
        if in_sample:
            logging.warning("no held-out activations (source.eval_store_dir / eval_paths): "
                            "evaluating on the first %d training rows (in-sample)",
                            self.n * cfg.batch_size)

    def _held_out_store(self, train_store, site: str | None):
        """(store, in_sample): the held-out activations, else the training store itself."""
        from saejax.data.activation_store import ActivationStore

        src = self.cfg.source
        if src.eval_store_dir:
            return ActivationStore.open(src.eval_store_dir), False
        if src.eval_paths:
            return write_array_store(src.eval_paths, os.path.join(self.cfg.workdir, ARRAYS_EVAL_DIR),
                                     batch_size=self.cfg.batch_size, chunk_mb=src.chunk_mb,
                                     site=site, d_in=self.cfg.sae.d_in), False
        return train_store, True

    def __call__(self, bundle: SAEBundle) -> dict[str, Any]:
        start = self.loader.get_state()
        try:
            batches = (next(self.loader) for _ in range(self.n))
            thr = self.cfg.sae.dense_threshold
            if self.lm_params is not None:
                out = evaluate.evaluate(self.step, self.lm_params, bundle, self.mean, batches, thr)
            else:
                out = evaluate.evaluate_activations(self.step, bundle, batches, thr)
        finally:
            self.loader.set_state(start)
        return {**out, **self.data}


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
    mesh = parallel.make_mesh(cfg.mesh)
    lm = restore_lm_source(cfg.lm.dir, cfg.lm.site, mesh) if cfg.lm.dir else None
    if activations is not None and cfg.source.kind != "arrays":
        raise ConfigError(f"activations were passed, but config field 'source.kind' = "
                          f"{cfg.source.kind!r}: set it to 'arrays'")
    if cfg.source.kind == "arrays" and (activations is None) == (not cfg.source.paths):
        raise ConfigError(f"config field 'source.paths' = {cfg.source.paths!r} is invalid: "
                          f"source.kind='arrays' reads either .npy files (source.paths) or "
                          f"train(cfg, activations=...), exactly one of them")
    parallel.check_divisible("batch_size", cfg.batch_size, mesh, parallel.DATA)
    if lm is not None and lm.width != cfg.sae.d_in:
        raise ConfigError(f"config field 'sae.d_in' = {cfg.sae.d_in} is invalid: site "
                          f"{lm.site!r} of the LM in {cfg.lm.dir!r} has width {lm.width}")
    source = make_source(cfg, mesh, lm, activations)
    if source.width != cfg.sae.d_in:
        raise ConfigError(f"config field 'sae.d_in' = {cfg.sae.d_in} is invalid: the "
                          f"{cfg.source.kind} activations have width {source.width}")
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
        record = _new_record(cfg, lm, source)
        init = record.normalizer.apply(source.init_sample(INIT_SAMPLE_ROWS))
        state = {"sae": init_state(cfg.sae, mesh, init), "source": source.init_device_state(),
                 "counts": jax.device_put(np.zeros(cfg.sae.n_features, np.int32), counts_sharding)}
    normalizer = record.normalizer
    prep = jax.jit(lambda x: normalizer.apply(x.astype(jnp.float32)),
                   out_shardings=parallel.named_sharding(mesh, ("batch", "d_in")))
    add_counts = jax.jit(lambda c, m: c + m, donate_argnums=0)
    evaluation = _Evaluation(cfg, record, lm, source, mesh)

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
        sae_state, metrics = train_step(state["sae"], prep(batch))
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
    logging.info("step %d: %sL0 %.1f, dead %d, dense %d, explained variance %.3f", step, head,
                 e["l0"], e["dead_features"], e["dense_features"], e["explained_variance"])
