"""Configs of the SAE pipeline jobs: ``launch/harvest.py`` and ``launch/train_sae.py``.

``SAETrainConfig`` has one section per concern. Nothing overrides a field behind the
user's back; a path that only another source kind (or the LM's evaluation) would read is
refused, and the tuning knobs of one kind (e.g. ``source.buffer_rows`` for "lm") say so in
their docstring:

    sae         the dictionary and its optimiser (saejax.sae.config.SAEConfig)
    lm          the subject LM and site, or none (train on activations alone)
    source      where activation batches come from: "lm" (on the fly), "store", "arrays"
    eval        evaluation cadence and size
    checkpoint  checkpoint cadence, retention, async writes
    (top level) workdir, batch_size, num_steps, log_every, progress_bar, mesh, distributed
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any, Literal, get_args

from saejax.config import (ConfigError, DistributedConfig, MeshConfig, check, check_choice,
                           check_nonnegative, check_positive)
from saejax.data.activation_store import DTYPES
from saejax.sae.config import SAEConfig

SourceKind = Literal["lm", "store", "arrays"]


@dataclasses.dataclass(frozen=True)
class HarvestConfig:
    """``launch/harvest.py``: LM activations at a site -> an activation store.

    Attributes:
      lm_dir: LM training workdir (its checkpoint names the token store it trained on), or a
        local Hugging Face checkpoint folder (GPT-2, GPT-NeoX / Pythia, Llama).
      site: activation site, e.g. "mlp.post" (layer 0) or "blocks.0.resid.mid".
      store_dir: token store to run the LM on; default None = the one its checkpoint names
        (required for a HF checkpoint; its token ids must fit the model's vocabulary).
      out_dir: activation store directory.
      split / start_context / num_contexts: which contexts of the token store to run
        (num_contexts 0 = the rest of the split).
      lm_batch_size: contexts per jitted LM call (global).
      sae_batch_size: the SAE batch the store will feed; chunk rows are a multiple of it.
      dtype: "float32" or "bfloat16".
      chunk_mb: target chunk size.
    """

    lm_dir: str = "runs/lm/paper"
    site: str = "mlp.post"
    store_dir: str | None = None
    out_dir: str = "runs/acts/paper"
    split: str = "train"
    start_context: int = 0
    num_contexts: int = 0
    lm_batch_size: int = 64
    sae_batch_size: int = 4096
    dtype: str = "float32"
    chunk_mb: float = 16.0
    seed: int = 0
    overwrite: bool = False
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self):
        check("lm_dir", self.lm_dir, bool(self.lm_dir), "must name an LM training workdir")
        check("out_dir", self.out_dir, bool(self.out_dir), "must be a non-empty path")
        check_choice("split", self.split, ("train", "val"))
        check_nonnegative("start_context", self.start_context)
        check_nonnegative("num_contexts", self.num_contexts)
        check_positive("lm_batch_size", self.lm_batch_size)
        check_positive("sae_batch_size", self.sae_batch_size)
        check_choice("dtype", self.dtype, list(DTYPES))
        check_positive("chunk_mb", self.chunk_mb)


@dataclasses.dataclass(frozen=True)
class LMSiteConfig:
    """The subject LM and the site the dictionary reads (section ``lm``).

    Attributes:
      dir: LM training workdir (its checkpoint names the token store it trained on), or a
        local Hugging Face checkpoint folder (GPT-2, GPT-NeoX / Pythia, Llama). None (the
        default): no LM; the activations come from a store or arrays, and evaluation reports
        what needs no LM (MSE, explained variance, L0, dead/dense features).
      site: activation site the dictionary reads and, at evaluation, replaces (e.g.
        "mlp.post" = layer 0's MLP neurons, "blocks.1.resid.mid"); read only with an LM.
      store_dir: token store the LM runs on (training activations and the evaluation's
        validation split); default None = the one the LM checkpoint names. Required for a
        HF checkpoint, whose token ids must fit the model's vocabulary.
    """

    dir: str | None = None
    site: str = "mlp.post"
    store_dir: str | None = None

    def __post_init__(self):
        if self.dir is not None:
            check("lm.dir", self.dir, bool(self.dir), "must name an LM workdir, or be None")
        check("lm.store_dir", self.store_dir, self.dir is not None or self.store_dir is None,
              "is read only with an LM (lm.dir is None)")
        check("lm.site", self.site, bool(self.site), "must name an activation site")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Where activation batches come from (section ``source``).

    Attributes:
      kind: "lm" (the LM run on its token store, through a device shuffle buffer),
        "store" (an activation store from ``launch/harvest.py``) or "arrays" (.npy files
        of shape [N, D], written once into an activation store in
        ``<workdir>/activations``, then read like one).
      normalize: multiply inputs so that E||x|| = sqrt(d_in) (the constant is saved with
        the run and applied by every consumer; see saejax.normalize).
      seed: shuffle seed of every stream (the resampling stream uses seed + 1).
      shuffle: permute the order in which the data is read: the token store's contexts
        (kind "lm"; the shuffle buffer mixes rows either way) or the activation store's
        chunks and rows (kinds "store", "arrays"). False reads in file order.
      lm_batch_size: contexts per LM call (kind "lm").
      buffer_rows: device shuffle-buffer capacity in rows (kind "lm"); a multiple of
        2 x batch_size.
      norm_sample_contexts: contexts whose activations give the normalisation statistics
        and the geometric-median sample (kind "lm"; a store carries its own statistics).
      store_dir: the activation store (kind "store").
      paths: a .npy file of rows [N, D], a glob, or several separated by commas, read in
        sorted order within each glob (kind "arrays"; ``train(cfg, activations=...)`` takes
        arrays in memory instead).
      eval_store_dir / eval_paths: held-out activations for evaluation without an LM
        (kinds "store" / "arrays"; refused with an LM, which evaluates on its validation
        split); when unset, evaluation without an LM reads the first rows of the training
        store and reports them as in-sample.
      window_chunks: store chunks mixed by one shuffle window (the token store's for kind
        "lm", the activation store's otherwise).
      prefetch: batches the store loader reads ahead.
      chunk_mb: target chunk size of the store written from arrays (kind "arrays").
    """

    kind: SourceKind = "lm"
    normalize: bool = True
    seed: int = 0
    shuffle: bool = True
    lm_batch_size: int = 64
    buffer_rows: int = 262_144
    norm_sample_contexts: int = 256
    store_dir: str | None = None
    paths: str | None = None
    eval_store_dir: str | None = None
    eval_paths: str | None = None
    window_chunks: int = 4
    prefetch: int = 2
    chunk_mb: float = 16.0

    def __post_init__(self):
        check_choice("source.kind", self.kind, get_args(SourceKind))
        check_nonnegative("source.seed", self.seed)
        for name in ("lm_batch_size", "buffer_rows", "norm_sample_contexts", "window_chunks",
                     "chunk_mb"):
            check_positive(f"source.{name}", getattr(self, name))
        check_nonnegative("source.prefetch", self.prefetch)
        owner = {"store_dir": "store", "eval_store_dir": "store", "paths": "arrays",
                 "eval_paths": "arrays"}
        for name, kind in owner.items():
            if getattr(self, name) and self.kind != kind:
                raise ConfigError(f"config field 'source.{name}' = {getattr(self, name)!r} is "
                                  f"invalid: it is read only when source.kind='{kind}' "
                                  f"(source.kind is {self.kind!r})")
        if self.kind == "store":
            check("source.store_dir", self.store_dir, bool(self.store_dir),
                  "must name a harvested activation store when source.kind='store'")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation (section ``eval``): every ``every`` steps and at the end.

    Attributes:
      every: steps between evaluations.
      contexts / batch_contexts: validation contexts of the LM's token store and contexts
        per jitted call (with an LM: loss recovered, KL, explained variance, L0, density).
      rows: activation rows evaluated without an LM (MSE, explained variance, L0,
        density); rounded down to whole batches, at least one.
    """

    every: int = 1000
    contexts: int = 256
    batch_contexts: int = 32
    rows: int = 65_536

    def __post_init__(self):
        for name in ("every", "contexts", "batch_contexts", "rows"):
            check_positive(f"eval.{name}", getattr(self, name))
        check("eval.contexts", self.contexts, self.contexts % self.batch_contexts == 0,
              f"must be a multiple of eval.batch_contexts ({self.batch_contexts})")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints (section ``checkpoint``): cadence, how many to keep, async writes."""

    every: int = 1000
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        check_positive("checkpoint.every", self.every)
        check("checkpoint.keep", self.keep, isinstance(self.keep, int) and self.keep >= 2,
              "must be >= 2 (the previous checkpoint is the fallback when the newest cannot "
              "be read back)")


@dataclasses.dataclass(frozen=True)
class SAETrainConfig:
    """``launch/train_sae.py``: train a dictionary on activations (see the module docstring).

    Attributes:
      sae: the autoencoder and its optimiser (``sae.d_in`` must equal the data's width).
      lm: the subject LM and site (``lm.dir`` None: no LM).
      source: where the activations come from.
      eval: evaluation cadence and size.
      checkpoint: checkpoint cadence and retention.
      workdir: checkpoints, metrics.jsonl, TensorBoard events, eval.json, feature density.
        Re-running with the same workdir resumes exactly.
      batch_size: activation rows per SAE step (global).
      num_steps: SAE steps.
      log_every: steps per metrics window (metrics.jsonl, TensorBoard, progress bar).
      progress_bar: draw the console progress bar.
    """

    sae: SAEConfig = SAEConfig()
    lm: LMSiteConfig = LMSiteConfig()
    source: SourceConfig = SourceConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    workdir: str = "runs/sae/a1"
    batch_size: int = 4096
    num_steps: int = 10_000
    log_every: int = 50
    progress_bar: bool = True
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self):
        check("workdir", self.workdir, bool(self.workdir), "must be a non-empty path")
        for name in ("batch_size", "num_steps", "log_every"):
            check_positive(name, getattr(self, name))
        scheduled = (self.sae.lr_decay_fraction, self.sae.sparsity_warmup_fraction, self.sae.k_anneal_fraction)
        if self.sae.total_steps == 0 and any(f > 0 for f in scheduled):
            # The schedules' length is the run's (a resumed run that raises num_steps then
            # changes sae.total_steps too, which --allow_changes must name).
            object.__setattr__(self, "sae", dataclasses.replace(self.sae, total_steps=self.num_steps))
        if any(f > 0 for f in scheduled):
            check("sae.total_steps", self.sae.total_steps, self.sae.total_steps >= self.num_steps,
                  f"must be >= num_steps={self.num_steps} (or 0 = num_steps): the schedules end there "
                  f"and a learning rate that decays to 0 before the run ends would stop it")
        if self.source.kind == "lm":
            check("lm.dir", self.lm.dir, self.lm.dir is not None,
                  "must name an LM when source.kind='lm' (the activations come from it)")
        if self.lm.dir is not None:
            for name in ("eval_store_dir", "eval_paths"):
                value = getattr(self.source, name)
                check(f"source.{name}", value, not value,
                      "is read only without an LM (lm.dir is set: evaluation runs the LM on "
                      "its validation split)")
            check("source.buffer_rows", self.source.buffer_rows,
                  self.source.buffer_rows % (2 * self.batch_size) == 0,
                  f"must be a multiple of 2 x batch_size ({2 * self.batch_size})")


@dataclasses.dataclass(frozen=True)
class SweepMember:
    """One dictionary of a sweep (section ``members[i]``).

    Attributes:
      name: the member's name (letters, digits, ``_``, ``-``, ``.``); its files live in
        ``<workdir>/members/<name>`` and ``restore_run(workdir, member=name)`` restores it.
      sae: overrides of the sweep's ``sae`` section for this member, e.g. ``{"k": 16}``.
    """

    name: str = ""
    sae: Any = None

    def __post_init__(self):
        check("members[].name", self.name, bool(re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name or "")),
              "must be a non-empty name of letters, digits, '_', '-' or '.'")
        if self.sae is not None and not isinstance(self.sae, Mapping):
            raise ConfigError(f"config field 'members[].sae' of member {self.name!r} = {self.sae!r} "
                              f"is invalid: must be a section of sae fields, e.g. {{'k': 16}}")


