"""Ground truth: the SAE recovers known sparse directions; recovery metrics are right."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.config import ConfigError, MeshConfig
from saejax.parallel import make_mesh
from saejax.sae import SAEConfig, init_state, make_resample, make_train_step, should_resample
from saejax.sae import metrics, synthetic


def test_synthetic_generator_is_sparse_nonnegative_and_seeded():
    # Undercomplete and noise-free, so least squares recovers the true coefficients exactly.
    cfg = synthetic.SyntheticConfig(d_in=32, n_true_features=16, mean_active=2.0, noise_std=0.0, seed=3)
    t = synthetic.true_directions(cfg)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, rtol=1e-5)
    x = synthetic.sample(cfg, jax.random.PRNGKey(0), 4000, t)
    c = np.linalg.lstsq(np.asarray(t, np.float64).T, np.asarray(x, np.float64).T, rcond=None)[0].T
    c[np.abs(c) < 1e-4] = 0
    assert c.min() >= 0 and (c[c > 0] >= 0.5 - 1e-3).all()
    np.testing.assert_allclose(np.mean(np.sum(c > 0, axis=1)), 2.0, rtol=0.05)
    np.testing.assert_array_equal(synthetic.true_directions(cfg), t)
    other = synthetic.SyntheticConfig(d_in=32, n_true_features=16, seed=4)
    assert not np.array_equal(synthetic.true_directions(other), t)
    noisy = synthetic.sample(synthetic.SyntheticConfig(d_in=32, n_true_features=16, mean_active=2.0, noise_std=0.1, seed=3),
                             jax.random.PRNGKey(0), 4000, t)
    np.testing.assert_allclose(np.std(np.asarray(noisy) - np.asarray(x)), 0.1, rtol=0.05)
    with pytest.raises(ConfigError, match="synthetic.mean_active"):
        synthetic.SyntheticConfig(n_true_features=4, mean_active=5)


def test_mmcs_and_fraction_recovered():
    t = jnp.eye(4, 8)
    learned = jnp.concatenate([jnp.eye(3, 8) * 2.0, jnp.ones((1, 8))])  # 3 exact matches, scaled
    np.testing.assert_allclose(metrics.max_cosine(learned, t)[:3], 1.0, rtol=1e-6)
    assert metrics.fraction_recovered(learned, t) == 0.75
    np.testing.assert_allclose(metrics.mmcs(learned, t), (3 + 1 / np.sqrt(8)) / 4, rtol=1e-6)


def test_sae_recovers_ground_truth_features():
    """L1 SAE, 2x overcomplete, paper resampling: >= 90% of true features at cos >= 0.9."""
    sc = synthetic.SyntheticConfig(d_in=32, n_true_features=64, mean_active=3.0, noise_std=0.01, seed=0)
    t = synthetic.true_directions(sc)
    steps, batch = 2500, 256
    cfg = SAEConfig(d_in=32, n_features=128, l1_coefficient=1e-2, lr=1e-3, dead_window=100,
                    resample_steps=(250, 500, 750, 1000), resample_sample_size=4096,
                    resample_chunk_size=1024, seed=0)
    mesh = make_mesh(MeshConfig(data=1, model=1), devices=jax.devices()[:1])
    state = init_state(cfg, mesh, synthetic.sample(sc, jax.random.PRNGKey(1), 2048, t))
    step, resample = make_train_step(cfg, mesh), make_resample(cfg, mesh)
    gen = jax.jit(lambda k, n: synthetic.sample(sc, k, n, t), static_argnums=1)
    root = jax.random.PRNGKey(2)
    for i in range(steps):
        state, m = step(state, gen(jax.random.fold_in(root, i), batch))
        if should_resample(cfg, i + 1):
            state, _ = resample(state, gen(jax.random.fold_in(root, 10**6 + i), cfg.resample_sample_size))
    recovered = metrics.fraction_recovered(state.params.W_dec, t, 0.9)
    assert recovered >= 0.9, (recovered, metrics.mmcs(state.params.W_dec, t))
    assert float(m["explained_variance"]) > 0.8
