"""The sparse BatchTopK and Matryoshka step: the batch-wide selection of
:mod:`saejax.sae.batchtopk` on the k-sparse kernel of :mod:`saejax.sae.sparse`.

BatchTopK keeps the B k largest ReLU pre-activations of the whole batch, so an input keeps
anywhere between 0 and F features. Its exact threshold already comes from each row's top
W = 2 k candidates (:func:`saejax.sae.batchtopk.batch_threshold`); the step reuses them:

1. One dense encoder matmul; each row's top W of ReLU(pre) (merged over "model" slices as
   in the TopK kernel) are its candidates.
2. A row whose W-th candidate is positive and at or above the candidates' threshold may
   keep more than W features ("overflows"). The r = B / 16 rows most likely to (every
   overflowing row, as long as at most r do; the rest padding) are **dense rows**: they
   enter whole, as in ``batch_threshold``'s second path.
3. The threshold t is the (B k)-th largest of the other rows' candidates and the dense rows'
   entries (a bisection on float32 bit patterns whose counts are summed over the mesh), so
   t is the exact batch-wide threshold, equal to the dense step's.
4. The other rows keep their candidates >= t (all their entries >= t are candidates).
   The decode runs on these [B, W] values and indices as the TopK kernel's (entries below
   t enter with coefficient 0). The kept entries, k per row on average of the W, are then
   packed in row order (a cumulative sum) into [P, k] slots, P = :func:`packed_rows` (B
   k kept on average, a quarter more and 64 rows of slack), and the latent gradient's
   gather-dots and the decoder and encoder gradients' scatter-adds run on them only. The
   r dense rows run as [r, F] matmuls (four of them, 1/16 of the dense step's at
   r = B / 16).
5. When more than r rows overflow (on some data shard: r is per shard), or a shard keeps
   more entries than the P k slots hold (ties at t, or far more than its share), the step
   takes the dense path instead (``lax.cond``; the metric ``threshold_path`` = 2 says it
   happened, as on the dense path).

Matryoshka (:mod:`saejax.sae.matryoshka`: the same features, the loss averaged over G
nested prefixes) decodes each group separately (G gathers of the entries, each entry's
group from its global index; the dense rows' products masked by group, so group bounds
need not fall on "model" slice bounds), and each entry's upstream gradient is the sum of
the errors of the prefixes that contain it (the reverse cumulative sum over prefixes of the
dense path), gathered per entry in the gather-dots and the decoder gradient's scatter-add.

Same features, loss and gradients as the dense step (float summation order aside),
including ties at t (all kept, as there) and batches with fewer than B k positive
pre-activations (t = 0: every positive entry kept). Adam stays exact (dense moments).
The statistics the running inference threshold needs (the smallest kept activation) and
the per-feature firing counts come out of the kernel.

Legend: B batch, D input width, F features, k mean active features per input, W = 2 k
candidates per row, r dense rows, G Matryoshka groups.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Float, Int

from saejax.sae import dead
from saejax.sae import sparse as sp
from saejax.sae.matmul import mm as _mm


def width(k_max: int) -> int:
    """Candidates per row (``batch_threshold``'s 2 k)."""
    return 2 * k_max


def dense_rows(b: int) -> int:
    """Rows entering whole per data shard of ``b`` rows (``batch_threshold``'s B / 16)."""
    return min(b, max(1, b // 16))


def packed_rows(b: int) -> int:
    """Rows of k_max packed entries per data shard of ``b`` rows: room for the b k_max kept
    entries a shard holds on average, a quarter more and 64 rows of slack, in whole
    scatter chunks; never more than the 2 b rows all W b candidates fill."""
    r = -(-5 * b // 4) + 64
    if b >= sp.CHUNK:
        r = -(-r // sp.CHUNK) * sp.CHUNK
    return min(2 * b, r)


def _pack(keep: Array, arrays, rows: int, k: int):
    """The entries of the [b, W] ``arrays`` where ``keep``, in row order, packed into [rows,
    k] arrays (zeros after the last; entries past rows k are dropped), and how many there
    were. The gather-dots and scatter-adds then run on the kept entries only, not on every
    candidate (k kept per row on average of W = 2 k)."""
    m = keep.reshape(-1)
    pos = jnp.cumsum(m, dtype=jnp.int32) - 1
    dest = jnp.where(m, pos, rows * k)
    packed = [jnp.zeros((rows * k,), a.dtype).at[dest].set(a.reshape(-1), mode="drop").reshape(rows, k)
              for a in arrays]
    return packed, pos[-1] + 1


def _psum(v, axes: tuple[str, ...]):
    return jax.lax.psum(v, axes) if axes else v


def _nth_largest(parts, n, axes: tuple[str, ...]):
    """The n-th largest of the union of ``parts`` = [(values >= 0, axes their count sums
    over)]: a bisection on float32 bit patterns as :func:`saejax.sae.batchtopk.nth_largest`."""
    bits = [(jnp.where(v > 0, jax.lax.bitcast_convert_type(v, jnp.int32), 0), ax) for v, ax in parts]
    top = jnp.max(jnp.stack([jnp.max(b) for b, _ in bits]))
    top = jax.lax.pmax(top, axes) if axes else top

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        count = sum(_psum(jnp.sum(b >= mid, dtype=jnp.int32), ax) for b, ax in bits)
        ok = count >= n
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.zeros((), jnp.int32), top + 1))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def _gather_dots_by(w: Float[Array, "F D"], idx: Int[Array, "B W"], v: Float[Array, "N D"],
                    vidx: Int[Array, "B W"]) -> Float[Array, "B W"]:
    """<v[vidx[b, j]], w[idx[b, j]]> for each (b, j): the gather-dots of :mod:`sparse` with
    a vector chosen per entry (a Matryoshka entry's upstream gradient depends on its group)."""
    b, k = idx.shape
    ch = math.gcd(b, sp.DOTS_CHUNK) if jax.default_backend() == "cpu" else b

    def block(c):
        i, vi = c
        return jnp.stack([jnp.sum(v[vi[:, j]] * w[i[:, j]], axis=-1) for j in range(k)], axis=1)

    return jax.lax.map(block, (idx.reshape(b // ch, ch, k), vidx.reshape(b // ch, ch, k))).reshape(b, k)


def _scatter_by(idx: Int[Array, "B W"], coef: Float[Array, "B W"], v: Float[Array, "N D"],
                vidx: Int[Array, "B W"], n_features: int) -> Float[Array, "F D"]:
    """out[idx[b, j]] += coef[b, j] v[vidx[b, j]], in chunks of CHUNK rows (:mod:`sparse`)."""
    b, k = idx.shape
    d = v.shape[-1]
    ch = sp.CHUNK if b % sp.CHUNK == 0 else b
    n = b // ch

    def body(acc, c):
        i, a, vi = c
        return acc.at[i.reshape(-1)].add((a[:, :, None] * v[vi]).reshape(-1, d)), None

    acc, _ = jax.lax.scan(body, jnp.zeros((n_features, d), jnp.float32),
                          (idx.reshape(n, ch, k), coef.reshape(n, ch, k), vidx.reshape(n, ch, k)))
    return acc


def _local(params, x: Float[Array, "B D"], k, k_max: int, precision: str, global_rows: int,
           axis: str | None, model_axis: str | None = None, bounds=None):
    """The kernel on one device's rows (and dictionary slice); see the module docstring.
    ``bounds``: Matryoshka's groups [start, end) (None: BatchTopK, one group)."""
    b, d = x.shape
    f = params.W_enc.shape[0]  # this device's slice
    data_axes = (axis,) if axis else ()
    all_axes = data_axes + ((model_axis,) if model_axis else ())
    x_bar = x - params.b_dec
    pre = _mm(x_bar, params.W_enc, precision, contract=(1, 1)) + params.b_enc
    # The top W of pre: the same positive candidates as ReLU(pre)'s, in the same order, and
    # no pass over [b, F] for the ReLU (non-positive candidates are never kept).
    vals, gidx, lidx, mine = sp._select(pre, width(k_max), model_axis)  # [b, W], sorted
    vals = jax.nn.relu(vals)
    n = global_rows * k
    # Candidates are the same on every "model" slice: their counts sum over "data" only.
    t0 = _nth_largest([(vals, data_axes)], n, all_axes)
    row_min = jnp.min(vals, axis=-1)
    over = (row_min >= t0) & (row_min > 0)
    n_over = jnp.sum(over, dtype=jnp.int32)
    r = dense_rows(b)
    most = jax.lax.pmax(n_over, data_axes) if data_axes else n_over
    path = jnp.where(_psum(n_over, data_axes) == 0, 0, jnp.where(most <= r, 1, 2)).astype(jnp.int32)
    _, ridx = jax.lax.top_k(jnp.where(over, row_min, -1.0), r)              # the dense rows
    picked = jnp.zeros((b,), bool).at[ridx].set(True)
    a_r = jax.nn.relu(pre[ridx])                                           # [r, F slice]
    t = _nth_largest([(jnp.where(picked[:, None], 0.0, vals), data_axes), (a_r, all_axes)], n, all_axes)
    keep = (vals >= t) & (vals > 0) & ~picked[:, None]
    a_s = jnp.where(keep, vals, 0.0)
    f_r = jnp.where(a_r >= t, a_r, 0.0)
    # The smallest kept activation (the running threshold's statistic): t, unless fewer
    # than B k entries are positive; then the smallest positive one.
    pos_min = jnp.minimum(jnp.min(jnp.where(keep, vals, jnp.inf)), jnp.min(jnp.where(f_r > 0, f_r, jnp.inf)))
    pos_min = jax.lax.pmin(pos_min, all_axes) if all_axes else pos_min
    kept_min = jnp.where(t > 0, t, pos_min)
    a_mine = a_s if mine is None else jnp.where(mine, a_s, 0.0)
    n_groups = 1 if bounds is None else len(bounds)
    if n_groups > 1:
        # Each entry's group, from its global index.
        ends = jnp.asarray([e for _, e in bounds[:-1]], jnp.int32)
        grp = jnp.sum(gidx[..., None] >= ends, axis=-1, dtype=jnp.int32)                   # [b, W]
    # The kept entries this slice holds, packed for the gather-dots and scatter-adds: their
    # local feature, coefficient, row, and (Matryoshka) upstream-gradient row grp b + row.
    row_of = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], lidx.shape)
    cap = packed_rows(b)
    (p_fid, p_coef, p_row, *p_grp_row), n_kept = _pack(
        a_mine > 0, (lidx, a_mine, row_of) + (() if n_groups == 1 else (grp * b + row_of,)), cap, k_max)
    p_vrow = p_grp_row[0] if p_grp_row else p_row
    # More kept entries than the packed rows hold (ties, or a data shard with far more than
    # its share): the dense step, as when too many rows overflow.
    full = n_kept > cap * k_max
    full = jax.lax.pmax(full, all_axes) if all_axes else full
    path = jnp.where(full, 2, path)
    a_s, a_mine, lidx, gidx, f_r, p_fid, p_coef, p_row, p_vrow = jax.lax.optimization_barrier(
        (a_s, a_mine, lidx, gidx, f_r, p_fid, p_coef, p_row, p_vrow))
    r16 = (lambda z: z.astype(jnp.bfloat16).astype(jnp.float32)) if precision == "bf16" else (lambda z: z)  # noqa: E731
    w_dec = r16(params.W_dec)
    xb_r = x_bar[ridx]
    if n_groups == 1:
        part = sp._gather_rows(w_dec, lidx, r16(a_mine))
        part = part.at[ridx].add(_mm(f_r, params.W_dec, precision))
        if model_axis is not None:
            part = jax.lax.psum(part, model_axis)
        x_hat = params.b_dec + part
        err = x_hat - x
        d_xhat = jax.lax.optimization_barrier(err * (2.0 / (global_rows * d)))
        v = r16(d_xhat)
        d_pre_p = jnp.where(p_coef > 0, _gather_dots_by(w_dec, p_fid, v, p_vrow), 0.0)
        d_r = d_xhat[ridx]
        d_pre_r = jnp.where(f_r > 0, _mm(d_r, params.W_dec, precision, contract=(1, 1)), 0.0)
        g_wdec = _scatter_by(p_fid, r16(p_coef), v, p_vrow, f) + _mm(f_r, d_r, precision, contract=(0, 0))
        sum_dxhat = jnp.sum(d_xhat, axis=0)
        sq_prefixes = None
    else:
        # Each local feature's group, from the slice's.
        off = 0 if model_axis is None else jax.lax.axis_index(model_axis) * f
        grp_f = jnp.sum((off + jnp.arange(f))[:, None] >= ends, axis=-1, dtype=jnp.int32)  # [F slice]
        if model_axis is None:  # the dense rows' products on each group's columns only
            cols = [slice(s0, s1) for s0, s1 in bounds]
            in_group = None
        else:  # group bounds inside the slice are traced: whole-slice products, masked
            cols = [slice(None)] * n_groups
            in_group = [grp_f == g for g in range(n_groups)]

        def only(g, z):
            """Group g's columns of the [r, F slice] array z."""
            return z[:, cols[g]] if in_group is None else jnp.where(in_group[g], z, 0.0)

        # Group g's entries; the others point at row 0 with coefficient 0. Distinct indices
        # per group keep XLA from sharing the k gathers between the G decodes (it did, and
        # materialised each [b, D] gather: 5 decodes alone 636 ms vs 32 ms at F 16,384).
        parts = jnp.stack([
            sp._gather_rows(w_dec, jnp.where(grp == g, lidx, 0), r16(jnp.where(grp == g, a_mine, 0.0))).at[ridx].add(
                _mm(only(g, f_r), params.W_dec[cols[g]], precision))
            for g in range(n_groups)])                                                   # [G, b, D]
        if model_axis is not None:
            parts = jax.lax.psum(parts, model_axis)
        # Prefix g's reconstruction; the loss averages the G prefixes' mean squared errors,
        # so prefix g's error reaches the groups h <= g: group h's upstream gradient is the
        # sum over g >= h (as on the dense path).
        prefix = params.b_dec + jnp.cumsum(parts, axis=0)
        errs = prefix - x
        x_hat, err = prefix[-1], errs[-1]
        scale = 2.0 / (n_groups * global_rows * d)
        dcum = jax.lax.optimization_barrier(jnp.cumsum(errs[::-1], axis=0)[::-1] * scale)  # [G, b, D]
        d_r = dcum[:, ridx]
        flat = r16(dcum.reshape(n_groups * b, d))
        d_pre_p = jnp.where(p_coef > 0, _gather_dots_by(w_dec, p_fid, flat, p_vrow), 0.0)
        d_f_r = [_mm(d_r[g], params.W_dec[cols[g]], precision, contract=(1, 1)) for g in range(n_groups)]
        d_f_r = (jnp.concatenate(d_f_r, axis=1) if in_group is None
                 else sum(jnp.where(in_group[g], d_f_r[g], 0.0) for g in range(n_groups)))
        d_pre_r = jnp.where(f_r > 0, d_f_r, 0.0)
        g_wdec_r = [_mm(only(g, f_r), d_r[g], precision, contract=(0, 0)) for g in range(n_groups)]
        g_wdec = _scatter_by(p_fid, r16(p_coef), flat, p_vrow, f) + (
            jnp.concatenate(g_wdec_r, axis=0) if in_group is None else sum(g_wdec_r))
        sum_dxhat = jnp.sum(dcum[0], axis=0)
        sq_prefixes = jnp.sum(jnp.square(errs))
    g_wenc = _scatter_by(p_fid, r16(d_pre_p), r16(x_bar), p_row, f) + _mm(d_pre_r, xb_r, precision, contract=(0, 0))
    rows = jnp.zeros((f,), jnp.float32).at[p_fid.reshape(-1)].add(d_pre_p.reshape(-1)) + jnp.sum(d_pre_r, axis=0)
    counts = (jnp.zeros((f,), jnp.int32).at[p_fid.reshape(-1)].add((p_coef > 0).reshape(-1).astype(jnp.int32))
              + jnp.sum(f_r > 0, axis=0, dtype=jnp.int32))
    l1_r = jnp.sum(f_r, axis=-1)
    if model_axis is not None:
        l1_r = jax.lax.psum(l1_r, model_axis)
    l1_rows = jnp.sum(a_s, axis=-1).at[ridx].add(l1_r)
    sq = jnp.sum(jnp.square(err))
    sq_prefixes = sq if sq_prefixes is None else sq_prefixes
    if axis is not None:
        g_wdec, g_wenc, rows, counts, sq, sq_prefixes, sum_dxhat = jax.lax.psum(
            (g_wdec, g_wenc, rows, counts, sq, sq_prefixes, sum_dxhat), axis)
    recon = sq_prefixes / (n_groups * global_rows * d)
    return err, x_hat, l1_rows, sq, recon, g_wdec, g_wenc, rows, counts, sum_dxhat, kept_min, path


def core(params, x: Float[Array, "B D"], k, k_max: int, precision: str, mesh: Mesh | None, bounds=None):
    """(err, x_hat, per-row L1, sum of squared errors, reconstruction loss (Matryoshka: the
    prefixes' mean), dW_dec, dW_enc, db_enc via pre, firing counts, sum of d_xhat, smallest
    kept activation, threshold path)."""
    b = x.shape[0]
    axes = sp.kernel_axes(mesh)
    if axes is None:
        return _local(params, x, k, k_max, precision, b, None, None, bounds)
    kmesh, data, latent, free = axes
    rows, rep, sliced = PartitionSpec(data, None), PartitionSpec(), PartitionSpec(latent)
    static_k = isinstance(k, int)

    def local(p, xx, *kk):
        return _local(p, xx, k if static_k else kk[0], k_max, precision, b, data, latent, bounds)

    args = (params, x) if static_k else (params, x, jnp.asarray(k, jnp.int32))
    in_specs = (sp.param_specs(params, latent), rows) + (() if static_k else (rep,))
    out_specs = (rows, rows, PartitionSpec(data), rep, rep, sliced, sliced, sliced, sliced, rep, rep, rep)
    return jax.shard_map(local, mesh=kmesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False, **free)(*args)


def forward_backward(params, x: Float[Array, "B D"], config, stale, ctx, mesh):
    """:func:`saejax.sae.model.forward_backward` for BatchTopK and Matryoshka: :func:`core`, or the dense
    path when more rows overflow than the kernel takes whole (or the candidates would
    cover the dictionary). The ``Forward`` carries ``counts`` and ``l1_rows``, not ``f``."""
    from saejax.sae import model  # model imports this module's parent

    def dense(path=None):
        # The dense step's Forward in this one's form: counts and per-row L1 in place of f;
        # threshold path 2 when the kernel fell back (its packed entries may overflow where
        # the dense step's own threshold needs no fallback).
        out = model.forward_backward(params, x, config, stale=stale, ctx=ctx, sparse=False, mesh=mesh)
        stats = out.stats if path is None else {**out.stats, "path": path}
        return out._replace(f=None, counts=dead.firing_counts(out.f), l1_rows=jnp.sum(jnp.abs(out.f), axis=-1),
                            stats=stats)

    if width(ctx.k_max) >= config.n_features:
        return dense()
    bounds = tuple(model.group_bounds(config)) if config.architecture == "matryoshka" else None
    err, x_hat, l1_rows, sq, recon, g_wdec, g_wenc, rows, counts, sum_dxhat, kept_min, path = core(
        params, x, ctx.k, ctx.k_max, config.precision, mesh, bounds)
    out = sp.finish(params, x, config, stale, err, x_hat, sq, g_wdec, g_wenc, rows, sum_dxhat, recon=recon,
                    stats={"kept_min": kept_min, "path": path}, counts=counts, l1_rows=l1_rows)
    return jax.lax.cond(path == 2, lambda: dense(path), lambda: out)
