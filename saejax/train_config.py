"""Configs of the SAE pipeline jobs: ``launch/harvest.py`` and ``launch/train_sae.py``."""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

from saejax.config import (DistributedConfig, LoaderConfig, MeshConfig, check, check_choice,
                           check_nonnegative, check_positive)
from saejax.data.activation_store import DTYPES
from saejax.sae.config import SAEConfig

Source = Literal["onthefly", "store"]


@dataclasses.dataclass(frozen=True)
class HarvestConfig:
    """``launch/harvest.py``: LM activations at a site -> an activation store.

    Attributes:
      lm_dir: LM training workdir (its checkpoint names the token store it trained on).
      site: activation site, e.g. "mlp.post" (layer 0) or "blocks.0.resid.mid".
      out_dir: activation store directory.
      split / start_context / num_contexts: which contexts of the token store to run
        (num_contexts 0 = the rest of the split).
      lm_batch_size: contexts per jitted LM call (global).
      sae_batch_size: the SAE batch the store will feed; chunk rows are a multiple of it.
      dtype: "float32" or "bfloat16".
      chunk_mb: target chunk size.
    """

    lm_dir: str = "runs/lm/paper"
    site: str = "mlp.post"
    out_dir: str = "runs/acts/paper"
    split: str = "train"
    start_context: int = 0
    num_contexts: int = 0
    lm_batch_size: int = 64
    sae_batch_size: int = 4096
    dtype: str = "float32"
    chunk_mb: float = 16.0
    seed: int = 0
    overwrite: bool = False
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self):
        check("lm_dir", self.lm_dir, bool(self.lm_dir), "must name an LM training workdir")
        check("out_dir", self.out_dir, bool(self.out_dir), "must be a non-empty path")
        check_choice("split", self.split, ("train", "val"))
        check_nonnegative("start_context", self.start_context)
        check_nonnegative("num_contexts", self.num_contexts)
        check_positive("lm_batch_size", self.lm_batch_size)
        check_positive("sae_batch_size", self.sae_batch_size)
        check_choice("dtype", self.dtype, list(DTYPES))
        check_positive("chunk_mb", self.chunk_mb)


@dataclasses.dataclass(frozen=True)
class SAETrainConfig:
    """``launch/train_sae.py``: train a dictionary on LM activations.

    Attributes:
      sae: the autoencoder and its optimiser (``sae.d_in`` must equal the site's width).
      lm_dir: LM training workdir; its tokens feed the on-the-fly source and evaluation.
      site: activation site the dictionary reads and, at evaluation, replaces.
      source: "onthefly" (LM -> device shuffle buffer) or "store" (``activation_store``).
      activation_store: harvested store for ``source="store"``.
      workdir: checkpoints, metrics.jsonl, TensorBoard events, eval.json, density PNG.
        Re-running with the same workdir resumes exactly.
      batch_size: activation rows per SAE step (global).
      num_steps: SAE steps.
      lm_batch_size: contexts per LM call (on the fly).
      buffer_rows: device shuffle-buffer capacity in rows (on the fly).
      normalize: scale inputs so that E||x|| = sqrt(d_in) (constant saved with the run).
      norm_sample_contexts: contexts used to estimate the scale, the activation mean and
        the geometric-median sample (on the fly; a store carries its own statistics).
      loader: store reader settings (seed, window_chunks, prefetch; batch_size is ignored)
        and the on-the-fly token loader's seed.
      eval_every / eval_contexts / eval_batch_contexts: evaluation cadence and size on the
        validation split (loss recovered, KL, explained variance, L0, dead/dense).
      log_every / checkpoint_every / keep_checkpoints / async_checkpoints: host cadence.
    """

    sae: SAEConfig = SAEConfig()
    lm_dir: str = "runs/lm/paper"
    site: str = "mlp.post"
    source: Source = "onthefly"
    activation_store: str | None = None
    workdir: str = "runs/sae/a1"
    batch_size: int = 4096
    num_steps: int = 10_000
    lm_batch_size: int = 64
    buffer_rows: int = 262_144
    normalize: bool = True
    norm_sample_contexts: int = 256
    loader: LoaderConfig = LoaderConfig()
    eval_every: int = 1000
    eval_contexts: int = 256
    eval_batch_contexts: int = 32
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    progress_bar: bool = True
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self):
        check_choice("source", self.source, get_args(Source))
        if self.source == "store":
            check("activation_store", self.activation_store, bool(self.activation_store),
                  "must name a harvested store when source='store'")
        for name in ("batch_size", "num_steps", "lm_batch_size", "buffer_rows",
                     "norm_sample_contexts", "eval_every", "eval_contexts", "eval_batch_contexts",
                     "log_every", "checkpoint_every", "keep_checkpoints"):
            check_positive(name, getattr(self, name))
        check("eval_contexts", self.eval_contexts, self.eval_contexts % self.eval_batch_contexts == 0,
              f"must be a multiple of eval_batch_contexts ({self.eval_batch_contexts})")
        check("buffer_rows", self.buffer_rows, self.buffer_rows % (2 * self.batch_size) == 0,
              f"must be a multiple of 2 x batch_size ({2 * self.batch_size})")
