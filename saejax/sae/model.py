"""SAE parameters, forward pass, loss and hand-written gradients (shared by all architectures).

    x_bar = x - b_dec                      pre-encoder bias tied to the decoder bias
    pre   = x_bar @ W_enc^T + b_enc        [B, F]
    f     = activation(pre)                architecture-specific (ReLU, TopK, ...)
    x_hat = f @ W_dec + b_dec              [B, D]
    loss  = mean_elements((x_hat - x)^2) + mean_batch(penalty(f))

Layout: ``W_enc`` and ``W_dec`` are both [F, D] (feature-major), so the latent axis is the
leading, sharded axis of both, the paper's "encoder row i" is ``W_enc[i]`` and its
"decoder column i" (dictionary vector i) is ``W_dec[i]``. This layout also picks the fast
XLA:CPU dot layouts: the two weight gradients come out as [F, D] = A^T B products, which
run at full matmul speed, while a [D, F] = A^T B output ran ~40% slower (2-core CPU,
jax 0.10: 82 vs 133 GFLOP/s at B = F = 4096, D = 512).

The backward pass is written out (``jax.vjp`` only for the activation and penalty) so a
step costs exactly five B x D x F matmuls: two forward, dW_dec, df, dW_enc. The gradient of
the tied bias through the encoder is sum_b(d_pre) @ W_enc, a vector-matrix product,
where autodiff would spend a sixth full matmul on d_x_bar.

Legend: B batch, D input width, F features.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from saejax.sae.config import SAEConfig
from saejax.sae.registry import get_architecture

_NORM_EPS = 1e-12


@flax.struct.dataclass
class SAEParams:
    """Dictionary parameters (always float32)."""

    W_enc: Float[Array, "F D"]
    b_enc: Float[Array, " F"]
    W_dec: Float[Array, "F D"]
    b_dec: Float[Array, " D"]


# Logical axis names of each parameter (parallel.py maps them to mesh axes).
PARAM_AXES = SAEParams(W_enc=("latent", "d_in"), b_enc=("latent",), W_dec=("latent", "d_in"),
                       b_dec=("d_in",))


class Forward(NamedTuple):
    """Everything the step needs from a forward + backward pass."""

    loss: Float[Array, ""]
    mse: Float[Array, ""]
    penalty: Float[Array, ""]
    f: Float[Array, "B F"]
    x_hat: Float[Array, "B D"]
    grads: SAEParams


def _kaiming_uniform(key: Array, shape: tuple[int, int], fan_in: int) -> Float[Array, "M N"]:
    # PyTorch nn.Linear default: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / jnp.sqrt(jnp.float32(fan_in))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def unit_rows(w: Float[Array, "F D"]) -> Float[Array, "M N"]:
    """Scales each row to unit L2 norm (rows of norm 0 stay 0)."""
    norm = jnp.linalg.norm(w, axis=-1, keepdims=True)
    return w / jnp.maximum(norm, _NORM_EPS)


def init_params(key: Array, config: SAEConfig, b_dec: Float[Array, " D"]) -> SAEParams:
    """Untied Kaiming-uniform encoder and decoder, unit-norm dictionary, zero encoder bias.

    Args:
      key: RNG key.
      config: SAE config (d_in, n_features).
      b_dec: decoder (and tied pre-encoder) bias, e.g. the geometric median of a sample.
    """
    d, f = config.d_in, config.n_features
    k_enc, k_dec = jax.random.split(key)
    # Encoder: a Linear D -> F (fan_in D); decoder: a Linear F -> D (fan_in F).
    w_enc = _kaiming_uniform(k_enc, (f, d), fan_in=d)
    w_dec = unit_rows(_kaiming_uniform(k_dec, (f, d), fan_in=f))
    return SAEParams(W_enc=w_enc, b_enc=jnp.zeros((f,), jnp.float32), W_dec=w_dec,
                     b_dec=jnp.asarray(b_dec, jnp.float32).reshape(d))


def _mm(a: Float[Array, "M K"], b: Float[Array, "K N"], precision: str,
        contract: tuple[int, int] = (1, 0)) -> Float[Array, "M N"]:
    """2-D matmul; "bf16" feeds bf16 inputs and accumulates in f32."""
    if precision == "bf16":
        a, b, prec = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), jax.lax.Precision.DEFAULT
    else:
        prec = jax.lax.Precision.HIGHEST  # true f32 on TPU/GPU too (CPU is f32 anyway)
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def encode(params: SAEParams, x: Float[Array, "B D"], config: SAEConfig) -> Float[Array, "M N"]:
    """Feature activations f for inputs x."""
    arch = get_architecture(config.architecture)
    pre = _mm(x - params.b_dec, params.W_enc, config.precision, contract=(1, 1)) + params.b_enc
    return arch.activation(pre, config)


def decode(params: SAEParams, f: Float[Array, "B F"], config: SAEConfig) -> Float[Array, "M N"]:
    """Reconstruction x_hat from features f."""
    return _mm(f, params.W_dec, config.precision) + params.b_dec


def per_input_loss(params: SAEParams, x: Float[Array, "B D"], config: SAEConfig) -> Float[Array, " B"]:
    """Loss of each input: mean over D of the squared error plus its sparsity penalty."""
    arch = get_architecture(config.architecture)
    f = encode(params, x, config)
    x_hat = decode(params, f, config)
    loss = jnp.mean(jnp.square(x_hat - x), axis=-1)
    if arch.penalty is not None:
        loss = loss + arch.penalty(f, config)
    return loss


def forward_backward(params: SAEParams, x: Float[Array, "B D"], config: SAEConfig) -> Forward:
    """Loss, its parts and the exact gradient w.r.t. all parameters (five matmuls).

    Args:
      params: SAE parameters.
      x: a 2-D float32 batch.
      config: SAE config (architecture, precision, coefficients).

    Returns:
      A :class:`Forward` with batch-mean loss, MSE (mean over elements), penalty, the
      features, the reconstruction and the raw (unprojected) gradients.
    """
    arch = get_architecture(config.architecture)
    p = config.precision
    b, d = x.shape
    x_bar = x - params.b_dec
    pre = _mm(x_bar, params.W_enc, p, contract=(1, 1)) + params.b_enc      # matmul 1: x_bar W_enc^T
    f, act_vjp = jax.vjp(lambda z: arch.activation(z, config), pre)
    x_hat = _mm(f, params.W_dec, p) + params.b_dec                          # matmul 2
    err = x_hat - x
    mse = jnp.mean(jnp.square(err))
    d_xhat = err * (2.0 / (b * d))
    g_wdec = _mm(f, d_xhat, p, contract=(0, 0))                             # matmul 3: f^T d_xhat
    d_f = _mm(d_xhat, params.W_dec, p, contract=(1, 1))                     # matmul 4: d_xhat W_dec^T
    if arch.penalty is not None:
        pen, pen_vjp = jax.vjp(lambda z: arch.penalty(z, config), f)
        penalty = jnp.mean(pen)
        d_f = d_f + pen_vjp(jnp.full((b,), 1.0 / b, jnp.float32))[0]
    else:
        penalty = jnp.zeros((), jnp.float32)
    (d_pre,) = act_vjp(d_f)
    g_benc = jnp.sum(d_pre, axis=0)
    g_wenc = _mm(d_pre, x_bar, p, contract=(0, 0))                          # matmul 5: d_pre^T x_bar
    # b_dec enters twice: + in x_hat, - in x_bar (whose gradient is d_pre @ W_enc).
    g_bdec = jnp.sum(d_xhat, axis=0) - jnp.dot(g_benc, params.W_enc, precision=jax.lax.Precision.HIGHEST)
    grads = SAEParams(W_enc=g_wenc, b_enc=g_benc, W_dec=g_wdec, b_dec=g_bdec)
    return Forward(loss=mse + penalty, mse=mse, penalty=penalty, f=f, x_hat=x_hat, grads=grads)


def project_decoder_grad(grad_wdec: Float[Array, "F D"], w_dec: Float[Array, "F D"]) -> Float[Array, "M N"]:
    """Removes from each dictionary vector's gradient its component along that (unit) vector."""
    return grad_wdec - jnp.sum(grad_wdec * w_dec, axis=-1, keepdims=True) * w_dec
