"""Input normalisation of a dictionary: the one owner of the scale and the statistics behind it.

An SAE may be trained on a site's activations multiplied by a constant ``c`` chosen so that
E||c x|| = sqrt(D) (Anthropic's Circuits Update, Feb 2024): one set of hyperparameters then
fits sites of any scale. Everything else in saejax goes through :class:`Normalizer`:

    x_sae  = normalizer.apply(x_lm)         = c * x_lm      what the SAE is trained on
    x_lm   = normalizer.invert(x_sae)       = x_sae / c     reconstructions, decoder effects

:class:`ActivationStats` are the site statistics the scale comes from (mean norm, mean
activation, rows). They are computed once per run, from a fixed sample of an LM's
activations or from an activation store's per-chunk sums, and saved with the run record
(:mod:`saejax.record`). The mean activation (LM units) also serves the mean-ablation
baseline of the evaluation.

:meth:`saejax.sae.bundle.SAEBundle.folded` folds the constant into the parameters for
export (W_enc c, W_dec / c, b_dec / c), so the folded dictionary reads LM units directly.

Legend: N rows, D activation width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from saejax.config import ConfigError, check


@dataclasses.dataclass(frozen=True)
class ActivationStats:
    """Statistics of a site's activations (LM units), from ``rows`` rows.

    Attributes:
      rows: rows the statistics come from.
      mean_norm: E||x||.
      mean_sq_norm: E||x||^2 (None when the source did not record it).
      mean: E[x], one value per input dimension.
    """

    rows: int
    mean_norm: float
    mean: tuple[float, ...]
    mean_sq_norm: float | None = None

    @property
    def width(self) -> int:
        return len(self.mean)

    @classmethod
    def from_rows(cls, x: np.ndarray) -> ActivationStats:
        """Statistics of a sample [N, D] (computed in float64)."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or not len(x):
            raise ValueError(f"activation statistics need a non-empty [N, D] sample, got "
                             f"shape {x.shape}")
        return cls(rows=len(x), mean_norm=float(np.linalg.norm(x, axis=1).mean()),
                   mean=tuple(float(v) for v in x.mean(0)),
                   mean_sq_norm=float((x * x).sum(1).mean()))

    @classmethod
    def from_sums(cls, rows: int, sum_norm: float, sum_sq_norm: float,
                  sums: Sequence[float]) -> ActivationStats:
        """Statistics from running sums (e.g. an activation store's per-chunk records)."""
        return cls(rows=int(rows), mean_norm=float(sum_norm) / rows,
                   mean=tuple(float(s) / rows for s in sums),
                   mean_sq_norm=float(sum_sq_norm) / rows)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "mean_norm": self.mean_norm, "mean_sq_norm": self.mean_sq_norm,
                "mean": list(self.mean)}

    @classmethod
    def from_dict(cls, d: dict) -> ActivationStats:
        return cls(rows=int(d["rows"]), mean_norm=float(d["mean_norm"]),
                   mean=tuple(float(v) for v in d["mean"]),
                   mean_sq_norm=None if d.get("mean_sq_norm") is None else float(d["mean_sq_norm"]))


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Multiply a site's activations by ``scale`` before the SAE; divide outputs by it.

    Frozen and hashable: it is a static part of :class:`saejax.sae.bundle.SAEBundle`, so
    jitted functions specialise on it once.
    """

    scale: float = 1.0

    def __post_init__(self):
        check("normalizer.scale", self.scale,
              isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0,
              "must be a finite number > 0")

    @classmethod
    def from_stats(cls, stats: ActivationStats, *, normalize: bool = True) -> Normalizer:
        """The scale that makes E||x|| = sqrt(D) on ``stats`` (1 when ``normalize`` is off).

        Raises:
          ConfigError: normalisation asked for, but the activations are all zero.
        """
        if not normalize:
            return cls(1.0)
        if not stats.mean_norm > 0:
            raise ConfigError("the site's activations are all zero on the normalisation sample; "
                              "cannot normalise (set source.normalize=false or choose another site)")
        return cls(math.sqrt(stats.width) / stats.mean_norm)

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0

    def apply(self, x):
        """LM units -> SAE units (works on NumPy and jax arrays, also under jit)."""
        return x * self.scale if self.scale != 1.0 else x

    def invert(self, x):
        """SAE units -> LM units (reconstructions, decoder directions)."""
        return x / self.scale if self.scale != 1.0 else x

    def to_dict(self) -> dict:
        return {"scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(float(d["scale"]))
