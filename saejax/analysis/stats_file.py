"""The feature-statistics file (``features.json``, ``neurons.json``): strict JSON, written
atomically, with a format number (:func:`saejax.analysis.features.compute_feature_stats`
makes the dict; ``features.save_stats`` / ``features.load_stats`` are these)."""

from __future__ import annotations

import json
import os
from typing import Any

STATS_FORMAT = 2


def save_stats(stats: dict[str, Any], path: str) -> None:
    """Writes ``stats`` as strict JSON (no NaN) atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f, allow_nan=False, separators=(",", ":"))
    os.replace(tmp, path)


def load_stats(path: str) -> dict[str, Any]:
    with open(path) as f:
        stats = json.load(f)
    if stats.get("format") != STATS_FORMAT:
        raise ValueError(f"{path!r}: unsupported feature-stats format {stats.get('format')!r}")
    return stats
