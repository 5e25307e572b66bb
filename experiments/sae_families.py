"""Every SAE family on the demo's budget: the runs of benchmarks/bench_families.py.

    python launch/train_sae.py --config=experiments/sae_families.py:batchtopk_k16 \
        --config.lm.dir=runs/demo/lm

The base is the demo (experiments/sae_demo.py: 4,096 features on the demo LM's 512 MLP
neurons, 400 steps of 4,096 activations = 1.6M tokens, Adam lr 1e-3, inputs normalised to
E||x|| = sqrt(512), neuron resampling at steps 100/200/300 with dead = silent for 100
steps). Every variant adds the same learning-rate schedule (linear decay to 0 over the
last 20% of steps, Anthropic's April 2024 update) and keeps the rest of the demo, so the
families differ only where their papers do:

- ``relu_l<lambda>``: the paper's ReLU + L1.
- ``april_l<lambda>``: Anthropic's April 2024 update: free decoder, L1 weighted by decoder
  norms, decoder init norm 0.1 with W_enc = W_dec^T, L1 warm-up over the first 5%,
  gradient clipping at 1.0, no resampling.
- ``topk_k<k>``: Gao et al. TopK (the demo's architecture; AuxK with aux_k 256).
- ``batchtopk_k<k>``: Bussmann et al. BatchTopK, AuxK 256.
- ``matryoshka_k<k>``: Matryoshka on BatchTopK (groups F/16, F/16, F/8, F/4, F/2), AuxK 256.
- ``jumprelu_l<lambda>``: JumpReLU with the L0 penalty, Gemma Scope's init, Adam betas
  (0, 0.999), bandwidth and initial threshold in their units (x sqrt(512)), L0
  warm-up over the first 5%.
- ``jumprelu-t05_l<lambda>``: the same with theta_0 = 0.05 in Gemma Scope's units (1.13 in
  saejax's) instead of 0.001: Adam moves a raw threshold by at most ~lr per step, so in
  400 steps at lr 1e-3 Gemma Scope's theta_0 (0.023 here) cannot reach the ~1.5 that an
  L0 near 20 needs (an 80-step trial stayed at L0 604).
- ``gated_l<lambda>``: Gated SAE with Adam betas (0, 0.999) (the paper's App. D.1).

``<lambda>`` is written as in Python (``relu_l3e-3``); ``<k>`` an integer. A suffix
``_lr<lr>`` sets Adam's learning rate (``batchtopk_k17_lr3e-3``; default the demo's 1e-3).
"""

import ml_collections

from experiments import sae_demo

FAMILIES = ("relu", "april", "topk", "batchtopk", "matryoshka", "jumprelu", "jumprelu-t05", "gated")


def parse(variant: str) -> tuple[str, float, float | None]:
    """"batchtopk_k16" -> ("batchtopk", 16, None); "relu_l3e-3_lr2e-3" -> ("relu", 0.003, 0.002)."""
    family, _, rest = variant.partition("_")
    level, sep, lr = rest.partition("_lr")
    try:
        value, lr_value = float(level[1:]), float(lr) if lr else None
    except ValueError:
        value = lr_value = None
    if family not in FAMILIES or level[:1] not in ("k", "l") or value is None or (sep and not lr_value):
        raise ValueError(f"unknown variant {variant!r}: expected <family>_k<k> or <family>_l<lambda>, "
                         f"optionally _lr<lr>, family one of {list(FAMILIES)}")
    return family, value, lr_value


def get_config(variant: str = "batchtopk_k16") -> ml_collections.ConfigDict:
    family, level, lr = parse(variant)
    c = sae_demo.get_config("topk")
    c.workdir = f"runs/families/{variant}"
    s = c.sae
    s.update(lr_decay_fraction=0.2)
    if lr is not None:
        s.update(lr=lr)
    if family in ("topk", "batchtopk", "matryoshka"):
        s.update(architecture=family, k=int(level), aux_k=256)
    elif family == "relu":
        s.update(architecture="relu", l1_coefficient=level)
    elif family == "april":
        s.update(architecture="relu", l1_coefficient=level, decoder="free", init="tied",
                 init_decoder_norm=0.1, sparsity_warmup_fraction=0.05, grad_clip=1.0,
                 dead_strategy="none")
    elif family in ("jumprelu", "jumprelu-t05"):
        s.update(architecture="jumprelu", l0_coefficient=level, adam_b1=0.0,
                 sparsity_warmup_fraction=0.05)
        if family == "jumprelu-t05":
            s.update(jumprelu_init_threshold=0.05)
    elif family == "gated":
        s.update(architecture="gated", l1_coefficient=level, adam_b1=0.0)
    return c
