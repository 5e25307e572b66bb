"""Sweeps: many dictionaries from one activation pass (saejax.sweep, saejax.sae.sweep_step).

A member equals the same SAE trained alone on the same stream with the same seed (with
resampling inside the run); the group step equals the single step on every mesh; a sweep
resumed after an interruption or SIGKILL equals the uninterrupted one; each member restores
on its own; bad sweeps fail at setup in one line."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from saejax.config import ConfigError, from_config
from saejax.record import load_record, load_sae
from saejax.sae import sweep_step as sw
from saejax.sae.config import SAEConfig
from saejax.sae.step import init_state, make_train_step
from saejax.sweep import sweep_groups, train_sweep
from saejax.train import train
from saejax.train_config import SAETrainConfig, SweepConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEMBERS = [dict(name="relu_a", sae=dict(l1_coefficient=1e-3)),
           dict(name="relu_b", sae=dict(l1_coefficient=3e-3, lr=2e-3, seed=1)),
           dict(name="topk_8", sae=dict(architecture="topk", k=8, aux_k=16)),
           dict(name="topk_16", sae=dict(architecture="topk", k=16, aux_k=16, seed=2))]


def sweep_dict(lm_dir, workdir, members=MEMBERS, **overrides):
    from experiments import sae_tiny

    cd = sae_tiny.get_config()
    cd.lm.dir = lm_dir
    cd.workdir = str(workdir)
    cd.progress_bar = False
    cd.num_steps = 30
    cd.sae.resample_steps = (10, 20)
    cd.eval.every = 1000  # the final evaluation only
    cd.checkpoint.every = 10
    cd.members = [ml_collections.ConfigDict(m) for m in members]
    cd.update_from_flattened_dict(overrides)
    return cd


def sweep_config(lm_dir, workdir, members=MEMBERS, **overrides) -> SweepConfig:
    return from_config(SweepConfig, sweep_dict(lm_dir, workdir, members, **overrides))


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b, what):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{what} {path}")


def assert_states_equal(a, b, what, steps=12):
    """Two train states after ``steps`` steps bit for bit, except BatchTopK's running
    threshold (an EMA the step keeps, not a trained parameter): within one ulp per step.
    Measured (2026-12-02, group step vs single step on a 4- or 8-way "data" split): every
    parameter and Adam moment stays bit-equal through 12 steps while the EMA's update rounds
    differently at some steps (also when both programs take the same threshold path; a
    different kept value would move it by far more than an ulp), drifting up to 3 ulp; the
    cause is not found."""
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        if any(getattr(k, "key", None) == "threshold" for k in path) and np.ndim(x) == 0:
            np.testing.assert_array_max_ulp(np.asarray(x), np.asarray(y), maxulp=steps)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{what} {path}")


# ---------------------------------------------------------------------------------------
# The group step
# ---------------------------------------------------------------------------------------


GROUPS = {
    "relu": [dict(l1_coefficient=1e-2), dict(l1_coefficient=3e-2, lr=3e-3, seed=1)],
    "topk": [dict(k=4), dict(k=8, seed=2), dict(k=6, aux_coefficient=0.1)],
    "batchtopk": [dict(k=4), dict(k=8, seed=2)],
    "jumprelu": [dict(l0_coefficient=1e-2), dict(l0_coefficient=3e-2, lr=3e-3)],
}


@pytest.mark.parametrize("arch", sorted(GROUPS))
@pytest.mark.parametrize("shape", [(1, 1), (2, 4),
                                   pytest.param((8, 1), marks=pytest.mark.slow),
                                   pytest.param((1, 8), marks=pytest.mark.slow)])
def test_group_step_equals_each_member_alone_bit_for_bit(arch, shape, devices):
    """12 steps with a dead window of 3 (AuxK and BatchTopK thresholds in play): each
    member of the stacked step equals its own single-run step on the same mesh exactly
    (BatchTopK's running threshold to an ulp per step, :func:`assert_states_equal`),
    and the sharded group equals the one-device group (float tolerance)."""
    d, m = shape
    mesh = jax.sharding.Mesh(np.array(devices[:d * m]).reshape(d, m), ("data", "model"))
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((12, 256, 16)).astype(np.float32) * 2
    extra = {"aux_k": 8} if arch in ("topk", "batchtopk") else {}
    base = SAEConfig(d_in=16, n_features=64, architecture=arch, dead_window=3, **extra)
    configs = [dataclasses.replace(base, **o) for o in GROUPS[arch]]
    (group,) = sw.make_groups([f"m{i}" for i in range(len(configs))], configs)
    stack = sw.init_stack(group, mesh, xs[0])
    step = sw.make_group_step(group, mesh)
    for t in range(12):
        stack, metrics = step(stack, jnp.asarray(xs[t]), step=t)
    assert metrics["loss"].shape == (len(configs),)
    assert metrics["feature_counts"].shape == (len(configs), 64)
    get = sw.member_getter(group, mesh)
    for i, c in enumerate(configs):
        alone, single = init_state(c, mesh, xs[0]), make_train_step(c, mesh)
        for t in range(12):
            alone, m1 = single(alone, jnp.asarray(xs[t]), step=t)
        assert_states_equal(get(stack, i), alone, f"{arch} member {i}")
        assert float(metrics["loss"][i]) == float(m1["loss"])
    if shape != (1, 1):
        mesh1 = jax.sharding.Mesh(np.array(devices[:1]).reshape(1, 1), ("data", "model"))
        ref = sw.init_stack(group, mesh1, xs[0])
        step1 = sw.make_group_step(group, mesh1)
        for t in range(12):
            ref, _ = step1(ref, jnp.asarray(xs[t]), step=t)
        for a, b in zip(jax.tree.leaves(host(stack)), jax.tree.leaves(host(ref)), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_groups_are_formed_by_shape_and_trace_only_what_differs():
    base = SAEConfig(d_in=16, n_features=64)
    configs = [base, dataclasses.replace(base, l1_coefficient=0.5, seed=3),
               dataclasses.replace(base, n_features=128),
               dataclasses.replace(base, architecture="topk", k=4),
               dataclasses.replace(base, architecture="topk", k=8)]
    groups = sw.make_groups(list("abcde"), configs)
    assert [g.names for g in groups] == [("a", "b"), ("c",), ("d", "e")]
    assert groups[0].traced == ("l1_coefficient",)
    assert groups[1].traced == ()
    assert groups[2].traced == ("k",) and groups[2].k_max == 8


def test_a_sweep_that_does_not_fit_fails_at_setup_naming_the_bytes(devices):
    mesh = jax.sharding.Mesh(np.array(devices[:1]).reshape(1, 1), ("data", "model"))
    configs = [SAEConfig(d_in=512, n_features=16384, seed=i) for i in range(8)]
    groups = sw.make_groups([f"m{i}" for i in range(8)], configs)
    est = sw.estimate_sweep_memory(groups, mesh, 4096)
    # The stacked state, from eval_shape: 8 x (params + 2 Adam moments) + last_fired etc.
    params = 4 * (2 * 512 * 16384 + 16384 + 512)
    assert est["states"] >= 8 * 3 * params
    with pytest.raises(ConfigError, match=r"needs an estimated .* GiB \([\d,]+ bytes\) per device"):
        sw.check_sweep_memory(groups, mesh, 4096, limit=est["total"] - 1)
    assert sw.check_sweep_memory(groups, mesh, 4096, limit=est["total"])["total"] == est["total"]


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("members, match", [
    ([], r"'members' = 0 is invalid: must list at least one member"),
    ([dict(name="a"), dict(name="a")], r"must have unique names \(repeated: a\)"),
    ([dict(name="a b")], r"'members\[\].name' = 'a b' is invalid"),
    ([dict(name="a", sae=dict(kk=3))], r"sweep member 'a': unknown config field\(s\) \['config.members\[0\].sae.kk'\]"),
    ([dict(name="a", sae=dict(l1_coefficient=-1.0))], r"sweep member 'a': config field 'sae.l1_coefficient' = -1.0"),
    ([dict(name="a", sae=3)], r"'members\[\].sae' of member 'a' = 3 is invalid"),
])
def test_bad_sweep_configs_fail_in_one_line(members, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        sweep_config("lm", tmp_path, members)


def test_members_are_ordinary_run_configs(tmp_path):
    cfg = sweep_config("lm", tmp_path)
    m = cfg.member("topk_16")
    assert type(m) is SAETrainConfig and m.sae.k == 16 and m.sae.seed == 2
    assert m.workdir == os.path.join(str(tmp_path), "members", "topk_16")
    assert m.batch_size == cfg.batch_size and m.lm == cfg.lm and m.source == cfg.source
    assert [g.names for g in sweep_groups(cfg)] == [("relu_a", "relu_b"), ("topk_8", "topk_16")]
    with pytest.raises(ConfigError, match="the sweep has no member 'nope'; its members: relu_a"):
        cfg.member("nope")


# ---------------------------------------------------------------------------------------
# The loop, on the tiny LM
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tiny_lm_dir, tmp_path_factory):
    """A 4-member sweep (two groups) of 30 steps with resampling at 10 and 20."""
    work = tmp_path_factory.mktemp("sweep") / "sweep"
    cfg = sweep_config(tiny_lm_dir, work)
    return cfg, train_sweep(cfg)


def test_each_member_equals_the_same_sae_trained_alone(swept, tiny_lm_dir, tmp_path):
    cfg, summary = swept
    assert summary["step"] == 30
    for name in ("relu_b", "topk_16"):
        alone_cfg = dataclasses.replace(cfg.member(name), workdir=str(tmp_path / name))
        alone = train(alone_cfg)
        assert [r["step"] for r in alone["resamples"]] == [10, 20]
        assert [r["n_dead"] for r in alone["resamples"]] == \
            [r["n_dead"] for r in summary["members"][name]["resamples"]]
        assert_trees_equal(summary["bundles"][name].params, alone["bundle"].params, name)
        mine = summary["members"][name]["eval"]
        for k in ("l0", "mse", "explained_variance", "frac_loss_recovered", "dead_features"):
            assert mine[k] == alone["eval"][k], (name, k)


def test_the_sweep_writes_a_table_a_plot_and_each_members_files(swept):
    cfg, summary = swept
    work = cfg.workdir
    table = open(os.path.join(work, "sweep.md")).read()
    for name in cfg.member_names:
        assert f"| {name} |" in table
        ev = json.load(open(os.path.join(work, "members", name, "eval.json")))
        assert ev["step"] == 30 and ev["l0"] == summary["members"][name]["eval"]["l0"]
        lines = open(os.path.join(work, "members", name, "metrics.jsonl")).read().splitlines()
        assert any("train/loss" in json.loads(r) for r in lines)
    rows = json.load(open(os.path.join(work, "sweep.json")))["rows"]
    assert [r["member"] for r in rows] == list(cfg.member_names)
    assert os.path.getsize(os.path.join(work, "sweep_pareto.png")) > 5000


def test_each_member_restores_on_its_own(swept):
    cfg, summary = swept
    for name in cfg.member_names:
        bundle, record = load_sae(cfg.workdir, member=name)
        assert_trees_equal(bundle.params, summary["bundles"][name].params, name)
        assert record.config == cfg.member(name) and record.step == 30
        assert record.site == "blocks.0.mlp.post"
        assert load_record(cfg.workdir, member=name).config.sae == cfg.member(name).sae
    with pytest.raises(ConfigError, match=r"holds a sweep of 4 dictionaries \(relu_a, relu_b, topk_8, "
                                          r"topk_16\): pass member="):
        load_sae(cfg.workdir)
    with pytest.raises(ConfigError, match="the sweep has no member 'nope'"):
        load_sae(cfg.workdir, member="nope")


def test_restore_run_and_export_of_a_member(swept, tmp_path):
    from saejax.analysis.restore import restore_run
    from saejax.sae.bundle import load_bundle, save_bundle

    cfg, summary = swept
    run = restore_run(cfg.workdir, member="topk_8")
    tokens = np.asarray(run.store.read("val", 0, 8))[:, :32]  # 8 contexts of max_len
    f = np.asarray(run.features(tokens))
    assert f.shape[1] == 256 and np.all(np.sum(f > 0, axis=1) <= 8)
    path = str(tmp_path / "topk_8.npz")
    save_bundle(path, run.sae)
    again, _ = load_bundle(path)
    assert_trees_equal(again.params, summary["bundles"]["topk_8"].params, "export")


def test_a_member_exports_to_saelens_from_the_cli(swept, tmp_path):
    from saejax.interop.saelens import load_saelens

    cfg, summary = swept
    out = tmp_path / "k16"
    proc = subprocess.run([sys.executable, f"{ROOT}/launch/export.py", f"--workdir={cfg.workdir}",
                           "--member=topk_16", f"--out={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["member"] == "topk_16"
    assert json.load(open(out / "cfg.json"))["k"] == 16
    imported, _ = load_saelens(str(out))
    acts = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32) * 3
    want = np.asarray(summary["bundles"]["topk_16"].encode(acts))
    np.testing.assert_allclose(np.asarray(imported.encode(acts)), want, rtol=1e-5, atol=1e-5)
    bad = subprocess.run([sys.executable, f"{ROOT}/launch/export.py", f"--workdir={cfg.workdir}",
                          f"--out={tmp_path / 'x'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "export: ") and "pass member=<name>" in bad.stderr


def test_a_member_is_analysed_from_the_cli(swept, tmp_path):
    """launch/analyze.py on one member: summary.md (the member's evaluation, dead over the
    training window and silence on the analysed tokens named apart), features.json and the
    dashboard, with the member's own training curves; bad flags are one line, exit 2."""
    cfg, summary = swept
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, f"{ROOT}/launch/analyze.py", f"--workdir={cfg.workdir}",
                           "--member=topk_8", "--contexts=16", "--ablation_features=4", "--top_k=3",
                           "--pass_form=sparse", f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "analyze: pass done" in proc.stderr and "tok/s" in proc.stderr  # progress
    text = open(out / "summary.md").read()
    assert text == proc.stdout.split("Open: ")[0].rstrip("\n") + "\n"
    ev = summary["members"]["topk_8"]["eval"]
    assert "member `topk_8`" in text and "step 30" in text and "(topk, k 8)" in text
    assert f"| fraction of loss recovered (zero ablation; evaluation at step 30) | " \
           f"{100 * ev['frac_loss_recovered']:.1f}% |" in text
    assert f"| L0 (mean active features per held-out token) | {ev['l0']:.1f} |" in text
    assert "| dead (silent for the last" in text and "| silent on the analysed tokens |" in text
    data = json.load(open(out / "summary.json"))
    assert data["meta"]["member"] == "topk_8" and data["meta"]["n_contexts"] == 16
    assert data["eval"]["l0"] == ev["l0"] and "train/frac_dead" in data["train"]
    from saejax.analysis import features
    stats = features.load_stats(str(out / "features.json"))
    assert stats["meta"]["n_features"] == cfg.member("topk_8").sae.n_features
    tops = [len(f["top"]) for f in stats["features"]]
    assert max(tops) == 3  # --top_k reached the statistics
    assert stats["meta"]["pass_form"] == "sparse"   # --pass_form too (neurons: their own form)
    if os.path.isfile(out / "neurons.json"):
        assert features.load_stats(str(out / "neurons.json"))["meta"]["pass_form"] == "dense"
    page = open(out / "dashboard" / "index.html").read()
    assert "sweep / topk_8" in page and "plots/training_train_loss.png" in page  # own curves
    # The member remembers where its analysis went: concept search reads it from there.
    from saejax.analysis.report import latest_stats
    assert latest_stats(cfg.workdir, "topk_8") == str(out / "features.json")
    found = subprocess.run([sys.executable, f"{ROOT}/launch/search.py", f"--workdir={cfg.workdir}",
                            "--member=topk_8", "--example=def f(x):", "--top=2"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert found.returncode == 0 and "no analysis" not in found.stdout, found.stderr[-2000:]
    assert f"Pages: file://{out / 'dashboard' / 'feature.html'}?id=<feature>" in found.stdout
    for flags, want in ((["--member=nope"], "the sweep has no member 'nope'"),
                        ([], "pass member=<name>"),
                        (["--member=topk_8", "--contexts=0"], "--contexts=0 must be >= 1"),
                        (["--member=topk_8", "--split=nope"], "nope")):
        bad = subprocess.run([sys.executable, f"{ROOT}/launch/analyze.py", f"--workdir={cfg.workdir}",
                              f"--out={tmp_path / 'x'}", *flags], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        last = bad.stderr.strip().splitlines()[-1]
        assert bad.returncode == 2 and last.startswith("analyze: ") and want in last, (flags, bad.stderr)


def test_concept_search_and_feature_splitting_from_the_cli(swept, tmp_path):
    """launch/search.py ranks a member's features for example texts (scores in order, the
    best fires on an example; without an analysis, baselines are 0 and it says so);
    launch/split.py matches two members' dictionaries; bad flags are one line."""
    cfg, _ = swept
    pointer = os.path.join(cfg.workdir, "members", "topk_8", "analysis_latest.json")
    if os.path.exists(pointer):  # written by the analysis test of this module
        os.remove(pointer)
    proc = subprocess.run([sys.executable, f"{ROOT}/launch/search.py", f"--workdir={cfg.workdir}",
                           "--member=topk_8", "--example=def f(x):", "--example=def g(y):",
                           "--counter=x = 1", "--top=3", "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hits = json.loads(proc.stdout)
    assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert hits[0]["hit_examples"] > 0 and len(hits[0]["where"]) == 2
    table = subprocess.run([sys.executable, f"{ROOT}/launch/search.py", f"--workdir={cfg.workdir}",
                            "--member=topk_8", "--example=def f(x):"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert table.returncode == 0 and "fires most at" in table.stdout and "no analysis" in table.stdout
    out = tmp_path / "split.md"
    n = cfg.member("topk_8").sae.n_features
    split = subprocess.run([sys.executable, f"{ROOT}/launch/split.py", f"--small={cfg.workdir}",
                            "--small_member=topk_8", f"--large={cfg.workdir}",
                            "--large_member=topk_16", f"--out={out}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert split.returncode == 0, split.stderr[-3000:]
    assert f"| small ({n:,}) feature | children | large ({n:,}) features (cosine) |" in split.stdout
    assert out.read_text() in split.stdout
    # A dictionary against itself: every feature carries over to itself, nothing splits.
    same = subprocess.run([sys.executable, f"{ROOT}/launch/split.py", f"--small={cfg.workdir}",
                           "--small_member=topk_8", f"--large={cfg.workdir}",
                           "--large_member=topk_8", "--rows=3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert same.returncode == 0, same.stderr[-3000:]
    assert (f"0 small features split, {n} carried over, 0 unmatched; 0 large features have no "
            "parent") in same.stdout
    assert "| 0 | 1 | 0: 1.00 |" in same.stdout
    for tool, flags, want in (("search", ["--member=topk_8"], "--example"),
                              ("search", ["--member=topk_8", "--example=a", "--top=0"], "--top=0"),
                              ("split", [f"--small={cfg.workdir}", f"--large={tmp_path}/none"],
                               "--large: no directory")):
        extra = [f"--workdir={cfg.workdir}"] if tool == "search" else []
        bad = subprocess.run([sys.executable, f"{ROOT}/launch/{tool}.py", *extra, *flags],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        last = bad.stderr.strip().splitlines()[-1]
        assert bad.returncode == 2 and last.startswith(f"{tool}: ") and want in last, bad.stderr


def test_a_single_runs_workdir_refuses_member_and_a_sweep_refuses_it(swept, tiny_lm_dir, tmp_path):
    from experiments import sae_tiny

    cfg, _ = swept
    cd = sae_tiny.get_config()
    cd.lm.dir, cd.workdir, cd.progress_bar, cd.num_steps = tiny_lm_dir, str(tmp_path / "one"), False, 10
    train(from_config(SAETrainConfig, cd))
    with pytest.raises(ConfigError, match="holds a single run, not a sweep: drop member="):
        load_sae(str(tmp_path / "one"), member="relu_a")
    with pytest.raises(ConfigError, match="holds no sweep checkpoint"):
        train_sweep(sweep_config(tiny_lm_dir, tmp_path / "one"))


def test_an_interrupted_sweep_resumes_to_the_uninterrupted_result(swept, tiny_lm_dir, tmp_path):
    cfg, summary = swept
    work = tmp_path / "stopped"
    first = train_sweep(sweep_config(tiny_lm_dir, work), stop_at=15)  # between resamples
    assert first["step"] == 15
    again = train_sweep(sweep_config(tiny_lm_dir, work))
    assert again["step"] == 30
    for name in cfg.member_names:
        assert_trees_equal(again["bundles"][name].params, summary["bundles"][name].params, name)
        assert again["members"][name]["eval"]["l0"] == summary["members"][name]["eval"]["l0"]
    with pytest.raises(ConfigError, match="members"):
        changed = [dict(m) for m in MEMBERS]
        changed[0] = dict(name="relu_a", sae=dict(l1_coefficient=5e-3))
        train_sweep(sweep_config(tiny_lm_dir, work, changed, num_steps=40))


def _run(args):
    env = dict(os.environ)  # the same 8 fake devices
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_equals_the_uninterrupted_sweep(tiny_lm_dir, tmp_path):
    """The launcher with a sweep config, killed with SIGKILL after a checkpoint, re-run."""
    def flags(work):
        return [f"{ROOT}/launch/train_sae.py", f"--config={ROOT}/experiments/sae_sweep.py:tiny",
                f"--config.lm.dir={tiny_lm_dir}", f"--config.workdir={work}",
                "--config.progress_bar=false"]

    ref = _run(flags(tmp_path / "ref"))
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out
    victim = _run(flags(tmp_path / "killed"))
    ckpts = tmp_path / "killed" / "checkpoints"
    t0 = time.time()
    while not (ckpts.is_dir() and any(p.name.isdigit() and int(p.name) >= 10 for p in ckpts.iterdir())):
        assert victim.poll() is None, victim.communicate()[0]
        assert time.time() - t0 < 600
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # mid-run, possibly mid-save
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    again = _run(flags(tmp_path / "killed"))
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert "resumed the sweep" in out
    rows = json.load(open(tmp_path / "ref" / "sweep.json"))["rows"]
    assert len(rows) == 4
    for row in rows:
        a, _ = load_sae(str(tmp_path / "ref"), member=row["member"])
        b, rec = load_sae(str(tmp_path / "killed"), member=row["member"])
        assert rec.step == 30
        assert_trees_equal(b.params, a.params, row["member"])
        # Each member's metrics are durable: record for record as the uninterrupted run's.
        assert logged(tmp_path / "killed", row["member"]) == logged(tmp_path / "ref", row["member"])


def logged(work, member):
    out = []
    for line in (work / "members" / member / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")})
    return [r for r in out if len(r) > 1]


@pytest.mark.slow
def test_the_launcher_refuses_a_sweep_that_does_not_fit_in_one_line(tiny_lm_dir, tmp_path):
    proc = _run([f"{ROOT}/launch/train_sae.py", f"--config={ROOT}/experiments/sae_sweep.py:tiny",
                 f"--config.lm.dir={tiny_lm_dir}", f"--config.workdir={tmp_path / 'w'}",
                 "--config.sweep_memory_limit_bytes=100000"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("train_sae: the sweep of 4 dictionaries needs an estimated "), last
    assert "more than the 0.00 GiB available (sweep_memory_limit_bytes)" in last
    assert not (tmp_path / "w" / "checkpoints").exists() or not any((tmp_path / "w" / "checkpoints").iterdir())
