"""Configs of the transformer language model and its training run.

Built from ConfigDicts at the edge with :func:`saejax.config.from_config`; every field is
validated in ``__post_init__`` with the shared ``check_*`` helpers.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

from saejax.config import (DistributedConfig, MeshConfig, check, check_choice, check_fraction,
                           check_nonnegative, check_positive)
from saejax.data.loader import LoaderConfig

Activation = Literal["relu", "gelu", "gelu_new"]
DType = Literal["float32", "bfloat16"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the transformer. Defaults are the paper's subject model (1 layer, 128/512 ReLU).

    Attributes:
      vocab_size: number of token ids; 0 means "take it from the token store" (training only).
      max_len: number of learned position embeddings (longest context).
      d_model: residual stream width D.
      n_heads: attention heads H; ``d_model`` must divide by it unless ``d_head`` is set.
      d_head: per-head width K; default ``d_model // n_heads``.
      d_mlp: MLP neurons M (the SAE's input width at ``mlp.post``).
      n_layers: transformer blocks.
      activation: MLP nonlinearity: "relu" (paper), "gelu" (erf) or "gelu_new" (tanh, GPT-2).
      layer_norm_eps: LayerNorm epsilon (GPT-2: 1e-5).
      tie_embeddings: unembedding = token embedding transposed (GPT-2); else a separate W_U.
      compute_dtype: matmul dtype; parameters stay float32, LayerNorm/softmax/loss in float32.
      init_std: normal init scale of weights (output projections are scaled by 1/sqrt(2L)).
    """

    vocab_size: int = 0
    max_len: int = 128
    d_model: int = 128
    n_heads: int = 4
    d_head: int | None = None
    d_mlp: int = 512
    n_layers: int = 1
    activation: Activation = "relu"
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    compute_dtype: DType = "float32"
    init_std: float = 0.02

    def __post_init__(self):
        check_nonnegative("model.vocab_size", self.vocab_size)
        for name in ("max_len", "d_model", "n_heads", "d_mlp", "n_layers"):
            v = getattr(self, name)
            check(f"model.{name}", v, isinstance(v, int) and v > 0, "must be an integer > 0")
        if self.d_head is None:
            check("model.n_heads", self.n_heads, self.d_model % self.n_heads == 0,
                  f"must divide model.d_model ({self.d_model}) unless model.d_head is set")
        else:
            check_positive("model.d_head", self.d_head)
        check_choice("model.activation", self.activation, get_args(Activation))
        check_choice("model.compute_dtype", self.compute_dtype, get_args(DType))
        check_positive("model.layer_norm_eps", self.layer_norm_eps)
        check_positive("model.init_std", self.init_std)

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio``; global-norm clip."""

    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self):
        check_positive("optim.lr", self.lr)
        check_nonnegative("optim.warmup_steps", self.warmup_steps)
        check_fraction("optim.min_lr_ratio", self.min_lr_ratio, closed=True)
        check_fraction("optim.b1", self.b1)
        check_fraction("optim.b2", self.b2)
        check_positive("optim.eps", self.eps)
        check_nonnegative("optim.weight_decay", self.weight_decay)
        check_nonnegative("optim.grad_clip", self.grad_clip)  # 0 disables clipping


@dataclasses.dataclass(frozen=True)
class LMTrainConfig:
    """``launch/train_lm.py``: train the LM on a token store.

    Attributes:
      store_dir: token store built by ``launch/build_corpus.py``.
      workdir: checkpoints (``workdir/checkpoints``), TensorBoard events and metrics.jsonl.
        Re-running with the same workdir resumes from the latest checkpoint.
      num_steps: total optimizer steps (the LR schedule spans them).
      eval_every / eval_batches: validation loss every N steps over this many val batches
        (0 batches = the whole val split).
      checkpoint_every / keep_checkpoints: save cadence and how many to keep.
      log_every: host metrics / progress cadence in steps.
    """

    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    loader: LoaderConfig = LoaderConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    store_dir: str = "runs/corpus/stdlib"
    workdir: str = "runs/lm/paper"
    num_steps: int = 1000
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    progress_bar: bool = True

    def __post_init__(self):
        check("store_dir", self.store_dir, bool(self.store_dir), "must be a non-empty path")
        check("workdir", self.workdir, bool(self.workdir), "must be a non-empty path")
        check_positive("num_steps", self.num_steps)
        check_nonnegative("seed", self.seed)
        check_positive("log_every", self.log_every)
        check_positive("eval_every", self.eval_every)
        check_nonnegative("eval_batches", self.eval_batches)
        check_positive("checkpoint_every", self.checkpoint_every)
        check("keep_checkpoints", self.keep_checkpoints,
              isinstance(self.keep_checkpoints, int) and self.keep_checkpoints >= 2,
              "must be >= 2 (the previous checkpoint is the fallback when the newest cannot "
              "be read back)")
        check("optim.warmup_steps", self.optim.warmup_steps,
              self.optim.warmup_steps < self.num_steps,
              f"must be < num_steps ({self.num_steps})")
