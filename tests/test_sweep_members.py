"""Sweeps whose member axis is split over the mesh ("members" layout, saejax.sae.sweep_step).

Each device holds whole dictionaries of N / M members: the group step equals each member's
single step on the data part of the mesh, the stack is really split (a device holds its own
members only), the layout is chosen as documented, and a whole sweep in this layout
resumes exactly and restores its members on their own."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from saejax.config import ConfigError
from saejax.record import load_sae
from saejax.sae import sweep_step as sw
from saejax.sae.config import SAEConfig
from saejax.sae.step import init_state, make_train_step
from saejax.sweep import train_sweep
from test_sweep import assert_states_equal, assert_trees_equal, host, sweep_config

CASES = {
    "relu": (dict(), [dict(l1_coefficient=1e-2), dict(l1_coefficient=3e-2, lr=3e-3, seed=1),
                      dict(l1_coefficient=1e-2, seed=2), dict(l1_coefficient=2e-2, seed=3)]),
    "topk": (dict(aux_k=8), [dict(k=4), dict(k=8, seed=2), dict(k=6, aux_coefficient=0.1),
                             dict(k=4, seed=3)]),
    # The sparse kernel's own shard_map over "data", inside the step's over "model".
    "topk_sparse": (dict(architecture="topk", aux_k=8, step_kernel="sparse"),
                    [dict(k=4), dict(k=8, seed=2), dict(k=6, aux_coefficient=0.1), dict(k=4, seed=3)]),
    # The sparse BatchTopK kernel, nested the same way; its threshold's counts cross "data".
    "batchtopk_sparse": (dict(architecture="batchtopk", aux_k=8, step_kernel="sparse"),
                         [dict(k=4), dict(k=8, seed=2), dict(k=4, seed=1), dict(k=6, seed=3)]),
    # The threshold is over the global batch, which "data" splits.
    "batchtopk": (dict(aux_k=8), [dict(k=4), dict(k=8, seed=2), dict(k=4, seed=1), dict(k=6, seed=3)]),
    "jumprelu": (dict(), [dict(l0_coefficient=1e-2), dict(l0_coefficient=3e-2, lr=3e-3),
                          dict(l0_coefficient=1e-2, seed=1), dict(l0_coefficient=2e-2, seed=2)]),
}


def mesh_of(devices, d, m):
    return Mesh(np.array(devices[:d * m]).reshape(d, m), ("data", "model"))


def group_of(case: str, layout: str = "members") -> sw.Group:
    extra, overrides = CASES[case]
    base = SAEConfig(d_in=16, n_features=64, dead_window=3,
                     **({"architecture": case} if case in ("relu", "topk", "batchtopk", "jumprelu") else {}),
                     **extra)
    configs = [dataclasses.replace(base, **o) for o in overrides]
    (group,) = sw.make_groups([f"m{i}" for i in range(len(configs))], configs)
    return dataclasses.replace(group, layout=layout)


@pytest.mark.parametrize("case, shape", [
    ("relu", (2, 4)), ("topk", (2, 4)), ("topk_sparse", (2, 4)), ("batchtopk", (2, 4)),
    ("jumprelu", (2, 4)), ("topk_sparse", (4, 2)), ("batchtopk_sparse", (2, 4)),
    pytest.param("relu", (4, 2), marks=pytest.mark.slow),
    pytest.param("batchtopk", (4, 2), marks=pytest.mark.slow),
    pytest.param("topk", (1, 4), marks=pytest.mark.slow),
])
def test_members_layout_equals_each_member_alone_on_the_data_mesh(case, shape, devices):
    """12 steps with a dead window of 3 (AuxK, BatchTopK thresholds, resampling-free):
    each member, trained with whole dictionaries on its own devices, equals its single-run
    step on a data x 1 mesh of the same data width bit for bit (BatchTopK's running
    threshold to an ulp per step, see test_sweep.assert_states_equal), and the stack is split:
    one device holds N / M whole members."""
    d, m = shape
    mesh = mesh_of(devices, d, m)
    group = group_of(case)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((12, 256, 16)).astype(np.float32) * 2
    if case == "batchtopk_sparse":  # rows of one norm: most batches need no dense fallback
        xs *= 4 / np.linalg.norm(xs, axis=-1, keepdims=True)
    stack = sw.init_stack(group, mesh, xs[0])
    step = sw.make_group_step(group, mesh)
    paths = []
    for t in range(12):
        stack, metrics = step(stack, jnp.asarray(xs[t]), step=t)
        paths.append(np.asarray(metrics.get("threshold_path", 0)))
    if case == "batchtopk_sparse":
        assert np.min(paths) < 2  # the kernel's own path ran, not only the dense fallback
    w = stack.params.W_enc
    assert w.sharding.spec == PartitionSpec("model", None, None)
    assert w.addressable_shards[0].data.shape == (group.size // m, *w.shape[1:])
    assert metrics["feature_counts"].shape == (group.size, 64)
    assert metrics["feature_counts"].sharding.spec[0] == "model"

    data_mesh = mesh_of(devices, d, 1)
    get = sw.member_getter(group, mesh)
    # Members 1 and 3: on devices other than the first, and (M = 2) second on their device;
    # all four are compared with the other layout below.
    for i, c in [(i, group.configs[i]) for i in (1, 3)]:
        alone, single = init_state(c, data_mesh, xs[0]), make_train_step(c, data_mesh)
        for t in range(12):
            alone, m1 = single(alone, jnp.asarray(xs[t]), step=t)
        if case.endswith("_sparse"):
            # The sparse kernel's shard_map nests inside the step's here: another program,
            # which rounds a few weights by 1 ulp (measured: 4 of 1,024 after 12 steps);
            # which features fire is still the same, bit for bit, below.
            for a, b in zip(jax.tree.leaves(host(get(stack, i))), jax.tree.leaves(host(alone)), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8, err_msg=f"{case} member {i}")
        else:
            assert_states_equal(get(stack, i), alone, f"{case} member {i}")
            assert float(metrics["loss"][i]) == float(m1["loss"])
        np.testing.assert_array_equal(np.asarray(metrics["feature_counts"][i]),
                                      np.asarray(m1["feature_counts"]))


def test_members_layout_equals_the_features_layout(devices):
    """The same group, stack split by members or each dictionary split over "model": equal
    to float rounding (the features layout sums partial reconstructions over "model")."""
    mesh = mesh_of(devices, 2, 4)
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((6, 128, 16)).astype(np.float32)
    out = {}
    for layout in sw.LAYOUTS:
        group = group_of("topk", layout)
        stack, step = sw.init_stack(group, mesh, xs[0]), sw.make_group_step(group, mesh)
        for t in range(6):
            stack, _ = step(stack, jnp.asarray(xs[t]), step=t)
        out[layout] = host(stack)
    for a, b in zip(jax.tree.leaves(out["members"]), jax.tree.leaves(out["features"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_the_layout_is_chosen_as_documented(devices):
    four = group_of("relu", "features")
    three = dataclasses.replace(four, names=four.names[:3], configs=four.configs[:3])
    wide, flat = mesh_of(devices, 2, 4), mesh_of(devices, 8, 1)
    assert sw.choose_layout(four, wide, "auto") == "members"
    assert sw.choose_layout(three, wide, "auto") == "features"
    assert sw.choose_layout(four, wide, "features") == "features"
    assert sw.choose_layout(four, flat, "members") == "features"  # nothing to split over
    with pytest.raises(ConfigError, match=r"^member_sharding='members' needs each group's members to "
                                          r"split evenly over mesh axis 'model' \(4 devices\); the group "
                                          r"m0, m1, m2 has 3 \(add or drop members"):
        sw.choose_layout(three, wide, "members")
    with pytest.raises(ConfigError, match="group layout 'rows' must be one of"):
        dataclasses.replace(four, layout="rows")
    # Whole dictionaries need a larger working set than slices; "auto" falls back when only
    # the sliced layout fits.
    big = [dataclasses.replace(g, configs=tuple(dataclasses.replace(c, d_in=512, n_features=16384)
                                                  for c in g.configs)) for g in (four,)]
    members = sw.estimate_sweep_memory(sw.layout_groups(big, wide, "members", 4096), wide, 4096)
    features = sw.estimate_sweep_memory(sw.layout_groups(big, wide, "features", 4096), wide, 4096)
    # The dictionaries' bytes split another way; the small replicated parts (b_dec, steps)
    # of only N / M members.
    assert members["states"] < features["states"] < 1.001 * members["states"]
    assert members["step_working_set"] > features["step_working_set"]
    assert [g.layout for g in sw.layout_groups(big, wide, "auto", 4096, limit=members["total"])] == ["members"]
    assert [g.layout for g in sw.layout_groups(big, wide, "auto", 4096, limit=members["total"] - 1)] == ["features"]
    with pytest.raises(ConfigError, match="config field 'member_sharding' = 'rows' is invalid"):
        sweep_config("lm", "w", member_sharding="rows")


TWO_GROUPS = [dict(name="relu_a", sae=dict(l1_coefficient=1e-3)),
              dict(name="relu_b", sae=dict(l1_coefficient=3e-3, lr=2e-3, seed=1)),
              dict(name="topk_8", sae=dict(architecture="topk", k=8, aux_k=16)),
              dict(name="topk_16", sae=dict(architecture="topk", k=16, aux_k=16, seed=2))]


def test_a_sweep_split_by_members_resumes_exactly_and_restores_each_member(tiny_lm_dir, tmp_path):
    """A 4-member sweep (two groups of 2) on a 4 x 2 mesh, 20 steps with resampling at 10:
    stopped at 15 and resumed, it equals the uninterrupted sweep bit for bit; it equals the
    features layout to float rounding; each member restores on its own from its checkpoint."""
    over = {"mesh.data": 4, "mesh.model": 2, "num_steps": 20, "sae.resample_steps": (10,)}
    full = train_sweep(sweep_config(tiny_lm_dir, tmp_path / "full", TWO_GROUPS, member_sharding="members", **over))
    work = tmp_path / "stopped"
    assert train_sweep(sweep_config(tiny_lm_dir, work, TWO_GROUPS, member_sharding="members", **over),
                       stop_at=15)["step"] == 15
    again = train_sweep(sweep_config(tiny_lm_dir, work, TWO_GROUPS, member_sharding="members", **over))
    assert again["step"] == 20
    sliced = train_sweep(sweep_config(tiny_lm_dir, tmp_path / "sliced", TWO_GROUPS,
                                      member_sharding="features", **over))
    for m in TWO_GROUPS:
        name = m["name"]
        assert_trees_equal(again["bundles"][name].params, full["bundles"][name].params, name)
        assert [r["step"] for r in full["members"][name]["resamples"]] == [10]
        assert [r["n_dead"] for r in full["members"][name]["resamples"]] == \
            [r["n_dead"] for r in sliced["members"][name]["resamples"]]
        for a, b in zip(jax.tree.leaves(host(full["bundles"][name].params)),
                        jax.tree.leaves(host(sliced["bundles"][name].params)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=name)
        restored, _ = load_sae(str(tmp_path / "full"), member=name)
        assert_trees_equal(restored.params, full["bundles"][name].params, name)
