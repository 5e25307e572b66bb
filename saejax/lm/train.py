"""LM training: AdamW + warmup/cosine, clipping, data parallel, checkpoints, metrics.

The pure step ``train_step(state, tokens) -> (state, metrics)`` is jitted once at setup with
in/out shardings and the state donated; the host reads each step's metrics one step late so the
device never waits. :func:`train` is the loop: it owns the loaders, the checkpointer and the
metric writers, resumes from the latest checkpoint (params, optimizer state and loader
position), stops with :class:`saejax.loop.NonFiniteError` on a non-finite loss (leaving the
last good checkpoint), and saves a checkpoint on SIGTERM/SIGINT before returning. The host
side of the loop (one-step-late reads, windows, signals, checkpoint cadence) is
:mod:`saejax.loop`, shared with the SAE trainer.

Legend: B batch, T sequence (tokens per row; the model sees T-1 inputs), V vocab.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx, struct
from jaxtyping import Array, Float, Int

from saejax import parallel
from saejax.checkpoint import Checkpointer, abstract_with_shardings, versions
from saejax.config import ConfigError, replace, resume_changes, to_dict
from saejax.lm.config import LMTrainConfig, ModelConfig, OptimConfig
from saejax.lm.model import abstract_model, forward, init_params, param_shardings, split_params
from saejax.loop import HostMetrics, NonFiniteError, run_steps
from saejax.metrics import MetricWriter, ProgressBar

@struct.dataclass
class TrainState:
    step: Int[Array, ""]
    params: nnx.State
    opt_state: optax.OptState


def lr_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine decay to ``lr * min_lr_ratio``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=num_steps, end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: OptimConfig, num_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW; weight decay on matrices only (not biases/LayerNorm)."""
    adamw = optax.adamw(lr_schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw


def next_token_loss(logits: Float[Array, "B T V"], targets: Int[Array, "B T"]) -> Float[Array, ""]:
    """Mean cross-entropy in nats/token (float32, flattened to 2-D)."""
    V = logits.shape[-1]
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.reshape(-1, V).astype(jnp.float32), targets.reshape(-1))
    return ce.mean()


def lm_loss(params: nnx.State, graphdef: nnx.GraphDef, tokens: Int[Array, "B T"],
            **forward_kwargs) -> Float[Array, ""]:
    """Next-token loss of ``tokens[:, 1:]`` given ``tokens[:, :-1]`` (interventions allowed)."""
    logits = forward(graphdef, params, tokens[:, :-1], **forward_kwargs).logits
    return next_token_loss(logits, tokens[:, 1:])


@dataclasses.dataclass(frozen=True)
class StepFns:
    """Everything the loop (or a test/benchmark) needs, built once."""

    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: TrainState
    batch_sharding: jax.sharding.NamedSharding
    train_step: Any  # jitted (state, tokens) -> (state, metrics); donates state
    eval_step: Any  # jitted (params, tokens) -> loss


def init_train_state(model_cfg: ModelConfig, optim_cfg: OptimConfig, num_steps: int,
                     mesh: jax.sharding.Mesh, seed: int = 0) -> tuple[TrainState, StepFns]:
    """Builds the initial state placed on ``mesh`` and the jitted step functions.

    Optimizer-state shardings are derived from the parameter shardings explicitly.
    """
    graphdef, abstract = split_params(abstract_model(model_cfg))
    p_shard = param_shardings(abstract, mesh)
    _, params = init_params(model_cfg, seed, p_shard)
    optimizer = make_optimizer(optim_cfg, num_steps)
    rep = parallel.replicated(mesh)
    opt_shard = parallel.optimizer_shardings(optimizer, params, p_shard, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shard)(params)
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params,
                       opt_state=opt_state)
    state_shardings = TrainState(step=rep, params=p_shard, opt_state=opt_shard)
    fns = make_step_fns(graphdef, optimizer, lr_schedule(optim_cfg, num_steps), state_shardings,
                        mesh)
    return state, fns


def make_step_fns(graphdef, optimizer, schedule, state_shardings: TrainState,
                  mesh: jax.sharding.Mesh) -> StepFns:
    batch_sharding = parallel.named_sharding(mesh, ("batch", None))
    rep = parallel.replicated(mesh)

    def train_step(state: TrainState, tokens: Int[Array, "B T"]):
        loss, grads = jax.value_and_grad(lm_loss)(state.params, graphdef, tokens)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "lr": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def eval_step(params: nnx.State, tokens: Int[Array, "B T"]):
        return lm_loss(params, graphdef, tokens)

    return StepFns(
        graphdef=graphdef, optimizer=optimizer, schedule=schedule,
        state_shardings=state_shardings, batch_sharding=batch_sharding,
        train_step=jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                           out_shardings=(state_shardings, rep), donate_argnums=0),
        eval_step=jax.jit(eval_step, in_shardings=(state_shardings.params, batch_sharding),
                          out_shardings=rep))


