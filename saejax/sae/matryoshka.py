"""Matryoshka SAE on BatchTopK (Bussmann, Nabeshima, Karvonen, Nanda 2025; Nabeshima 2024).

Features come from BatchTopK exactly (:mod:`saejax.sae.batchtopk`, with its running
inference threshold). The dictionary is split into groups of sizes s_1..s_G
(``SAEConfig.matryoshka_groups``, summing to F; default [F/16, F/16, F/8, F/4, F/2] as in
Bussmann's reference code) and every prefix m_g = s_1 + .. + s_g reconstructs x alone:

    x_hat^(g) = b_dec + sum_{i < m_g} f_i W_dec[i]
    loss      = (1/G) sum_g mean_D (x_hat^(g) - x)^2  [+ AuxK on the full residual]

The sources weight the prefixes differently (FAMILIES.md section 3): dictionary_learning
(the paper's code) has (1/G) sum_g w_g MSE_g with w_g = 1/G by default, so 1/G^2 each;
SAELens sums them unweighted; Bussmann's code adds a b_dec-only level and divides by
G + 1. saejax averages over the G prefixes (equal weights, the full dictionary included, no
b_dec-only level): the same gradient direction as dictionary_learning's and SAELens', with
a scale that keeps the reconstruction term comparable to the other architectures' (so
learning rates transfer). The shared backward computes the prefix reconstructions from
per-group products, which together cost the same as one full decoder matmul.

The per-group products slice the latent axis, which a mesh may split over its "model"
axis: results equal one device's (tested), but group boundaries that do not fall on shard
boundaries (the default first group, F/16, lies inside one of 8 shards) make XLA move data
between shards and leave the work unbalanced. Prefer group sizes that are multiples of
F / (model shards) when the dictionary is split.

Exported, a Matryoshka SAE is a JumpReLU with one shared threshold like BatchTopK (the
group boundaries stay in its config).
"""

from __future__ import annotations

from saejax.sae.batchtopk import batchtopk_activation, threshold_params, update_threshold
from saejax.sae.registry import Architecture, register_architecture

MATRYOSHKA = register_architecture(Architecture(
    name="matryoshka", activation=batchtopk_activation, penalty=None, supports_auxk=True,
    params=threshold_params, update_buffers=update_threshold, nested=True, default_init="tied",
    uses_k=True, batch_wide=True))
