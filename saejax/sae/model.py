"""SAE parameters, forward pass, loss and hand-written gradients (shared by all architectures).

    x_bar = x - b_dec                      pre-encoder bias tied to the decoder bias
    pre   = x_bar @ W_enc^T + b_enc        [B, F]
    f     = activation(pre, side, ctx)     architecture-specific (ReLU, TopK, JumpReLU, ...)
    x_hat = f @ W_dec + b_dec              [B, D]
    loss  = mean_elements((x_hat - x)^2) + mean_batch(penalty(pre, f, side, ctx))
            [+ AuxK, see auxk.py] [+ Gated's frozen-decoder term]
            (Matryoshka: the reconstruction term is the mean over nested prefixes)

``side`` holds the architecture's own parameters (``SAEParams.extra``), b_enc and, with a
free decoder, the decoder row norms; ``ctx`` is a :class:`Context`.

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
:func:`forward_backward` is its fast hand-written gradient. :func:`saejax.sae.gradcheck.check_backward`
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

from saejax.sae import auxk, schedule
from saejax.sae import sparse as _sparse
from saejax.sae.config import SAEConfig
from saejax.sae.dead import dead_mask
from saejax.sae.matmul import mm as _mm
from saejax.sae.registry import ParamSpec, get_architecture

_NORM_EPS = 1e-12


@flax.struct.dataclass
class SAEParams:
    """Dictionary parameters (always float32).

    ``extra`` holds the architecture's own parameters by name (:class:`ParamSpec`): per
    feature [F] (JumpReLU's threshold, Gated's r_mag and b_mag), or scalars (BatchTopK's
    running threshold); empty for ReLU and TopK.
    """

    W_enc: Float[Array, "F D"]
    b_enc: Float[Array, " F"]
    W_dec: Float[Array, "F D"]
    b_dec: Float[Array, " D"]
    extra: dict[str, Array] = flax.struct.field(default_factory=dict)


# Logical axis names of each parameter (parallel.py maps them to mesh axes); the
# architecture's extras are in :func:`param_axes`.
PARAM_AXES = SAEParams(W_enc=("latent", "d_in"), b_enc=("latent",), W_dec=("latent", "d_in"),
                       b_dec=("d_in",))


def param_specs(config: SAEConfig) -> dict[str, ParamSpec]:
    """The architecture's own parameters for ``config``, name -> :class:`ParamSpec`."""
    return dict(get_architecture(config.architecture).params(config))


def param_axes(config: SAEConfig) -> SAEParams:
    """Logical axes of every parameter of ``config``'s architecture (extras included)."""
    return PARAM_AXES.replace(extra={name: ("latent",) if spec.per_feature else ()
                                     for name, spec in param_specs(config).items()})


class Context(NamedTuple):
    """What an activation or penalty may depend on besides its inputs.

    Attributes:
      config: the SAE config.
      train: the training form (BatchTopK's batch-wide selection) or the inference form
        (its running threshold); static.
      sparsity: the sparsity-coefficient warm-up factor in [0, 1] (a traced scalar).
      k: the active features per input now (a traced int32 while k is annealed).
      k_max: a static upper bound of ``k`` (the size of the top-k that runs).
    """

    config: SAEConfig
    train: bool
    sparsity: Array | float
    k: Array | int
    k_max: int


def inference_context(config: SAEConfig) -> Context:
    """The inference form with the final k and the full sparsity coefficient."""
    return Context(config, False, 1.0, config.k, config.k)


def train_context(config: SAEConfig, step: Int[Array, ""] | None = None, anneal: bool = False,
                  k_max: int | None = None) -> Context:
    """The training form at ``step`` (schedules applied; None = none: full coefficient, final k).

    ``anneal`` selects the program that runs while k is annealed (a top-k of
    ``k_anneal_start`` masked to the current k); see :mod:`saejax.sae.schedule`. ``k_max``:
    a static bound of a traced ``config.k`` (a sweep group whose members differ in k runs a
    top-k of the largest and masks each member's down to its own; :mod:`saejax.sae.sweep_step`).
    """
    k_max = config.k if k_max is None else k_max
    if step is None:
        return Context(config, True, 1.0, config.k, k_max)
    sparsity = schedule.sparsity_factor(config, step)
    if anneal:
        return Context(config, True, sparsity, schedule.current_k(config, step), config.k_anneal_start)
    return Context(config, True, sparsity, config.k, k_max)


