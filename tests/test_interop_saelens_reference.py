"""saejax <-> the real SAELens: every saejax architecture exported and read by
``sae_lens.SAE.load_from_disk`` encodes and decodes as saejax does; SAEs built and saved by
SAELens itself import into saejax with the same encode and decode.

sae-lens is part of the ``hf`` extra: where that extra is installed (transformers present)
a missing sae_lens is an error, not a skip."""

import importlib.util
import json
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

try:
    import sae_lens
    import torch
except ImportError:
    if importlib.util.find_spec("transformers") is not None:
        raise  # the hf extra is installed, and sae-lens is part of it
    pytest.skip("the hf extra (sae-lens, torch) is not installed", allow_module_level=True)

from saejax.interop.saelens import export_saelens, load_saelens
from saejax.normalize import Normalizer
from saejax.sae.bundle import SAEBundle
from saejax.sae.config import SAEConfig
from saejax.sae.model import SAEParams, unit_rows

D, F, N, C = 16, 48, 96, 2.7  # C: a non-identity input normaliser


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def random_bundle(arch, **cfg):
    """Random, non-trivial parameters (biases, thresholds, r_mag, b_mag all nonzero)."""
    rng = np.random.default_rng(zlib.crc32(repr((arch, sorted(cfg.items()))).encode()))
    config = SAEConfig(d_in=D, n_features=F, architecture=arch, k=6, **cfg)
    w_dec = rng.normal(size=(F, D))
    w_dec = np.asarray(unit_rows(jnp.asarray(w_dec))) if config.decoder == "unit" \
        else w_dec * rng.uniform(0.2, 2.0, (F, 1))
    extra = {}
    if arch == "jumprelu":
        theta = rng.uniform(0.05, 1.0, F)
        extra = ({"log_threshold": np.log(theta)} if config.jumprelu_threshold_param == "log"
                 else {"threshold": theta})
    elif arch in ("batchtopk", "matryoshka"):
        extra = {"threshold": np.float32(0.6)}
    elif arch == "gated":
        extra = {"r_mag": rng.normal(0, 0.4, F), "b_mag": rng.normal(0, 0.3, F)}
    params = SAEParams(W_enc=jnp.asarray(rng.normal(0, 0.35, (F, D)), jnp.float32),
                       b_enc=jnp.asarray(rng.normal(0, 0.3, F), jnp.float32),
                       W_dec=jnp.asarray(w_dec, jnp.float32),
                       b_dec=jnp.asarray(rng.normal(0, 0.2, D), jnp.float32),
                       extra={k: jnp.asarray(v, jnp.float32) for k, v in extra.items()})
    return SAEBundle(params=params, config=config, normalizer=Normalizer(C), site="blocks.1.mlp.post")


def activations(seed=0):
    """Rows in LM units (c x has norm ~ sqrt(D), as saejax's training inputs)."""
    return np.random.default_rng(seed).normal(0, 1.0 / C, (N, D)).astype(np.float32) + 0.1


CASES = {"relu": {}, "relu-free": {"decoder": "free", "init": "tied", "init_decoder_norm": 0.1},
         "topk": {}, "batchtopk": {}, "matryoshka": {}, "jumprelu": {},
         "jumprelu-log": {"jumprelu_threshold_param": "log"}, "gated": {}}
SAELENS_CLASS = {"relu": "StandardSAE", "topk": "TopKSAE", "batchtopk": "JumpReLUSAE",
                 "matryoshka": "JumpReLUSAE", "jumprelu": "JumpReLUSAE", "gated": "GatedSAE"}


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_saelens_with_equal_encode_and_decode(case, tmp_path):
    arch = case.split("-")[0]
    bundle = random_bundle(arch, **CASES[case])
    density = np.random.default_rng(1).uniform(0, 0.2, F)
    density[:3] = 0.0  # dead features: log10(1e-10)
    out = export_saelens(str(tmp_path / "sae"), bundle, model_name="tiny", context_size=33,
                         density=density)
    sae = sae_lens.SAE.load_from_disk(out)
    assert type(sae).__name__ == SAELENS_CLASS[arch]
    assert sae.cfg.metadata.hook_name == "blocks.1.mlp.hook_post"
    assert sae.cfg.metadata.model_name == "tiny" and sae.cfg.metadata.context_size == 33
    assert sae.cfg.apply_b_dec_to_input and sae.cfg.normalize_activations == "none"

    x = activations()
    f = np.array(bundle.encode(jnp.asarray(x)))  # a writable copy for torch.from_numpy
    x_hat = np.asarray(bundle.decode(jnp.asarray(f)))
    with torch.no_grad():
        f_sl = sae.encode(torch.from_numpy(x)).numpy()
        x_hat_sl = sae.decode(torch.from_numpy(f_sl)).numpy()
        x_hat_of_ours = sae.decode(torch.from_numpy(f)).numpy()
    fires = f > 0
    assert 0.03 < fires.mean() < 0.9, f"trivial test data: {fires.mean():.2f} of features fire"
    if arch == "topk":
        assert (fires.sum(1) == 6).all()
    np.testing.assert_array_equal(f_sl > 0, fires)
    assert rel(f_sl, f) <= 1e-5
    assert rel(x_hat_sl, x_hat) <= 1e-5
    assert rel(x_hat_of_ours, x_hat) <= 1e-5

    from safetensors.torch import load_file
    sparsity = load_file(str(tmp_path / "sae" / "sparsity.safetensors"))["sparsity"].numpy()
    np.testing.assert_allclose(sparsity, np.log10(density + 1e-10), rtol=1e-6)


