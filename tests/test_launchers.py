"""Multi-host launchers: the local multi-process runner (for real, 2 jax processes x 2 CPU
devices), the TPU-pod and SLURM scripts (shellcheck + dry runs), and the memory table."""

from __future__ import annotations

import importlib.util
import io
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MULTIHOST = ROOT / "launch" / "multihost"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


local = _load("saejax_multihost_local", MULTIHOST / "local.py")

# A worker that reads the runner's --config.distributed.* flags by hand, joins the jax
# cluster and sums a global array built from every process's local rows. PROBE_FAIL_* make
# one process fail in a chosen way; the healthy ones then block in a collective.
PROBE = textwrap.dedent('''
    import os, signal, sys
    import jax

    flags = dict(a[len("--config.distributed."):].split("=", 1) for a in sys.argv[1:]
                 if a.startswith("--config.distributed."))
    assert flags["enabled"] == "true", flags
    pid, n = int(flags["process_id"]), int(flags["num_processes"])
    fail_pid = int(os.environ.get("PROBE_FAIL_PROCESS", "-1"))
    mode = os.environ.get("PROBE_FAIL_MODE", "")
    if pid == fail_pid and mode == "exit_before_init":
        sys.exit(3)
    jax.distributed.initialize(coordinator_address=flags["coordinator_address"],
                               num_processes=n, process_id=pid)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))
    k = jax.local_device_count()
    total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))
    rows = np.arange(pid * k, (pid + 1) * k, dtype=np.float32) ** 2
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), rows, (n * k,))
    s = float(total(x))
    print(f"RESULT index={jax.process_index()} count={jax.process_count()} "
          f"devices={jax.device_count()} local={k} sum={s}", flush=True)
    if pid == fail_pid:
        if mode == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "os_exit":
            os._exit(3)
        if mode == "sys_exit":  # jax's exit-time shutdown barrier then waits for the others
            sys.exit(3)
    if fail_pid >= 0:
        print("BLOCKING", flush=True)
        float(total(x))  # a collective the failed process never joins
''')


