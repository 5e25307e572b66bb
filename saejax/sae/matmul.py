"""The one 2-D matmul of the SAE code, in its two precision modes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def mm(a: Float[Array, "M K"], b: Float[Array, "K N"], precision: str,
       contract: tuple[int, int] = (1, 0)) -> Float[Array, "M N"]:
    """Contracts axis ``contract[0]`` of ``a`` with axis ``contract[1]`` of ``b``.

    "f32": true f32 (HIGHEST, also on TPU/GPU; CPU is f32 anyway). "bf16": bf16 inputs,
    f32 accumulation and output.
    """
    if precision == "bf16":
        a, b, prec = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), jax.lax.Precision.DEFAULT
    else:
        prec = jax.lax.Precision.HIGHEST
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)
