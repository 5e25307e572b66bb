"""Unit statistics (features of a dictionary, or a site's neurons) over millions of tokens:
density, activations, contexts, logits, ablation, interpretability scores, neighbours.

The device work is one jitted, sharded, streaming pass over N contexts
(:mod:`saejax.analysis.feature_passes`: density, sums, L0, a running top-K with context
windows, a uniform reservoir of firings for the histogram and the interval samples, the
token tables of the interpretability score, per-token active lists for co-activation),
whose state has a fixed size however many tokens stream through. Then, on the host: token
windows (ids; strings via ``vocab``), near-duplicate contexts dropped from the top lists,
logit effects (:mod:`saejax.analysis.logits`), the ablation effect on log-likelihood over
each unit's top contexts (:mod:`saejax.analysis.ablation`), the interpretability score
(:mod:`saejax.analysis.interp`), nearest units by decoder cosine and by co-activation,
silent / ultralow-density / dense lists.

Activations are in SAE units (:meth:`saejax.sae.bundle.SAEBundle.encode` applies the run's
input normaliser to the LM's activations).

The result is a plain dict of lists and numbers (JSON-serialisable, see
:func:`save_stats`); its layout is documented on :func:`compute_feature_stats`.

Legend: N contexts, T sequence, F features, K top examples, I intervals, S samples per
interval, W window tokens, H histogram bins, M reservoir samples.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from saejax import parallel
from saejax.analysis import ablation, logits, neighbours
from saejax.analysis.feature_passes import PassState, Ticker, run_pass
from saejax.analysis.stats_file import STATS_FORMAT, load_stats, save_stats  # noqa: F401 - re-exported
from saejax.config import MeshConfig, check, check_fraction, check_nonnegative, check_positive
from saejax.lm.model import lm_module, split_lm
from saejax.sae.bundle import SAEBundle

_FORMS = {"auto": None, "sparse": True, "dense": False}   # FeatureStatsConfig.pass_form


@dataclasses.dataclass(frozen=True)
class FeatureStatsConfig:
    """What :func:`compute_feature_stats` computes and how.

    Attributes:
      batch_size: contexts per jitted batch (a multiple of the mesh's data-parallel size);
        the last partial batch of the token array is dropped.
      top_k: top-activating examples kept per unit.
      n_intervals: equal-width activation intervals on (0, max] to sample from (paper ~11).
      samples_per_interval: random examples per interval (drawn from the reservoir).
      reservoir: uniformly drawn firings kept per unit (M); the activation histogram and the
        interval samples come from them. A batch offers each unit min(16, M) candidates, so
        the histogram is exact when the unit fired at most M times and never more than
        min(16, M) times in one batch; otherwise it is scaled to the firing count
        (``hist.estimated``), and high intervals of a dense unit may hold fewer samples
        than there are tokens in them (the top list shows the highest activations).
      dedup: keep 2 top_k candidates and drop near-duplicate contexts (same centre token and
        ``window_before`` tokens before it) from the top lists.
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
      dense_threshold: a unit denser than this is "dense" (the paper: 1%).
      seed: seeds the reservoir's priorities.
      interp: compute the automatic interpretability score (:mod:`saejax.analysis.interp`).
      interp_max_tokens: tokens an explanation may list.
      interp_min_firings: firings a unit needs in each half to be scored.
      interp_max_table_bytes: the score's tables take 16 V F bytes (device and host); above
        this it is skipped with a warning and ``meta.interp_skipped`` (GPT-2's V, 24,576 F: 20 GB).
      neighbours: nearest units kept per unit by decoder cosine and by co-activation
        (0 = skip both).
      coact_tokens: tokens (the first ones) whose active units are counted for
        co-activation.
      coact_max_active: active units read per token for co-activation (a token with more
        is counted as "truncated" in the meta).
      pass_form: "auto", "sparse" (each token's active features as events: a TopK
        dictionary's k, any other's largest up to a cap probed on the first batch) or
        "dense"; the same statistics. "auto" is sparse for TopK with k <= F / 8 only
        (:func:`saejax.analysis.feature_passes.use_sparse`).
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
    reservoir: int = 64
    dedup: bool = True
    interp: bool = True
    interp_max_tokens: int = 10
    interp_min_firings: int = 10
    interp_max_table_bytes: int = 4 * 2**30
    neighbours: int = 5
    coact_tokens: int = 131_072
    coact_max_active: int = 64
    pass_form: str = "auto"

    def __post_init__(self):
        for name in ("batch_size", "top_k", "n_intervals", "samples_per_interval", "hist_bins",
                     "n_logit_tokens", "reservoir", "interp_max_tokens", "coact_max_active"):
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
        check("analysis.pass_form", self.pass_form, self.pass_form in _FORMS,
              f"must be one of {sorted(_FORMS)}")
        for name in ("interp_min_firings", "neighbours", "coact_tokens"):
            check_nonnegative(f"analysis.{name}", getattr(self, name))


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
                          progress: Callable[[str], None] | None = None,
                          unit: str = "feature", show_progress: bool = False) -> dict[str, Any]:
    """Unit statistics of ``sae`` (a dictionary, or the site's neurons) on ``tokens``.

    Args:
      lm: the LM (``Transformer`` or ``(graphdef, params)``).
      sae: the dictionary (its site, input normaliser); for the site's neurons,
        :func:`saejax.analysis.neurons.neuron_bundle`.
      tokens: int [N, T] contexts (e.g. ``TokenStore.read("val", 0, N)``); the rows past
        the last whole batch are ignored, and so are the tokens past the LM's ``max_len``.
        Rows alternate between the two halves of the interpretability score (even rows
        build explanations, odd rows score them).
      config: what to compute.
      tokenizer: gives display strings for token ids (``vocab`` wins if both are given).
      vocab: display string per token id.
      mesh: device mesh (default: all devices over "data").
      progress: called with a short message after each stage (e.g. ``logging.info``).
      unit: "feature" or "neuron" (labels; neurons' neighbours by decoder cosine use their
        output weights in the residual stream).
      show_progress: draw a progress bar (tokens/s, ETA) on stderr during the pass.

    Returns:
      A JSON-serialisable dict::

        format, meta{site, unit, norm_scale, n_features, d_in, n_contexts, seq_len, n_tokens,
                     window{before, after, width}, top_k, n_intervals, reservoir,
                     logit_mode, ultralow_threshold, dense_threshold, pass_seconds,
                     tokens_per_second, pass_form (sparse | dense; see feature_passes),
                     pass_cap (events per token of the sparse form), pass_budget
                     (events kept per token on average; 0: all), compacted_batches,
                     dense_batches, coactivation{tokens, truncated} | None}
        summary{alive, silent, ultralow, dense, mean_l0, interp{...} | None}
        density[F], mean_act[F] (over all tokens), mean_act_active[F], max_act[F]
        silent[ids], ultralow[ids], dense[ids], l0_hist[counts by L0], vocab[strings] | None
        features[F]: {id, density, mean_act, max_act,
                      top[{row, pos, act, tokens[W], acts[W], center}],
                      intervals[{lo, hi, examples[...]}], hist{lo, hi, counts[H], estimated},
                      logits{top[[id, value]], bottom[[id, value]]},
                      ablation{delta_logp_all, delta_logp_active, contexts} | None,
                      interp{kind, tokens, precision, recall, f1, auroc} | None,
                      neighbours{decoder[[id, cosine]], coact[[id, jaccard]]} | None}

      "silent" = never fired on these tokens (not "dead", which is the training-window
      definition; see :mod:`saejax.analysis.report`). Activations are in SAE units;
      examples' ``row`` indexes ``tokens``, ``pos`` is the token's position, ``center`` its
      index in the window ``tokens``/``acts``. Top lists hold one example per local
      context (the centre token and ``window_before`` tokens before it): no near-duplicates.
    """
    say = progress or (lambda msg: logging.info("unit stats: %s", msg))
    check("unit", unit, unit in ("feature", "neuron"), "must be 'feature' or 'neuron'")
    mesh = mesh or parallel.make_mesh(MeshConfig())
    tokens = _whole_batches(lm, tokens, config, mesh)
    n_ctx, seq_len = tokens.shape
    width = min(config.window_before + 1 + config.window_after, seq_len)
    graphdef, lm_params = split_lm(lm)
    lm_params = jax.device_put(lm_params, parallel.replicated(mesh))
    n_vocab = logits.unembedding(lm).shape[1] if config.interp else 0
    table_bytes = 2 * 2 * n_vocab * sae.n_features * 4   # fire_cur + fire_prev, int32
    interp_skipped = None
    if table_bytes > config.interp_max_table_bytes:
        interp_skipped = (f"token tables of {table_bytes / 2**30:.1f} GiB ({n_vocab:,} tokens x "
                          f"{sae.n_features:,} units) exceed interp_max_table_bytes")
        logging.warning("unit stats: no interpretability score: %s", interp_skipped)
        n_vocab = 0
    n_top = min(2 * config.top_k if config.dedup else config.top_k, config.batch_size * seq_len)
    t0 = time.perf_counter()
    state, active = run_pass(
        graphdef, lm_params, sae.on_mesh(mesh), tokens, mesh, batch=config.batch_size, top=n_top,
        reservoir=config.reservoir, before=config.window_before, width=width, vocab=n_vocab,
        seed=config.seed, active_tokens=config.coact_tokens if config.neighbours else 0,
        n_active=config.coact_max_active, tick=Ticker(enabled=show_progress),
        sparse=_FORMS[config.pass_form], info=(pass_info := {}))
    secs = time.perf_counter() - t0
    n_tok = n_ctx * seq_len
    say(f"pass done ({n_tok:,} tokens in {secs:.1f} s, {n_tok / secs:,.0f} tokens/s)")

    density = state.count / n_tok
    tops = [_dedup_top(tokens, state, i, config, width) for i in range(sae.n_features)]
    le = logits.feature_logit_effects(lm, sae, k=config.n_logit_tokens, fold_ln=config.fold_ln)
    say("logit effects done")
    abl = {}
    if config.ablation_contexts > 0:
        pairs = _ablation_pairs(tops, density, config, seq_len)
        abl = ablation.ablation_summary(lm, sae, tokens, pairs, batch_size=config.batch_size,
                                        mesh=mesh)
        say(f"ablation done ({len(pairs)} unit-context pairs)")
    interp_recs, interp_summary = [None] * sae.n_features, None
    if n_vocab:
        from saejax.analysis import interp

        scores = interp.score_units(state.tables,
                                    max_tokens=config.interp_max_tokens,
                                    min_firings=config.interp_min_firings)
        interp_recs, interp_summary = interp.unit_records(scores), interp.summarize(scores)
        say("interpretability scores done")
    neigh, coact_info = [None] * sae.n_features, None
    if config.neighbours:
        neigh, coact_info = neighbours.unit_neighbours(lm, sae, active, config.neighbours,
                                                        unit)
        say("neighbours done")
    if vocab is None and tokenizer is not None:
        vocab = token_strings(tokenizer, logits.unembedding(lm).shape[1])
    feats = [_feature_record(i, tokens, tops[i], state, density, le, abl, config, width)
             | {"interp": interp_recs[i], "neighbours": neigh[i]}
             for i in range(sae.n_features)]
    stats = _assemble(sae, state, density, config, n_ctx, seq_len, width, vocab, feats)
    stats["meta"].update(unit=unit, reservoir=config.reservoir, pass_seconds=round(secs, 2),
                         tokens_per_second=round(n_tok / secs), coactivation=coact_info,
                         pass_form=pass_info["form"], pass_cap=pass_info["cap"],
                         pass_budget=pass_info["budget"],
                         compacted_batches=int(state.compacted),
                         dense_batches=int(state.dense_batches))
    stats["summary"]["interp"] = interp_summary
    stats["meta"]["interp_skipped"] = interp_skipped
    return stats


def _whole_batches(lm, tokens: np.ndarray, config: FeatureStatsConfig, mesh) -> np.ndarray:
    """The contexts that fill whole batches, cut to the LM's context; checks the config."""
    # Token stores pack max_len + 1 tokens per context (inputs and targets): keep what fits.
    tokens = np.asarray(tokens, np.int32)[:, :lm_module(lm).cfg.max_len]
    n_ctx, seq_len = tokens.shape
    batch = config.batch_size
    parallel.check_divisible("analysis.batch_size", batch, mesh, parallel.DATA)
    check("analysis.batch_size", batch, n_ctx // batch >= 1,
          f"must be <= the number of contexts given ({n_ctx})")
    for name in ("top_k", "reservoir"):
        check(f"analysis.{name}", getattr(config, name), getattr(config, name) <= batch * seq_len,
              f"must be <= tokens per batch ({batch * seq_len})")
    return tokens[:n_ctx // batch * batch]


def _dedup_top(tokens: np.ndarray, s: PassState, i: int, config: FeatureStatsConfig,
               width: int) -> list[tuple[float, int, np.ndarray]]:
    """Unit i's top examples (value, position, window), at most one per local context."""
    seen, out = set(), []
    seq_len = tokens.shape[1]
    for v, p, w in zip(s.top_val[i], s.top_pos[i], s.top_win[i], strict=True):
        if v <= 0:
            break
        row, t = divmod(int(p), seq_len)
        key = tuple(tokens[row, max(t - config.window_before, 0):t + 1].tolist())
        if config.dedup and key in seen:
            continue
        seen.add(key)
        out.append((float(v), int(p), w))
        if len(out) == config.top_k:
            break
    return out


def _ablation_pairs(tops: list, density: np.ndarray, config: FeatureStatsConfig,
                    seq_len: int) -> list[tuple[int, int]]:
    """(unit, context row) pairs: each alive unit's first distinct top contexts."""
    alive = np.flatnonzero([bool(t) for t in tops])
    alive = alive[np.argsort(-density[alive], kind="stable")]
    if config.ablation_max_features is not None:
        alive = alive[:config.ablation_max_features]
    pairs = []
    for i in alive:
        rows = []
        for _v, p, _w in tops[i]:
            if p // seq_len not in rows:
                rows.append(p // seq_len)
            if len(rows) == config.ablation_contexts:
                break
        pairs += [(int(i), r) for r in rows]
    return pairs


def _feature_record(i: int, tokens: np.ndarray, top: list, s: PassState, density: np.ndarray,
                    le: dict, abl: dict, config: FeatureStatsConfig, width: int
                    ) -> dict[str, Any]:
    """One unit's entry of ``stats["features"]``."""
    n_tok = tokens.size
    max_act = np.maximum(s.top_val[i, 0], np.float32(0.0))  # float32, like the pass
    ex_top = [_example(tokens, p, v, w, width, config.window_before) for v, p, w in top]
    # The reservoir: a uniform sample of the unit's firings (highest priority first).
    valid = s.res_pri[i] >= 0
    acts, pos, wins = s.res_act[i][valid], s.res_pos[i][valid], s.res_win[i][valid]
    n_int, n_bins = config.n_intervals, config.hist_bins
    rel = acts / max_act if max_act > 0 else acts
    ibin = np.clip(np.floor(rel * n_int).astype(np.int64), 0, n_int - 1)
    intervals = []
    for j in range(n_int):
        lo, hi = max_act * j / n_int, max_act * (j + 1) / n_int
        chosen = np.flatnonzero(ibin == j)[:config.samples_per_interval]
        ex = [_example(tokens, pos[c], acts[c], wins[c], width, config.window_before)
              for c in chosen]
        ex.sort(key=lambda e: -e["act"])
        intervals.append({"lo": _r(lo), "hi": _r(hi), "examples": ex})
    counts = np.bincount(np.clip(np.floor(rel * n_bins).astype(np.int64), 0, n_bins - 1),
                         minlength=n_bins)
    estimated = bool(s.count[i] > valid.sum())
    if estimated:  # scale the uniform sample's histogram to the unit's firing count
        counts = np.round(counts * (s.count[i] / valid.sum())).astype(np.int64)
    return {
        "id": i, "density": _r(density[i]), "mean_act": _r(s.act_sum[i] / n_tok),
        "max_act": _r(max_act), "top": ex_top, "intervals": intervals,
        "hist": {"lo": 0.0, "hi": _r(max_act), "counts": counts.tolist(),
                 "estimated": estimated},
        "logits": {side: [[int(t), _r(v)] for t, v in zip(le[f"{side}_ids"][i],
                                                           le[f"{side}_values"][i], strict=True)]
                   for side in ("top", "bottom")},
        "ablation": abl.get(i),
    }


def _assemble(sae: SAEBundle, s: PassState, density: np.ndarray, config: FeatureStatsConfig,
              n_ctx: int, seq_len: int, width: int, vocab, feats: list[dict]) -> dict[str, Any]:
    F, n_tok = sae.n_features, n_ctx * seq_len
    max_act = np.maximum(s.top_val[:, 0], 0.0).astype(np.float32)
    mean_active = np.where(s.count > 0, s.act_sum / np.maximum(s.count, 1), 0.0)
    silent = np.flatnonzero(s.count == 0)
    ul = config.ultralow_density or ultralow_threshold(density)
    ultralow = np.flatnonzero((density > 0) & (density < ul))
    dense = np.flatnonzero(density > config.dense_threshold)
    last_l0 = int(np.max(np.flatnonzero(s.l0_hist))) if s.l0_hist.any() else 0
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
        "summary": {"alive": int(F - silent.size), "silent": int(silent.size),
                    "ultralow": int(ultralow.size), "dense": int(dense.size),
                    "mean_l0": float(np.sum(np.arange(F + 1) * s.l0_hist) / n_tok)},
        "density": [float(x) for x in density],
        "mean_act": [_r(x) for x in s.act_sum / n_tok],
        "mean_act_active": [_r(x) for x in mean_active],
        "max_act": [_r(x) for x in max_act],
        "silent": silent.tolist(), "ultralow": ultralow.tolist(), "dense": dense.tolist(),
        "l0_hist": s.l0_hist[:last_l0 + 1].tolist(),
        "vocab": vocab,
        "features": feats,
    }
