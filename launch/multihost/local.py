"""Runs a saejax launch script as N jax processes on this machine (multi-host, simulated).

    python launch/multihost/local.py --num_processes=2 --devices_per_process=2 -- \\
        launch/train_lm.py --config=experiments/lm_tiny.py --config.store_dir=runs/corpus/stdlib \\
        --config.model.max_len=128 --config.workdir=/tmp/lm_2proc

starts N copies of the script on 127.0.0.1, each a separate jax process with K fake CPU
devices (``JAX_PLATFORMS=cpu``, ``JAX_NUM_CPU_DEVICES=K`` and the equivalent
``XLA_FLAGS=--xla_force_host_platform_device_count=K``), and appends to process i's
arguments::

    --config.distributed.enabled=true --config.distributed.coordinator_address=127.0.0.1:P
    --config.distributed.num_processes=N --config.distributed.process_id=i

so ``saejax.parallel.initialize_distributed`` calls ``jax.distributed.initialize`` with them.
Every output line is prefixed ``[p<i>]``. If a process exits non-zero (or is killed), the
others get ``--grace`` seconds to finish, are then terminated (SIGTERM, then SIGKILL), and
the runner exits non-zero naming the process and its exit code; ``--timeout`` bounds the
whole run (exit 124). ``--dry-run`` prints the commands and environment instead.

A first word ending in ``.py`` runs with this Python (``sys.executable``); anything else
(``python -m ...``, a binary) runs as given. Cross-process CPU collectives use gloo, the
default ``jax_cpu_collectives_implementation`` of jax 0.10.2 (built into jaxlib), so the
scripts need no extra configuration.

A process that calls ``sys.exit`` (or raises) after ``jax.distributed.initialize`` while
the others keep running does not exit: jax's exit-time shutdown waits at a barrier for all
processes (300 s by default). saejax's launch scripts avoid that by exiting hard on any
error in multi-process runs (``saejax.cli.run`` through ``saejax.parallel.exit_with_error``); for other scripts only
``--timeout`` ends such a run early. Processes that die, or exit through ``os._exit``, are
seen at once.

Import and call :func:`run` (it returns the exit codes) to use the runner from tests.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

DEFAULT_FLAG_PREFIX = "--config.distributed"
TIMEOUT_EXIT = 124


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the coordinator binds it shortly after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_env(devices_per_process: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of each process: CPU platform with K fake devices, unbuffered output."""
    env = dict(os.environ if base is None else base)
    xla = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
    xla.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    env["XLA_FLAGS"] = " ".join(xla)
    # jax reads every config option from the upper-cased env var; jax_num_cpu_devices wins
    # over the XLA flag when both are set, and setting both keeps older jax versions working.
    env["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def distributed_flags(process_id: int, num_processes: int, coordinator: str,
                      prefix: str = DEFAULT_FLAG_PREFIX) -> list[str]:
    return [f"{prefix}.enabled=true", f"{prefix}.coordinator_address={coordinator}",
            f"{prefix}.num_processes={num_processes}", f"{prefix}.process_id={process_id}"]


def build_commands(command: Sequence[str], num_processes: int, coordinator: str,
                   prefix: str = DEFAULT_FLAG_PREFIX, python: str | None = None) -> list[list[str]]:
    """The argv of each process."""
    if not command:
        raise ValueError("no command given (put it after '--')")
    base = list(command)
    if base[0].endswith(".py"):
        base = [python or sys.executable] + base
    return [base + distributed_flags(i, num_processes, coordinator, prefix) for i in range(num_processes)]


_ENV_SHOWN = ("JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES", "XLA_FLAGS", "PYTHONUNBUFFERED")


