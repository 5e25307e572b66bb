"""The two jitted, sharded passes behind the feature statistics (:mod:`saejax.analysis.features`).

Both passes run over the same N held-out contexts, batched and sharded over "batch" (the
running per-feature state is sharded over "latent"):

* pass 1 counts firings (density), sums activations, histograms the L0 of every token and
  keeps each feature's top-K activations with a running merge (``lax.top_k`` of the batch,
  concatenated with the kept K, ``lax.top_k`` again), together with the feature's
  activations on a window of W tokens around each kept token;
* pass 2, knowing each feature's maximum, histograms its activations on [0, max] and draws
  random samples from ``n_intervals`` equal-width activation intervals (the paper shows ~11):
  every token gets a uniform random priority and each (feature, interval) keeps the S
  highest priorities among its tokens, which is a uniform sample without replacement.

Feature activations come from :meth:`saejax.sae.bundle.SAEBundle.encode` (SAE units; the
bundle applies the run's input normaliser).

Legend: N contexts, B contexts per batch, T sequence, R = B*T token rows of a batch,
F features, K top examples, I intervals, S samples per interval, W window tokens,
H histogram bins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from saejax import parallel
from saejax.lm.model import forward
from saejax.sae.bundle import SAEBundle


class Pass1State(NamedTuple):
    count: Int[Array, " F"]
    act_sum: Float[Array, " F"]
    l0_hist: Int[Array, " F1"]
    top_val: Float[Array, "F K"]
    top_pos: Int[Array, "F K"]
    top_win: Float[Array, "F K W"]


class Pass2State(NamedTuple):
    hist: Int[Array, "F H"]
    pri: Float[Array, "F I S"]
    pos: Int[Array, "F I S"]
    win: Float[Array, "F I S W"]


def feature_fn(graphdef, site: str) -> Callable:
    """``(lm_params, sae, tokens [B, T]) -> f [B*T, F]`` (traceable, SAE units)."""

    def features(lm_params, sae: SAEBundle, tokens):
        (acts,) = forward(graphdef, lm_params, tokens, sites=(site,), logits=False).acts.values()
        return sae.encode(acts.reshape(-1, acts.shape[-1]))

    return features


def _windows(f: Float[Array, "R F"], idx: Int[Array, "F ..."], seq_len: int, width: int,
             before: int) -> Float[Array, "F ... W"]:
    """Each feature's activations on the W-token window around its rows ``idx``.

    The window starts ``before`` tokens earlier, shifted to stay inside the context.
    """
    t = idx % seq_len
    start = jnp.clip(t - before, 0, seq_len - width)
    rows = (idx - t + start)[..., None] + jnp.arange(width)
    feat = jnp.arange(f.shape[1]).reshape((-1,) + (1,) * (rows.ndim - 1))
    return f[rows, feat]


def _merge(vals, pos, win, new_vals, new_pos, new_win):
    """Keeps the K largest of two candidate sets along the last value axis."""
    k = vals.shape[-1]
    all_vals = jnp.concatenate([vals, new_vals], axis=-1)
    keep_vals, sel = jax.lax.top_k(all_vals, k)
    keep_pos = jnp.take_along_axis(jnp.concatenate([pos, new_pos], -1), sel, axis=-1)
    all_win = jnp.concatenate([win, new_win], axis=-2)
    keep_win = jnp.take_along_axis(all_win, sel[..., None], axis=-2)
    return keep_vals, keep_pos, keep_win


def _state_shardings(mesh, state_cls):
    ndims = {Pass1State: (1, 1, 1, 2, 2, 3), Pass2State: (2, 3, 3, 4)}[state_cls]
    shardings = [parallel.named_sharding(mesh, ("latent",) + (None,) * (n - 1)) for n in ndims]
    if state_cls is Pass1State:
        shardings[2] = parallel.replicated(mesh)  # the L0 histogram has no latent axis
    return state_cls(*shardings)


def make_pass1(graphdef, site: str, mesh, config, seq_len: int, width: int):
    """Jitted ``(state, lm_params, sae, tokens, offset) -> state`` (state donated)."""
    features = feature_fn(graphdef, site)
    k, before = config.top_k, config.window_before
    shardings = _state_shardings(mesh, Pass1State)

    def step(state: Pass1State, lm_params, sae, tokens, offset) -> Pass1State:
        f = features(lm_params, sae, tokens)
        fired = f > 0
        l0 = jnp.sum(fired, axis=1, dtype=jnp.int32)
        vals, idx = jax.lax.top_k(f.T, k)
        win = _windows(f, idx, seq_len, width, before)
        top = _merge(state.top_val, state.top_pos, state.top_win, vals, idx + offset, win)
        return Pass1State(
            count=state.count + jnp.sum(fired, axis=0, dtype=jnp.int32),
            act_sum=state.act_sum + jnp.sum(f, axis=0),
            l0_hist=state.l0_hist.at[l0].add(1),
            top_val=top[0], top_pos=top[1], top_win=top[2])

    return jax.jit(step, out_shardings=shardings, donate_argnums=0), shardings


def make_pass2(graphdef, site: str, mesh, config, seq_len: int, width: int):
    """Jitted ``(state, lm_params, sae, tokens, offset, max_act, key) -> state``."""
    features = feature_fn(graphdef, site)
    n_int, n_bins, before = config.n_intervals, config.hist_bins, config.window_before
    s = config.samples_per_interval
    shardings = _state_shardings(mesh, Pass2State)

    def step(state: Pass2State, lm_params, sae, tokens, offset, max_act, key
             ) -> Pass2State:
        f = features(lm_params, sae, tokens)
        ft = f.T  # [F, R]: top_k reduces the last axis; transpose once, not per interval
        fired = ft > 0
        rel = ft / jnp.maximum(max_act, 1e-30)[:, None]
        hbin = jnp.clip(jnp.floor(rel * n_bins).astype(jnp.int32), 0, n_bins - 1)
        feat = jnp.broadcast_to(jnp.arange(ft.shape[0])[:, None], ft.shape)
        hist = state.hist.at[feat, hbin].add(fired.astype(jnp.int32))
        ibin = jnp.where(fired, jnp.clip(jnp.floor(rel * n_int).astype(jnp.int32), 0,
                                         n_int - 1), -1)
        # One priority per token (shared by all features): each (feature, interval) still
        # gets a uniform sample of its own tokens; correlations across features are harmless.
        u = jax.random.uniform(key, (1, ft.shape[1]))
        cand_pri, cand_idx = [], []
        for j in range(n_int):
            v, i = jax.lax.top_k(jnp.where(ibin == j, u, -1.0), s)
            cand_pri.append(v)
            cand_idx.append(i)
        pri = jnp.stack(cand_pri, axis=1)   # [F, I, S]
        idx = jnp.stack(cand_idx, axis=1)
        win = _windows(f, idx, seq_len, width, before)
        pri, pos, win = _merge(state.pri, state.pos, state.win, pri, idx + offset, win)
        return Pass2State(hist=hist, pri=pri, pos=pos, win=win)

    return jax.jit(step, out_shardings=shardings, donate_argnums=0), shardings


def _batches(tokens: np.ndarray, batch: int, mesh):
    sharding = parallel.named_sharding(mesh, ("batch", None))
    for b in range(tokens.shape[0] // batch):
        rows = tokens[b * batch:(b + 1) * batch]
        yield b, jax.device_put(np.ascontiguousarray(rows, np.int32), sharding)


def run_passes(graphdef, lm_params, sae: SAEBundle, tokens: np.ndarray, config, mesh,
               width: int) -> tuple[Pass1State, Pass2State]:
    """Both passes over ``tokens`` [N, T] (N a multiple of ``config.batch_size``), on the host.

    ``config`` is a :class:`~saejax.analysis.features.FeatureStatsConfig`; ``sae`` must
    already be placed on ``mesh``.
    """
    batch, seq_len = config.batch_size, tokens.shape[1]
    F, K = sae.n_features, config.top_k
    step1, sh1 = make_pass1(graphdef, sae.site, mesh, config, seq_len, width)
    state1 = jax.device_put(Pass1State(
        count=np.zeros(F, np.int32), act_sum=np.zeros(F, np.float32),
        l0_hist=np.zeros(F + 1, np.int32), top_val=np.full((F, K), -1.0, np.float32),
        top_pos=np.full((F, K), -1, np.int32), top_win=np.zeros((F, K, width), np.float32)), sh1)
    for b, tok in _batches(tokens, batch, mesh):
        state1 = step1(state1, lm_params, sae, tok, np.int32(b * batch * seq_len))
    s1 = jax.tree.map(np.asarray, state1)

    max_act = np.maximum(s1.top_val[:, 0], 0.0).astype(np.float32)
    step2, sh2 = make_pass2(graphdef, sae.site, mesh, config, seq_len, width)
    I, S = config.n_intervals, config.samples_per_interval  # noqa: E741
    state2 = jax.device_put(Pass2State(
        hist=np.zeros((F, config.hist_bins), np.int32), pri=np.full((F, I, S), -1.0, np.float32),
        pos=np.full((F, I, S), -1, np.int32), win=np.zeros((F, I, S, width), np.float32)), sh2)
    max_dev = jax.device_put(max_act, parallel.named_sharding(mesh, ("latent",)))
    root = jax.random.key(config.seed)
    for b, tok in _batches(tokens, batch, mesh):
        state2 = step2(state2, lm_params, sae, tok, np.int32(b * batch * seq_len),
                       max_dev, jax.random.fold_in(root, b))
    return s1, jax.tree.map(np.asarray, state2)
