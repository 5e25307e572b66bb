"""Batched sampling with a KV cache, compiled once per (batch, length, top_k).

Every position goes through the same one-token decoding step inside a ``lax.scan``: while a
row is still inside its prompt the next token is the prompt's, afterwards it is sampled. Rows
may have different prompt lengths, and the whole generation is one fixed-shape program.
Interventions (:mod:`saejax.lm.sites`) apply at every step, e.g. pinning an SAE feature while
sampling (steering).

Legend: B batch, P prompt buffer length, L total length, V vocab.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int, PRNGKeyArray

from saejax.lm.model import Transformer, forward
from saejax.lm.sites import Intervention


def sample_logits(key: PRNGKeyArray, logits: Float[Array, "B V"], temperature: float | Array,
                  top_k: int = 0) -> Int[Array, " B"]:
    """Samples token ids; ``temperature <= 0`` is greedy, ``top_k > 0`` keeps the k best."""
    logits = logits.astype(jnp.float32)
    if top_k > 0:
        kth = jnp.min(jax.lax.top_k(logits, top_k)[0], axis=-1, keepdims=True)  # not [:, -1:]: see sae/topk.py
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    t = jnp.asarray(temperature, jnp.float32)
    sampled = jax.random.categorical(key, logits / jnp.maximum(t, 1e-6), axis=-1)
    return jnp.where(t > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "length", "top_k"))
def _generate(graphdef: nnx.GraphDef, params: nnx.State, prompts: Int[Array, "B P"],
              prompt_lens: Int[Array, " B"], key: PRNGKeyArray, temperature: Array,
              interventions: tuple, *, length: int, top_k: int) -> Int[Array, "B L"]:
    B, P = prompts.shape
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(B, length)
    buf = jnp.zeros((B, length), jnp.int32).at[:, :min(P, length)].set(prompts[:, :length])

    def step(carry, t):
        buf, cache = carry
        out = forward(graphdef, params, jax.lax.dynamic_slice_in_dim(buf, t, 1, axis=1),
                      interventions=interventions, cache=cache, start=t)
        nxt = sample_logits(jax.random.fold_in(key, t), out.logits[:, 0], temperature, top_k)
        in_prompt = t + 1 < prompt_lens
        forced = jax.lax.dynamic_slice_in_dim(buf, t + 1, 1, axis=1)[:, 0]
        nxt = jnp.where(in_prompt, forced, nxt)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None], t + 1, axis=1)
        return (buf, out.cache), None

    (buf, _), _ = jax.lax.scan(step, (buf, cache), jnp.arange(length - 1))
    return buf


def generate(model: Transformer | tuple[nnx.GraphDef, nnx.State], prompts: Int[Array, "B P"],
             *, length: int, key: PRNGKeyArray, prompt_lens: Int[Array, " B"] | None = None,
             temperature: float = 1.0, top_k: int = 0,
             interventions: Sequence[Intervention] = ()) -> Int[Array, "B L"]:
    """Continues each prompt to ``length`` tokens.

    Args:
      model: a Transformer, or its (graphdef, params).
      prompts: prompt ids, left-aligned; entries past ``prompt_lens`` are ignored.
      length: total tokens per row (prompt + generated), at most ``max_len``.
      key: PRNG key; position ``t`` samples with ``fold_in(key, t)``.
      prompt_lens: tokens of each row's prompt (>= 1); default all ``P``.
      temperature: softmax temperature; <= 0 is greedy (traced: no recompile).
      top_k: sample among the k most likely tokens (0 = all); static.
      interventions: applied at their sites at every step (traced parameters).

    Returns:
      Token ids [B, length]: the prompts followed by the samples.
    """
    graphdef, params = nnx.split(model, nnx.Param) if isinstance(model, nnx.Module) else model
    prompts = jnp.asarray(prompts, jnp.int32)
    B, P = prompts.shape
    max_len = nnx.merge(graphdef, params).cfg.max_len
    if not 1 <= P <= length <= max_len:
        raise ValueError(f"need 1 <= prompt length ({P}) <= length ({length}) <= max_len "
                         f"({max_len})")
    lens = jnp.full((B,), P, jnp.int32) if prompt_lens is None else jnp.asarray(prompt_lens,
                                                                                 jnp.int32)
    return _generate(graphdef, params, prompts, lens, key, jnp.float32(temperature),
                     tuple(interventions), length=length, top_k=top_k)