@dataclasses.dataclass(frozen=True)
class SweepConfig(SAETrainConfig):
    """``launch/train_sae.py`` with ``members``: N dictionaries from one activation stream.

    Every field of :class:`SAETrainConfig` is shared (site, source, batch, steps,
    evaluation, checkpoints); each member overrides fields of ``sae``. Members equal but for
    lr, l1/l0/aux coefficients, k and seed are stacked and trained by one step
    (:mod:`saejax.sae.sweep_step`); others form further groups.

    Attributes:
      members: the dictionaries (at least one; names unique).
      sweep_memory_limit_bytes: memory one device may use (0: detect; a sweep whose
        estimate exceeds it is refused at setup).
      member_sharding: "features" (each dictionary split over mesh.model, as a single
        run), "members" (the members split over mesh.model, each device training whole
        dictionaries; a group's size must divide) or "auto" ("members" where it divides
        and fits in memory); :mod:`saejax.sae.sweep_step`.
    """

    members: tuple[SweepMember, ...] = ()
    sweep_memory_limit_bytes: int = 0
    member_sharding: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        check("members", len(self.members), len(self.members) >= 1,
              "must list at least one member (a sweep of none trains nothing)")
        names = [m.name for m in self.members]
        dup = sorted({n for n in names if names.count(n) > 1})
        check("members", dup, not dup, "must have unique names (repeated: " + ", ".join(dup) + ")")
        check_nonnegative("sweep_memory_limit_bytes", self.sweep_memory_limit_bytes)
        check("member_sharding", self.member_sharding,
              self.member_sharding in ("auto", "features", "members"),
              "must be 'auto', 'features' or 'members'")
        for i, m in enumerate(self.members):
            self._member_sae(i, m)  # every member's config is valid now, not at its turn

    def _member_sae(self, i: int, m: SweepMember) -> SAEConfig:
        from saejax.config import from_config, to_dict

        over = dict(m.sae or {})
        try:
            return from_config(SAEConfig, {**to_dict(self.sae), **over}, prefix=f"config.members[{i}].sae")
        except ConfigError as e:
            raise ConfigError(f"sweep member {m.name!r}: {e}") from None

    @property
    def member_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    def base(self) -> SAETrainConfig:
        """The shared settings as a single run's config (the sweep's own ``sae``)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(SAETrainConfig)}
        return SAETrainConfig(**kw)

    def member(self, name: str) -> SAETrainConfig:
        """Member ``name`` as an ordinary run's config (its workdir: ``members/<name>``)."""
        if name not in self.member_names:
            raise ConfigError(f"the sweep has no member {name!r}; its members: "
                              f"{', '.join(self.member_names)}")
        i = self.member_names.index(name)
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(SAETrainConfig)}
        kw.update(sae=self._member_sae(i, self.members[i]),
                  workdir=os.path.join(self.workdir, "members", name))
        return SAETrainConfig(**kw)
