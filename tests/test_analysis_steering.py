"""Steering: clamping a feature raises its activation and moves the model toward the
feature's top logit tokens; adding its direction does too; the program compiles once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.analysis import logits, steering
from saejax.normalize import Normalizer
from saejax.sae.bundle import SAEBundle
from saejax.lm.config import ModelConfig
from saejax.lm.generate import _generate
from saejax.lm.model import build_model
from saejax.sae.config import SAEConfig
from saejax.sae.model import SAEParams, unit_rows

V, M, F, FEATURE, SCALE = 40, 48, 16, 3, 3.0


@pytest.fixture(scope="module")
def setup():
    model = build_model(ModelConfig(vocab_size=V, max_len=24, d_model=32, n_heads=2, d_mlp=M,
                                    init_std=0.2), seed=3)
    model.w_u[...] = 4.0 * model.w_u[...]  # sharper next-token distributions
    w = unit_rows(jax.random.normal(jax.random.key(1), (F, M)))
    # Encoder = decoder: reading a pinned feature back gives exactly the pinned value
    # wherever it was active (W_enc[i] . d_i = 1).
    sae = SAEBundle(SAEParams(W_enc=w, b_enc=jnp.zeros(F), W_dec=w, b_dec=jnp.zeros(M)),
                    SAEConfig(d_in=M, n_features=F), normalizer=Normalizer(SCALE),
                    site="mlp.post")
    prompts = jax.random.randint(jax.random.key(2), (8, 4), 0, V)
    return model, sae, prompts


def _gen(model, sae, prompts, **kw):
    return steering.steer(model, sae, prompts, feature=FEATURE, length=20,
                          key=jax.random.key(0), temperature=1.0, **kw)


def test_clamp_raises_the_feature_and_shifts_toward_its_logit_tokens(setup):
    model, sae, prompts = setup
    base = steering.generate((model), prompts, length=20, key=jax.random.key(0))
    value = 40.0
    steered = _gen(model, sae, prompts, value=value)
    iv = (steering.clamp_feature(sae, FEATURE, value),)
    act_base = steering.feature_activation(model, sae, base, FEATURE)
    act_steer = steering.feature_activation(model, sae, steered, FEATURE, iv)
    assert float(act_steer.mean()) > 0.9 * value > 4 * float(act_base.mean())
    top = logits.top_token_ids(model, sae, FEATURE, k=5)
    mass_base = steering.next_token_mass(model, base, top)[:, 4:]
    mass_steer = steering.next_token_mass(model, steered, top, iv)[:, 4:]
    # The feature fires naturally too, so its tokens are already likely; pinned high they
    # take almost all of the mass.
    assert float(mass_steer.mean()) > max(0.9, float(mass_base.mean()) + 0.2)
    frac = lambda toks: float(np.isin(np.asarray(toks)[:, 4:], np.asarray(top)).mean())  # noqa: E731
    assert frac(steered) > max(0.9, frac(base) + 0.2)


def test_clamp_to_zero_turns_the_feature_off_and_add_steers(setup):
    model, sae, prompts = setup
    off = (steering.clamp_feature(sae, FEATURE, 0.0),)
    toks = _gen(model, sae, prompts, value=0.0)
    assert float(jnp.abs(steering.feature_activation(model, sae, toks, FEATURE, off)).max()) < 1e-4
    added = _gen(model, sae, prompts, scale=40.0)
    top = logits.top_token_ids(model, sae, FEATURE, k=5)
    assert float(np.isin(np.asarray(added)[:, 4:], np.asarray(top)).mean()) > 0.9


def test_new_values_do_not_recompile_and_bad_arguments_fail(setup):
    model, sae, prompts = setup
    _gen(model, sae, prompts, value=5.0)
    before = _generate._cache_size()
    _gen(model, sae, prompts, value=9.0)
    assert _generate._cache_size() == before
    with pytest.raises(ValueError, match="exactly one"):
        _gen(model, sae, prompts, value=1.0, scale=1.0)
    with pytest.raises(ValueError, match="out of range"):
        steering.clamp_feature(sae, F, 1.0)


def test_steer_text_returns_both_continuations(setup):
    model, sae, _ = setup

    class Tok:  # a toy tokenizer over the 40 ids
        eot_id = 0

        def encode(self, text):
            return [ord(c) % V for c in text]

        def decode(self, ids):
            return "".join(chr(65 + i % 26) for i in ids)

    out = steering.steer_text(model, sae, Tok(), "hello", feature=FEATURE, value=40.0,
                              num_tokens=6, num_samples=2)
    assert len(out["baseline"]) == len(out["steered"]) == 2
    assert all(len(s) == 6 for s in out["baseline"] + out["steered"])


@pytest.mark.slow
def test_launch_steer_end_to_end(tmp_path):
    """Tiny byte corpus -> 4-step LM -> SAE export -> launch/steer.py --json."""
    import json
    import os
    import subprocess
    import sys

    from saejax.sae.bundle import save_bundle
    from saejax.data.corpus import CorpusConfig, CorpusJobConfig
    from saejax.data.loader import LoaderConfig
    from saejax.data.tokenizer import TokenizerConfig
    from saejax.data.corpus import build_token_store
    from saejax.lm.config import LMTrainConfig, OptimConfig
    from saejax.lm.train import train
    from saejax.sae.model import init_params

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text("hello world, steering test. " * 60)
    store = str(tmp_path / "store")
    build_token_store(CorpusJobConfig(
        corpus=CorpusConfig(source="text", path=str(docs), seq_len=32, val_fraction=0.25,
                            out_dir=store), tokenizer=TokenizerConfig(kind="byte")))
    lm_dir = str(tmp_path / "lm")
    train(LMTrainConfig(model=ModelConfig(max_len=32, d_model=32, n_heads=2, d_mlp=64),
                        optim=OptimConfig(warmup_steps=1), loader=LoaderConfig(batch_size=8),
                        store_dir=store, workdir=lm_dir, num_steps=4, eval_every=4,
                        eval_batches=1, checkpoint_every=4, async_checkpoints=False,
                        progress_bar=False))
    cfg = SAEConfig(d_in=64, n_features=32)
    save_bundle(str(tmp_path / "sae.npz"),
                SAEBundle(init_params(jax.random.key(0), cfg, np.zeros(64)), cfg,
                          normalizer=Normalizer(2.0), site="mlp.post"),
                extra={"lm_dir": lm_dir})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, os.path.join(root, "launch", "steer.py"), f"--sae={tmp_path / 'sae.npz'}",
         "--feature=5", "--value=20", "--prompt=hello", "--num_tokens=8", "--num_samples=2",
         "--json"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["feature"] == 5 and len(res["steered"]) == len(res["baseline"]) == 2
    bad = subprocess.run([sys.executable, os.path.join(root, "launch", "steer.py"),
                          f"--sae={tmp_path / 'sae.npz'}", "--feature=5", "--value=1",
                          "--scale=2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "exactly one" in bad.stderr
