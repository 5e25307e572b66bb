"""The one seam for SAE variants: architectures and dead-feature strategies, by name.

An *architecture* is an activation function ``pre -> f`` plus a per-input sparsity penalty
``f -> [B]``; the shared model code (:mod:`saejax.sae.model`) owns the tied pre-encoder
bias, the five matmuls, the unit-norm decoder and the gradients, and differentiates the
activation and penalty with ``jax.vjp``. A new activation (JumpReLU, Gated, ...) is one
module that calls :func:`register_architecture`.

A *dead-feature strategy* is a factory ``(config, mesh) -> fn(state, sample_inputs) ->
(state, info)`` that the training loop calls at the scheduled steps. The paper's neuron
resampling is :mod:`saejax.sae.resample`; "none" leaves the state alone. A remedy that is
a loss term inside every step instead (AuxK, :mod:`saejax.sae.auxk`) is switched on by
``SAEConfig.aux_k`` and works alongside any strategy.

Built-in modules register themselves on import; lookups import them lazily so that
``saejax.sae.config`` can validate names without an import cycle.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

_BUILTIN_MODULES = ("saejax.sae.relu", "saejax.sae.topk", "saejax.sae.resample")

# pre [B, F] f32, config -> f [B, F] f32
ActivationFn = Callable[[Any, Any], Any]
# f [B, F] f32, config -> per-input penalty [B] f32 (already multiplied by its coefficient)
PenaltyFn = Callable[[Any, Any], Any]
# (config, mesh) -> jitted fn(state, sample_inputs) -> (state, info)
DeadStrategyFactory = Callable[[Any, Any], Callable[[Any, Any], tuple[Any, dict[str, Any]]]]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """An SAE variant: how pre-activations become features and what sparsity costs.

    Attributes:
      name: registry key (``SAEConfig.architecture``).
      activation: ``(pre [B, F], config) -> f [B, F]``; must be differentiable by jax.vjp
        (use straight-through estimators via custom_vjp where needed).
      penalty: ``(f [B, F], config) -> [B]`` sparsity loss per input, or None for none.
      feature_major: True if the activation acts on each pre-activation alone (no
        reduction across features, unlike top-k); the step then keeps its [B, F]
        intermediates feature-major, where all five matmuls run at full speed on
        XLA:CPU (see :mod:`saejax.sae.model`). Only speed depends on it.

    Features are non-negative in every architecture: "fires" means f > 0 throughout saejax.
    """

    name: str
    activation: ActivationFn
    penalty: PenaltyFn | None = None
    feature_major: bool = False


_ARCHITECTURES: dict[str, Architecture] = {}
_DEAD_STRATEGIES: dict[str, DeadStrategyFactory] = {}
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in _BUILTIN_MODULES:
            importlib.import_module(name)


def register_architecture(arch: Architecture) -> Architecture:
    """Adds ``arch`` under ``arch.name``; a second registration of a name is an error."""
    if arch.name in _ARCHITECTURES and _ARCHITECTURES[arch.name] is not arch:
        raise ValueError(f"SAE architecture {arch.name!r} is already registered")
    _ARCHITECTURES[arch.name] = arch
    return arch


def register_dead_strategy(name: str, factory: DeadStrategyFactory) -> DeadStrategyFactory:
    """Adds a dead-feature strategy factory under ``name``."""
    if name in _DEAD_STRATEGIES and _DEAD_STRATEGIES[name] is not factory:
        raise ValueError(f"dead-feature strategy {name!r} is already registered")
    _DEAD_STRATEGIES[name] = factory
    return factory


def architecture_names() -> list[str]:
    _load_builtins()
    return sorted(_ARCHITECTURES)


def dead_strategy_names() -> list[str]:
    _load_builtins()
    return sorted(_DEAD_STRATEGIES)


def get_architecture(name: str) -> Architecture:
    _load_builtins()
    if name not in _ARCHITECTURES:
        raise KeyError(f"unknown SAE architecture {name!r}; registered: {sorted(_ARCHITECTURES)}")
    return _ARCHITECTURES[name]


def get_dead_strategy(name: str) -> DeadStrategyFactory:
    _load_builtins()
    if name not in _DEAD_STRATEGIES:
        raise KeyError(f"unknown dead-feature strategy {name!r}; registered: {sorted(_DEAD_STRATEGIES)}")
    return _DEAD_STRATEGIES[name]


def _no_dead_strategy(config: Any, mesh: Any) -> Callable[[Any, Any], tuple[Any, dict[str, Any]]]:
    del config, mesh

    def keep(state, sample_inputs):
        del sample_inputs
        return state, {}

    return keep


register_dead_strategy("none", _no_dead_strategy)
