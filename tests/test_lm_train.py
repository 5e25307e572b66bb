"""LM training: golden step, sharded == single device, unigram baseline, schedule, resume after
SIGTERM (in-process) and after SIGKILL (subprocess, slow), non-finite loss stop."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from saejax import parallel
from saejax.config import MeshConfig, from_config
from saejax.data.corpus import CorpusConfig, CorpusJobConfig
from saejax.data.tokenizer import TokenizerConfig
from saejax.lm.config import LMTrainConfig, ModelConfig, OptimConfig
from saejax.lm.restore import load_lm
from saejax.lm.train import (
    init_train_state,
    lm_loss,
    lr_schedule,
    train,
    unigram_baseline,
)
from saejax.loop import NonFiniteError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("def return self import class for in if else the data value None True False "
         "print list dict range len yield lambda with as try except").split()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A byte-level token store of Markov-chain 'code' (learnable structure, 48 documents)."""
    from saejax.data.corpus import build_token_store

    root = tmp_path_factory.mktemp("lm_corpus")
    rng = np.random.default_rng(0)
    nxt = rng.integers(0, len(WORDS), (len(WORDS), 3))
    for d in range(48):
        w, words = int(rng.integers(len(WORDS))), []
        for _ in range(250):
            words.append(WORDS[w])
            w = int(nxt[w, rng.integers(3)])
        (root / "text" / f"doc{d}.txt").parent.mkdir(exist_ok=True)
        (root / "text" / f"doc{d}.txt").write_text(" ".join(words) + "\n")
    job = CorpusJobConfig(corpus=CorpusConfig(source="text", path=str(root / "text"), seq_len=33,
                                              out_dir=str(root / "store"), val_fraction=0.2,
                                              chunk_mb=0.01),
                          tokenizer=TokenizerConfig(kind="byte"))
    build_token_store(job)
    return str(root / "store")


