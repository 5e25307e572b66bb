"""Bring your own model: a local Hugging Face checkpoint folder -> saejax's LM.

:func:`load_hf` dispatches on ``config.json``'s ``model_type``: GPT-2 here (onto
:class:`Transformer`), GPT-NeoX / Pythia and Llama in :mod:`saejax.lm.hf_families` (onto
:class:`saejax.lm.families.RotaryTransformer`).

Reads ``config.json`` and ``model.safetensors`` (or a sharded ``model.safetensors.index.json``)
from a directory; nothing is downloaded and neither torch nor transformers is needed (the
``safetensors`` package's NumPy API reads the tensors). GPT-2 specifics: Conv1D weights are stored
[in, out] (already our x @ W layout, i.e. transposed relative to nn.Linear), the fused c_attn
columns are (q | k | v) with heads contiguous, the unembedding is tied to wte unless
``tie_word_embeddings`` is false (then ``lm_head.weight``, as :mod:`saejax.lm.hf_export`
writes an untied model), LayerNorm eps from the config (1e-5), activation ``gelu_new``
(tanh GELU).

Legend: D d_model, M d_mlp, V vocab, H heads, K head width, N positions.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy for safetensors)
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from saejax.lm.config import ModelConfig
from saejax.lm.model import Transformer, abstract_model

_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu",
                "relu": "relu"}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as NumPy arrays (bf16 as ml_dtypes.bfloat16)."""
    try:
        return safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, TypeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes NumPy arrays (contiguous copies) to one ``.safetensors`` file."""
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
                                metadata=metadata)


def _read_weights(directory: str) -> dict[str, np.ndarray]:
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return read_safetensors(single)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for name in files:
            out.update(read_safetensors(os.path.join(directory, name)))
        return out
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in "
                            f"{directory!r} (save the model with safe_serialization=True)")


SUPPORTED_MODEL_TYPES = ("gpt2", "gpt_neox", "llama")


def read_hf_config(directory: str) -> dict:
    """``directory/config.json`` as a dict, with one-line errors for what is missing."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a directory (expected a Hugging Face "
                                f"save_pretrained folder)")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {directory!r} (expected a Hugging Face "
                                f"save_pretrained folder)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_hf(directory: str, *, compute_dtype: str = "float32"):
    """Loads a local HF checkpoint folder by its ``model_type``.

    "gpt2" gives a :class:`Transformer` (:func:`load_gpt2`); "gpt_neox" (Pythia) and "llama"
    give a :class:`saejax.lm.families.RotaryTransformer` (:mod:`saejax.lm.hf_families`).
    Both take the same forward call, sites and interventions.

    Args:
      directory: holds ``config.json`` and ``model.safetensors`` (or a sharded index).
      compute_dtype: matmul dtype of the resulting model (parameters are float32).
    """
    hf = read_hf_config(directory)
    kind = hf.get("model_type")
    if kind == "gpt2":
        return load_gpt2(directory, compute_dtype=compute_dtype)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{directory}: unsupported model_type {kind!r} in config.json; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    from saejax.config import replace
    from saejax.lm import hf_families
    from saejax.lm.families import abstract_family_model

    try:
        cfg = hf_families.CONFIGS[kind](hf)
    except KeyError as e:
        raise ValueError(f"{directory}/config.json: missing field {e.args[0]!r}") from None
    if compute_dtype != cfg.compute_dtype:
        cfg = replace(cfg, compute_dtype=compute_dtype)
    values = hf_families.VALUES[kind](cfg, _read_weights(directory), directory)
    graphdef, abstract = nnx.split(abstract_family_model(cfg), nnx.Param)
    _check_shapes(nnx.to_pure_dict(abstract), values)
    nnx.replace_by_pure_dict(abstract, jax.tree.map(jnp.asarray, values))
    return nnx.merge(graphdef, abstract)


def gpt2_model_config(hf: dict) -> ModelConfig:
    """Our ModelConfig for a GPT-2 ``config.json`` dict; rejects variants we do not implement."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"only GPT-2-architecture checkpoints are supported, got model_type "
                         f"{hf.get('model_type')!r}")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation_function {act!r}; known: {sorted(_ACTIVATIONS)}")
    for flag, ok in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                     ("scale_attn_weights", True)):
        if hf.get(flag, ok) != ok:
            raise ValueError(f"unsupported GPT-2 option {flag}={hf[flag]!r}")
    d = hf["n_embd"]
    return ModelConfig(vocab_size=hf["vocab_size"], max_len=hf["n_positions"], d_model=d,
                       n_heads=hf["n_head"], d_mlp=hf.get("n_inner") or 4 * d,
                       n_layers=hf["n_layer"], activation=_ACTIVATIONS[act],
                       layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def load_gpt2(directory: str, *, compute_dtype: str = "float32") -> Transformer:
    """Loads a local GPT-2-architecture HF checkpoint directory into a :class:`Transformer`.

    Args:
      directory: holds ``config.json`` and ``model.safetensors`` (``save_pretrained``).
      compute_dtype: matmul dtype of the resulting model (parameters are float32).

    Returns:
      The model; its forward matches ``GPT2LMHeadModel`` (logits and MLP activations).
    """
    cfg = gpt2_model_config(read_hf_config(directory))
    if compute_dtype != cfg.compute_dtype:
        from saejax.config import replace

        cfg = replace(cfg, compute_dtype=compute_dtype)
    w = _read_weights(directory)
    prefix = "transformer." if "transformer.wte.weight" in w else ""

    def get(name: str) -> np.ndarray:
        key = prefix + name
        if key not in w:
            raise KeyError(f"{directory}: missing tensor {key!r}")
        return np.asarray(w[key], np.float32)

    D, H, K = cfg.d_model, cfg.n_heads, cfg.head_dim
    model = abstract_model(cfg)
    graphdef, abstract = nnx.split(model, nnx.Param)
    values = {"wte": get("wte.weight"), "wpe": get("wpe.weight"),
              "ln_f": {"scale": get("ln_f.weight"), "bias": get("ln_f.bias")}, "blocks": {}}
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        values["blocks"][i] = {
            "ln1": {"scale": get(h + "ln_1.weight"), "bias": get(h + "ln_1.bias")},
            "ln2": {"scale": get(h + "ln_2.weight"), "bias": get(h + "ln_2.bias")},
            "attn": {"qkv_w": get(h + "attn.c_attn.weight").reshape(D, 3, H, K),
                     "qkv_b": get(h + "attn.c_attn.bias").reshape(3, H, K),
                     "o_w": get(h + "attn.c_proj.weight").reshape(H, K, D),
                     "o_b": get(h + "attn.c_proj.bias")},
            "mlp": {"w_in": get(h + "mlp.c_fc.weight"), "b_in": get(h + "mlp.c_fc.bias"),
                    "w_out": get(h + "mlp.c_proj.weight"), "b_out": get(h + "mlp.c_proj.bias")},
        }
    if cfg.tie_embeddings:
        if "lm_head.weight" in w and not np.array_equal(w["lm_head.weight"],
                                                        w[prefix + "wte.weight"]):
            raise ValueError(f"{directory}: lm_head.weight differs from wte.weight but "
                             f"config.json says tie_word_embeddings=true")
    else:
        if "lm_head.weight" not in w:
            raise KeyError(f"{directory}: missing tensor 'lm_head.weight' "
                           f"(tie_word_embeddings=false)")
        values["w_u"] = np.asarray(w["lm_head.weight"], np.float32).T
    expected = nnx.to_pure_dict(abstract)
    _check_shapes(expected, values)
    nnx.replace_by_pure_dict(abstract, jax.tree.map(jnp.asarray, values))
    return nnx.merge(graphdef, abstract)


def _check_shapes(expected, values, path: str = "") -> None:
    if isinstance(expected, dict):
        for k in expected:
            _check_shapes(expected[k], values[k], f"{path}.{k}" if path else str(k))
        return
    if tuple(expected.shape) != tuple(values.shape):
        raise ValueError(f"parameter {path}: checkpoint shape {values.shape} != model shape "
                         f"{expected.shape}")

