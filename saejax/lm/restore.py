"""Loading a trained LM for analysis: our checkpoints or a local Hugging Face directory.

    model, meta = load_lm("runs/lm/paper")            # latest checkpoint of a training run
    out = model(tokens, sites=("mlp.post",), logits=False)

``load_lm`` restores only what analysis needs (parameters, model config, tokenizer location),
replicated on ``mesh`` (default: all devices, data-parallel), whatever mesh trained it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from flax import nnx

from saejax import parallel
from saejax.checkpoint import Checkpointer, abstract_with_shardings
from saejax.config import MeshConfig, from_config
from saejax.lm.config import ModelConfig, OptimConfig
from saejax.lm.model import Transformer, abstract_model, param_shardings
from saejax.lm.train import TrainState, make_optimizer


def checkpoint_dir(path: str) -> str:
    """``path`` itself if it holds step directories, else ``path/checkpoints``."""
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


def load_lm(path: str, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None
            ) -> tuple[Transformer, dict[str, Any]]:
    """Restores a model for analysis.

    Args:
      path: a training workdir (or its ``checkpoints`` dir), or a local HF checkpoint
        directory (one with ``config.json``: GPT-2, GPT-NeoX / Pythia or Llama; see
        :func:`saejax.lm.hf_import.load_hf`).
      step: checkpoint step (default latest); ignored for HF directories.
      mesh: target mesh for the parameters (default ``make_mesh(MeshConfig())``).

    Returns:
      (model, metadata): metadata holds "model" (ModelConfig dict), "train", "unigram",
      "store_dir" (where the tokenizer lives) and "step"; for HF, {"hf_config_dir": path}.
    """
    if os.path.isfile(os.path.join(path, "config.json")):
        from saejax.lm.hf_import import load_hf

        return load_hf(path), {"hf_config_dir": os.path.abspath(path)}
    mesh = mesh or parallel.make_mesh(MeshConfig())
    try:
        ckpt = Checkpointer(checkpoint_dir(path), async_save=False, read_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no LM checkpoint in {path!r}: give an LM training workdir "
                                f"(launch/train_lm.py's --config.workdir)") from None
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no LM checkpoint in {path!r}: give an LM training "
                                    f"workdir (launch/train_lm.py's --config.workdir)")
        meta = ckpt.restore_metadata(step)  # without a step: the newest that reads
        model_cfg = from_config(ModelConfig, meta["model"])
        optim_cfg = from_config(OptimConfig, meta["train"]["optim"])
        graphdef, params = nnx.split(abstract_model(model_cfg), nnx.Param)
        optimizer = make_optimizer(optim_cfg, meta["train"]["num_steps"])
        p_shard = param_shardings(params, mesh)
        rep = parallel.replicated(mesh)
        abstract = TrainState(step=jax.ShapeDtypeStruct((), "int32"), params=params,
                              opt_state=jax.eval_shape(optimizer.init, params))
        shardings = jax.tree.map(lambda _: rep, abstract)
        shardings = shardings.replace(params=p_shard)
        state, _, meta = ckpt.restore(abstract_with_shardings(abstract, shardings), step)
        step = ckpt.restored_step
    finally:
        ckpt.close()
    meta["step"] = step
    return nnx.merge(graphdef, state.params), meta
