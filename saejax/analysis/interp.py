"""Automatic interpretability scores without an LLM: single-token explanations, held out.

For every unit (an SAE feature, or one of the LM's MLP neurons) we build an *explanation*
from one half of the held-out tokens and score how well it predicts where the unit fires
("fired" = activation > 0) on the other half. Halves are assigned by context (row of
tokens) by the caller: half 0 = fit ("explanation") half, half 1 = held-out half.

Method:

1. On device, while the analysis pass streams batches, :func:`update_tables` accumulates
   integer count tables (:class:`TokenTables`): per (half, token id) the number of tokens
   and, per unit, the number of those on which the unit fired; once keyed by the *current*
   token and once by the *preceding* token of the same context (position 0 has no
   preceding token and is not counted in the ``*_prev`` tables). It is a scatter-add on
   the row index ``half * V + token`` (cost ~R*F adds per batch), not a one-hot matmul
   (R*V*F FLOPs); the unit axis may be sharded like the activations' last axis.
2. On the host, :func:`score_units` (numpy, vectorised over units, in blocks of units):
   for each unit and each explanation kind ("token": the current token; "prev_token": the
   preceding token) it ranks tokens on half 0 by firing rate P(fire | token) = fire / tok
   (ties: more firings first, then lower id; tokens with no half-0 firing are never
   ranked), and takes as explanation E the prefix of that ranking (length 1..max_tokens)
   that maximises, on half 0, the F1 of the rule "the unit fires iff the token (or the
   preceding token) is in E". The kind with the higher half-0 F1 wins (ties: "token").
   Both kinds are judged on all tokens: a "prev_token" rule never flags position 0.
3. On half 1 (held out) it reports, for the chosen explanation: precision (the paper's
   "specificity": of the tokens the rule flags, the fraction where the unit fires; 0 when
   the rule flags no held-out token), recall ("sensitivity": of the tokens where the unit
   fires, the fraction flagged), their F1, and the AUROC of firing when every held-out
   token is scored by the half-0 firing rate of its token under the chosen kind (tokens
   unseen in half 0, and position 0 under "prev_token", score 0). The AUROC is exact
   (Mann-Whitney with ties counted one half), computed from the per-token counts.

Limits: explanations are single tokens (or single preceding tokens) only, so a unit that
tracks a longer context, a syntactic role or a meaning shared by many tokens scores low
even when a person (or an LLM) could explain it; scores are about *whether* a unit fires,
not how strongly; units that fire rarely get noisy scores, and units with fewer than
``min_firings`` firings (or fewer than ``min_firings`` non-firing tokens) in either half
are not scored at all (NaN scores, ``kind`` -1, record ``None``).

Legend: B contexts per batch, T sequence, R = B*T token rows (row r = b*T + t), V vocab,
F units, K = max_tokens, C units per host block.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax
import numpy as np
from jaxtyping import Array, Bool, Int

KINDS = ("token", "prev_token")
_CHUNK = 256  # rows per scatter step of update_tables (measured best on XLA:CPU)


class TokenTables(NamedTuple):
    """Per-(half, token) counts. Half 0 = fit half, 1 = held-out half."""

    fire_cur: Int[Array, "2 V F"]   # tokens with current token v on which the unit fired
    fire_prev: Int[Array, "2 V F"]  # same, keyed by the preceding token (t >= 1 only)
    tok_cur: Int[Array, "2 V"]      # tokens with current token v
    tok_prev: Int[Array, "2 V"]     # tokens whose preceding token is v (t >= 1 only)


def init_tables(vocab_size: int, n_units: int) -> TokenTables:
    """Zero tables (numpy int32; place them on the mesh as you like)."""
    v, f = vocab_size, n_units
    return TokenTables(np.zeros((2, v, f), np.int32), np.zeros((2, v, f), np.int32),
                       np.zeros((2, v), np.int32), np.zeros((2, v), np.int32))


def _row_keys(tokens: Int[Array, "B T"], half: Int[Array, " B"], two: int, v: int
              ) -> tuple[Int[Array, " R"], Int[Array, " R"]]:
    """Each token row's table row ``half * V + token`` for the current and the preceding
    token (2V = dropped: a token outside [0, V), a bad half, or position 0 for ``prev``)."""
    b, t = tokens.shape
    tokens = tokens.astype(jnp.int32)
    half = jnp.broadcast_to(half.astype(jnp.int32)[:, None], (b, t))
    ok = (tokens >= 0) & (tokens < v) & (half >= 0) & (half < two)
    cur = jnp.where(ok, half * v + tokens, two * v).reshape(-1)
    prev_ok = jnp.pad(ok[:, :-1], ((0, 0), (1, 0)))                      # position 0: False
    prev_tok = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    prev = jnp.where(prev_ok, half * v + prev_tok, two * v).reshape(-1)
    return cur, prev


def update_tables(tables: TokenTables, tokens: Int[Array, "B T"], fired: Bool[Array, "R F"],
                  half: Int[Array, " B"]) -> TokenTables:
    """Adds one batch to the tables (pure jnp; traceable by ``jax.jit``).

    Tokens outside [0, V) and position 0 (for the ``*_prev`` tables) are dropped.
    Int32 counts: good for < 2**31 tokens per (half, token).
    """
    two, v, f = tables.fire_cur.shape
    b, t = tokens.shape
    cur, prev = _row_keys(tokens, half, two, v)
    r = b * t
    c = min(_CHUNK, r)
    pad = -r % c                    # pad rows to a multiple of the chunk (index 2V: dropped)
    x = jnp.pad(fired.reshape(r, f), ((0, pad), (0, 0))).reshape(-1, c, f)
    cur_c = jnp.pad(cur, (0, pad), constant_values=two * v).reshape(-1, c)
    prev_c = jnp.pad(prev, (0, pad), constant_values=two * v).reshape(-1, c)

    def body(carry, xs):
        fc, fp = carry
        i_cur, i_prev, chunk = xs
        # The barrier keeps the int32 chunk a real (cache-sized) buffer: a convert fused
        # into the scatter is ~5x slower on XLA:CPU, as is one [R, F] int32 temporary.
        chunk = lax.optimization_barrier(chunk.astype(jnp.int32))
        return (fc.at[i_cur].add(chunk, mode="drop"), fp.at[i_prev].add(chunk, mode="drop")), None

    flat = (tables.fire_cur.reshape(two * v, f), tables.fire_prev.reshape(two * v, f))
    fc, fp = lax.scan(body, flat, (cur_c, prev_c, x))[0]
    ones = jnp.ones((r,), jnp.int32)
    tok_cur = tables.tok_cur.reshape(-1).at[cur].add(ones, mode="drop").reshape(two, v)
    tok_prev = tables.tok_prev.reshape(-1).at[prev].add(ones, mode="drop").reshape(two, v)
    return TokenTables(fc.reshape(two, v, f), fp.reshape(two, v, f), tok_cur, tok_prev)


def update_tables_events(tables: TokenTables, tokens: Int[Array, "B T"], rows: Int[Array, " E"],
                         units: Int[Array, " E"], fired: Bool[Array, " E"],
                         half: Int[Array, " B"]) -> TokenTables:
    """:func:`update_tables` from firing events: unit ``units[e]`` fired on token row
    ``rows[e]`` (a row of ``tokens`` flattened) where ``fired[e]``; one event per (row, unit).
    The same counts as :func:`update_tables` on the dense firing mask, at a cost in the events."""
    two, v, f = tables.fire_cur.shape
    b, t = tokens.shape
    cur, prev = _row_keys(tokens, half, two, v)
    units = units.astype(jnp.int32)
    drop = two * v * f
    i_cur = jnp.where(fired & (cur[rows] < two * v), cur[rows] * f + units, drop)
    i_prev = jnp.where(fired & (prev[rows] < two * v), prev[rows] * f + units, drop)
    ones = jnp.ones(rows.shape, jnp.int32)
    fc = tables.fire_cur.reshape(-1).at[i_cur].add(ones, mode="drop").reshape(two, v, f)
    fp = tables.fire_prev.reshape(-1).at[i_prev].add(ones, mode="drop").reshape(two, v, f)
    r = b * t
    ones_r = jnp.ones((r,), jnp.int32)
    tok_cur = tables.tok_cur.reshape(-1).at[cur].add(ones_r, mode="drop").reshape(two, v)
    tok_prev = tables.tok_prev.reshape(-1).at[prev].add(ones_r, mode="drop").reshape(two, v)
    return TokenTables(fc, fp, tok_cur, tok_prev)


def _top_tokens(fire: np.ndarray, tok: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``fire`` [C, V], the ``k`` best tokens by (rate desc, fire desc, id asc)
    among tokens with fire > 0, in that order; [C, k] int64 padded with -1.

    When every row has few tokens with fire > 0, they are first packed (in id order) into a
    narrow [C, w] array, so the selection below costs O(w) per unit instead of O(V).
    """
    mask = fire > 0
    nnz = mask.sum(1)
    w = max(int(nnz.max(initial=0)), k)
    if w > fire.shape[1] // 4:
        return _top_dense(fire, tok, k)
    r, ids = np.nonzero(mask)                                   # row-major: ids ascending
    packed = np.full((fire.shape[0], w), -1, np.int64)
    packed[r, np.arange(len(r)) - (np.cumsum(nnz) - nnz)[r]] = ids
    safe = np.maximum(packed, 0)
    sub = _top_dense(np.where(packed >= 0, np.take_along_axis(fire, safe, axis=1), 0),
                     tok[safe], k)
    return np.where(sub >= 0, np.take_along_axis(packed, np.maximum(sub, 0), axis=1), -1)


