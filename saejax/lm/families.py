"""Rotary-position transformers (GPT-NeoX / Pythia and Llama layouts) behind the same forward call.

:class:`RotaryTransformer` is a sibling of :class:`saejax.lm.model.Transformer` for imported
checkpoints (:mod:`saejax.lm.hf_import`): the same ``__call__(tokens, sites=, interventions=,
logits=, cache=, start=)`` returning the same :class:`~saejax.lm.model.Output`, the same
named sites and interventions (:mod:`saejax.lm.sites`), early stop after the last wanted
site, a KV cache for :mod:`saejax.lm.generate`, and ``cfg.n_layers`` / ``cfg.max_len`` /
``cfg.tie_embeddings``, ``wte`` / ``w_u`` / ``ln_f`` / ``blocks[l].mlp.w_out`` where the rest
of saejax reads them. It reuses ``model.py``'s LayerNorm, site hooks and parameter helpers.

What :class:`FamilyConfig` covers:

* norm: LayerNorm with bias (NeoX) or RMSNorm, scale only (Llama), eps from the config;
* positions: rotary embeddings (rotate-half convention, as both HF implementations), on the
  first ``rotary_dim`` channels of each head (Pythia's ``rotary_pct`` < 1) with base
  ``rope_theta``, unscaled or with "linear" / "llama3" (Llama 3.1) frequency scaling; no
  learned positions;
* attention: causal, scaled by 1/sqrt(K), grouped-query (``n_kv_heads`` divides
  ``n_heads``; query head h reads key/value head ``h // (n_heads / n_kv_heads)``, HF's
  ``repeat_kv``), optional biases; one fused [D, H + 2 Hkv, K] projection;
* MLP: ``w_out(act(x w_in + b_in))`` (NeoX) or SwiGLU ``w_out(act(x w_gate) * (x w_up))``
  (Llama; ``w_in`` holds [gate, up] as [D, 2, M]);
* residual: sequential (``x + attn(ln1 x)``, then ``+ mlp(ln2 .)``) or NeoX's parallel
  ``x + attn(ln1 x) + mlp(ln2 x)``; tied or untied unembedding.

Sites (``blocks.{l}.*``) where the layouts differ from GPT-2:

* ``mlp.pre``: the pre-activation, i.e. NeoX's ``dense_h_to_4h`` output; for SwiGLU the
  *gate* projection ``x w_gate`` (an intervention here changes the gate only, not ``up``);
* ``mlp.post``: what the down projection reads: ``act(pre)``, for SwiGLU
  ``act(gate) * up`` (``d_mlp`` wide; the natural SAE input, and ``w_out`` maps it to the
  residual stream as in GPT-2);
* ``resid.mid`` = ``resid.pre + attn.out``, and ``resid.post = resid.mid + mlp.out``, in
  both residual forms. With the parallel residual the MLP reads ``ln2(resid.pre)``, so an
  intervention at ``resid.mid`` changes ``resid.post`` but not the MLP's input.

Legend: B batch, T sequence, S key positions, D d_model, M d_mlp, V vocab, H query heads,
G key/value heads, K head width, R rotary channels, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from saejax.config import check, check_choice, check_positive
from saejax.lm.model import (ACTIVATIONS, KVCache, LayerNorm, Output, _Hooks, _normal, _ones,
                             _param, _zeros, check_call, unembed)
from saejax.lm.sites import Intervention

Norm = Literal["layernorm", "rmsnorm"]
RopeType = Literal["default", "linear", "llama3"]
FamilyActivation = Literal["relu", "gelu", "gelu_new", "silu"]
DType = Literal["float32", "bfloat16"]
FAMILY_ACTIVATIONS = {**ACTIVATIONS, "silu": jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class FamilyConfig:
    """Shape of a rotary transformer (built from a HF ``config.json`` by hf_import).

    Attributes:
      family: the HF ``model_type`` it came from ("gpt_neox", "llama"); a label only.
      vocab_size / max_len / d_model / n_heads / d_mlp / n_layers: as in ``ModelConfig``
        (``max_len`` = ``max_position_embeddings``, the longest context and cache).
      n_kv_heads: key/value heads (grouped-query attention when < n_heads).
      d_head: per-head width K.
      norm: "layernorm" (scale and bias) or "rmsnorm" (scale only).
      norm_eps: the norms' epsilon.
      activation: MLP nonlinearity ("gelu" = erf, "gelu_new" = tanh, "relu", "silu").
      gated_mlp: SwiGLU: ``w_out(act(gate) * up)``.
      rotary_dim: rotary channels R per head (even, <= d_head; the rest carry no position).
      rope_theta: rotary base.
      rope_type: "default", "linear" (frequencies / rope_factor) or "llama3" (Llama 3.1:
        wavelengths above rope_original_max_len / rope_low_freq_factor divided by
        rope_factor, below rope_original_max_len / rope_high_freq_factor kept, smoothly
        interpolated between), as HF's ``rope_parameters``.
      rope_factor / rope_low_freq_factor / rope_high_freq_factor / rope_original_max_len:
        the scaling's parameters.
      parallel_residual: NeoX's ``x + attn(ln1 x) + mlp(ln2 x)``.
      attn_bias / mlp_bias: biases on the attention / MLP projections.
      tie_embeddings: unembedding = token embedding transposed.
      compute_dtype: matmul dtype; parameters, norms and softmax stay float32.
    """

    family: str = "llama"
    vocab_size: int = 256
    max_len: int = 128
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 4
    d_head: int = 16
    d_mlp: int = 256
    n_layers: int = 1
    norm: Norm = "rmsnorm"
    norm_eps: float = 1e-6
    activation: FamilyActivation = "silu"
    gated_mlp: bool = True
    rotary_dim: int = 16
    rope_theta: float = 10000.0
    rope_type: RopeType = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 0
    parallel_residual: bool = False
    attn_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    compute_dtype: DType = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "d_model", "n_heads", "n_kv_heads", "d_head",
                     "d_mlp", "n_layers"):
            v = getattr(self, name)
            check(f"model.{name}", v, isinstance(v, int) and v > 0, "must be an integer > 0")
        check("model.n_kv_heads", self.n_kv_heads, self.n_heads % self.n_kv_heads == 0,
              f"must divide model.n_heads ({self.n_heads})")
        check("model.rotary_dim", self.rotary_dim,
              isinstance(self.rotary_dim, int) and 0 <= self.rotary_dim <= self.d_head
              and self.rotary_dim % 2 == 0, f"must be an even integer in [0, d_head={self.d_head}]")
        check_choice("model.norm", self.norm, get_args(Norm))
        check_choice("model.activation", self.activation, get_args(FamilyActivation))
        check_choice("model.compute_dtype", self.compute_dtype, get_args(DType))
        check_positive("model.norm_eps", self.norm_eps)
        check_positive("model.rope_theta", self.rope_theta)
        check_choice("model.rope_type", self.rope_type, get_args(RopeType))
        check_positive("model.rope_factor", self.rope_factor)
        if self.rope_type == "llama3":
            check_positive("model.rope_original_max_len", self.rope_original_max_len)
            check("model.rope_high_freq_factor", self.rope_high_freq_factor,
                  self.rope_high_freq_factor > self.rope_low_freq_factor > 0,
                  f"must be > rope_low_freq_factor ({self.rope_low_freq_factor}) > 0")

    @property
    def head_dim(self) -> int:
        return self.d_head


class RMSNorm(nnx.Module):
    def __init__(self, d: int, eps: float, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(rngs, _ones, (d,), ("embed",))

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps) * self.scale[...]


def _norm(cfg: FamilyConfig, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
    return LayerNorm(cfg.d_model, cfg.norm_eps, rngs)


def inv_frequencies(cfg: FamilyConfig) -> np.ndarray:
    """Rotary inverse frequencies [R/2] (float32, as HF computes them), with the scaling."""
    R = cfg.rotary_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, R, 2, dtype=np.float32) / R))
           ).astype(np.float32)
    if cfg.rope_type == "linear":
        inv = inv / np.float32(cfg.rope_factor)
    elif cfg.rope_type == "llama3":  # Llama 3.1: long wavelengths / factor, smooth in between
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_len
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rotary(x: Float[Array, "B T N K"], positions: Int[Array, " T"],
           inv_freq: np.ndarray) -> Float[Array, "B T N K"]:
    """Rotate-half rotary embedding of the first ``2 len(inv_freq)`` channels (HF's convention)."""
    rotary_dim = 2 * len(inv_freq)
    if rotary_dim == 0:
        return x
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, R/2]
    cos = jnp.cos(jnp.concatenate([freqs, freqs], -1))[None, :, None, :]  # [1, T, 1, R]
    sin = jnp.sin(jnp.concatenate([freqs, freqs], -1))[None, :, None, :]
    xr, rest = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], -1)
    out = (xr * cos + rotated * sin).astype(x.dtype)
    return jnp.concatenate([out, rest], -1) if rest.shape[-1] else out


