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
StepKernel = Literal["auto", "dense", "sparse"]
Decoder = Literal["unit", "free"]
Init = Literal["default", "kaiming", "tied"]
ThresholdParam = Literal["raw", "log"]


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """Sparse autoencoder and its optimiser.

    Attributes:
      d_in: input width D (the paper: 512 MLP neurons).
      n_features: dictionary size F (the paper: 512 .. 131,072).
      architecture: a name in the architecture registry: "relu" (the paper's ReLU + L1),
        "topk" (Gao et al. 2024), "batchtopk" (Bussmann et al. 2024), "jumprelu"
        (Rajamanoharan et al. 2024 / Gemma Scope), "matryoshka" (BatchTopK with nested
        prefixes, Bussmann et al. 2025), "gated" (Rajamanoharan et al. 2024). Each
        module's docstring names the sources it follows where they disagree.
      dead_strategy: a name in the dead-feature strategy registry ("resample" = the
        paper's neuron resampling, "none").
      l1_coefficient: lambda of the L1 penalty (sum over features, batch mean) of "relu"
        and of the gate path of "gated"; ignored by the others.
      k: active features per input for "topk"; the mean per input of "batchtopk" and
        "matryoshka" (B k kept over a batch of B); ignored by the others.
      l0_coefficient: lambda of JumpReLU's L0 penalty (Gemma Scope's lambda: their
        sum-MSE on E||x||^2 = 1 equals saejax's mean-MSE on E||x|| = sqrt(D), so it
        transfers unchanged).
      target_l0: > 0 replaces JumpReLU's L0 penalty by the quadratic one of Gemma Scope 2
        (eq. 5): l0_coefficient * (2 / target_l0) * (||f||_0 - target_l0)^2 per input.
      jumprelu_bandwidth: epsilon of the rectangle kernel of JumpReLU's straight-through
        estimators, in Gemma Scope's units (inputs with E||x||^2 = 1; 0.001 there). saejax's
        inputs have E||x|| = sqrt(D), so the step uses it times sqrt(d_in).
      jumprelu_init_threshold: theta_0, in the same units (Gemma Scope: 0.001), times sqrt(d_in).
      jumprelu_threshold_param: "raw" trains theta itself (dictionary_learning; SAELens
        since PR #718), "log" trains log(theta) (the JumpReLU paper, App. J).
      threshold_ema: BatchTopK / Matryoshka running inference threshold: set to the first
        batch's smallest kept activation, then theta <- (1 - r) theta + r m every step.
      matryoshka_groups: Matryoshka group sizes (sum = n_features); () = the example of
        Bussmann's reference code, [F/16, F/16, F/8, F/4, F/2].
      decoder: "unit" keeps every dictionary vector at unit norm (projected gradient,
        renormalised after each update; the paper, Gemma Scope, Gated); "free" leaves the
        decoder unconstrained and weights the L1 penalty by the decoder norms,
        lambda sum_i f_i ||d_i|| (Anthropic's April 2024 update, "relu" only).
      init: "kaiming" (untied Kaiming-uniform encoder and decoder, unit decoder rows),
        "tied" (He-uniform decoder rows scaled to ``init_decoder_norm``, W_enc = W_dec:
        Gemma Scope, dictionary_learning, SAELens), or "default" (the architecture's).
      init_decoder_norm: decoder row norm of the "tied" init (April update: 0.1; must be
        1 with a unit decoder).
      total_steps: the run's length, for the schedules below (the training config sets
        it from ``num_steps`` when it is 0).
      lr_warmup_steps: linear learning-rate warm-up, factor min(1, (t + 1) / W).
      lr_decay_fraction: linear decay to 0 over this last fraction of ``total_steps``
        (April update: 0.2), factor min(1, (T - t) / (fraction T)).
      sparsity_warmup_fraction: the sparsity coefficient (L1 or L0) rises linearly from 0
        over this first fraction of steps, factor min(1, t / (fraction T)) (April update:
        0.05).
      k_anneal_start: > 0 anneals k for "topk" / "batchtopk" / "matryoshka" linearly from
        this value down to ``k`` over the first ``k_anneal_fraction`` of the steps
        (sparsify's rule, k_t = round(k0 (1 - p) + k p)).
      k_anneal_fraction: see ``k_anneal_start``.
      grad_clip: > 0 clips the gradient (after the decoder projection, as
        dictionary_learning does) to this global L2 norm before Adam (dictionary_learning
        and SAELens use 1.0); 0 = off.
      lr, adam_b1, adam_b2, adam_eps: Adam (the paper gives no learning rate).
      precision: "f32", or "bf16" = bf16 matmul inputs with f32 accumulation; parameters,
        optimiser state and all elementwise maths stay f32 in both modes.
      step_kernel: "dense" (five B x D x F matmuls), "sparse" (TopK, BatchTopK, Matryoshka:
        after the encoder matmul and top-k, decode and gradients on the active features
        only, saejax/sae/sparse.py and sparse_batch.py) or "auto" (sparse when the cost
        model says it is faster).
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
      aux_k: AuxK (Gao et al. 2024, appendix A.2) for TopK, BatchTopK and Matryoshka: the ``aux_k`` largest
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
    l0_coefficient: float = 1e-3
    target_l0: float = 0.0
    jumprelu_bandwidth: float = 0.001
    jumprelu_init_threshold: float = 0.001
    jumprelu_threshold_param: ThresholdParam = "raw"
    threshold_ema: float = 0.01
    matryoshka_groups: tuple[int, ...] = ()
    decoder: Decoder = "unit"
    init: Init = "default"
    init_decoder_norm: float = 1.0
    total_steps: int = 0
    lr_warmup_steps: int = 0
    lr_decay_fraction: float = 0.0
    sparsity_warmup_fraction: float = 0.0
    k_anneal_start: int = 0
    k_anneal_fraction: float = 0.0
    grad_clip: float = 0.0
    lr: float = 1e-4
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    precision: Precision = "f32"
    step_kernel: StepKernel = "auto"
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
        if arch.uses_k:
            check("sae.k", self.k, self.k <= self.n_features,
                  f"must be <= sae.n_features={self.n_features} for architecture {self.architecture!r}")
        check_nonnegative("sae.l0_coefficient", self.l0_coefficient)
        check_nonnegative("sae.target_l0", self.target_l0)
        check_positive("sae.jumprelu_bandwidth", self.jumprelu_bandwidth)
        check_positive("sae.jumprelu_init_threshold", self.jumprelu_init_threshold)
        check_choice("sae.jumprelu_threshold_param", self.jumprelu_threshold_param,
                     get_args(ThresholdParam))
        check("sae.threshold_ema", self.threshold_ema,
              isinstance(self.threshold_ema, (int, float)) and 0 < self.threshold_ema <= 1,
              "must be in (0, 1]")
        groups = tuple(self.matryoshka_groups)
        check("sae.matryoshka_groups", groups,
              all(isinstance(g, int) and g > 0 for g in groups), "must be positive integers")
        if groups:
            check("sae.matryoshka_groups", groups, arch.nested,
                  f"is used by architecture 'matryoshka' only, not {self.architecture!r}")
            check("sae.matryoshka_groups", groups, sum(groups) == self.n_features,
                  f"must sum to sae.n_features={self.n_features} (they sum to {sum(groups)})")
        check_choice("sae.decoder", self.decoder, get_args(Decoder))
        if self.decoder == "free":
            check("sae.decoder", self.decoder, self.architecture == "relu",
                  "'free' (the April 2024 update's decoder-norm-weighted L1) is defined for "
                  f"architecture 'relu' only, not {self.architecture!r}")
        check_choice("sae.init", self.init, get_args(Init))
        check_positive("sae.init_decoder_norm", self.init_decoder_norm)
        if self.decoder == "unit":
            check("sae.init_decoder_norm", self.init_decoder_norm, self.init_decoder_norm == 1.0,
                  "must be 1.0 with sae.decoder='unit' (the rows are kept at unit norm)")
        elif self.init_decoder_norm != 1.0:
            check("sae.init_decoder_norm", self.init_decoder_norm, self.init_scheme() == "tied",
                  "is used by sae.init='tied' only (the Kaiming init has unit rows)")
        check("sae.total_steps", self.total_steps, isinstance(self.total_steps, int) and self.total_steps >= 0,
              "must be an integer >= 0")
        check("sae.lr_warmup_steps", self.lr_warmup_steps,
              isinstance(self.lr_warmup_steps, int) and self.lr_warmup_steps >= 0, "must be an integer >= 0")
        for name in ("lr_decay_fraction", "sparsity_warmup_fraction", "k_anneal_fraction"):
            check_fraction(f"sae.{name}", getattr(self, name), closed=True)
        check("sae.k_anneal_start", self.k_anneal_start,
              isinstance(self.k_anneal_start, int) and self.k_anneal_start >= 0, "must be an integer >= 0")
        if not self.k_anneal_start:
            check("sae.k_anneal_fraction", self.k_anneal_fraction, self.k_anneal_fraction == 0,
                  "must be 0 unless sae.k_anneal_start is set")
        if self.k_anneal_start:
            check("sae.k_anneal_start", self.k_anneal_start, arch.uses_k,
                  f"anneals k, which architecture {self.architecture!r} does not use")
            check("sae.k_anneal_start", self.k_anneal_start,
                  self.k < self.k_anneal_start <= self.n_features,
                  f"must be > sae.k={self.k} and <= sae.n_features={self.n_features}")
            check("sae.k_anneal_fraction", self.k_anneal_fraction, self.k_anneal_fraction > 0,
                  "must be > 0 when sae.k_anneal_start is set")
        check_nonnegative("sae.grad_clip", self.grad_clip)
        if arch.check is not None:
            arch.check(self)
        check_positive("sae.lr", self.lr)
        check_fraction("sae.adam_b1", self.adam_b1)
        check_fraction("sae.adam_b2", self.adam_b2)
        check_positive("sae.adam_eps", self.adam_eps)
        check_choice("sae.precision", self.precision, get_args(Precision))
        check_choice("sae.step_kernel", self.step_kernel, get_args(StepKernel))
        if self.step_kernel == "sparse":
            from saejax.sae.sparse import supports

            why = supports(self)
            check("sae.step_kernel", self.step_kernel, why is None, f"cannot be 'sparse': {why}")
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

    def check_schedule(self) -> None:
        """Raises ConfigError if a schedule is a fraction of an unknown length (the train step
        calls this; ``SAETrainConfig`` fills ``total_steps`` from ``num_steps``)."""
        for name in ("lr_decay_fraction", "sparsity_warmup_fraction", "k_anneal_fraction"):
            if getattr(self, name) > 0:
                check("sae.total_steps", self.total_steps, self.total_steps > 0,
                      f"must be > 0 when sae.{name} > 0 (the training config sets it from num_steps)")

    def groups(self) -> tuple[int, ...]:
        """The Matryoshka group sizes (``matryoshka_groups`` or the default split); (F,) otherwise."""
        from saejax.sae import registry

        if not registry.get_architecture(self.architecture).nested:
            return (self.n_features,)
        if self.matryoshka_groups:
            return tuple(self.matryoshka_groups)
        f = self.n_features
        sizes = [f // 16, f // 16, f // 8, f // 4]
        return tuple(s for s in sizes + [f - sum(sizes)] if s > 0)

    def init_scheme(self) -> str:
        """"kaiming" or "tied": ``init``, or the architecture's default."""
        from saejax.sae import registry

        return registry.get_architecture(self.architecture).default_init if self.init == "default" \
            else self.init
