"""The one seam for SAE variants: architectures and dead-feature strategies, by name.

An *architecture* is an activation ``pre -> f`` plus a per-input sparsity penalty, both
functions of the pre-activations and of the architecture's own per-feature parameters
(JumpReLU's threshold, Gated's r_mag and b_mag, BatchTopK's running threshold); the shared
model code (:mod:`saejax.sae.model`) owns the tied pre-encoder bias, the matmuls, the
decoder constraint, nested (Matryoshka) reconstructions, the frozen-decoder auxiliary
reconstruction (Gated) and the gradients, and differentiates the activation and penalty
with ``jax.vjp`` (straight-through estimators are ``custom_vjp``s inside them). A new
architecture is one module that calls :func:`register_architecture`; every registered
architecture's hand-written backward is checked against autodiff of
:func:`saejax.sae.model.per_input_loss` (:func:`saejax.sae.gradcheck.check_backward`) before
its first train step is built.

A *dead-feature strategy* is a factory ``(config, mesh) -> fn(state, sample_inputs) ->
(state, info)`` that the training loop calls at the scheduled steps. The paper's neuron
resampling is :mod:`saejax.sae.resample`; "none" leaves the state alone. A remedy that is
a loss term inside every step instead (AuxK, :mod:`saejax.sae.auxk`) is switched on by
``SAEConfig.aux_k`` for the architectures that declare ``supports_auxk``.

This module imports nothing heavy: built-in architectures (jax only) are imported on the
first lookup of an architecture, a built-in dead-feature strategy (optax, the train step)
only when it is looked up by name, so validating a config never imports the step.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

# Built-in entries register themselves when their module is imported.
_BUILTIN_ARCHITECTURES = {"relu": "saejax.sae.relu", "topk": "saejax.sae.topk",
                          "batchtopk": "saejax.sae.batchtopk", "jumprelu": "saejax.sae.jumprelu",
                          "matryoshka": "saejax.sae.matryoshka", "gated": "saejax.sae.gated"}
_BUILTIN_DEAD_STRATEGIES = {"resample": "saejax.sae.resample"}

# pre [B, F] f32, side (dict of [F] / scalar arrays), ctx -> (f [B, F] f32, stats dict)
ActivationFn = Callable[[Any, Any, Any], Any]
# pre [B, F], f [B, F], side, ctx -> per-input penalty [B] f32 (coefficient and warm-up applied)
PenaltyFn = Callable[[Any, Any, Any, Any], Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """An architecture's own parameter, stored in ``SAEParams.extra[name]``.

    Attributes:
      per_feature: shape [F], sharded over the latent axis like b_enc; else a scalar.
      init: ``config -> float``, the initial value (of every feature); resampling puts a
        dead feature's entry back to it and zeroes its Adam moments.
      trained: False for a buffer the step sets itself (``Architecture.update_buffers``):
        it gets no gradient, so Adam leaves it alone, and the step overwrites it.
    """

    per_feature: bool
    init: Callable[[Any], float]
    trained: bool = True
# (config, mesh) -> jitted fn(state, sample_inputs) -> (state, info)
DeadStrategyFactory = Callable[[Any, Any], Callable[[Any, Any], tuple[Any, dict[str, Any]]]]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """An SAE variant: how pre-activations become features and what sparsity costs.

    Attributes:
      name: registry key (``SAEConfig.architecture``).
      activation: ``(pre [B, F], side, ctx) -> (f [B, F], stats)``; differentiable by
        jax.vjp in ``pre`` and ``side`` (straight-through estimators via custom_vjp).
        ``side`` holds the extra parameters (:class:`ParamSpec`) plus ``"b_enc"`` [F]
        (Gated's magnitude path subtracts it), ``ctx`` is
        :class:`saejax.sae.model.Context` (config, train or inference form, the sparsity
        warm-up factor, the current k). ``stats`` are non-differentiated values for
        ``update_buffers``.
      penalty: ``(pre, f, side, ctx) -> [B]`` sparsity loss per input (coefficient and
        warm-up applied), or None for none. ``side["dec_norm"]`` [F] is the decoder row
        norms when the decoder is unconstrained (``SAEConfig.decoder = "free"``).
      params: ``config -> {name: ParamSpec}``, the architecture's own parameters.
      update_buffers: ``(extra, stats, ctx) -> {name: new value}`` for the untrained
        parameters, run by the step after the update (BatchTopK's running threshold).
      constrain: ``(extra, ctx) -> {name: value}``, a projection of trained extras after
        each update (JumpReLU's raw threshold is kept >= 0).
      aux_recon: ``(pre, side, ctx) -> g [B, F]``, features that a *frozen* copy of the
        decoder reconstructs x from, as an extra loss term (Gated's auxiliary loss), or None.
      nested: the loss averages the reconstructions of nested prefixes of the dictionary
        (``SAEConfig.matryoshka_groups``; Matryoshka).
      default_init: "kaiming" (untied Kaiming-uniform encoder and decoder) or "tied"
        (W_enc = W_dec, unit rows) when ``SAEConfig.init`` is "default".
      uses_k: ``SAEConfig.k`` sets its sparsity (k <= n_features is checked; k annealing
        applies).
      uses_l1: ``SAEConfig.l1_coefficient`` is its penalty's coefficient.
      batch_wide: the training activation selects across the whole batch (BatchTopK), so
        an input's features depend on the rest of its batch.
      feature_major: True if the activation acts on each pre-activation alone (no
        reduction across features, unlike top-k); on XLA:CPU the step then keeps its
        [B, F] intermediates feature-major (see :mod:`saejax.sae.model`). Only speed
        depends on it.
      supports_auxk: the AuxK loss (``SAEConfig.aux_k``) is defined for it.
      check: ``config -> None``, raises ``ConfigError`` for settings this architecture
        cannot use (e.g. TopK's k > n_features); called by ``SAEConfig``.

    Features are non-negative in every architecture: "fires" means f > 0 throughout saejax.
    """

    name: str
    activation: ActivationFn
    penalty: PenaltyFn | None = None
    feature_major: bool = False
    supports_auxk: bool = False
    check: Callable[[Any], None] | None = None
    params: Callable[[Any], dict[str, ParamSpec]] = lambda config: {}
    update_buffers: Callable[[Any, Any, Any], dict[str, Any]] | None = None
    constrain: Callable[[Any, Any], dict[str, Any]] | None = None
    aux_recon: Callable[[Any, Any, Any], Any] | None = None
    nested: bool = False
    default_init: str = "kaiming"
    uses_k: bool = False
    uses_l1: bool = False
    batch_wide: bool = False


@dataclasses.dataclass(frozen=True)
class DeadStrategy:
    """A dead-feature remedy run by the loop after the steps in ``SAEConfig.resample_steps``.

    Attributes:
      name: registry key (``SAEConfig.dead_strategy``).
      factory: ``(config, mesh) -> fn(state, sample_inputs) -> (state, info)``.
      scheduled: False for a strategy that never runs (then the loop draws no samples).
    """

    name: str
    factory: DeadStrategyFactory
    scheduled: bool = True


_ARCHITECTURES: dict[str, Architecture] = {}
_DEAD_STRATEGIES: dict[str, DeadStrategy] = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Adds ``arch`` under ``arch.name``; a second registration of a name is an error."""
    if arch.name in _ARCHITECTURES and _ARCHITECTURES[arch.name] is not arch:
        raise ValueError(f"SAE architecture {arch.name!r} is already registered")
    _ARCHITECTURES[arch.name] = arch
    return arch


def register_dead_strategy(name: str, factory: DeadStrategyFactory, *,
                           scheduled: bool = True) -> DeadStrategyFactory:
    """Adds a dead-feature strategy factory under ``name``."""
    if name in _DEAD_STRATEGIES and _DEAD_STRATEGIES[name].factory is not factory:
        raise ValueError(f"dead-feature strategy {name!r} is already registered")
    _DEAD_STRATEGIES[name] = DeadStrategy(name, factory, scheduled)
    return factory


def architecture_names() -> list[str]:
    return sorted(set(_BUILTIN_ARCHITECTURES) | set(_ARCHITECTURES))


def dead_strategy_names() -> list[str]:
    return sorted(set(_BUILTIN_DEAD_STRATEGIES) | set(_DEAD_STRATEGIES))


def _lookup(kind: str, name: str, table: dict, builtins: dict[str, str]):
    if name not in table and name in builtins:
        importlib.import_module(builtins[name])
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; registered: "
                       f"{sorted(set(table) | set(builtins))}")
    return table[name]


def get_architecture(name: str) -> Architecture:
    return _lookup("SAE architecture", name, _ARCHITECTURES, _BUILTIN_ARCHITECTURES)


def get_dead_strategy(name: str) -> DeadStrategy:
    return _lookup("dead-feature strategy", name, _DEAD_STRATEGIES, _BUILTIN_DEAD_STRATEGIES)


def auxk_architectures() -> list[str]:
    """Names of the architectures that support AuxK (imports the built-in ones)."""
    return sorted(n for n in architecture_names() if get_architecture(n).supports_auxk)


def _no_dead_strategy(config: Any, mesh: Any) -> Callable[[Any, Any], tuple[Any, dict[str, Any]]]:
    del config, mesh

    def keep(state, sample_inputs):
        del sample_inputs
        return state, {}

    return keep


register_dead_strategy("none", _no_dead_strategy, scheduled=False)
