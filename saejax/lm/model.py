"""The transformer language model (Flax NNX): GPT-2 layout, pre-LayerNorm, learned positions.

One forward call returns logits and/or named intermediates (:mod:`saejax.lm.sites`) and applies
interventions at sites. When only activations are wanted (``logits=False``) the forward stops
right after the last requested site, so harvesting ``mlp.post`` never computes attention of
later layers or the unembedding. The same call with a KV cache and a start offset is one
decoding step (:mod:`saejax.lm.generate`).

Parameters carry logical axis names (``out_sharding`` metadata) that :func:`param_shardings` maps to
mesh shardings through the rules table in :mod:`saejax.parallel`. Matmuls run on 2-D operands
(XLA:CPU is ~2x slower on 3-D dots).

Legend: B batch, T sequence (query positions), S key positions (cache length), D d_model,
M d_mlp, V vocab, H heads, K head width, L layers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from saejax import parallel
from saejax.lm.config import ModelConfig
from saejax.lm.sites import Intervention, canonical_site, group_by_site

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),  # GPT-2's tanh form
}

# Per layer: (keys [B, S, H, K], values [B, S, H, K]).
KVCache = tuple[tuple[Array, Array], ...]


class Output(NamedTuple):
    """What a forward call returns.

    logits: [B, T, V] float32, or None with ``logits=False``.
    acts: canonical site name -> activations [B, T, D or M] (after any intervention there).
    cache: the updated KV cache when one was passed, else None.
    """

    logits: Float[Array, "B T V"] | None
    acts: dict[str, Array]
    cache: KVCache | None


def _param(rngs: nnx.Rngs | None, init, shape: tuple[int, ...], axes: tuple[str | None, ...]
           ) -> nnx.Param:
    value = init(rngs.params() if rngs is not None else None, shape, jnp.float32)
    # Logical names only; parallel.py maps them to the mesh (no eager placement here).
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _normal(std: float):
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def _zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def _ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


class LayerNorm(nnx.Module):
    def __init__(self, d: int, eps: float, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(rngs, _ones, (d,), ("embed",))
        self.bias = _param(rngs, _zeros, (d,), ("embed",))

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class Attention(nnx.Module):
    """Causal multi-head self-attention with a fused QKV projection."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, H, K = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.dtype = jnp.dtype(cfg.compute_dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.qkv_w = _param(rngs, _normal(cfg.init_std), (D, 3, H, K),
                            ("embed", None, "heads", "head_dim"))
        self.qkv_b = _param(rngs, _zeros, (3, H, K), (None, "heads", "head_dim"))
        self.o_w = _param(rngs, _normal(out_std), (H, K, D), ("heads", "head_dim", "embed"))
        self.o_b = _param(rngs, _zeros, (D,), ("embed",))

    def __call__(self, x: Float[Array, "B T D"], kv: tuple[Array, Array] | None,
                 start: int | Int[Array, ""]) -> tuple[Float[Array, "B T D"], tuple | None]:
        B, T, D = x.shape
        _, _, H, K = self.qkv_w.shape
        w = self.qkv_w[...].astype(self.dtype).reshape(D, 3 * H * K)
        qkv = x.reshape(B * T, D).astype(self.dtype) @ w
        qkv = qkv.reshape(B, T, 3, H, K) + self.qkv_b[...].astype(self.dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if kv is None:
            keys, values = k, v
            key_pos = jnp.arange(T)
        else:
            keys = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, start, 0, 0))
            values = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, start, 0, 0))
            kv = (keys, values)
            key_pos = jnp.arange(keys.shape[1])
        query_pos = start + jnp.arange(T)
        scores = jnp.einsum("bthk,bshk->bhts", q, keys.astype(self.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(K)
        causal = key_pos[None, :] <= query_pos[:, None]  # [T, S]
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        z = jnp.einsum("bhts,bshk->bthk", probs, values.astype(self.dtype))
        out = z.reshape(B * T, H * K) @ self.o_w[...].astype(self.dtype).reshape(H * K, D)
        out = out.reshape(B, T, D).astype(jnp.float32) + self.o_b[...]
        return out, kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, M = cfg.d_model, cfg.d_mlp
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.act = ACTIVATIONS[cfg.activation]
        self.w_in = _param(rngs, _normal(cfg.init_std), (D, M), ("embed", "mlp"))
        self.b_in = _param(rngs, _zeros, (M,), ("mlp",))
        self.w_out = _param(rngs, _normal(cfg.init_std / math.sqrt(2 * cfg.n_layers)), (M, D),
                            ("mlp", "embed"))
        self.b_out = _param(rngs, _zeros, (D,), ("embed",))

    def pre(self, x: Float[Array, "B T D"]) -> Float[Array, "B T M"]:
        B, T, D = x.shape
        h = x.reshape(B * T, D).astype(self.dtype) @ self.w_in[...].astype(self.dtype)
        return h.reshape(B, T, -1).astype(jnp.float32) + self.b_in[...]

    def out(self, h: Float[Array, "B T M"]) -> Float[Array, "B T D"]:
        B, T, M = h.shape
        y = h.reshape(B * T, M).astype(self.dtype) @ self.w_out[...].astype(self.dtype)
        return y.reshape(B, T, -1).astype(jnp.float32) + self.b_out[...]


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.ln1 = LayerNorm(cfg.d_model, cfg.layer_norm_eps, rngs)
        self.attn = Attention(cfg, rngs)
        self.ln2 = LayerNorm(cfg.d_model, cfg.layer_norm_eps, rngs)
        self.mlp = MLP(cfg, rngs)


class _Hooks:
    """Records requested sites and applies interventions; knows when the forward may stop."""

    def __init__(self, sites: Sequence[str], interventions: Sequence[Intervention],
                 n_layers: int, stop_early: bool):
        self.want = {canonical_site(s, n_layers) for s in sites}
        self.interventions = group_by_site(interventions, n_layers)
        self.stop_early = stop_early
        self.acts: dict[str, Array] = {}

    def __call__(self, layer: int, kind: str, x: Array) -> Array:
        name = f"blocks.{layer}.{kind}"
        for iv in self.interventions.get(name, ()):
            x = iv(x)
        if name in self.want:
            self.acts[name] = x
        return x

    @property
    def done(self) -> bool:
        return self.stop_early and len(self.acts) == len(self.want)


def check_call(cfg, tokens: Int[Array, "B T"], sites, logits: bool, start) -> None:
    """The argument checks of every model's ``__call__`` (this one and lm/families.py's)."""
    if not logits and not sites:
        raise ValueError("logits=False needs at least one site to return")
    if isinstance(start, int) and start + tokens.shape[1] > cfg.max_len:
        raise ValueError(f"positions up to {start + tokens.shape[1]} exceed max_len "
                         f"{cfg.max_len}")


def unembed(model, x: Float[Array, "B T D"], acts, cache) -> Output:
    """Final norm and unembedding (tied or not) in ``compute_dtype``; float32 logits."""
    cfg = model.cfg
    b, t = x.shape[:2]
    x = model.ln_f(x)
    w_u = model.wte[...].T if cfg.tie_embeddings else model.w_u[...]
    dtype = jnp.dtype(cfg.compute_dtype)
    out = x.reshape(b * t, -1).astype(dtype) @ w_u.astype(dtype)
    return Output(out.reshape(b, t, -1).astype(jnp.float32), acts, cache)


class Transformer(nnx.Module):
    """Decoder-only transformer; ``Transformer(cfg, rngs=nnx.Rngs(seed))``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (> 0) to build the model")
        self.cfg = cfg
        self.wte = _param(rngs, _normal(cfg.init_std), (cfg.vocab_size, cfg.d_model),
                          ("vocab", "embed"))
        self.wpe = _param(rngs, _normal(cfg.init_std), (cfg.max_len, cfg.d_model),
                          ("seq", "embed"))
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.ln_f = LayerNorm(cfg.d_model, cfg.layer_norm_eps, rngs)
        if not cfg.tie_embeddings:
            self.w_u = _param(rngs, _normal(cfg.init_std), (cfg.d_model, cfg.vocab_size),
                              ("embed", "vocab"))

    def init_cache(self, batch: int, length: int | None = None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``length`` (default max_len)."""
        cfg = self.cfg
        shape = (batch, length or cfg.max_len, cfg.n_heads, cfg.head_dim)
        dtype = jnp.dtype(cfg.compute_dtype)
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                     for _ in range(cfg.n_layers))

    def __call__(self, tokens: Int[Array, "B T"], *, sites: Sequence[str] = (),
                 interventions: Sequence[Intervention] = (), logits: bool = True,
                 cache: KVCache | None = None, start: int | Int[Array, ""] = 0) -> Output:
        """Runs the model.

        Args:
          tokens: token ids.
          sites: site names to return (static), e.g. ``("mlp.post",)``; see sites.SITE_KINDS.
          interventions: applied at their sites in order (see :mod:`saejax.lm.sites`).
          logits: compute the logits. With False the forward stops after the last site.
          cache: KV cache from :meth:`init_cache`; the tokens are written at ``start``.
          start: position of ``tokens[:, 0]`` (decoding with a cache).

        Returns:
          :class:`Output` (logits, acts, cache).
        """
        cfg = self.cfg
        check_call(cfg, tokens, sites, logits, start)
        hooks = _Hooks(sites, interventions, cfg.n_layers, stop_early=not logits)
        T = tokens.shape[1]
        pos = jax.lax.dynamic_slice_in_dim(self.wpe[...], start, T, axis=0)
        x = jnp.take(self.wte[...], tokens, axis=0) + pos[None]
        new_cache = []
        for layer, block in enumerate(self.blocks):
            x = hooks(layer, "resid.pre", x)
            if hooks.done:
                return Output(None, hooks.acts, None)
            a, kv = block.attn(block.ln1(x), None if cache is None else cache[layer], start)
            new_cache.append(kv)
            a = hooks(layer, "attn.out", a)
            x = hooks(layer, "resid.mid", x + a)
            if hooks.done:
                return Output(None, hooks.acts, None)
            h = hooks(layer, "mlp.pre", block.mlp.pre(block.ln2(x)))
            if hooks.done:
                return Output(None, hooks.acts, None)
            h = hooks(layer, "mlp.post", block.mlp.act(h))
            if hooks.done:
                return Output(None, hooks.acts, None)
            m = hooks(layer, "mlp.out", block.mlp.out(h))
            x = hooks(layer, "resid.post", x + m)
            if hooks.done:
                return Output(None, hooks.acts, None)
        if not logits:  # only reachable if a site was never produced (cannot happen)
            return Output(None, hooks.acts, None)
        return unembed(self, x, hooks.acts, None if cache is None else tuple(new_cache))


def init_params(cfg: ModelConfig, seed: int = 0,
                shardings: nnx.State | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of a freshly initialised model, created by one jitted program
    (eager init would compile every initializer separately) and placed on ``shardings``."""
    graphdef, _ = nnx.split(abstract_model(cfg), nnx.Param)

    def init():
        return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param)[1]

    return graphdef, jax.jit(init, out_shardings=shardings)()


def build_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A freshly initialised model."""
    return nnx.merge(*init_params(cfg, seed))


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model with ShapeDtypeStruct leaves (no memory, no compute); for eval_shape/restore."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def split_params(model: Transformer) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params): the static structure and the parameter pytree."""
    return nnx.split(model, nnx.Param)


def split_lm(lm) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of a ``Transformer``, or an existing (graphdef, params) pair as is."""
    return nnx.split(lm, nnx.Param) if isinstance(lm, nnx.Module) else tuple(lm)


def lm_module(lm) -> Transformer:
    """The ``Transformer`` of ``lm`` (merging a (graphdef, params) pair)."""
    return lm if isinstance(lm, nnx.Module) else nnx.merge(*lm)


def forward(graphdef: nnx.GraphDef, params: nnx.State, tokens: Int[Array, "B T"],
            **kwargs) -> Output:
    """Pure-function form of ``Transformer.__call__`` (for jit, grad and vmap)."""
    return nnx.merge(graphdef, params)(tokens, **kwargs)


def param_shardings(params: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """NamedSharding per parameter, from its logical axis names via parallel's rules."""
    specs = nnx.get_partition_spec(params)
    return jax.tree.map(lambda spec: parallel.named_sharding(mesh, tuple(spec)), specs,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def count_params(params: nnx.State) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