def _top_dense(fire: np.ndarray, tok: np.ndarray, k: int) -> np.ndarray:
    """:func:`_top_tokens` on all columns (``tok`` [V] or [C, V]; id = column).

    Exact top-k without a full sort: the top k by rate (argpartition) holds every token with
    a rate above the k-th rate; where more tokens tie at the k-th rate than there are places
    left, the top k of the tied tokens by (fire, -id) holds the rest; the union (<= 2k
    candidates) is then sorted exactly.
    """
    c, v = fire.shape
    k = min(k, v)
    rate = np.where(fire > 0, fire / np.maximum(tok, 1), -1.0)
    cand = np.argpartition(rate, v - k, axis=1)[:, v - k:]
    kth = np.take_along_axis(rate, cand[:, :1], axis=1)  # position v-k holds the k-th value
    crowded = np.nonzero((kth[:, 0] > 0) & ((rate >= kth).sum(1) > k))[0]
    if len(crowded):
        sub = rate[crowded]
        key2 = np.where(sub == kth[crowded], fire[crowded].astype(np.int64) * v
                        + (v - 1 - np.arange(v)), -1)
        extra = np.tile(cand, 2)
        extra[crowded, k:] = np.argpartition(key2, v - k, axis=1)[:, v - k:]
        cand = extra                                                      # [C, 2k]
    c_rate = np.take_along_axis(rate, cand, axis=1)
    c_fire = np.take_along_axis(fire, cand, axis=1)
    order = np.lexsort((cand, -c_fire, -c_rate), axis=1)
    cand = np.take_along_axis(cand, order, axis=1)
    c_rate = np.take_along_axis(c_rate, order, axis=1)
    dup = np.zeros_like(cand, dtype=bool)
    dup[:, 1:] = cand[:, 1:] == cand[:, :-1]                 # duplicates end up adjacent
    first = np.argsort(dup, axis=1, kind="stable")[:, :k]    # unique candidates, in order
    cand = np.take_along_axis(cand, first, axis=1)
    c_rate = np.take_along_axis(c_rate, first, axis=1)
    return np.where(c_rate > 0, cand, -1)


