"""Loss recovered and reconstruction metrics on cases with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.evaluate import density_histogram, evaluate, make_eval_step
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
