"""The streaming, sharded pass behind the unit statistics (:mod:`saejax.analysis.features`).

One jitted step per batch of contexts (batch sharded over "batch", every per-unit state
sharded over "latent"; the state is donated, so device memory stays bounded however many
tokens stream through). Per batch of R token rows and F units it

* counts firings (density), sums activations and histograms the L0 of every token;
* keeps each unit's top-K2 activations with a running merge (``lax.top_k`` of the batch,
  concatenated with the kept K2, ``lax.top_k`` again) together with the unit's activations
  on a window of W tokens around each kept token (K2 > K leaves room to drop
  near-duplicate contexts on the host);
* keeps a **reservoir** of M uniformly drawn firings per unit: every token gets one
  uniform random priority (shared by all units), and each unit keeps the M highest
  priorities among the tokens where it fired. A batch offers each unit its C highest
  priorities (C = min(16, M): a top-C over [F, R] costs half a top-M), so the merged
  reservoir is exactly the top M over the whole stream, a uniform sample without
  replacement, unless more than C of those M fall in one batch (a unit whose firings crowd
  into a few batches; its sample is then stratified by batch). The host builds the
  activation histogram and the paper's interval samples from it once the maximum is known
  (so one pass suffices);
* accumulates the token tables of the interpretability score
  (:func:`saejax.analysis.interp.update_tables`): firings per (half, current token) and
  per (half, preceding token), exact counts; a context's half is its row's parity (even
  rows fit explanations, odd rows score them);
* optionally (the first batches only) returns each token's L largest activations, from
  which the host counts co-activations (:func:`saejax.analysis.neighbours.coactivation`).

Unit activations come from :meth:`saejax.sae.bundle.SAEBundle.encode` (SAE units; the
bundle applies the run's input normaliser); the neurons of a site are a bundle too
(:func:`saejax.analysis.neurons.neuron_bundle`).

**The sparse form** (chosen by :func:`use_sparse`): a TopK dictionary's token activates at
most k units, so a batch is E = R k firing events (unit, row, value) read off the encoder's
own top-k (:meth:`saejax.sae.bundle.SAEBundle.encode_sparse`). Any other dictionary (a
JumpReLU; BatchTopK and Matryoshka in their inference form, a JumpReLU with one threshold;
ReLU; Gated) activates a varying number: when asked for (``sparse=True``; the automatic
choice keeps such dictionaries dense, the capped form measured slower on XLA:CPU) its
events are each token's ``cap`` largest activations, the cap probed on the first batch
(:func:`probe_cap`: twice the most any token activates, rounded up to a power of two); the
firing events among them are compacted, in order, into a budget of R times 1.5 the mean
L0 (a cumsum), and a batch where a token activates more than the cap, or whose events
exceed the budget, runs the dense form on the same activations (``PassState.dense_batches``).
Counts, sums and the token tables become scatter-adds over E; each unit's top-K2 and reservoir candidates come from one
stable sort of the events by (unit, key) and a rank within the unit (:func:`_per_unit`),
instead of a top-k over R for each of the F units; once the lists fill, few events can
still enter them (those above a unit's K2-th value or M-th priority), and a batch with few
such events sorts only those. Windows are read from the dense [R, F] activations. It computes the same state as the dense form (tested), apart from float
summation order and, for TopK, exact ties at a token's k-th value.

Legend: B contexts per batch, T sequence, R = B*T token rows of a batch, F units, K2 top
candidates, M reservoir size, W window tokens, V vocabulary, L active units per token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from saejax import parallel
from saejax.analysis import interp
from saejax.lm.model import forward
from saejax.metrics import ProgressBar
from saejax.sae.bundle import SAEBundle


class PassState(NamedTuple):
    count: Int[Array, " F"]
    act_sum: Float[Array, " F"]
    l0_hist: Int[Array, " F1"]
    top_val: Float[Array, "F K2"]
    top_pos: Int[Array, "F K2"]
    top_win: Float[Array, "F K2 W"]
    res_pri: Float[Array, "F M"]
    res_pos: Int[Array, "F M"]
    res_act: Float[Array, "F M"]
    res_win: Float[Array, "F M W"]
    tables: interp.TokenTables    # the interpretability score's counts (V 0: none)
    compacted: Int[Array, ""]     # batches whose sparse selection ran on few events
    dense_batches: Int[Array, ""]  # capped sparse form: batches over the cap or the budget


def feature_fn(graphdef, site: str) -> Callable:
    """``(lm_params, sae, tokens [B, T]) -> f [B*T, F]`` (traceable, SAE units)."""

    def features(lm_params, sae: SAEBundle, tokens):
        (acts,) = forward(graphdef, lm_params, tokens, sites=(site,), logits=False).acts.values()
        return sae.encode(acts.reshape(-1, acts.shape[-1]))

    return features


def _windows(ft: Float[Array, "F R"], idx: Int[Array, "F K"], seq_len: int, width: int,
             before: int) -> Float[Array, "F K W"]:
    """Each unit's activations on the W-token window around its rows ``idx``.

    The window starts ``before`` tokens earlier, shifted to stay inside the context. Read
    from the unit-major ``ft``, where a window is W contiguous values.
    """
    t = idx % seq_len
    start = jnp.clip(t - before, 0, seq_len - width)
    rows = (idx - t + start)[..., None] + jnp.arange(width)
    flat = jnp.take_along_axis(ft, rows.reshape(rows.shape[0], -1), axis=1)
    return flat.reshape(rows.shape)


def _merge(vals, new_vals, *carried):
    """Keeps the K largest of ``vals`` ++ ``new_vals`` (last axis); ``carried`` are
    (old, new) pairs of arrays [F, K, ...] that follow the values."""
    k = vals.shape[-1]
    keep, sel = jax.lax.top_k(jnp.concatenate([vals, new_vals], axis=-1), k)
    out = []
    for old, new in carried:
        both = jnp.concatenate([old, new], axis=1)
        idx = sel.reshape(sel.shape + (1,) * (both.ndim - 2))
        out.append(jnp.take_along_axis(both, idx, axis=1))
    return keep, *out


def _windows_rows(f: Float[Array, "R F"], rows: Int[Array, "F K"], seq_len: int, width: int,
                  before: int) -> Float[Array, "F K W"]:
    """:func:`_windows` read from the row-major ``f`` (rows -1, empty slots, read row 0)."""
    n_units = f.shape[1]
    r = jnp.maximum(rows, 0)
    t = r % seq_len
    start = jnp.clip(t - before, 0, seq_len - width)
    win = (r - t + start)[..., None] + jnp.arange(width)
    return jnp.take(f.reshape(-1), win * n_units + jnp.arange(n_units)[:, None, None])


def _per_unit(units: Int[Array, " E"], keys: Float[Array, " E"], carried: tuple, n_units: int,
              k: int) -> tuple:
    """Per unit, its ``k`` events with the largest ``keys`` (ties: the earlier event, as
    ``lax.top_k`` over the unit's row). Event e belongs to unit ``units[e]``; ``n_units``
    marks an event to drop. Returns (keys [F, k], *carried [F, k]), -1 in the slots of a unit
    with fewer than k events. One stable sort of the E events, then a scatter."""
    e = units.shape[0]
    su, neg, *cs = jax.lax.sort((units, -keys, *carried), num_keys=2, is_stable=True)
    counts = jnp.zeros(n_units + 1, jnp.int32).at[units].add(1)
    starts = jnp.cumsum(counts) - counts
    rank = jnp.arange(e, dtype=jnp.int32) - starts[su]
    slot = jnp.where((rank < k) & (su < n_units), su * k + rank, n_units * k)

    def put(x):
        empty = jnp.full(n_units * k, -1, x.dtype)
        return empty.at[slot].set(x, mode="drop").reshape(n_units, k)

    return put(-neg), *(put(c) for c in cs)


def state_shardings(mesh) -> PassState:
    lat = {n: parallel.named_sharding(mesh, ("latent",) + (None,) * (n - 1)) for n in (1, 2, 3)}
    rep = parallel.replicated(mesh)
    last = parallel.named_sharding(mesh, (None, None, "latent"))
    return PassState(count=lat[1], act_sum=lat[1], l0_hist=rep, top_val=lat[2], top_pos=lat[2],
                     top_win=lat[3], res_pri=lat[2], res_pos=lat[2], res_act=lat[2],
                     res_win=lat[3], tables=interp.TokenTables(last, last, rep, rep),
                     compacted=rep, dense_batches=rep)


def init_state(n_units: int, top: int, reservoir: int, width: int, vocab: int) -> PassState:
    """The empty state (numpy; ``vocab`` 0 = no token tables)."""
    F = n_units
    return PassState(
        count=np.zeros(F, np.int32), act_sum=np.zeros(F, np.float32),
        l0_hist=np.zeros(F + 1, np.int32),
        top_val=np.full((F, top), -1.0, np.float32), top_pos=np.full((F, top), -1, np.int32),
        top_win=np.zeros((F, top, width), np.float32),
        res_pri=np.full((F, reservoir), -1.0, np.float32),
        res_pos=np.full((F, reservoir), -1, np.int32),
        res_act=np.zeros((F, reservoir), np.float32),
        res_win=np.zeros((F, reservoir, width), np.float32),
        tables=interp.init_tables(vocab, F), compacted=np.zeros((), np.int32),
        dense_batches=np.zeros((), np.int32))


def make_step(graphdef, site: str, mesh, *, top: int, reservoir: int, before: int, width: int,
              seq_len: int, vocab: int, n_active: int = 0, candidates: int = 16,
              sparse: bool = False, event_cap: int | None = None, cap: int = 0,
              budget: int = 0):
    """Jitted ``(state, lm_params, sae, tokens [B, T], row0, key) -> (state, active)``.

    ``row0`` is the global index of the batch's first context (token positions in the state
    are global: ``row * T + t``; the context's half for the token tables is ``row % 2``).
    ``active`` is None, or with ``n_active`` = L > 0 each token's L largest activations
    (values [R, L], unit ids [R, L]). The state is donated. ``sparse`` (a TopK dictionary
    only): select from the k active features of each token (E = R k events: sorts and
    scatters over E) instead of from the dense [R, F] activations (top-k over R for every
    unit); the same state up to float summation order and exact ties. Once a unit's lists
    are full only events above their minimum can enter them: a batch with at most
    ``event_cap`` such events (default E / 8) selects from those alone (``compacted`` counts
    these batches), others from all E.
    """
    features = feature_fn(graphdef, site)
    shardings = state_shardings(mesh)
    rep = parallel.replicated(mesh)

    def step(state: PassState, lm_params, sae, tokens, row0, key):
        return dense_body(state, features(lm_params, sae, tokens), tokens, row0, key)

    def dense_body(state: PassState, f, tokens, row0, key):
        ft = f.T                                        # [F, R]: top_k reduces the last axis
        fired = ft > 0
        n_fired = jnp.sum(f > 0, axis=0, dtype=jnp.int32)   # [R, F] reductions: contiguous
        l0 = jnp.sum(f > 0, axis=1, dtype=jnp.int32)
        offset = row0 * seq_len
        vals, idx = jax.lax.top_k(ft, top)
        top_val, top_pos, top_win = _merge(
            state.top_val, vals, (state.top_pos, idx + offset),
            (state.top_win, _windows(ft, idx, seq_len, width, before)))
        # Reservoir: the M highest shared priorities among the tokens where the unit fired.
        u = jax.random.uniform(key, (1, ft.shape[1]))
        pri, cidx = jax.lax.top_k(jnp.where(fired, u, -1.0), min(candidates, reservoir))
        cact = jnp.take_along_axis(ft, cidx, axis=1)
        res = _merge(state.res_pri, pri, (state.res_pos, cidx + offset), (state.res_act, cact),
                     (state.res_win, _windows(ft, cidx, seq_len, width, before)))
        tables = state.tables
        if vocab:
            half = (row0 + jnp.arange(tokens.shape[0])) % 2
            tables = interp.update_tables(tables, tokens, f > 0, half)
        new = PassState(count=state.count + n_fired, act_sum=state.act_sum + jnp.sum(f, axis=0),
                        l0_hist=state.l0_hist.at[l0].add(1), top_val=top_val, top_pos=top_pos,
                        top_win=top_win, res_pri=res[0], res_pos=res[1], res_act=res[2],
                        res_win=res[3], tables=tables, compacted=state.compacted,
                        dense_batches=state.dense_batches)
        active = None
        if n_active:
            active = tuple(jax.lax.top_k(f, n_active))
        return new, active

    def sparse_step(state: PassState, lm_params, sae, tokens, row0, key):
        (acts,) = forward(graphdef, lm_params, tokens, sites=(site,), logits=False).acts.values()
        x = acts.reshape(-1, acts.shape[-1])
        if sae.k_sparse:
            return sparse_body(state, *sae.encode_sparse(x), tokens, row0, key)  # [R, F], [R, k] x 2
        # Any other dictionary: each token's ``cap`` largest activations; a batch where some
        # token has more active units than that (or more than ``budget`` per token on
        # average, when the events are compacted) runs the dense body on the same f.
        f = sae.encode(x)
        vals, ids = jax.lax.top_k(f, cap)
        over = jnp.any(jnp.sum(f > 0, axis=1) > cap)
        if budget and budget < cap:
            over = over | (jnp.sum(vals > 0) > f.shape[0] * budget)

        def dense(_):
            new, active = dense_body(state, f, tokens, row0, key)
            return new._replace(dense_batches=new.dense_batches + 1), active

        return jax.lax.cond(over, dense, lambda _: sparse_body(state, f, vals, ids, tokens, row0, key,
                                                               pack_events=True), None)

    def sparse_body(state: PassState, f, vals, ids, tokens, row0, key, pack_events=False):
        n_rows, k = vals.shape
        n_units = f.shape[1]
        on = vals > 0
        units = jnp.where(on, ids, n_units).reshape(-1)         # E = R k events; F = dropped
        rows = jnp.broadcast_to(jnp.arange(n_rows, dtype=jnp.int32)[:, None], (n_rows, k)).reshape(-1)
        v = vals.reshape(-1)
        if pack_events and budget and budget < k:
            # The firing events first, in their order, into R budget slots (a cumsum, not a
            # sort; sparse_step checked that they fit): the selections below sort fewer.
            fire = units < n_units
            slot = jnp.where(fire, jnp.cumsum(fire) - 1, n_rows * budget)

            def pack(a, fill):
                return jnp.full((n_rows * budget,), fill, a.dtype).at[slot].set(a, mode="drop")

            units, rows, v = pack(units, n_units), pack(rows, 0), pack(v, 0.0)
        offset = row0 * seq_len
        n_fired = jnp.zeros(n_units + 1, jnp.int32).at[units].add(1)[:n_units]
        v_sum = jnp.zeros(n_units + 1, jnp.float32).at[units].add(v)[:n_units]
        l0 = jnp.sum(on, axis=1, dtype=jnp.int32)
        u = jax.random.uniform(key, (1, n_rows))    # the dense step's priorities, bit for bit
        p = u[0, rows]

        def select(units, v, rows, p):
            return (*_per_unit(units, v, (rows,), n_units, top),
                    *_per_unit(units, p, (rows, v), n_units, min(candidates, reservoir)))

        # Only events above a unit's current K2-th value or M-th priority can enter its lists
        # (ties keep the earlier entry), so when few are, select from those only.
        inf = jnp.full((1,), jnp.inf, jnp.float32)
        thr_top = jnp.concatenate([state.top_val[:, -1], inf])[units]
        thr_res = jnp.concatenate([state.res_pri[:, -1], inf])[units]
        keep = (v > thr_top) | (p > thr_res)
        n_events = units.shape[0]
        cap = max(1, n_events // 8 if event_cap is None else min(event_cap, n_events))
        compact = jnp.sum(keep) <= cap

        def few(_):
            idx = jax.lax.sort(jnp.where(keep, jnp.arange(n_events, dtype=jnp.int32), n_events))[:cap]

            def take(x, fill):
                return jnp.concatenate([x, jnp.full((1,), fill, x.dtype)])[idx]

            return select(take(units, n_units), take(v, 0.0), take(rows, 0), take(p, -1.0))

        sel = jax.lax.cond(compact, few, lambda _: select(units, v, rows, p), None)
        tv, trows, pri, crows, cact = sel
        top_val, top_pos, top_win = _merge(
            state.top_val, tv, (state.top_pos, jnp.where(trows >= 0, trows + offset, -1)),
            (state.top_win, _windows_rows(f, trows, seq_len, width, before)))
        res = _merge(state.res_pri, pri, (state.res_pos, jnp.where(crows >= 0, crows + offset, -1)),
                     (state.res_act, cact),
                     (state.res_win, _windows_rows(f, crows, seq_len, width, before)))
        tables = state.tables
        if vocab:
            half = (row0 + jnp.arange(tokens.shape[0])) % 2
            if 2 * vocab * n_units < 2**31:     # flat int32 indices into the [2, V, F] tables
                tables = interp.update_tables_events(tables, tokens, rows, units, units < n_units,
                                                     half)
            else:
                tables = interp.update_tables(tables, tokens, f > 0, half)
        new = PassState(count=state.count + n_fired, act_sum=state.act_sum + v_sum,
                        l0_hist=state.l0_hist.at[l0].add(1), top_val=top_val, top_pos=top_pos,
                        top_win=top_win, res_pri=res[0], res_pos=res[1], res_act=res[2],
                        res_win=res[3], tables=tables,
                        compacted=state.compacted + compact.astype(jnp.int32),
                        dense_batches=state.dense_batches)
        active = None
        if n_active:        # each token's n_active largest, as the dense step's top_k of f
            pad = max(n_active - k, 0)
            active = (jnp.pad(vals, ((0, 0), (0, pad)))[:, :n_active],
                      jnp.pad(ids, ((0, 0), (0, pad)))[:, :n_active])
        return new, active

    out = (shardings, None if not n_active else (rep, rep))
    return jax.jit(sparse_step if sparse else step, out_shardings=out, donate_argnums=0)


def use_sparse(sae: SAEBundle, sparse: bool | None = None) -> bool:
    """Whether the pass reads each token's active units as events instead of the dense
    activations: ``sparse`` if given, else for a TopK dictionary with k <= F / 8 (measured
    on XLA:CPU in benchmarks/RESULTS.md). Any other dictionary (JumpReLU, BatchTopK's and
    Matryoshka's threshold form, ReLU, Gated) runs the capped sparse form only when asked:
    measured on a BatchTopK dictionary it was slower than the dense form (RESULTS.md)."""
    if sparse is None:
        k = sae.k_sparse
        return bool(k) and 8 * k <= sae.n_features
    return sparse


def probe_cap(graphdef, site: str, lm_params, sae: SAEBundle, tokens) -> tuple[int, int]:
    """The capped sparse form's (cap, budget) from one batch ``tokens``: the cap is the
    smallest power of two >= twice the most units any token activates, the budget (events
    kept per token on average) the smallest >= 1.5 times the mean; both at least 8, at most
    F. A later batch over either runs the dense form (``PassState.dense_batches`` counts
    them): the same state."""
    features = feature_fn(graphdef, site)

    @jax.jit
    def l0_stats(p, s, t):
        l0 = jnp.sum(features(p, s, t) > 0, axis=1)
        return jnp.max(l0), jnp.mean(l0)

    def pow2(n):  # the smallest power of two >= n, within [8, F]
        return min(sae.n_features, max(8, 1 << (int(n) - 1).bit_length()))

    most, mean = l0_stats(lm_params, sae, tokens)
    cap = pow2(2 * int(most))
    return cap, min(cap, pow2(math.ceil(1.5 * float(mean))))


def batches(tokens: np.ndarray, batch: int, mesh) -> Iterator[tuple[int, jax.Array]]:
    """(first row, device batch) over the whole batches of ``tokens`` [N, T]."""
    sharding = parallel.named_sharding(mesh, ("batch", None))
    for b in range(tokens.shape[0] // batch):
        rows = tokens[b * batch:(b + 1) * batch]
        yield b * batch, jax.device_put(np.ascontiguousarray(rows, np.int32), sharding)


def run_pass(graphdef, lm_params, sae: SAEBundle, tokens: np.ndarray, mesh, *, batch: int,
             top: int, reservoir: int, before: int, width: int, vocab: int, seed: int,
             active_tokens: int = 0, n_active: int = 0,
             tick: Callable[[int, int], None] | None = None, sparse: bool | None = None,
             event_cap: int | None = None, cap: int | None = None, budget: int | None = None,
             info: dict | None = None
             ) -> tuple[PassState, list[tuple[np.ndarray, np.ndarray]]]:
    """The pass over ``tokens`` [N, T] (N a multiple of ``batch``); returns the host state
    and, for the first ``active_tokens`` tokens, each token's ``n_active`` largest
    activations as (values, ids) per batch. ``tick(tokens_done, tokens_total)`` is called
    after each batch. ``sae`` must already be placed on ``mesh``. ``sparse``: see
    :func:`use_sparse` (None = automatic); ``event_cap``: see :func:`make_step`; ``cap`` and
    ``budget``: the per-token cap and the events kept per token on average of a dictionary
    that is not TopK (None: :func:`probe_cap` on the first batch; a cap given alone keeps
    every event). ``info``, if given, receives "form" ("sparse" or "dense"), "cap" (the
    events per token of the sparse form, else 0) and "budget" (0: no compaction).
    """
    seq_len = tokens.shape[1]
    n_active = min(n_active, sae.n_features)
    sparse = use_sparse(sae, sparse)
    if sae.k_sparse or not sparse or tokens.shape[0] < batch:
        cap, budget = 0, 0
    elif cap is None:
        cap, probed = probe_cap(graphdef, sae.site, lm_params, sae, next(batches(tokens, batch, mesh))[1])
        budget = probed if budget is None else budget
    elif not 1 <= cap <= sae.n_features:
        raise ValueError(f"cap must be in [1, {sae.n_features}] (units per token), got {cap}")
    budget = budget or 0
    if budget and not 1 <= budget <= cap:
        raise ValueError(f"budget must be in [0, cap = {cap}] (events per token), got {budget}")
    if info is not None:
        info.update(form="sparse" if sparse else "dense", cap=(sae.k_sparse or cap) if sparse else 0,
                    budget=budget)
    kw = dict(top=top, reservoir=reservoir, before=before, width=width, seq_len=seq_len,
              vocab=vocab, sparse=sparse, event_cap=event_cap, cap=cap, budget=budget)
    step = make_step(graphdef, sae.site, mesh, **kw)
    step_active = make_step(graphdef, sae.site, mesh, n_active=n_active, **kw) if n_active else None
    state = jax.device_put(init_state(sae.n_features, top, reservoir, width, vocab),
                           state_shardings(mesh))
    root = jax.random.key(seed)
    total = tokens.shape[0] // batch * batch * seq_len
    active = []
    for row0, tok in batches(tokens, batch, mesh):
        key = jax.random.fold_in(root, row0)
        if step_active is not None and row0 * seq_len < active_tokens:
            state, (vals, ids) = step_active(state, lm_params, sae, tok, np.int32(row0), key)
            active.append((np.asarray(vals), np.asarray(ids)))
        else:
            state, _ = step(state, lm_params, sae, tok, np.int32(row0), key)
        if tick is not None:
            tick((row0 + batch) * seq_len, total)
    return jax.tree.map(np.asarray, state), active


class Ticker:
    """``tick(done, total)`` drawing a :class:`saejax.metrics.ProgressBar` with tokens/s."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar, self._t0 = enabled, None, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = ProgressBar(total)
        rate = done / max(time.perf_counter() - self._t0, 1e-9)
        self.bar.update(done, {"tok/s": rate}, force=done >= total)
        if done >= total:
            self.bar.close()
