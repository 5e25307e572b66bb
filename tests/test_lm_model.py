"""The transformer: paper-config shapes, sites, early stop, causality, KV cache, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from saejax import parallel
from saejax.config import ConfigError, MeshConfig, from_config
from saejax.lm import model as M
from saejax.lm.config import LMTrainConfig, ModelConfig
from saejax.lm.sites import SITE_KINDS, canonical_site

SMALL = ModelConfig(vocab_size=61, max_len=16, d_model=32, n_heads=4, d_mlp=48, n_layers=2)


@pytest.fixture(scope="module")
def small():
    return M.build_model(SMALL, seed=0)


def tokens(B=3, T=12, V=61, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, T)), jnp.int32)


def test_paper_config_shapes_with_eval_shape():
    cfg = ModelConfig(vocab_size=4096)  # defaults: 1 layer, d_model 128, 4 heads, 512 ReLU
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.activation) == (1, 128, 512, "relu")
    model = M.abstract_model(cfg)  # no memory
    _, params = M.split_params(model)
    shapes = jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(params))
    assert shapes["wte"] == (4096, 128) and shapes["wpe"] == (128, 128)
    assert shapes["w_u"] == (128, 4096)
    b = shapes["blocks"][0]
    assert b["attn"]["qkv_w"] == (128, 3, 4, 32) and b["attn"]["o_w"] == (4, 32, 128)
    assert b["mlp"]["w_in"] == (128, 512) and b["mlp"]["w_out"] == (512, 128)
    graphdef, _ = M.split_params(model)
    out = jax.eval_shape(
        lambda p, t: M.forward(graphdef, p, t, sites=("mlp.post", "mlp.out", "resid.post")),
        params, jax.ShapeDtypeStruct((8, 128), jnp.int32))
    assert out.logits.shape == (8, 128, 4096) and out.logits.dtype == jnp.float32
    assert out.acts["blocks.0.mlp.post"].shape == (8, 128, 512)
    assert out.acts["blocks.0.mlp.out"].shape == (8, 128, 128)
    # 2 * 4096 * 128 embeddings/unembedding + 128 * 128 positions + block + final LN.
    block = 128 * 384 + 384 + 128 * 128 + 128 + 128 * 512 + 512 + 512 * 128 + 128 + 4 * 128
    assert M.count_params(params) == 2 * 4096 * 128 + 128 * 128 + block + 2 * 128


def test_params_carry_logical_axes_and_shard_replicated_on_mesh(small):
    _, params = M.split_params(small)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
    assert tuple(specs["wte"]) == ("vocab", "embed")
    assert tuple(specs["blocks"][0]["mlp"]["w_in"]) == ("embed", "mlp")
    mesh = parallel.make_mesh(MeshConfig())
    for s in jax.tree.leaves(M.param_shardings(params, mesh),
                             is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)):
        assert s.is_fully_replicated  # the LM is data-parallel only


def test_sites_are_consistent(small):
    t = tokens()
    names = [f"blocks.{layer}.{k}" for layer in range(2) for k in SITE_KINDS]
    out = small(t, sites=names)
    a = {k.split(".", 1)[1]: v for k, v in out.acts.items()}
    for layer in range(2):
        g = lambda k, layer=layer: a[f"{layer}.{k}"]  # noqa: E731
        np.testing.assert_allclose(g("resid.mid"), g("resid.pre") + g("attn.out"), atol=1e-6)
        np.testing.assert_allclose(g("resid.post"), g("resid.mid") + g("mlp.out"), atol=1e-6)
        np.testing.assert_allclose(g("mlp.post"), jax.nn.relu(g("mlp.pre")), atol=0)
        assert g("mlp.post").shape == (3, 12, 48)
    np.testing.assert_allclose(a["1.resid.pre"], a["0.resid.post"], atol=0)
    # The short form means layer 0.
    short = small(t, sites=("mlp.post",)).acts
    np.testing.assert_array_equal(short["blocks.0.mlp.post"], out.acts["blocks.0.mlp.post"])


def test_activations_only_forward_stops_after_the_site(small):
    graphdef, params = M.split_params(small)
    t = tokens()

    def n_dots(**kw):
        jaxpr = jax.make_jaxpr(lambda p: M.forward(graphdef, p, t, **kw))(params)
        return sum(e.primitive.name == "dot_general" for e in jaxpr.jaxpr.eqns)

    full = n_dots(sites=("blocks.0.mlp.post",))
    early = n_dots(sites=("blocks.0.mlp.post",), logits=False)
    # Layer 0 up to mlp.post: qkv, scores, mix, out-projection, W_in = 5 matmuls; a full
    # block adds W_out (6), plus the unembedding.
    assert early == 5 and full == 2 * 6 + 1
    out = small(t, sites=("blocks.0.mlp.post",), logits=False)
    assert out.logits is None
    np.testing.assert_array_equal(out.acts["blocks.0.mlp.post"],
                                  small(t, sites=("blocks.0.mlp.post",)).acts["blocks.0.mlp.post"])


def _variant(model, **changes):
    """The same parameters under a config that differs only in static choices."""
    from saejax.config import replace

    _, params = M.split_params(model)
    graphdef, _ = M.split_params(M.abstract_model(replace(model.cfg, **changes)))
    return nnx.merge(graphdef, params)


@pytest.mark.parametrize("act,fn", [("relu", jax.nn.relu),
                                    ("gelu", lambda x: jax.nn.gelu(x, approximate=False)),
                                    ("gelu_new", lambda x: jax.nn.gelu(x, approximate=True))])
def test_activation_choices(small, act, fn):
    m = _variant(small, activation=act)
    acts = m(tokens(), sites=("mlp.pre", "mlp.post"), logits=False).acts
    np.testing.assert_allclose(acts["blocks.0.mlp.post"], fn(acts["blocks.0.mlp.pre"]), atol=1e-6)


def test_causal_mask(small):
    t = tokens()
    t2 = t.at[:, 7:].set((t[:, 7:] + 1) % 61)
    a, b = small(t).logits, small(t2).logits
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert not np.allclose(a[:, 7:], b[:, 7:])


def test_kv_cache_decoding_matches_full_forward(small):
    graphdef, params = M.split_params(small)
    site = "blocks.1.mlp.post"
    run = jax.jit(lambda t, cache, start: M.forward(graphdef, params, t, cache=cache, start=start,
                                                     sites=(site,)))
    t = tokens()
    full = small(t, sites=(site,))
    out = run(t[:, :5], small.init_cache(3), 0)  # prefill
    logits, acts, cache = [out.logits], [out.acts[site]], out.cache
    for i in range(5, 12):  # one token at a time; traced start: one compiled program
        o = run(t[:, i:i + 1], cache, jnp.int32(i))
        logits.append(o.logits)
        acts.append(o.acts[site])
        cache = o.cache
    np.testing.assert_allclose(jnp.concatenate(logits, 1), full.logits, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(jnp.concatenate(acts, 1), full.acts[site], atol=2e-5, rtol=1e-5)


def test_bf16_compute_keeps_f32_params(small):
    m16 = _variant(small, compute_dtype="bfloat16")
    _, p16 = M.split_params(m16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16))
    a, b = small(tokens()).logits, m16(tokens()).logits
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(b, a, atol=5e-2)  # bf16 has ~3 significant digits
    assert not np.array_equal(a, b)
    assert from_config(ModelConfig, {"compute_dtype": "bfloat16"}).compute_dtype == "bfloat16"


def test_bad_sites_and_configs_raise(small):
    with pytest.raises(ValueError, match="unknown activation site"):
        small(tokens(), sites=("mlp.postt",))
    with pytest.raises(ValueError, match="unknown activation site"):
        canonical_site("blocks.2.mlp.post", 2)
    with pytest.raises(ValueError, match="logits=False"):
        small(tokens(), logits=False)
    with pytest.raises(ConfigError, match="model.activation"):
        ModelConfig(activation="swish")
    with pytest.raises(ConfigError, match="model.n_heads"):
        ModelConfig(d_model=130, n_heads=4)
    with pytest.raises(ConfigError, match="unknown config field"):
        from_config(LMTrainConfig, {"model": {"d_modle": 3}})


def test_experiment_configs_build():
    from experiments import lm_paper, lm_tiny

    paper = from_config(LMTrainConfig, lm_paper.get_config())
    assert (paper.model.d_model, paper.model.d_mlp, paper.model.n_heads) == (128, 512, 4)
    assert paper.model.activation == "relu" and paper.store_dir == "runs/corpus/stdlib"
    tiny = from_config(LMTrainConfig, lm_tiny.get_config())
    assert tiny.num_steps < 100