class Forward(NamedTuple):
    """Everything the step needs from a forward + backward pass."""

    loss: Float[Array, ""]
    mse: Float[Array, ""]
    penalty: Float[Array, ""]
    aux_loss: Float[Array, ""]
    f: Float[Array, "B F"]
    x_hat: Float[Array, "B D"]
    grads: SAEParams
    stats: dict[str, Array]
    # The sparse TopK step's features as (values, indices) [B, k]; then ``f`` is None.
    active: tuple[Array, Array] | None = None
    # Per feature, the inputs it fired on, and per input the sum of its features (the
    # sparse BatchTopK / Matryoshka step's, whose ``f`` and ``active`` are None; its dense
    # fallback's too, :mod:`saejax.sae.sparse_batch`).
    counts: Int[Array, " F"] | None = None
    l1_rows: Float[Array, " B"] | None = None


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


def init_extra(config: SAEConfig) -> dict[str, Array]:
    """The architecture's own parameters at their initial values."""
    f = config.n_features
    return {name: jnp.full((f,) if spec.per_feature else (), spec.init(config), jnp.float32)
            for name, spec in param_specs(config).items()}


def init_params(key: Array, config: SAEConfig, b_dec: Float[Array, " D"]) -> SAEParams:
    """Initial parameters; zero encoder bias, the architecture's extras at their init.

    ``config.init_scheme()``: "kaiming" = untied Kaiming-uniform encoder and decoder (as
    PyTorch's nn.Linear), unit-norm dictionary rows; "tied" = uniformly random decoder rows
    scaled to ``init_decoder_norm`` and W_enc = W_dec (in saejax's [F, D] layout, i.e.
    W_enc = W_dec^T of the papers' layout; Gemma Scope's He-uniform init, rescaled).

    Args:
      key: RNG key.
      config: SAE config (d_in, n_features, architecture, init).
      b_dec: decoder (and tied pre-encoder) bias, e.g. the geometric median of a sample.
    """
    d, f = config.d_in, config.n_features
    k_enc, k_dec = jax.random.split(key)
    if config.init_scheme() == "tied":
        w_dec = unit_rows(jax.random.uniform(k_dec, (f, d), jnp.float32, -1.0, 1.0)) * config.init_decoder_norm
        w_enc = jnp.array(w_dec, copy=True)  # its own buffer (the step donates both)
    else:
        # Encoder: a Linear D -> F (fan_in D); decoder: a Linear F -> D (fan_in F).
        w_enc = _kaiming_uniform(k_enc, (f, d), fan_in=d)
        w_dec = unit_rows(_kaiming_uniform(k_dec, (f, d), fan_in=f))
    return SAEParams(W_enc=w_enc, b_enc=jnp.zeros((f,), jnp.float32), W_dec=w_dec,
                     b_dec=jnp.asarray(b_dec, jnp.float32).reshape(d), extra=init_extra(config))


def _side(params: SAEParams, config: SAEConfig, dec_norm: Array | None = None) -> dict[str, Array]:
    """The activation's and penalty's inputs besides ``pre``: extras, b_enc, decoder norms."""
    side = dict(params.extra)
    side["b_enc"] = params.b_enc
    if config.decoder == "free":
        side["dec_norm"] = jnp.linalg.norm(params.W_dec, axis=-1) if dec_norm is None else dec_norm
    return side


def pre_activations(params: SAEParams, x: Float[Array, "B D"], config: SAEConfig) -> Float[Array, "B F"]:
    """(x - b_dec) W_enc^T + b_enc."""
    return _mm(x - params.b_dec, params.W_enc, config.precision, contract=(1, 1)) + params.b_enc


def encode(params: SAEParams, x: Float[Array, "B D"], config: SAEConfig,
           ctx: Context | None = None) -> Float[Array, "B F"]:
    """Feature activations f for inputs x (the inference form unless ``ctx`` says otherwise)."""
    arch = get_architecture(config.architecture)
    ctx = inference_context(config) if ctx is None else ctx
    return arch.activation(pre_activations(params, x, config), _side(params, config), ctx)[0]


