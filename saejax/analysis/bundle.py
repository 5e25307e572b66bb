"""A trained dictionary as analysis sees it: parameters, config, site and input scale.

Input normalisation: the SAE may have been trained on LM activations multiplied by a
constant ``norm_scale`` (chosen so that E||x|| = sqrt(D), Circuits Update Feb 2024). Every
analysis function applies it the same way:

    f      = encode(params, acts * norm_scale)           feature activations (SAE units)
    x_hat  = decode(params, f) / norm_scale               reconstruction (LM units)
    effect of feature i at value v on the site = v * W_dec[i] / norm_scale  (LM units)

so feature activations are always reported in the SAE's (normalised) units, and anything
written back into the LM is in the LM's units.

``save_sae`` / ``load_sae`` are a small, self-describing export (one ``.npz`` holding the
four arrays and a JSON header) for moving a dictionary between tools; training checkpoints
(orbax) are the training loop's business and can be turned into a bundle directly.

Legend: F features, D site width.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from saejax import parallel
from saejax.config import check, check_positive, from_config, to_dict
from saejax.sae.config import SAEConfig
from saejax.sae.model import PARAM_AXES, SAEParams

EXPORT_FORMAT = 1


def split_lm(lm) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of a ``Transformer`` or of an existing (graphdef, params) pair."""
    return nnx.split(lm, nnx.Param) if isinstance(lm, nnx.Module) else tuple(lm)


def lm_module(lm):
    """The ``Transformer`` of ``lm`` (merging a (graphdef, params) pair)."""
    return lm if isinstance(lm, nnx.Module) else nnx.merge(*lm)


@dataclasses.dataclass(frozen=True)
class SAEBundle:
    """A dictionary ready for analysis.

    Attributes:
      params: SAE parameters (``W_enc``/``W_dec`` [F, D], feature-major).
      config: the SAE config it was trained with (architecture, precision, ...).
      site: the LM site it reads, e.g. "mlp.post" or "blocks.0.mlp.post".
      norm_scale: the constant the training inputs were multiplied by (1.0 = none).
    """

    params: SAEParams
    config: SAEConfig
    site: str = "mlp.post"
    norm_scale: float = 1.0

    def __post_init__(self):
        check_positive("sae.norm_scale", self.norm_scale)
        shape = tuple(self.params.W_dec.shape)
        check("sae.params.W_dec", shape, shape == (self.config.n_features, self.config.d_in),
              f"must have shape (n_features, d_in) = "
              f"({self.config.n_features}, {self.config.d_in})")

    @property
    def n_features(self) -> int:
        return self.config.n_features

    def on_mesh(self, mesh: jax.sharding.Mesh) -> SAEBundle:
        """The bundle with its parameters placed on ``mesh`` (latent axis over "model")."""
        placed = {name: jax.device_put(getattr(self.params, name),
                                       parallel.named_sharding(mesh, getattr(PARAM_AXES, name)))
                  for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        return dataclasses.replace(self, params=SAEParams(**placed))


def save_sae(path: str, bundle: SAEBundle, extra: dict[str, Any] | None = None) -> None:
    """Writes ``bundle`` to ``path`` (an ``.npz``): arrays plus a JSON header."""
    header = {"format": EXPORT_FORMAT, "config": to_dict(bundle.config), "site": bundle.site,
              "norm_scale": float(bundle.norm_scale), "extra": extra or {}}
    arrays = {name: np.asarray(getattr(bundle.params, name), np.float32)
              for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, header=np.asarray(json.dumps(header)), **arrays)
    os.replace(tmp, path)


def load_sae(path: str) -> tuple[SAEBundle, dict[str, Any]]:
    """Reads a file written by :func:`save_sae`; returns (bundle, extra metadata)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SAE export at {path!r} (write one with "
                                f"saejax.analysis.bundle.save_sae)")
    with np.load(path) as data:
        header = json.loads(str(data["header"]))
        if header.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{path!r}: unsupported SAE export format {header.get('format')!r}")
        params = SAEParams(**{k: np.asarray(data[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec")})
    config = from_config(SAEConfig, header["config"], prefix="sae")
    bundle = SAEBundle(params=params, config=config, site=header["site"],
                       norm_scale=float(header["norm_scale"]))
    return bundle, header.get("extra", {})


def load_sae_run(workdir: str, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None
                 ) -> tuple[SAEBundle, dict[str, Any]]:
    """A bundle from an SAE training run (``saejax.train``'s checkpoints in ``workdir``).

    Returns:
      (bundle, extra): extra holds "lm_dir", "store_dir", "step" and, when the run wrote
      one, "metrics_path" (its metrics JSONL).
    """
    from saejax.train import load_sae as load_checkpoint  # the training loop owns the format

    params, config, meta = load_checkpoint(workdir, step=step, mesh=mesh)
    bundle = SAEBundle(params=params, config=config, site=meta["site"],
                       norm_scale=float(meta["normalization"]["norm_scale"]))
    extra = {"lm_dir": meta["lm"]["dir"], "store_dir": meta["lm"]["store_dir"],
             "step": meta["step"]}
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.isfile(metrics):
        extra["metrics_path"] = metrics
    return bundle, extra
