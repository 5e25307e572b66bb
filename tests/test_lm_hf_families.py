"""Bring your own model: random local GPT-NeoX (Pythia) and Llama checkpoints built with
transformers (no download) == our import, for logits, sites, interventions and generation."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.lm import sites as S
from saejax.lm.families import RotaryTransformer
from saejax.lm.hf_import import load_hf
from saejax.lm.restore import load_lm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, T = 97, 24
# name -> (HF class, config kwargs). Heads of 16 channels; Pythia rotates a quarter / half.
CONFIGS = {
    "pythia_parallel": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(
        hidden_size=64, num_attention_heads=4, intermediate_size=160, rotary_pct=0.25,
        rotary_emb_base=500, use_parallel_residual=True, layer_norm_eps=1e-5)),
    "pythia_sequential": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(
        hidden_size=64, num_attention_heads=4, intermediate_size=96,
        rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0,
                             partial_rotary_factor=0.5),
        use_parallel_residual=False, layer_norm_eps=3e-5, hidden_act="gelu_new")),
    "llama_gqa": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        rope_theta=5000.0, rms_norm_eps=1e-5)),
    "llama3_scaled": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=1, intermediate_size=96,
        rope_parameters=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16,
                             rope_theta=500000.0))),
    "llama_tied_bias": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=48, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        intermediate_size=80, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
}


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    out = {}
    for name, (model_cls, cfg_cls, kw) in CONFIGS.items():
        cfg = getattr(transformers, cfg_cls)(vocab_size=V, num_hidden_layers=2,
                                             max_position_embeddings=2 * T, **kw)
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(cfg).eval()
        with torch.no_grad():  # non-trivial norms and biases (HF initialises them to 1 / 0)
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d, safe_serialization=True)
        out[name] = (str(d), model)
    return out


def _mlp_modules(hf, i):
    if hasattr(hf, "gpt_neox"):
        layer = hf.gpt_neox.layers[i]
        return layer.attention, layer.mlp, layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h
    layer = hf.model.layers[i]
    return layer.self_attn, layer.mlp, layer.mlp.gate_proj, layer.mlp.down_proj


def _hf_run(hf, toks, replace_post=None):
    """HF logits and per-layer attn.out, mlp.pre (gate for SwiGLU), mlp.post (the down
    projection's input) and mlp.out; ``replace_post(i, x)`` edits mlp.post."""
    captured, hooks = {}, []
    for i in range(hf.config.num_hidden_layers):
        attn, mlp, first, down = _mlp_modules(hf, i)

        def grab(key):
            return lambda mod, inp, out: captured.__setitem__(
                key, (out[0] if isinstance(out, tuple) else out).detach().numpy().copy())

        def pre_down(mod, inp, i=i):
            x = inp[0] if replace_post is None else replace_post(i, inp[0])
            captured[f"post{i}"] = x.detach().numpy().copy()
            return (x,)

        hooks += [attn.register_forward_hook(grab(f"attn{i}")),
                  first.register_forward_hook(grab(f"pre{i}")),
                  down.register_forward_pre_hook(pre_down),
                  mlp.register_forward_hook(grab(f"out{i}"))]
    with torch.no_grad():
        logits = hf(torch.tensor(toks)).logits.numpy()
    for h in hooks:
        h.remove()
    return logits, captured


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_sites_match_transformers(hf_models, name):
    directory, hf = hf_models[name]
    ours = load_hf(directory)
    assert isinstance(ours, RotaryTransformer) and ours.cfg.n_layers == 2
    toks = np.random.default_rng(0).integers(0, V, (3, T))
    ref, captured = _hf_run(hf, toks)
    names = [f"blocks.{i}.{k}" for i in range(2) for k in ("attn.out", "mlp.pre", "mlp.post",
                                                          "mlp.out")]
    out = ours(jnp.asarray(toks, jnp.int32), sites=names)
    assert _rel(out.logits, ref) <= 1e-4
    for i in range(2):
        for kind, key in (("attn.out", "attn"), ("mlp.pre", "pre"), ("mlp.post", "post"),
                          ("mlp.out", "out")):
            assert _rel(out.acts[f"blocks.{i}.{kind}"], captured[f"{key}{i}"]) <= 1e-4, (kind, i)
    # Only-activations forward stops early and gives the same values.
    early = ours(jnp.asarray(toks, jnp.int32), sites=("blocks.0.mlp.post",), logits=False)
    np.testing.assert_allclose(early.acts["blocks.0.mlp.post"], out.acts["blocks.0.mlp.post"],
                               rtol=1e-6, atol=1e-6)


def test_config_details_are_read(hf_models):
    par = load_hf(hf_models["pythia_parallel"][0]).cfg
    assert (par.rotary_dim, par.rope_theta, par.parallel_residual, par.norm) == (4, 500.0, True,
                                                                                "layernorm")
    seq = load_hf(hf_models["pythia_sequential"][0]).cfg
    assert (seq.rotary_dim, seq.parallel_residual, seq.activation, seq.norm_eps) == (
        8, False, "gelu_new", 3e-5)
    assert (seq.rope_type, seq.rope_factor) == ("linear", 2.0)
    l3 = load_hf(hf_models["llama3_scaled"][0]).cfg
    assert (l3.rope_type, l3.rope_factor, l3.rope_original_max_len, l3.n_kv_heads) == (
        "llama3", 8.0, 16, 1)
    gqa = load_hf(hf_models["llama_gqa"][0]).cfg
    assert (gqa.n_heads, gqa.n_kv_heads, gqa.rope_theta, gqa.gated_mlp, gqa.tie_embeddings) == (
        4, 2, 5000.0, True, False)
    tied = load_hf(hf_models["llama_tied_bias"][0]).cfg
    assert (tied.d_head, tied.tie_embeddings, tied.attn_bias, tied.mlp_bias) == (32, True, True,
                                                                                 True)


@pytest.mark.parametrize("name", ["pythia_parallel", "llama_gqa"])
def test_interventions_match_hf_edits(hf_models, name):
    directory, hf = hf_models[name]
    ours = load_hf(directory)
    toks = np.random.default_rng(1).integers(0, V, (2, T))
    rng = np.random.default_rng(2)
    vec = rng.normal(size=ours.cfg.d_mlp).astype(np.float32)
    ref, _ = _hf_run(hf, toks, replace_post=lambda i, x: x + 0.5 * torch.tensor(vec) if i == 1
                     else torch.zeros_like(x))
    ivs = (S.Ablate.zero("blocks.0.mlp.post"),
           S.Add(site="blocks.1.mlp.post", vector=jnp.asarray(vec), scale=0.5))
    got = ours(jnp.asarray(toks, jnp.int32), interventions=ivs).logits
    assert _rel(got, ref) <= 1e-4
    clean, _ = _hf_run(hf, toks)
    assert _rel(got, clean) > 1e-2  # the edit matters


@pytest.mark.parametrize("name", ["pythia_parallel", "pythia_sequential", "llama_gqa"])
def test_site_semantics_of_mlp_pre_and_resid_mid(hf_models, name):
    """Adding at mlp.pre = adding to the first projection's output (SwiGLU: the gate only);
    adding at resid.mid = adding to the attention output, also with the parallel residual
    (where the MLP reads resid.pre, so the edit does not reach it)."""
    directory, hf = hf_models[name]
    ours = load_hf(directory)
    toks = np.random.default_rng(6).integers(0, V, (2, T))
    rng = np.random.default_rng(7)
    v_mlp = rng.normal(size=ours.cfg.d_mlp).astype(np.float32)
    v_res = rng.normal(size=ours.cfg.d_model).astype(np.float32)
    attn, _, first, _ = _mlp_modules(hf, 0)
    hooks = [first.register_forward_hook(lambda m, i, o: o + torch.tensor(v_mlp)),
             attn.register_forward_hook(lambda m, i, o: (o[0] + torch.tensor(v_res), *o[1:]))]
    with torch.no_grad():
        ref = hf(torch.tensor(toks)).logits.numpy()
    for h in hooks:
        h.remove()
    ivs = (S.Add(site="blocks.0.mlp.pre", vector=jnp.asarray(v_mlp)),
           S.Add(site="blocks.0.resid.mid", vector=jnp.asarray(v_res)))
    got = ours(jnp.asarray(toks, jnp.int32), interventions=ivs).logits
    assert _rel(got, ref) <= 1e-4
    clean = ours(jnp.asarray(toks, jnp.int32)).logits
    assert _rel(got, clean) > 1e-2


def test_greedy_generation_with_kv_cache_matches_transformers(hf_models):
    from saejax.lm.generate import generate

    directory, hf = hf_models["llama_gqa"]
    ours = load_hf(directory)
    prompts = np.random.default_rng(3).integers(0, V, (2, 5))
    got = generate(ours, jnp.asarray(prompts, jnp.int32), length=16, key=jax.random.key(0),
                   temperature=0.0)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompts), max_new_tokens=11, do_sample=False,
                          min_new_tokens=11, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(got), ref)


