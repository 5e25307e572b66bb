"""The seams between layers: the normaliser and the bundle, the run record, the shared loop
machinery, the activation sources, the light registry and the one loss definition."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.config import ConfigError, from_config
from saejax.loop import HostMetrics, NonFiniteError, check_finite
from saejax.normalize import ActivationStats, Normalizer
from saejax.sae import gradcheck, model, registry
from saejax.sae.bundle import SAEBundle
from saejax.sae.config import SAEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, F = 16, 64


def _bundle(arch="relu", scale=3.7, seed=0):
    cfg = SAEConfig(d_in=D, n_features=F, architecture=arch, k=6)
    params = model.init_params(jax.random.key(seed), cfg, jnp.linspace(-0.5, 0.5, D))
    params = params.replace(b_enc=jax.random.normal(jax.random.key(seed + 1), (F,)) * 0.1)
    return SAEBundle(params, cfg, Normalizer(scale), site="blocks.0.mlp.post")


def _acts(n=96, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0.3, 1.0, (n, D)).astype(np.float32))


# ------------------------------------------------------------------- normaliser and bundle


def test_normalizer_from_stats_is_the_one_formula():
    x = np.random.default_rng(1).normal(size=(500, D)) * 5.0
    stats = ActivationStats.from_rows(x)
    assert stats.rows == 500 and stats.width == D
    assert stats.mean_norm == pytest.approx(np.linalg.norm(x, axis=1).mean())
    n = Normalizer.from_stats(stats)
    assert np.linalg.norm(n.apply(x), axis=1).mean() == pytest.approx(np.sqrt(D))
    assert Normalizer.from_stats(stats, normalize=False).is_identity
    np.testing.assert_allclose(n.invert(n.apply(x)), x, rtol=1e-12)
    zero = ActivationStats.from_rows(np.zeros((4, D)))
    with pytest.raises(ConfigError, match="all zero"):
        Normalizer.from_stats(zero)
    with pytest.raises(ConfigError, match="normalizer.scale"):
        Normalizer(0.0)
    back = ActivationStats.from_dict(stats.to_dict())
    assert back == stats


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_bundle_applies_the_normaliser_once(arch):
    b = _bundle(arch)
    x = _acts()
    f = b.encode(x)
    want_f = model.encode(b.params, x * b.norm_scale, b.config)
    np.testing.assert_allclose(f, want_f, rtol=1e-6, atol=1e-7)
    assert (f > 0).any()
    x_hat, f2 = b.splice(x.reshape(8, 12, D))           # any leading shape
    assert x_hat.shape == (8, 12, D) and f2.shape == (8, 12, F)
    np.testing.assert_allclose(x_hat.reshape(-1, D),
                               model.decode(b.params, want_f, b.config) / b.norm_scale,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.directions(), b.params.W_dec / b.norm_scale, rtol=1e-6)
    # A pytree: the bundle is a jit argument (static config and normaliser). XLA fuses the
    # scale into the encoder differently from eager mode: O(1) pre-activations then differ
    # in the last bits, so small features differ by ~1e-7 absolute.
    jitted = jax.jit(lambda sae, a: sae.encode(a))(b, x)
    np.testing.assert_allclose(jitted, f, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_normaliser_folded_into_the_parameters_gives_the_same_outputs(arch):
    b = _bundle(arch, scale=0.23)
    folded = b.folded()
    assert folded.normalizer.is_identity and folded.site == b.site
    x = _acts(seed=2)
    np.testing.assert_allclose(folded.encode(x), b.encode(x), rtol=2e-5, atol=1e-5)
    f = b.encode(x)
    np.testing.assert_allclose(folded.decode(f), b.decode(f), rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(folded.directions(), b.directions(), rtol=1e-6)
    # Folding is not a no-op: the raw parameters differ by the constant.
    np.testing.assert_allclose(folded.params.W_enc, b.params.W_enc * 0.23, rtol=1e-6)
    assert not np.allclose(folded.params.W_dec, b.params.W_dec)


def test_bundle_export_round_trip(tmp_path):
    from saejax.sae.bundle import load_bundle, save_bundle

    b = _bundle("topk")
    save_bundle(str(tmp_path / "d.npz"), b, extra={"note": "x"})
    back, extra = load_bundle(str(tmp_path / "d.npz"))
    assert extra == {"note": "x"} and back.normalizer == b.normalizer and back.site == b.site
    np.testing.assert_array_equal(back.encode(_acts()), b.encode(_acts()))


# ------------------------------------------------------------------- registry and the loss


def _loaded_after(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after running ``code``."""
    probe = code + f"\nimport sys\nprint('LOADED', [m for m in {modules!r} if m in sys.modules])\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("LOADED"))
    return eval(line[len("LOADED "):])  # noqa: S307 - a list literal printed just above


