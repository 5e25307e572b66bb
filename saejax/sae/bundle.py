"""A trained dictionary with its input normalisation: encode, decode and splice in input units.

The SAE is trained on activations multiplied by a constant (:class:`saejax.normalize.Normalizer`).
:class:`SAEBundle` is the one place that applies it, so callers (the training loop's
evaluation, every analysis module) pass activations in the units they come in (the LM's)
and get reconstructions back in those units:

    f      = bundle.encode(acts)          = encode(params, c * acts)        SAE units
    x_hat  = bundle.decode(f)             = decode(params, f) / c           input units
    x_hat, f = bundle.splice(acts)
    effect of feature i at activation v   = v * bundle.directions()[i]      input units

Feature activations are always in the SAE's units. The bundle is a pytree (parameters are
leaves; config, normaliser and site are static), so it can be an argument of a jitted
function: ``jax.jit(lambda sae, x: sae.encode(x))(bundle, acts)``.

:meth:`SAEBundle.folded` returns the same dictionary with the constant folded into the
parameters (W_enc c, W_dec / c, b_dec / c) and an identity normaliser: it reads raw
activations directly (for export to tools that know no normalisation) and encodes and
decodes the same values up to float rounding.

:func:`save_bundle` / :func:`load_bundle` are a small, self-describing export (one ``.npz``
holding the four arrays and a JSON header) for moving a dictionary between tools; a
training run's checkpoints are restored with :func:`saejax.record.load_sae`.

Legend: N rows (any leading shape), D input width, F features.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from saejax import parallel
from saejax.config import check, from_config, to_dict
from saejax.normalize import Normalizer
from saejax.sae import model
from saejax.sae.config import SAEConfig
from saejax.sae.model import SAEParams


@flax.struct.dataclass
class SAEBundle:
    """A dictionary ready for use: parameters, config, input normaliser, site label.

    Attributes:
      params: SAE parameters (``W_enc``/``W_dec`` [F, D], feature-major).
      config: the SAE config it was trained with (architecture, precision, ...).
      normalizer: what the training inputs were multiplied by (identity = none).
      site: the activation site it reads, e.g. "blocks.0.mlp.post"; None when it was
        trained on activations that name no site (then nothing can splice it into an LM).
    """

    params: SAEParams
    config: SAEConfig = flax.struct.field(pytree_node=False)
    normalizer: Normalizer = flax.struct.field(pytree_node=False, default=Normalizer())
    site: str | None = flax.struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        w = self.params.W_dec
        if hasattr(w, "shape"):  # pytree operations may rebuild the bundle with other leaves
            shape = tuple(w.shape)
            check("sae.params.W_dec", shape, shape == (self.config.n_features, self.config.d_in),
                  f"must have shape (n_features, d_in) = "
                  f"({self.config.n_features}, {self.config.d_in})")
            specs = model.param_specs(self.config)
            check("sae.params.extra", sorted(self.params.extra), sorted(self.params.extra) == sorted(specs),
                  f"must hold {sorted(specs)} for architecture {self.config.architecture!r}")
            for name, spec in specs.items():
                shape = tuple(np.shape(self.params.extra[name]))
                want = (self.config.n_features,) if spec.per_feature else ()
                check(f"sae.params.extra[{name!r}]", shape, shape == want, f"must have shape {want}")

    @property
    def n_features(self) -> int:
        return self.config.n_features

    @property
    def norm_scale(self) -> float:
        """The normalisation constant c (inputs are multiplied by it)."""
        return self.normalizer.scale

    def encode(self, acts: Float[Array, "*N D"]) -> Float[Array, "*N F"]:
        """Feature activations (SAE units) of activations in input units."""
        x = acts.reshape(-1, acts.shape[-1]).astype(jnp.float32)
        f = model.encode(self.params, self.normalizer.apply(x), self.config)
        return f.reshape(acts.shape[:-1] + (f.shape[-1],))

    @property
    def k_sparse(self) -> int:
        """k when the inference form activates at most k features per input (TopK), else 0."""
        return self.config.k if self.config.architecture == "topk" else 0

    def encode_sparse(self, acts: Float[Array, "N D"]
                      ) -> tuple[Float[Array, "N F"], Float[Array, "N k"], Int[Array, "N k"]]:
        """A TopK dictionary's (f, values, ids): f = :meth:`encode`, and each input's k
        largest activations (descending; ReLU applied, so a value may be 0) with their
        feature ids, read off the same top-k. (f keeps every entry tied with the k-th value,
        the lists exactly k: they differ only on exact ties.)"""
        k = self.k_sparse
        if not k:
            raise ValueError(f"architecture {self.config.architecture!r} is not k-sparse per input")
        x = acts.reshape(-1, acts.shape[-1]).astype(jnp.float32)
        pre = model.pre_activations(self.params, self.normalizer.apply(x), self.config)
        vals, ids = jax.lax.top_k(pre, k)
        # The k-th value as the min of the k (a slice of top_k's output is a full sort on
        # XLA:CPU), the same threshold as saejax.sae.topk.topk_activation.
        f = jnp.where(pre >= jnp.min(vals, axis=-1, keepdims=True), jax.nn.relu(pre), 0.0)
        return f, jax.nn.relu(vals), ids

    def decode(self, f: Float[Array, "*N F"]) -> Float[Array, "*N D"]:
        """Reconstruction in input units of feature activations."""
        flat = f.reshape(-1, f.shape[-1])
        x_hat = self.normalizer.invert(model.decode(self.params, flat, self.config))
        return x_hat.reshape(f.shape[:-1] + (x_hat.shape[-1],))

    def splice(self, acts: Float[Array, "*N D"]
               ) -> tuple[Float[Array, "*N D"], Float[Array, "*N F"]]:
        """(reconstruction in input units, features): what replaces a site in the LM."""
        f = self.encode(acts)
        return self.decode(f), f

    def directions(self) -> Float[Array, "F D"]:
        """Each feature's decoder vector in input units (the effect of activation 1)."""
        return self.normalizer.invert(jnp.asarray(self.params.W_dec, jnp.float32))

    def folded(self) -> SAEBundle:
        """The normaliser folded into the parameters: W_enc c, W_dec / c, b_dec / c.

        encode(c x) with (W_enc, b_dec) = encode(x) with (c W_enc, b_dec / c), since
        (c x - b_dec) W_enc^T = (x - b_dec / c) (c W_enc)^T; and decode(f) / c =
        f (W_dec / c) + b_dec / c. The folded decoder rows are no longer unit norm.
        """
        c, p = self.normalizer.scale, self.params
        # The pre-activations are unchanged, so thresholds, r_mag and b_mag stay as they are.
        params = SAEParams(W_enc=p.W_enc * c, b_enc=p.b_enc, W_dec=p.W_dec / c, b_dec=p.b_dec / c,
                           extra=dict(p.extra))
        return dataclasses.replace(self, params=params, normalizer=Normalizer())

    def as_jumprelu(self) -> SAEBundle:
        """A BatchTopK or Matryoshka dictionary in its inference form: a JumpReLU whose
        thresholds all equal the running threshold theta (the same features, bit for bit:
        ReLU(z) > theta and ReLU(z) H(z - theta) agree for every theta). A JumpReLU is
        returned as it is; other architectures have no such form (ValueError)."""
        arch = self.config.architecture
        if arch == "jumprelu":
            return self
        if arch not in ("batchtopk", "matryoshka"):
            raise ValueError(f"architecture {arch!r} has no JumpReLU form (batchtopk, matryoshka and "
                             f"jumprelu have one)")
        # Before the first training step theta is -1 (plain ReLU at inference); 0 gives the
        # same features and a threshold other tools accept.
        theta = jnp.maximum(jnp.asarray(self.params.extra["threshold"], jnp.float32), 0.0)
        config = dataclasses.replace(self.config, architecture="jumprelu", jumprelu_threshold_param="raw",
                                     matryoshka_groups=(), k_anneal_start=0, k_anneal_fraction=0.0,
                                     aux_k=0)
        params = self.params.replace(extra={"threshold": jnp.full((self.config.n_features,), theta)})
        return dataclasses.replace(self, params=params, config=config)

    def on_mesh(self, mesh: jax.sharding.Mesh) -> SAEBundle:
        """The bundle with its parameters placed on ``mesh`` (latent axis over "model")."""
        axes = model.param_axes(self.config)
        placed = jax.tree.map(lambda v, a: jax.device_put(v, parallel.named_sharding(mesh, a)),
                              self.params, axes)
        return dataclasses.replace(self, params=placed)


