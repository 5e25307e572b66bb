"""Metric writers: TensorBoard event files, a metrics JSONL file, and a console progress bar.

Only jax process 0 writes; on other processes every writer is a no-op, so training loops call
them unconditionally. Values must already be host scalars (read one step late by the loop so
the device never waits).

    writer = MetricWriter(workdir)                 # events.out.tfevents.* + metrics.jsonl
    writer.write_scalars(step, {"train/loss": 3.1, "train/lr": 1e-3})
    bar = ProgressBar(total_steps, start_step=step)
    bar.update(step, {"loss": 3.1, "tok/s": 2.5e5})
    writer.close(); bar.close()
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO

import jax


def is_writer_process() -> bool:
    return jax.process_index() == 0


def _finite_or_str(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf


class JsonlWriter:
    """Appends one JSON object per ``write_scalars`` call: ``{"step": s, "time": t, ...}``.

    ``resume_step``: the step a run restarts from. Records after it (written by the run
    that died before its next checkpoint committed, and about to be written again) and a
    line cut by a crash are removed first, so a resumed run's file ends up equal, step for
    step, to the uninterrupted run's. The loop calls :meth:`flush` before every checkpoint.
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None):
        self.path = os.fspath(path)
        self._f: TextIO | None = None
        if is_writer_process():
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            if resume_step is not None and os.path.isfile(self.path):
                _truncate_after(self.path, resume_step)
            self._f = open(self.path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._f is None:
            return
        record = {"step": int(step), "time": time.time()}
        record.update({k: _finite_or_str(float(v)) for k, v in scalars.items()})
        self._f.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        """Writes buffered records through to the file (durable against a SIGKILL)."""
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _truncate_after(path: str, step: int) -> None:
    """Keeps the whole JSON records of ``path`` whose step is <= ``step`` (atomically)."""
    keep = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(record, dict) and isinstance(record.get("step"), int) \
                    and record["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TensorBoardWriter:
    """TensorBoard scalar (and histogram) event files via tensorboardX.

    ``resume_step``: TensorBoard drops the events logged after it by the run that died
    (tensorboardX's ``purge_step``).
    """

    def __init__(self, logdir: str | os.PathLike, *, resume_step: int | None = None):
        self._w = None
        self._logdir = os.fspath(logdir)
        if is_writer_process():
            purge = None if resume_step is None else resume_step + 1
            self._w = self._open(purge)

    def _open(self, purge_step: int | None = None):
        from tensorboardX import SummaryWriter  # only the writing process needs it

        return SummaryWriter(logdir=self._logdir, flush_secs=10, purge_step=purge_step)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._w is None:
            return
        for k, v in scalars.items():
            self._w.add_scalar(k, float(v), global_step=int(step))

    def write_histogram(self, step: int, name: str, values) -> None:
        if self._w is not None:
            self._w.add_histogram(name, values, global_step=int(step))

    def flush(self) -> None:
        """Writes every queued event to disk. tensorboardX's own ``flush`` leaves the events
        still in its writer thread's queue; closing drains it, and the next event goes to
        a new events file in the same directory (TensorBoard reads them all)."""
        if self._w is not None:
            self._w.close()
            self._w = self._open()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


class MetricWriter:
    """TensorBoard events in ``logdir`` plus ``logdir/metrics.jsonl``; the loop's one writer.

    ``resume_step``: the step the run (re)starts from; what a dead run logged after it is
    dropped (see :class:`JsonlWriter`). None keeps everything.
    """

    def __init__(self, logdir: str | os.PathLike, *, tensorboard: bool = True,
                 jsonl: bool = True, resume_step: int | None = None):
        self.logdir = os.fspath(logdir)
        self._writers = []
        if tensorboard:
            self._writers.append(TensorBoardWriter(self.logdir, resume_step=resume_step))
        if jsonl:
            self._writers.append(JsonlWriter(os.path.join(self.logdir, "metrics.jsonl"),
                                             resume_step=resume_step))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for w in self._writers:
            w.write_scalars(step, scalars)

    def write_histogram(self, step: int, name: str, values) -> None:
        for w in self._writers:
            if isinstance(w, TensorBoardWriter):
                w.write_histogram(step, name, values)

    def flush(self) -> None:
        for w in self._writers:
            w.flush()

    def close(self) -> None:
        for w in self._writers:
            w.close()


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _fmt_value(v: float) -> str:
    a = abs(v)
    if a != 0 and (a >= 1e5 or a < 1e-3):
        return f"{v:.3g}"
    return f"{v:.4g}"


class ProgressBar:
    """One console line: ``[####....] step/total  loss 3.10  tok/s 2.5e+05  ETA 01:23``.

    Redraws in place on a terminal; elsewhere (logs, CI) prints a plain line at most every
    ``min_interval_s`` seconds. ETA comes from the step rate since construction.
    """

    def __init__(self, total_steps: int, *, start_step: int = 0, width: int = 24,
                 stream: TextIO | None = None, min_interval_s: float = 5.0,
                 enabled: bool = True):
        self.total = total_steps
        self.start_step = start_step
        self.width = width
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval_s = 0.0 if self.tty else min_interval_s
        self.enabled = enabled and is_writer_process()
        self._t0 = time.perf_counter()
        self._last = -math.inf
        self.last_line = ""

    def line(self, step: int, values: Mapping[str, float], now: float | None = None) -> str:
        frac = min(max(step / self.total, 0.0), 1.0) if self.total else 1.0
        filled = int(round(frac * self.width))
        elapsed = (time.perf_counter() if now is None else now) - self._t0
        done = step - self.start_step
        eta = (self.total - step) * elapsed / done if done > 0 else math.inf
        parts = [f"[{'#' * filled}{'.' * (self.width - filled)}] {step}/{self.total}"]
        parts += [f"{k} {_fmt_value(float(v))}" for k, v in values.items()]
        parts.append(f"ETA {_fmt_time(eta)}")
        return "  ".join(parts)

    def update(self, step: int, values: Mapping[str, float], *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.min_interval_s and step < self.total:
            return
        self._last = now
        self.last_line = self.line(step, values, now)
        if self.tty:
            self.stream.write("\r" + self.last_line + "\x1b[K")
        else:
            self.stream.write(self.last_line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class _QuietOrbax(std_logging.Filter):
    """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint); keeps warnings."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax_logs() -> None:
    """Installs :class:`_QuietOrbax` on absl's handler (launch scripts call it once)."""
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(_QuietOrbax())
