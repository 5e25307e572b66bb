"""Loss recovered and reconstruction metrics on cases with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.evaluate import density_histogram, evaluate, make_eval_step, plan_batches
from saejax.lm.config import ModelConfig
from saejax.lm.model import build_model, split_params

SITE = "mlp.post"


@pytest.fixture(scope="module")
def lm():
    model = build_model(ModelConfig(vocab_size=64, max_len=16, d_model=32, n_heads=2, d_mlp=48,
                                    init_std=0.2), seed=1)
    graphdef, params = split_params(model)
    tokens = [jax.random.randint(jax.random.key(i), (4, 16), 0, 64) for i in range(2)]
    return graphdef, params, tokens


def identity(params, acts):
    return acts, jnp.maximum(acts, 0)


def zeros(params, acts):
    return jnp.zeros_like(acts), jnp.zeros_like(acts)


def scaled(params, acts):
    return acts * params, acts


@pytest.mark.parametrize("splice,want", [(identity, 1.0), (zeros, 0.0)])
def test_known_answers(lm, splice, want):
    graphdef, params, tokens = lm
    step = make_eval_step(graphdef, SITE, splice)
    out = evaluate(step, params, None, jnp.zeros(48), tokens)
    assert abs(out["loss_zero_ablated"] - out["loss_clean"]) > 1e-3  # ablation matters here
    assert out["frac_loss_recovered"] == pytest.approx(want, abs=1e-5)
    if want == 1.0:
        assert out["kl_sae"] == pytest.approx(0.0, abs=1e-6)
        assert out["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    else:
        assert out["kl_sae"] == pytest.approx(out["kl_zero_ablated"], rel=1e-5)
        assert out["l0"] == 0 and out["dead_features"] == 48


def test_partial_reconstruction_is_between_and_matches_a_direct_computation(lm):
    graphdef, params, tokens = lm
    step = make_eval_step(graphdef, SITE, scaled)
    out = evaluate(step, params, jnp.float32(0.5), jnp.zeros(48), tokens)
    assert 0.0 < out["frac_loss_recovered"] < 1.0
    # Direct: mlp.post activations, x_hat = 0.5 x -> FVU = 0.25 * E|x|^2 / Var.
    from saejax.lm.model import forward
    x = np.concatenate([np.asarray(forward(graphdef, params, t, sites=(SITE,), logits=False)
                                   .acts["blocks.0.mlp.post"]).reshape(-1, 48) for t in tokens])
    total_var = ((x - x.mean(0)) ** 2).sum()
    assert out["explained_variance"] == pytest.approx(1 - 0.25 * (x ** 2).sum() / total_var,
                                                      rel=1e-4)
    density = (x > 0).mean(0)
    np.testing.assert_allclose(out["feature_density"], density, rtol=1e-6)
    hist, edges, dead = density_histogram(density)
    assert hist.sum() + dead == 48


def test_plan_batches_caps_at_the_data_and_warns_once(caplog):
    with caplog.at_level("WARNING"):
        assert plan_batches(64, 8, 100, field="eval.contexts", what="val") == 8  # enough data
        assert plan_batches(4, 8, 100, field="eval.contexts", what="val") == 1   # at least one
    assert not caplog.records
    with caplog.at_level("WARNING"):
        n = plan_batches(512, 16, 116, field="eval.contexts", what="the token store's 'val' split",
                         unit="contexts", tokens_per_row=128)
    assert n == 7  # 112 of the 116 contexts, each once (was 32 batches: the split 4.4 times)
    (rec,) = [r for r in caplog.records if r.levelname == "WARNING"]
    msg = rec.getMessage()
    assert "\n" not in msg
    assert "eval.contexts = 512 contexts (65,536 tokens) requested" in msg, msg
    assert "holds 116 contexts (14,848 tokens)" in msg and "112 contexts (14,336 tokens)" in msg


def test_short_validation_split_is_evaluated_once_not_cycled(tiny_lm_dir, tmp_path, caplog):
    """RunEvaluation on a 'val' split smaller than eval.contexts: every validation context
    is read at most once, eval_tokens counts what was read, one warning says so."""
    from types import SimpleNamespace

    from experiments import sae_tiny
    from saejax import parallel
    from saejax.activations import restore_lm_source
    from saejax.config import MeshConfig, from_config
    from saejax.normalize import Normalizer
    from saejax.sae.bundle import SAEBundle
    from saejax.sae.config import SAEConfig
    from saejax.sae.model import init_params
    from saejax.train_config import SAETrainConfig
    from saejax.train_setup import RunEvaluation

    mesh = parallel.make_mesh(MeshConfig())
    lm = restore_lm_source(tiny_lm_dir, SITE, mesh)
    batch, val_rows = 8, lm.store.rows("val")
    have = val_rows // batch
    assert have >= 1
    requested = batch * (have + 3)  # more than the split holds: the old loader cycled it
    cd = sae_tiny.get_config()
    cd.lm.dir = tiny_lm_dir
    cd.workdir = str(tmp_path / "sae")
    cd.sae.d_in = lm.width
    cd.eval.update(contexts=requested, batch_contexts=batch)
    cfg = from_config(SAETrainConfig, cd)
    record = SimpleNamespace(stats=SimpleNamespace(mean=np.zeros(lm.width, np.float32)))
    with caplog.at_level("WARNING"):
        ev = RunEvaluation(cfg, record, lm, None, mesh)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert (f"eval.contexts = {requested:,} contexts ({requested * lm.context:,} tokens) "
            f"requested") in warnings[0]
    assert f"holds {val_rows:,} contexts ({val_rows * lm.context:,} tokens)" in warnings[0]

    seen = []
    step = ev.step

    def recording_step(lm_params, splice_params, mean, tokens):
        seen.append(np.asarray(tokens))
        return step(lm_params, splice_params, mean, tokens)

    ev.step = recording_step
    sae_cfg = SAEConfig(d_in=lm.width, n_features=32)
    bundle = SAEBundle(init_params(jax.random.key(0), sae_cfg, np.zeros(lm.width)), sae_cfg,
                       normalizer=Normalizer(1.0), site=lm.site)
    out = ev(bundle)
    read = np.concatenate(seen)
    assert len(read) == have * batch  # not requested: the old code read the split again
    np.testing.assert_array_equal(read, lm.store.read("val", 0, have * batch))
    assert out["eval_tokens"] == have * batch * lm.context
    assert out["eval_contexts"] == have * batch
    for key in ("frac_loss_recovered", "frac_loss_recovered_mean_ablation", "l0",
                "explained_variance", "dead_features"):
        assert np.isfinite(out[key]), key
