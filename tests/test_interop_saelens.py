"""SAELens format without SAELens: site <-> hook names, export -> import round trips for
every architecture (sharded too), one-line errors for what cannot be read, an imported
dictionary steering the LM, and launch/export.py on a tiny trained run. The cross-checks
against the real library are in test_interop_saelens_reference.py."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from saejax import parallel
from saejax.config import MeshConfig
from saejax.interop.saelens import (SAELensFormatError, density_from_log10, export_saelens,
                                    hook_name, load_saelens, site_from_hook)
from saejax.lm.sites import SITE_KINDS
from saejax.normalize import Normalizer
from saejax.sae.bundle import SAEBundle
from saejax.sae.config import SAEConfig
from saejax.sae.model import SAEParams, unit_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, F, C = 8, 32, 1.9


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_every_site_maps_to_its_transformer_lens_hook_and_back():
    want = {"resid.pre": "blocks.3.hook_resid_pre", "attn.out": "blocks.3.hook_attn_out",
            "resid.mid": "blocks.3.hook_resid_mid", "mlp.pre": "blocks.3.mlp.hook_pre",
            "mlp.post": "blocks.3.mlp.hook_post", "mlp.out": "blocks.3.hook_mlp_out",
            "resid.post": "blocks.3.hook_resid_post"}
    assert set(want) == set(SITE_KINDS)
    for kind, hook in want.items():
        assert hook_name(f"blocks.3.{kind}") == hook
        assert site_from_hook(hook) == f"blocks.3.{kind}"
    for hook in ("blocks.0.attn.hook_z", "hook_embed", "blocks.x.hook_resid_pre", None):
        assert site_from_hook(hook) is None
    assert hook_name("mlp.post") == "blocks.0.mlp.hook_post"  # the short form is layer 0
    for bad in ("blocks.1.mlp", "mlp.hook_post", "blocks.a.resid.pre"):
        with pytest.raises(ValueError, match="is not a saejax site"):
            hook_name(bad)


def bundle_of(arch, seed=0, **cfg):
    rng = np.random.default_rng(seed)
    config = SAEConfig(d_in=D, n_features=F, architecture=arch, k=4, **cfg)
    extra = {"jumprelu": {"threshold": rng.uniform(0.1, 0.8, F)},
             "batchtopk": {"threshold": np.float32(0.4)}, "matryoshka": {"threshold": np.float32(0.4)},
             "gated": {"r_mag": rng.normal(0, 0.4, F), "b_mag": rng.normal(0, 0.3, F)}}.get(arch, {})
    params = SAEParams(W_enc=jnp.asarray(rng.normal(0, 0.5, (F, D)), jnp.float32),
                       b_enc=jnp.asarray(rng.normal(0, 0.3, F), jnp.float32),
                       W_dec=unit_rows(jnp.asarray(rng.normal(size=(F, D)), jnp.float32)),
                       b_dec=jnp.asarray(rng.normal(0, 0.2, D), jnp.float32),
                       extra={k: jnp.asarray(v, jnp.float32) for k, v in extra.items()})
    return SAEBundle(params=params, config=config, normalizer=Normalizer(C), site="blocks.0.resid.post")


@pytest.mark.parametrize("arch,imported", [("relu", "relu"), ("topk", "topk"),
                                           ("batchtopk", "jumprelu"), ("matryoshka", "jumprelu"),
                                           ("jumprelu", "jumprelu"), ("gated", "gated")])
def test_export_then_import_encodes_and_decodes_the_same(arch, imported, tmp_path):
    bundle = bundle_of(arch)
    export_saelens(str(tmp_path / "e"), bundle, model_name="m", context_size=16)
    back, info = load_saelens(str(tmp_path / "e"))
    assert back.config.architecture == imported and back.normalizer.is_identity
    assert back.site == "blocks.0.resid.post" and info["hook_name"] == "blocks.0.hook_resid_post"
    assert info["log10_density"] is None
    assert not (tmp_path / "e" / "sparsity.safetensors").exists()
    if arch == "topk":
        assert back.config.k == 4
    x = jnp.asarray(np.random.default_rng(1).normal(0, 1 / C, (64, D)), jnp.float32)
    f, f_back = np.asarray(bundle.encode(x)), np.asarray(back.encode(x))
    assert 0.03 < (f > 0).mean() < 0.9
    np.testing.assert_array_equal(f_back > 0, f > 0)
    assert rel(f_back, f) <= 1e-5
    assert rel(back.decode(jnp.asarray(f)), bundle.decode(jnp.asarray(f))) <= 1e-5


def test_sharded_bundle_exports_the_same_bytes(tmp_path):
    bundle = bundle_of("gated")
    mesh = parallel.make_mesh(MeshConfig(data=2, model=4))
    sharded = bundle.on_mesh(mesh)
    assert len(sharded.params.W_enc.sharding.device_set) == 8
    export_saelens(str(tmp_path / "a"), bundle)
    export_saelens(str(tmp_path / "b"), sharded)
    a = safetensors.numpy.load_file(str(tmp_path / "a" / "sae_weights.safetensors"))
    b = safetensors.numpy.load_file(str(tmp_path / "b" / "sae_weights.safetensors"))
    assert sorted(a) == ["W_dec", "W_enc", "b_dec", "b_gate", "b_mag", "r_mag"]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_density_overwrite_and_refusals(tmp_path):
    bundle, out = bundle_of("relu"), str(tmp_path / "e")
    density = np.linspace(0, 1, F)
    export_saelens(out, bundle, density=density)
    _, info = load_saelens(out)
    np.testing.assert_allclose(info["log10_density"], np.log10(density + 1e-10), rtol=1e-6)
    np.testing.assert_allclose(density_from_log10(info["log10_density"]), density, atol=1e-6)
    with pytest.raises(FileExistsError, match="not empty"):
        export_saelens(out, bundle)
    export_saelens(out, bundle, overwrite=True)  # no density: the old sparsity file goes
    assert sorted(os.listdir(out)) == ["cfg.json", "sae_weights.safetensors"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other than a SAELens export"):
        export_saelens(str(tmp_path / "other"), bundle, overwrite=True)
    with pytest.raises(SAELensFormatError, match=r"shape \(32,\); got shape \(33,\)"):
        export_saelens(str(tmp_path / "d"), bundle, density=np.ones(F + 1))
    for bad in (np.full(F, 1.5), np.full(F, np.nan), np.full(F, -0.1)):
        with pytest.raises(SAELensFormatError, match=r"in \[0, 1\]; got values in"):
            export_saelens(str(tmp_path / "d"), bundle, density=bad)
    assert not (tmp_path / "d").exists()  # nothing written


def edited(tmp_path, cfg=None, tensors=None, drop=()):
    """A valid export with cfg.json fields / tensors replaced (None = deleted)."""
    out = tmp_path / "e"
    if not out.exists():
        export_saelens(str(out), bundle_of("jumprelu"))
    c = json.loads((out / "cfg.json").read_text())
    for k, v in (cfg or {}).items():
        c.pop(k) if v is None else c.__setitem__(k, v)
    (out / "cfg.json").write_text(json.dumps(c))
    t = safetensors.numpy.load_file(str(out / "sae_weights.safetensors"))
    t.update(tensors or {})
    for k in drop:
        t.pop(k)
    safetensors.numpy.save_file(t, str(out / "sae_weights.safetensors"))
    return str(out)


BAD = {
    "architecture": ({"architecture": "abstopk"}, None, (),
                     r"architecture 'abstopk' is not supported \(saejax reads 'standard', 'topk', "
                     r"'jumprelu', 'gated'\)"),
    "training_batchtopk": ({"architecture": "batchtopk"}, None, (), "save_inference_model"),
    "layer_norm": ({"normalize_activations": "layer_norm"}, None, (),
                   r"normalize_activations='layer_norm' is not supported: .* per-input layer norm"),
    "expected_average": ({"normalize_activations": "expected_average_only_in"}, None, (),
                         "scaling factor is not part of the folder"),
    "hook_z": ({"reshape_activations": "hook_z"}, None, (), "hook_z SAEs"),
    "apply_b_dec": ({"apply_b_dec_to_input": "yes"}, None, (),
                    "apply_b_dec_to_input must be true or false, got 'yes'"),
    "d_sae": ({"d_sae": 0}, None, (), "field d_sae must be an integer >= 1, got 0"),
    "shape": (None, {"b_enc": np.zeros(F + 1, np.float32)}, (),
              r"tensor 'b_enc' has shape \(33,\), expected \(32,\) for d_in=8, d_sae=32"),
    "missing": (None, None, ("threshold",), r"missing \['threshold'\]"),
    "unexpected": (None, {"b_gate": np.zeros(F, np.float32)}, (), r"unexpected \['b_gate'\]"),
    "nonfinite": (None, {"b_dec": np.full(D, np.inf, np.float32)}, (), "'b_dec' holds non-finite"),
    "topk_k": ({"architecture": "topk", "k": 40}, None, ("threshold",),
               "k=40 is larger than d_sae=32"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_unreadable_folders_fail_in_one_line_naming_the_problem(case, tmp_path):
    cfg, tensors, drop, message = BAD[case]
    path = edited(tmp_path, cfg, tensors, drop)
    with pytest.raises(SAELensFormatError, match=message) as e:
        load_saelens(path)
    assert "\n" not in str(e.value) and path in str(e.value)


def test_missing_files_fail_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SAELens SAE folder"):
        load_saelens(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no cfg.json"):
        load_saelens(str(tmp_path / "empty"))
    path = edited(tmp_path)
    (tmp_path / "e" / "cfg.json").write_text("{not json")
    with pytest.raises(SAELensFormatError, match="cfg.json is not valid JSON"):
        load_saelens(path)
    os.remove(tmp_path / "e" / "sae_weights.safetensors")
    with pytest.raises(FileNotFoundError, match="has no sae_weights.safetensors"):
        load_saelens(path)


def test_apply_b_dec_false_and_log_threshold_are_rewritten_exactly(tmp_path):
    """A folder encoding x W_enc + b (no pre-encoder bias) and a training log_threshold read
    the same as the equivalent folder with apply_b_dec_to_input and threshold."""
    ref_path = edited(tmp_path)
    ref, _ = load_saelens(ref_path)
    t = safetensors.numpy.load_file(os.path.join(ref_path, "sae_weights.safetensors"))
    b_enc = t["b_enc"].astype(np.float64) - t["b_dec"].astype(np.float64) @ t["W_enc"]
    theta = t["threshold"]
    path = edited(tmp_path, {"apply_b_dec_to_input": False},
                  {"b_enc": b_enc.astype(np.float32), "log_threshold": np.log(theta)},
                  drop=("threshold",))
    other, _ = load_saelens(path)
    x = jnp.asarray(np.random.default_rng(2).normal(0, 1, (64, D)), jnp.float32)
    f, f_other = np.asarray(ref.encode(x)), np.asarray(other.encode(x))
    assert 0.03 < (f > 0).mean() < 0.9
    np.testing.assert_array_equal(f_other > 0, f > 0)
    assert rel(f_other, f) <= 1e-5


@pytest.fixture(scope="module")
def tiny_run(tiny_lm_dir, tmp_path_factory):
    """A tiny SAE run on the tiny LM: 10 steps, one evaluation (and training density) at 10."""
    from experiments import sae_tiny
    from saejax.config import from_config
    from saejax.train import train
    from saejax.train_config import SAETrainConfig

    cd = sae_tiny.get_config()
    cd.lm.dir = tiny_lm_dir
    cd.workdir = str(tmp_path_factory.mktemp("sae_run"))
    cd.update_from_flattened_dict({"num_steps": 10, "eval.every": 10, "checkpoint.every": 10,
                                   "sae.resample_steps": (), "progress_bar": False,
                                   "sae.architecture": "topk", "sae.k": 8})
    train(from_config(SAETrainConfig, cd))
    return cd.workdir


def test_imported_saelens_dictionary_steers_the_lm(tiny_lm_dir, tiny_run, tmp_path):
    """A folder from the export reads back as a bundle analysis can use: clamping a feature
    with the import changes generation exactly as with the run's own dictionary."""
    from saejax.analysis.steering import steer_text
    from saejax.data.tokenizer import load_tokenizer
    from saejax.lm.restore import load_lm
    from saejax.record import load_sae

    bundle, record = load_sae(tiny_run)
    export_saelens(str(tmp_path / "e"), bundle)
    imported, _ = load_saelens(str(tmp_path / "e"))
    model, _ = load_lm(tiny_lm_dir)
    tok = load_tokenizer(record.lm.token_store)
    kw = dict(feature=3, value=25.0, num_tokens=12, temperature=0.0)
    ours = steer_text(model, bundle, tok, "def alpha(", **kw)
    theirs = steer_text(model, imported, tok, "def alpha(", **kw)
    assert ours == theirs and ours["steered"] != ours["baseline"]


