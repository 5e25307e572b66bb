"""What an SAE training run is built from: its activation source, its record, its evaluation.

:func:`open_source` opens the LM and the source with their input checks;
:func:`make_source` builds the configured :class:`~saejax.activations.ActivationSource`
(arrays are written into a store in the workdir first); :func:`check_provenance` refuses
activations that do not belong to the run; :func:`new_record` makes the run record of a
fresh run (statistics -> normaliser); :class:`RunEvaluation` evaluates the dictionary on
fixed held-out data, in the LM or on activations alone. :mod:`saejax.train` runs the loop.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
from absl import logging

from saejax import evaluate, parallel
from saejax.activations import (ActivationSource, LMSource, OnTheFlySource, StoreSource,
                                  restore_lm_source)
from saejax.checkpoint import versions
from saejax.config import ConfigError
from saejax.data.activation_store import ActivationStore
from saejax.data.arrays import write_array_store
from saejax.data.loader import ActivationLoader, LoaderConfig, TokenLoader
from saejax.data.token_store import open_named
from saejax.normalize import Normalizer
from saejax.record import LMIdentity, SAERunRecord
from saejax.sae.bundle import SAEBundle
from saejax.train_config import SAETrainConfig

ARRAYS_DIR, ARRAYS_EVAL_DIR = "activations", "activations_eval"


def open_source(cfg: SAETrainConfig, activations=None) -> tuple[Any, LMSource | None, ActivationSource]:
    """(mesh, LM or None, activation source) of a run, its input checks done (one line each).

    Raises:
      ConfigError: activations passed without source.kind "arrays" (or both/neither of
        paths and arrays), a batch that does not split over "data", or a width that is not
        ``sae.d_in``.
    """
    mesh = parallel.make_mesh(cfg.mesh)
    lm = (restore_lm_source(cfg.lm.dir, cfg.lm.site, mesh, store_dir=cfg.lm.store_dir)
          if cfg.lm.dir else None)
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
    return mesh, lm, source


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
        store = open_named(ActivationStore.open, src.store_dir, "source.store_dir")
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
        now = lm_identity(cfg, lm).identity()
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


def lm_identity(cfg: SAETrainConfig, lm: LMSource) -> LMIdentity:
    return LMIdentity(dir=os.path.abspath(cfg.lm.dir), step=lm.meta.get("step"),
                      token_store=lm.meta.get("store_dir"),
                      store_fingerprint=lm.store.metadata.get("fingerprint"),
                      run_id=lm.meta.get("run_id"))


def new_record(cfg: SAETrainConfig, lm: LMSource | None, source: ActivationSource
                ) -> SAERunRecord:
    stats = source.statistics()
    identity = source.identity()
    lm_id = None
    if lm is not None:
        lm_id = lm_identity(cfg, lm)
    return SAERunRecord(config=cfg, site=lm.site if lm else identity.get("site"), lm=lm_id,
                        data=identity, normalizer=Normalizer.from_stats(
                            stats, normalize=cfg.source.normalize),
                        stats=stats, versions=versions())


class RunEvaluation:
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
            self.n = evaluate.plan_batches(
                cfg.eval.contexts, cfg.eval.batch_contexts, lm.store.rows("val"),
                field="eval.contexts", what="the token store's 'val' split", unit="contexts",
                tokens_per_row=lm.context)
            self.step = evaluate.make_eval_step(lm.graphdef, lm.site, splice, lm.context)
            self.lm_params, self.mean = lm.params, jnp.asarray(record.stats.mean, jnp.float32)
            self.data = {"eval_data": "LM validation split", "eval_contexts": self.n * cfg.eval.batch_contexts}
            return
        store, in_sample = self._held_out_store(source.activation_store(), record.site)
        if store.d != cfg.sae.d_in:
            raise ConfigError(f"config field 'sae.d_in' = {cfg.sae.d_in} is invalid: the "
                              f"held-out activations in {store.directory!r} have width {store.d}")
        self.loader = ActivationLoader(store, LoaderConfig(
            batch_size=cfg.batch_size, shuffle=False, num_epochs=None, prefetch=0), mesh,
            batch_field="batch_size")
        self.n = evaluate.plan_batches(cfg.eval.rows, cfg.batch_size, store.rows,
                                       field="eval.rows", what=f"{store.directory!r}")
        self.step = evaluate.make_activation_eval_step(splice)
        self.data = {"eval_data": os.path.abspath(store.directory), "eval_in_sample": in_sample}
        if in_sample:
            logging.warning("no held-out activations (source.eval_store_dir / eval_paths): "
                            "evaluating on the first %d training rows (in-sample)",
                            self.n * cfg.batch_size)

    def _held_out_store(self, train_store, site: str | None):
        """(store, in_sample): the held-out activations, else the training store itself."""
        src = self.cfg.source
        if src.eval_store_dir:
            return open_named(ActivationStore.open, src.eval_store_dir,
                              "source.eval_store_dir"), False
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
