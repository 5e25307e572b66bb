"""Train state, its shardings, initialisation and the pure, jitted SAE train step.

The state is one pytree (params, Adam state, last-fired step per feature, root RNG key,
step). The latent axis of everything per-feature (W_enc rows, b_enc, W_dec rows,
their Adam moments, last_fired) is sharded over the mesh's "latent" rule; batches over
"batch". ``make_train_step`` jits once with explicit in/out shardings and donates the state.
The step reports ``metrics["nonfinite"]`` and keeps its state on such a batch; the loop's
host-side guard (:func:`saejax.loop.check_finite`) turns that into an error.

Legend: B batch, D input width, F features.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, Bool, Float, Int, UInt32

from saejax.config import ConfigError
from saejax.parallel import check_divisible, named_sharding, optimizer_shardings, replicated
from saejax.sae import gradcheck, model, registry, schedule
from saejax.sae import sparse as sparse_kernel
from saejax.sae.config import SAEConfig
from saejax.sae.dead import firing_counts
from saejax.sae.geometric_median import geometric_median
from saejax.sae.model import SAEParams

BATCH_AXES = ("batch", "d_in")
# Metrics whose value is per feature; every other metric is a replicated scalar.
PER_FEATURE_METRICS = ("feature_counts",)


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes.

    Attributes:
      params: SAE parameters (f32).
      opt_state: optax Adam state; moments sharded like their parameters.
      last_fired: per feature, the value of ``step`` after the last step in which it fired
        on some input (0 at initialisation). Dead = ``step - last_fired >= dead_window``.
      key: the root RNG key (raw uint32[2], checkpoint-friendly); per-use keys are
        ``fold_in(key, step)``.
      step: number of completed steps.
    """

    params: SAEParams
    opt_state: Any
    last_fired: Int[Array, " F"]
    key: UInt32[Array, " 2"]
    step: Int[Array, ""]


def make_optimizer(config: SAEConfig) -> optax.GradientTransformation:
    """Adam with the config's learning rate and betas."""
    return optax.adam(config.lr, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)


def check_mesh(config: SAEConfig, mesh: Mesh) -> None:
    """Raises ConfigError unless the dictionary splits evenly over the latent axis."""
    axis = named_sharding(mesh, ("latent",)).spec[0]
    if axis is not None:
        check_divisible("sae.n_features", config.n_features, mesh, axis)


def param_shardings(mesh: Mesh, config: SAEConfig | None = None) -> SAEParams:
    """The NamedSharding of every parameter (``config``'s architecture extras included)."""
    axes = model.PARAM_AXES if config is None else model.param_axes(config)
    return jax.tree.map(lambda a: named_sharding(mesh, a), axes, is_leaf=lambda x: isinstance(x, tuple))


def _abstract_params(config: SAEConfig) -> SAEParams:
    d, f = config.d_in, config.n_features
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    extra = {name: s(f) if spec.per_feature else s() for name, spec in model.param_specs(config).items()}
    return SAEParams(W_enc=s(f, d), b_enc=s(f), W_dec=s(f, d), b_dec=s(d), extra=extra)


def opt_state_shardings(config: SAEConfig, mesh: Mesh, opt: optax.GradientTransformation | None = None) -> Any:
    """Adam-state shardings derived from the parameter shardings (moments = their param's)."""
    return optimizer_shardings(opt or make_optimizer(config), _abstract_params(config),
                               param_shardings(mesh, config), mesh)


def state_shardings(config: SAEConfig, mesh: Mesh) -> TrainState:
    """The NamedSharding of every leaf of the train state."""
    return TrainState(params=param_shardings(mesh, config), opt_state=opt_state_shardings(config, mesh),
                      last_fired=named_sharding(mesh, ("latent",)), key=replicated(mesh),
                      step=replicated(mesh))


def metric_shardings(mesh: Mesh, names: Any) -> dict[str, NamedSharding]:
    return {k: named_sharding(mesh, ("latent",)) if k in PER_FEATURE_METRICS else replicated(mesh)
            for k in names}


def _init(key: Array, b_dec: Array, config: SAEConfig) -> TrainState:
    params = model.init_params(jax.random.fold_in(key, 0), config, b_dec)
    return TrainState(params=params, opt_state=make_optimizer(config).init(params),
                      last_fired=jnp.zeros((config.n_features,), jnp.int32), key=key,
                      step=jnp.zeros((), jnp.int32))