def unigram_baseline(store, chunk_rows: int = 4096) -> dict[str, float]:
    """Loss of the best context-free predictor: the train token distribution scored on val.

    Returns ``{"train_entropy": H(p_train), "val_cross_entropy": H(p_val, p_train)}`` in nats per
    token, with add-one smoothing so val tokens unseen in train have a finite cost.
    """
    V = store.vocab_size

    def counts(split: str) -> np.ndarray:
        c = np.zeros(V, np.int64)
        n = store.rows(split)
        for lo in range(0, n, chunk_rows):
            c += np.bincount(store.read(split, lo, min(lo + chunk_rows, n)).ravel(), minlength=V)
        return c

    train, val = counts("train"), counts("val")
    logp = np.log((train + 1.0) / (train.sum() + V))
    p = train / max(train.sum(), 1)
    return {"train_entropy": float(-(p[p > 0] * np.log(p[p > 0])).sum()),
            "val_cross_entropy": float(-(val * logp).sum() / max(val.sum(), 1))}


def resolve_model_config(model: ModelConfig, store) -> ModelConfig:
    """Fills vocab_size from the store and checks the context fits."""
    if model.vocab_size == 0:
        model = replace(model, vocab_size=store.vocab_size)
    elif model.vocab_size < store.vocab_size:
        raise ConfigError(f"config field 'model.vocab_size' = {model.vocab_size} is invalid: "
                         f"the token store has {store.vocab_size} token ids")
    if model.max_len < store.seq_len - 1:
        raise ConfigError(f"config field 'model.max_len' = {model.max_len} is invalid: must be >= "
                         f"the store's seq_len - 1 ({store.seq_len - 1})")
    return model


def evaluate(fns: StepFns, params: nnx.State, loader, num_batches: int) -> float:
    """Mean loss over ``num_batches`` val batches, always the same ones (position reset)."""
    start = loader.get_state()
    try:
        losses = [fns.eval_step(params, next(loader)) for _ in range(num_batches)]
        return float(np.mean(jax.device_get(losses)))
    finally:
        loader.set_state(start)


# Config fields that may differ on a resume without changing the experiment.
ALWAYS_ALLOWED = ("workdir", "progress_bar", "mesh", "distributed", "async_checkpoints")
# (the LM's state has no per-shard layout: any mesh restores it)


def _resume_changes(saved_meta: dict, config: LMTrainConfig, step: int,
                    allowed: tuple[str, ...], where: str) -> list[dict]:
    """The run's config changes with this resume's (refusing those not allowed)."""
    return list(saved_meta.get("changes", [])) + resume_changes(
        saved_meta.get("train", {}), to_dict(config), step, (*ALWAYS_ALLOWED, *allowed), where)