def saelens_sae(arch, apply_b_dec=True, dtype="float32", **cfg):
    """An inference SAE built by SAELens with random parameters set into it."""
    from sae_lens.saes.sae import SAEMetadata

    classes = {"standard": ("StandardSAE", "StandardSAEConfig"), "topk": ("TopKSAE", "TopKSAEConfig"),
               "jumprelu": ("JumpReLUSAE", "JumpReLUSAEConfig"), "gated": ("GatedSAE", "GatedSAEConfig")}
    sae_cls, cfg_cls = (getattr(sae_lens, n) for n in classes[arch])
    config = cfg_cls(d_in=D, d_sae=F, dtype=dtype, apply_b_dec_to_input=apply_b_dec,
                     metadata=SAEMetadata(hook_name="blocks.2.hook_resid_mid", model_name="gpt2",
                                          context_size=128), **cfg)
    sae = sae_cls(config)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((arch, apply_b_dec, dtype)).encode()))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            scale = {"W_enc": 0.35, "W_dec": 0.6, "threshold": 0.0}.get(name, 0.3)
            p.copy_(scale * torch.randn(p.shape, generator=gen))
            if name == "threshold":
                p.copy_(0.05 + torch.rand(p.shape, generator=gen))
    return sae


REVERSE = {"standard": {}, "standard-no-bdec": {"apply_b_dec": False}, "topk": {"k": 5},
           "topk-rescaled": {"k": 5, "rescale_acts_by_decoder_norm": True},
           "jumprelu": {}, "jumprelu-no-bdec": {"apply_b_dec": False}, "gated": {},
           "gated-no-bdec": {"apply_b_dec": False}, "jumprelu-bf16": {"dtype": "bfloat16"}}


@pytest.mark.parametrize("case", list(REVERSE))
def test_saelens_saved_sae_imports_with_equal_encode_and_decode(case, tmp_path):
    arch = case.split("-")[0]
    sae = saelens_sae(arch, **REVERSE[case])
    sae.save_model(str(tmp_path / "sl"))
    if REVERSE[case].get("dtype") == "bfloat16":  # SAELens itself reads it as float32
        sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"), dtype="float32")
    bundle, info = load_saelens(str(tmp_path / "sl"))
    assert bundle.config.architecture == {"standard": "relu"}.get(arch, arch)
    assert bundle.site == "blocks.2.resid.mid" and bundle.normalizer.is_identity
    assert info["model_name"] == "gpt2" and info["context_size"] == 128

    x = (np.random.default_rng(3).normal(0, 1, (N, D)) + 0.2).astype(np.float32)
    with torch.no_grad():
        f_sl = sae.encode(torch.from_numpy(x)).float().numpy()
        x_hat_sl = sae.decode(torch.from_numpy(f_sl)).float().numpy()
    f = np.asarray(bundle.encode(jnp.asarray(x)))
    x_hat = np.asarray(bundle.decode(jnp.asarray(f_sl)))
    fires = f_sl > 0
    assert 0.03 < fires.mean() < 0.9, f"trivial test data: {fires.mean():.2f} of features fire"
    np.testing.assert_array_equal(f > 0, fires)
    assert rel(f, f_sl) <= 1e-5
    assert rel(x_hat, x_hat_sl) <= 1e-5


def test_saelens_batchtopk_training_sae_saved_for_inference_imports(tmp_path):
    """SAELens saves its BatchTopK SAE as a JumpReLU with the running threshold; saejax
    reads that folder and encodes as SAELens' loaded SAE does."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=F, k=5))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sae.named_parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=gen))
        sae.topk_threshold.fill_(0.5)
    sae.save_inference_model(str(tmp_path / "sl"))
    assert json.loads((tmp_path / "sl" / "cfg.json").read_text())["architecture"] == "jumprelu"
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    bundle, _ = load_saelens(str(tmp_path / "sl"))
    x = (np.random.default_rng(4).normal(0, 1, (N, D))).astype(np.float32)
    with torch.no_grad():
        f_sl = loaded.encode(torch.from_numpy(x)).numpy()
    f = np.asarray(bundle.encode(jnp.asarray(x)))
    assert 0.03 < (f_sl > 0).mean() < 0.9
    np.testing.assert_array_equal(f > 0, f_sl > 0)
    assert rel(f, f_sl) <= 1e-5


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_pre_6_config_reads_as_saelens_reads_it(arch, tmp_path):
    """A cfg.json of the pre-6.0 layout (run keys top-level, hook_point, TopK as an
    activation_fn, a bool normalize_activations): SAELens and saejax read the same SAE."""
    sae = saelens_sae(arch, **({"k": 5} if arch == "topk" else {}))
    sae.save_model(str(tmp_path / "sl"))
    old = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": False, "hook_point": "blocks.1.mlp.hook_pre",
           "hook_point_layer": 1, "model_name": "gelu-1l", "context_size": 64,
           "sae_lens_version": "3.5.0", "activation_fn_str": "topk" if arch == "topk" else "relu",
           "activation_fn_kwargs": {"k": 5} if arch == "topk" else {}}
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(old))
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    bundle, info = load_saelens(str(tmp_path / "sl"))
    assert type(theirs).__name__ == {"standard": "StandardSAE", "topk": "TopKSAE"}[arch]
    assert bundle.config.architecture == {"standard": "relu"}.get(arch, arch)
    assert bundle.site == "blocks.1.mlp.pre" and info["context_size"] == 64
    x = (np.random.default_rng(5).normal(0, 1, (N, D)) + 0.2).astype(np.float32)
    with torch.no_grad():
        f_sl = theirs.encode(torch.from_numpy(x)).numpy()
    f = np.asarray(bundle.encode(jnp.asarray(x)))
    assert 0.03 < (f_sl > 0).mean() < 0.9
    np.testing.assert_array_equal(f > 0, f_sl > 0)
    assert rel(f, f_sl) <= 1e-5
