"""Bring your own model: a random local GPT-2 (transformers, no download) == our import."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from saejax.lm.hf_import import (gpt2_model_config, load_gpt2, read_safetensors,
                                  write_safetensors)
from saejax.lm.restore import load_lm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=64, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=100, eos_token_id=100)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm and biases (HF initialises them to 1 / 0)
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(d, safe_serialization=True)
    return str(d), model


def test_gpt2_logits_and_mlp_activations_match(hf_dir):
    directory, hf = hf_dir
    ours = load_gpt2(directory)
    assert ours.cfg.activation == "gelu_new" and ours.cfg.tie_embeddings
    assert ours.cfg.layer_norm_eps == 1e-5 and ours.cfg.d_mlp == 256
    toks = np.random.default_rng(0).integers(0, 101, (3, 40))
    captured = {}
    hooks = [hf.transformer.h[i].mlp.act.register_forward_hook(
        lambda mod, inp, out, i=i: captured.__setitem__(f"post{i}", out.numpy()))
        for i in range(2)]
    hooks += [hf.transformer.h[i].mlp.register_forward_hook(
        lambda mod, inp, out, i=i: captured.__setitem__(f"out{i}", out.numpy()))
        for i in range(2)]
    with torch.no_grad():
        ref = hf(torch.tensor(toks)).logits.numpy()
    for h in hooks:
        h.remove()
    sites = [f"blocks.{i}.mlp.{k}" for i in range(2) for k in ("post", "out")]
    out = ours(jnp.asarray(toks, jnp.int32), sites=sites)
    assert _rel(out.logits, ref) <= 1e-4
    for i in range(2):
        assert _rel(out.acts[f"blocks.{i}.mlp.post"], captured[f"post{i}"]) <= 1e-4
        assert _rel(out.acts[f"blocks.{i}.mlp.out"], captured[f"out{i}"]) <= 1e-4


def test_load_lm_dispatches_hf_directories(hf_dir):
    directory, _ = hf_dir
    model, meta = load_lm(directory)
    assert meta["hf_config_dir"].endswith(directory.rstrip("/").split("/")[-1])
    assert model.cfg.n_layers == 2


def test_safetensors_reader_and_config_checks(hf_dir, tmp_path):
    directory, hf = hf_dir
    w = read_safetensors(f"{directory}/model.safetensors")
    np.testing.assert_array_equal(w["transformer.h.0.mlp.c_fc.weight"],
                                  hf.transformer.h[0].mlp.c_fc.weight.detach().numpy())
    with open(f"{directory}/config.json") as f:
        hf_cfg = json.load(f)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        gpt2_model_config({**hf_cfg, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(ValueError, match="model_type"):
        gpt2_model_config({**hf_cfg, "model_type": "llama"})
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
        load_gpt2(str(tmp_path))


def test_safetensors_write_round_trip_and_corrupt_file(tmp_path):
    import ml_dtypes

    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
               "b": np.asarray([1.5, -2.0], ml_dtypes.bfloat16),
               "c": np.arange(6, dtype=np.int64).reshape(2, 3).T}  # not contiguous
    write_safetensors(str(tmp_path / "x.safetensors"), tensors, metadata={"format": "np"})
    back = read_safetensors(str(tmp_path / "x.safetensors"))
    assert sorted(back) == ["a", "b", "c"]
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "x.safetensors"))["a"], torch.tensor(tensors["a"]))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10" * 64)
    with pytest.raises(ValueError, match="bad.safetensors: not a readable safetensors file"):
        read_safetensors(str(tmp_path / "bad.safetensors"))
