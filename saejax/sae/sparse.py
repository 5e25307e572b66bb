"""The sparse TopK step: after the encoder, work on the k active features of each input only.

A dense TopK step costs five B x D x F matmuls although each input has only k non-zero
features. Here only the encoder stays dense (x_bar W_enc^T and the top-k); the rest runs on
the [B, k] values ``a`` and indices ``idx``:

    x_hat  = b_dec + sum_j a[:, j] W_dec[idx[:, j]]            k fused gather-multiply-adds
    d_a    = <d_xhat, W_dec[idx[:, j]]>  for each j             gather-dots, DOTS_CHUNK rows
                                                                at a time on the CPU
    d_pre  = d_a where a > 0 (TopK's gradient reaches the kept positive values only)
    dW_dec[idx[b, j]] += a[b, j] d_xhat[b]                        scatter-adds, in chunks of
    dW_enc[idx[b, j]] += d_pre[b, j] x_bar[b]                     CHUNK rows (the [CHUNK k, D]
    db_enc[idx[b, j]] += d_pre[b, j]                              update stays in cache)

The same loss and gradient as the dense path (:func:`saejax.sae.model.forward_backward`),
up to float summation order, with one difference on a measure-zero event: the dense path
keeps every entry tied with the k-th largest value, this one exactly k. Adam stays exact:
the gradient is dense [F, D] (zero rows where no input chose a feature), and the optimizer
is the same.

On XLA:CPU how it is written decides the speed (measured, 2-core AVX-512): the gathers
must not be fused into the top-k's consumers (an ``optimization_barrier`` after the top-k;
without it XLA recomputed the top-k inside the gathers' fusions, ~40x slower at
B = F = 4,096), the scatter-adds run as a ``lax.scan`` over row chunks (a single
scatter-add of the whole [B k, D] update was ~4x slower), and the gather-dots as a
``lax.map`` over blocks of DOTS_CHUNK rows (5x faster than over the whole batch).

Sharding: the kernel runs per device in ``shard_map``, on its rows of the batch ("data") and
its slice of the dictionary ("model"), with indices local to the slice. With the dictionary
split in M slices, each device takes the top k of its slice's pre-activations, the M k
candidates of each input are all-gathered over "model" and their top k is the global top k
(the top k of the union of the slices' top k; ties go to the lower index, as on one device).
Each device then decodes, and scatters gradients for, the winners its slice holds (the
others enter with coefficient 0); the partial reconstructions are summed over "model" and
the gradients over "data". What crosses "model" per step is [B, M k] candidates and one
[B, D] sum. Inside a ``shard_map`` that is already manual over some mesh axes (a sweep whose
members are spread over "model", :mod:`saejax.sae.sweep_step`), those axes hold whole
dictionaries: the kernel splits only over the axes still automatic.

BatchTopK and Matryoshka run on the same pieces with 2 k candidates per row and a few rows
taken whole (:mod:`saejax.sae.sparse_batch`). :func:`use_sparse` is the cost model that
picks the sparse step for ``SAEConfig.step_kernel = "auto"``.

Legend: B batch, D input width, F features, k active features per input.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Float, Int

from saejax import native, parallel
from saejax.sae import auxk, dead
from saejax.sae.matmul import mm as _mm

CHUNK = 128  # batch rows per scatter-add update (k * CHUNK * D floats: 8 MB at k 32, D 512)
# Batch rows per block of the gather-dots on the CPU. Measured (2-core AVX-512, B 4,096,
# F 4,096, k 32, D 512): 19 ms at 8 or 16 rows, 53 ms at 32 or 64, and 102 ms for the
# whole batch at once (the form kept on other backends).
DOTS_CHUNK = 16
# "auto" picks the sparse step when F >= RATIO * k: on XLA:CPU measured (benchmarks/
# RESULTS.md); on GPU and TPU a guess to be measured (the dense matmuls are much faster
# there relative to gathers).
RATIO = {"cpu": 32, "gpu": 128, "tpu": 256}
SPARSE_ARCHITECTURES = ("topk", "batchtopk", "matryoshka")


def supports(config, mesh: Mesh | None = None) -> str | None:
    """None if the sparse step can run ``config`` on ``mesh``, else why not (one line)."""
    if config.architecture not in SPARSE_ARCHITECTURES:
        return (f"architecture {config.architecture!r} has no sparse step (only "
                f"{', '.join(SPARSE_ARCHITECTURES)}: k active features per input or per batch)")
    del mesh  # every data x model mesh runs it
    return None


def use_sparse(config, mesh: Mesh | None = None, backend: str | None = None) -> bool:
    """The step kernel for ``config``: ``step_kernel`` "sparse" / "dense", or the cost model."""
    if config.step_kernel == "dense":
        return False
    if config.step_kernel == "sparse":
        return True
    if supports(config, mesh) is not None:
        return False
    backend = backend or jax.default_backend()
    k = max(config.k, config.k_anneal_start or 0)
    if config.architecture in ("batchtopk", "matryoshka"):
        # Their kernel works on 2 k candidates per row. Since it packs the kept entries
        # (sparse_batch.py), Matryoshka's per-group decodes no longer move the crossover:
        # on XLA:CPU at k 32 both are slower than dense at F 1,024 and faster at 2,048
        # (1.3x / 1.1x) and 4,096 (1.8x / 1.7x; benchmarks/RESULTS.md, 2026-12-03).
        k = 2 * k
    return config.n_features >= RATIO.get(backend, RATIO["gpu"]) * k


def _chunked_scatter(idx: Int[Array, "B k"], coef: Float[Array, "B k"], rows: Float[Array, "B D"],
                     n_features: int) -> Float[Array, "F D"]:
    """out[idx[b, j]] += coef[b, j] rows[b], as a scan over chunks of CHUNK rows."""
    b, k = idx.shape
    d = rows.shape[-1]
    ch = CHUNK if b % CHUNK == 0 else b
    n = b // ch

    def body(acc, c):
        i, a, r = c
        return acc.at[i.reshape(-1)].add((a[:, :, None] * r[:, None, :]).reshape(-1, d)), None

    acc, _ = jax.lax.scan(body, jnp.zeros((n_features, d), jnp.float32),
                          (idx.reshape(n, ch, k), coef.reshape(n, ch, k), rows.reshape(n, ch, d)))
    return acc


def _gather_rows(w: Float[Array, "F D"], idx: Int[Array, "B k"], coef: Float[Array, "B k"]) -> Float[Array, "B D"]:
    """sum_j coef[:, j] w[idx[:, j]] (a loop over k that XLA fuses into one pass)."""
    out = coef[:, 0, None] * w[idx[:, 0]]
    for j in range(1, idx.shape[1]):
        out = out + coef[:, j, None] * w[idx[:, j]]
    return out


def _gather_dots(w: Float[Array, "F D"], idx: Int[Array, "B k"], v: Float[Array, "B D"]) -> Float[Array, "B k"]:
    """<v[b], w[idx[b, j]]> for each j (float32 products and sums on every backend)."""
    b, k = idx.shape
    if jax.default_backend() != "cpu":
        return jnp.stack([jnp.sum(v * w[idx[:, j]], axis=-1) for j in range(k)], axis=1)
    ch = math.gcd(b, DOTS_CHUNK)

    def block(c):
        i, vv = c
        # One [rows, D] reduction per j, as in the whole-batch form: each (b, j) sums alike
        # whatever k is (a dot's or a [rows, k, D] reduction's order depends on k), so a
        # sweep group's top k_max gives its members' solo results bit for bit.
        return jnp.stack([jnp.sum(vv * w[i[:, j]], axis=-1) for j in range(k)], axis=1)

    return jax.lax.map(block, (idx.reshape(b // ch, ch, k), v.reshape(b // ch, ch, -1))).reshape(b, k)


def _select(pre: Float[Array, "B Fs"], k_max: int, model_axis: str | None):
    """The global top k_max of each row: (values, global indices, local indices, mine).

    ``pre`` is this device's slice of the dictionary (all of it when ``model_axis`` is None);
    ``mine`` marks the winners this slice holds (None: all), and their local indices are
    valid only there (0 elsewhere). The top-k is :func:`saejax.native.top_k` (``lax.top_k``'s
    result; 6x faster on XLA:CPU at [4096, 4096], k 32): the arrays here are local to the
    device, inside the kernel's ``shard_map`` or on one device.
    """
    f_local = pre.shape[1]
    # A slice narrower than k_max offers all of its features (M slices still hold F >= k).
    vals, idx = native.top_k(pre, min(k_max, f_local))
    if model_axis is None:
        return vals, idx, idx, None
    offset = jax.lax.axis_index(model_axis) * f_local
    cand_vals = jax.lax.all_gather(vals, model_axis, axis=1, tiled=True)          # [B, M k]
    cand_idx = jax.lax.all_gather(idx + offset, model_axis, axis=1, tiled=True)
    vals, pos = native.top_k(cand_vals, k_max)
    gidx = jnp.take_along_axis(cand_idx, pos, axis=1)
    local = gidx - offset
    mine = (local >= 0) & (local < f_local)
    return vals, gidx, jnp.where(mine, local, 0), mine


def _local(params, x: Float[Array, "B D"], k, k_max: int, precision: str, global_rows: int,
           axis: str | None, model_axis: str | None = None):
    """The kernel on one device's rows (and dictionary slice): gradients summed over ``axis``
    (None: one device), the reconstruction over ``model_axis`` (None: the dictionary whole)."""
    b, d = x.shape
    f = params.W_enc.shape[0]  # this device's slice
    x_bar = x - params.b_dec
    pre = _mm(x_bar, params.W_enc, precision, contract=(1, 1)) + params.b_enc        # the one matmul
    vals, idx, lidx, mine = _select(pre, k_max, model_axis)
    a = jax.nn.relu(vals)
    if not isinstance(k, int) or k != k_max:
        a = jnp.where(jnp.arange(k_max) < k, a, 0.0)  # k annealed: the first k of k_max
    a_mine = a if mine is None else jnp.where(mine, a, 0.0)  # coefficient 0: another slice's
    # Without the barrier XLA fuses the top-k into each of the k gathers' consumers.
    a, idx, a_mine, lidx = jax.lax.optimization_barrier((a, idx, a_mine, lidx))
    # bf16: the inputs of what the dense path's matmuls compute are rounded to bf16, as
    # there (their products are exact in f32, the sums f32).
    r = (lambda z: z.astype(jnp.bfloat16).astype(jnp.float32)) if precision == "bf16" else (lambda z: z)  # noqa: E731
    w_dec = r(params.W_dec)
    part = _gather_rows(w_dec, lidx, r(a_mine))
    if model_axis is not None:
        part = jax.lax.psum(part, model_axis)
    x_hat = params.b_dec + part
    err = x_hat - x
    d_xhat = jax.lax.optimization_barrier(err * (2.0 / (global_rows * d)))
    d_pre = jnp.where(a_mine > 0, _gather_dots(w_dec, lidx, r(d_xhat)), 0.0)
    g_wdec = _chunked_scatter(lidx, r(a_mine), r(d_xhat), f)
    g_wenc = _chunked_scatter(lidx, r(d_pre), r(x_bar), f)
    rows = jnp.zeros((f,), jnp.float32).at[lidx.reshape(-1)].add(d_pre.reshape(-1))
    sq = jnp.sum(jnp.square(err))
    sum_dxhat = jnp.sum(d_xhat, axis=0)
    if axis is not None:
        g_wdec, g_wenc, rows, sq, sum_dxhat = jax.lax.psum((g_wdec, g_wenc, rows, sq, sum_dxhat), axis)
    return a, idx, err, x_hat, sq, g_wdec, g_wenc, rows, sum_dxhat


def kernel_axes(mesh: Mesh | None):
    """None (run the kernel on the whole arrays), or (mesh, data axis, latent axis, extra
    shard_map arguments): the axes of ``mesh`` the kernel's ``shard_map`` splits (those an
    enclosing ``shard_map`` owns hold whole dictionaries and are left out)."""
    if mesh is None or mesh.size == 1:
        return None
    manual = set(jax.sharding.get_abstract_mesh().manual_axes)  # axes an enclosing shard_map owns
    data = parallel.logical_to_spec(("batch",))[0]
    latent = parallel.logical_to_spec(("latent",))[0]
    data = data if data is not None and data not in manual and mesh.shape[data] > 1 else None
    latent = latent if latent is not None and latent not in manual and mesh.shape[latent] > 1 else None
    if manual:
        if data is None and latent is None:
            return None
        mesh = jax.sharding.get_abstract_mesh()
    free = {"axis_names": set(mesh.axis_names) - manual} if manual else {}
    return mesh, data, latent, free


def param_specs(params, latent: str | None):
    """The kernel's in_specs for ``params``: per-feature arrays split over ``latent``."""
    per_feature = lambda v: v.ndim >= 1 and v.shape[0] == params.W_enc.shape[0]  # noqa: E731
    specs = jax.tree.map(lambda v: PartitionSpec(latent) if per_feature(v) else PartitionSpec(), params)
    return specs.replace(b_dec=PartitionSpec())  # [D], even where D equals F