def test_imported_saelens_dictionary_feeds_the_dashboard(tiny_lm_dir, tiny_run, tmp_path):
    """The feature statistics and dashboard of an imported folder equal those of the run's
    own dictionary (the same features fire on the same contexts, to float rounding)."""
    from saejax.analysis import dashboard, features
    from saejax.data.token_store import TokenStore
    from saejax.lm.restore import load_lm
    from saejax.record import load_sae

    bundle, record = load_sae(tiny_run)
    export_saelens(str(tmp_path / "e"), bundle)
    imported, _ = load_saelens(str(tmp_path / "e"))
    model, _ = load_lm(tiny_lm_dir)
    store = TokenStore.open(record.lm.token_store)
    tokens = store.read("val", 0, 16)
    cfg = features.FeatureStatsConfig(batch_size=8, top_k=4, ablation_max_features=4)
    ours, theirs = (features.compute_feature_stats(model, b, tokens, cfg, tokenizer=store.tokenizer())
                    for b in (bundle, imported))
    assert theirs["silent"] == ours["silent"] and ours["summary"]["alive"] > 0
    np.testing.assert_allclose(theirs["density"], ours["density"], atol=2 / tokens.size)
    alive = [i for i in range(len(ours["features"])) if ours["density"][i] > 0]
    assert alive
    for i in alive:
        a, b = ours["features"][i], theirs["features"][i]
        np.testing.assert_allclose(b["max_act"], a["max_act"], rtol=1e-4, atol=1e-4)
        top = a["top"]
        if len(top) > 1 and top[0]["act"] - top[1]["act"] > 1e-3 * abs(top[0]["act"]):
            assert (b["top"][0]["row"], b["top"][0]["pos"]) == (top[0]["row"], top[0]["pos"])
    index = dashboard.write_dashboard(theirs, str(tmp_path / "dash"), title="imported")
    assert os.path.isfile(index) and "imported" in open(index).read()


