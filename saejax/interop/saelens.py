"""The SAELens on-disk format: export any saejax dictionary, import SAELens folders.

A SAELens SAE is a folder (SAELens 6.x, ``sae_lens/constants.py``; verified against
sae-lens 6.54 by ``tests/test_interop_saelens_reference.py``)::

    cfg.json                  d_in, d_sae, dtype, device, apply_b_dec_to_input,
                              normalize_activations, reshape_activations, architecture,
                              k (topk), metadata {sae_lens_version, model_name, hook_name,
                              context_size, ...}
    sae_weights.safetensors   W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D]
                              (+ threshold [F] for jumprelu; gated: b_gate, r_mag, b_mag
                              instead of b_enc)
    sparsity.safetensors      "sparsity" [F] = log10(firing fraction + 1e-10)

    export_saelens("out/sae", bundle, model_name="gpt2", context_size=128, density=d)
    bundle, info = load_saelens("out/sae")         # SAEBundle + the folder's metadata

Export (:func:`export_saelens`) takes an :class:`~saejax.sae.bundle.SAEBundle` and the facts
the bundle does not hold (model name, context size, feature density), so it serves a
restored training run, a sweep member or an imported dictionary alike. Conventions:

- Input normalisation: saejax's constant c is folded into the weights
  (:meth:`SAEBundle.folded`: W_enc c, W_dec / c, b_dec / c) and ``normalize_activations``
  is "none", which is what SAELens itself saves after folding its scaling factor. The
  folded decoder rows have norm 1 / c instead of 1.
- Pre-encoder bias: saejax always encodes x - b_dec, so ``apply_b_dec_to_input`` is true.
- Architectures: "relu" (either decoder) -> "standard"; "topk" -> "topk" (``k``,
  ``rescale_acts_by_decoder_norm`` false); "jumprelu" -> "jumprelu" (a log-parametrised
  threshold is exported as exp(log theta)); "batchtopk" and "matryoshka" -> "jumprelu" with
  every threshold equal to the running threshold (:meth:`SAEBundle.as_jumprelu`, the same
  features; SAELens saves its own BatchTopK and Matryoshka SAEs the same way); "gated" ->
  "gated" (saejax's b_enc is SAELens' b_gate; r_mag and b_mag are the same parameters).
- Site: ``metadata.hook_name`` is the TransformerLens name of the saejax site
  (:func:`hook_name`; "blocks.0.mlp.post" -> "blocks.0.mlp.hook_post").
- Density: ``sparsity.safetensors`` is written only when the caller passes a firing
  fraction per feature; SAELens' trainer writes the fraction over its last
  ``feature_sampling_window``, and ``launch/export.py`` passes the run's training density
  over its last evaluation window (``train_feature_density.npy``), the same kind of number.
- Precision: weights are written as float32 (saejax trains in float32).

Import (:func:`load_saelens`) reads architectures "standard", "topk", "jumprelu" and
"gated" into a bundle with an identity normaliser and the site mapped back from
``hook_name`` (None for hooks saejax's LM has no site for). What SAELens applies at run time
and saejax's bundle cannot is refused in one line; what can be rewritten exactly (up to
float rounding) is: ``apply_b_dec_to_input`` false moves b_dec W_enc into the encoder
biases, TopK's ``rescale_acts_by_decoder_norm`` folds the decoder norms into the encoder
(as SAELens' own inference save does), a training ``log_threshold`` becomes exp of it, and
bfloat16 / float16 weights are read as float32; a config written before SAELens 6.0 is
read the way SAELens reads it (``handle_pre_6_0_config``). The bundle's config carries the
architecture and k; its training fields are defaults (an imported dictionary is for
analysis, not for resuming training). A ReLU dictionary gets ``decoder = "free"``, as its
rows need not have unit norm.

Legend: D input width (d_in), F features (d_sae).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from saejax import parallel
from saejax.config import to_dict
from saejax.interop.hooks import TL_HOOKS, hook_name, site_from_hook  # noqa: F401 - re-exported
from saejax.normalize import Normalizer
from saejax.sae.bundle import SAEBundle
from saejax.sae.config import SAEConfig
from saejax.sae.model import SAEParams

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
# The SAELens release whose format the export follows and was checked against; written as
# metadata.sae_lens_version (SAELens converts configs of versions < 6 as an older format).
SAELENS_VERSION = "6.54.12"
SPARSITY_EPS = 1e-10  # SAELens: log10(feature_sparsity + 1e-10)

# saejax architecture -> SAELens architecture of its export.
EXPORTED_AS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu",
               "batchtopk": "jumprelu", "matryoshka": "jumprelu", "gated": "gated"}
# SAELens architecture -> saejax architecture of its import.
IMPORTED_AS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
_TENSORS = {"standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
            "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
            "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
            "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")}


class SAELensFormatError(ValueError):
    """A folder that is not a SAELens SAE saejax can read, or a dictionary it cannot write."""


def _saejax_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("saejax")
    except PackageNotFoundError:
        return None


def _write_atomic(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def saelens_tensors(bundle: SAEBundle) -> tuple[str, dict[str, np.ndarray], dict[str, Any]]:
    """(SAELens architecture, float32 tensors in SAELens' layout, architecture config keys)
    of ``bundle`` with its normaliser folded in; arrays are gathered to the host."""
    arch = bundle.config.architecture
    if arch not in EXPORTED_AS:
        raise SAELensFormatError(f"architecture {arch!r} has no SAELens form (exported: "
                                 f"{sorted(EXPORTED_AS)})")
    if arch in ("batchtopk", "matryoshka"):
        bundle = bundle.as_jumprelu()
    p = parallel.to_host(bundle.folded().params)
    f32 = {name: np.ascontiguousarray(np.asarray(v, np.float32)) for name, v in
           {"W_enc": p.W_enc.T, "b_enc": p.b_enc, "W_dec": p.W_dec, "b_dec": p.b_dec}.items()}
    cfg: dict[str, Any] = {}
    if arch == "topk":
        cfg = {"k": int(bundle.config.k), "rescale_acts_by_decoder_norm": False}
    elif EXPORTED_AS[arch] == "jumprelu":
        theta = (np.exp(np.asarray(p.extra["log_threshold"], np.float64))
                 if "log_threshold" in p.extra else p.extra["threshold"])
        f32["threshold"] = np.asarray(theta, np.float32)
    elif arch == "gated":
        f32["b_gate"] = f32.pop("b_enc")
        f32.update(r_mag=np.asarray(p.extra["r_mag"], np.float32),
                   b_mag=np.asarray(p.extra["b_mag"], np.float32))
    return EXPORTED_AS[arch], f32, cfg


def export_saelens(out_dir: str, bundle: SAEBundle, *, model_name: str | None = None,
                   context_size: int | None = None, density: np.ndarray | None = None,
                   site: str | None = None, prepend_bos: bool = False,
                   metadata: dict[str, Any] | None = None, overwrite: bool = False) -> str:
    """Writes ``bundle`` as a SAELens SAE folder (see the module docstring); returns its path.

    Args:
      out_dir: the folder; created, and refused when it holds other files unless
        ``overwrite`` (then cfg.json and the safetensors files are replaced, each
        atomically).
      bundle: any saejax dictionary (sharded or not). Its arrays are gathered to the host,
        a collective in a multi-process run: call it on every process; process 0 writes.
      model_name: ``metadata.model_name`` (the LM the dictionary reads).
      context_size: ``metadata.context_size``, the tokens per context it was trained on.
      density: the firing fraction of each feature [F] in [0, 1]; written as
        ``sparsity.safetensors`` = log10(density + 1e-10). None writes no sparsity file.
      site: the saejax site (default ``bundle.site``); ``metadata.hook_name`` is its
        TransformerLens name (None when neither names one).
      prepend_bos: ``metadata.prepend_bos`` (saejax's contexts are cut from one packed
        token stream with no BOS of their own, hence False).
      metadata: more ``metadata`` keys (they override the defaults).
      overwrite: replace an existing export.

    Raises:
      SAELensFormatError: an architecture without a SAELens form, a bad density.
      FileExistsError: ``out_dir`` holds files and ``overwrite`` is off.
    """
    arch, tensors, arch_cfg = saelens_tensors(bundle)
    f = bundle.n_features
    sparsity = None
    if density is not None:
        d = np.asarray(parallel.to_host(density), np.float64)
        if d.shape != (f,):
            raise SAELensFormatError(f"density must be the firing fraction of each feature, "
                                     f"shape ({f},); got shape {d.shape}")
        if not (np.all(np.isfinite(d)) and d.min() >= 0 and d.max() <= 1):
            raise SAELensFormatError(f"density must be the firing fraction of each feature, "
                                     f"in [0, 1]; got values in [{d.min()}, {d.max()}]")
        sparsity = np.log10(d + SPARSITY_EPS).astype(np.float32)
    site = site if site is not None else bundle.site
    meta = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None,
            "model_name": model_name, "hook_name": None if site is None else hook_name(site),
            "hook_head_index": None, "context_size": context_size, "prepend_bos": prepend_bos,
            "saejax": {"version": _saejax_version(), "architecture": bundle.config.architecture,
                       "site": site, "normalizer_scale": bundle.norm_scale,
                       "config": to_dict(bundle.config)}}
    meta.update(metadata or {})
    cfg = {"d_in": bundle.config.d_in, "d_sae": f, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": meta, "architecture": arch, **arch_cfg}

    if jax.process_index() != 0:  # every process gathered (a collective); one writes
        return out_dir
    ours = {CFG_FILENAME, WEIGHTS_FILENAME, SPARSITY_FILENAME}
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir!r} is not empty; pass overwrite=True (--overwrite) to "
                              f"replace an export there")
    if os.path.isdir(out_dir) and overwrite:
        others = sorted(set(os.listdir(out_dir)) - ours)
        if others:
            raise FileExistsError(f"{out_dir!r} holds files other than a SAELens export "
                                  f"({', '.join(others[:3])}); choose another folder")
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(os.path.join(out_dir, WEIGHTS_FILENAME),
                  lambda p: safetensors.numpy.save_file(tensors, p, metadata={"format": "pt"}))
    sparsity_path = os.path.join(out_dir, SPARSITY_FILENAME)
    if sparsity is not None:
        _write_atomic(sparsity_path, lambda p: safetensors.numpy.save_file(
            {"sparsity": sparsity}, p, metadata={"format": "pt"}))
    elif os.path.exists(sparsity_path):  # a stale one from an earlier export
        os.remove(sparsity_path)

    def write_cfg(p):
        with open(p, "w") as fh:
            json.dump(cfg, fh, indent=1)
    _write_atomic(os.path.join(out_dir, CFG_FILENAME), write_cfg)  # last: marks a complete export
    return out_dir


# -- import ------------------------------------------------------------------------------

def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float32 NumPy arrays (bfloat16 included, which
    NumPy cannot name: read by saejax's own parser, through ml_dtypes)."""
    try:
        tensors = safetensors.numpy.load_file(path)
    except TypeError:  # a dtype NumPy lacks (bfloat16)
        from saejax.lm.hf_import import read_safetensors

        tensors = read_safetensors(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise SAELensFormatError(f"{path!r} is not a readable safetensors file "
                                 f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _fail(path: str, msg: str) -> SAELensFormatError:
    return SAELensFormatError(f"{path!r}: {msg}")


def _read_cfg(path: str) -> dict[str, Any]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no SAELens SAE folder at {path!r}")
    cfg_path = os.path.join(path, CFG_FILENAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} is not a SAELens SAE folder: it has no {CFG_FILENAME}")
    if not os.path.isfile(os.path.join(path, WEIGHTS_FILENAME)):
        raise FileNotFoundError(f"{path!r} is not a complete SAELens SAE folder: it has no "
                                f"{WEIGHTS_FILENAME}")
    try:
        with open(cfg_path) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as e:
        raise _fail(path, f"{CFG_FILENAME} is not valid JSON ({' '.join(str(e).split())[:120]})") \
            from None
    if not isinstance(cfg, dict):
        raise _fail(path, f"{CFG_FILENAME} must hold a JSON object")
    return cfg


def _pre_6(cfg: dict[str, Any]) -> bool:
    """A config written before SAELens 6.0 (no version, or a version < 6), as SAELens'
    ``handle_config_defaulting`` decides."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = cfg.get("sae_lens_version") or meta.get("sae_lens_version")
    m = re.match(r"(\d+)", str(version or ""))
    return not m or int(m.group(1)) < 6


def _from_pre_6(cfg: dict[str, Any]) -> dict[str, Any]:
    """A pre-6.0 config in 6.x form, as SAELens' ``handle_pre_6_0_config`` rewrites it: run
    keys are top-level (``hook_point`` = ``hook_name``), "topk" is an ``activation_fn``
    with ``activation_fn_kwargs.k``, ``normalize_activations`` may be a bool."""
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    new = {renames.get(k, k): v for k, v in cfg.items()}
    if new.get("activation_fn") == "topk" and (new.get("activation_fn_kwargs") or {}).get("k"):
        new["architecture"], new["k"] = "topk", new["activation_fn_kwargs"]["k"]
    norm = new.get("normalize_activations")
    if norm is None or isinstance(norm, bool):
        new["normalize_activations"] = "expected_average_only_in" if norm else "none"
    new.setdefault("architecture", "standard")
    meta = {k: new[k] for k in ("model_name", "hook_name", "hook_head_index", "context_size",
                                "prepend_bos", "sae_lens_version", "dataset_path") if k in new}
    new["metadata"] = {**meta, **(new.get("metadata") or {})}
    return new


def _architecture(path: str, cfg: dict[str, Any]) -> tuple[str, int | None]:
    """(SAELens architecture, k or None)."""
    arch, k = cfg.get("architecture"), cfg.get("k")
    if arch not in IMPORTED_AS:
        hint = (" (a SAELens training checkpoint: save it with save_inference_model, which "
                "writes a jumprelu SAE)" if arch in ("batchtopk", "matryoshka_batchtopk") else "")
        raise _fail(path, f"architecture {arch!r} is not supported (saejax reads "
                          f"{', '.join(repr(a) for a in IMPORTED_AS)}){hint}")
    if arch == "topk" and not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise _fail(path, f"a topk SAE needs an integer k >= 1 in {CFG_FILENAME}, got {k!r}")
    return arch, k


_NORMALIZE_WHY = {
    "expected_average_only_in": "its scaling factor is not part of the folder (fold it with "
                                "SAELens' fold_activation_norm_scaling_factor and save again)",
    "constant_norm_rescale": "a per-input rescaling, which saejax's constant normaliser cannot "
                             "express",
    "layer_norm": "a per-input layer norm, which saejax's constant normaliser cannot express",
    "covariance_whitening": "a whitening (fold it with SAELens' fold_activation_whitening and "
                            "save again)",
}


def load_saelens(path: str) -> tuple[SAEBundle, dict[str, Any]]:
    """Reads a SAELens SAE folder into an :class:`SAEBundle` (identity normaliser).

    Returns:
      (bundle, info): ``info`` holds ``architecture`` (SAELens'), ``hook_name``,
      ``model_name``, ``context_size``, ``metadata`` (cfg.json's, as it is) and
      ``log10_density`` ([F] from sparsity.safetensors, or None).

    Raises:
      FileNotFoundError: no folder, or a folder without cfg.json / sae_weights.safetensors.
      SAELensFormatError: what saejax cannot represent or a malformed folder, in one line
        naming the problem (unsupported architecture or normalisation, hook_z reshaping,
        missing / unexpected tensors, wrong shapes, a fine-tuning scaling factor).
    """
    cfg = _read_cfg(path)
    if _pre_6(cfg):
        cfg = _from_pre_6(cfg)
    arch, k = _architecture(path, cfg)
    d, f = cfg.get("d_in"), cfg.get("d_sae")
    for name, v in (("d_in", d), ("d_sae", f)):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise _fail(path, f"{CFG_FILENAME} field {name} must be an integer >= 1, got {v!r}")
    if arch == "topk" and k > f:
        raise _fail(path, f"k={k} is larger than d_sae={f}")
    norm = cfg.get("normalize_activations", "none")
    if norm != "none":
        why = _NORMALIZE_WHY.get(norm, "an unknown normalisation")
        raise _fail(path, f"normalize_activations={norm!r} is not supported: saejax reads SAEs "
                          f"whose input normalisation is folded into the weights ('none'); "
                          f"{norm!r} is {why}")
    if cfg.get("reshape_activations", "none") != "none":
        raise _fail(path, f"reshape_activations={cfg['reshape_activations']!r} (attention-head "
                          f"hook_z SAEs) is not supported; saejax reads 'none'")
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise _fail(path, f"apply_b_dec_to_input must be true or false, got {apply_b_dec!r}")
    rescale = cfg.get("rescale_acts_by_decoder_norm", False) if arch == "topk" else False
    if not isinstance(rescale, bool):
        raise _fail(path, f"rescale_acts_by_decoder_norm must be true or false, got {rescale!r}")

    t = _read_safetensors(os.path.join(path, WEIGHTS_FILENAME))
    if arch == "jumprelu" and "log_threshold" in t and "threshold" not in t:
        t["threshold"] = np.exp(t.pop("log_threshold"))  # as SAELens' loader does
    scale = t.pop("scaling_factor", None)
    if scale is not None and not np.all(scale == 1):
        raise _fail(path, "a fine-tuning scaling_factor other than 1 is not supported")
    want = _TENSORS[arch]
    missing = [n for n in want if n not in t]
    extra = sorted(set(t) - set(want))
    if missing or extra:
        raise _fail(path, f"{WEIGHTS_FILENAME} of a {arch!r} SAE must hold {list(want)}"
                          + (f"; missing {missing}" if missing else "")
                          + (f"; unexpected {extra}" if extra else ""))
    shapes = {"W_enc": (d, f), "W_dec": (f, d), "b_dec": (d,)}
    for name in want:
        shape = tuple(t[name].shape)
        if shape != shapes.get(name, (f,)):
            raise _fail(path, f"tensor {name!r} has shape {shape}, expected "
                              f"{shapes.get(name, (f,))} for d_in={d}, d_sae={f}")
        if not np.all(np.isfinite(t[name])):
            raise _fail(path, f"tensor {name!r} holds non-finite values")

    w_enc, w_dec, b_dec = (t[n].astype(np.float64) for n in ("W_enc", "W_dec", "b_dec"))
    b_enc = t["b_gate" if arch == "gated" else "b_enc"].astype(np.float64)
    extras: dict[str, np.ndarray] = {}
    if arch == "topk" and rescale:
        # SAELens selects the top k of pre * ||W_dec_i|| and decodes f / ||W_dec_i||; with
        # the norms folded into the encoder (its own _fold_norm_topk) plain TopK is the same.
        n = np.maximum(np.linalg.norm(w_dec, axis=1), 1e-8)
        w_enc, b_enc, w_dec = w_enc * n, b_enc * n, w_dec / n[:, None]
    if arch == "jumprelu":
        extras["threshold"] = t["threshold"]
    if arch == "gated":
        extras.update(r_mag=t["r_mag"], b_mag=t["b_mag"].astype(np.float64))
    if not apply_b_dec:
        # SAELens encodes x W_enc + b; saejax (x - b_dec) W_enc + b', so b' = b + b_dec W_enc
        # (Gated's magnitude path: b_mag' = b_mag + exp(r_mag) b_dec W_enc).
        shift = b_dec @ w_enc
        b_enc = b_enc + shift
        if arch == "gated":
            extras["b_mag"] = extras["b_mag"] + np.exp(t["r_mag"].astype(np.float64)) * shift
    params = SAEParams(W_enc=jnp.asarray(w_enc.T, jnp.float32), b_enc=jnp.asarray(b_enc, jnp.float32),
                       W_dec=jnp.asarray(w_dec, jnp.float32), b_dec=jnp.asarray(b_dec, jnp.float32),
                       extra={n: jnp.asarray(v, jnp.float32) for n, v in extras.items()})
    config = SAEConfig(d_in=d, n_features=f, architecture=IMPORTED_AS[arch], dead_strategy="none",
                       decoder="free" if arch == "standard" else "unit",
                       **({"k": k} if arch == "topk" else {}))
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = meta.get("hook_name")
    site = site_from_hook(hook) if meta.get("hook_head_index") is None else None
    log10_density = None
    sparsity_path = os.path.join(path, SPARSITY_FILENAME)
    if os.path.isfile(sparsity_path):
        s = _read_safetensors(sparsity_path)
        if "sparsity" not in s or s["sparsity"].shape != (f,):
            raise _fail(path, f"{SPARSITY_FILENAME} must hold 'sparsity' of shape ({f},)")
        log10_density = s["sparsity"]
    bundle = SAEBundle(params=params, config=config, normalizer=Normalizer(), site=site)
    info = {"architecture": arch, "hook_name": hook, "model_name": meta.get("model_name"),
            "context_size": meta.get("context_size"), "metadata": meta,
            "log10_density": log10_density}
    return bundle, info


def density_from_log10(log10_density: np.ndarray) -> np.ndarray:
    """The firing fractions of a ``sparsity.safetensors`` (undoes the +1e-10; 0 stays ~0)."""
    return np.maximum(np.power(10.0, np.asarray(log10_density, np.float64)) - SPARSITY_EPS, 0.0)


__all__ = ["EXPORTED_AS", "IMPORTED_AS", "SAELENS_VERSION", "SAELensFormatError", "TL_HOOKS",
           "density_from_log10", "export_saelens", "hook_name", "load_saelens",
           "saelens_tensors", "site_from_hook"]
