"""Bring your own activations: .npy files or arrays, no saejax LM. Train through the launcher,
SIGKILL, resume bit-exactly, restore and encode; the Python API trains the same dictionary."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from saejax.config import ConfigError, from_config
from saejax.record import load_sae
from saejax.sae import model as sae_model
from saejax.train import train
from saejax.train_config import SAETrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, ROWS = 32, 3072

OVERRIDES = {"sae.d_in": D, "sae.n_features": 128, "sae.k": 8, "sae.aux_k": 16,
             "sae.aux_candidates": 64, "sae.dead_window": 20, "sae.lr": 1e-3,
             "sae.resample_steps": (20,), "sae.resample_sample_size": 1024,
             "sae.resample_chunk_size": 256, "sae.geometric_median_iters": 20,
             "batch_size": 256, "num_steps": 60, "log_every": 10, "checkpoint.every": 10,
             "checkpoint.keep": 2, "eval.every": 30, "eval.rows": 1024,
             "source.chunk_mb": 0.25, "source.window_chunks": 2, "progress_bar": False}


def synthetic(n, seed):
    """Sparse combinations of 96 fixed directions plus noise: something to learn."""
    dictionary = np.random.default_rng(123).normal(size=(96, D))
    rng = np.random.default_rng(seed)
    codes = rng.exponential(1.0, (n, 96)) * (rng.random((n, 96)) < 0.05)
    return (codes @ dictionary + 0.05 * rng.normal(size=(n, D))).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("arrays")
    parts = [synthetic(ROWS, 1), synthetic(ROWS, 2)]
    for i, part in enumerate(parts):
        np.save(root / f"train_{i}.npy", part)
    np.save(root / "val.npy", synthetic(1024, 3))
    return root, np.concatenate(parts)


def config(data_dir, workdir, **extra):
    from experiments import sae_arrays

    cd = sae_arrays.get_config()
    cd.update_from_flattened_dict({**OVERRIDES, "workdir": str(workdir),
                                   "source.paths": f"{data_dir}/train_*.npy",
                                   "source.eval_paths": f"{data_dir}/val.npy", **extra})
    return cd


def flags(data_dir, workdir):
    out = [f"{ROOT}/launch/train_sae.py", f"--config={ROOT}/experiments/sae_arrays.py",
           f"--config.workdir={workdir}", f"--config.source.paths={data_dir}/train_*.npy",
           f"--config.source.eval_paths={data_dir}/val.npy"]
    for k, v in OVERRIDES.items():
        v = "(" + ",".join(map(str, v)) + ",)" if isinstance(v, tuple) else v
        out.append(f"--config.{k}={str(v).lower() if isinstance(v, bool) else v}")
    return out


def run(args):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def params(workdir):
    bundle, record = load_sae(str(workdir))
    return jax.tree.map(np.asarray, bundle.params), bundle, record


def test_no_lm_stop_resume_restore_encode_in_process(data, tmp_path):
    """The default suite's quick version of the launcher test below (which is slow): a run
    stopped at a checkpoint and resumed ends bit-equal to an uninterrupted one."""
    data_dir, rows = data
    over = {"num_steps": 12, "eval.every": 12, "sae.resample_steps": ()}
    ref = train(from_config(SAETrainConfig, config(data_dir, tmp_path / "ref", **over)))
    cfg = from_config(SAETrainConfig, config(data_dir, tmp_path / "cut", **over))
    assert train(cfg, stop_at=10)["step"] == 10
    got = train(cfg)
    assert got["step"] == 12
    for a, b in zip(jax.tree.leaves(ref["bundle"].params), jax.tree.leaves(got["bundle"].params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bundle, record = load_sae(str(tmp_path / "cut"))
    assert record.lm is None and record.step == 12
    x = rows[:256]
    want = sae_model.encode(bundle.params, x * record.normalizer.scale, bundle.config)
    np.testing.assert_allclose(np.asarray(bundle.encode(x)), np.asarray(want), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.slow
def test_launcher_no_lm_kill_resume_restore_encode(data, tmp_path):
    data_dir, rows = data
    # The uninterrupted run in this process; the launcher runs the one that is killed.
    train(from_config(SAETrainConfig, config(data_dir, tmp_path / "ref")))

    work = tmp_path / "killed"
    victim = run(flags(data_dir, work))
    ckpts = work / "checkpoints"
    t0 = time.time()
    while not (ckpts.is_dir() and any(p.name.isdigit() and int(p.name) >= 20
                                      for p in ckpts.iterdir())):
        assert victim.poll() is None, victim.stdout.read()[-3000:]
        assert time.time() - t0 < 240, "no checkpoint appeared"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL  # killed mid-run, not finished
    killed_at = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert killed_at < 60
    resumed = run(flags(data_dir, work))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert "resumed" in out

    want, _, _ = params(tmp_path / "ref")
    got, bundle, record = params(work)
    assert record.step == 60
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)

    # The record: no LM, no site, the arrays' store; the scale from the stored rows.
    from saejax.record import load_record

    assert load_record(str(work)) == record  # the metadata alone, no arrays read
    assert record.lm is None and record.site is None and bundle.site is None
    assert record.data["kind"] == "arrays" and record.data["rows"] == 3 * 2048
    kept = rows[:3 * 2048]  # chunks of 2,048 rows: the last 0 of 6,144 rows are dropped
    assert record.normalizer.scale == pytest.approx(
        np.sqrt(D) / np.linalg.norm(kept.astype(np.float64), axis=1).mean(), rel=1e-6)

    # Restored encode == the dictionary applied to normalised rows.
    x = rows[:512]
    f = np.asarray(bundle.encode(x))
    want_f = sae_model.encode(bundle.params, x * record.normalizer.scale, bundle.config)
    np.testing.assert_allclose(f, np.asarray(want_f), rtol=1e-5, atol=1e-5)
    assert 0 < (f > 0).sum(1).mean() <= 8                     # TopK, k = 8
    x_hat = np.asarray(bundle.decode(f))
    ev = 1 - ((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    ref_log = (tmp_path / "ref" / "metrics.jsonl").read_text()  # uninterrupted: from step 10
    records = [json.loads(ln) for ln in ref_log.splitlines()]
    first = next(r["train/explained_variance"] for r in records if "train/loss" in r)
    assert ev > first + 0.3  # it learned (60 small steps: from about -0.25 to 0.2)

    # Evaluation without an LM: what needs none, on the held-out file.
    e = json.loads((work / "eval.json").read_text())
    assert e["step"] == 60 and not e["eval_in_sample"] and e["eval_data"].endswith("activations_eval")
    assert "frac_loss_recovered" not in e and e["eval_tokens"] == 1024
    assert 0 < e["explained_variance"] <= 1 and 0 < e["l0"] <= 8 and e["mse"] > 0
    lines = (work / "metrics.jsonl").read_text()
    assert '"eval/explained_variance"' in lines and '"train/aux_loss"' in lines


def test_python_api_trains_the_same_dictionary_from_arrays_in_memory(data, tmp_path):
    data_dir, rows = data
    ref = tmp_path / "files"
    a = train(from_config(SAETrainConfig, config(data_dir, ref, **{"num_steps": 20})))
    cd = config(data_dir, tmp_path / "mem", **{"num_steps": 20, "source.paths": None,
                                                "source.eval_paths": None})
    b = train(from_config(SAETrainConfig, cd), activations=[rows[:ROWS], rows[ROWS:]])
    for x, y in zip(jax.tree.leaves(a["bundle"].params), jax.tree.leaves(b["bundle"].params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert b["eval"]["eval_in_sample"] and a["eval"]["eval_in_sample"] is False
    # A resume from the same arrays reuses the written store.
    c = train(from_config(SAETrainConfig, cd.copy_and_resolve_references()), activations=rows)
    assert c["step"] == 20


def test_arrays_errors_are_one_line(data, tmp_path, tiny_lm_dir):
    from saejax.analysis.restore import restore_run

    data_dir, rows = data
    bad = rows[:1024].copy()
    bad[700, 3] = np.nan
    with pytest.raises(ConfigError, match="array 1 hold NaN or Inf \\(first at row 188\\)"):
        train(from_config(SAETrainConfig, config(data_dir, tmp_path / "nan",
                                                 **{"source.paths": None})),
              activations=[rows[:512], bad[512:]])
    with pytest.raises(ConfigError, match="exactly one of them"):
        train(from_config(SAETrainConfig, config(data_dir, tmp_path / "both")), activations=rows)
    train(from_config(SAETrainConfig, config(data_dir, tmp_path / "once",
                                             **{"num_steps": 1, "eval.every": 1})))
    with pytest.raises(ConfigError, match="written from other activations.*new workdir"):
        train(from_config(SAETrainConfig, config(data_dir, tmp_path / "once",
                                                 **{"source.paths": None})),
              activations=rows[:2048])
    # An LM whose site is wider than the dictionary: refused before any training.
    with pytest.raises(ConfigError, match="'sae.d_in' = 32 is invalid: site "
                                          "'blocks.0.mlp.post' of the LM .* has width 64"):
        train(from_config(SAETrainConfig, config(data_dir, tmp_path / "lm",
                                                 **{"lm.dir": tiny_lm_dir,
                                                    "source.eval_paths": None})))
    with pytest.raises(ConfigError, match="'sae.d_in' = 16 is invalid: the arrays activations "
                                          "have width 32"):
        train(from_config(SAETrainConfig, config(data_dir, tmp_path / "w", **{"sae.d_in": 16})))
    with pytest.raises(ConfigError, match="'source.paths' = None"):
        train(from_config(SAETrainConfig, config(data_dir, tmp_path / "p",
                                                 **{"source.paths": None})))
    with pytest.raises(ConfigError, match=r"shape \(10,\)"):
        train(from_config(SAETrainConfig, config(data_dir, tmp_path / "s",
                                                 **{"source.paths": None})),
              activations=np.zeros(10, np.float32))
    with pytest.raises(ConfigError, match="no .npy file matches"):
        train(from_config(SAETrainConfig, config(data_dir, tmp_path / "m",
                                                 **{"source.paths": f"{data_dir}/none_*.npy"})))
    work = tmp_path / "short"
    train(from_config(SAETrainConfig, config(data_dir, work, **{"num_steps": 2, "eval.every": 2})))
    with pytest.raises(ConfigError, match="without a saejax LM"):
        restore_run(str(work))