@pytest.fixture
def probe(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return path


def _env(**extra):
    env = dict(os.environ)
    env.update(extra)
    return env


def _run(probe, **kw):
    out, err = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    codes = local.run([str(probe)], num_processes=2, devices_per_process=2, out=out, err=err,
                      **kw)
    return codes, out.getvalue(), err.getvalue(), time.monotonic() - t0


def test_local_runner_two_processes_cross_process_sum(probe):
    codes, out, err, _ = _run(probe, timeout=60, env=_env())
    assert list(codes) == [0, 0], out + err
    assert codes.failed is None and not codes.timed_out
    expected = float(sum(i * i for i in range(4)))
    for i in range(2):
        line = f"[p{i}] RESULT index={i} count=2 devices=4 local=2 sum={expected}"
        assert line in out.splitlines(), out + err
    assert local.exit_status(codes) == 0


@pytest.mark.parametrize("mode,code", [("exit_before_init", 3), ("sigkill", -9), ("os_exit", 3)])
def test_local_runner_one_failure_stops_the_others(probe, mode, code):
    codes, out, err, elapsed = _run(probe, timeout=60, grace=1, term_wait=2,
                                    env=_env(PROBE_FAIL_PROCESS="1", PROBE_FAIL_MODE=mode))
    assert elapsed < 30, f"runner took {elapsed:.1f} s\n{out}{err}"
    assert codes.failed == 1 and codes[1] == code and codes[0] != 0, (codes, out, err)
    assert not codes.timed_out
    assert "process 1 of 2 failed" in err and local.describe(code) in err
    assert local.exit_status(codes) == (3 if code == 3 else 1)


def test_local_runner_timeout_bounds_a_hang(probe):
    # sys.exit after jax.distributed.initialize hangs in jax's shutdown barrier (up to its
    # 300 s shutdown timeout) while the other process blocks in a collective: only
    # --timeout ends this, and it must.
    codes, out, err, elapsed = _run(probe, timeout=8, grace=1, term_wait=2,
                                    env=_env(PROBE_FAIL_PROCESS="1", PROBE_FAIL_MODE="sys_exit"))
    assert codes.timed_out and local.exit_status(codes) == local.TIMEOUT_EXIT
    assert elapsed < 20, elapsed
    assert "timed out after 8 s" in err
    assert all(c < 0 for c in codes), codes  # both were still running and were stopped


def test_local_runner_cli_dry_run_and_exit_code(tmp_path):
    cmd = [sys.executable, str(MULTIHOST / "local.py"), "--num_processes=3",
           "--devices_per_process=4", "--port=23456", "--dry-run", "--", "launch/train_sae.py",
           "--config=experiments/sae_tiny.py"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert line.startswith(f"[p{i}] JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=4 ")
        assert "--xla_force_host_platform_device_count=4" in line
        argv = shlex.split(line.split(" ", 1)[1])
        i_py = argv.index("launch/train_sae.py")
        assert argv[i_py - 1] == sys.executable
        assert argv[i_py + 1:] == [
            "--config=experiments/sae_tiny.py", "--config.distributed.enabled=true",
            "--config.distributed.coordinator_address=127.0.0.1:23456",
            "--config.distributed.num_processes=3", f"--config.distributed.process_id={i}"]

    # A real (jax-free) run through the CLI: the exit code of the failing process comes back.
    script = tmp_path / "fail.py"
    script.write_text("import sys\nprint('hello', flush=True)\n"
                      "sys.exit(5 if sys.argv[-1].endswith('=1') else 0)\n")
    res = subprocess.run([sys.executable, str(MULTIHOST / "local.py"), "-n", "2", "--grace=1",
                          "--", str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 5, (res.stdout, res.stderr)
    assert "[p0] hello" in res.stdout and "[p1] hello" in res.stdout
    assert "process 1 of 2 failed (exit code 5)" in res.stderr


def test_local_runner_flags_parse_as_absl_config_overrides(tmp_path):
    # The appended flags are valid ml_collections overrides of a launch script's config and
    # build saejax's DistributedConfig (no jax needed: absl + config_flags only).
    (tmp_path / "cfg.py").write_text(textwrap.dedent('''
        import ml_collections
        def get_config():
            c = ml_collections.ConfigDict()
            c.distributed = ml_collections.ConfigDict(dict(
                enabled=False, coordinator_address=ml_collections.FieldReference(None, str),
                num_processes=ml_collections.FieldReference(None, int),
                process_id=ml_collections.FieldReference(None, int)))
            return c
    '''))
    (tmp_path / "script.py").write_text(textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from absl import app
        from ml_collections import config_flags
        from saejax.config import DistributedConfig, from_config
        _C = config_flags.DEFINE_config_file("config")
        def main(argv):
            print(from_config(DistributedConfig, _C.value.distributed))
        app.run(main)
    '''))
    out, err = io.StringIO(), io.StringIO()
    codes = local.run([str(tmp_path / "script.py"), f"--config={tmp_path / 'cfg.py'}"],
                      num_processes=2, port=12345, timeout=60, out=out, err=err)
    assert list(codes) == [0, 0], out.getvalue() + err.getvalue()
    for i in range(2):
        assert (f"[p{i}] DistributedConfig(enabled=True, coordinator_address='127.0.0.1:12345', "
                f"num_processes=2, process_id={i}, heartbeat_timeout_s=100)") in out.getvalue().splitlines()


def test_process_env_overrides_device_count():
    env = local.process_env(2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1"})
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"
    assert env["JAX_NUM_CPU_DEVICES"] == "2" and env["JAX_PLATFORMS"] == "cpu"


# ---------------------------------------------------------------- shell scripts

SHELL_SCRIPTS = [MULTIHOST / "tpu_pod.sh", MULTIHOST / "slurm.sbatch"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install -y shellcheck)")
    res = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def _bash(args, env=None, **kw):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_"))}
    base.update(env or {})
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=30,
                          env=base, cwd=ROOT, **kw)


def test_tpu_pod_dry_run(tmp_path):
    res = _bash([str(MULTIHOST / "tpu_pod.sh"), "--tpu=my-tpu", "--zone=us-central2-b",
                 "--setup", "--repo=https://example.com/saejax.git", "--ref=v1", "--dir=work",
                 "--dry-run", "--", "launch/train_sae.py", "--config=experiments/sae_paper.py",
                 "--config.workdir=gs://bucket/it's a run"])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2, res.stdout
    prefix = "gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --worker=all "
    assert all(line.startswith(prefix + "'--command=") for line in lines), res.stdout
    assert "git clone https://example.com/saejax.git work" in lines[0]
    assert "git fetch --quiet origin v1" in lines[0] and "jax\\[tpu\\]" in lines[0]
    assert "exec .venv/bin/python launch/train_sae.py --config=experiments/sae_paper.py" in lines[1]
    assert lines[1].endswith(" --config.distributed.enabled=true'")

    # Round trip: the printed line, run by bash with a gcloud that runs --command locally
    # (HOME=tmp_path, a fake .venv/bin/python), delivers the exact argv to the worker.
    work = tmp_path / "work" / ".venv" / "bin"
    work.mkdir(parents=True)
    (work / "python").write_text("#!/bin/sh\nfor a in \"$@\"; do echo \"ARG:$a\"; done\n")
    (work / "python").chmod(0o755)
    shim = 'gcloud() { for a in "$@"; do case "$a" in --command=*) bash -c "${a#--command=}";; esac; done; }\n'
    syntax = shim.replace('bash -c "${a#--command=}"', 'bash -n -c "${a#--command=}"')
    res1 = _bash(["-c", syntax + lines[0]])  # the set-up command parses as bash
    assert res1.returncode == 0, res1.stderr
    res2 = _bash(["-c", shim + lines[1]], env={"HOME": str(tmp_path)})
    assert res2.returncode == 0, res2.stderr
    assert res2.stdout.splitlines() == [
        "ARG:launch/train_sae.py", "ARG:--config=experiments/sae_paper.py",
        "ARG:--config.workdir=gs://bucket/it's a run", "ARG:--config.distributed.enabled=true"]


def test_tpu_pod_usage_errors():
    res = _bash([str(MULTIHOST / "tpu_pod.sh"), "--zone=z", "launch/train_sae.py"])
    assert res.returncode == 2 and "--tpu (TPU_NAME) is required" in res.stderr
    assert "Usage:" in res.stderr
    res = _bash([str(MULTIHOST / "tpu_pod.sh"), "--help"])
    assert res.returncode == 0 and "Usage:" in res.stdout
    res = _bash([str(MULTIHOST / "tpu_pod.sh"), "--setup", "x.py"], env={"TPU_NAME": "t", "ZONE": "z"})
    assert res.returncode == 2 and "--setup needs --repo" in res.stderr


def test_slurm_dry_run_one_process_per_node():
    res = _bash([str(MULTIHOST / "slurm.sbatch"), "--dry-run", "--config=experiments/sae_paper.py",
                 "--config.sae.n_features=131072"], env={"NODES": "4", "GPUS_PER_NODE": "8"})
    assert res.returncode == 0, res.stderr
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in res.stdout
    assert ("srun --kill-on-bad-exit=1 --gpu-bind=none --nodes=4 --ntasks-per-node=1 "
            ".venv/bin/python launch/train_sae.py --config=experiments/sae_paper.py "
            "--config.sae.n_features=131072 --config.distributed.enabled=true") in res.stdout


def test_slurm_dry_run_inside_allocation_one_process_per_gpu():
    env = {"DRY_RUN": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4",
           "SLURM_GPUS_PER_NODE": "h100:4", "SLURM_CPUS_PER_TASK": "8"}
    res = _bash([str(MULTIHOST / "slurm.sbatch"), "launch/harvest.py", "--config=e.py",
                 "--config.distributed.enabled=true"], env=env)
    assert res.returncode == 0, res.stderr
    assert "<unset: one GPU per process>" in res.stdout
    assert ("srun --kill-on-bad-exit=1 --gpu-bind=none --nodes=2 --ntasks-per-node=4 "
            "--cpus-per-task=8 .venv/bin/python launch/harvest.py --config=e.py "
            "--config.distributed.enabled=true\n") in res.stdout + "\n"
    bad = _bash([str(MULTIHOST / "slurm.sbatch"), "--dry-run"],
                env={"SLURM_NTASKS_PER_NODE": "3", "GPUS_PER_NODE": "8"})
    assert bad.returncode == 2 and "--ntasks-per-node=1" in bad.stderr
    outside = _bash([str(MULTIHOST / "slurm.sbatch"), "--config=x.py"])
    assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr


# ---------------------------------------------------------------- memory table

memest = _load("saejax_memory_estimates", ROOT / "benchmarks" / "memory_estimates.py")


def test_memory_rows_paper_and_beyond_scale():
    row = memest.estimate_row("paper", 131_072, 512, 8192, 2, 4)
    f_local = 131_072 // 4
    assert row.params == 4 * (2 * f_local * 512 + f_local + 512)
    assert row.optimizer == 2 * row.params + 4  # Adam m, v (+ the step count)
    assert row.dp_bytes == pytest.approx(memest.ring_bytes(4 * (2 * f_local * 512 + 2 * f_local), 2))
    assert row.mp_bytes == pytest.approx(memest.ring_bytes(4 * 4096 * 512, 4))
    # 16M features x 4096: eval_shape only, no memory; dictionary sharding fits, DP cannot.
    sharded = memest.estimate_row("16M", 1 << 24, 4096, 4096, 1, 1024)
    replicated = memest.estimate_row("16M", 1 << 24, 4096, 4096, 1024, 1)
    assert sharded.total < 4 * memest.GIB < 2000 * memest.GIB < replicated.total
    table = memest.estimate_table([row, sharded])
    assert table.count("\n") == 3 and "| 1 x 1024 |" in table


def test_memory_comm_model_matches_compiled_hlo():
    # The all-reduces the table counts are the ones XLA emits for the real step on a
    # (data=2, model=4) mesh: the gradient of the local dictionary shard over "data" and
    # the decoder's partial sums [B/2, D] over "model" (plus a few bytes of b_dec/scalars).
    (r,) = memest.compiled_rows(n_features=2048, d_in=64, batch=256, meshes=[(2, 4)])
    f_local, b_local = 2048 // 4, 256 // 2
    grad = 4 * (2 * f_local * 64 + f_local) + 4 * f_local
    assert grad <= r["largest"] <= grad + 1024, r
    assert 4 * b_local * 64 in r["payloads"], r
    assert r["all_reduce_bytes"] <= grad + 4 * b_local * 64 + 4096, r
    assert r["xla_total"] <= r["estimate"], r  # the estimate is an upper bound here


# ---------------------------------------------------------------- launch/steer.py

ABSL_LINE = r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] "  # absl's log-line prefix


def test_steer_prints_only_its_results(tiny_lm_dir, tmp_path):
    """launch/steer.py writes its JSON and nothing else: no orbax restore chatter, no absl
    INFO lines (jax's backend probing), on stdout or stderr."""
    import json
    import re

    import jax
    import numpy as np

    from experiments import lm_tiny
    from saejax.normalize import Normalizer
    from saejax.sae.bundle import SAEBundle, save_bundle
    from saejax.sae.config import SAEConfig
    from saejax.sae.model import init_params

    d = lm_tiny.get_config().model.d_mlp
    cfg = SAEConfig(d_in=d, n_features=16)
    save_bundle(str(tmp_path / "sae.npz"),
                SAEBundle(init_params(jax.random.key(0), cfg, np.zeros(d)), cfg,
                          normalizer=Normalizer(1.0), site="mlp.post"),
                extra={"lm_dir": tiny_lm_dir})
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "steer.py"),
                          f"--sae={tmp_path / 'sae.npz'}", "--feature=3", "--value=5",
                          "--prompt=ab", "--num_tokens=4", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert len(lines) == 1, res.stdout
    out = json.loads(lines[0])
    assert out["feature"] == 3 and len(out["baseline"]) == len(out["steered"]) == 1
    noise = [ln for ln in res.stderr.splitlines()
             if re.match(ABSL_LINE, ln) and not ln.startswith(("W", "E", "F"))
             or "orbax" in ln.lower()]
    assert not noise, "\n".join(noise[:5])
