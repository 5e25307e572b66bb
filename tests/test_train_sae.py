"""The SAE pipeline end to end: exact resume after SIGKILL, SIGTERM, non-finite stop,
store == on-the-fly activations, and the launch scripts."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from saejax import parallel
from saejax.config import ConfigError, from_config
from saejax.loop import NonFiniteError
from saejax.record import load_sae
from saejax.train import train
from saejax.train_config import HarvestConfig, SAETrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def lm_dir(tiny_lm_dir):
    return tiny_lm_dir


def tiny_config(lm_dir, workdir, **overrides):
    from experiments import sae_tiny

    cd = sae_tiny.get_config()
    cd.lm.dir = lm_dir
    cd.workdir = str(workdir)
    cd.progress_bar = False
    cd.checkpoint.async_save = True
    cd.eval.every = 1000  # only the final evaluation
    cd.update_from_flattened_dict(overrides)  # dotted keys, e.g. "sae.resample_steps"
    return cd


def run_script(args, **kw):
    env = dict(os.environ)  # keeps XLA_FLAGS: the same 8 fake devices as this process
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def flags(lm_dir, workdir):
    return [f"{ROOT}/launch/train_sae.py", f"--config={ROOT}/experiments/sae_tiny.py",
            f"--config.lm.dir={lm_dir}", f"--config.workdir={workdir}",
            "--config.eval.every=1000", "--config.progress_bar=false"]


def logged(workdir):
    """metrics.jsonl records without the fields that measure wall-clock time."""
    out = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")})
    return [r for r in out if len(r) > 1]  # a record of perf/ fields only says nothing else


def params_of(workdir):
    bundle, record = load_sae(str(workdir))
    return jax.tree.map(np.asarray, bundle.params), {"step": record.step}


def test_sigkill_at_an_arbitrary_step_then_resume_is_exact(lm_dir, tmp_path):
    ref = run_script(flags(lm_dir, tmp_path / "ref"))
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    want, meta = params_of(tmp_path / "ref")
    assert meta["step"] == 60

    work = tmp_path / "killed"
    victim = run_script(flags(lm_dir, work))
    ckpts = work / "checkpoints"
    t0 = time.time()
    while not (ckpts.is_dir() and any(p.name.isdigit() and int(p.name) >= 30
                                      for p in ckpts.iterdir())):
        assert victim.poll() is None, victim.stdout.read()
        assert time.time() - t0 < 240, "no checkpoint appeared"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # mid-run, possibly mid-save: nothing is flushed
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    resumed = run_script(flags(lm_dir, work))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed" in out
    got, meta = params_of(work)
    assert meta["step"] == 60
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)
    # Metrics are durable: the killed-and-resumed run's metrics.jsonl equals the
    # uninterrupted run's, record for record (wall-clock fields aside).
    assert logged(work) == logged(tmp_path / "ref")


def test_sigterm_saves_a_checkpoint_before_exit(lm_dir, tmp_path):
    work = tmp_path / "term"
    proc = run_script(flags(lm_dir, work) + ["--config.num_steps=100000",
                                             "--config.checkpoint.every=100000"])
    log = work / "metrics.jsonl"
    t0 = time.time()
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < 240
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out  # did not finish: a scheduler may requeue it
    assert "SIGTERM received: saving a checkpoint" in out
    assert "re-run the same command to resume" in out
    _, meta = params_of(work)
    assert 20 <= meta["step"] < 100000


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(lm_dir, tmp_path):
    cd = tiny_config(lm_dir, tmp_path / "nan", **{"num_steps": 60, "checkpoint.every": 10})
    cfg = from_config(SAETrainConfig, cd)
    train(cfg, stop_at=10)  # a good checkpoint at step 10
    cd.sae.lr = 1e30          # the next updates overflow
    bad = from_config(SAETrainConfig, cd)
    # Resume with the bad optimiser settings: the first steps blow up the parameters.
    with pytest.raises(NonFiniteError, match="last good checkpoint is step 10"):
        train(bad, allow_changes=("sae.lr",))
    params, meta = params_of(tmp_path / "nan")
    assert meta["step"] == 10
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_store_source_trains_on_the_same_activations(lm_dir, tmp_path):
    """Harvest, then train from the store == train on the LM's activations in that order."""
    from saejax.data.activation_store import ActivationStore
    from saejax.harvest import run_harvest
    from saejax.sae.step import init_state, make_train_step

    hcfg = HarvestConfig(lm_dir=lm_dir, out_dir=str(tmp_path / "acts"), lm_batch_size=16,
                         sae_batch_size=256, chunk_mb=0.06, num_contexts=64)
    run_harvest(hcfg)
    store = ActivationStore.open(str(tmp_path / "acts"))
    assert store.metadata["plan"]["site"] == "blocks.0.mlp.post"
    cd = tiny_config(lm_dir, tmp_path / "from_store", num_steps=8,
                     **{"source.kind": "store", "source.store_dir": str(tmp_path / "acts"),
                        "sae.resample_steps": (), "source.shuffle": False,
                        "source.window_chunks": 1, "source.normalize": True})
    cfg = from_config(SAETrainConfig, cd)
    summary = train(cfg)
    work = tmp_path / "from_store"
    lines = [json.loads(ln) for ln in (work / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*lines)
    assert {"train/loss", "train/l0", "train/frac_dead", "train/explained_variance",
            "perf/tokens_per_s", "eval/frac_loss_recovered", "eval/kl_sae"} <= keys
    assert any(p.name.startswith("events.out.tfevents") for p in work.iterdir())
    evaluation = json.loads((work / "eval.json").read_text())
    assert evaluation["step"] == 8 and np.isfinite(evaluation["frac_loss_recovered"])
    assert np.load(work / "feature_density.npy").shape == (256,)

    # The same steps by hand on the store's rows, in file order, with the same scale.
    mesh = parallel.make_mesh(cfg.mesh)
    scale = store.stats["norm_scale"]
    rows = np.concatenate([store.read_chunk(i) for i in range(store.rows // store.chunk_rows)])
    state = init_state(cfg.sae, mesh, rows[:16_384] * scale)
    step = make_train_step(cfg.sae, mesh)
    per_epoch = store.rows // 256
    for i in range(8):
        j = i % per_epoch
        batch = parallel.host_to_global(rows[j * 256:(j + 1) * 256] * np.float32(scale), mesh,
                                        ("batch", None))
        state, _ = step(state, batch)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(summary["bundle"].params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_bad_settings_fail_clearly(lm_dir, tmp_path):
    cd = tiny_config(lm_dir, tmp_path / "w", **{"sae.d_in": 32})
    with pytest.raises(ConfigError, match="'sae.d_in' = 32 is invalid.*has width 64"):
        train(from_config(SAETrainConfig, cd))
    with pytest.raises(ConfigError, match="buffer_rows"):
        from_config(SAETrainConfig, tiny_config(lm_dir, tmp_path / "w",
                                                **{"source.buffer_rows": 1000}))


def test_restore_on_another_mesh_equals_the_original_encode(lm_dir, tmp_path):
    from saejax.analysis.restore import restore_run
    from saejax.config import MeshConfig
    from saejax.sae import model as sae_model

    cfg = from_config(SAETrainConfig, tiny_config(lm_dir, tmp_path / "r", num_steps=10,
                                                  **{"sae.resample_steps": ()}))
    summary = train(cfg)
    summary["params"] = summary["bundle"].params
    base = restore_run(str(tmp_path / "r"))  # the training mesh (8, 1)
    tokens = base.store.read("val", 0, 8)[:, :32]
    acts = base.activations(tokens)
    scale = base.sae.norm_scale
    want = np.asarray(sae_model.encode(summary["params"], np.asarray(acts) * scale, cfg.sae))
    assert (want > 0).any()
    for shape in [(2, 4), (1, 8)]:
        run = restore_run(str(tmp_path / "r"), mesh=parallel.make_mesh(MeshConfig(*shape)))
        np.testing.assert_allclose(np.asarray(run.features(tokens)), want, rtol=1e-5, atol=1e-6)
        recon = np.asarray(run.decode(run.encode(acts)))
        np.testing.assert_allclose(
            recon, np.asarray(sae_model.decode(summary["params"], want, cfg.sae)) / scale,
            rtol=1e-5, atol=1e-6)
    odd = np.asarray(base.decode(base.encode(np.asarray(acts)[:13])))  # 13 rows, 8 devices
    np.testing.assert_allclose(odd, recon[:13], rtol=1e-5, atol=1e-6)
    single = restore_run(str(tmp_path / "r"), mesh=parallel.make_mesh(
        MeshConfig(1, 1), devices=jax.devices()[:1]))
    text = "alpha beta gamma"
    f = single.encode_text(text)
    assert f.shape == (len(single.tokenizer.encode(text)), cfg.sae.n_features)
    np.testing.assert_allclose(f, base.encode_text(text), rtol=1e-5, atol=1e-6)
    over = base.feature_activations_over_store("val", num_contexts=16, batch_contexts=8)
    assert over.shape == (16 * 32, cfg.sae.n_features)


def test_training_density_after_a_mid_window_resume_equals_the_uninterrupted_runs(lm_dir,
                                                                                   tmp_path):
    """The firing counts behind the training density are checkpointed with the state: a run
    stopped inside a density window (steps 20..40) and resumed reports the same density."""
    over = {"num_steps": 40, "eval.every": 20, "checkpoint.every": 10, "sae.resample_steps": ()}
    ref = train(from_config(SAETrainConfig, tiny_config(lm_dir, tmp_path / "ref", **over)))
    cfg = from_config(SAETrainConfig, tiny_config(lm_dir, tmp_path / "cut", **over))
    assert train(cfg, stop_at=30)["step"] == 30
    got = train(cfg)
    assert got["step"] == 40 and ref["train_density"].sum() > 0
    np.testing.assert_array_equal(got["train_density"], ref["train_density"])
    np.testing.assert_array_equal(np.load(tmp_path / "cut" / "train_feature_density.npy"),
                                  np.load(tmp_path / "ref" / "train_feature_density.npy"))


def test_metrics_after_a_resume_inside_a_log_window_equal_the_uninterrupted_runs(lm_dir,
                                                                                 tmp_path):
    """Checkpoints every 6 steps, log windows of 4: the open window's sums travel with the
    checkpoint, and a dead run's records after the restored step are dropped."""
    over = {"num_steps": 24, "log_every": 4, "checkpoint.every": 6, "eval.every": 12,
            "sae.resample_steps": (12,)}
    train(from_config(SAETrainConfig, tiny_config(lm_dir, tmp_path / "ref", **over)))
    cfg = from_config(SAETrainConfig, tiny_config(lm_dir, tmp_path / "cut", **over))
    train(cfg, stop_at=18)  # the last window (16..20) is open at the checkpoint of step 18
    # What a run that died after step 18 (before its next checkpoint) had logged:
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 20, "train/loss": -1.0}) + "\n" + '{"step": 2')
    train(cfg)
    assert logged(tmp_path / "cut") == logged(tmp_path / "ref")
    steps = [r["step"] for r in logged(tmp_path / "ref") if "train/loss" in r]
    assert steps == [4, 8, 12, 16, 20, 24]
    # Re-running the completed run evaluates for its summary but logs nothing twice.
    assert train(cfg)["eval"]["step"] == 24
    assert logged(tmp_path / "cut") == logged(tmp_path / "ref")
