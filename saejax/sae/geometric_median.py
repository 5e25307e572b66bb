"""Geometric median by Weiszfeld iterations, for the decoder-bias initialisation.

Legend: S sample rows, D input width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


@functools.partial(jax.jit, static_argnames=("iters", "eps"))
def geometric_median(x: Float[Array, "S D"], iters: int = 100, eps: float = 1e-6,
                     tol: float = 1e-6) -> Float[Array, " D"]:
    """The point minimising the sum of Euclidean distances to the rows of ``x``.

    Weiszfeld: y <- sum_i w_i x_i / sum_i w_i with w_i = 1 / max(||x_i - y||, eps),
    started at the mean and stopped after ``iters`` steps or when y moves less than
    ``tol`` relative to its norm. The eps floor keeps a row that coincides with y finite.

    Args:
      x: sample of inputs (float32).
      iters: maximum number of iterations.
      eps: distance floor.
      tol: relative stopping tolerance.

    Returns:
      The geometric median, shape [D], float32.
    """
    x = x.astype(jnp.float32)

    def cond(carry):
        i, _, moved = carry
        return (i < iters) & (moved > tol)

    def body(carry):
        i, y, _ = carry
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - y, axis=-1), eps)
        y_new = (w @ x) / jnp.sum(w)
        moved = jnp.linalg.norm(y_new - y) / jnp.maximum(jnp.linalg.norm(y), eps)
        return i + 1, y_new, moved

    y0 = jnp.mean(x, axis=0)
    _, y, _ = jax.lax.while_loop(cond, body, (0, y0, jnp.float32(jnp.inf)))
    return y