def decode(params: SAEParams, f: Float[Array, "B F"], config: SAEConfig) -> Float[Array, "B D"]:
    """Reconstruction x_hat from features f (the whole dictionary)."""
    return _mm(f, params.W_dec, config.precision) + params.b_dec


def group_bounds(config: SAEConfig) -> list[tuple[int, int]]:
    """[start, end) of each Matryoshka group ([(0, F)] for other architectures)."""
    ends = np.cumsum(config.groups()).tolist()
    return list(zip([0] + ends[:-1], ends, strict=True))


def per_input_loss(params: SAEParams, x: Float[Array, "B D"], config: SAEConfig,
                   ctx: Context | None = None) -> Float[Array, " B"]:
    """The loss of each input; the one definition that autodiff checks the step against.

        reconstruction: mean over D of (x_hat - x)^2; with nested groups (Matryoshka) the
          mean over the G prefixes m_g of mean_D(x_hat^(g) - x)^2, x_hat^(g) = b_dec +
          sum_{i < m_g} f_i W_dec[i] (each prefix weighted 1/G, dictionary_learning's
          weighting up to its constant factor 1/G)
        + the architecture's penalty
        + (Gated) mean over D of (g W_dec + b_dec - x)^2 with W_dec and b_dec held fixed,
          g = the architecture's ``aux_recon``.

    ``ctx`` defaults to the training form without schedules (a batch-wide selection such as
    BatchTopK's then runs over ``x``).
    """
    arch = get_architecture(config.architecture)
    ctx = train_context(config) if ctx is None else ctx
    side = _side(params, config)
    pre = pre_activations(params, x, config)
    f, _ = arch.activation(pre, side, ctx)
    if arch.nested:
        recon = 0.0
        bounds = group_bounds(config)
        for _, end in bounds:
            x_hat = _mm(f[:, :end], params.W_dec[:end], config.precision) + params.b_dec
            recon = recon + jnp.mean(jnp.square(x_hat - x), axis=-1) / len(bounds)
    else:
        recon = jnp.mean(jnp.square(decode(params, f, config) - x), axis=-1)
    loss = recon
    if arch.penalty is not None:
        loss = loss + arch.penalty(pre, f, side, ctx)
    if arch.aux_recon is not None:
        g = arch.aux_recon(pre, side, ctx)
        r = _mm(g, jax.lax.stop_gradient(params.W_dec), config.precision) + jax.lax.stop_gradient(params.b_dec)
        loss = loss + jnp.mean(jnp.square(r - x), axis=-1)
    return loss


