"""The host side of a training loop, shared by the LM and SAE trainers.

Both trainers run the same machinery around their jitted step:

* metrics are read on the host **one step late** (``HostMetrics.push`` fetches the previous
  step's device metrics while the device runs the current one), so the device never waits;
* every fetched step is checked for NaN/Inf (:func:`check_finite`) and a bad one stops the
  run with :class:`NonFiniteError`, naming the last good checkpoint;
* scalars are averaged over windows of ``log_every`` steps and reported with the
  throughput (tokens/s, timed from the end of the run's first step so compilation does
  not count);
* :func:`run_steps` owns the step loop: SIGTERM/SIGINT (``StopSignal``), the checkpoint
  cadence, synchronisation points (evaluation, resampling) at which every pending metric
  is checked first, and the final checkpoint.

Legend: none (host scalars only).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from saejax.checkpoint import StopSignal


class NonFiniteError(FloatingPointError):
    """The loss or a gradient was NaN/Inf; the message names the last good checkpoint."""


def check_finite(metrics: Mapping[str, Any], step: int, keys: tuple[str, ...] = ("loss",),
                 what: str = "loss or gradient") -> None:
    """Host-side guard: raises NonFiniteError if step ``step`` saw NaN/Inf.

    Args:
      metrics: host (or device) scalars of one step.
      step: the step's number (1-based: steps completed after it).
      keys: scalars that must be finite; a boolean ``nonfinite`` entry, when present, is
        the step's own verdict (the SAE step refuses such an update and keeps its state).
      what: how the message names the failure.
    """
    bad = bool(np.asarray(metrics.get("nonfinite", False)))
    values = {k: float(np.asarray(metrics[k])) for k in keys}
    if bad or not all(math.isfinite(v) for v in values.values()):
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        raise NonFiniteError(f"non-finite {what} at step {step} ({shown})")


def host_scalars(metrics: Mapping[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Fetches the scalar metrics of one step to the host (one transfer)."""
    return {k: float(v) for k, v in jax.device_get(
        {k: v for k, v in metrics.items() if k not in skip}).items()}


Report = Callable[[int, dict[str, float], dict[str, float], float], None]


class HostMetrics:
    """One-step-late reads, finiteness checks, window means and throughput.

    Args:
      log_every: window length in steps; a window also ends at step ``end``.
      end: the run's last step (``num_steps``; not an early stop, whose open window is
        saved with the checkpoint, :meth:`get_state`, and completed after the resume).
      tokens_per_step: tokens (or activation rows) one step consumes.
      report: ``(step, window_means, last_values, tokens_per_s)``, called at each window's
        end (write scalars, update the progress bar).
      on_nonfinite: called with the :class:`NonFiniteError`; must raise (e.g. after waiting
        for pending checkpoints, with the last good step in the message).
      finite_keys: scalars checked by :func:`check_finite`.
      what: the failure's name in the error message.
      skip: per-feature (non-scalar) metrics that stay on the device.
      fetch: reads one step's device metrics into host scalars (default
        :func:`host_scalars` without ``skip``; a sweep names each member's scalars).
    """

    def __init__(self, *, log_every: int, end: int, tokens_per_step: int, report: Report,
                 on_nonfinite: Callable[[NonFiniteError], None],
                 finite_keys: tuple[str, ...] = ("loss",), what: str = "loss or gradient",
                 skip: tuple[str, ...] = (),
                 fetch: Callable[[Any], dict[str, float]] | None = None):
        self.log_every, self.end, self.tokens_per_step = log_every, end, tokens_per_step
        self._report, self._on_nonfinite = report, on_nonfinite
        self._keys, self._what = finite_keys, what
        self._fetch = fetch or (lambda metrics: host_scalars(metrics, skip))
        self._pending: tuple[int, Any] | None = None
        self._sum: dict[str, float] = {}
        self._n = 0
        self._timed = 0
        self._t: float | None = None
        self.last: dict[str, float] = {}
        self.tokens_per_s = 0.0

    def push(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Queues step ``step``'s (0-based) device metrics; consumes the previous step's."""
        if self._pending is not None:
            self._consume(*self._pending)
        self._pending = (step, metrics)

    def get_state(self) -> dict:
        """The open window's sums (JSON), saved with a checkpoint so that a resumed run
        reports the same window means as an uninterrupted one."""
        return {"sum": dict(self._sum), "n": self._n}

    def set_state(self, state: dict) -> None:
        self._sum, self._n = dict(state["sum"]), int(state["n"])

    def flush(self) -> None:
        """Consumes the pending step now (before a checkpoint, evaluation or resample)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._consume(*pending)

    def _consume(self, step: int, metrics: Mapping[str, Any]) -> None:
        m = self._fetch(metrics)
        try:
            check_finite(m, step + 1, self._keys, self._what)
        except NonFiniteError as e:
            self._on_nonfinite(e)
            raise
        self.last = m
        for k, v in m.items():
            self._sum[k] = self._sum.get(k, 0.0) + v
        self._n += 1
        now = time.perf_counter()
        if self._t is None:
            self._t = now  # the first step of this run includes compilation: not timed
        else:
            self._timed += 1
        done = step + 1
        if done % self.log_every == 0 or done == self.end:
            if self._timed:
                self.tokens_per_s = self._timed * self.tokens_per_step / (now - self._t)
            means = {k: v / self._n for k, v in self._sum.items() if k != "nonfinite"}
            self._report(done, means, m, self.tokens_per_s)
            self._sum, self._n, self._timed, self._t = {}, 0, 0, now


@dataclasses.dataclass
class LoopResult:
    final_step: int
    interrupted: str | None  # the signal's name when SIGTERM/SIGINT stopped the run


def run_steps(start: int, end: int, *, step: Callable[[int], Any], metrics: HostMetrics,
              checkpoint_every: int, save: Callable[[int], None],
              saved_steps: Callable[[], list[int]], current_step: Callable[[], int],
              sync_at: Callable[[int], bool] = lambda done: False,
              at_sync: Callable[[int], None] = lambda done: None) -> LoopResult:
    """Runs steps ``start .. end - 1`` with checkpoints, sync points and signal handling.

    Args:
      start, end: step range (0-based step indices; ``done = step + 1`` after each).
      step: runs one step (updates the trainer's state) and returns its device metrics.
      metrics: the run's :class:`HostMetrics`.
      checkpoint_every: save after every multiple of this many steps.
      save: saves a checkpoint of the current state labelled with a step number.
      saved_steps: the steps that already have a checkpoint.
      current_step: the state's step counter (read once, at the end).
      sync_at: True after steps where ``at_sync`` runs (evaluation, resampling).
      at_sync: work on checked state; runs before that step's checkpoint.

    Returns:
      The final step and, if a signal stopped the run, its name. A checkpoint of the
      final step always exists afterwards.
    """
    with StopSignal() as stop:
        for i in range(start, end):
            if stop.signum is not None:
                break
            metrics.push(i, step(i))
            done = i + 1
            checkpoint = done % checkpoint_every == 0
            if checkpoint or sync_at(done):
                metrics.flush()  # never evaluate, resample or save unchecked state
                at_sync(done)
                if checkpoint:
                    save(done)
        metrics.flush()
        final = current_step()
        interrupted = None
        if stop.signum is not None:
            interrupted = signal.Signals(stop.signum).name
            logging.warning("%s received: saving a checkpoint at step %d before exit",
                            interrupted, final)
        if final not in saved_steps():
            save(final)
    return LoopResult(final, interrupted)
