"""Local Hugging Face GPT-NeoX (Pythia) and Llama checkpoints -> :class:`RotaryTransformer`.

Reads ``config.json`` and the safetensors weights of a ``save_pretrained`` directory (no
download, no torch). The mapping, per layer ``i``:

* GPT-NeoX (``gpt_neox.`` prefix): ``layers.i.input_layernorm`` / ``post_attention_layernorm``
  (LayerNorm, separate for attention and MLP), ``attention.query_key_value`` ([3 H K, D]
  whose rows are per head (q | k | v): viewed [H, 3, K, D]), ``attention.dense``,
  ``mlp.dense_h_to_4h`` / ``dense_4h_to_h``, ``final_layer_norm``, ``embed_in``, and the
  unembedding ``embed_out`` (untied in Pythia). Rotary on ``int(K * rotary_pct)`` channels
  (``rope_parameters.partial_rotary_factor`` in newer configs) with base ``rotary_emb_base``
  / ``rope_theta``; ``use_parallel_residual`` (default true); biases unless
  ``attention_bias`` is false.
* Llama (``model.`` prefix): ``input_layernorm`` / ``post_attention_layernorm`` / ``norm``
  (RMSNorm), ``self_attn.{q,k,v,o}_proj`` (``num_key_value_heads`` for grouped-query
  attention, ``head_dim``), ``mlp.{gate,up,down}_proj`` (SwiGLU with ``hidden_act``),
  ``embed_tokens``, ``lm_head`` unless ``tie_word_embeddings``; rotary on the whole head
  with ``rope_theta``.

nn.Linear weights are [out, in]; ours are x @ W, so every projection is transposed.
Rotary scaling (``rope_parameters`` / legacy ``rope_scaling``): "default", "linear" and
"llama3" are implemented; others (dynamic, yarn, longrope, ...) are refused in one line.
"""

from __future__ import annotations

import numpy as np

from saejax.lm.families import FAMILY_ACTIVATIONS, FamilyConfig

_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
                   "gelu_fast": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}
assert set(_HF_ACTIVATIONS.values()) <= set(FAMILY_ACTIVATIONS)


_ROPE_TYPES = ("default", "linear", "llama3")