def abstract_state(config: SAEConfig, mesh: Mesh) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the state: for eval_shape and resharded restore."""
    shapes = jax.eval_shape(lambda k, b: _init(k, b, config), jax.ShapeDtypeStruct((2,), jnp.uint32),
                            jax.ShapeDtypeStruct((config.d_in,), jnp.float32))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, state_shardings(config, mesh))


def check_input_width(config: SAEConfig, x: Any, what: str) -> None:
    shape = tuple(np.shape(x))
    if len(shape) < 2 or shape[-1] != config.d_in:
        raise ConfigError(f"{what} has shape {shape}, but config field 'sae.d_in' = {config.d_in}: "
                          f"expected [..., {config.d_in}] (input width of the SAE)")


def init_state(config: SAEConfig, mesh: Mesh, init_sample: Float[Array, "S D"]) -> TrainState:
    """A fresh, sharded train state; b_dec = geometric median of ``init_sample``.

    Args:
      config: SAE config.
      mesh: device mesh.
      init_sample: a sample of inputs [S, D] for the geometric median (the paper uses a
        sample of activations; a few thousand rows suffice).

    Raises:
      ConfigError: wrong input width, or n_features does not split over the mesh.
    """
    check_input_width(config, init_sample, "init_sample")
    check_mesh(config, mesh)
    sample = jnp.asarray(init_sample, jnp.float32).reshape(-1, config.d_in)
    b_dec = jax.device_put(geometric_median(sample, iters=config.geometric_median_iters), replicated(mesh))
    key = jax.device_put(jax.random.PRNGKey(config.seed), replicated(mesh))
    init = jax.jit(lambda k, b: _init(k, b, config), out_shardings=state_shardings(config, mesh))
    return init(key, b_dec)


def check_live(state: TrainState) -> None:
    """Raises ValueError if ``state`` holds donated (deleted) buffers.

    The step and resample donate their input state; passing a consumed state again makes
    jax 0.10 on CPU crash (segfault) instead of raising, so the wrappers check first.
    """
    if any(getattr(leaf, "is_deleted", lambda: False)() for leaf in jax.tree.leaves(state)):
        raise ValueError("this TrainState was donated to an earlier train_step/resample call and its "
                         "buffers are gone; use the state that call returned")


def _select(ok: Bool[Array, ""], new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def _all_finite(tree: Any) -> Bool[Array, ""]:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def clip_by_global_norm(grads: SAEParams, max_norm: float) -> SAEParams:
    """Scales the whole gradient down to L2 norm ``max_norm`` when it is larger."""
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
    return jax.tree.map(lambda g: g * scale, grads)


def train_step_fn(config: SAEConfig, opt: optax.GradientTransformation, anneal: bool = False,
                  k_max: int | None = None, sparse: bool | None = None, mesh: Mesh | None = None
                  ) -> Callable[[TrainState, Float[Array, "B D"]], tuple[TrainState, dict[str, Array]]]:
    """The un-jitted step (for composition and tests); :func:`make_train_step` jits it.

    ``anneal``: the program for the steps while k is annealed (:mod:`saejax.sae.schedule`).
    ``k_max``: the static bound of a traced ``config.k`` (sweeps, :mod:`saejax.sae.sweep_step`).
    ``sparse``: the sparse kernel (:mod:`saejax.sae.sparse`; BatchTopK and Matryoshka:
    :mod:`saejax.sae.sparse_batch`); None: its cost model.
    ``mesh``: the mesh the step runs on (the sparse kernel's ``shard_map``).
    """
    arch = registry.get_architecture(config.architecture)
    lr_scheduled = config.lr_warmup_steps > 0 or config.lr_decay_fraction > 0

    def step(state: TrainState, batch: Float[Array, "B D"]) -> tuple[TrainState, dict[str, Array]]:
        x = batch.astype(jnp.float32).reshape(-1, config.d_in)
        params = state.params
        ctx = model.train_context(config, state.step, anneal, k_max)
        out = model.forward_backward(params, x, config, stale=state.step - state.last_fired, ctx=ctx,
                                     sparse=sparse, mesh=mesh)
        grads = out.grads
        if config.decoder == "unit":
            grads = grads.replace(W_dec=model.project_decoder_grad(grads.W_dec, params.W_dec))
        if config.grad_clip > 0:
            # After the projection, as dictionary_learning (project, clip, step).
            grads = clip_by_global_norm(grads, config.grad_clip)
        updates, opt_state = opt.update(grads, state.opt_state, params)
        lr_factor = schedule.lr_factor(config, state.step)
        if lr_scheduled:
            # Adam's update times the schedule = Adam with the scheduled learning rate, and
            # the optimizer state keeps its structure with or without a schedule.
            updates = jax.tree.map(lambda u: u * lr_factor, updates)
        new_params = optax.apply_updates(params, updates)
        if config.decoder == "unit":
            new_params = new_params.replace(W_dec=model.unit_rows(new_params.W_dec))
        if arch.constrain is not None:
            new_params = new_params.replace(extra={**new_params.extra, **arch.constrain(new_params.extra, ctx)})
        if arch.update_buffers is not None:
            new_params = new_params.replace(extra={**new_params.extra,
                                                   **arch.update_buffers(params.extra, out.stats, ctx)})

        # Inputs on which each feature fired.
        if out.counts is not None:  # the sparse BatchTopK / Matryoshka step's
            counts = out.counts
        elif out.active is None:
            counts = firing_counts(out.f)
        else:  # the sparse TopK step: (values, indices) [B, k]
            a, idx = out.active
            counts = jnp.zeros((config.n_features,), jnp.int32).at[idx.reshape(-1)].add(
                (a > 0).reshape(-1).astype(jnp.int32))
        finite = jnp.isfinite(out.loss) & _all_finite(grads)
        step_next = state.step + 1
        last_fired = jnp.where(counts > 0, step_next, state.last_fired)
        # A non-finite batch must not reach the parameters: keep the old ones (the loop
        # sees metrics["nonfinite"] and stops via check_finite).
        new_state = TrainState(params=_select(finite, new_params, params),
                               opt_state=_select(finite, opt_state, state.opt_state),
                               last_fired=jnp.where(finite, last_fired, state.last_fired),
                               key=state.key, step=step_next)

        err_sq = jnp.sum(jnp.square(out.x_hat - x))
        total_var = jnp.sum(jnp.square(x - jnp.mean(x, axis=0)))
        b = x.shape[0]
        dead = model.dead_mask(step_next - new_state.last_fired, config)
        if out.l1_rows is not None:
            l1_rows = out.l1_rows
        else:
            l1_rows = jnp.sum(jnp.abs(out.f if out.active is None else out.active[0]), axis=-1)
        if model.cpu_layout() and out.f is not None:
            # Same per-input sums as the ReLU penalty's; on XLA:CPU the barrier stops XLA
            # from merging them into one [B, F] reduction, so both share one pass over f.
            l1_rows = jax.lax.optimization_barrier(l1_rows)
        metrics = {
            "loss": out.loss,
            "mse": out.mse,
            "l1": jnp.mean(l1_rows),
            "sparsity_loss": out.penalty,
            "aux_loss": out.aux_loss,
            "l0": jnp.sum(counts) / b,
            "explained_variance": 1.0 - err_sq / jnp.maximum(total_var, 1e-30),
            "frac_dead": jnp.mean(dead.astype(jnp.float32)),
            "frac_dense": jnp.mean((counts > config.dense_threshold * b).astype(jnp.float32)),
            "nonfinite": jnp.logical_not(finite),
            "feature_counts": counts,
        }
        if lr_scheduled:
            metrics["lr"] = config.lr * lr_factor
        if config.sparsity_warmup_fraction > 0:
            metrics["sparsity_factor"] = jnp.asarray(ctx.sparsity, jnp.float32)
        if config.k_anneal_start:
            metrics["k"] = jnp.asarray(ctx.k, jnp.float32)
        if "threshold" in new_state.params.extra and new_state.params.extra["threshold"].ndim == 0:
            metrics["threshold"] = new_state.params.extra["threshold"]
        if "path" in out.stats:
            metrics["threshold_path"] = out.stats["path"].astype(jnp.float32)
        return new_state, metrics

    return step


def make_train_step(config: SAEConfig, mesh: Mesh
                    ) -> Callable[[TrainState, Float[Array, "B D"]], tuple[TrainState, dict[str, Array]]]:
    """Builds ``train_step(state, batch) -> (state, metrics)``, jitted once, state donated.

    The returned callable checks the batch's width and divisibility on the host (cheap,
    clear errors) and calls the jitted step; ``.jitted`` exposes the jitted function
    (e.g. for ``.lower``). Metrics are device scalars (``feature_counts`` is [F], sharded
    over the latent axis): read them one step late so the device never waits.

    Raises:
      ConfigError: n_features does not split over the mesh.
      RuntimeError: the architecture's hand-written backward disagrees with autodiff of
        its loss (:func:`saejax.sae.gradcheck.check_backward`, once per architecture).
    """
    check_mesh(config, mesh)
    config.check_schedule()
    sparse = check_kernel(config, mesh)
    gradcheck.check_backward(config, sparse=sparse)
    opt = make_optimizer(config)
    s_sh = state_shardings(config, mesh)
    b_sh = named_sharding(mesh, BATCH_AXES)

    def build(anneal: bool):
        fn = train_step_fn(config, opt, anneal, sparse=sparse, mesh=mesh)
        names = jax.eval_shape(fn, abstract_state(config, mesh),
                               jax.ShapeDtypeStruct((8, config.d_in), jnp.float32))[1].keys()
        return jax.jit(fn, in_shardings=(s_sh, b_sh), out_shardings=(s_sh, metric_shardings(mesh, names)),
                       donate_argnums=0)

    jitted = build(False)
    k_final = schedule.k_final_step(config)
    annealing = build(True) if k_final > 0 else None
    # Without ``step`` the wrapper reads it from the state until the annealing is over, then
    # assumes steps only increase (no more device reads); with ``step`` it decides each call.
    annealed = [annealing is None]
    batch_axis = b_sh.spec[0]
    batch_wide = registry.get_architecture(config.architecture).batch_wide

    def train_step(state: TrainState, batch: Float[Array, "B D"], step: int | None = None
                   ) -> tuple[TrainState, dict[str, Array]]:
        shape = np.shape(batch)
        if len(shape) != 2 or shape[1] != config.d_in:
            check_input_width(config, batch, "batch")
            raise ConfigError(f"batch has shape {shape}; expected a 2-D [B, {config.d_in}] array")
        if batch_axis is not None:
            check_divisible("batch size", shape[0], mesh, batch_axis)
        if batch_wide and shape[0] * config.n_features >= 2 ** 31:
            raise ConfigError(f"batch size {shape[0]} x sae.n_features={config.n_features} must be < 2^31 "
                              f"for architecture {config.architecture!r} (its batch-wide selection counts "
                              f"in int32); use a smaller batch")
        check_live(state)
        if annealing is not None and (step is not None or not annealed[0]):
            # While k is annealed the top-k runs with k_anneal_start; ``step`` (completed
            # steps, which the loop knows) saves reading it from the device.
            if (int(state.step) if step is None else step) < k_final:
                return annealing(state, batch)
            annealed[0] = step is None
        return jitted(state, batch)

    train_step.jitted = jitted
    return train_step


def check_kernel(config: SAEConfig, mesh: Mesh) -> bool:
    """Whether the step runs the sparse kernel on ``mesh`` (ConfigError if asked for and impossible)."""
    if config.step_kernel == "sparse":
        why = sparse_kernel.supports(config, mesh)
        if why is not None:
            raise ConfigError(f"config field 'sae.step_kernel' = 'sparse' is invalid here: {why}")
    return sparse_kernel.use_sparse(config, mesh)


def should_resample(config: SAEConfig, step: int) -> bool:
    """True if the dead-feature strategy runs after ``step`` completed steps."""
    return int(step) in config.resample_steps and \
        registry.get_dead_strategy(config.dead_strategy).scheduled


def make_dead_strategy(config: SAEConfig, mesh: Mesh):
    """The configured dead-feature strategy: ``fn(state, sample_inputs) -> (state, info)``."""
    return registry.get_dead_strategy(config.dead_strategy).factory(config, mesh)