def test_load_lm_and_producer(hf_models, devices):
    from saejax import parallel
    from saejax.activations import lm_producer
    from saejax.config import MeshConfig
    from saejax.lm.model import split_lm

    directory, _ = hf_models["pythia_parallel"]
    model, meta = load_lm(directory)
    assert isinstance(model, RotaryTransformer) and meta["hf_config_dir"] == directory
    mesh = parallel.make_mesh(MeshConfig())
    produce = lm_producer(*split_lm(model), "blocks.1.mlp.post", mesh)
    toks = jnp.asarray(np.random.default_rng(4).integers(0, V, (8, T)), jnp.int32)
    acts = produce(toks)
    assert acts.shape == (8 * T, 160)
    want = model(toks, sites=("blocks.1.mlp.post",)).acts["blocks.1.mlp.post"]
    np.testing.assert_allclose(np.asarray(acts), np.asarray(want).reshape(-1, 160), rtol=1e-5,
                               atol=1e-5)


def test_bad_inputs_fail_in_one_line(hf_models, tmp_path):
    directory, _ = hf_models["llama_gqa"]
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)

    def folder(name, config, weights=True):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        if weights:
            os.symlink(os.path.join(directory, "model.safetensors"), d / "model.safetensors")
        return str(d)

    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_hf(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unsupported model_type 'bert'.*gpt_neox, llama"):
        load_hf(folder("bert", {**cfg, "model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf(folder("noweights", cfg, weights=False))
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        load_hf(folder("yarn", {**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 2.0,
                                                            "rope_theta": 1e4}}))
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.k_proj.weight' has shape "
                                         "\\(32, 64\\), config.json implies \\(64, 64\\)"):
        load_hf(folder("mha", {**cfg, "num_key_value_heads": 4}))
    with pytest.raises(KeyError, match="missing tensor 'model.layers.2"):
        load_hf(folder("deeper", {**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing field 'hidden_size'"):
        load_hf(folder("nohidden", {k: v for k, v in cfg.items() if k != "hidden_size"}))


@pytest.fixture(scope="module")
def byte_llama(tmp_path_factory):
    """A random Llama over the byte tokenizer's 257 ids (the tiny pipeline's token store)."""
    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=48, max_position_embeddings=32)
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("byte_llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    return str(d)


def _sae_hf_config(lm_dir, store_dir, workdir):
    from experiments import sae_hf

    cd = sae_hf.get_config("mlp")
    cd.lm.dir, cd.lm.store_dir, cd.lm.site = lm_dir, store_dir, "blocks.1.mlp.post"
    cd.workdir = str(workdir)
    cd.sae.update(d_in=48, n_features=128, k=8, aux_k=32, aux_candidates=64,
                  geometric_median_iters=10)
    cd.batch_size, cd.num_steps, cd.log_every, cd.progress_bar = 256, 12, 4, False
    cd.source.update(lm_batch_size=16, buffer_rows=2048, norm_sample_contexts=32,
                     window_chunks=2)
    cd.eval.update(every=1000, contexts=16, batch_contexts=8)
    cd.checkpoint.update(every=6, keep=2, async_save=False)
    return cd


def test_producer_on_an_imported_model_and_a_named_store(byte_llama, tiny_lm_dir, devices):
    from saejax import parallel
    from saejax.activations import restore_lm_source
    from saejax.config import MeshConfig
    from saejax.data.token_store import TokenStore

    store_dir = os.path.join(os.path.dirname(tiny_lm_dir), "tokens")  # conftest's byte store
    src = restore_lm_source(byte_llama, "blocks.1.mlp.post", parallel.make_mesh(MeshConfig()),
                            store_dir=store_dir)
    assert (src.width, src.context, src.meta["store_dir"]) == (48, 32, store_dir)
    tokens = TokenStore.open(store_dir).read("train", 0, 8)
    acts = src.produce(jnp.asarray(tokens, jnp.int32))
    assert acts.shape == (8 * 32, 48)
    want = load_hf(byte_llama)(jnp.asarray(tokens[:, :32], jnp.int32),
                               sites=("blocks.1.mlp.post",)).acts["blocks.1.mlp.post"]
    np.testing.assert_allclose(np.asarray(acts), np.asarray(want).reshape(-1, 48), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.slow  # ~10 s: a 12-step SAE run with evaluation, then a harvest
def test_sae_trains_and_harvests_on_an_imported_model(byte_llama, tiny_lm_dir, tmp_path):
    from experiments import harvest as harvest_cfg
    from saejax.config import ConfigError, from_config
    from saejax.data.activation_store import ActivationStore
    from saejax.harvest import run_harvest
    from saejax.record import load_sae
    from saejax.train import train
    from saejax.train_config import HarvestConfig, SAETrainConfig

    store_dir = os.path.join(os.path.dirname(tiny_lm_dir), "tokens")  # conftest's byte store
    cd = _sae_hf_config(byte_llama, store_dir, tmp_path / "sae")
    train(from_config(SAETrainConfig, cd))
    bundle, record = load_sae(str(tmp_path / "sae"))
    assert record.step == 12 and record.site == "blocks.1.mlp.post"
    assert record.lm.token_store == store_dir and record.lm.dir == byte_llama
    e = json.loads((tmp_path / "sae" / "eval.json").read_text())  # spliced into the import
    assert e["step"] == 12 and e["eval_data"] == "LM validation split"
    assert np.isfinite(e["frac_loss_recovered"]) and 0 < e["l0"] <= 8
    from saejax.analysis.restore import restore_run

    run = restore_run(str(tmp_path / "sae"))  # analysis reloads the import and the store
    assert isinstance(run.lm, RotaryTransformer)
    f = run.encode_text("def alpha(beta):")
    assert f.shape == (16, 128) and ((f > 0).sum(1) <= 8).all()

    h = harvest_cfg.get_config()
    h.update(lm_dir=byte_llama, store_dir=store_dir, site="blocks.0.resid.mid",
             out_dir=str(tmp_path / "acts"), num_contexts=64, lm_batch_size=16,
             sae_batch_size=256, chunk_mb=0.05)
    run_harvest(from_config(HarvestConfig, h))
    store = ActivationStore.open(str(tmp_path / "acts"))
    plan = store.metadata["plan"]
    assert store.d == 32 and plan["site"] == "blocks.0.resid.mid"
    assert plan["tokens"]["store_dir"] == store_dir and plan["lm"]["dir"] == byte_llama

    with pytest.raises(ConfigError, match="'lm.store_dir' = None is invalid: .* names no token"):
        train(from_config(SAETrainConfig, _sae_hf_config(byte_llama, None, tmp_path / "x")))
    bad = _sae_hf_config(byte_llama, store_dir, tmp_path / "y")
    bad.sae.d_in = 32
    with pytest.raises(ConfigError, match="'sae.d_in' = 32 is invalid"):
        train(from_config(SAETrainConfig, bad))


def test_store_vocabulary_must_fit_the_model(hf_models, tiny_lm_dir, devices):
    from saejax import parallel
    from saejax.activations import restore_lm_source
    from saejax.config import ConfigError, MeshConfig

    store_dir = os.path.join(os.path.dirname(tiny_lm_dir), "tokens")  # 257 ids > 97
    with pytest.raises(ConfigError, match="257 ids, more than the LM's vocabulary of 97"):
        restore_lm_source(hf_models["llama_gqa"][0], "mlp.post", parallel.make_mesh(MeshConfig()),
                          store_dir=store_dir)


def test_sae_hf_config_resolves():
    from experiments import harvest as harvest_cfg
    from experiments import sae_hf, sae_paper
    from saejax.config import ConfigError, from_config
    from saejax.train_config import HarvestConfig, LMSiteConfig, SAETrainConfig

    mlp = from_config(SAETrainConfig, sae_hf.get_config("mlp"))
    resid = from_config(SAETrainConfig, sae_hf.get_config("resid"))
    assert (mlp.lm.site, resid.lm.site) == ("blocks.0.mlp.post", "blocks.0.resid.post")
    assert mlp.lm.store_dir and mlp.sae.architecture == "topk"
    assert from_config(SAETrainConfig, sae_paper.get_config("a0")).lm.store_dir is None
    assert from_config(HarvestConfig, harvest_cfg.get_config()).store_dir is None
    with pytest.raises(ValueError, match="unknown site argument"):
        sae_hf.get_config("attn")
    with pytest.raises(ConfigError, match="lm.store_dir.*read only with an LM"):
        LMSiteConfig(dir=None, store_dir="runs/corpus/x")


@pytest.mark.parametrize("name,centred", [("llama_gqa", False), ("pythia_sequential", True)])
def test_logit_effects_fold_the_final_norm_the_model_has(hf_models, name, centred):
    from saejax.analysis import logits
    from saejax.normalize import Normalizer
    from saejax.sae.bundle import SAEBundle
    from saejax.sae.config import SAEConfig
    from saejax.sae.model import SAEParams

    model = load_hf(hf_models[name][0])
    M, F = model.cfg.d_mlp, 6
    w = jax.random.normal(jax.random.key(0), (F, M))
    sae = SAEBundle(SAEParams(W_enc=w, b_enc=jnp.zeros(F), W_dec=w, b_dec=jnp.zeros(M)),
                    SAEConfig(d_in=M, n_features=F), normalizer=Normalizer(1.0),
                    site="blocks.1.mlp.post")
    r = np.asarray(w) @ np.asarray(model.blocks[1].mlp.w_out[...])  # [F, D]
    gamma, w_u = np.asarray(model.ln_f.scale[...]), np.asarray(model.w_u[...])
    want = ((r - r.mean(-1, keepdims=True)) if centred else r) * gamma @ w_u
    other = ((r if centred else r - r.mean(-1, keepdims=True)) * gamma) @ w_u
    assert np.abs(want - other).max() > 1e-3 * np.abs(want).max()  # the choice matters
    np.testing.assert_allclose(logits.logit_vector(model, sae, 2), want[2], rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())
    got = logits.feature_logit_effects(model, sae, k=3)
    np.testing.assert_array_equal(got["top_ids"], np.argsort(-want, axis=1)[:, :3])


def test_steering_an_imported_model_matches_hf_with_the_same_edit(hf_models):
    from saejax.analysis import steering
    from saejax.normalize import Normalizer
    from saejax.sae.bundle import SAEBundle
    from saejax.sae.config import SAEConfig
    from saejax.sae.model import SAEParams

    directory, hf = hf_models["llama_gqa"]
    model = load_hf(directory)
    M, F = model.cfg.d_mlp, 5
    w = jax.random.normal(jax.random.key(3), (F, M))
    w = w / jnp.linalg.norm(w, axis=1, keepdims=True)  # W_enc[i] . W_dec[i] = 1: clamps read back
    sae = SAEBundle(SAEParams(W_enc=w, b_enc=jnp.zeros(F), W_dec=w, b_dec=jnp.zeros(M)),
                    SAEConfig(d_in=M, n_features=F), normalizer=Normalizer(2.0),
                    site="blocks.0.mlp.post")
    prompts = np.random.default_rng(5).integers(0, V, (2, 4))
    got = steering.steer(model, sae, jnp.asarray(prompts, jnp.int32), feature=1, scale=4.0,
                         length=14, key=jax.random.key(0), temperature=0.0)
    d = torch.tensor(np.asarray(sae.directions()[1]))
    hook = hf.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda mod, inp: (inp[0] + 4.0 * d,))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompts), max_new_tokens=10, min_new_tokens=10,
                          do_sample=False, pad_token_id=0).numpy()
    hook.remove()
    np.testing.assert_array_equal(np.asarray(got), ref)
    plain = steering.steer(model, sae, jnp.asarray(prompts, jnp.int32), feature=1, scale=0.0,
                           length=14, key=jax.random.key(0), temperature=0.0)
    assert (np.asarray(plain) != np.asarray(got)).any()  # the steering changed the text
    clamp = steering.clamp_feature(sae, 2, 3.0)
    pinned = steering.feature_activation(model, sae, jnp.asarray(prompts, jnp.int32), 2,
                                         interventions=(clamp,))
    active = np.asarray(steering.feature_activation(
        model, sae, jnp.asarray(prompts, jnp.int32), 2)) > 0
    assert active.any()  # pinned exactly where the feature fired (a ReLU reads 0 elsewhere)
    np.testing.assert_allclose(np.asarray(pinned)[active], 3.0, rtol=1e-4)


def test_bfloat16_and_sharded_checkpoints(hf_models, tmp_path):
    _, hf = hf_models["pythia_parallel"]
    import copy

    half = copy.deepcopy(hf).to(torch.bfloat16)
    half.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ref_model = half.float().eval()  # the same bf16-rounded weights, run in float32
    toks = np.random.default_rng(8).integers(0, V, (2, T))
    with torch.no_grad():
        ref = ref_model(torch.tensor(toks)).logits.numpy()
    ours = load_hf(str(tmp_path))
    assert _rel(ours(jnp.asarray(toks, jnp.int32)).logits, ref) <= 1e-4
    np.testing.assert_array_equal(np.asarray(ours.wte[...]),
                                  ref_model.gpt_neox.embed_in.weight.detach().numpy())


def test_legacy_config_keys_are_read():
    """Configs written by transformers 4 (the hub's Pythia and Llama files) use the old keys."""
    from saejax.lm.hf_families import llama_config, neox_config

    pythia = {"model_type": "gpt_neox", "vocab_size": 50304, "hidden_size": 512,
              "num_attention_heads": 8, "num_hidden_layers": 6, "intermediate_size": 2048,
              "max_position_embeddings": 2048, "rotary_pct": 0.25, "rotary_emb_base": 10000,
              "use_parallel_residual": True, "layer_norm_eps": 1e-5, "hidden_act": "gelu",
              "tie_word_embeddings": False}
    c = neox_config(pythia)
    assert (c.d_head, c.rotary_dim, c.rope_theta, c.rope_type, c.attn_bias) == (
        64, 16, 10000.0, "default", True)
    llama = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
             "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 16,
             "intermediate_size": 8192, "max_position_embeddings": 131072,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
             "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    c = llama_config(llama)
    assert (c.d_head, c.n_kv_heads, c.rope_theta, c.rope_type, c.rope_factor,
            c.rope_original_max_len, c.tie_embeddings) == (64, 8, 500000.0, "llama3", 32.0,
                                                           8192, True)
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        llama_config({**llama, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