def forward_backward(params: SAEParams, x: Float[Array, "B D"], config: SAEConfig,
                     feature_major: bool | None = None, stale: Int[Array, " F"] | None = None,
                     ctx: Context | None = None, sparse: bool | None = None, mesh=None) -> Forward:
    """Loss, its parts and the exact gradient w.r.t. all parameters.

    Five B x D x F matmuls (Matryoshka: the decoder's three as per-group products of the
    same total size; Gated: two more for the auxiliary reconstruction).

    Args:
      params: SAE parameters.
      x: a 2-D float32 batch.
      config: SAE config (architecture, precision, coefficients).
      feature_major: run with [F, B] intermediates (see the module docstring); None takes
        the architecture's ``feature_major`` on the CPU backend and batch-major [B, F]
        elsewhere. Both layouts give the same result. Nested (Matryoshka) reconstructions
        always run batch-major.
      stale: per feature, steps since it last fired; with ``config.aux_k > 0`` the AuxK
        loss (over features with ``stale >= config.dead_window``) joins the loss and its
        gradient. It is skipped (a ``lax.cond``) while no feature is dead.
      ctx: the :class:`Context` (the step passes the scheduled one); None = the training
        form without schedules.
      sparse: run the sparse step (:mod:`saejax.sae.sparse`; TopK's features returned as
        ``Forward.active``, BatchTopK's and Matryoshka's as ``Forward.counts`` and
        ``Forward.l1_rows``, instead of ``f``); None = ``sparse.use_sparse(config, mesh)``.
      mesh: the mesh the step runs on (the sparse step runs per device in ``shard_map``).

    Returns:
      A :class:`Forward` with batch-mean loss (including AuxK and Gated's auxiliary
      reconstruction), MSE of the full reconstruction (mean over elements), penalty,
      auxiliary losses, the features, the full reconstruction, the raw (unprojected)
      gradients and the activation's statistics (for buffers such as BatchTopK's threshold).
    """
    arch = get_architecture(config.architecture)
    ctx = train_context(config) if ctx is None else ctx
    if sparse is None:
        sparse = _sparse.use_sparse(config, mesh)
    if sparse:
        return _sparse.forward_backward(params, x, config, stale, ctx, mesh)
    if feature_major is None:
        feature_major = arch.feature_major and cpu_layout()
    feature_major = feature_major and not arch.nested
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

    def decode_l(f_l: Array) -> Float[Array, "B D"]:
        if feature_major:
            # W_dec^T f_t, then back to [B, D]; the barriers keep XLA from folding either
            # transpose into the dot (which would contract f_t's leading axis again).
            barrier = jax.lax.optimization_barrier
            return barrier(_mm(barrier(params.W_dec.T), f_l, p)).T + params.b_dec
        return _mm(f_l, params.W_dec, p) + params.b_dec

    x_bar = x - params.b_dec
    b_enc_l = params.b_enc[:, None] if feature_major else params.b_enc
    pre_l = by_features(x_bar, params.W_enc) + b_enc_l                              # 1: x_bar W_enc^T
    dec_norm = jnp.linalg.norm(params.W_dec, axis=-1) if config.decoder == "free" else None
    side = _side(params, config, dec_norm)

    def _act(z, s):
        f, stats = arch.activation(z, s, ctx)
        return view(f), stats

    # The activation and the penalty are differentiated separately, as (f, pre) -> penalty
    # and pre -> f: one combined vjp made XLA:CPU fuse the ReLU step's [F, B] passes worse
    # (ReLU + L1 forward + backward 296 vs 247 ms at B = F = 4,096, D = 512).
    f_l, act_vjp, stats = jax.vjp(lambda z, s: _act(view(z), s), pre_l, side, has_aux=True)
    if arch.penalty is None:
        pen = jnp.zeros((b,), jnp.float32)
    else:
        pen, pen_vjp = jax.vjp(lambda z, f, s: arch.penalty(view(z), view(f), s, ctx), pre_l, f_l, side)
    penalty = jnp.mean(pen)
    if arch.nested:
        # Prefix reconstructions from per-group products (together one B x F x D matmul),
        # and their gradients: prefix g's error reaches the groups h <= g, so group h's
        # upstream gradient is the reverse cumulative sum over g >= h.
        bounds = group_bounds(config)
        w = 1.0 / len(bounds)
        partial, errs = params.b_dec, []
        for s0, s1 in bounds:
            partial = partial + _mm(f_l[:, s0:s1], params.W_dec[s0:s1], p)              # 2 (by group)
            errs.append(partial - x)
        x_hat = partial
        err = errs[-1]
        recon = sum(jnp.mean(jnp.square(e)) for e in errs) * w
        acc, dcum = None, []
        for e in reversed(errs):
            g = e * (2.0 * w / (b * d))
            acc = g if acc is None else acc + g
            dcum.append(acc)
        dcum.reverse()
        g_wdec = jnp.concatenate([_mm(f_l[:, s0:s1], dc, p, contract=(0, 0))      # 3 (by group)
                                  for (s0, s1), dc in zip(bounds, dcum, strict=True)], axis=0)
        d_f_l = jnp.concatenate([_mm(dc, params.W_dec[s0:s1], p, contract=(1, 1))   # 4 (by group)
                                 for (s0, s1), dc in zip(bounds, dcum, strict=True)], axis=1)
        sum_dxhat = jnp.sum(dcum[0], axis=0)
    else:
        x_hat = decode_l(f_l)                                                       # 2
        err = x_hat - x
        recon = jnp.mean(jnp.square(err))
        d_xhat = err * (2.0 / (b * d))
        g_wdec = _mm(f_l, d_xhat, p, contract=(bax, 0))                             # 3: f^T d_xhat
        d_f_l = by_features(d_xhat, params.W_dec)                                   # 4: d_xhat W_dec^T
        sum_dxhat = jnp.sum(d_xhat, axis=0)
    mse = recon if not arch.nested else jnp.mean(jnp.square(err))
    if arch.penalty is None:
        d_pre_l, d_side = act_vjp(d_f_l)
    else:
        d_pre_pen, d_f_pen, d_side_pen = pen_vjp(jnp.full((b,), 1.0 / b, jnp.float32))
        d_pre_l, d_side = act_vjp(d_f_l + d_f_pen)
        d_pre_l = d_pre_l + d_pre_pen
        d_side = jax.tree.map(jnp.add, d_side, d_side_pen)
    aux_loss = jnp.zeros((), jnp.float32)
    if arch.aux_recon is not None:
        # Gated: the gate's ReLU reconstructs x through a frozen decoder (no W_dec, b_dec
        # gradient from this term; b_dec still gets one through x_bar).
        g_l, g_vjp = jax.vjp(lambda z, s: view(arch.aux_recon(view(z), s, ctx)), pre_l, side)
        r_err = decode_l(g_l) - x
        aux_loss = aux_loss + jnp.mean(jnp.square(r_err))
        dg_pre, dg_side = g_vjp(by_features(r_err * (2.0 / (b * d)), params.W_dec))
        d_pre_l = d_pre_l + dg_pre
        d_side = jax.tree.map(jnp.add, d_side, dg_side)
    if feature_major:
        # Row sums as a matrix-vector product: a plain reduce over the trailing axis made
        # XLA:CPU transpose the whole [F, B] array first.
        rows = _mm(d_pre_l, jnp.ones((b, 1), jnp.float32), "f32")[:, 0]
    else:
        rows = jnp.sum(d_pre_l, axis=0)
    g_wenc = _mm(d_pre_l, x_bar, p, contract=(bax, 0))                              # 5: d_pre^T x_bar
    if config.aux_k > 0 and stale is not None:
        args = (params, x_bar, -err, stale)  # the residual x - x_hat
        aux = jax.lax.cond(jnp.any(dead_mask(stale, config)), functools.partial(auxk.auxk, config=config),
                           functools.partial(auxk.no_auxk, config=config), *args)
        aux_loss = aux_loss + aux.loss
        g_wdec = g_wdec.at[aux.idx].add(aux.W_dec)
        g_wenc = g_wenc.at[aux.idx].add(aux.W_enc)
        rows = rows.at[aux.idx].add(aux.b_enc)
    # b_enc: through pre (row sums) and directly (Gated's magnitude path subtracts it).
    g_benc = rows + d_side["b_enc"]
    if dec_norm is not None:
        # lambda sum_i f_i ||d_i||: d||d_i|| / d d_i = d_i / ||d_i||.
        g_wdec = g_wdec + (d_side["dec_norm"] / jnp.maximum(dec_norm, _NORM_EPS))[:, None] * params.W_dec
    # b_dec enters twice: + in x_hat, - in x_bar (whose gradient is d_pre @ W_enc).
    g_bdec = sum_dxhat - jnp.dot(rows, params.W_enc, precision=jax.lax.Precision.HIGHEST)
    specs = param_specs(config)
    g_extra = {name: d_side[name] if specs[name].trained else jnp.zeros_like(params.extra[name])
               for name in params.extra}
    grads = SAEParams(W_enc=g_wenc, b_enc=g_benc, W_dec=g_wdec, b_dec=g_bdec, extra=g_extra)
    return Forward(loss=recon + penalty + aux_loss, mse=mse, penalty=penalty, aux_loss=aux_loss,
                   f=view(f_l), x_hat=x_hat, grads=grads, stats=stats)


def project_decoder_grad(grad_wdec: Float[Array, "F D"], w_dec: Float[Array, "F D"]) -> Float[Array, "F D"]:
    """Removes from each dictionary vector's gradient its component along that (unit) vector."""
    return grad_wdec - jnp.sum(grad_wdec * w_dec, axis=-1, keepdims=True) * w_dec