@pytest.fixture
def compile_cache(tmp_path_factory):
    """Persistent compilation cache: each ``train()`` call re-jits the same programs."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for n, v in old.items():
        jax.config.update(n, v)


def tiny_config(store_dir, workdir, **overrides) -> LMTrainConfig:
    sys.path.insert(0, REPO)
    from experiments import lm_tiny

    c = lm_tiny.get_config()
    c.store_dir, c.workdir = store_dir, str(workdir)
    c.progress_bar = False
    c.update(overrides)
    return from_config(LMTrainConfig, c)


def _final_params(workdir):
    model, meta = load_lm(str(workdir))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param)), meta


def test_unigram_baseline_is_train_distribution_scored_on_val(store_dir):
    from saejax.data.token_store import TokenStore

    store = TokenStore.open(store_dir)
    b = unigram_baseline(store, chunk_rows=7)  # odd chunking must not matter
    train = np.bincount(store.read("train", 0, store.rows("train")).ravel(), minlength=257)
    val = np.bincount(store.read("val", 0, store.rows("val")).ravel(), minlength=257)
    p = (train + 1) / (train.sum() + 257)
    assert b["val_cross_entropy"] == pytest.approx(-(val * np.log(p)).sum() / val.sum())
    q = train[train > 0] / train.sum()
    assert b["train_entropy"] == pytest.approx(-(q * np.log(q)).sum())
    assert 1.0 < b["train_entropy"] < np.log(257)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    sched = lr_schedule(OptimConfig(lr=1e-2, warmup_steps=10, min_lr_ratio=0.1), 110)
    assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(5e-3)
    assert float(sched(10)) == pytest.approx(1e-2)
    assert float(sched(60)) == pytest.approx(0.55e-2, rel=1e-3)  # cosine midpoint
    assert float(sched(110)) == pytest.approx(1e-3)


def _assert_params_close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)


def test_golden_step_and_sharded_equals_single_device(store_dir):
    from saejax.data.token_store import TokenStore
    from saejax.lm.train import make_step_fns

    cfg = ModelConfig(vocab_size=257, max_len=32, d_model=32, n_heads=2, d_mlp=64)
    # Adam's first steps are lr * g / (|g| + eps): with the default eps=1e-8 the update of a
    # ~zero gradient (e.g. the attention key bias, exactly zero in exact arithmetic) is decided
    # by its float noise, which legitimately differs with the reduction order. A larger eps
    # makes the update a well-conditioned function of the gradient, so the parameters can be
    # compared elementwise; loss and gradient norm are compared directly as well.
    optim = OptimConfig(lr=1e-2, warmup_steps=0, eps=1e-3)
    batches = [jnp.asarray(TokenStore.open(store_dir).read("train", 16 * i, 16 * (i + 1)))
               for i in range(2)]
    mesh1 = parallel.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    mesh8 = parallel.make_mesh(MeshConfig(data=8))
    state1, fns1 = init_train_state(cfg, optim, 10, mesh1, seed=0)

    @jax.jit
    def golden_step(params, batch):  # plain value_and_grad + optax; no shardings/donation
        loss, grads = jax.value_and_grad(lm_loss)(params, fns1.graphdef, batch)
        updates, _ = fns1.optimizer.update(grads, fns1.optimizer.init(params), params)
        return loss, optax.global_norm(grads), optax.apply_updates(params, updates)

    loss0, gnorm0, golden = golden_step(jax.tree.map(jnp.array, state1.params), batches[0])
    shard8 = jax.tree.map(lambda _: parallel.replicated(mesh8), fns1.state_shardings,
                          is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    fns8 = make_step_fns(fns1.graphdef, fns1.optimizer, fns1.schedule, shard8, mesh8)
    state8 = jax.device_put(jax.tree.map(jnp.array, state1), shard8)
    runs = {"single": (state1, fns1), "sharded": (state8, fns8)}
    results = {}
    for name, (state, fns) in runs.items():
        losses, norms = [], []
        for i, batch in enumerate(batches):
            batch = jax.device_put(batch, fns.batch_sharding)
            assert len(batch.sharding.device_set) == len(fns.batch_sharding.mesh.devices.flat)
            state, metrics = fns.train_step(state, batch)
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
            if i == 0 and name == "single":
                assert losses[0] == pytest.approx(float(loss0), rel=1e-6)
                assert norms[0] == pytest.approx(float(gnorm0), rel=1e-5)
                _assert_params_close(state.params, golden)
        results[name] = (losses, norms, state)
    assert len(fns8.batch_sharding.mesh.devices.flat) == 8
    assert results["sharded"][0][0] == pytest.approx(np.log(257), abs=0.05)  # uniform at init
    assert results["sharded"][0][1] < results["sharded"][0][0]
    np.testing.assert_allclose(results["sharded"][0], results["single"][0], rtol=1e-6)
    np.testing.assert_allclose(results["sharded"][1], results["single"][1], rtol=1e-5)
    _assert_params_close(results["sharded"][2].params, results["single"][2].params)
    assert int(results["sharded"][2].step) == 2


def test_sigterm_checkpoints_and_rerun_resumes_exactly(store_dir, tmp_path, monkeypatch,
                                                       compile_cache):
    from saejax.data import loader as loader_mod

    # Reference: 16 uninterrupted steps.
    ref = train(tiny_config(store_dir, tmp_path / "ref", num_steps=16, checkpoint_every=4,
                            eval_every=8))
    assert ref["step"] == 16 and ref["interrupted"] is None
    assert ref["val_loss"] < ref["unigram_val"] + 1.0
    # Same run, SIGTERM delivered while loading the 7th training batch.
    original, calls = loader_mod.TokenLoader.__next__, {"n": 0}

    def next_with_sigterm(self):
        if self.split == "train":
            calls["n"] += 1
            if calls["n"] == 7:
                os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(loader_mod.TokenLoader, "__next__", next_with_sigterm)
    cfg = tiny_config(store_dir, tmp_path / "run", num_steps=16, checkpoint_every=4, eval_every=8)
    first = train(cfg)
    assert first["interrupted"] == "SIGTERM" and first["step"] == 7  # the 7th step completes
    monkeypatch.setattr(loader_mod.TokenLoader, "__next__", original)
    _, meta = _final_params(tmp_path / "run")
    assert meta["step"] == 7
    second = train(cfg)  # the same command again
    assert second["step"] == 16 and second["interrupted"] is None
    a, _ = _final_params(tmp_path / "ref")
    b, meta = _final_params(tmp_path / "run")
    jax.tree.map(np.testing.assert_array_equal, a, b)  # bit-identical
    assert second["val_loss"] == ref["val_loss"]
    assert meta["unigram"]["val_cross_entropy"] == pytest.approx(ref["unigram_val"])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"val/unigram_baseline"' in lines and '"perf/tokens_per_s"' in lines
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "run"))

    # The interrupted-and-resumed run's metrics.jsonl equals the uninterrupted one's, record
    # for record (wall-clock fields aside): nothing lost, nothing twice.
    def logged(run):
        out = []
        for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines():
            r = {k: v for k, v in json.loads(line).items()
                 if k != "time" and not k.startswith("perf/")}
            if len(r) > 1:
                out.append(r)
        return out

    assert logged("run") == logged("ref")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(store_dir, tmp_path):
    cfg = tiny_config(store_dir, tmp_path, num_steps=20, checkpoint_every=1,
                      optim=dict(lr=1e20, warmup_steps=0, grad_clip=1.0))
    with pytest.raises(NonFiniteError, match=r"non-finite training loss .* last good "
                                                 r"checkpoint is step 1"):
        train(cfg)
    params, meta = _final_params(tmp_path)
    assert meta["step"] == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_matches_uninterrupted(store_dir, tmp_path):
    """A real ``kill -9`` of launch/train_lm.py; re-running the command finishes identically."""
    args = [sys.executable, os.path.join(REPO, "launch", "train_lm.py"),
            "--config=" + os.path.join(REPO, "experiments", "lm_tiny.py"),
            f"--config.store_dir={store_dir}", "--config.num_steps=300",
            "--config.checkpoint_every=5", "--config.eval_every=100", "--config.progress_bar=false"]
    env = dict(os.environ)  # inherits conftest's 8 fake CPU devices
    ref = subprocess.run(args + [f"--config.workdir={tmp_path / 'ref'}"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(args + [f"--config.workdir={run_dir}"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill as soon as a mid-run checkpoint exists
        steps = [int(d) for d in os.listdir(run_dir / "checkpoints")
                 if d.isdigit()] if (run_dir / "checkpoints").exists() else []
        if steps and max(steps) >= 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    _, meta = _final_params(run_dir)
    assert 20 <= meta["step"] < 300
    again = subprocess.run(args + [f"--config.workdir={run_dir}"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    a, _ = _final_params(tmp_path / "ref")
    b, meta = _final_params(run_dir)
    assert meta["step"] == 300
    jax.tree.map(np.testing.assert_array_equal, a, b)
