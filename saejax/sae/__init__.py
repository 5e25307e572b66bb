"""Sparse autoencoders: architectures, loss, resampling and the pure, sharded train step.

Knows nothing about the LM: it consumes [B, D] activation batches. Public API:

- :class:`SAEConfig` (``config``), the architecture / dead-strategy registry (``registry``);
- ``step``: :class:`TrainState`, :func:`init_state`, :func:`make_train_step`,
  :func:`check_finite`, :func:`should_resample`, :func:`abstract_state`, :func:`state_shardings`;
- ``resample``: :func:`make_resample` (the paper's neuron resampling);
- ``synthetic`` / ``metrics``: ground-truth data and dictionary-recovery metrics;
- ``memory``: :func:`estimate_memory`.
"""

from saejax.sae import registry
from saejax.sae.config import SAEConfig
from saejax.sae.memory import estimate_memory
from saejax.sae.model import SAEParams
from saejax.sae.resample import make_resample
from saejax.sae.step import (
    NonFiniteError,
    TrainState,
    abstract_state,
    check_finite,
    init_state,
    make_train_step,
    should_resample,
    state_shardings,
)


def make_dead_strategy(config: SAEConfig, mesh):
    """The configured dead-feature strategy: ``fn(state, sample_inputs) -> (state, info)``."""
    return registry.get_dead_strategy(config.dead_strategy)(config, mesh)


__all__ = ["NonFiniteError", "SAEConfig", "SAEParams", "TrainState", "abstract_state", "check_finite",
           "estimate_memory", "init_state", "make_dead_strategy", "make_resample", "make_train_step",
           "registry", "should_resample", "state_shardings"]
