"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014, section 3.2 and App. G).

    x_bar = x - b_dec
    pi_gate = W_gate x_bar + b_gate          (W_gate = W_enc, b_gate = b_enc here)
    f_mag   = ReLU(exp(r_mag) * (W_gate x_bar) + b_mag)      W_mag = diag(exp(r_mag)) W_gate
    f       = H(pi_gate) * f_mag
    loss    = mean_D (x_hat - x)^2 + lambda s(t) ||ReLU(pi_gate)||_1
              + mean_D (ReLU(pi_gate) sg(W_dec) + sg(b_dec) - x)^2

H has no straight-through estimator, so the gate path learns only from the sparsity and
auxiliary terms. Decisions (FAMILIES.md section 4):

- Frozen: only W_dec and b_dec in their role as the auxiliary decoder (the paper's 3.2.2
  and App. G pseudo-code; dictionary_learning's gdm.py): the pre-encoder b_dec inside
  x_bar still gets gradient from every term, as in the pseudo-code.
- Normalisation: mean over D of the squared error (App. D.1.1 "divide by n"), which is
  saejax's everywhere, so the paper's lambda values apply unchanged.
- The decoder keeps unit-norm rows (App. D.1.1); the Anthropic-style variant with a
  decoder-norm-weighted penalty and a free decoder is refused (``decoder = "free"``):
  freezing the decoder in one place but not the other is worse (FAMILIES.md 4).
- Init (the paper's is unverified): dictionary_learning's and SAELens', W_enc = W_dec^T
  (the "tied" init) with unit rows, r_mag = b_mag = b_gate = 0.
- Resampling is the paper's (App. D.1.1) via ``dead_strategy = "resample"``, which resets
  r_mag and b_mag of a resampled feature to 0; the paper also re-warms the learning rate
  after each resample, which saejax does not do.

Legend: B batch, F features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from saejax.sae.registry import Architecture, ParamSpec, register_architecture


def gated_activation(pre: Float[Array, "B F"], side, ctx) -> tuple[Float[Array, "B F"], dict]:
    """H(pi_gate) ReLU(exp(r_mag) (pi_gate - b_gate) + b_mag); ``pre`` is pi_gate."""
    del ctx
    mag = jax.nn.relu(jnp.exp(side["r_mag"]) * (pre - side["b_enc"]) + side["b_mag"])
    return jnp.where(pre > 0, mag, 0.0), {}


def gate_l1(pre: Float[Array, "B F"], f, side, ctx) -> Float[Array, " B"]:
    """lambda s(t) sum_i ReLU(pi_gate)_i per input (on the gate, not on f)."""
    del f, side
    return (ctx.config.l1_coefficient * ctx.sparsity) * jnp.sum(jax.nn.relu(pre), axis=-1)


def gate_features(pre: Float[Array, "B F"], side, ctx) -> Float[Array, "B F"]:
    """ReLU(pi_gate): what the frozen decoder reconstructs x from in the auxiliary loss."""
    del side, ctx
    return jax.nn.relu(pre)


def gated_params(config) -> dict[str, ParamSpec]:
    del config
    return {"r_mag": ParamSpec(per_feature=True, init=lambda c: 0.0),
            "b_mag": ParamSpec(per_feature=True, init=lambda c: 0.0)}


GATED = register_architecture(Architecture(
    name="gated", activation=gated_activation, penalty=gate_l1, aux_recon=gate_features,
    feature_major=True, params=gated_params, default_init="tied", uses_l1=True))
