"""The SAE training loop: the one place activations, the SAE step, checkpoints, metrics and
evaluation meet.

Per step: the source (LM -> device shuffle buffer, or an activation store) yields a batch
[B, D]; it is scaled by the run's normalisation constant and fed to the jitted, sharded SAE
step. Metrics are read on the host one step late (the device never waits); at the
resampling steps the dead-feature strategy runs on a fresh sample; every ``eval_every``
steps the dictionary is spliced into the LM on held-out tokens. Checkpoints hold the SAE
state, the shuffle buffer, the data position of every stream and the metadata (config,
versions, normalisation), so re-running the same command resumes bit-exactly.

Legend: B batch rows, D input width, F features, S resample sample rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jaxtyping import Array, Float

from saejax import evaluate, parallel
from saejax.activations import ShuffleBuffer, restore_lm_source
from saejax.checkpoint import Checkpointer, StopSignal, versions
from saejax.config import ConfigError, to_dict
from saejax.data.loader import ActivationLoader, TokenLoader
from saejax.data.token_store import TokenStore
from saejax.metrics import MetricWriter, ProgressBar, is_writer_process
from saejax.sae import model as sae_model
from saejax.sae.step import (NonFiniteError, abstract_state, check_finite, init_state,
                             make_train_step, should_resample)
from saejax.sae import make_dead_strategy
from saejax.train_config import SAETrainConfig

EVAL_FILE = "eval.json"
INIT_SAMPLE_ROWS = 16_384  # rows for the geometric-median initialisation of b_dec


# ---------------------------------------------------------------------------------------
# Sources of activation batches
# ---------------------------------------------------------------------------------------


class OnTheFlySource:
    """LM activations through a device shuffle buffer; resample samples from a second
    token stream (its own seed), so drawing them never disturbs the training stream."""

    def __init__(self, cfg: SAETrainConfig, producer, store: TokenStore, mesh, d: int):
        lm_loader = dataclasses.replace(cfg.loader, batch_size=cfg.lm_batch_size, shuffle=True,
                                        num_epochs=None)
        self.tokens = TokenLoader(store, "train", lm_loader, mesh)
        self.sample_tokens = TokenLoader(
            store, "train", dataclasses.replace(lm_loader, seed=cfg.loader.seed + 1), mesh)
        self.producer = producer
        self.buffer = ShuffleBuffer(mesh, cfg.buffer_rows, d, cfg.batch_size, seed=cfg.loader.seed)

    def _rows(self) -> Float[Array, "R D"]:
        return self.producer(next(self.tokens))

    def init_device_state(self):
        return {"buffer": self.buffer.fill(self.buffer.empty(), self._rows)}

    def abstract_device_state(self):
        return {"buffer": self.buffer.abstract_state()}

    def next(self, dev):
        buf, batch = self.buffer.next_batch(dev["buffer"], self._rows)
        return {"buffer": buf}, batch

    def sample(self, n: int) -> Float[Array, "S D"]:
        parts, have = [], 0
        while have < n:
            parts.append(self.producer(next(self.sample_tokens)))
            have += parts[-1].shape[0]
        return jnp.concatenate(parts)[:n]

    def get_state(self) -> dict:
        return {"tokens": self.tokens.get_state(), "sample": self.sample_tokens.get_state()}

    def set_state(self, state: dict) -> None:
        self.tokens.set_state(state["tokens"])
        self.sample_tokens.set_state(state["sample"])


class StoreSource:
    """Batches from a harvested activation store (windowed chunk shuffle, crc-checked)."""

    def __init__(self, cfg: SAETrainConfig, mesh):
        loader = dataclasses.replace(cfg.loader, batch_size=cfg.batch_size, num_epochs=None)
        self.acts = ActivationLoader(cfg.activation_store, loader, mesh)
        self.samples = ActivationLoader(self.acts.store, dataclasses.replace(
            loader, seed=cfg.loader.seed + 1), mesh)

    def init_device_state(self):
        return {}

    def abstract_device_state(self):
        return {}

    def next(self, dev):
        return dev, next(self.acts)

    def sample(self, n: int) -> Float[Array, "S D"]:
        parts, have = [], 0
        while have < n:
            parts.append(next(self.samples))
            have += parts[-1].shape[0]
        return jnp.concatenate(parts)[:n].astype(jnp.float32)

    def get_state(self) -> dict:
        return {"acts": self.acts.get_state(), "sample": self.samples.get_state()}

    def set_state(self, state: dict) -> None:
        self.acts.set_state(state["acts"])
        self.samples.set_state(state["sample"])


# ---------------------------------------------------------------------------------------
# Normalisation and the splice used at evaluation
# ---------------------------------------------------------------------------------------


def estimate_normalization(producer, store: TokenStore, mesh, n_contexts: int, batch: int,
                           d: int) -> tuple[dict, np.ndarray]:
    """Scale (E||x|| -> sqrt(D)), mean activation, and a raw sample for the geometric median,
    from the first ``n_contexts`` train contexts (a fixed, reproducible set)."""
    n_contexts = max(batch, n_contexts // batch * batch)
    n_contexts = min(n_contexts, store.rows("train") // batch * batch)
    rows = []
    lo, hi = parallel.process_rows(mesh, batch)  # this process's rows of each global batch
    for a in range(0, n_contexts, batch):
        tokens = parallel.host_to_global(store.read("train", a + lo, a + hi), mesh,
                                         ("batch", None))
        # Every process needs the same statistics: gather the global rows everywhere.
        rows.append(np.asarray(multihost_utils.process_allgather(producer(tokens), tiled=True)))
    x = np.concatenate(rows).astype(np.float64)
    mean_norm = float(np.linalg.norm(x, axis=1).mean())
    if not mean_norm > 0:
        raise ConfigError("the site's activations are all zero on the normalisation sample; "
                          "cannot normalise (set normalize=false or choose another site)")
    return ({"norm_scale": math.sqrt(d) / mean_norm, "mean_norm": mean_norm,
             "mean": x.mean(0).tolist(), "sample_rows": len(x)}, x.astype(np.float32))


def make_splice(sae_cfg):
    """``(params, scale), acts -> (reconstruction, features)`` in the LM's units."""

    def splice(p, acts):
        params, scale = p
        x = acts.reshape(-1, acts.shape[-1]).astype(jnp.float32) * scale
        f = sae_model.encode(params, x, sae_cfg)
        x_hat = sae_model.decode(params, f, sae_cfg) / scale
        return x_hat.reshape(acts.shape), f.reshape(acts.shape[:-1] + (-1,))

    return splice


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def _host_scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(
        {k: v for k, v in metrics.items() if k != "feature_counts"}).items()}


