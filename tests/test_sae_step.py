"""SAE step: golden float64 reference, gradients, metrics, non-finite guard, setup errors,
paper-scale shapes and memory estimate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.config import ConfigError, MeshConfig, from_config
from saejax.parallel import make_mesh
from saejax.loop import NonFiniteError, check_finite
from saejax.sae import (SAEConfig, abstract_state, estimate_memory, init_state, make_train_step,
                        should_resample)
from saejax.sae import model
from saejax.sae.geometric_median import geometric_median
from saejax.sae import registry
from saejax.sae.registry import get_architecture

D, F, B = 8, 16, 32


@pytest.fixture(scope="module")
def mesh1():
    return make_mesh(MeshConfig(data=1, model=1), devices=jax.devices()[:1])


def _inputs(seed=0, b=B, d=D):
    rng = np.random.RandomState(seed)
    return (rng.randn(b, d) + 0.5).astype(np.float32)


def _copy(tree):
    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def _numpy_step(p, x, l1, lr, b1, b2, eps):
    """Independent float64 reference of one step: forward, loss, grads, projection, Adam, renorm."""
    we, be, wd, bd = (np.asarray(p[k], np.float64) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    x = x.astype(np.float64)
    b, d = x.shape
    xb = x - bd
    pre = xb @ we.T + be
    f = np.maximum(pre, 0)
    xh = f @ wd + bd
    err = xh - x
    mse = np.mean(err ** 2)
    l1_term = l1 * np.sum(np.abs(f)) / b
    loss = mse + l1_term
    dxh = 2 * err / (b * d)
    g_wd = f.T @ dxh
    df = dxh @ wd.T + l1 / b * np.sign(f)
    dpre = df * (pre > 0)
    g_be = dpre.sum(0)
    g_we = dpre.T @ xb
    g_bd = dxh.sum(0) - (dpre @ we).sum(0)
    g_wd = g_wd - np.sum(g_wd * wd, axis=1, keepdims=True) * wd
    new = {}
    for k, w, g in (("W_enc", we, g_we), ("b_enc", be, g_be), ("W_dec", wd, g_wd), ("b_dec", bd, g_bd)):
        m, v = (1 - b1) * g, (1 - b2) * g * g
        mhat, vhat = m / (1 - b1), v / (1 - b2)
        new[k] = w - lr * mhat / (np.sqrt(vhat) + eps)
    new["W_dec"] = new["W_dec"] / np.linalg.norm(new["W_dec"], axis=1, keepdims=True)
    grads = {"W_enc": g_we, "b_enc": g_be, "W_dec": g_wd, "b_dec": g_bd}
    return new, loss, mse, f, grads


def test_golden_one_step_matches_float64_numpy(mesh1):
    cfg = SAEConfig(d_in=D, n_features=F, l1_coefficient=1e-2, lr=1e-3)
    x = _inputs()
    state = init_state(cfg, mesh1, x)
    p0 = {k: np.asarray(getattr(state.params, k)) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    np.testing.assert_allclose(np.linalg.norm(p0["W_dec"], axis=1), 1.0, rtol=1e-6)
    ref, loss, mse, f, _ = _numpy_step(p0, x, cfg.l1_coefficient, cfg.lr, cfg.adam_b1, cfg.adam_b2, cfg.adam_eps)
    assert 0 < (f > 0).mean() < 1  # the ReLU mask is exercised both ways
    step = make_train_step(cfg, mesh1)
    new, m = step(state, jnp.asarray(x))
    for k, want in ref.items():
        np.testing.assert_allclose(np.asarray(getattr(new.params, k)), want, rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(float(m["loss"]), loss, rtol=1e-5)
    np.testing.assert_allclose(float(m["mse"]), mse, rtol=1e-5)
    np.testing.assert_allclose(float(m["l1"]), np.abs(f).sum() / B, rtol=1e-5)
    np.testing.assert_allclose(float(m["l0"]), (f > 0).sum() / B, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(m["feature_counts"]), (f > 0).sum(0))
    ev = 1 - np.sum((x - (np.maximum((x - p0["b_dec"]) @ p0["W_enc"].T + p0["b_enc"], 0) @ p0["W_dec"]
                          + p0["b_dec"])) ** 2) / np.sum((x - x.mean(0)) ** 2)
    np.testing.assert_allclose(float(m["explained_variance"]), ev, rtol=1e-4)
    assert int(new.step) == 1
    assert not bool(m["nonfinite"])


@pytest.mark.parametrize("feature_major", [True, False])
@pytest.mark.parametrize("arch", registry.architecture_names())  # every registered one
def test_handwritten_gradients_match_autodiff(arch, feature_major):
    # Both layouts of the hand-written backward (the architecture picks one by default).
    cfg = SAEConfig(d_in=D, n_features=F, architecture=arch, k=4, l1_coefficient=3e-2)
    x = jnp.asarray(_inputs(1))
    params = model.init_params(jax.random.PRNGKey(3), cfg, jnp.zeros((D,)) + 0.1)
    params = params.replace(b_enc=jax.random.normal(jax.random.PRNGKey(4), (F,)) * 0.1)
    out = model.forward_backward(params, x, cfg, feature_major=feature_major)
    auto_loss, auto = jax.value_and_grad(lambda p: jnp.mean(model.per_input_loss(p, x, cfg)))(params)
    np.testing.assert_allclose(out.loss, auto_loss, rtol=1e-6)
    # The training form (BatchTopK's batch-wide selection; encode defaults to inference).
    x_hat = model.decode(params, model.encode(params, x, cfg, model.train_context(cfg)), cfg)
    np.testing.assert_allclose(out.x_hat, x_hat, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.f.shape, (B, F))
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(getattr(out.grads, k), getattr(auto, k), rtol=1e-4, atol=1e-7, err_msg=k)


def _auxk_reference_loss(params, x, cfg, stale, candidates):
    """Dense AuxK for jax.grad: dead features restricted to ``candidates``, threshold fixed."""
    x_hat = model.decode(params, model.encode(params, x, cfg), cfg)
    e = jax.lax.stop_gradient(x - x_hat)
    pre = (x - params.b_dec) @ params.W_enc.T + params.b_enc
    dead = jnp.asarray((stale >= cfg.dead_window) & candidates)
    masked = jnp.where(dead, pre, -jnp.inf)
    kth = jax.lax.stop_gradient(jnp.min(jax.lax.top_k(masked, cfg.aux_k)[0], axis=-1, keepdims=True))
    z = jnp.where(dead & (masked >= kth) & (pre > 0), pre, 0.0)
    scale = cfg.aux_coefficient * min(int(np.sum(stale >= cfg.dead_window)) / cfg.aux_k, 1.0)
    return scale * jnp.mean(jnp.square(z @ params.W_dec - e))


@pytest.mark.parametrize("candidates", [F, 4])
def test_auxk_gradients_match_autodiff(candidates):
    cfg = SAEConfig(d_in=D, n_features=F, architecture="topk", k=4, aux_k=3, aux_candidates=candidates,
                    aux_coefficient=0.5, dead_window=10)
    x = jnp.asarray(_inputs(3))
    params = model.init_params(jax.random.PRNGKey(5), cfg, jnp.zeros((D,)) + 0.1)
    params = params.replace(b_enc=jax.random.normal(jax.random.PRNGKey(6), (F,)) * 0.1)
    stale = np.zeros((F,), np.int32)
    stale[[1, 4, 6, 9, 13]] = [10, 40, 25, 11, 30]  # five dead, distinct staleness
    # The AuxK candidates are the longest-dead: all five, or (4 of them) all but feature 1.
    cand = np.zeros((F,), bool)
    cand[[4, 13, 6, 9, 1][:candidates]] = True
    out = model.forward_backward(params, x, cfg, stale=jnp.asarray(stale))
    plain = model.forward_backward(params, x, cfg)

    def total(p):
        return jnp.mean(model.per_input_loss(p, x, cfg)) + _auxk_reference_loss(p, x, cfg, stale, cand)

    ref_aux = _auxk_reference_loss(params, x, cfg, stale, cand)
    assert float(ref_aux) > 1e-4  # the term is live in this setup
    auto_loss, auto = jax.value_and_grad(total)(params)
    np.testing.assert_allclose(out.aux_loss, ref_aux, rtol=1e-5)
    np.testing.assert_allclose(out.loss, auto_loss, rtol=1e-6)
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(getattr(out.grads, k), getattr(auto, k), rtol=1e-4, atol=1e-7, err_msg=k)
    # Only candidate features' rows see the AuxK gradient.
    for k in ("W_enc", "W_dec", "b_enc"):
        changed = np.any(np.asarray(getattr(out.grads, k) != getattr(plain.grads, k)).reshape(F, -1), axis=1)
        assert changed.any() and not changed[~cand].any(), k


def test_auxk_is_off_without_dead_features_or_stale_counts():
    cfg = SAEConfig(d_in=D, n_features=F, architecture="topk", k=4, aux_k=3, dead_window=10)
    x = jnp.asarray(_inputs(4))
    params = model.init_params(jax.random.PRNGKey(7), cfg, jnp.zeros((D,)))
    plain = model.forward_backward(params, x, cfg)
    fresh = model.forward_backward(params, x, cfg, stale=jnp.full((F,), 9, jnp.int32))
    assert float(plain.aux_loss) == float(fresh.aux_loss) == 0.0
    for a, b in zip(jax.tree.leaves(fresh.grads), jax.tree.leaves(plain.grads), strict=True):
        np.testing.assert_array_equal(a, b)


def _leading_axis_contractions(fn, *args) -> int:
    """Dots whose left operand is a [B, F] / [F, B] array contracted on its leading axis."""
    count = 0
    for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs = eqn.invars[0].aval.shape
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            count += sorted(lhs) == sorted((B, F)) and tuple(lhs_contract) == (0,)
    return count


@pytest.mark.parametrize("arch,expect_feature_major", [("relu", True), ("topk", False)])
def test_feature_major_layout_keeps_big_operands_off_the_slow_contraction(arch, expect_feature_major):
    # On XLA:CPU a dot contracting the leading axis of its big left operand runs ~20% slower;
    # the feature-major layout has none, the batch-major one has two (dW_dec, dW_enc).
    cfg = SAEConfig(d_in=D, n_features=F, architecture=arch, k=4)
    assert get_architecture(arch).feature_major is expect_feature_major
    params = model.init_params(jax.random.PRNGKey(0), cfg, jnp.zeros((D,)))
    x = jnp.asarray(_inputs(2))
    fm = _leading_axis_contractions(lambda p, x: model.forward_backward(p, x, cfg, feature_major=True), params, x)
    bm = _leading_axis_contractions(lambda p, x: model.forward_backward(p, x, cfg, feature_major=False), params, x)
    assert (fm, bm) == (0, 2)


def test_topk_keeps_k_features_and_has_no_l1(mesh1):
    cfg = SAEConfig(d_in=D, n_features=F, architecture="topk", k=3, l1_coefficient=1.0)
    x = _inputs(2)
    state = init_state(cfg, mesh1, x)
    f = model.encode(state.params, jnp.asarray(x), cfg)
    assert int(jnp.max(jnp.sum(f > 0, axis=-1))) <= 3
    _, m = make_train_step(cfg, mesh1)(state, jnp.asarray(x))
    assert float(m["sparsity_loss"]) == 0.0
    np.testing.assert_allclose(float(m["loss"]), float(m["mse"]), rtol=0)


def test_bf16_mode_close_to_f32_and_keeps_f32_params(mesh1):
    x = jnp.asarray(_inputs(3, b=64))
    outs = {}
    for prec in ("f32", "bf16"):
        cfg = SAEConfig(d_in=D, n_features=F, precision=prec)
        state, m = make_train_step(cfg, mesh1)(init_state(cfg, mesh1, x), x)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
        outs[prec] = float(m["loss"])
    assert outs["bf16"] != outs["f32"]  # really a different matmul precision
    np.testing.assert_allclose(outs["bf16"], outs["f32"], rtol=2e-2)


def test_nonfinite_batch_keeps_params_and_raises_on_host(mesh1):
    cfg = SAEConfig(d_in=D, n_features=F)
    x = _inputs(4)
    step = make_train_step(cfg, mesh1)
    state = init_state(cfg, mesh1, x)
    state, m = step(state, jnp.asarray(x))
    check_finite(m, 1)
    before = _copy(state)
    bad = x.copy()
    bad[3, 2] = np.nan
    state, m = step(state, jnp.asarray(bad))
    assert bool(m["nonfinite"])
    for a, b in zip(jax.tree.leaves(before.params) + jax.tree.leaves(before.opt_state),
                    jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(state.last_fired, before.last_fired)
    counts = np.asarray(m["feature_counts"])  # no garbage from casting NaN sums to int
    assert counts.min() >= 0 and counts.max() <= len(bad)
    with pytest.raises(NonFiniteError, match="step 2"):
        check_finite(jax.device_get(m), 2)
    bad[3, 2] = np.inf
    new, m = step(state, jnp.asarray(bad))
    assert bool(m["nonfinite"])
    with pytest.raises(ValueError, match="donated"):  # a consumed state is refused, not a crash
        step(state, jnp.asarray(x))


def test_wrong_input_width_is_a_clear_setup_error(mesh1):
    cfg = SAEConfig(d_in=D, n_features=F)
    with pytest.raises(ConfigError, match="sae.d_in"):
        init_state(cfg, mesh1, np.zeros((10, D + 1), np.float32))
    state = init_state(cfg, mesh1, _inputs())
    with pytest.raises(ConfigError, match="sae.d_in"):
        make_train_step(cfg, mesh1)(state, jnp.zeros((B, D + 1)))


def test_config_validation_names_field():
    with pytest.raises(ConfigError, match="sae.architecture"):
        SAEConfig(architecture="gelu")
    with pytest.raises(ConfigError, match="sae.aux_k.*'topk'"):
        SAEConfig(aux_k=8)
    with pytest.raises(ConfigError, match="sae.aux_k.*aux_candidates"):
        SAEConfig(architecture="topk", aux_k=64, aux_candidates=32)
    with pytest.raises(ConfigError, match="sae.precision"):
        SAEConfig(precision="fp8")
    with pytest.raises(ConfigError, match="sae.resample_steps"):
        SAEConfig(resample_steps=(50, 25))
    with pytest.raises(ConfigError, match="sae.resample_sample_size"):
        SAEConfig(resample_sample_size=1000, resample_chunk_size=300)
    with pytest.raises(ConfigError, match="sae.k"):
        SAEConfig(n_features=16, k=17, architecture="topk")
    cfg = from_config(SAEConfig, {"d_in": 4, "n_features": 8, "resample_steps": [2, 4]}, prefix="sae")
    assert cfg.resample_steps == (2, 4)
    assert should_resample(cfg, 4) and not should_resample(cfg, 3)


def test_mesh_must_split_features():
    mesh = make_mesh(MeshConfig(data=1, model=8))
    with pytest.raises(ConfigError, match="sae.n_features"):
        make_train_step(SAEConfig(d_in=D, n_features=12), mesh)


def test_optimizer_moments_sharded_like_params():
    mesh = make_mesh(MeshConfig(data=2, model=4))
    cfg = SAEConfig(d_in=D, n_features=F)
    state = init_state(cfg, mesh, _inputs())
    adam = state.opt_state[0]
    for moments in (adam.mu, adam.nu):
        for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert getattr(moments, k).sharding.is_equivalent_to(getattr(state.params, k).sharding, 2 if k[0] == "W" else 1)
    assert not adam.mu.W_enc.sharding.is_fully_replicated
    assert state.params.W_dec.addressable_shards[0].data.shape == (F // 4, D)


def test_geometric_median_matches_numpy_weiszfeld():
    rng = np.random.RandomState(0)
    x = np.concatenate([rng.randn(200, 3), 100 + rng.randn(20, 3)]).astype(np.float32)
    y = x.astype(np.float64).mean(0)
    for _ in range(500):
        w = 1 / np.maximum(np.linalg.norm(x - y, axis=1), 1e-6)
        y = (w[:, None] * x).sum(0) / w.sum()
    got = np.asarray(geometric_median(jnp.asarray(x), iters=500))
    np.testing.assert_allclose(got, y, atol=1e-3)
    assert np.linalg.norm(got) < 2  # robust to the outlier cluster, unlike the mean


def test_paper_largest_config_eval_shape_and_memory():
    from saejax.parallel import named_sharding
    from saejax.sae.step import BATCH_AXES

    cfg = SAEConfig(d_in=512, n_features=131_072)
    mesh = make_mesh(MeshConfig(data=2, model=4))
    abstract = abstract_state(cfg, mesh)
    assert abstract.params.W_enc.shape == (131_072, 512)
    assert abstract.opt_state[0].nu.W_dec.shape == (131_072, 512)
    step = make_train_step(cfg, mesh).jitted
    new, metrics = jax.eval_shape(step, abstract, jax.ShapeDtypeStruct((8192, 512), jnp.float32))
    assert new.params.W_dec.shape == (131_072, 512)
    assert metrics["feature_counts"].shape == (131_072,)
    est = estimate_memory(cfg, mesh, batch_size=8192)
    assert est["total"] == sum(v for k, v in est.items() if k != "total")
    single = estimate_memory(cfg, make_mesh(MeshConfig(data=1, model=1), devices=jax.devices()[:1]), 8192)
    assert single["total"] > 7 * est["total"]

    # The estimate against XLA's buffer assignment for the compiled step (compiled, never
    # run: ~3 s per mesh on CPU). memory_analysis() describes one device's partition of
    # the SPMD program, so its numbers are per device, like the estimate's.
    def xla_memory(mesh, est):
        sharding = named_sharding(mesh, BATCH_AXES)
        batch = jax.ShapeDtypeStruct((8192, 512), jnp.float32, sharding=sharding)
        lowered = make_train_step(cfg, mesh).jitted.lower(abstract_state(cfg, mesh), batch)
        mem = lowered.compile().memory_analysis()
        assert mem is not None, "no memory analysis on this backend"
        batch_bytes = int(np.prod(sharding.shard_shape(batch.shape))) * 4
        state = mem.argument_size_in_bytes - batch_bytes
        # Everything live at once: the inputs, XLA's temporaries and the outputs, less the
        # outputs written into the donated inputs.
        peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes)
        est_state = est["params"] + est["optimizer"] + est["counters"]
        print(f"mesh {dict(mesh.shape)}: XLA arguments {mem.argument_size_in_bytes:,} "
              f"(state {state:,}), temp {mem.temp_size_in_bytes:,}, outputs "
              f"{mem.output_size_in_bytes:,}, aliased {mem.alias_size_in_bytes:,}, peak {peak:,}; "
              f"estimate state {est_state:,}, total {est['total']:,} "
              f"({est['total'] / peak:.3f} x peak)")
        # The state is donated: all of it is written in place.
        assert mem.alias_size_in_bytes == state
        # params + Adam moments + counters are the state's arrays, exactly, except for the
        # three scalars the estimate leaves out (RNG key 8 B, step 4 B, Adam count 4 B).
        assert 0 <= state - est_state <= 64
        return peak

    # The paper's mesh, where the [B, F] activations dominate: the estimate is an upper
    # bound, and not a loose one. 1.25: XLA fuses away some of the four f32 [B, F] buffers
    # the estimate counts (observed 1.165 here with jax 0.10.2; a wrong shard size, or a
    # [B, F] buffer more or less, moves the ratio past 1.25 or below 1).
    peak = xla_memory(mesh, est)
    assert peak <= est["total"] <= 1.25 * peak
    # A data-parallel mesh, where the replicated state (4 copies of the params, counting
    # the update) weighs as much as the activations: XLA keeps every buffer the estimate
    # counts, so the two agree closely (observed 0.9999: the estimate leaves out a few
    # [B, D] temporaries, 2 MB of 4.8 GB). 2% catches any of its terms counted wrong
    # except the batch (0.1% of the total; dropping update_copy, 22%, fails here only).
    data_mesh = make_mesh(MeshConfig(data=8, model=1))
    est_data = estimate_memory(cfg, data_mesh, batch_size=8192)
    peak_data = xla_memory(data_mesh, est_data)
    assert 0.98 * peak_data <= est_data["total"] <= 1.02 * peak_data
