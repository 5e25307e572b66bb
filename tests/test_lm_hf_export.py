"""saejax's LM -> HF GPT-2 folder -> transformers' GPT2LMHeadModel gives the same logits."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.lm.config import ModelConfig
from saejax.lm.hf_export import export_gpt2, gpt2_config
from saejax.lm.hf_import import load_gpt2
from saejax.lm.model import build_model, split_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _perturbed(cfg: ModelConfig, seed: int):
    """A random model whose LayerNorms and biases are not the init's ones and zeros."""
    graphdef, params = split_params(build_model(cfg, seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape)
                          if p.ndim == 1 else p, params)
    from flax import nnx

    return nnx.merge(graphdef, params)


def _hf_logits(directory, toks):
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        return hf, hf(torch.tensor(toks)).logits.numpy()


@pytest.mark.parametrize("activation,tied", [("relu", False), ("gelu_new", True),
                                             ("gelu", False)])
def test_export_logits_match_transformers(tmp_path, activation, tied):
    cfg = ModelConfig(vocab_size=257, max_len=24, d_model=32, n_heads=4, d_mlp=80, n_layers=2,
                      activation=activation, tie_embeddings=tied, layer_norm_eps=3e-5)
    ours = _perturbed(cfg, seed=3)
    out = export_gpt2(ours, str(tmp_path / "hf"))
    toks = np.random.default_rng(0).integers(0, 257, (3, 24))
    hf, ref = _hf_logits(out, toks)
    assert hf.config.tie_word_embeddings == tied and hf.config.layer_norm_epsilon == 3e-5
    logits = ours(jnp.asarray(toks, jnp.int32)).logits
    assert _rel(logits, ref) <= 1e-4
    if not tied:  # the exported lm_head is ours, not a copy of wte
        np.testing.assert_array_equal(hf.lm_head.weight.detach().numpy(),
                                      np.asarray(ours.w_u[...]).T)
    back = load_gpt2(out)  # and back into saejax
    assert back.cfg == ours.cfg
    np.testing.assert_array_equal(back(jnp.asarray(toks, jnp.int32)).logits, logits)
    with pytest.raises(FileExistsError, match="overwrite"):
        export_gpt2(ours, out)


def test_export_refuses_what_gpt2_cannot_express():
    with pytest.raises(ValueError, match="d_head \\* n_heads == d_model"):
        gpt2_config(ModelConfig(vocab_size=11, max_len=8, d_model=16, n_heads=2, d_head=4,
                                d_mlp=32))


def test_export_launcher_on_a_trained_workdir(tiny_lm_dir, tmp_path):
    out = tmp_path / "hf"
    res = subprocess.run([sys.executable, f"{ROOT}/launch/export_lm_hf.py",
                          f"--lm_dir={tiny_lm_dir}", f"--out_dir={out}"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == 256 and config["vocab_size"] == 257  # byte tokenizer
    from saejax.lm.restore import load_lm

    ours, _ = load_lm(tiny_lm_dir)
    toks = np.random.default_rng(1).integers(0, 257, (2, ours.cfg.max_len))
    _, ref = _hf_logits(str(out), toks)
    assert _rel(ours(jnp.asarray(toks, jnp.int32)).logits, ref) <= 1e-4
    again = subprocess.run([sys.executable, f"{ROOT}/launch/export_lm_hf.py",
                            f"--lm_dir={tiny_lm_dir}", f"--out_dir={out}"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    last = again.stderr.strip().splitlines()[-1]
    assert again.returncode == 1 and last.startswith("export_lm_hf: ") and "overwrite" in last


def test_export_writes_a_bpe_store_tokenizer_transformers_reads(tmp_path):
    from saejax.data.tokenizer import train_bpe

    texts = ["def alpha(beta):\n    return beta + 1\n"] * 50 + ["gamma delta epsilon"] * 50
    tok = train_bpe(texts, vocab_size=300)
    tok.save(str(tmp_path / "store"))  # where a token store keeps its tokenizer
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, max_len=8, d_model=16,
                                    n_heads=2, d_mlp=32))
    out = export_gpt2(model, str(tmp_path / "hf"), store_dir=str(tmp_path / "store"))
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["eos_token_id"] == config["bos_token_id"] == tok.eot_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "def gamma(alpha):\n    return delta"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eot_id