def core(params, x: Float[Array, "B D"], k, k_max: int, precision: str, mesh: Mesh | None):
    """(a [B, k], idx [B, k], err, x_hat, sum of squared errors, dW_dec, dW_enc, db_enc via
    pre, sum of d_xhat): the sparse forward and backward of the reconstruction."""
    b = x.shape[0]
    axes = kernel_axes(mesh)
    if axes is None:
        return _local(params, x, k, k_max, precision, b, None)
    kmesh, data, latent, free = axes
    rows, rep = PartitionSpec(data, None), PartitionSpec()
    static_k = isinstance(k, int)

    def local(p, xx, *kk):
        return _local(p, xx, k if static_k else kk[0], k_max, precision, b, data, latent)

    args = (params, x) if static_k else (params, x, jnp.asarray(k, jnp.int32))
    in_specs = (param_specs(params, latent), rows) + (() if static_k else (rep,))
    sliced = PartitionSpec(latent)
    out_specs = (rows, rows, rows, rows, rep, sliced, sliced, sliced, rep)
    return jax.shard_map(local, mesh=kmesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False, **free)(*args)


def finish(params, x: Float[Array, "B D"], config, stale: Int[Array, " F"] | None, err, x_hat, sq,
           g_wdec, g_wenc, rows, sum_dxhat, recon=None, **fields):
    """The ``Forward`` of a sparse kernel's reconstruction terms: AuxK on the dense path's
    terms (while some feature is dead), b_dec's gradient, zero gradients for the extras.
    ``recon``: the reconstruction loss when it is not the MSE ``sq / (B D)`` (Matryoshka)."""
    from saejax.sae.model import Forward, SAEParams  # model imports this module
    b, d = x.shape
    mse = sq / (b * d)
    recon = mse if recon is None else recon
    aux_loss = jnp.zeros((), jnp.float32)
    if config.aux_k > 0 and stale is not None:
        args = (params, x - params.b_dec, -err, stale)
        aux = jax.lax.cond(jnp.any(dead.dead_mask(stale, config)), functools.partial(auxk.auxk, config=config),
                           functools.partial(auxk.no_auxk, config=config), *args)
        aux_loss = aux.loss
        g_wdec = g_wdec.at[aux.idx].add(aux.W_dec)
        g_wenc = g_wenc.at[aux.idx].add(aux.W_enc)
        rows = rows.at[aux.idx].add(aux.b_enc)
    g_bdec = sum_dxhat - jnp.dot(rows, params.W_enc, precision=jax.lax.Precision.HIGHEST)
    grads = SAEParams(W_enc=g_wenc, b_enc=rows, W_dec=g_wdec, b_dec=g_bdec,
                      extra={name: jnp.zeros_like(v) for name, v in params.extra.items()})
    zero = jnp.zeros((), jnp.float32)
    fields = {"stats": {}, **fields}
    return Forward(loss=recon + aux_loss, mse=mse, penalty=zero, aux_loss=aux_loss, f=None,
                   x_hat=x_hat, grads=grads, **fields)


def forward_backward(params, x: Float[Array, "B D"], config, stale: Int[Array, " F"] | None, ctx, mesh):
    """:func:`saejax.sae.model.forward_backward` on the k active features: for TopK the
    reconstruction through :func:`core` and a ``Forward`` whose features are ``active`` =
    (values, indices) [B, k]; BatchTopK in :mod:`saejax.sae.sparse_batch`."""
    if config.architecture in ("batchtopk", "matryoshka"):
        from saejax.sae import sparse_batch  # it builds on this module

        return sparse_batch.forward_backward(params, x, config, stale, ctx, mesh)
    a, idx, err, x_hat, sq, g_wdec, g_wenc, rows, sum_dxhat = core(
        params, x, ctx.k, ctx.k_max, config.precision, mesh)
    return finish(params, x, config, stale, err, x_hat, sq, g_wdec, g_wenc, rows, sum_dxhat, active=(a, idx))