def _rope(hf: dict, theta_key: str, default_theta: float) -> dict:
    """FamilyConfig rotary fields from ``rope_parameters`` or the legacy keys, plus
    ``"partial"`` (the partial rotary factor or None)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ValueError(f"unsupported rotary scaling rope_type={kind!r} (implemented: "
                         f"{', '.join(_ROPE_TYPES)})")
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get(theta_key, default_theta)))
    out = {"rope_theta": float(theta), "rope_type": kind,
           "partial": params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))}
    if kind != "default":
        out["rope_factor"] = float(params["factor"])
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_len=int(params.get("original_max_position_embeddings")
                                             or hf["max_position_embeddings"]))
    return out


def _activation(hf: dict, default: str) -> str:
    act = hf.get("hidden_act", default)
    if act not in _HF_ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {act!r}; known: {sorted(_HF_ACTIVATIONS)}")
    return _HF_ACTIVATIONS[act]


def neox_config(hf: dict) -> FamilyConfig:
    """Our config for a GPT-NeoX ``config.json`` dict."""
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    if D % H:
        raise ValueError(f"hidden_size {D} is not a multiple of num_attention_heads {H}")
    rope = _rope(hf, "rotary_emb_base", 10000.0)
    factor = rope.pop("partial")
    pct = factor if factor is not None else hf.get("rotary_pct", 0.25)
    K = D // H
    rotary_dim = int(K * pct)
    if rotary_dim % 2:
        raise ValueError(f"rotary channels int(head_size {K} * rotary_pct {pct}) = {rotary_dim} "
                         f"must be even")
    bias = bool(hf.get("attention_bias", True))
    return FamilyConfig(
        family="gpt_neox", vocab_size=hf["vocab_size"], max_len=hf["max_position_embeddings"],
        d_model=D, n_heads=H, n_kv_heads=H, d_head=K, d_mlp=hf["intermediate_size"],
        n_layers=hf["num_hidden_layers"], norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)), activation=_activation(hf, "gelu"),
        gated_mlp=False, rotary_dim=rotary_dim, **rope,
        parallel_residual=bool(hf.get("use_parallel_residual", True)), attn_bias=bias,
        mlp_bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def llama_config(hf: dict) -> FamilyConfig:
    """Our config for a Llama ``config.json`` dict."""
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    G = hf.get("num_key_value_heads") or H
    K = hf.get("head_dim") or D // H
    rope = _rope(hf, "rope_theta", 10000.0)
    del rope["partial"]  # Llama's attention rotates the whole head
    return FamilyConfig(
        family="llama", vocab_size=hf["vocab_size"], max_len=hf["max_position_embeddings"],
        d_model=D, n_heads=H, n_kv_heads=G, d_head=K, d_mlp=hf["intermediate_size"],
        n_layers=hf["num_hidden_layers"], norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), activation=_activation(hf, "silu"),
        gated_mlp=True, rotary_dim=K, **rope, parallel_residual=False,
        attn_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


CONFIGS = {"gpt_neox": neox_config, "llama": llama_config}


def _getter(w: dict[str, np.ndarray], directory: str, prefix: str):
    def get(name: str, shape: tuple[int, ...], root: bool = False) -> np.ndarray:
        key = name if root else prefix + name
        if key not in w:
            raise KeyError(f"{directory}: missing tensor {key!r}")
        if tuple(w[key].shape) != shape:
            raise ValueError(f"{directory}: tensor {key!r} has shape {tuple(w[key].shape)}, "
                             f"config.json implies {shape}")
        return np.asarray(w[key], np.float32)
    return get


def _unembedding(cfg: FamilyConfig, w: dict, get, wte_key: str, head_key: str,
                 directory: str) -> dict:
    if cfg.tie_embeddings:
        if head_key in w and not np.array_equal(w[head_key], w[wte_key]):
            raise ValueError(f"{directory}: {head_key} differs from {wte_key} but config.json "
                             f"says tie_word_embeddings=true")
        return {}
    return {"w_u": get(head_key, (cfg.vocab_size, cfg.d_model), root=True).T}


def neox_values(cfg: FamilyConfig, w: dict[str, np.ndarray], directory: str) -> dict:
    """Our parameter pure dict from GPT-NeoX tensors."""
    prefix = "gpt_neox." if "gpt_neox.embed_in.weight" in w else ""
    get = _getter(w, directory, prefix)
    D, H, K, M, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.vocab_size

    def norm(name):
        return {"scale": get(name + ".weight", (D,)), "bias": get(name + ".bias", (D,))}

    values = {"wte": get("embed_in.weight", (V, D)), "ln_f": norm("final_layer_norm"),
              "blocks": {}}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        qkv = get(p + "attention.query_key_value.weight", (3 * H * K, D)).reshape(H, 3, K, D)
        attn = {"qkv_w": qkv.transpose(3, 1, 0, 2).reshape(D, 3 * H, K),  # [D, (q,k,v) x H, K]
                "o_w": get(p + "attention.dense.weight", (D, H * K)).T.reshape(H, K, D)}
        if cfg.attn_bias:
            attn["qkv_b"] = get(p + "attention.query_key_value.bias", (3 * H * K,)) \
                .reshape(H, 3, K).transpose(1, 0, 2).reshape(3 * H, K)
            attn["o_b"] = get(p + "attention.dense.bias", (D,))
        values["blocks"][i] = {
            "ln1": norm(p + "input_layernorm"), "ln2": norm(p + "post_attention_layernorm"),
            "attn": attn,
            "mlp": {"w_in": get(p + "mlp.dense_h_to_4h.weight", (M, D)).T,
                    "b_in": get(p + "mlp.dense_h_to_4h.bias", (M,)),
                    "w_out": get(p + "mlp.dense_4h_to_h.weight", (D, M)).T,
                    "b_out": get(p + "mlp.dense_4h_to_h.bias", (D,))},
        }
    values.update(_unembedding(cfg, w, get, prefix + "embed_in.weight", "embed_out.weight",
                               directory))
    return values


def llama_values(cfg: FamilyConfig, w: dict[str, np.ndarray], directory: str) -> dict:
    """Our parameter pure dict from Llama tensors."""
    prefix = "model." if "model.embed_tokens.weight" in w else ""
    get = _getter(w, directory, prefix)
    D, H, G, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    M, V = cfg.d_mlp, cfg.vocab_size
    heads = {"q": H, "k": G, "v": G}
    values = {"wte": get("embed_tokens.weight", (V, D)), "ln_f": {"scale": get("norm.weight", (D,))},
              "blocks": {}}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        a = p + "self_attn."
        qkv = [get(a + f"{n}_proj.weight", (heads[n] * K, D)).T.reshape(D, heads[n], K)
               for n in "qkv"]
        attn = {"qkv_w": np.concatenate(qkv, axis=1),
                "o_w": get(a + "o_proj.weight", (D, H * K)).T.reshape(H, K, D)}
        if cfg.attn_bias:
            attn["qkv_b"] = np.concatenate([get(a + f"{n}_proj.bias", (heads[n] * K,))
                                            .reshape(heads[n], K) for n in "qkv"])
            attn["o_b"] = get(a + "o_proj.bias", (D,))
        m = p + "mlp."
        mlp = {"w_in": np.stack([get(m + "gate_proj.weight", (M, D)).T,
                                 get(m + "up_proj.weight", (M, D)).T], axis=1),
               "w_out": get(m + "down_proj.weight", (D, M)).T}
        if cfg.mlp_bias:
            mlp["b_in"] = np.stack([get(m + "gate_proj.bias", (M,)), get(m + "up_proj.bias", (M,))])
            mlp["b_out"] = get(m + "down_proj.bias", (D,))
        values["blocks"][i] = {"ln1": {"scale": get(p + "input_layernorm.weight", (D,))},
                               "ln2": {"scale": get(p + "post_attention_layernorm.weight", (D,))},
                               "attn": attn, "mlp": mlp}
    values.update(_unembedding(cfg, w, get, prefix + "embed_tokens.weight", "lm_head.weight",
                               directory))
    return values


VALUES = {"gpt_neox": neox_values, "llama": llama_values}
