"""Checkpoints: an orbax CheckpointManager holding train state, data position and metadata.

Each step directory holds three items:
  * ``state``: any pytree of arrays (params, optimizer state, counters, RNG key, step), saved
    asynchronously (the train loop keeps running while it is written);
  * ``data``: the data iterator's JSON state (``loader.get_state()``), so a resumed run reads
    exactly the batches it would have read;
  * ``metadata``: a JSON record (config, versions, normalisation constants, ...).

Restore may target a different mesh than the one that saved: pass an abstract pytree of
``jax.ShapeDtypeStruct`` carrying the new shardings (:func:`abstract_with_shardings`). Every
jax process takes part in save and restore; orbax writes from the primary process.
Half-written (async, interrupted) steps are never listed, so the latest *complete* step is
always what :meth:`Checkpointer.restore` returns. A complete step that cannot be read back
(a file truncated or damaged after it was written) is skipped with a warning naming it, and
the newest intact step is restored instead. orbax deletes the steps beyond ``keep`` only
after a newer one has committed; a save that fails (e.g. the disk is full) raises at the
next save, :meth:`wait` or :meth:`close` and leaves the older steps in place.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import flax
import jax
import optax
import orbax.checkpoint as ocp
from absl import logging

STATE, DATA, METADATA = "state", "data", "metadata"


class CorruptCheckpointError(RuntimeError):
    """No checkpoint step of a directory can be read back."""


def abstract_with_shardings(tree: Any, shardings: Any | None = None) -> Any:
    """ShapeDtypeStructs of ``tree`` (arrays or ShapeDtypeStructs) carrying ``shardings``.

    Args:
      tree: a pytree of arrays or ShapeDtypeStructs (e.g. from ``jax.eval_shape``).
      shardings: a matching pytree of ``jax.sharding.Sharding`` (or None to keep each leaf's).
    """
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


class Checkpointer:
    """Keep-N, optionally async checkpoints of (state, data-iterator state, metadata).

    Example:
      ckpt = Checkpointer(workdir + "/checkpoints", keep=3)
      if ckpt.latest_step() is not None:
          state, data_state, meta = ckpt.restore(abstract_state)
      ckpt.save(step, state, data_state=loader.get_state(), metadata={...})
      ckpt.close()  # waits for pending async writes
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        """``read_only``: for restoring only; a missing directory is a FileNotFoundError and
        nothing is ever created or deleted."""
        self.directory = os.path.abspath(os.fspath(directory))
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"no checkpoints in {self.directory!r} (no such directory)")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only)  # what a failed save left, at the next start
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE, DATA, METADATA))
        self.read_only = read_only
        self.restored_step: int | None = None  # the step the last restore() read
        self.metadata_step: int | None = None  # the step the last restore_metadata() read

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, data_state: dict | None = None,
             metadata: dict | None = None, force: bool = False) -> bool:
        """Starts saving ``step`` (returns before the write finishes when async).

        Args:
          step: the step number (directory name).
          state: pytree of jax arrays; must not be donated/mutated until written (orbax copies
            device buffers before returning, so the caller may donate it to the next step).
          data_state: JSON-serialisable data iterator state.
          metadata: JSON-serialisable record.
          force: save even if this step already exists (it is then overwritten).

        Returns:
          True if a save was started.
        """
        if step in self._manager.all_steps():
            if not force:
                return False
            self._manager.wait_until_finished()
            self._manager.delete(step)
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: ocp.args.JsonSave(data_state or {}),
            METADATA: ocp.args.JsonSave(metadata or {}),
        })
        return bool(self._manager.save(step, args=args, force=True))

    def restore(self, abstract_state: Any, step: int | None = None, *, partial: bool = False
                ) -> tuple[Any, dict, dict]:
        """Restores (state, data_state, metadata) of ``step`` (default: latest).

        Args:
          abstract_state: pytree of ShapeDtypeStructs with target shardings (see
            :func:`abstract_with_shardings`); arrays are restored onto those shardings, which
            may describe a different mesh than the one that saved.
          step: which step; default the newest one that restores (a damaged newer step is
            skipped with a warning). ``restored_step`` tells which.
          partial: restore only the subtrees present in ``abstract_state`` (e.g. the SAE
            parameters without the shuffle buffer saved beside them).

        Raises:
          FileNotFoundError: if there is no checkpoint.
          CorruptCheckpointError: no step restores (the message names each one's error).
        """
        if step is not None:
            out = self._restore(abstract_state, step, partial)
            self.restored_step = step
            return out
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        errors = []
        for i, s in enumerate(steps):
            # The newest step gets a second try: a transient read error must not make a
            # good step look damaged.
            out, error = self._try_restore(abstract_state, s, partial, tries=2 if i == 0 else 1)
            if error is None:
                if i:
                    damaged = steps[:i]
                    logging.warning("restored step %d of %s: the newer step(s) %s could not be "
                                    "read", s, self.directory, damaged)
                    if not self.read_only:
                        self._set_aside(damaged)
                self.restored_step = s
                return out
            errors.append(f"step {s}: {error}")
            logging.warning("checkpoint step %d in %s cannot be restored (%s); trying the "
                            "previous one", s, self.directory, error)
        raise CorruptCheckpointError(
            f"no checkpoint in {self.directory} can be restored (if the config changed the "
            f"arrays' shapes, e.g. sae.n_features or the data-parallel size of an on-the-fly "
            f"buffer, the run cannot resume with it): " + "; ".join(errors))

    def _try_restore(self, abstract_state: Any, step: int, partial: bool, tries: int
                     ) -> tuple[Any, str | None]:
        """(restored, None) or (None, error). In a multi-process run every process reaches
        the same verdict: a step counts as restored only if it restored everywhere."""
        out, error = None, None
        for _ in range(tries):
            try:
                out, error = self._restore(abstract_state, step, partial), None
            except Exception as e:  # noqa: BLE001 - reported; the caller falls back
                out, error = None, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            if jax.process_count() > 1:
                import numpy as np
                from jax.experimental import multihost_utils

                oks = multihost_utils.process_allgather(np.asarray([error is None]))
                if not bool(np.all(oks)):
                    out, error = None, error or "it failed to restore on another process"
            if error is None:
                break
        return out, error

    def _set_aside(self, steps: list[int]) -> None:
        """Renames damaged steps to ``<step>.damaged`` (kept for inspection, no longer listed),
        so that the resumed run can write those steps again. Every process reached the same
        verdict (:meth:`_try_restore`); process 0 renames and all wait for it."""
        if jax.process_index() == 0:
            for s in steps:
                src = os.path.join(self.directory, str(s))
                dst, n = f"{src}.damaged", 1
                while os.path.exists(dst):
                    dst, n = f"{src}.damaged{n}", n + 1
                os.rename(src, dst)
                logging.warning("moved the unreadable checkpoint step %d aside to %s", s, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("saejax_set_aside_damaged_steps")
        self._manager.reload()

    def _restore(self, abstract_state: Any, step: int, partial: bool) -> tuple[Any, dict, dict]:
        args = ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(
                item=abstract_state, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
            if partial else ocp.args.StandardRestore(abstract_state),
            DATA: ocp.args.JsonRestore(),
            METADATA: ocp.args.JsonRestore(),
        })
        out = self._manager.restore(step, args=args)
        return out[STATE], dict(out[DATA] or {}), dict(out[METADATA] or {})

    def restore_metadata(self, step: int | None = None) -> dict:
        """Only the JSON metadata of ``step`` (cheap, no arrays). Without a step: the newest
        step whose metadata reads (a damaged newer one is skipped with a warning);
        ``metadata_step`` tells which."""
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        for s in steps[:-1]:
            try:
                meta, self.metadata_step = self._metadata(s), s
                return meta
            except Exception as e:  # noqa: BLE001 - a damaged step: try the one before
                logging.warning("the metadata of checkpoint step %d in %s cannot be read "
                                "(%s: %s); trying the previous step", s, self.directory,
                                type(e).__name__, " ".join(str(e).split())[:300])
        meta, self.metadata_step = self._metadata(steps[-1]), steps[-1]
        return meta

    def _metadata(self, step: int) -> dict:
        out = self._manager.restore(step, args=ocp.args.Composite(
            **{METADATA: ocp.args.JsonRestore()}))
        return dict(out[METADATA] or {})

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StopSignal:
    """SIGTERM/SIGINT set a flag that a training loop checks between steps.

    The loop then saves a checkpoint of a whole step and exits; no step is left half done.
    Installed only on the main thread (signal handlers cannot be set elsewhere).
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def versions() -> dict[str, str]:
    """Library versions recorded in checkpoint metadata."""
    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "orbax": ocp.__version__}