EXPORT_FORMAT = 2
_ARRAYS = ("W_enc", "b_enc", "W_dec", "b_dec")
_EXTRA = "extra/"  # prefix of the architecture's own arrays in the .npz


def save_bundle(path: str, bundle: SAEBundle, extra: dict[str, Any] | None = None) -> None:
    """Writes ``bundle`` to ``path`` (an ``.npz``): arrays plus a JSON header, atomically."""
    header = {"format": EXPORT_FORMAT, "config": to_dict(bundle.config), "site": bundle.site,
              "normalizer": bundle.normalizer.to_dict(), "extra": extra or {}}
    arrays = {name: np.asarray(getattr(bundle.params, name), np.float32) for name in _ARRAYS}
    arrays.update({_EXTRA + name: np.asarray(v, np.float32) for name, v in bundle.params.extra.items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, header=np.asarray(json.dumps(header)), **arrays)
    os.replace(tmp, path)


def load_bundle(path: str) -> tuple[SAEBundle, dict[str, Any]]:
    """Reads a file written by :func:`save_bundle`; returns (bundle, extra metadata)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SAE export at {path!r} (write one with "
                                f"saejax.sae.bundle.save_bundle)")
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            params = SAEParams(**{k: np.asarray(data[k]) for k in _ARRAYS},
                               extra={k[len(_EXTRA):]: np.asarray(data[k]) for k in data.files
                                      if k.startswith(_EXTRA)})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # not an export
        raise ValueError(f"{path!r} is not a readable SAE export (.npz from save_bundle): "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path!r}: unsupported SAE export format "
                         f"{header.get('format') if isinstance(header, dict) else None!r} "
                         f"(this saejax reads format {EXPORT_FORMAT})")
    bundle = SAEBundle(params=params, config=from_config(SAEConfig, header["config"], prefix="sae"),
                       normalizer=Normalizer.from_dict(header["normalizer"]), site=header["site"])
    return bundle, header.get("extra", {})
