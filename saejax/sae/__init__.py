"""Sparse autoencoders: architectures, loss, resampling and the pure, sharded train step.

Knows nothing about the LM: it consumes [B, D] activation batches. Public API:

- :class:`SAEConfig` (``config``), the architecture / dead-strategy registry (``registry``);
- ``step``: :class:`TrainState`, :func:`init_state`, :func:`make_train_step`,
  :func:`should_resample`, :func:`abstract_state`, :func:`state_shardings`;
- ``bundle``: :class:`SAEBundle`, a trained dictionary with its input normalisation
  (encode / decode / splice in the input's units);
- ``resample``: :func:`make_resample` (the paper's neuron resampling);
- ``synthetic`` / ``metrics``: ground-truth data and dictionary-recovery metrics;
- ``memory``: :func:`estimate_memory`.

Names are imported on first use (PEP 562), so ``import saejax.sae.config`` stays light:
it imports neither optax nor the train step.
"""

import importlib

_EXPORTS = {
    "SAEConfig": "saejax.sae.config",
    "SAEParams": "saejax.sae.model",
    "SAEBundle": "saejax.sae.bundle",
    "estimate_memory": "saejax.sae.memory",
    "make_resample": "saejax.sae.resample",
    "TrainState": "saejax.sae.step",
    "abstract_state": "saejax.sae.step",
    "init_state": "saejax.sae.step",
    "make_dead_strategy": "saejax.sae.step",
    "make_train_step": "saejax.sae.step",
    "should_resample": "saejax.sae.step",
    "state_shardings": "saejax.sae.step",
}
__all__ = sorted([*_EXPORTS, "registry"])


def __getattr__(name):
    if name == "registry":
        return importlib.import_module("saejax.sae.registry")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'saejax.sae' has no attribute {name!r}")
