"""Neuron resampling, the paper's six steps (Bricken et al. 2023), as one jitted function.

``make_resample(config, mesh)`` returns ``resample(state, sample_inputs) -> (state, info)``.
The host supplies the sample ([S, D], sharded over "batch"; the paper uses S = 819,200
fresh inputs) so the pipeline can feed it from any source; the loop calls it after the
steps in ``config.resample_steps`` (see ``step.should_resample``).

1. dead = features that fired on no input in the last ``dead_window`` steps;
2. the per-input loss (MSE over D + sparsity penalty) of the current model on the sample,
   computed ``resample_chunk_size`` rows at a time with ``lax.map``;
3. one input per dead feature, drawn independently (with replacement, as in the paper)
   with probability proportional to loss^2: a categorical draw on log-weights in two
   levels (a block of 512 inputs, then an input within it, each by Gumbel-max), exact up to
   float32 rounding of the logs, O(S + F (S / 512 + 512)) time; no [F, S] Gumbel matrix is
   ever built and no float32 running sum rounds small losses away. The draws use
   ``fold_in(fold_in(state.key, RESAMPLE_STREAM), step)``, so they are deterministic
   given the state and independent of the mesh;
4. decoder row (the paper's dictionary column) = the unit-normalised input;
5. encoder row = unit input x ``resample_encoder_scale`` (0.2) x mean L2 norm of the
   alive features' encoder vectors (1.0 if none is alive); encoder bias = 0;
6. Adam first and second moments zeroed for exactly those entries (W_enc[i, :], b_enc[i],
   W_dec[i, :], and the architecture's per-feature parameters, which go back to their
   initial values: JumpReLU's threshold, Gated's r_mag and b_mag); every other entry of
   params and optimiser state is left bit for bit.

Every architecture resamples the same way. The loss of step 2 is the per-input loss of
the inference form (for BatchTopK and Matryoshka: with the running threshold). Dead is
:func:`saejax.sae.dead.dead_mask`, the step's and AuxK's definition too. For Gated the
per-input loss includes its auxiliary gate reconstruction (the loss it trains on). With
an unconstrained decoder (``decoder = "free"``) the new decoder rows get the alive rows'
mean norm instead of 1.

Resampled features get ``last_fired = step`` (a fresh window). Rows are drawn for every
feature and then selected by the dead mask, keeping shapes static: the drawn inputs are
one [F, D] array, the size of W_dec and sharded like it.

Legend: S sample rows, C chunk rows, D input width, F features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Float

from saejax.config import ConfigError
from saejax.parallel import check_divisible, named_sharding
from saejax.sae import model
from saejax.sae.config import SAEConfig
from saejax.sae.registry import register_dead_strategy
from saejax.sae.step import (TrainState, check_input_width, check_live, check_mesh, make_optimizer,
                             state_shardings)

RESAMPLE_STREAM = 0x5E5A  # separates resampling draws from any other use of the root key


def chunked_loss(params: model.SAEParams, sample: Float[Array, "S D"], config: SAEConfig,
                 mesh: Mesh | None = None) -> Float[Array, " S"]:
    """Per-input loss on ``sample`` in chunks of ``config.resample_chunk_size`` rows.

    Chunk j holds rows j, j + n, j + 2n, ... (n = number of chunks), so that with the
    sample sharded over "batch" every chunk is spread over all data shards.
    """
    s, d = sample.shape
    c = config.resample_chunk_size
    n = s // c
    chunks = jnp.swapaxes(sample.reshape(c, n, d), 0, 1)               # [n, C, D]
    if mesh is not None:
        chunks = jax.lax.with_sharding_constraint(chunks, named_sharding(mesh, (None, "batch", "d_in")))
    # The inference form: a per-input loss (BatchTopK's batch-wide selection would make
    # each input's loss depend on the rest of its chunk).
    ctx = model.inference_context(config)
    losses = jax.lax.map(lambda xc: model.per_input_loss(params, xc, config, ctx), chunks)  # [n, C]
    return jnp.swapaxes(losses, 0, 1).reshape(s)


DRAW_BLOCK = 512   # inputs per block of the two-level categorical draw
DRAW_CHUNK = 1024  # draws per lax.map step ([chunk, S / block] and [chunk, block] noise)


def draw_table(weights: Float[Array, " S"], block: int = DRAW_BLOCK
               ) -> tuple[Float[Array, "NB K"], Float[Array, " NB"]]:
    """Log-weights laid out in blocks [nb, block] (-inf padding) and each block's log-mass.

    The implied distribution of :func:`draw_inputs` is
    P(j) = softmax(log_mass)[b] * softmax(logw[b])[j] for j = b * block + i.
    """
    s = weights.shape[0]
    nb = -(-s // block)
    logw = jnp.log(jnp.pad(weights.astype(jnp.float32), (0, nb * block - s)))  # -inf at 0
    logw = logw.reshape(nb, block)
    return logw, jax.nn.logsumexp(logw, axis=1)


def draw_inputs(key: Array, weights: Float[Array, " S"], n: int, block: int = DRAW_BLOCK
                ) -> Array:
    """``n`` independent draws of indices in [0, S) with probability proportional to weights.

    A categorical draw on log-weights in two levels, exact up to float32 rounding of the
    logs: a block of ``block`` inputs by Gumbel-max over the blocks' log-masses
    (logsumexp), then an input within it by Gumbel-max over its log-weights, so
    P(j) = P(block) P(j | block) = w_j / sum(w) (:func:`draw_table`). No cumulative sum is
    involved: an inverse CDF over the paper's 819,200 inputs in float32 rounds each
    increment against a total ~10^6 times larger, which put the draws ~0.5% off in total
    variation and gave inputs with a small loss probability exactly 0. Every input with a
    positive weight keeps a positive probability here. Cost: F x (S / block + block) Gumbel
    numbers, ``DRAW_CHUNK`` draws at a time (about 5 s for the paper's largest dictionary on
    a 2-core CPU). Falls back to uniform draws if all weights are zero.
    """
    weights = jnp.where(jnp.sum(weights) > 0, weights, jnp.ones_like(weights))
    logw, log_mass = draw_table(weights, block)
    nb = log_mass.shape[0]

    def chunk(i):
        ko, ki = jax.random.split(jax.random.fold_in(key, i))
        b = jnp.argmax(log_mass + jax.random.gumbel(ko, (DRAW_CHUNK, nb)), axis=1)
        j = jnp.argmax(logw[b] + jax.random.gumbel(ki, (DRAW_CHUNK, block)), axis=1)
        return b * block + j

    idx = jax.lax.map(chunk, jnp.arange(-(-n // DRAW_CHUNK))).reshape(-1)[:n]
    return jnp.clip(idx, 0, weights.shape[0] - 1)


def resample_fn(config: SAEConfig, mesh: Mesh | None = None):
    """The un-jitted resample (see module docstring); :func:`make_resample` jits it."""
    opt = make_optimizer(config)

    def resample(state: TrainState, sample: Float[Array, "S D"]) -> tuple[TrainState, dict[str, Array]]:
        p = state.params
        fresh = model.init_extra(config)
        sample = sample.astype(jnp.float32)
        dead = model.dead_mask(state.step - state.last_fired, config)                  # step 1
        losses = chunked_loss(p, sample, config, mesh)                                 # step 2
        key = jax.random.fold_in(jax.random.fold_in(state.key, RESAMPLE_STREAM), state.step)
        idx = draw_inputs(key, jnp.square(losses), config.n_features)                  # step 3
        unit = model.unit_rows(sample[idx])                                            # [F, D]
        if mesh is not None:
            unit = jax.lax.with_sharding_constraint(unit, named_sharding(mesh, ("latent", "d_in")))
        enc_norms = jnp.linalg.norm(p.W_enc, axis=-1)                                  # [F]
        n_alive = jnp.sum(~dead)
        mean_alive = jnp.where(n_alive > 0, jnp.sum(jnp.where(dead, 0.0, enc_norms)) / jnp.maximum(n_alive, 1), 1.0)
        if config.decoder == "free":
            # An unconstrained decoder: new rows get the alive rows' mean norm, not 1 (the
            # decoder-norm-weighted penalty would charge unit rows ~10x the live ones).
            dec_norms = jnp.linalg.norm(p.W_dec, axis=-1)
            unit_dec = unit * jnp.where(n_alive > 0, jnp.sum(jnp.where(dead, 0.0, dec_norms))
                                        / jnp.maximum(n_alive, 1), 1.0)
        else:
            unit_dec = unit
        new_params = model.SAEParams(
            W_dec=jnp.where(dead[:, None], unit_dec, p.W_dec),                         # step 4
            W_enc=jnp.where(dead[:, None], unit * (config.resample_encoder_scale * mean_alive), p.W_enc),
            b_enc=jnp.where(dead, 0.0, p.b_enc),                                       # step 5
            b_dec=p.b_dec,
            # The architecture's per-feature parameters (JumpReLU's threshold, Gated's
            # r_mag, b_mag) go back to their initial values; scalars are kept.
            extra={name: jnp.where(dead, fresh[name], v) if v.ndim else v for name, v in p.extra.items()})
        keep = model.SAEParams(W_enc=~dead[:, None], b_enc=~dead, W_dec=~dead[:, None],
                               b_dec=jnp.ones((), bool),
                               extra={name: ~dead if v.ndim else jnp.ones((), bool) for name, v in p.extra.items()})
        opt_state = optax.tree_utils.tree_map_params(                                  # step 6
            opt, lambda moment, k: jnp.where(k, moment, jnp.zeros_like(moment)), state.opt_state, keep)
        new_state = state.replace(params=new_params, opt_state=opt_state,
                                  last_fired=jnp.where(dead, state.step, state.last_fired))
        info = {"n_dead": jnp.sum(dead), "resampled": dead, "sample_loss": jnp.mean(losses),
                "mean_alive_encoder_norm": mean_alive, "drawn_index": idx}
        return new_state, info

    return resample


def make_resample(config: SAEConfig, mesh: Mesh):
    """Builds the jitted ``resample(state, sample_inputs) -> (state, info)``, state donated.

    ``info`` holds n_dead, the dead mask ``resampled`` [F], the mean sample loss, the mean
    alive encoder norm and the drawn sample row per feature ``drawn_index`` [F] (only
    meaningful where ``resampled``).

    Raises:
      ConfigError: the sample has the wrong width, or its row count is not a multiple of
        ``resample_chunk_size`` or of the data-parallel size.
    """
    check_mesh(config, mesh)
    s_sh = state_shardings(config, mesh)
    lat = named_sharding(mesh, ("latent",))
    rep = named_sharding(mesh, ())
    info_sh = {"n_dead": rep, "resampled": lat, "sample_loss": rep, "mean_alive_encoder_norm": rep,
               "drawn_index": lat}
    x_sh = named_sharding(mesh, ("batch", "d_in"))
    jitted = jax.jit(resample_fn(config, mesh), in_shardings=(s_sh, x_sh), out_shardings=(s_sh, info_sh),
                     donate_argnums=0)

    def resample(state: TrainState, sample_inputs: Float[Array, "S D"]) -> tuple[TrainState, dict[str, Array]]:
        check_input_width(config, sample_inputs, "resample sample_inputs")
        rows = sample_inputs.shape[0]
        if len(sample_inputs.shape) != 2 or rows % config.resample_chunk_size:
            raise ConfigError(f"resample sample_inputs has shape {tuple(sample_inputs.shape)}: expected "
                              f"[S, {config.d_in}] with S a multiple of sae.resample_chunk_size="
                              f"{config.resample_chunk_size}")
        if x_sh.spec[0] is not None:
            check_divisible("sae.resample_chunk_size", config.resample_chunk_size, mesh, x_sh.spec[0])
        check_live(state)
        return jitted(state, sample_inputs)

    resample.jitted = jitted
    return resample


register_dead_strategy("resample", make_resample)