def format_command(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """A shell line reproducing one process: the env vars the runner sets, then argv."""
    assigns = [f"{k}={shlex.quote(env[k])}" for k in _ENV_SHOWN]
    return " ".join(assigns + [shlex.join(argv)])


def _pump(stream, tag: str, out: TextIO, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            out.write(f"{tag} {line}" if line.endswith("\n") else f"{tag} {line}\n")
            out.flush()
    stream.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    # Each child leads its own process group (start_new_session), so this reaches the
    # script and anything it spawned, and nothing else.
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(procs: Sequence[subprocess.Popen], term_wait: float) -> None:
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + term_wait
    while time.monotonic() < deadline and any(p.poll() is None for p in live):
        time.sleep(0.05)
    for p in live:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
    for p in live:
        p.wait()


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class ExitCodes(list):
    """The exit code of each process (a list of int).

    Attributes:
      timed_out: the run hit its timeout and every process was stopped.
      failed: index of the first process seen to fail, or None.
    """

    timed_out: bool = False
    failed: int | None = None


def run(command: Sequence[str], num_processes: int = 2, devices_per_process: int = 1, *,
        port: int | None = None, host: str = "127.0.0.1", timeout: float | None = None,
        grace: float = 5.0, term_wait: float = 5.0, dry_run: bool = False,
        flag_prefix: str = DEFAULT_FLAG_PREFIX, python: str | None = None,
        env: Mapping[str, str] | None = None, cwd: str | None = None,
        out: TextIO | None = None, err: TextIO | None = None) -> ExitCodes:
    """Runs ``command`` as ``num_processes`` jax processes and waits for all of them.

    Args:
      command: the script and its arguments (a first word ending in .py runs with
        ``python``, default ``sys.executable``).
      num_processes: N jax processes.
      devices_per_process: K fake CPU devices per process.
      port: coordinator port on ``host`` (default: a free one).
      host: coordinator host.
      timeout: seconds for the whole run; past it every process is stopped.
      grace: seconds the other processes get to exit by themselves after one failed.
      term_wait: seconds between SIGTERM and SIGKILL when stopping processes.
      dry_run: print the commands (with the environment) and run nothing.
      flag_prefix: prefix of the distributed flags (``--config.distributed``).
      python: interpreter for ``.py`` scripts.
      env: base environment (default ``os.environ``).
      cwd: working directory of the processes.
      out, err: where prefixed output and the runner's messages go (stdout/stderr).

    Returns:
      :class:`ExitCodes`, the exit code of every process (negative: killed by that
      signal, as ``Popen``; all zeros for a dry run) with ``.timed_out``. A message on
      ``err`` names the first process that failed (or says the run timed out).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError("num_processes and devices_per_process must be >= 1")
    port = port or free_port(host)
    coordinator = f"{host}:{port}"
    argvs = build_commands(command, num_processes, coordinator, flag_prefix, python)
    penv = process_env(devices_per_process, env)
    if dry_run:
        for i, argv in enumerate(argvs):
            out.write(f"[p{i}] {format_command(argv, penv)}\n")
        out.flush()
        return ExitCodes([0] * num_processes)

    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    start = time.monotonic()
    failed: tuple[int, int] | None = None
    timed_out = False
    try:
        for i, argv in enumerate(argvs):
            p = subprocess.Popen(argv, env=penv, cwd=cwd, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 errors="replace", bufsize=1, start_new_session=True)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}]", out, lock), daemon=True)
            t.start()
            pumps.append(t)
        kill_at = None
        while [p.poll() for p in procs].count(None):  # poll every process, no short-circuit
            now = time.monotonic()
            if failed is None:
                for i, p in enumerate(procs):
                    if p.returncode not in (None, 0):
                        failed = (i, p.returncode)
                        kill_at = now + grace
                        with lock:
                            err.write(f"local.py: process {i} failed ({describe(p.returncode)}); "
                                      f"stopping the others in {grace:g} s\n")
                        break
            if timeout is not None and now - start > timeout:
                timed_out = True
                break
            if kill_at is not None and now >= kill_at:
                break
            time.sleep(0.05)
    finally:
        # Also reached on KeyboardInterrupt/SystemExit: never leave processes behind.
        _stop(procs, term_wait)
        for t in pumps:
            t.join(timeout=5)

    codes = ExitCodes(p.returncode for p in procs)
    if failed is None and not timed_out:  # processes that failed as the loop ended
        failed = next(((i, c) for i, c in enumerate(codes) if c != 0), None)
    codes.timed_out = timed_out
    codes.failed = failed[0] if failed is not None else None
    if timed_out:
        err.write(f"local.py: timed out after {timeout:g} s; stopped all processes "
                  f"(exit codes {codes})\n")
    elif failed is not None:
        i, c = failed
        err.write(f"local.py: process {i} of {num_processes} failed ({describe(c)}) "
                  f"(exit codes {codes})\n")
    err.flush()
    return codes


def exit_status(codes: ExitCodes) -> int:
    """The runner's exit status: 0, 124 on timeout, else the failed process's code (or 1)."""
    if codes.timed_out:
        return TIMEOUT_EXIT
    if codes.failed is None:
        return 0
    c = codes[codes.failed]
    return c if 0 < c < 256 else 1


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(
        prog="local.py", description=__doc__.split("\n\n")[0],
        usage="local.py --num_processes N --devices_per_process K [options] -- SCRIPT [ARGS...]")
    ap.add_argument("--num_processes", "-n", type=int, required=True)
    ap.add_argument("--devices_per_process", "-k", type=int, default=1)
    ap.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds for the whole run")
    ap.add_argument("--grace", type=float, default=5.0,
                    help="seconds the others get after a process fails")
    ap.add_argument("--term_wait", type=float, default=5.0,
                    help="seconds between SIGTERM and SIGKILL when stopping processes")
    ap.add_argument("--flag_prefix", default=DEFAULT_FLAG_PREFIX,
                    help="prefix of the appended distributed flags")
    ap.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true")
    return ap.parse_args(argv[:split]), argv[split + 1:]


def main(argv: Sequence[str] | None = None) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    if not command:
        raise SystemExit("local.py: no command; put the script and its arguments after '--'")
    # SIGTERM to the runner stops the children too (the finally in run()).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    codes = run(command, args.num_processes, args.devices_per_process, port=args.port,
                timeout=args.timeout, grace=args.grace, term_wait=args.term_wait,
                dry_run=args.dry_run,
                flag_prefix=args.flag_prefix)
    return exit_status(codes)


if __name__ == "__main__":
    sys.exit(main())