def test_importing_the_sae_config_imports_neither_optax_nor_the_step():
    code = ("from saejax.sae.config import SAEConfig\n"
            "SAEConfig(architecture='topk', k=8, aux_k=4, aux_candidates=16, n_features=64)\n"
            "SAEConfig(dead_strategy='none')\n")
    heavy = ("optax", "saejax.sae.step", "saejax.sae.resample", "saejax.sae.model")
    assert _loaded_after(code, heavy) == []
    assert _loaded_after(code + "import saejax.sae.resample", heavy) == list(heavy)  # can fail


def test_registry_entries_carry_their_rules():
    assert registry.get_architecture("topk").supports_auxk
    assert not registry.get_architecture("relu").supports_auxk
    assert not registry.get_dead_strategy("none").scheduled
    assert registry.get_dead_strategy("resample").scheduled
    from saejax.sae.step import should_resample

    cfg = SAEConfig(dead_strategy="none", resample_steps=(5,))
    assert not should_resample(cfg, 5)
    with pytest.raises(KeyError, match="unknown SAE architecture 'nope'"):
        registry.get_architecture("nope")


def test_check_backward_refuses_a_loss_the_backward_does_not_match(monkeypatch):
    cfg = SAEConfig(d_in=D, n_features=F)
    gradcheck.check_backward(cfg)  # the real pair agrees
    real = model.per_input_loss
    # Someone adds a term to the loss definition but not to the hand-written backward.
    monkeypatch.setattr(model, "per_input_loss",
                        lambda p, x, c: real(p, x, c) + 1e-2 * jnp.sum(p.b_enc ** 2))
    monkeypatch.setattr(gradcheck, "_CHECKED", set())
    with pytest.raises(RuntimeError, match="'relu'.*disagrees with autodiff.*b_enc"):
        gradcheck.check_backward(cfg)


# ------------------------------------------------------------------- run record


def test_run_record_round_trip_and_format_check():
    from saejax.record import LMIdentity, SAERunRecord
    from saejax.train_config import SAETrainConfig

    stats = ActivationStats.from_rows(np.random.default_rng(0).normal(size=(10, 4)))
    rec = SAERunRecord(config=from_config(SAETrainConfig, {"lm": {"dir": "/x/lm"}}),
                       site="blocks.0.mlp.post",
                       lm=LMIdentity(dir="/x/lm", step=3, token_store="/x/tok"),
                       data={"kind": "lm"}, normalizer=Normalizer(2.5), stats=stats,
                       versions={"jax": "0"})
    back = SAERunRecord.from_dict(rec.to_dict(), step=7)
    assert back.step == 7 and back.lm == rec.lm and back.normalizer == rec.normalizer
    assert back.config == rec.config and back.stats == rec.stats
    old = {"config": {}, "normalization": {"norm_scale": 1.0}}
    with pytest.raises(ConfigError, match="format None.*re-trained"):
        SAERunRecord.from_dict(old)


def test_analysis_does_not_import_the_training_loop():
    code = ("import saejax.analysis.restore, saejax.analysis.report\n"
            "import saejax.analysis.features, saejax.analysis.steering\n")
    assert _loaded_after(code, ("saejax.train", "saejax.loop")) == []


# ------------------------------------------------------------------- configs


def test_train_config_sections_refuse_fields_of_another_kind():
    from saejax.train_config import SAETrainConfig

    with pytest.raises(ConfigError, match="'source.store_dir'.*source.kind='store'"):
        from_config(SAETrainConfig, {"source": {"kind": "lm", "store_dir": "/x"}})
    with pytest.raises(ConfigError, match="'source.paths'.*source.kind='arrays'"):
        from_config(SAETrainConfig, {"source": {"kind": "store", "store_dir": "/x",
                                                "paths": "a.npy"}})
    with pytest.raises(ConfigError, match="'lm.dir'.*source.kind='lm'"):
        from_config(SAETrainConfig, {"lm": {"dir": None}})
    with pytest.raises(ConfigError, match="'source.eval_store_dir'.*without an LM"):
        from_config(SAETrainConfig, {"lm": {"dir": "/lm"}, "source": {
            "kind": "store", "store_dir": "/x", "eval_store_dir": "/y"}})
    with pytest.raises(ConfigError, match="unknown config field.*config.loader"):
        from_config(SAETrainConfig, {"loader": {"seed": 1}})
    ok = from_config(SAETrainConfig, {"lm": {"dir": None},
                                      "source": {"kind": "arrays", "paths": "a.npy"}})
    assert ok.lm.dir is None


