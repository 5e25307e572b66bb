"""Feature statistics over held-out tokens: density, activations, contexts, logits, ablation.

Two jitted passes over the same N held-out contexts, batched and sharded over "batch"
(the running per-feature state is sharded over "latent"):

* pass 1 counts firings (density), sums activations, histograms the L0 of every token and
  keeps each feature's top-K activations with a running merge (``lax.top_k`` of the batch,
  concatenated with the kept K, ``lax.top_k`` again), together with the feature's
  activations on a window of W tokens around each kept token;
* pass 2, knowing each feature's maximum, histograms its activations on [0, max] and draws
  random samples from ``n_intervals`` equal-width activation intervals (the paper shows ~11):
  every token gets a uniform random priority and each (feature, interval) keeps the S
  highest priorities among its tokens, which is a uniform sample without replacement.

Then, on the host: token windows (ids; strings via ``vocab``), logit effects
(:mod:`saejax.analysis.logits`), the ablation effect on log-likelihood over each feature's
top contexts (:mod:`saejax.analysis.ablation`), dead / ultralow-density / dense lists.

Activations are in SAE units: the LM's site activations are multiplied by
``sae.norm_scale`` before encoding (see :mod:`saejax.analysis.bundle`).

The result is a plain dict of lists and numbers (JSON-serialisable, see
:func:`save_stats`); its layout is documented on :func:`compute_feature_stats`.

Legend: N contexts, B contexts per batch, T sequence, R = B*T token rows of a batch,
D site width, F features, K top examples, I intervals, S samples per interval,
W window tokens, H histogram bins.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jaxtyping import Array, Float, Int

from saejax import parallel
from saejax.analysis import ablation, logits
from saejax.analysis.bundle import SAEBundle, lm_module, split_lm
from saejax.config import MeshConfig, check, check_fraction, check_nonnegative, check_positive
from saejax.lm.model import forward
from saejax.sae.model import encode

STATS_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class FeatureStatsConfig:
    """What :func:`compute_feature_stats` computes and how.

    Attributes:
      batch_size: contexts per jitted batch (a multiple of the mesh's data-parallel size);
        the last partial batch of the token array is dropped.
      top_k: top-activating examples kept per feature.
      n_intervals: equal-width activation intervals on (0, max] to sample from (paper ~11).
      samples_per_interval: random examples per interval.
      window_before, window_after: tokens shown before/after an example's token.
      hist_bins: bins of each feature's activation histogram on [0, max].
      n_logit_tokens: top and bottom logit-effect tokens kept per feature.
      fold_ln: fold the final LayerNorm's linear part into the logit effects (see
        :mod:`saejax.analysis.logits`); False is the paper's W_U W_out d_i.
      ablation_contexts: top contexts per feature over which the ablation effect on
        log-likelihood is measured (0 = skip ablation).
      ablation_max_features: ablate at most this many alive features (the densest first);
        None = all alive features.
      ultralow_density: features with 0 < density below this are the ultralow-density
        cluster; None = find the valley of a bimodal log10-density histogram (falls back
        to 1e-6 when it is not bimodal).
      dense_threshold: a feature denser than this is "dense" (the paper: 1%).
      seed: seeds the interval sampling.
    """

    batch_size: int = 16
    top_k: int = 20
    n_intervals: int = 11
    samples_per_interval: int = 5
    window_before: int = 12
    window_after: int = 4
    hist_bins: int = 32
    n_logit_tokens: int = 10
    fold_ln: bool = True
    ablation_contexts: int = 4
    ablation_max_features: int | None = None
    ultralow_density: float | None = None
    dense_threshold: float = 0.01
    seed: int = 0

    def __post_init__(self):
        for name in ("batch_size", "top_k", "n_intervals", "samples_per_interval", "hist_bins",
                     "n_logit_tokens"):
            v = getattr(self, name)
            check(f"analysis.{name}", v, isinstance(v, int) and v >= 1, "must be an integer >= 1")
        check_nonnegative("analysis.window_before", self.window_before)
        check_nonnegative("analysis.window_after", self.window_after)
        check_nonnegative("analysis.ablation_contexts", self.ablation_contexts)
        if self.ablation_max_features is not None:
            check_nonnegative("analysis.ablation_max_features", self.ablation_max_features)
        if self.ultralow_density is not None:
            check_positive("analysis.ultralow_density", self.ultralow_density)
        check_fraction("analysis.dense_threshold", self.dense_threshold)


# ----------------------------------------------------------------------------------------
# Device passes
# ----------------------------------------------------------------------------------------


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


def feature_fn(graphdef, sae: SAEBundle) -> Callable:
    """``(lm_params, sae_params, tokens [B, T]) -> f [B*T, F]`` (traceable, SAE units)."""
    site, config, scale = sae.site, sae.config, sae.norm_scale

    def features(lm_params, sae_params, tokens):
        (acts,) = forward(graphdef, lm_params, tokens, sites=(site,), logits=False).acts.values()
        x = acts.reshape(-1, acts.shape[-1]).astype(jnp.float32) * scale
        return encode(sae_params, x, config)

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


def make_pass1(graphdef, sae: SAEBundle, mesh, config: FeatureStatsConfig, seq_len: int,
               width: int):
    """Jitted ``(state, lm_params, sae_params, tokens, offset) -> state`` (state donated)."""
    features = feature_fn(graphdef, sae)
    k, before = config.top_k, config.window_before
    shardings = _state_shardings(mesh, Pass1State)

    def step(state: Pass1State, lm_params, sae_params, tokens, offset) -> Pass1State:
        f = features(lm_params, sae_params, tokens)
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


def make_pass2(graphdef, sae: SAEBundle, mesh, config: FeatureStatsConfig, seq_len: int,
               width: int):
    """Jitted ``(state, lm_params, sae_params, tokens, offset, max_act, key) -> state``."""
    features = feature_fn(graphdef, sae)
    n_int, n_bins, before = config.n_intervals, config.hist_bins, config.window_before
    s = config.samples_per_interval
    shardings = _state_shardings(mesh, Pass2State)

    def step(state: Pass2State, lm_params, sae_params, tokens, offset, max_act, key
             ) -> Pass2State:
        f = features(lm_params, sae_params, tokens)
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


# ----------------------------------------------------------------------------------------
# Host-side assembly
# ----------------------------------------------------------------------------------------


def _r(x: float) -> float:
    """Rounds to 4 significant digits (keeps the JSON small); NaN/inf become None."""
    x = float(x)
    if x == 0.0:  # most window activations of a sparse dictionary
        return 0.0
    return float(f"{x:.4g}") if math.isfinite(x) else None


def ultralow_threshold(density: np.ndarray, bins: int = 30, fallback: float = 1e-6) -> float:
    """Density below which alive features form the ultralow-density cluster.

    Looks for a bimodal log10-density histogram of the alive features: the main mode, a
    second mode to its left holding at least 5% of the main mode's count, and the emptiest
    bin between them. Without such a second mode (or with fewer than 100 alive features)
    it returns ``fallback``.
    """
    alive = np.log10(density[density > 0])
    if alive.size < 100:  # too few features to tell two modes from noise
        return fallback
    hist, edges = np.histogram(alive, bins=bins)
    main = int(np.argmax(hist))
    best = None
    for j in range(main - 2):  # a second peak at least two bins to the left
        left = hist[j - 1] if j > 0 else 0
        if hist[j] >= max(left, hist[j + 1], 1) and hist[j] >= 0.05 * hist[main]:
            valley = j + 1 + int(np.argmin(hist[j + 1:main]))
            if hist[valley] < 0.5 * hist[j] and (best is None or hist[j] > hist[best[0]]):
                best = (j, valley)
    if best is None:
        return fallback
    return float(10 ** edges[best[1] + 1])  # upper edge of the valley bin


def token_strings(tokenizer, vocab_size: int) -> list[str]:
    """A display string per token id (decoded one id at a time; end-of-text named)."""
    out = []
    eot = getattr(tokenizer, "eot_id", None)
    for i in range(vocab_size):
        if i == eot:
            out.append("<|endoftext|>")
            continue
        try:
            out.append(tokenizer.decode([i]))
        except Exception:  # noqa: BLE001 - an id the tokenizer cannot decode alone
            out.append(f"<{i}>")
    return out


def _example(tokens: np.ndarray, pos: int, act: float, win: np.ndarray, width: int,
             before: int) -> dict[str, Any]:
    seq_len = tokens.shape[1]
    row, t = divmod(int(pos), seq_len)
    start = min(max(t - before, 0), seq_len - width)
    return {"row": row, "pos": t, "act": _r(act),
            "tokens": [int(x) for x in tokens[row, start:start + width]],
            "acts": [_r(a) for a in win], "center": t - start}


def compute_feature_stats(lm, sae: SAEBundle, tokens: np.ndarray,
                          config: FeatureStatsConfig = FeatureStatsConfig(), *,
                          tokenizer=None, vocab: list[str] | None = None,
                          mesh: jax.sharding.Mesh | None = None,
                          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Feature statistics of ``sae`` on held-out ``tokens``.

    Args:
      lm: the LM (``Transformer`` or ``(graphdef, params)``).
      sae: the dictionary, its site and ``norm_scale``.
      tokens: int [N, T] held-out contexts (e.g. ``TokenStore.read("val", 0, N)``); the
        rows past the last whole batch are ignored, and so are the tokens past the LM's
        ``max_len``.
      config: what to compute.
      tokenizer: gives display strings for token ids (``vocab`` wins if both are given).
      vocab: display string per token id.
      mesh: device mesh (default: all devices over "data").
      progress: called with a short message after each stage (e.g. ``logging.info``).

    Returns:
      A JSON-serialisable dict::

        format, meta{site, norm_scale, n_features, d_in, n_contexts, seq_len, n_tokens,
                     window{before, after, width}, top_k, n_intervals, logit_mode,
                     ultralow_threshold, dense_threshold}
        summary{alive, dead, ultralow, dense, mean_l0}
        density[F], mean_act[F] (over all tokens), mean_act_active[F], max_act[F]
        dead[ids], ultralow[ids], dense[ids], l0_hist[counts by L0], vocab[strings] | None
        features[F]: {id, density, mean_act, max_act,
                      top[{row, pos, act, tokens[W], acts[W], center}],
                      intervals[{lo, hi, examples[...]}], hist{lo, hi, counts[H]},
                      logits{top[[id, value]], bottom[[id, value]]},
                      ablation{delta_logp_all, delta_logp_active, contexts} | None}

      Activations are in SAE units; examples' ``row`` indexes ``tokens``, ``pos`` is the
      token's position, ``center`` its index in the window ``tokens``/``acts``.
    """
    say = progress or (lambda msg: logging.info("feature stats: %s", msg))
    mesh = mesh or parallel.make_mesh(MeshConfig())
    # Token stores pack max_len + 1 tokens per context (inputs and targets): keep what fits.
    tokens = np.asarray(tokens, np.int32)[:, :lm_module(lm).cfg.max_len]
    n_ctx, seq_len = tokens.shape
    batch = config.batch_size
    parallel.check_divisible("analysis.batch_size", batch, mesh, parallel.DATA)
    n_batches = n_ctx // batch
    check("analysis.batch_size", batch, n_batches >= 1,
          f"must be <= the number of contexts given ({n_ctx})")
    check("analysis.top_k", config.top_k, config.top_k <= batch * seq_len,
          f"must be <= tokens per batch ({batch * seq_len})")
    check("analysis.samples_per_interval", config.samples_per_interval,
          config.samples_per_interval <= batch * seq_len,
          f"must be <= tokens per batch ({batch * seq_len})")
    tokens = tokens[:n_batches * batch]
    n_ctx = tokens.shape[0]
    width = min(config.window_before + 1 + config.window_after, seq_len)
    F = sae.n_features
    graphdef, lm_params = split_lm(lm)
    sae_m = sae.on_mesh(mesh)
    lm_params = jax.device_put(lm_params, parallel.replicated(mesh))

    # Pass 1: density, sums, L0, top-K.
    step1, sh1 = make_pass1(graphdef, sae, mesh, config, seq_len, width)
    K = config.top_k
    state1 = jax.device_put(Pass1State(
        count=np.zeros(F, np.int32), act_sum=np.zeros(F, np.float32),
        l0_hist=np.zeros(F + 1, np.int32), top_val=np.full((F, K), -1.0, np.float32),
        top_pos=np.full((F, K), -1, np.int32), top_win=np.zeros((F, K, width), np.float32)), sh1)
    for b, tok in _batches(tokens, batch, mesh):
        state1 = step1(state1, lm_params, sae_m.params, tok, np.int32(b * batch * seq_len))
    s1 = jax.tree.map(np.asarray, state1)
    n_tok = n_ctx * seq_len
    say(f"pass 1 done ({n_tok} tokens)")

    # Pass 2: histograms and interval samples on [0, max].
    max_act = np.maximum(s1.top_val[:, 0], 0.0).astype(np.float32)
    step2, sh2 = make_pass2(graphdef, sae, mesh, config, seq_len, width)
    I, S = config.n_intervals, config.samples_per_interval  # noqa: E741
    state2 = jax.device_put(Pass2State(
        hist=np.zeros((F, config.hist_bins), np.int32), pri=np.full((F, I, S), -1.0, np.float32),
        pos=np.full((F, I, S), -1, np.int32), win=np.zeros((F, I, S, width), np.float32)), sh2)
    max_dev = jax.device_put(max_act, parallel.named_sharding(mesh, ("latent",)))
    root = jax.random.key(config.seed)
    for b, tok in _batches(tokens, batch, mesh):
        state2 = step2(state2, lm_params, sae_m.params, tok, np.int32(b * batch * seq_len),
                       max_dev, jax.random.fold_in(root, b))
    s2 = jax.tree.map(np.asarray, state2)
    say("pass 2 done")

    density = s1.count / n_tok
    mean_act = s1.act_sum / n_tok
    mean_active = np.where(s1.count > 0, s1.act_sum / np.maximum(s1.count, 1), 0.0)
    dead = np.flatnonzero(s1.count == 0)
    ul = config.ultralow_density or ultralow_threshold(density)
    ultralow = np.flatnonzero((density > 0) & (density < ul))
    dense = np.flatnonzero(density > config.dense_threshold)

    le = logits.feature_logit_effects(lm, sae, k=config.n_logit_tokens, fold_ln=config.fold_ln)
    say("logit effects done")

    abl = {}
    if config.ablation_contexts > 0:
        alive = np.flatnonzero(s1.count > 0)
        alive = alive[np.argsort(-density[alive], kind="stable")]
        if config.ablation_max_features is not None:
            alive = alive[:config.ablation_max_features]
        pairs = []
        for i in alive:
            rows = []
            for v, p in zip(s1.top_val[i], s1.top_pos[i], strict=True):
                r = int(p) // seq_len
                if v > 0 and r not in rows:
                    rows.append(r)
                if len(rows) == config.ablation_contexts:
                    break
            pairs += [(int(i), r) for r in rows]
        abl = ablation.ablation_summary(lm, sae, tokens, pairs, batch_size=batch, mesh=mesh)
        say(f"ablation done ({len(pairs)} feature-context pairs)")

    feats = []
    for i in range(F):
        kept = zip(s1.top_val[i], s1.top_pos[i], s1.top_win[i], strict=True)
        top = [_example(tokens, p, v, w, width, config.window_before) for v, p, w in kept if v > 0]
        intervals = []
        for j in range(I):
            lo, hi = max_act[i] * j / I, max_act[i] * (j + 1) / I
            drawn = zip(s2.pri[i, j], s2.pos[i, j], s2.win[i, j], strict=True)
            ex = [_example(tokens, p, 0.0, w, width, config.window_before)
                  for pr, p, w in drawn if pr >= 0]
            for e in ex:  # the example's own activation is its window's value at the centre
                e["act"] = e["acts"][e["center"]]
            ex.sort(key=lambda e: -e["act"])
            intervals.append({"lo": _r(lo), "hi": _r(hi), "examples": ex})
        feats.append({
            "id": i, "density": _r(density[i]), "mean_act": _r(mean_act[i]),
            "max_act": _r(max_act[i]), "top": top, "intervals": intervals,
            "hist": {"lo": 0.0, "hi": _r(max_act[i]), "counts": s2.hist[i].tolist()},
            "logits": {side: [[int(t), _r(v)] for t, v in zip(le[f"{side}_ids"][i],
                                                               le[f"{side}_values"][i],
                                                               strict=True)]
                       for side in ("top", "bottom")},
            "ablation": abl.get(i),
        })

    if vocab is None and tokenizer is not None:
        vocab = token_strings(tokenizer, logits.unembedding(lm).shape[1])
    last_l0 = int(np.max(np.flatnonzero(s1.l0_hist))) if s1.l0_hist.any() else 0
    l0_values = np.arange(F + 1)
    return {
        "format": STATS_FORMAT,
        "meta": {"site": sae.site, "norm_scale": float(sae.norm_scale), "n_features": F,
                 "d_in": sae.config.d_in, "n_contexts": n_ctx, "seq_len": seq_len,
                 "n_tokens": n_tok,
                 "window": {"before": config.window_before, "after": config.window_after,
                            "width": width},
                 "top_k": K, "n_intervals": I,
                 "logit_mode": "fold_ln" if config.fold_ln else "direct",
                 "ultralow_threshold": ul, "dense_threshold": config.dense_threshold},
        "summary": {"alive": int(F - dead.size), "dead": int(dead.size),
                    "ultralow": int(ultralow.size), "dense": int(dense.size),
                    "mean_l0": float(np.sum(l0_values * s1.l0_hist) / n_tok)},
        "density": [float(x) for x in density],
        "mean_act": [_r(x) for x in mean_act],
        "mean_act_active": [_r(x) for x in mean_active],
        "max_act": [_r(x) for x in max_act],
        "dead": dead.tolist(), "ultralow": ultralow.tolist(), "dense": dense.tolist(),
        "l0_hist": s1.l0_hist[:last_l0 + 1].tolist(),
        "vocab": vocab,
        "features": feats,
    }


def save_stats(stats: dict[str, Any], path: str) -> None:
    """Writes ``stats`` as strict JSON (no NaN) atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f, allow_nan=False, separators=(",", ":"))
    os.replace(tmp, path)


def load_stats(path: str) -> dict[str, Any]:
    with open(path) as f:
        stats = json.load(f)
    if stats.get("format") != STATS_FORMAT:
        raise ValueError(f"{path!r}: unsupported feature-stats format {stats.get('format')!r}")
    return stats
