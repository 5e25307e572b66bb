"""The SAE run record: what a trained dictionary is, saved with every checkpoint, and its loader.

:class:`SAERunRecord` is the typed metadata of an SAE training run: its config, the site it
reads, the identity of the LM checkpoint and of the activation data, the input normaliser
with the statistics it came from, and library versions. The training loop writes it into
every checkpoint's JSON metadata; :func:`load_sae` reads it back with the dictionary, onto
any mesh, for analysis. Nothing here imports the training loop.

    bundle, record = load_sae("runs/demo/sae")      # SAEBundle (encode/decode/splice) + record
    record.lm.dir, record.site, record.normalizer.scale, record.step

Legend: F features, D input width.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax

from saejax import parallel
from saejax.config import ConfigError, MeshConfig, from_config, resume_changes, to_dict
from saejax.normalize import ActivationStats, Normalizer
from saejax.sae.bundle import SAEBundle
from saejax.train_config import SAETrainConfig

RECORD_FORMAT = 2
CHECKPOINTS = "checkpoints"
# Config fields that may differ on a resume without changing the experiment. (A mesh change
# must be allowed explicitly: with source.kind "lm" the shuffle buffer is laid out per
# data-parallel shard, so the data-parallel size must stay.)
ALWAYS_ALLOWED = ("workdir", "progress_bar", "distributed", "checkpoint.async_save")


@dataclasses.dataclass(frozen=True)
class LMIdentity:
    """The LM checkpoint a run used.

    Attributes:
      dir: the LM training workdir (absolute).
      step: its checkpoint step (None for HF directories).
      token_store: the token store it trained on (tokenizer, evaluation contexts).
      store_fingerprint: that store's settings fingerprint.
      run_id: the LM training run's id (its checkpoints' metadata), None for LM runs
        trained before it was recorded.
    """

    dir: str
    step: int | None = None
    token_store: str | None = None
    store_fingerprint: str | None = None
    run_id: str | None = None

    def identity(self) -> tuple:
        """(step, token-store fingerprint, run id): what makes two LM checkpoints the same."""
        return (self.step, self.store_fingerprint, self.run_id)


@dataclasses.dataclass(frozen=True)
class SAERunRecord:
    """Typed metadata of an SAE run (saved with each checkpoint; see module docstring).

    Attributes:
      config: the run's config.
      site: the canonical site the dictionary reads ("blocks.0.mlp.post"), or None when
        the activations name none.
      lm: the LM checkpoint, or None for a run without an LM.
      data: identity of the activation source (kind, store directory and fingerprint, ...).
      normalizer: what the inputs were multiplied by.
      stats: the activation statistics the normaliser came from (LM units).
      versions: library versions of the run.
      changes: config changes allowed on resumes, each ``{"step", "field", "old", "new"}``
        (the step the changed run resumed from).
      step: the checkpoint step this record was read from (None when not read from one).
    """

    config: SAETrainConfig
    site: str | None
    lm: LMIdentity | None
    data: dict[str, Any]
    normalizer: Normalizer
    stats: ActivationStats
    versions: dict[str, str]
    changes: tuple[dict[str, Any], ...] = ()
    step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": RECORD_FORMAT, "config": to_dict(self.config), "site": self.site,
                "lm": None if self.lm is None else dataclasses.asdict(self.lm),
                "data": self.data, "normalizer": self.normalizer.to_dict(),
                "stats": self.stats.to_dict(), "versions": self.versions,
                "changes": list(self.changes)}

    def resumed_with(self, config: SAETrainConfig, step: int, allowed: Sequence[str] = (),
                     where: str = "the run") -> SAERunRecord:
        """The record of this run resumed at ``step`` with ``config``.

        Fields of :data:`ALWAYS_ALLOWED` (they do not change the experiment) and those named
        in ``allowed`` may differ; each difference is kept in ``changes`` with the step.

        Raises:
          ConfigError: a field changed that is not allowed, or ``num_steps`` is below
            ``step``.
        """
        new = resume_changes(to_dict(self.config), to_dict(config), step,
                             (*ALWAYS_ALLOWED, *allowed), where)
        if not new:
            return self
        return dataclasses.replace(self, config=config, changes=self.changes + tuple(new))

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, step: int | None = None,
                  where: str = "the checkpoint") -> SAERunRecord:
        """Parses :meth:`to_dict`'s output.

        Raises:
          ConfigError: a record of another format (runs written before it was typed).
        """
        if d.get("format") != RECORD_FORMAT:
            raise ConfigError(f"{where} holds an SAE run record of format {d.get('format')!r}; "
                              f"this saejax reads format {RECORD_FORMAT} (runs trained before "
                              f"the typed run record must be re-trained)")
        return cls(config=from_config(SAETrainConfig, d["config"]), site=d["site"],
                   lm=None if d["lm"] is None else LMIdentity(**d["lm"]), data=d["data"],
                   normalizer=Normalizer.from_dict(d["normalizer"]),
                   stats=ActivationStats.from_dict(d["stats"]), versions=d["versions"],
                   changes=tuple(d.get("changes", ())), step=step)


def _checkpointer(workdir: str):
    from saejax.checkpoint import Checkpointer

    return Checkpointer(os.path.join(workdir, CHECKPOINTS), async_save=False, read_only=True)


def load_record(workdir: str, *, step: int | None = None, member: str | None = None) -> SAERunRecord:
    """The run record of ``workdir``'s checkpoint ``step`` (default latest); no arrays read.

    ``member``: the dictionary of a sweep (:mod:`saejax.sweep`); its record is the sweep's
    with that member's config.

    Raises:
      FileNotFoundError: no checkpoint in ``workdir``.
      ConfigError: a sweep without ``member`` (or an unknown one), or ``member`` for a
        single run.
    """
    ckpt = _checkpointer(workdir)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no SAE checkpoint in {workdir!r}")
        meta = ckpt.restore_metadata(step)  # without a step: the newest that reads
        step = ckpt.metadata_step
    finally:
        ckpt.close()
    return _record(meta, workdir, step, member)[0]


def _record(meta: dict, workdir: str, step: int | None, member: str | None
            ) -> tuple[SAERunRecord, tuple[int, int] | None]:
    """(record, (group, position) of ``member`` in a sweep, or None for a single run)."""
    where = f"{workdir!r} step {step}"
    if "sweep" not in meta:
        if member is not None:
            raise ConfigError(f"{workdir!r} holds a single run, not a sweep: drop member={member!r}")
        return SAERunRecord.from_dict(meta, step=step, where=where), None
    from saejax.train_config import SweepConfig

    sweep = from_config(SweepConfig, meta["config"])
    if member is None:
        raise ConfigError(f"{workdir!r} holds a sweep of {len(sweep.members)} dictionaries "
                          f"({', '.join(sweep.member_names)}): pass member=<name>")
    config = sweep.member(member)  # ConfigError naming the members for an unknown one
    record = SAERunRecord.from_dict(meta["record"], step=step, where=where)
    pos = next((gi, names.index(member)) for gi, names in enumerate(meta["groups"]) if member in names)
    return dataclasses.replace(record, config=config), pos


def load_sae(workdir: str, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None,
             member: str | None = None) -> tuple[SAEBundle, SAERunRecord]:
    """Restores a trained dictionary onto ``mesh`` (any shape; default all devices, data-parallel).

    Only the SAE's train state is read: the shuffle buffer saved beside it is laid out for
    the training mesh and not needed. ``member`` names one dictionary of a sweep's workdir
    (:mod:`saejax.sweep`): only its group's stacked state is read, and its slice returned.

    Returns:
      (bundle, record): an :class:`~saejax.sae.bundle.SAEBundle` (parameters sharded for
      ``mesh``, config, normaliser, site) and the run's :class:`SAERunRecord` (for a sweep
      member: the sweep's record with the member's config).

    Raises:
      FileNotFoundError: no checkpoint in ``workdir``.
      ConfigError: a sweep without ``member`` (or an unknown one), or ``member`` for a
        single run.
    """
    from saejax.sae.step import abstract_state

    mesh = mesh or parallel.make_mesh(MeshConfig())
    ckpt = _checkpointer(workdir)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no SAE checkpoint in {workdir!r}")
        meta = ckpt.restore_metadata(step)  # None: the newest that reads
        record, pos = _record(meta, workdir, None, member)
        if pos is None:
            abstract = {"sae": abstract_state(record.config.sae, mesh)}
        else:
            from saejax.sae import sweep_step as sw
            from saejax.train_config import SweepConfig

            sweep = from_config(SweepConfig, meta["config"])
            names = meta["groups"][pos[0]]
            group = sw.Group(tuple(names), tuple(sweep.member(n).sae for n in names))
            abstract = {"groups": {f"group{pos[0]}": sw.abstract_stack(group, mesh)}}
        # Without a step: the newest step that restores (a damaged newer one is skipped).
        state, _, meta = ckpt.restore(abstract, step, partial=True)
        record, _ = _record(meta, workdir, ckpt.restored_step, member)
    finally:
        ckpt.close()
    if pos is None:
        params = state["sae"].params
    else:
        params = sw.member_getter(group, mesh)(state["groups"][f"group{pos[0]}"], pos[1]).params
    bundle = SAEBundle(params=params, config=record.config.sae, normalizer=record.normalizer,
                       site=record.site)
    return bundle, record