def run_export(*args):
    proc = subprocess.run([sys.executable, f"{ROOT}/launch/export.py", *args], cwd=ROOT,
                          env=dict(os.environ), capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_export_cli_on_a_tiny_run(tiny_lm_dir, tiny_run, tmp_path):
    from saejax.record import load_sae

    out = str(tmp_path / "sae")
    rc, stdout, stderr = run_export(f"--workdir={tiny_run}", "--format=saelens", f"--out={out}")
    assert rc == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary == {"out": out, "format": "saelens", "step": 10, "architecture": "topk",
                       "sparsity": True}
    cfg = json.loads(open(os.path.join(out, "cfg.json")).read())
    assert cfg["architecture"] == "topk" and cfg["k"] == 8
    assert cfg["metadata"]["hook_name"] == "blocks.0.mlp.hook_post"
    assert cfg["metadata"]["context_size"] == 32  # min(store seq_len 33, LM max_len 32)
    assert cfg["metadata"]["model_name"] == os.path.basename(tiny_lm_dir)  # the LM's directory

    bundle, _ = load_sae(tiny_run)
    imported, info = load_saelens(out)
    density = np.load(os.path.join(tiny_run, "train_feature_density.npy"))
    np.testing.assert_allclose(info["log10_density"], np.log10(density + 1e-10), rtol=1e-6)
    x = jax.random.normal(jax.random.key(0), (128, bundle.config.d_in)) / bundle.norm_scale
    f = np.asarray(bundle.encode(x))
    assert rel(imported.encode(x), f) <= 1e-5
    assert rel(imported.decode(jnp.asarray(f)), bundle.decode(jnp.asarray(f))) <= 1e-5

    rc, stdout, stderr = run_export(f"--workdir={tiny_run}", f"--out={out}")  # already there
    assert rc == 2 and stderr.strip().count("\n") == 0, stderr
    assert stderr.startswith("export: --out:") and "not empty" in stderr
    rc, _, stderr = run_export(f"--workdir={tmp_path / 'no_run'}", f"--out={tmp_path / 'x'}")
    assert rc == 2 and stderr.strip().count("\n") == 0, stderr
    assert stderr.startswith("export: --workdir: no checkpoints in")
    assert not (tmp_path / "x").exists()