def train(config: LMTrainConfig, *, allow_changes: tuple[str, ...] = (),
          stop_at: int | None = None) -> dict[str, Any]:
    """Trains (or resumes) the LM described by ``config``.

    Args:
      config: the run; ``config.workdir`` holds checkpoints and metrics.
      allow_changes: config fields (or sections) that may differ from the checkpoint's when
        resuming (e.g. ("num_steps",)); each change is kept in the checkpoint metadata's
        "changes" with its step. Other changes are refused with ConfigError.
      stop_at: stop after this step (checkpointing it) without changing the LR schedule;
        used to test interruption and resumption in-process.

    Returns:
      A summary: final step, last train loss, val loss, unigram baseline, tokens/s, seconds.

    Raises:
      NonFiniteError: on a NaN/inf loss or gradient norm.
      ConfigError: a model config that does not fit the token store.
    """
    from saejax.data.loader import TokenLoader  # noqa: PLC0415 - data layer only for training
    from saejax.data.token_store import TokenStore

    from saejax.data.token_store import open_named

    t_start = time.perf_counter()
    mesh = parallel.make_mesh(config.mesh)
    store = open_named(TokenStore.open, config.store_dir, "store_dir")
    model_cfg = resolve_model_config(config.model, store)
    train_loader = TokenLoader(store, "train", config.loader, mesh)
    val_cfg = replace(config.loader, shuffle=False, num_epochs=None)
    val_loader = TokenLoader(store, "val", val_cfg, mesh)
    eval_batches = config.eval_batches or val_loader.batches_per_epoch
    tokens_per_step = config.loader.batch_size * (store.seq_len - 1)

    state, fns = init_train_state(model_cfg, config.optim, config.num_steps, mesh, config.seed)
    unigram = unigram_baseline(store)
    metadata = {"model": to_dict(model_cfg), "train": to_dict(config), "versions": versions(),
                "unigram": unigram, "store_dir": os.path.abspath(config.store_dir),
                "store_fingerprint": store.metadata.get("fingerprint"),
                # Tells this run from any other (e.g. another seed with the same shape):
                # stores harvested from it and SAE runs on it record it.
                "run_id": uuid.uuid4().hex}
    ckpt = Checkpointer(os.path.join(config.workdir, "checkpoints"),
                        keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    if ckpt.latest_step() is not None:
        where = f"the LM run in {config.workdir!r}"
        try:  # refuse a changed config before reading any array
            _resume_changes(ckpt.restore_metadata(), config, ckpt.latest_step(), allow_changes,
                            where)
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001 - a damaged newest step: restore() skips it
            pass
        abstract = abstract_with_shardings(jax.eval_shape(lambda: state), fns.state_shardings)
        state, data_state, saved_meta = ckpt.restore(abstract)  # the newest step that restores
        metadata["changes"] = _resume_changes(saved_meta, config, ckpt.restored_step,
                                              allow_changes, where)
        metadata["run_id"] = saved_meta.get("run_id")
        train_loader.set_state(data_state["train"])
        logging.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    start = int(jax.device_get(state.step))
    end = config.num_steps if stop_at is None else min(stop_at, config.num_steps)

    # Drops what a dead run logged after the restored step (everything, on a fresh start).
    writer = MetricWriter(config.workdir, resume_step=start if start else -1)
    bar = ProgressBar(config.num_steps, start_step=start, enabled=config.progress_bar)
    if start == 0:
        writer.write_scalars(0, {"val/unigram_baseline": unigram["val_cross_entropy"],
                                 "train/unigram_entropy": unigram["train_entropy"]})
    logging.info("unigram baseline: val %.4f nats/token (train entropy %.4f)",
                 unigram["val_cross_entropy"], unigram["train_entropy"])

    summary: dict[str, Any] = {"unigram_val": unigram["val_cross_entropy"], "val_loss": None,
                               "train_loss": None, "interrupted": None}

    def report(done: int, avg: dict, last: dict, tokens_per_s: float) -> None:
        scalars = {"train/loss": avg["loss"], "train/lr": last["lr"],
                   "train/grad_norm": last["grad_norm"], "perf/tokens_per_s": tokens_per_s}
        writer.write_scalars(done, scalars)
        shown = {"loss": avg["loss"], "lr": last["lr"], "tok/s": tokens_per_s}
        if summary["val_loss"] is not None:
            shown["val"] = summary["val_loss"]
        bar.update(done, shown)

    def stop_nonfinite(e: NonFiniteError) -> None:
        ckpt.wait()
        raise NonFiniteError(f"{e}; stopping. The last good checkpoint is step "
                             f"{ckpt.latest_step()} in {ckpt.directory} (lower optim.lr or "
                             f"raise optim.warmup_steps and resume).") from None

    host = HostMetrics(log_every=config.log_every, end=config.num_steps,
                       tokens_per_step=tokens_per_step,
                       report=report, on_nonfinite=stop_nonfinite,
                       finite_keys=("loss", "grad_norm"), what="training loss")
    if start and "metrics" in data_state:  # checkpoints before 2026-11-30 have none
        host.set_state(data_state["metrics"])

    def step(i: int):
        nonlocal state
        state, metrics = fns.train_step(state, next(train_loader))
        return metrics

    def at_sync(done: int) -> None:
        if done % config.eval_every == 0:
            summary["val_loss"] = evaluate(fns, state.params, val_loader, eval_batches)
            writer.write_scalars(done, {"val/loss": summary["val_loss"]})

    def save(done: int) -> None:
        writer.flush()  # every record up to ``done`` is on disk before the checkpoint commits
        ckpt.save(done, state, data_state={"train": train_loader.get_state(),
                                           "metrics": host.get_state()},
                  metadata=metadata)

    try:
        result = run_steps(start, end, step=step, metrics=host,
                           checkpoint_every=config.checkpoint_every, save=save,
                           saved_steps=ckpt.all_steps,
                           current_step=lambda: int(jax.device_get(state.step)),
                           sync_at=lambda done: done % config.eval_every == 0, at_sync=at_sync)
        final, summary["interrupted"] = result.final_step, result.interrupted
        summary["train_loss"] = host.last.get("loss")
        needs_eval = summary["val_loss"] is None or final % config.eval_every
        if needs_eval and summary["interrupted"] is None:  # exit promptly when asked to stop
            summary["val_loss"] = evaluate(fns, state.params, val_loader, eval_batches)
            # Logged only where the uninterrupted run logs it: at the run's end, once.
            if final == config.num_steps and start < final:
                writer.write_scalars(final, {"val/loss": summary["val_loss"]})
        bar.update(final, {"loss": summary["train_loss"] or math.nan,
                           "val": summary["val_loss"] or math.nan,
                           "tok/s": host.tokens_per_s}, force=True)
    finally:
        ckpt.close()
        writer.close()
        bar.close()
    summary.update(step=final, tokens_per_s=host.tokens_per_s,
                   seconds=time.perf_counter() - t_start)
    logging.info("done at step %d: train %.4f, val %.4f nats/token (unigram %.4f)", final,
                 summary["train_loss"] or math.nan, summary["val_loss"] or math.nan,
                 summary["unigram_val"])
    return summary
