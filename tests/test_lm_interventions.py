"""Interventions at sites: replace (SAE splice), zero/mean ablation, add, clamp; under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.lm import model as M
from saejax.lm.config import ModelConfig
from saejax.lm.sites import Ablate, Add, Clamp, Replace

CFG = ModelConfig(vocab_size=61, max_len=16, d_model=32, n_heads=4, d_mlp=48, n_layers=1)
POST, OUT = "blocks.0.mlp.post", "blocks.0.mlp.out"


@pytest.fixture(scope="module")
def model():
    return M.build_model(CFG, seed=1)


@pytest.fixture(scope="module")
def toks():
    return jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 10)), jnp.int32)


def _sae(params, x):
    """A toy SAE: encode, ReLU, decode (what the later SAE splice passes)."""
    f = jax.nn.relu((x - params["b_d"]) @ params["w_e"] + params["b_e"])
    return f @ params["w_d"] + params["b_d"]


def test_zero_ablation_of_mlp_post_leaves_only_the_output_bias(model, toks):
    out = model(toks, sites=(POST, OUT), interventions=(Ablate.zero("mlp.post"),))
    np.testing.assert_array_equal(out.acts[POST], 0.0)  # sites report post-intervention values
    b_out = model.blocks[0].mlp.b_out[...]
    np.testing.assert_allclose(out.acts[OUT], jnp.broadcast_to(b_out, out.acts[OUT].shape),
                               atol=1e-6)
    assert not np.allclose(out.logits, model(toks).logits)


def test_mean_ablation(model, toks):
    mean = model(toks, sites=(POST,)).acts[POST].mean((0, 1))
    out = model(toks, sites=(POST,), interventions=(Ablate.mean(POST, mean),))
    np.testing.assert_allclose(out.acts[POST], jnp.broadcast_to(mean, out.acts[POST].shape))


def test_replace_identity_is_a_no_op_and_splice_matches_manual(model, toks):
    ident = model(toks, interventions=(Replace(POST, lambda p, x: x),)).logits
    np.testing.assert_array_equal(ident, model(toks).logits)
    k = jax.random.split(jax.random.key(0), 2)
    sae = {"w_e": 0.3 * jax.random.normal(k[0], (48, 96)), "b_e": jnp.zeros(96),
           "w_d": 0.3 * jax.random.normal(k[1], (96, 48)), "b_d": jnp.full((48,), 0.1)}
    clean = model(toks, sites=(POST,)).acts[POST]
    out = model(toks, sites=(POST,), interventions=(Replace(POST, _sae, sae),))
    np.testing.assert_allclose(out.acts[POST], _sae(sae, clean), atol=1e-5, rtol=1e-5)


def test_interventions_are_jit_arguments_without_recompiling(model, toks):
    graphdef, params = M.split_params(model)
    traces = []

    @jax.jit
    def logits(params, toks, interventions):
        traces.append(1)
        return M.forward(graphdef, params, toks, interventions=interventions).logits

    sae = {"w_e": jnp.ones((48, 8)), "b_e": jnp.zeros(8), "w_d": jnp.ones((8, 48)),
           "b_d": jnp.zeros(48)}
    a = logits(params, toks, (Replace(POST, _sae, sae),))
    b = logits(params, toks, (Replace(POST, _sae, jax.tree.map(lambda x: 0.5 * x, sae)),))
    assert len(traces) == 1 and not np.allclose(a, b)  # new SAE params: same program
    eager = model(toks, interventions=(Replace(POST, _sae, sae),)).logits
    np.testing.assert_allclose(a, eager, atol=1e-5, rtol=1e-5)
    logits(params, toks, (Add(OUT, jnp.ones(32), 2.0),))
    logits(params, toks, (Add(OUT, jnp.ones(32), 3.0),))
    assert len(traces) == 2


def test_add_steers_the_residual_stream(model, toks):
    v = jnp.arange(32.0)
    clean = model(toks, sites=("resid.mid", "resid.post")).acts
    out = model(toks, sites=("resid.mid", "resid.post"),
                interventions=(Add("blocks.0.resid.post", v, 0.5),)).acts
    np.testing.assert_array_equal(out["blocks.0.resid.mid"], clean["blocks.0.resid.mid"])
    np.testing.assert_allclose(out["blocks.0.resid.post"], clean["blocks.0.resid.post"] + 0.5 * v,
                               rtol=1e-6)


def test_clamp_pins_a_projection_and_a_feature(model, toks):
    d = jax.random.normal(jax.random.key(3), (48,))
    out = model(toks, sites=(POST,), interventions=(Clamp(POST, direction=d, value=4.0),))
    proj = out.acts[POST] @ d / (d @ d)
    np.testing.assert_allclose(proj, 4.0, rtol=1e-4)
    # Pin "feature" f(x) = relu(x . e) to 7 along its decoder direction e (orthonormal here).
    e = jnp.zeros(48).at[5].set(1.0)
    read = lambda p, x: jax.nn.relu(x @ p)  # noqa: E731
    out = model(toks, sites=(POST,),
                interventions=(Clamp(POST, direction=e, value=7.0, read_fn=read, read_params=e),))
    np.testing.assert_allclose(out.acts[POST][..., 5], 7.0, rtol=1e-6)
    clean = model(toks, sites=(POST,)).acts[POST]
    np.testing.assert_array_equal(np.delete(out.acts[POST], 5, -1), np.delete(clean, 5, -1))


def test_interventions_compose_in_order(model, toks):
    out = model(toks, sites=(POST,), interventions=(Ablate.zero(POST), Add(POST, jnp.ones(48))))
    np.testing.assert_array_equal(out.acts[POST], 1.0)


def test_gradients_flow_through_a_splice(model, toks):
    graphdef, params = M.split_params(model)
    sae = {"w_e": 0.1 * jnp.ones((48, 8)), "b_e": jnp.zeros(8), "w_d": 0.1 * jnp.ones((8, 48)),
           "b_d": jnp.zeros(48)}

    def loss(sae):
        return M.forward(graphdef, params, toks,
                         interventions=(Replace(POST, _sae, sae),)).logits.mean()

    g = jax.jit(jax.grad(loss))(sae)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))
    assert float(jnp.abs(g["w_d"]).sum()) > 0
