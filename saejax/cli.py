"""Launch-script plumbing: one clear line for every error, exit codes, --verbose.

Every script in ``launch/`` runs its ``main`` through :func:`run`:

* a usage or config error (a bad flag, an unknown ``--config.x`` field, a
  :class:`~saejax.config.ConfigError`) prints ``prog: <what is wrong>`` on one line and
  exits with code 2;
* any other failure (a store or checkpoint problem, a missing file, a full disk, a
  non-finite loss, ...) prints one line the same way and exits with code 1; an exception
  that is not one of saejax's own or the system's says it is internal;
* the traceback is printed only with ``--verbose``;
* in a multi-process run the failing process exits at once (no hang at jax's shutdown
  barrier waiting for processes that will never arrive; :func:`saejax.parallel.exit_with_error`).
"""

from __future__ import annotations

import errno
import json
import logging as std_logging
import os
import re
import sys
import traceback
import zipfile
from collections.abc import Callable

from absl import app, flags

from saejax.config import ConfigError

USAGE_EXIT, RUNTIME_EXIT = 2, 1

_VERBOSE = flags.DEFINE_bool("verbose", False, "on an error, print its traceback too "
                             "(default: one line)")


class UsageError(ConfigError):
    """The flags of a launch script do not fit together (exit code 2)."""


def define_allow_changes() -> flags.FlagHolder:
    """The training scripts' ``--allow_changes`` flag."""
    return flags.DEFINE_list(
        "allow_changes", [], "config fields (or sections) that may differ from the "
        "checkpoint's when resuming, e.g. num_steps,eval.every; the run's record keeps each "
        "change with its step")


def _saejax_errors() -> tuple[type[BaseException], ...]:
    from saejax.checkpoint import CorruptCheckpointError
    from saejax.data.sources import CorpusError
    from saejax.data.token_store import StoreError
    from saejax.loop import NonFiniteError

    return (ConfigError, StoreError, CorpusError, NonFiniteError, CorruptCheckpointError,
            FileNotFoundError, OSError, zipfile.BadZipFile, json.JSONDecodeError, ValueError,
            KeyError)


def describe(error: BaseException) -> str:
    """One line for ``error``: its message, with what kind of failure it is when useful."""
    msg = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, KeyError):
        msg = f"unknown key {msg}"
    disk_full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) \
        or "No space left on device" in msg  # tensorstore / orbax report it as text
    if disk_full:
        return (f"no space left on the device ({msg[:300]}); the last complete checkpoint is "
                f"intact: free some space and re-run the same command to resume")
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        msg = f"cannot write or read a file ({msg}); check the paths' permissions"
    if not isinstance(error, _saejax_errors()):
        msg = f"internal error: {type(error).__name__}: {msg}"
    return msg


def exit_code(error: BaseException) -> int:
    """2 for usage and config errors (also: a different store in the way of an output
    directory, which a config field names), 1 for runtime failures."""
    from saejax.data.token_store import StoreExistsError

    return USAGE_EXIT if isinstance(error, (ConfigError, StoreExistsError)) else RUNTIME_EXIT


def _save_traceback(prog: str) -> str | None:
    """Writes the current traceback to a file in the system's temp directory; its path."""
    import tempfile

    try:
        fd, path = tempfile.mkstemp(prefix=f"saejax-{prog}-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            traceback.print_exc(file=f)
        return path
    except OSError:  # e.g. a full disk: the one line still goes out
        return None


def _flag_error(error: BaseException, argv: list[str]) -> str:
    """One line for an error raised while parsing flags (ml_collections raises plain
    AttributeError / KeyError / TypeError for a bad ``--config.x`` override)."""
    msg = str(error)
    if isinstance(error, (AttributeError, KeyError)):
        msg = msg.strip("'\"").replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
        key = re.search(r"'([^']+)'", msg)
        arg = next((a for a in argv[1:] if key and re.search(rf"[.]{re.escape(key.group(1))}\b", a)),
                   None)
        msg = (f"flag {arg.split('=')[0]} names an unknown config field: {msg}" if arg
               else f"unknown config field: {msg}")
    return " ".join(msg.split())


def _parse_flags(prog: str) -> Callable[[list[str]], list[str]]:
    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv)
            for name in list(flags.FLAGS):  # a config file that failed to load fails here
                value = flags.FLAGS[name].value
                if type(value).__name__ == "_ErrorConfig":  # ml_collections' placeholder
                    value.to_dict()  # raises its IOError
            return rest
        except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError,
                SyntaxError, ImportError) as e:
            sys.stderr.write(f"{prog}: {_flag_error(e, argv)} (--helpfull lists the flags)\n")
            sys.exit(USAGE_EXIT)
    return parse


class _NoTracebacks(std_logging.Filter):
    """Drops the traceback of library log records (orbax logs one per failed background
    write thread); the message stays. ``--verbose`` keeps them."""

    def filter(self, record):
        if not _VERBOSE.value and record.exc_info:
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_unraisable(unraisable) -> None:
    """Background threads of the checkpoint writer that outlive their event loop after a
    failed write report 'Event loop is closed' as unraisable; those are dropped (unless
    --verbose), everything else is reported as usual."""
    closed_loop = isinstance(unraisable.exc_value, RuntimeError) and \
        "Event loop is closed" in str(unraisable.exc_value)
    if _VERBOSE.value or not closed_loop:
        sys.__unraisablehook__(unraisable)


def run(prog: str, main: Callable[[list[str]], None]) -> None:
    """``absl.app.run(main)`` with saejax's error handling (see the module docstring)."""
    from absl import logging as absl_logging

    from saejax import parallel

    def wrapped(argv):
        absl_logging.get_absl_handler().addFilter(_NoTracebacks())
        sys.unraisablehook = _quiet_unraisable
        try:
            return main(argv)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as e:  # noqa: BLE001 - every error becomes one line
            if _VERBOSE.value:
                traceback.print_exc()
            line = describe(e)
            if not _VERBOSE.value and line.startswith("internal error"):
                where = _save_traceback(prog)
                line += f" (traceback in {where}; --verbose prints it)" if where else ""
            parallel.exit_with_error(prog, line, code=exit_code(e))

    app.run(wrapped, flags_parser=_parse_flags(prog))
