"""Feature statistics over held-out tokens: density, activations, contexts, logits, ablation.

The device work is two jitted, sharded passes over the same N held-out contexts
(:mod:`saejax.analysis.feature_passes`: density, sums, L0, running top-K with context
windows; per-feature histograms and samples from ``n_intervals`` activation intervals).
Then, on the host: token windows (ids; strings via ``vocab``), logit effects
(:mod:`saejax.analysis.logits`), the ablation effect on log-likelihood over each feature's
top contexts (:mod:`saejax.analysis.ablation`), dead / ultralow-density / dense lists.

Activations are in SAE units (:meth:`saejax.sae.bundle.SAEBundle.encode` applies the run's
input normaliser to the LM's activations).

The result is a plain dict of lists and numbers (JSON-serialisable, see
:func:`save_stats`); its layout is documented on :func:`compute_feature_stats`.

Legend: N contexts, T sequence, F features, K top examples, I intervals, S samples per
interval, W window tokens, H histogram bins.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from saejax import parallel
from saejax.analysis import ablation, logits
from saejax.analysis.feature_passes import Pass1State, Pass2State, run_passes
from saejax.config import MeshConfig, check, check_fraction, check_nonnegative, check_positive
from saejax.lm.model import lm_module, split_lm
from saejax.sae.bundle import SAEBundle

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
      sae: the dictionary (its site, input normaliser).
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
    tokens = _whole_batches(lm, tokens, config, mesh)
    n_ctx, seq_len = tokens.shape
    width = min(config.window_before + 1 + config.window_after, seq_len)
    graphdef, lm_params = split_lm(lm)
    lm_params = jax.device_put(lm_params, parallel.replicated(mesh))
    s1, s2 = run_passes(graphdef, lm_params, sae.on_mesh(mesh), tokens, config, mesh, width)
    n_tok = n_ctx * seq_len
    say(f"passes done ({n_tok} tokens)")

    density = s1.count / n_tok
    le = logits.feature_logit_effects(lm, sae, k=config.n_logit_tokens, fold_ln=config.fold_ln)
    say("logit effects done")
    abl = {}
    if config.ablation_contexts > 0:
        pairs = _ablation_pairs(s1, density, config, seq_len)
        abl = ablation.ablation_summary(lm, sae, tokens, pairs, batch_size=config.batch_size,
                                        mesh=mesh)
        say(f"ablation done ({len(pairs)} feature-context pairs)")
    if vocab is None and tokenizer is not None:
        vocab = token_strings(tokenizer, logits.unembedding(lm).shape[1])
    feats = [_feature_record(i, tokens, s1, s2, density, le, abl, config, width)
             for i in range(sae.n_features)]
    return _assemble(sae, s1, density, config, n_ctx, seq_len, width, vocab, feats)


def _whole_batches(lm, tokens: np.ndarray, config: FeatureStatsConfig, mesh) -> np.ndarray:
    """The contexts that fill whole batches, cut to the LM's context; checks the config."""
    # Token stores pack max_len + 1 tokens per context (inputs and targets): keep what fits.
    tokens = np.asarray(tokens, np.int32)[:, :lm_module(lm).cfg.max_len]
    n_ctx, seq_len = tokens.shape
    batch = config.batch_size
    parallel.check_divisible("analysis.batch_size", batch, mesh, parallel.DATA)
    check("analysis.batch_size", batch, n_ctx // batch >= 1,
          f"must be <= the number of contexts given ({n_ctx})")
    check("analysis.top_k", config.top_k, config.top_k <= batch * seq_len,
          f"must be <= tokens per batch ({batch * seq_len})")
    check("analysis.samples_per_interval", config.samples_per_interval,
          config.samples_per_interval <= batch * seq_len,
          f"must be <= tokens per batch ({batch * seq_len})")
    return tokens[:n_ctx // batch * batch]


def _ablation_pairs(s1: Pass1State, density: np.ndarray, config: FeatureStatsConfig,
                    seq_len: int) -> list[tuple[int, int]]:
    """(feature, context row) pairs: each alive feature's first distinct top contexts."""
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
    return pairs


def _feature_record(i: int, tokens: np.ndarray, s1: Pass1State, s2: Pass2State,
                    density: np.ndarray, le: dict, abl: dict, config: FeatureStatsConfig,
                    width: int) -> dict[str, Any]:
    """One feature's entry of ``stats["features"]``."""
    n_tok = tokens.size
    max_act = np.maximum(s1.top_val[i, 0], np.float32(0.0))  # float32, like the pass
    kept = zip(s1.top_val[i], s1.top_pos[i], s1.top_win[i], strict=True)
    top = [_example(tokens, p, v, w, width, config.window_before) for v, p, w in kept if v > 0]
    intervals = []
    n_int = config.n_intervals
    for j in range(n_int):
        lo, hi = max_act * j / n_int, max_act * (j + 1) / n_int
        drawn = zip(s2.pri[i, j], s2.pos[i, j], s2.win[i, j], strict=True)
        ex = [_example(tokens, p, 0.0, w, width, config.window_before)
              for pr, p, w in drawn if pr >= 0]
        for e in ex:  # the example's own activation is its window's value at the centre
            e["act"] = e["acts"][e["center"]]
        ex.sort(key=lambda e: -e["act"])
        intervals.append({"lo": _r(lo), "hi": _r(hi), "examples": ex})
    return {
        "id": i, "density": _r(density[i]), "mean_act": _r(s1.act_sum[i] / n_tok),
        "max_act": _r(max_act), "top": top, "intervals": intervals,
        "hist": {"lo": 0.0, "hi": _r(max_act), "counts": s2.hist[i].tolist()},
        "logits": {side: [[int(t), _r(v)] for t, v in zip(le[f"{side}_ids"][i],
                                                           le[f"{side}_values"][i], strict=True)]
                   for side in ("top", "bottom")},
        "ablation": abl.get(i),
    }


def _assemble(sae: SAEBundle, s1: Pass1State, density: np.ndarray, config: FeatureStatsConfig,
              n_ctx: int, seq_len: int, width: int, vocab, feats: list[dict]) -> dict[str, Any]:
    F, n_tok = sae.n_features, n_ctx * seq_len
    max_act = np.maximum(s1.top_val[:, 0], 0.0).astype(np.float32)
    mean_active = np.where(s1.count > 0, s1.act_sum / np.maximum(s1.count, 1), 0.0)
    dead = np.flatnonzero(s1.count == 0)
    ul = config.ultralow_density or ultralow_threshold(density)
    ultralow = np.flatnonzero((density > 0) & (density < ul))
    dense = np.flatnonzero(density > config.dense_threshold)
    last_l0 = int(np.max(np.flatnonzero(s1.l0_hist))) if s1.l0_hist.any() else 0
    return {
        "format": STATS_FORMAT,
        "meta": {"site": sae.site, "norm_scale": float(sae.norm_scale), "n_features": F,
                 "d_in": sae.config.d_in, "n_contexts": n_ctx, "seq_len": seq_len,
                 "n_tokens": n_tok,
                 "window": {"before": config.window_before, "after": config.window_after,
                            "width": width},
                 "top_k": config.top_k, "n_intervals": config.n_intervals,
                 "logit_mode": "fold_ln" if config.fold_ln else "direct",
                 "ultralow_threshold": ul, "dense_threshold": config.dense_threshold},
        "summary": {"alive": int(F - dead.size), "dead": int(dead.size),
                    "ultralow": int(ultralow.size), "dense": int(dense.size),
                    "mean_l0": float(np.sum(np.arange(F + 1) * s1.l0_hist) / n_tok)},
        "density": [float(x) for x in density],
        "mean_act": [_r(x) for x in s1.act_sum / n_tok],
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