def train(cfg: SAETrainConfig, *, stop_at: int | None = None) -> dict[str, Any]:
    """Trains (or resumes) the dictionary ``cfg`` describes.

    Args:
      cfg: the run; ``cfg.workdir`` holds checkpoints, metrics and evaluation results.
      stop_at: stop (with a checkpoint) after this step; for tests of interruption.

    Returns:
      A summary: final step, last training metrics, last evaluation, timings.

    Raises:
      NonFiniteError: a NaN/Inf loss or gradient (the last good checkpoint stays intact).
      ConfigError: inconsistent settings (e.g. ``sae.d_in`` != the site's width).
    """
    t_start = time.perf_counter()
    mesh = parallel.make_mesh(cfg.mesh)
    src = restore_lm_source(cfg.lm_dir, cfg.site, mesh)
    graphdef, lm_params, lm_meta, site = src.graphdef, src.params, src.meta, src.site
    token_store, context, producer, d = src.store, src.context, src.produce, src.width
    if d != cfg.sae.d_in:
        raise ConfigError(f"config field 'sae.d_in' = {cfg.sae.d_in} is invalid: site {site!r} "
                          f"of the LM in {cfg.lm_dir!r} has width {d}")
    parallel.check_divisible("batch_size", cfg.batch_size, mesh, parallel.DATA)

    source = OnTheFlySource(cfg, producer, token_store, mesh, d) if cfg.source == "onthefly" \
        else StoreSource(cfg, mesh)
    ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                        async_save=cfg.async_checkpoints)
    train_step = make_train_step(cfg.sae, mesh)
    dead_strategy = make_dead_strategy(cfg.sae, mesh)
    abstract = {"sae": abstract_state(cfg.sae, mesh), "source": source.abstract_device_state()}

    if ckpt.latest_step() is not None:
        state, data_state, metadata = ckpt.restore(abstract)
        source.set_state(data_state)
        logging.info("resumed %s at step %d", cfg.workdir, int(state["sae"].step))
    else:
        if cfg.source == "store":
            stats = source.acts.store.stats
            norm = {"norm_scale": stats["norm_scale"], "mean_norm": stats["mean_norm"],
                    "mean": stats["mean"], "sample_rows": stats["rows"]}
            store = source.acts.store
            n_init = -(-min(INIT_SAMPLE_ROWS, store.rows) // store.chunk_rows)
            init_rows = np.concatenate([np.asarray(store.read_chunk(i), np.float32)
                                        for i in range(n_init)])
        else:
            norm, init_rows = estimate_normalization(
                producer, token_store, mesh, cfg.norm_sample_contexts, cfg.lm_batch_size, d)
        if not cfg.normalize:
            norm["norm_scale"] = 1.0
        init_rows = init_rows[:INIT_SAMPLE_ROWS] * norm["norm_scale"]
        metadata = {"config": to_dict(cfg), "versions": versions(), "normalization": norm,
                    "site": site, "lm": {"dir": os.path.abspath(cfg.lm_dir),
                                         "step": lm_meta.get("step"),
                                         "store_dir": lm_meta["store_dir"]}}
        state = {"sae": init_state(cfg.sae, mesh, init_rows), "source": source.init_device_state()}
    scale = jnp.float32(metadata["normalization"]["norm_scale"])
    mean_act = jnp.asarray(metadata["normalization"]["mean"], jnp.float32)
    prep = jax.jit(lambda x, s: x.astype(jnp.float32) * s,
                   out_shardings=parallel.named_sharding(mesh, ("batch", "d_in")))

    val_cfg = dataclasses.replace(cfg.loader, batch_size=cfg.eval_batch_contexts, shuffle=False,
                                  num_epochs=None, prefetch=0)
    val = TokenLoader(token_store, "val", val_cfg, mesh)
    eval_step = evaluate.make_eval_step(graphdef, site, make_splice(cfg.sae), context)
    n_eval = cfg.eval_contexts // cfg.eval_batch_contexts

    def run_eval(step: int) -> dict:
        start = val.get_state()
        try:
            batches = (next(val) for _ in range(n_eval))
            out = evaluate.evaluate(eval_step, lm_params, (state["sae"].params, scale), mean_act,
                                    batches, cfg.sae.dense_threshold)
        finally:
            val.set_state(start)
        density = out.pop("feature_density")
        writer.write_scalars(step, {f"eval/{k}": v for k, v in out.items()})
        alive = density[density > 0]
        if alive.size:
            writer.write_histogram(step, "eval/log10_feature_density", np.log10(alive))
        out["step"] = step
        if is_writer_process():
            os.makedirs(cfg.workdir, exist_ok=True)
            np.save(os.path.join(cfg.workdir, "feature_density.npy"), density)
            with open(os.path.join(cfg.workdir, EVAL_FILE), "w") as f:
                json.dump(out, f, indent=1)
        return out

    start = int(jax.device_get(state["sae"].step))
    end = cfg.num_steps if stop_at is None else min(stop_at, cfg.num_steps)
    writer = MetricWriter(cfg.workdir)
    bar = ProgressBar(cfg.num_steps, start_step=start, enabled=cfg.progress_bar)
    tokens_per_step = cfg.batch_size
    summary: dict[str, Any] = {"eval": None, "interrupted": None, "resample_seconds": 0.0,
                               "resamples": []}
    window = {"sum": {}, "n": 0, "t": time.perf_counter(), "tokens_per_s": 0.0}
    counts = jax.jit(lambda c, m: c + m, donate_argnums=0)
    feature_counts = jnp.zeros((cfg.sae.n_features,), jnp.int32)
    last = {}

    def consume(step: int, metrics: dict) -> None:
        """Host side of step ``step`` (0-based): finiteness, logging, progress."""
        m = _host_scalars(metrics)
        try:
            check_finite(m, step + 1)
        except NonFiniteError as e:
            ckpt.wait()
            raise NonFiniteError(f"{e} Stopping; the last good checkpoint is step "
                                 f"{ckpt.latest_step()} in {ckpt.directory}.") from None
        last.update(m)
        for k, v in m.items():
            window["sum"][k] = window["sum"].get(k, 0.0) + v
        window["n"] += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            now = time.perf_counter()
            window["tokens_per_s"] = window["n"] * tokens_per_step / max(now - window["t"], 1e-9)
            avg = {k: v / window["n"] for k, v in window["sum"].items() if k != "nonfinite"}
            scalars = {f"train/{k}": v for k, v in avg.items()}
            scalars["perf/tokens_per_s"] = window["tokens_per_s"]
            writer.write_scalars(done, scalars)
            bar.update(done, {"loss": avg["loss"], "L0": avg["l0"],
                              "dead%": 100 * avg["frac_dead"], "tok/s": window["tokens_per_s"]})
            window.update(sum={}, n=0, t=now)

    def save(step: int) -> None:
        ckpt.save(step, state, data_state=source.get_state(), metadata=metadata)

    pending = None
    final = start
    try:
        with StopSignal() as stop:
            for step in range(start, end):
                if stop.signum is not None:
                    break
                dev, batch = source.next(state["source"])
                sae_state, metrics = train_step(state["sae"], prep(batch, scale))
                state = {"sae": sae_state, "source": dev}
                feature_counts = counts(feature_counts, metrics["feature_counts"])
                if pending is not None:
                    consume(*pending)
                pending = (step, metrics)
                done = step + 1
                resample = should_resample(cfg.sae, done)
                if resample or done % cfg.checkpoint_every == 0 or done % cfg.eval_every == 0:
                    consume(*pending)  # never resample, evaluate or save unchecked state
                    pending = None
                if resample:
                    t0 = time.perf_counter()
                    sample = prep(source.sample(cfg.sae.resample_sample_size), scale)
                    sae_state, info = dead_strategy(state["sae"], sample)
                    state = {**state, "sae": sae_state}
                    n_dead = int(info["n_dead"]) if "n_dead" in info else 0
                    dt = time.perf_counter() - t0
                    summary["resample_seconds"] += dt
                    summary["resamples"].append({"step": done, "n_dead": n_dead, "seconds": dt})
                    writer.write_scalars(done, {"resample/n_dead": n_dead, "perf/resample_seconds": dt})
                    logging.info("step %d: resampled %d dead features in %.2f s", done, n_dead, dt)
                if done % cfg.eval_every == 0:
                    summary["eval"] = run_eval(done)
                    density = parallel.to_host(feature_counts) / max(1, cfg.eval_every * cfg.batch_size)
                    alive = density[density > 0]
                    if alive.size:
                        writer.write_histogram(done, "train/log10_feature_density", np.log10(alive))
                    feature_counts = jnp.zeros_like(feature_counts)
                if done % cfg.checkpoint_every == 0:
                    save(done)
            if pending is not None:
                consume(*pending)
                pending = None
            final = int(jax.device_get(state["sae"].step))
            if stop.signum is not None:
                summary["interrupted"] = signal.Signals(stop.signum).name
                logging.warning("%s received: saving a checkpoint at step %d before exit",
                                summary["interrupted"], final)
            if final not in ckpt.all_steps():
                save(final)
        if final == cfg.num_steps and (summary["eval"] is None or summary["eval"]["step"] != final):
            summary["eval"] = run_eval(final)
    finally:
        ckpt.close()
        writer.close()
        bar.close()
    summary.update(step=final, train=last, tokens_per_s=window["tokens_per_s"],
                   seconds=time.perf_counter() - t_start, params=state["sae"].params)
    if summary["eval"]:
        e = summary["eval"]
        logging.info("step %d: loss recovered %.1f%% (mean-ablation %.1f%%), L0 %.1f, dead %d, "
                     "dense %d, explained variance %.3f", final, 100 * e["frac_loss_recovered"],
                     100 * e["frac_loss_recovered_mean_ablation"], e["l0"], e["dead_features"],
                     e["dense_features"], e["explained_variance"])
    return summary


def load_sae(workdir: str, *, step: int | None = None, mesh=None):
    """Restores a trained dictionary for analysis, onto ``mesh`` (any shape).

    Returns:
      (params, sae_config, metadata): ``SAEParams`` sharded for ``mesh`` (default all
      devices, data-parallel), the ``SAEConfig`` and the run's metadata (config, site,
      normalisation constants, LM location, step).
    """
    from saejax.config import MeshConfig, from_config

    mesh = mesh or parallel.make_mesh(MeshConfig())
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no SAE checkpoint in {workdir!r}")
        metadata = ckpt.restore_metadata(step)
        cfg = from_config(SAETrainConfig, metadata["config"])
        # Only the dictionary: the shuffle buffer saved beside it is laid out for the
        # training mesh and is not needed for analysis.
        state, _, _ = ckpt.restore({"sae": abstract_state(cfg.sae, mesh)}, step, partial=True)
    finally:
        ckpt.close()
    metadata["step"] = step
    return state["sae"].params, cfg.sae, metadata
