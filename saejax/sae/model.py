"""SAE parameters, forward pass, loss and hand-written gradients (shared by all architectures).

    x_bar = x - b_dec                      pre-encoder bias tied to the decoder bias
    pre   = x_bar @ W_enc^T + b_enc        [B, F]
    f     = activation(pre)                architecture-specific (ReLU, TopK, ...)
    x_hat = f @ W_dec + b_dec              [B, D]
    loss  = mean_elements((x_hat - x)^2) + mean_batch(penalty(f))   [+ AuxK, see auxk.py]

Layout: ``W_enc`` and ``W_dec`` are both [F, D] (feature-major), so the latent axis is the
leading, sharded axis of both, the paper's "encoder row i" is ``W_enc[i]`` and its
"decoder column i" (dictionary vector i) is ``W_dec[i]``.

The backward pass is written out (``jax.vjp`` only for the activation and penalty) so a
step costs exactly five B x D x F matmuls: two forward, dW_dec, df, dW_enc. The gradient of
the tied bias through the encoder is sum_b(d_pre) @ W_enc, a vector-matrix product,
where autodiff would spend a sixth full matmul on d_x_bar.

On XLA:CPU, where the [B, F] intermediates live decides the matmul speed: a product that
contracts the *leading* axis of a big operand (f^T d_xhat and d_pre^T x_bar when they are
[B, F]) runs ~20% slower than one that contracts a trailing axis, and a transposed copy of
a [B, F] array costs ~17 ms at 4,096^2 (2-core CPU, jax 0.10: 122 vs 100 ms per matmul at
B = F = 4,096, D = 512). Architectures whose activation acts on each pre-activation alone
(``Architecture.feature_major``, e.g. ReLU) therefore run with feature-major [F, B]
intermediates, where all five products contract a trailing axis and only [F, D] / [D, B]
arrays (8 MB) are ever transposed; the others (TopK, whose top-k runs along features)
keep batch-major [B, F], where ``lax.top_k`` works on the trailing axis. Both layouts
compute the same numbers (tests check both against autodiff). These layout tricks (and the
optimization barriers that keep XLA from undoing them) are XLA:CPU-specific measurements,
so they apply only when jax's default backend is the CPU (:func:`cpu_layout`); GPU and TPU
compilers pick their own layouts for the plain batch-major program.

One definition of the loss: :func:`per_input_loss` (encode, decode, the architecture's
penalty) is what resampling evaluates and what autodiff differentiates;
:func:`forward_backward` is its fast hand-written gradient. :func:`check_backward`
compares the two for every architecture before its first train step is built, so a new
architecture whose activation or penalty breaks the hand-written backward fails at once.

Legend: B batch, D input width, F features.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from saejax.sae import auxk
from saejax.sae.config import SAEConfig
from saejax.sae.matmul import mm as _mm
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
    aux_loss: Float[Array, ""]
    f: Float[Array, "B F"]
    x_hat: Float[Array, "B D"]
    grads: SAEParams


def _kaiming_uniform(key: Array, shape: tuple[int, int], fan_in: int) -> Float[Array, "M N"]:
    # PyTorch nn.Linear default: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / jnp.sqrt(jnp.float32(fan_in))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def cpu_layout() -> bool:
    """True when the XLA:CPU layout tricks apply (jax's default backend is the CPU)."""
    return jax.default_backend() == "cpu"


def unit_rows(w: Float[Array, "F D"]) -> Float[Array, "F D"]:
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


def encode(params: SAEParams, x: Float[Array, "B D"], config: SAEConfig) -> Float[Array, "B F"]:
    """Feature activations f for inputs x."""
    arch = get_architecture(config.architecture)
    pre = _mm(x - params.b_dec, params.W_enc, config.precision, contract=(1, 1)) + params.b_enc
    return arch.activation(pre, config)


def decode(params: SAEParams, f: Float[Array, "B F"], config: SAEConfig) -> Float[Array, "B D"]:
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


def forward_backward(params: SAEParams, x: Float[Array, "B D"], config: SAEConfig,
                     feature_major: bool | None = None, stale: Int[Array, " F"] | None = None) -> Forward:
    """Loss, its parts and the exact gradient w.r.t. all parameters (five matmuls).

    Args:
      params: SAE parameters.
      x: a 2-D float32 batch.
      config: SAE config (architecture, precision, coefficients).
      feature_major: run with [F, B] intermediates (see the module docstring); None takes
        the architecture's ``feature_major`` on the CPU backend and batch-major [B, F]
        elsewhere. Both layouts give the same result.
      stale: per feature, steps since it last fired; with ``config.aux_k > 0`` the AuxK
        loss (over features with ``stale >= config.dead_window``) joins the loss and its
        gradient. It is skipped (a ``lax.cond``) while no feature is dead.

    Returns:
      A :class:`Forward` with batch-mean loss (including AuxK), MSE (mean over elements),
      penalty, AuxK loss, the features, the reconstruction and the raw (unprojected)
      gradients.
    """
    arch = get_architecture(config.architecture)
    if feature_major is None:
        feature_major = arch.feature_major and cpu_layout()
    p = config.precision
    b, d = x.shape
    # "_l" arrays are [F, B] when feature-major, else [B, F]; ``view`` gives their [B, F]
    # view (a transpose that XLA folds into the activation's and penalty's elementwise
    # ops and reductions). ``bax`` is their batch axis.
    view = (lambda z: z.T) if feature_major else (lambda z: z)  # noqa: E731
    bax = 1 if feature_major else 0

    def by_features(a: Float[Array, "B D"], w: Float[Array, "F D"]) -> Float[Array, "F B"] | Float[Array, "B F"]:
        """a @ w^T in the intermediates' layout (contracts D, the trailing axis of both)."""
        return _mm(w, a, p, contract=(1, 1)) if feature_major else _mm(a, w, p, contract=(1, 1))

    x_bar = x - params.b_dec
    b_enc_l = params.b_enc[:, None] if feature_major else params.b_enc
    pre_l = by_features(x_bar, params.W_enc) + b_enc_l                              # 1: x_bar W_enc^T
    f_l, act_vjp = jax.vjp(lambda z: view(arch.activation(view(z), config)), pre_l)
    if feature_major:
        # W_dec^T f_t, then back to [B, D]; the barriers keep XLA from folding either
        # transpose into the dot (which would contract f_t's leading axis again).
        barrier = jax.lax.optimization_barrier
        x_hat = barrier(_mm(barrier(params.W_dec.T), f_l, p)).T + params.b_dec      # 2
    else:
        x_hat = _mm(f_l, params.W_dec, p) + params.b_dec                            # 2
    err = x_hat - x
    mse = jnp.mean(jnp.square(err))
    d_xhat = err * (2.0 / (b * d))
    g_wdec = _mm(f_l, d_xhat, p, contract=(bax, 0))                                 # 3: f^T d_xhat
    d_f_l = by_features(d_xhat, params.W_dec)                                       # 4: d_xhat W_dec^T
    if arch.penalty is not None:
        pen, pen_vjp = jax.vjp(lambda z: arch.penalty(view(z), config), f_l)
        penalty = jnp.mean(pen)
        d_f_l = d_f_l + pen_vjp(jnp.full((b,), 1.0 / b, jnp.float32))[0]
    else:
        penalty = jnp.zeros((), jnp.float32)
    (d_pre_l,) = act_vjp(d_f_l)
    if feature_major:
        # Row sums as a matrix-vector product: a plain reduce over the trailing axis made
        # XLA:CPU transpose the whole [F, B] array first.
        g_benc = _mm(d_pre_l, jnp.ones((b, 1), jnp.float32), "f32")[:, 0]
    else:
        g_benc = jnp.sum(d_pre_l, axis=0)
    g_wenc = _mm(d_pre_l, x_bar, p, contract=(bax, 0))                              # 5: d_pre^T x_bar
    aux_loss = jnp.zeros((), jnp.float32)
    if config.aux_k > 0 and stale is not None:
        args = (params, x_bar, -err, stale)  # the residual x - x_hat
        aux = jax.lax.cond(jnp.any(stale >= config.dead_window), functools.partial(auxk.auxk, config=config),
                           functools.partial(auxk.no_auxk, config=config), *args)
        aux_loss = aux.loss
        g_wdec = g_wdec.at[aux.idx].add(aux.W_dec)
        g_wenc = g_wenc.at[aux.idx].add(aux.W_enc)
        g_benc = g_benc.at[aux.idx].add(aux.b_enc)
    # b_dec enters twice: + in x_hat, - in x_bar (whose gradient is d_pre @ W_enc).
    g_bdec = jnp.sum(d_xhat, axis=0) - jnp.dot(g_benc, params.W_enc, precision=jax.lax.Precision.HIGHEST)
    grads = SAEParams(W_enc=g_wenc, b_enc=g_benc, W_dec=g_wdec, b_dec=g_bdec)
    return Forward(loss=mse + penalty + aux_loss, mse=mse, penalty=penalty, aux_loss=aux_loss, f=view(f_l),
                   x_hat=x_hat, grads=grads)


def project_decoder_grad(grad_wdec: Float[Array, "F D"], w_dec: Float[Array, "F D"]) -> Float[Array, "F D"]:
    """Removes from each dictionary vector's gradient its component along that (unit) vector."""
    return grad_wdec - jnp.sum(grad_wdec * w_dec, axis=-1, keepdims=True) * w_dec


_CHECKED: set[tuple[str, bool]] = set()


def check_backward(config: SAEConfig, *, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Checks :func:`forward_backward` against ``jax.grad`` of :func:`per_input_loss`.

    Runs once per architecture (and layout) per process, on a small random float32 problem
    shaped like ``config`` (k, coefficients and the architecture kept; D 8, F >= 16,
    B 32), in the layout the train step will use. This keeps the one loss definition and
    its hand-written gradient from diverging for any registered architecture.

    Raises:
      RuntimeError: the loss or a gradient differs; the message names the architecture.
    """
    arch = get_architecture(config.architecture)
    feature_major = arch.feature_major and cpu_layout()
    if (arch.name, feature_major) in _CHECKED:
        return
    import dataclasses

    d, f = 8, max(16, 2 * config.k)
    # A penalty coefficient of 0 would leave the penalty's gradient unchecked for the
    # process (the check is cached per architecture): check with a live one.
    cfg = dataclasses.replace(config, d_in=d, n_features=f, precision="f32", aux_k=0,
                              l1_coefficient=config.l1_coefficient or 3e-2)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(32, d).astype(np.float32) + 0.5)
    params = init_params(jax.random.PRNGKey(1), cfg, jnp.full((d,), 0.1, jnp.float32))
    params = params.replace(b_enc=jnp.asarray(rng.randn(f).astype(np.float32) * 0.1))
    out = forward_backward(params, x, cfg, feature_major=feature_major)
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(per_input_loss(p, x, cfg)))(params)
    pairs = [("loss", out.loss, loss)] + [(k, getattr(out.grads, k), getattr(grads, k))
                                          for k in ("W_enc", "b_enc", "W_dec", "b_dec")]
    bad = []
    for name, got, want in pairs:
        got, want = np.asarray(got), np.asarray(want)
        if not np.allclose(got, want, rtol=rtol, atol=atol):
            bad.append(f"{name} (max abs difference {float(np.max(np.abs(got - want))):.3g})")
    if bad:
        raise RuntimeError(
            f"SAE architecture {arch.name!r}: the hand-written backward "
            f"(model.forward_backward, feature_major={feature_major}) disagrees with autodiff "
            f"of model.per_input_loss in {', '.join(bad)}; its activation or penalty breaks an "
            f"assumption of the shared backward")
    _CHECKED.add((arch.name, feature_major))