def _best_prefix(fire: np.ndarray, tok: np.ndarray, pos: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Half-0 explanation of one kind: tokens [C, k] (-1 padded) and its F1 [C] (-1 if none).

    ``pos`` [C] is the number of half-0 tokens where the unit fired (all positions).
    """
    top = _top_tokens(fire, tok, k)
    valid = top >= 0
    safe = np.maximum(top, 0)
    tp = np.cumsum(np.where(valid, np.take_along_axis(fire, safe, axis=1), 0), axis=1)
    flagged = np.cumsum(np.where(valid, tok[safe], 0), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(valid, 2.0 * tp / (flagged + pos[:, None]), -1.0)
    best = np.argmax(f1, axis=1)                             # first maximum: shortest prefix
    keep = np.arange(top.shape[1])[None, :] <= best[:, None]
    return np.where(keep, top, -1), np.take_along_axis(f1, best[:, None], axis=1)[:, 0]


def _auroc(score: np.ndarray, pos: np.ndarray, neg: np.ndarray, pos_all: np.ndarray,
           neg_all: np.ndarray) -> np.ndarray:
    """Exact AUROC per row: P(s+ > s-) + P(s+ = s-) / 2.

    Buckets with ``score`` [C, M] >= 0 hold ``pos`` positives and ``neg`` negatives; the
    remaining ``pos_all - pos.sum(1)`` positives and negatives score 0. Only the buckets with
    a positive score are sorted (at most the block's largest count of them), the rest are
    folded into one score-0 bucket: a tie group is a tie group however it is split.
    """
    c, m = score.shape
    nnz = (score > 0).sum(1)
    width = int(nnz.max(initial=0))
    if width <= m // 2:                              # pack the positive-score buckets
        r, ids = np.nonzero(score > 0)
        keep = np.zeros((c, width), np.int64)
        live = np.zeros((c, width), bool)
        at = np.arange(len(r)) - (np.cumsum(nnz) - nnz)[r]
        keep[r, at], live[r, at] = ids, True
        score, pos, neg = (np.where(live, np.take_along_axis(a, keep, axis=1), 0)
                           for a in (score, pos, neg))
    pos = np.concatenate([pos, (pos_all - pos.sum(1))[:, None]], axis=1).astype(np.float64)
    neg = np.concatenate([neg, (neg_all - neg.sum(1))[:, None]], axis=1).astype(np.float64)
    score = np.concatenate([score, np.zeros((c, 1))], axis=1)
    order = np.argsort(score, axis=1)
    s, p, n = (np.take_along_axis(a, order, axis=1) for a in (score, pos, neg))
    m = s.shape[1]
    cum0 = np.concatenate([np.zeros((c, 1)), np.cumsum(n, axis=1)], axis=1)  # sum n[<i]
    ar = np.arange(m)
    new = np.ones_like(s, dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    start = np.maximum.accumulate(np.where(new, ar, 0), axis=1)          # first index of tie
    last = np.ones_like(s, dtype=bool)
    last[:, :-1] = new[:, 1:]
    end = np.flip(np.minimum.accumulate(np.flip(np.where(last, ar, m), axis=1), axis=1), axis=1)
    below = np.take_along_axis(cum0, start, axis=1)
    upto = np.take_along_axis(cum0, end + 1, axis=1)
    u = np.sum(p * 0.5 * (below + upto), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return u / (p.sum(1) * n.sum(1))


def score_units(tables: TokenTables, *, max_tokens: int = 10, min_firings: int = 10,
                block: int | None = None) -> dict[str, np.ndarray]:
    """Explains and scores every unit from host (numpy) tables; see the module docstring.

    Args:
      tables: accumulated :class:`TokenTables`, as numpy (or array-like) on the host.
      max_tokens: longest explanation (K).
      min_firings: units with fewer firings, or fewer non-firing tokens, than this in
        either half are not scored (at least 1).
      block: units per host block (memory ~ 12 * 8 bytes * block * V); default ~2**23 / V.
        Units are processed in order of their number of fitted tokens, so a block of
        sparse units sorts only a few buckets per unit for the AUROC.

    Returns:
      numpy arrays of length F: ``kind`` int (0 token, 1 prev_token, -1 not scored),
      ``tokens`` [F, K] int (-1 padded), ``precision``, ``recall``, ``f1``, ``auroc`` (held
      out; NaN when not scored), ``fit_f1`` (half-0 F1 of the chosen explanation),
      ``firings_fit``, ``firings_heldout`` (firings per half, all positions).
    """
    fc, fp = np.asarray(tables.fire_cur), np.asarray(tables.fire_prev)
    tc = np.asarray(tables.tok_cur).astype(np.int64)
    tp = np.asarray(tables.tok_prev).astype(np.int64)
    _, v, f = fc.shape
    k = max_tokens
    block = block or max(1, (1 << 23) // max(v, 1))
    n_tok = tc.sum(1)                                                    # [2] tokens per half
    out = {"kind": np.full(f, -1, np.int64), "tokens": np.full((f, k), -1, np.int64)}
    for name in ("precision", "recall", "f1", "auroc", "fit_f1"):
        out[name] = np.full(f, np.nan)
    fired = fc.sum(1, dtype=np.int64)                                    # [2, F]
    out["firings_fit"], out["firings_heldout"] = fired[0], fired[1]
    need = max(int(min_firings), 1)
    ok = ((fired >= need) & (n_tok[:, None] - fired >= need)).all(0)
    units = np.nonzero(ok)[0]
    units = units[np.argsort(np.count_nonzero(fc[0][:, units], axis=0), kind="stable")]
    for lo in range(0, len(units), block):
        rows = units[lo:lo + block]
        fc0, fc1, fp0, fp1 = (np.ascontiguousarray(np.take(a[h], rows, axis=1).T)
                              for a in (fc, fp) for h in (0, 1))            # [C, V] int32
        pos0, pos1 = fired[0, rows], fired[1, rows]
        e_tok, f1_tok = _best_prefix(fc0, tc[0], pos0, k)
        e_prev, f1_prev = _best_prefix(fp0, tp[0], pos0, k)
        is_prev = f1_prev > f1_tok
        expl = np.where(is_prev[:, None], e_prev, e_tok)
        col = is_prev[:, None]
        fire0 = np.where(col, fp0, fc0)
        fire1 = np.where(col, fp1, fc1)
        tok0 = np.where(col, tp[0], tc[0])
        tok1 = np.where(col, tp[1], tc[1])
        flagged = expl >= 0
        safe = np.maximum(expl, 0)
        tp1 = np.where(flagged, np.take_along_axis(fire1, safe, axis=1), 0).sum(1)
        flag1 = np.where(flagged, np.take_along_axis(tok1, safe, axis=1), 0).sum(1)
        out["precision"][rows] = np.where(flag1 > 0, tp1 / np.maximum(flag1, 1), 0.0)
        out["recall"][rows] = tp1 / pos1
        out["f1"][rows] = 2.0 * tp1 / (flag1 + pos1)
        # Held-out AUROC over all tokens; position 0 under "prev_token" scores 0.
        out["auroc"][rows] = _auroc(fire0 / np.maximum(tok0, 1), fire1, tok1 - fire1,
                                    pos1, n_tok[1] - pos1)
        out["kind"][rows] = is_prev
        out["tokens"][rows] = expl
        out["fit_f1"][rows] = np.where(is_prev, f1_prev, f1_tok)
    return out


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{float(x):.{digits}g}")


def unit_records(scores: dict[str, Any]) -> list[dict[str, Any] | None]:
    """Per unit: ``{"kind", "tokens", "precision", "recall", "f1", "auroc"}`` (4 significant
    digits; JSON-serialisable) or ``None`` when the unit was not scored."""
    recs: list[dict[str, Any] | None] = []
    for i, kind in enumerate(np.asarray(scores["kind"])):
        vals = [scores[m][i] for m in ("precision", "recall", "f1", "auroc")]
        if kind < 0 or not all(math.isfinite(x) for x in vals):
            recs.append(None)
            continue
        toks = [int(t) for t in np.asarray(scores["tokens"][i]) if t >= 0]
        recs.append({"kind": KINDS[int(kind)], "tokens": toks,
                     **{m: _sig(x) for m, x in zip(("precision", "recall", "f1", "auroc"),
                                                   vals, strict=True)}})
    return recs


def summarize(scores: dict[str, Any]) -> dict[str, Any]:
    """Summary over scored units (JSON-serialisable; statistics are None if none scored)."""
    kind = np.asarray(scores["kind"])
    ok = (kind >= 0) & np.isfinite(np.asarray(scores["auroc"])) & np.isfinite(
        np.asarray(scores["f1"]))
    n = int(ok.sum())
    out: dict[str, Any] = {"n_units": int(kind.size), "n_scored": n,
                           "n_token": int((kind[ok] == 0).sum()),
                           "n_prev_token": int((kind[ok] == 1).sum())}

    def stat(fn, name):
        return _sig(fn(np.asarray(scores[name])[ok])) if n else None

    for name in ("auroc", "f1"):
        for q, label in ((25, "q25"), (50, "median"), (75, "q75")):
            out[f"{name}_{label}"] = stat(lambda a, q=q: np.percentile(a, q), name)
    out["precision_mean"] = stat(np.mean, "precision")
    out["recall_mean"] = stat(np.mean, "recall")
    out["frac_auroc_ge_0.9"] = stat(lambda a: np.mean(a >= 0.9), "auroc")
    return out
