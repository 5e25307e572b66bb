"""Generation: KV-cache scan == full-forward rollout, ragged prompts, sampling, steering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.lm import model as M
from saejax.lm.config import ModelConfig
from saejax.lm.generate import _generate, generate, sample_logits
from saejax.lm.sites import Add

CFG = ModelConfig(vocab_size=37, max_len=24, d_model=32, n_heads=4, d_mlp=48, n_layers=2)


@pytest.fixture(scope="module")
def model():
    return M.build_model(CFG, seed=2)


def _greedy_reference(model, prompt, length, interventions=()):
    """Re-runs the whole (padded, fixed-shape) sequence every step, no cache: the slow,
    obviously right answer. Causal masking makes the padding after position i irrelevant."""
    graphdef, params = M.split_params(model)
    full = jax.jit(lambda seq: M.forward(graphdef, params, seq[None],
                                         interventions=interventions).logits[0])
    seq = list(prompt)
    while len(seq) < length:
        logits = full(jnp.asarray(seq + [0] * (length - len(seq)), jnp.int32))
        seq.append(int(jnp.argmax(logits[len(seq) - 1])))
    return seq


def test_greedy_matches_uncached_rollout_with_ragged_prompts(model):
    prompts = jnp.asarray([[3, 4, 5, 6], [7, 8, 0, 0], [9, 0, 0, 0]], jnp.int32)
    lens = jnp.asarray([4, 2, 1])
    out = generate(model, prompts, length=16, key=jax.random.key(0), prompt_lens=lens,
                   temperature=0.0)
    assert out.shape == (3, 16) and out.dtype == jnp.int32
    for row, n in enumerate([4, 2, 1]):
        ref = _greedy_reference(model, [int(x) for x in prompts[row, :n]], 16)
        assert out[row].tolist() == ref


def test_sampling_compiles_once_and_respects_top_k(model):
    prompts = jnp.asarray([[1, 2], [3, 4]], jnp.int32)
    before = _generate._cache_size()
    a = generate(model, prompts, length=12, key=jax.random.key(0), temperature=1.0, top_k=3)
    b = generate(model, prompts, length=12, key=jax.random.key(1), temperature=0.7, top_k=3)
    assert _generate._cache_size() == before + 1  # new key/temperature: same program
    np.testing.assert_array_equal(a[:, :2], prompts)
    assert not np.array_equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < CFG.vocab_size
    top1 = generate(model, prompts, length=12, key=jax.random.key(5), top_k=1)
    greedy = generate(model, prompts, length=12, key=jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(top1, greedy)


def test_sample_logits_top_k_never_picks_outside_the_top_k():
    logits = jnp.tile(jnp.arange(10.0), (256, 1))
    s = sample_logits(jax.random.key(0), logits, 5.0, top_k=2)
    assert set(np.unique(s).tolist()) == {8, 9}


def test_generation_accepts_interventions_for_steering(model):
    # Push the final residual stream along token 11's unembedding direction: every greedy
    # token becomes 11 (the random model's logits are too flat for sampling to show it);
    # the greedy uncached rollout with the same intervention agrees.
    direction = model.w_u[...][:, 11]
    steer = (Add("blocks.1.resid.post", direction, 1e3),)
    prompts = jnp.asarray([[3, 4], [5, 6]], jnp.int32)
    out = generate(model, prompts, length=10, key=jax.random.key(0), temperature=0.0,
                   interventions=steer)
    assert (out[:, 2:] == 11).all()
    ref = _greedy_reference(model, [3, 4], 10, interventions=(Add("blocks.0.mlp.out",
                                                                  jnp.ones(32), 0.5),))
    got = generate(model, prompts[:1], length=10, key=jax.random.key(0), temperature=0.0,
                   interventions=(Add("blocks.0.mlp.out", jnp.ones(32), 0.5),))
    assert got[0].tolist() == ref


def test_generate_rejects_too_long(model):
    with pytest.raises(ValueError, match="max_len"):
        generate(model, jnp.zeros((1, 2), jnp.int32), length=25, key=jax.random.key(0))
