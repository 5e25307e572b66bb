"""SAE configuration: one frozen, validated dataclass for the autoencoder and its training.

Built from an ml_collections ``ConfigDict`` at the edge with
``saejax.config.from_config(SAEConfig, config.sae, prefix="sae")``; library code takes the
dataclass. Defaults follow Bricken et al. 2023 where the paper gives a number (resample
schedule, dead window, resample sample size, encoder scale 0.2); the rest are common
replication choices and are documented per field.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

from saejax.config import check, check_choice, check_fraction, check_nonnegative, check_positive

Precision = Literal["f32", "bf16"]


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """Sparse autoencoder and its optimiser.

    Attributes:
      d_in: input width D (the paper: 512 MLP neurons).
      n_features: dictionary size F (the paper: 512 .. 131,072).
      architecture: a name in the architecture registry ("relu" = the paper's ReLU + L1,
        "topk" = Gao et al. TopK, no L1).
      dead_strategy: a name in the dead-feature strategy registry ("resample" = the
        paper's neuron resampling, "none").
      l1_coefficient: lambda of the L1 penalty (sum over features, batch mean); ignored by
        architectures without an L1 term (TopK).
      k: active features per input for TopK; ignored by other architectures.
      lr, adam_b1, adam_b2, adam_eps: Adam (the paper gives no learning rate).
      precision: "f32", or "bf16" = bf16 matmul inputs with f32 accumulation; parameters,
        optimiser state and all elementwise maths stay f32 in both modes.
      resample_steps: steps at which dead features are resampled (the paper: 25k/50k/75k/100k).
      dead_window: a feature is dead if it fired on no input in the last ``dead_window``
        steps (the paper: 12,500).
      resample_sample_size: inputs on which the loss is computed for resampling (the
        paper: 819,200).
      resample_chunk_size: rows per chunk of that loss computation (bounds memory).
      resample_encoder_scale: new encoder rows = unit input x this x mean alive encoder
        norm (the paper: 0.2).
      dense_threshold: a feature is "dense" if it fires on more than this fraction of a
        batch (the paper: 1%).
      aux_k: AuxK (Gao et al. 2024, appendix A.2) for TopK: the ``aux_k`` largest
        pre-activations among dead features (as ``dead_window`` defines them) reconstruct
        the residual x - x_hat, which gives dead features a gradient again. 0 = off;
        Gao et al. use d_in / 2 (256 for the paper's 512 neurons).
      aux_coefficient: weight of the AuxK loss (Gao et al.: 1/32). Like theirs, the loss
        is scaled down by min(1, dead / aux_k) when few features are dead.
      aux_candidates: the AuxK term looks at this many of the longest-dead features (a
        static size for jit). While any feature is dead it costs five B x D x
        aux_candidates matmuls and a top-k over [B, aux_candidates] per step (the step
        itself: five B x D x F matmuls); nothing while none is dead.
      geometric_median_iters: Weiszfeld iterations for the decoder-bias initialisation.
      seed: root RNG seed (initialisation and resampling draws).
    """

    d_in: int = 512
    n_features: int = 4096
    architecture: str = "relu"
    dead_strategy: str = "resample"
    l1_coefficient: float = 3e-3
    k: int = 32
    lr: float = 1e-4
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    precision: Precision = "f32"
    resample_steps: tuple[int, ...] = (25_000, 50_000, 75_000, 100_000)
    dead_window: int = 12_500
    resample_sample_size: int = 819_200
    resample_chunk_size: int = 8_192
    resample_encoder_scale: float = 0.2
    dense_threshold: float = 0.01
    aux_k: int = 0
    aux_coefficient: float = 1.0 / 32
    aux_candidates: int = 1024
    geometric_median_iters: int = 100
    seed: int = 0

    def __post_init__(self):
        # The registry imports nothing heavy; looking up an architecture imports its module
        # (jax only), never the train step or optax.
        from saejax.sae import registry

        check_positive("sae.d_in", self.d_in)
        check_positive("sae.n_features", self.n_features)
        check_choice("sae.architecture", self.architecture, registry.architecture_names())
        check_choice("sae.dead_strategy", self.dead_strategy, registry.dead_strategy_names())
        arch = registry.get_architecture(self.architecture)
        check_nonnegative("sae.l1_coefficient", self.l1_coefficient)
        check("sae.k", self.k, isinstance(self.k, int) and self.k >= 1, "must be an integer >= 1")
        if arch.check is not None:
            arch.check(self)
        check_positive("sae.lr", self.lr)
        check_fraction("sae.adam_b1", self.adam_b1)
        check_fraction("sae.adam_b2", self.adam_b2)
        check_positive("sae.adam_eps", self.adam_eps)
        check_choice("sae.precision", self.precision, get_args(Precision))
        steps = tuple(self.resample_steps)
        check("sae.resample_steps", steps,
              all(isinstance(s, int) and s > 0 for s in steps) and list(steps) == sorted(set(steps)),
              "must be strictly increasing positive integers")
        check_positive("sae.dead_window", self.dead_window)
        check_positive("sae.resample_chunk_size", self.resample_chunk_size)
        check("sae.resample_sample_size", self.resample_sample_size,
              isinstance(self.resample_sample_size, int) and self.resample_sample_size > 0
              and self.resample_sample_size % self.resample_chunk_size == 0,
              f"must be a positive multiple of sae.resample_chunk_size={self.resample_chunk_size}")
        check_positive("sae.resample_encoder_scale", self.resample_encoder_scale)
        check_fraction("sae.dense_threshold", self.dense_threshold)
        check("sae.aux_k", self.aux_k, isinstance(self.aux_k, int) and self.aux_k >= 0,
              "must be an integer >= 0 (0 = AuxK off)")
        check_nonnegative("sae.aux_coefficient", self.aux_coefficient)
        check_positive("sae.aux_candidates", self.aux_candidates)
        if self.aux_k > 0:
            names = ", ".join(repr(n) for n in registry.auxk_architectures())
            check("sae.aux_k", self.aux_k, arch.supports_auxk,
                  f"AuxK is defined for architecture {names}, not {self.architecture!r}")
            check("sae.aux_k", self.aux_k, self.aux_k <= min(self.aux_candidates, self.n_features),
                  f"must be <= sae.aux_candidates={self.aux_candidates} and "
                  f"sae.n_features={self.n_features}")
        check_positive("sae.geometric_median_iters", self.geometric_median_iters)
        check_nonnegative("sae.seed", self.seed)
