"""The one definition of a dead feature, shared by the step, AuxK and resampling."""

from __future__ import annotations

from jaxtyping import Array, Bool, Int


def dead_mask(stale: Int[Array, " F"], config) -> Bool[Array, " F"]:
    """Dead = silent for at least ``config.dead_window`` steps.

    ``stale`` is ``step - last_fired`` per feature (``TrainState.last_fired``). The step's
    ``frac_dead``, AuxK's candidates and resampling's targets all call this.
    """
    return stale >= config.dead_window
