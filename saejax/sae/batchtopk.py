"""BatchTopK SAE (Bussmann, Leask, Nanda 2024, arXiv 2412.06410).

Training: a = ReLU(pre); keep the B k largest entries of the whole [B, F] batch (B the
global batch: under jit the selection spans every device of the mesh, so a sharded step
keeps exactly what one device would), zero the rest. L0 averages k and varies per input.
No sparsity penalty; AuxK (``SAEConfig.aux_k``) as for TopK.

Inference: f = a 1[a > theta] with one scalar theta, so an exported BatchTopK is a JumpReLU
whose thresholds are all theta (:meth:`saejax.sae.bundle.SAEBundle.as_jumprelu`). The
sources disagree on how theta is tracked (FAMILIES.md section 2): dictionary_learning
starts it at -1 and, after 1,000 steps, sets it to the first batch's smallest kept
activation m and then theta <- 0.999 theta + 0.001 m; SAELens and Bussmann's Matryoshka
code start at 0 and use theta <- 0.99 theta + 0.01 m from the first step. saejax takes
dictionary_learning's first estimate (theta = m at the first step; no bias towards 0) and
SAELens' rate from the first step (``SAEConfig.threshold_ema``, 0.01). theta stays -1
(plain ReLU at inference, as in dictionary_learning) until the first training step. It is
stored in ``SAEParams.extra["threshold"]`` (float32, replicated), gets no gradient, and the
step sets it after each update.

Selecting B k of B F values: ``lax.top_k`` over the flattened batch costs ~220 ms at
B = F = 4,096, k = 32 on a 2-core CPU (the whole dense step: ~330 ms). Here each row's
top 2k values are candidates, the (B k)-th largest candidate is found by bisection on its
float32 bit pattern (non-negative floats order like their bits; 32 counting passes over
the [B, 2k] candidates), and the result is exact unless some row has all 2k candidates at
or above it. On LM activations some row does in nearly every batch (a few inputs have far
more than 2k active features), so those rows, up to B / 16 of them, then enter the
bisection whole (a [B / 16, F] gather; 32 passes over ~B 2k + B F / 16 values); only when
more rows overflow does the bisection run over the whole [B, F] batch (~0.3 s at
4,096 x 4,096 on 2 cores). The step reports the path as the metric ``threshold_path``
(0, 1 or 2; its window mean shows how often each ran). Ties at the threshold are all kept,
so "B k kept" is exact for float data without ties.

Legend: B batch, F features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from saejax.sae.registry import Architecture, ParamSpec, register_architecture


def nth_largest(a: Float[Array, "*N"], n) -> Float[Array, ""]:
    """The n-th largest entry of the non-negative array ``a`` (exact; ties counted; n >= 1)."""
    wide = a.dtype == jnp.float64  # float64 only in reference computations
    itype, nbits = (jnp.int64, 64) if wide else (jnp.int32, 32)
    bits = jnp.where(a > 0, jax.lax.bitcast_convert_type(a, itype), 0)

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(bits >= mid, dtype=itype) >= n
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    # Invariant: count(bits >= lo) >= n (lo = 0 counts everything), count(bits >= hi) < n.
    lo, _ = jax.lax.fori_loop(0, nbits, body, (jnp.zeros((), itype), jnp.max(bits) + 1))
    return jax.lax.bitcast_convert_type(lo, a.dtype)


def batch_threshold(a: Float[Array, "B F"], k, k_max: int, with_fallback: bool = False):
    """The (B k)-th largest entry of ``a`` >= 0 over the whole batch (see the module docstring).

    Returns t, or (t, path) with ``with_fallback``: path 0 = the candidates sufficed, 1 = the
    rows that could overflow were read whole, 2 = the whole batch was bisected. Counts are
    int32: B F must stay below 2^31 (the train step checks it on the host).
    """
    b, f = a.shape
    n = b * k
    rows = min(f, 2 * k_max)
    if rows >= f:
        t = nth_largest(a, n)
        return (t, jnp.zeros((), jnp.int32)) if with_fallback else t
    cand = jax.lax.top_k(a, rows)[0]                                  # [B, 2k], per row
    t = nth_largest(cand, n)
    # A row whose smallest candidate is positive and >= t may hold more entries >= t than
    # its candidates (a row whose candidates include a 0 holds all its positive entries).
    row_min = jnp.min(cand, axis=-1)
    over = (row_min >= t) & (row_min > 0)
    n_over = jnp.sum(over, dtype=jnp.int32)
    r = min(b, max(1, b // 16))

    def whole_rows():
        # The r rows most likely to overflow (all overflowing ones, as n_over <= r) enter
        # whole instead of by their candidates. The result t2 >= t, so every other row
        # still has all its entries >= t2 among its candidates: t2 is exact.
        _, idx = jax.lax.top_k(jnp.where(over, row_min, -1.0), r)
        picked = jnp.zeros((b,), bool).at[idx].set(True)
        values = jnp.concatenate([jnp.where(picked[:, None], 0.0, cand).reshape(-1), a[idx].reshape(-1)])
        return nth_largest(values, n)

    path = jnp.where(n_over == 0, 0, jnp.where(n_over <= r, 1, 2)).astype(jnp.int32)
    t = jax.lax.switch(path, [lambda: t, whole_rows, lambda: nth_largest(a, n)])
    return (t, path) if with_fallback else t


def batchtopk_activation(pre: Float[Array, "B F"], side, ctx) -> tuple[Float[Array, "B F"], dict]:
    """Training: the B k largest of ReLU(pre) over the batch; inference: ReLU(pre) > theta."""
    a = jax.nn.relu(pre)
    if not ctx.train:
        return jnp.where(a > side["threshold"], a, 0.0), {}
    t, fallback = batch_threshold(jax.lax.stop_gradient(a), ctx.k, ctx.k_max, with_fallback=True)
    t = jax.lax.stop_gradient(t)
    f = jnp.where(a >= t, a, 0.0)
    # The smallest kept activation: t itself, unless fewer than B k entries are positive.
    smallest = jax.lax.cond(t > 0, lambda: t,
                            lambda: jnp.min(jnp.where(a > 0, jax.lax.stop_gradient(a), jnp.inf)))
    return f, {"kept_min": smallest, "path": fallback}


def update_threshold(extra, stats, ctx) -> dict:
    """theta = m at the first step (theta < 0 marks "not yet estimated"), then the EMA."""
    theta, m = extra["threshold"], stats["kept_min"]
    r = ctx.config.threshold_ema
    new = jnp.where(theta < 0, m, (1.0 - r) * theta + r * m)
    return {"threshold": jnp.where(jnp.isfinite(m), new, theta)}


def threshold_params(config) -> dict[str, ParamSpec]:
    del config
    return {"threshold": ParamSpec(per_feature=False, init=lambda c: -1.0, trained=False)}


BATCHTOPK = register_architecture(Architecture(
    name="batchtopk", activation=batchtopk_activation, penalty=None, supports_auxk=True,
    params=threshold_params, update_buffers=update_threshold, default_init="tied", uses_k=True,
    batch_wide=True))
