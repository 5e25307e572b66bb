"""saejax's own LM -> a Hugging Face GPT-2 folder (``config.json`` + ``model.safetensors``).

    from saejax.lm.hf_export import export_gpt2
    export_gpt2("runs/lm/paper", "runs/lm/paper_hf")   # or a Transformer / (graphdef, params)
    # transformers.GPT2LMHeadModel.from_pretrained("runs/lm/paper_hf") gives the same logits

The layouts agree except for transposes and reshapes: GPT-2's Conv1D weights are [in, out]
like ours, ``c_attn`` holds (q | k | v) with heads contiguous, attention is scaled by
1/sqrt(K) and causal, positions are learned (``n_positions`` = max_len), LayerNorm eps comes
from the config, the activation maps relu/gelu/gelu_new onto ``activation_function``. An
untied unembedding (the paper model's default) is written as ``lm_head.weight`` with
``tie_word_embeddings=false``. ``vocab_size`` is the model's (e.g. 257 for the byte
tokenizer); bos/eos are the token store's end-of-text id, and a store with a Hugging Face
tokenizer (BPE or a user's tokenizer.json) also gives ``tokenizer.json`` +
``tokenizer_config.json``, so ``AutoTokenizer.from_pretrained`` encodes as saejax does (the
byte tokenizer has no HF equivalent and is not written). Only the exact GPT-2 layout
exports: a model with ``d_head * n_heads != d_model`` is refused (GPT-2 has no separate head
width).

Legend: D d_model, M d_mlp, V vocab, H heads, K head width.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np
from flax import nnx

from saejax.lm.config import ModelConfig
from saejax.lm.hf_import import write_safetensors
from saejax.lm.model import Transformer, lm_module

_ACTIVATION_NAMES = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new"}


def gpt2_config(cfg: ModelConfig, eot_id: int | None = None) -> dict[str, Any]:
    """The GPT-2 ``config.json`` dict of a model config (refuses what GPT-2 cannot express)."""
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        raise ValueError(f"GPT-2 needs d_head * n_heads == d_model, got d_head={cfg.head_dim}, "
                         f"n_heads={cfg.n_heads}, d_model={cfg.d_model}")
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size, "n_positions": cfg.max_len, "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_mlp,
        "activation_function": _ACTIVATION_NAMES[cfg.activation],
        "layer_norm_epsilon": cfg.layer_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "use_cache": True,
        "torch_dtype": "float32",
    }


def gpt2_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """The GPT2LMHeadModel state dict (float32 NumPy) of a :class:`Transformer`."""
    cfg = model.cfg
    D, H, K = cfg.d_model, cfg.n_heads, cfg.head_dim

    def a(x) -> np.ndarray:
        return np.asarray(x[...], np.float32)

    t = {"transformer.wte.weight": a(model.wte), "transformer.wpe.weight": a(model.wpe),
         "transformer.ln_f.weight": a(model.ln_f.scale),
         "transformer.ln_f.bias": a(model.ln_f.bias)}
    for i, b in enumerate(model.blocks):
        h = f"transformer.h.{i}."
        t.update({
            h + "ln_1.weight": a(b.ln1.scale), h + "ln_1.bias": a(b.ln1.bias),
            h + "ln_2.weight": a(b.ln2.scale), h + "ln_2.bias": a(b.ln2.bias),
            h + "attn.c_attn.weight": a(b.attn.qkv_w).reshape(D, 3 * H * K),
            h + "attn.c_attn.bias": a(b.attn.qkv_b).reshape(3 * H * K),
            h + "attn.c_proj.weight": a(b.attn.o_w).reshape(H * K, D),
            h + "attn.c_proj.bias": a(b.attn.o_b),
            h + "mlp.c_fc.weight": a(b.mlp.w_in), h + "mlp.c_fc.bias": a(b.mlp.b_in),
            h + "mlp.c_proj.weight": a(b.mlp.w_out), h + "mlp.c_proj.bias": a(b.mlp.b_out),
        })
    if not cfg.tie_embeddings:
        t["lm_head.weight"] = a(model.w_u).T  # nn.Linear: [V, D]
    return t


def export_gpt2(lm: str | Transformer | tuple, out_dir: str, *, step: int | None = None,
                store_dir: str | None = None, overwrite: bool = False) -> str:
    """Writes ``lm`` as a Hugging Face GPT-2 folder loadable by ``GPT2LMHeadModel``.

    Args:
      lm: an LM training workdir (latest checkpoint, or ``step``), a :class:`Transformer`,
        or its ``(graphdef, params)``.
      out_dir: the folder to write (``config.json``, ``model.safetensors``, and
        ``tokenizer.json`` when the token store has one).
      step: checkpoint step when ``lm`` is a workdir.
      store_dir: token store whose tokenizer to copy (default: the one the checkpoint names).
      overwrite: replace an existing ``model.safetensors`` in ``out_dir``.

    Returns:
      ``out_dir``.
    """
    meta: dict = {}
    if isinstance(lm, str):
        from saejax.lm.restore import load_lm

        lm, meta = load_lm(lm, step=step)
    model = lm_module(lm if isinstance(lm, nnx.Module) else tuple(lm))
    if not isinstance(model, Transformer):
        raise ValueError(f"only saejax's GPT-2-layout Transformer exports to GPT-2, got "
                         f"{type(model).__name__}")
    weights = os.path.join(out_dir, "model.safetensors")
    if os.path.exists(weights) and not overwrite:
        raise FileExistsError(f"{weights} exists; pass overwrite=True (--overwrite) to replace it")
    store_dir = store_dir or meta.get("store_dir")
    eot_id, tokenizer = None, None
    if store_dir:
        from saejax.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(store_dir)
        eot_id = tokenizer.eot_id
    config = gpt2_config(model.cfg, eot_id)
    tensors = gpt2_tensors(model)
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(weights + ".tmp", tensors, metadata={"format": "pt"})
    os.replace(weights + ".tmp", weights)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer is not None and getattr(tokenizer, "eot_token", None):  # HF tokenizers only
        _write_tokenizer(tokenizer, store_dir, out_dir)
    return out_dir


def _write_tokenizer(tokenizer, store_dir: str, out_dir: str) -> None:
    """The store's ``tokenizer.json`` plus a ``tokenizer_config.json`` naming its end-of-text
    token, so ``transformers.AutoTokenizer.from_pretrained(out_dir)`` encodes as we do."""
    from saejax.data.tokenizer import TOKENIZER_FILE

    shutil.copyfile(os.path.join(store_dir, TOKENIZER_FILE), os.path.join(out_dir, TOKENIZER_FILE))
    eot = tokenizer.eot_token
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot,
                   "eos_token": eot, "unk_token": eot, "model_max_length": 10**9}, f, indent=2)