def test_lm_config_errors_are_config_errors(tmp_path):
    from saejax.lm.config import ModelConfig
    from saejax.lm.train import resolve_model_config

    class Store:
        vocab_size, seq_len = 300, 65

    with pytest.raises(ConfigError, match="'model.vocab_size' = 100 is invalid"):
        resolve_model_config(ModelConfig(vocab_size=100), Store())
    with pytest.raises(ConfigError, match="'model.max_len' = 32 is invalid"):
        resolve_model_config(ModelConfig(max_len=32), Store())


# ------------------------------------------------------------------- loop machinery


def test_host_metrics_reads_one_step_late_and_windows():
    reports = []
    host = HostMetrics(log_every=3, end=7, tokens_per_step=10,
                       report=lambda done, avg, last, tps: reports.append((done, avg, last, tps)),
                       on_nonfinite=lambda e: None)
    for i in range(7):
        host.push(i, {"loss": jnp.float32(i), "nonfinite": jnp.bool_(False)})
        # The report for step 3 (index 2) comes only when step 4's metrics are pushed.
        assert [r[0] for r in reports] == [d for d in (3, 6) if d <= i]
    host.flush()
    assert [r[0] for r in reports] == [3, 6, 7]
    assert reports[0][1]["loss"] == pytest.approx(1.0)    # mean of 0, 1, 2
    assert reports[1][1]["loss"] == pytest.approx(4.0)    # mean of 3, 4, 5
    assert reports[2][1]["loss"] == pytest.approx(6.0) and reports[2][2]["loss"] == 6.0
    assert "nonfinite" not in reports[0][1]
    assert host.last["loss"] == 6.0 and reports[-1][3] > 0


def test_host_metrics_nonfinite_calls_the_handler_and_raises():
    seen = []
    host = HostMetrics(log_every=10, end=10, tokens_per_step=1, report=lambda *a: None,
                       on_nonfinite=seen.append, finite_keys=("loss", "grad_norm"))
    host.push(0, {"loss": 1.0, "grad_norm": 1.0})
    host.push(1, {"loss": 1.0, "grad_norm": float("inf")})
    with pytest.raises(NonFiniteError, match="at step 2 .*grad_norm=inf"):
        host.flush()
    assert len(seen) == 1 and isinstance(seen[0], NonFiniteError)
    with pytest.raises(NonFiniteError, match="step 5"):
        check_finite({"loss": 0.5, "nonfinite": True}, 5)  # the step's own verdict


# ------------------------------------------------------------------- sources


def _count_device_reads(monkeypatch):
    """Counts device -> host reads of jax arrays (int(), np.asarray(), ...).

    jax's transfer guard does not fire on the CPU backend (its arrays live in host memory),
    so the test counts the private ``ArrayImpl._value`` accessor every such read goes through.
    """
    from jax._src import array as jax_array

    reads = {"n": 0}
    real = jax_array.ArrayImpl._value

    def counting(self):
        reads["n"] += 1
        return real.fget(self)

    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(counting))
    return reads


def test_on_the_fly_source_serves_batches_without_reading_the_device(tiny_lm_dir, monkeypatch):
    from saejax import parallel
    from saejax.activations import OnTheFlySource, restore_lm_source
    from saejax.config import MeshConfig

    mesh = parallel.make_mesh(MeshConfig())
    lm = restore_lm_source(tiny_lm_dir, "mlp.post", mesh)
    src = OnTheFlySource(lm, mesh, batch_size=64, lm_batch_size=16, buffer_rows=2048,
                         norm_sample_contexts=16, seed=0)
    dev = src.init_device_state()
    dev, first = src.next(dev)          # one read of the buffer's counter after init
    per_refill = src.buffer.batches_per_refill
    assert per_refill > 3
    reads = _count_device_reads(monkeypatch)
    batches = []
    for _ in range(per_refill - 1):     # no refill in between: pure device work
        dev, b = src.next(dev)
        batches.append(b)
    assert reads["n"] == 0
    # The buffer's own convenience method reads the counter every call (what the source avoids).
    buf, _ = src.buffer.next_batch(dev["buffer"], src._rows)
    assert reads["n"] >= 1
    assert all(b.shape == (64, lm.width) for b in batches)