class RotaryAttention(nnx.Module):
    """Causal grouped-query self-attention with rotary positions and a fused QKV projection."""

    def __init__(self, cfg: FamilyConfig, rngs: nnx.Rngs):
        D, H, G, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.qkv_w = _param(rngs, _normal(0.02), (D, H + 2 * G, K), ("embed", "heads", "head_dim"))
        self.o_w = _param(rngs, _normal(0.02), (H, K, D), ("heads", "head_dim", "embed"))
        if cfg.attn_bias:
            self.qkv_b = _param(rngs, _zeros, (H + 2 * G, K), ("heads", "head_dim"))
            self.o_b = _param(rngs, _zeros, (D,), ("embed",))

    def __call__(self, x: Float[Array, "B T D"], kv: tuple[Array, Array] | None,
                 start: int | Int[Array, ""]) -> tuple[Float[Array, "B T D"], tuple | None]:
        cfg = self.cfg
        B, T, D = x.shape
        H, G, K = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        w = self.qkv_w[...].astype(self.dtype).reshape(D, (H + 2 * G) * K)
        qkv = (x.reshape(B * T, D).astype(self.dtype) @ w).reshape(B, T, H + 2 * G, K)
        if cfg.attn_bias:
            qkv = qkv + self.qkv_b[...].astype(self.dtype)
        q, k, v = qkv[:, :, :H], qkv[:, :, H:H + G], qkv[:, :, H + G:]
        query_pos = start + jnp.arange(T)
        inv_freq = inv_frequencies(cfg)  # a trace-time constant
        q = rotary(q, query_pos, inv_freq)
        k = rotary(k, query_pos, inv_freq)
        if kv is None:
            keys, values, key_pos = k, v, jnp.arange(T)
        else:
            keys = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, start, 0, 0))
            values = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, start, 0, 0))
            kv = (keys, values)
            key_pos = jnp.arange(keys.shape[1])
        q = q.reshape(B, T, G, H // G, K)  # query head h = g * (H / G) + j reads kv head g
        scores = jnp.einsum("btgjk,bsgk->bgjts", q, keys.astype(self.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(K)
        causal = key_pos[None, :] <= query_pos[:, None]  # [T, S]
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        z = jnp.einsum("bgjts,bsgk->btgjk", probs, values.astype(self.dtype))
        out = z.reshape(B * T, H * K) @ self.o_w[...].astype(self.dtype).reshape(H * K, D)
        out = out.reshape(B, T, D).astype(jnp.float32)
        if cfg.attn_bias:
            out = out + self.o_b[...]
        return out, kv


class FamilyMLP(nnx.Module):
    """``w_out(act(x w_in + b_in))``, or SwiGLU with ``w_in`` = [gate, up] ([D, 2, M])."""

    def __init__(self, cfg: FamilyConfig, rngs: nnx.Rngs):
        D, M = cfg.d_model, cfg.d_mlp
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.act = FAMILY_ACTIVATIONS[cfg.activation]
        shape, axes = ((D, 2, M), ("embed", None, "mlp")) if cfg.gated_mlp else ((D, M),
                                                                                ("embed", "mlp"))
        self.w_in = _param(rngs, _normal(0.02), shape, axes)
        self.w_out = _param(rngs, _normal(0.02), (M, D), ("mlp", "embed"))
        if cfg.mlp_bias:
            self.b_in = _param(rngs, _zeros, shape[1:], axes[1:])
            self.b_out = _param(rngs, _zeros, (D,), ("embed",))

    def pre(self, x: Float[Array, "B T D"]) -> tuple[Float[Array, "B T M"], Array | None]:
        """(pre-activation, SwiGLU's up projection or None)."""
        B, T, D = x.shape
        w = self.w_in[...].astype(self.dtype).reshape(D, -1)
        h = (x.reshape(B * T, D).astype(self.dtype) @ w).astype(jnp.float32)
        h = h.reshape(B, T, *self.w_in.shape[1:])
        if self.cfg.mlp_bias:
            h = h + self.b_in[...]
        return (h[:, :, 0], h[:, :, 1]) if self.cfg.gated_mlp else (h, None)

    def post(self, pre: Float[Array, "B T M"], up: Array | None) -> Float[Array, "B T M"]:
        return self.act(pre) if up is None else self.act(pre) * up

    def out(self, h: Float[Array, "B T M"]) -> Float[Array, "B T D"]:
        B, T, M = h.shape
        y = h.reshape(B * T, M).astype(self.dtype) @ self.w_out[...].astype(self.dtype)
        y = y.reshape(B, T, -1).astype(jnp.float32)
        return y + self.b_out[...] if self.cfg.mlp_bias else y


class FamilyBlock(nnx.Module):
    def __init__(self, cfg: FamilyConfig, rngs: nnx.Rngs):
        self.ln1 = _norm(cfg, rngs)
        self.attn = RotaryAttention(cfg, rngs)
        self.ln2 = _norm(cfg, rngs)
        self.mlp = FamilyMLP(cfg, rngs)


class RotaryTransformer(nnx.Module):
    """Decoder-only rotary transformer; ``RotaryTransformer(cfg, rngs=nnx.Rngs(seed))``."""

    def __init__(self, cfg: FamilyConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = _param(rngs, _normal(0.02), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        self.blocks = nnx.List([FamilyBlock(cfg, rngs) for _ in range(cfg.n_layers)])
        self.ln_f = _norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.w_u = _param(rngs, _normal(0.02), (cfg.d_model, cfg.vocab_size),
                              ("embed", "vocab"))

    def init_cache(self, batch: int, length: int | None = None) -> KVCache:
        """An empty KV cache (keys after the rotation) for ``batch`` sequences."""
        cfg = self.cfg
        shape = (batch, length or cfg.max_len, cfg.n_kv_heads, cfg.d_head)
        dtype = jnp.dtype(cfg.compute_dtype)
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                     for _ in range(cfg.n_layers))

    def __call__(self, tokens: Int[Array, "B T"], *, sites: Sequence[str] = (),
                 interventions: Sequence[Intervention] = (), logits: bool = True,
                 cache: KVCache | None = None, start: int | Int[Array, ""] = 0) -> Output:
        """Runs the model; arguments and result as ``saejax.lm.model.Transformer.__call__``."""
        cfg = self.cfg
        check_call(cfg, tokens, sites, logits, start)
        hooks = _Hooks(sites, interventions, cfg.n_layers, stop_early=not logits)
        x = jnp.take(self.wte[...], tokens, axis=0)
        new_cache = []
        for layer, block in enumerate(self.blocks):
            x = hooks(layer, "resid.pre", x)
            if hooks.done:
                return Output(None, hooks.acts, None)
            a, kv = block.attn(block.ln1(x), None if cache is None else cache[layer], start)
            new_cache.append(kv)
            a = hooks(layer, "attn.out", a)
            mid = hooks(layer, "resid.mid", x + a)
            if hooks.done:
                return Output(None, hooks.acts, None)
            pre, up = block.mlp.pre(block.ln2(x if cfg.parallel_residual else mid))
            pre = hooks(layer, "mlp.pre", pre)
            if hooks.done:
                return Output(None, hooks.acts, None)
            h = hooks(layer, "mlp.post", block.mlp.post(pre, up))
            if hooks.done:
                return Output(None, hooks.acts, None)
            m = hooks(layer, "mlp.out", block.mlp.out(h))
            x = hooks(layer, "resid.post", mid + m)
            if hooks.done:
                return Output(None, hooks.acts, None)
        if not logits:
            return Output(None, hooks.acts, None)
        return unembed(self, x, hooks.acts, None if cache is None else tuple(new_cache))


def abstract_family_model(cfg: FamilyConfig) -> RotaryTransformer:
    """The model with ShapeDtypeStruct leaves (no memory, no compute)."""
    return nnx.eval_shape(lambda: RotaryTransformer(cfg, rngs=nnx.Rngs(0)))
