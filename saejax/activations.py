"""Activation sources: every way an SAE run gets its [B, D] batches, behind one interface.

:class:`ActivationSource` is what the training loop sees. A source supplies

* batches (global ``jax.Array`` [B, D] sharded over "batch", in input units) through
  ``next(device_state)``, where ``device_state`` is the part of its position that lives on
  the devices (the shuffle buffer) and is checkpointed with the SAE state;
* the normalisation statistics (:class:`saejax.normalize.ActivationStats`) and the first
  rows for the geometric-median initialisation, from a fixed, reproducible sample;
* samples for the dead-feature strategy, from a second stream (its own seed), so drawing
  them never disturbs the training stream;
* its host position (``get_state`` / ``set_state``, JSON, checkpointed) and its identity
  (for the run record).

Sources:

* :class:`OnTheFlySource` (``source.kind="lm"``): the LM (:func:`lm_producer`) run over
  its token store, rows mixed by the device :class:`~saejax.buffer.ShuffleBuffer`. The
  buffer's refill counter is mirrored on the host, so serving a batch never waits for the
  device;
* :class:`StoreSource` (``"store"``): a harvested activation store, windowed chunk shuffle,
  every chunk verified when read;
* ``"arrays"``: .npy files (or arrays in memory) written once into an activation store by
  :func:`saejax.data.arrays.write_array_store`, then a :class:`StoreSource`.

Legend: B batch rows, T sequence, D activation width, S sample rows.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jaxtyping import Array, Float, Int

from saejax import parallel
from saejax.buffer import ShuffleBuffer
from saejax.config import ConfigError
from saejax.data.loader import ActivationLoader, LoaderConfig, TokenLoader
from saejax.normalize import ActivationStats

Producer = Callable[[Int[Array, "B T"]], Float[Array, "BT D"]]


def lm_producer(graphdef, params, site: str, mesh: jax.sharding.Mesh,
                context_len: int | None = None) -> Producer:
    """A jitted function tokens [B, T] -> activations [B*T', D] at ``site`` (float32).

    The forward stops after the site's layer (no logits). Rows keep the token batch's
    sharding over "batch", so no data moves between devices. With ``context_len`` only the
    first T' = context_len positions of each context are run (the LM's own context).
    """
    from saejax.lm.model import forward

    out_sharding = parallel.named_sharding(mesh, ("batch", None))

    @jax.jit
    def produce(tokens):
        tokens = tokens[:, :context_len]
        (acts,) = forward(graphdef, params, tokens, sites=(site,), logits=False).acts.values()
        acts = acts.reshape(-1, acts.shape[-1]).astype(jnp.float32)
        return jax.lax.with_sharding_constraint(acts, out_sharding)

    return produce


class LMSource(NamedTuple):
    """A restored LM ready to produce activations at one site."""

    graphdef: Any
    params: Any
    meta: dict          # the LM checkpoint's metadata (store_dir, step, ...)
    site: str           # canonical site name
    store: Any          # the token store the LM trained on
    context: int        # positions run per context (min of store seq_len and max_len)
    produce: Producer
    width: int          # D, the site's activation width


def restore_lm_source(lm_dir: str, site: str, mesh: jax.sharding.Mesh, *,
                      store_dir: str | None = None,
                      fields: tuple[str, str, str] = ("lm.dir", "lm.site", "lm.store_dir")
                      ) -> LMSource:
    """Restores an LM (a training run, or a local HF checkpoint) and its producer at ``site``.

    ``store_dir``: the token store to run it on (default: the one the LM checkpoint names;
    required for an imported HF checkpoint, which names none). ``fields``: the config fields
    of ``lm_dir``, ``site`` and ``store_dir``, for error messages.
    """
    from saejax.data.token_store import TokenStore, open_named
    from saejax.lm.model import split_lm
    from saejax.lm.restore import load_lm
    from saejax.lm.sites import canonical_site

    try:
        lm, meta = load_lm(lm_dir, mesh=mesh)
    except FileNotFoundError as e:
        raise ConfigError(f"config field {fields[0]!r} = {lm_dir!r} is invalid: {e}") from None
    graphdef, params = split_lm(lm)
    try:
        site = canonical_site(site, lm.cfg.n_layers)
    except ValueError as e:
        raise ConfigError(f"config field {fields[1]!r} = {site!r} is invalid: {e}") from None
    if store_dir:
        meta = {**meta, "store_dir": os.path.abspath(store_dir)}
    if "store_dir" not in meta:
        raise ConfigError(f"config field {fields[2]!r} = None is invalid: {lm_dir!r} names no "
                          f"token store (an imported HF checkpoint has none); set it to a token "
                          f"store built with the model's tokenizer")
    if store_dir:
        store = open_named(TokenStore.open, store_dir, fields[2])
    else:
        store = TokenStore.open(meta["store_dir"])
    if store.vocab_size > lm.cfg.vocab_size:
        raise ConfigError(f"config field {fields[2]!r} = {meta['store_dir']!r} is invalid: its "
                          f"tokenizer has {store.vocab_size} ids, more than the LM's vocabulary "
                          f"of {lm.cfg.vocab_size} (tokenize with the model's own tokenizer)")
    context = min(store.seq_len, lm.cfg.max_len)
    produce = lm_producer(graphdef, params, site, mesh, context_len=context)
    probe = jax.ShapeDtypeStruct((parallel.data_parallel_size(mesh), store.seq_len), jnp.int32)
    d = jax.eval_shape(produce, probe).shape[-1]
    return LMSource(graphdef, params, meta, site, store, context, produce, int(d))

# ---------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------


class ActivationSource(Protocol):
    """What the SAE training loop needs from a stream of activations (see module docstring)."""

    width: int

    def identity(self) -> dict: ...
    def activation_store(self) -> Any: ...
    def statistics(self) -> ActivationStats: ...
    def init_sample(self, n: int) -> Float[np.ndarray, "S D"]: ...
    def init_device_state(self) -> Any: ...
    def abstract_device_state(self) -> Any: ...
    def next(self, device_state: Any) -> tuple[Any, Float[Array, "B D"]]: ...
    def resample_sample(self, n: int) -> Float[Array, "S D"]: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


def _draw(stream, n: int) -> Float[Array, "S D"]:
    """The first n rows of as many batches of ``stream`` as needed, as float32."""
    parts, have = [], 0
    while have < n:
        parts.append(stream())
        have += parts[-1].shape[0]
    return jnp.concatenate(parts)[:n].astype(jnp.float32)


class OnTheFlySource:
    """LM activations through a device shuffle buffer (``source.kind="lm"``).

    Args:
      lm: the restored LM and its producer (:func:`restore_lm_source`).
      mesh: the device mesh.
      batch_size: SAE batch rows (global).
      lm_batch_size: contexts per producer call.
      buffer_rows: shuffle-buffer capacity.
      norm_sample_contexts: contexts of the statistics sample (the first train contexts).
      seed: token-stream and buffer seed (resampling samples use seed + 1).
      shuffle / window_chunks / prefetch: token loader settings.
    """

    def __init__(self, lm: LMSource, mesh: jax.sharding.Mesh, *, batch_size: int,
                 lm_batch_size: int, buffer_rows: int, norm_sample_contexts: int, seed: int,
                 shuffle: bool = True, window_chunks: int = 4, prefetch: int = 2):
        self.lm, self.mesh, self.width = lm, mesh, lm.width
        loader = LoaderConfig(batch_size=lm_batch_size, seed=seed, shuffle=shuffle,
                              num_epochs=None, window_chunks=window_chunks, prefetch=prefetch)
        field = "source.lm_batch_size"
        self.tokens = TokenLoader(lm.store, "train", loader, mesh, batch_field=field)
        self.sample_tokens = TokenLoader(lm.store, "train", dataclasses.replace(loader, seed=seed + 1),
                                         mesh, batch_field=field)
        self.buffer = ShuffleBuffer(mesh, buffer_rows, lm.width, batch_size, seed=seed)
        self._n_contexts, self._lm_batch = norm_sample_contexts, lm_batch_size
        self._served: int | None = None  # host mirror of the buffer's served counter
        self._sample: np.ndarray | None = None

    def identity(self) -> dict:
        return {"kind": "lm", "token_store": self.lm.store.directory,
                "fingerprint": self.lm.store.metadata.get("fingerprint")}

    def activation_store(self) -> None:
        return None  # activations are made on the fly

    def _rows(self) -> Float[Array, "R D"]:
        return self.lm.produce(next(self.tokens))

    def _statistics_sample(self) -> np.ndarray:
        """Activations of the first train contexts (a fixed set), the same on every process."""
        if self._sample is None:
            store, batch = self.lm.store, self._lm_batch
            n = max(batch, self._n_contexts // batch * batch)
            n = min(n, store.rows("train") // batch * batch)
            lo, hi = parallel.process_rows(self.mesh, batch)  # this process's rows of a batch
            rows = []
            for a in range(0, n, batch):
                tokens = parallel.host_to_global(store.read("train", a + lo, a + hi), self.mesh,
                                                 ("batch", None))
                rows.append(np.asarray(multihost_utils.process_allgather(
                    self.lm.produce(tokens), tiled=True)))
            self._sample = np.concatenate(rows).astype(np.float32)
        return self._sample

    def statistics(self) -> ActivationStats:
        return ActivationStats.from_rows(self._statistics_sample())

    def init_sample(self, n: int) -> Float[np.ndarray, "S D"]:
        return self._statistics_sample()[:n]

    def init_device_state(self):
        self._served = None
        return {"buffer": self.buffer.fill(self.buffer.empty(), self._rows)}

    def abstract_device_state(self):
        return {"buffer": self.buffer.abstract_state()}

    def next(self, dev):
        buf = dev["buffer"]
        if self._served is None:  # once, after initialisation or a restore
            self._served = int(buf.served)
        if self.buffer.needs_refill(self._served):
            buf, self._served = self.buffer.refill(buf, self._rows), 0
        buf, batch = self.buffer.take(buf)
        self._served += 1
        return {"buffer": buf}, batch

    def resample_sample(self, n: int) -> Float[Array, "S D"]:
        return _draw(lambda: self.lm.produce(next(self.sample_tokens)), n)

    def get_state(self) -> dict:
        return {"tokens": self.tokens.get_state(), "sample": self.sample_tokens.get_state()}

    def set_state(self, state: dict) -> None:
        self.tokens.set_state(state["tokens"])
        self.sample_tokens.set_state(state["sample"])
        self._served = None


class StoreSource:
    """Batches from an activation store (``source.kind`` "store" or "arrays").

    Args:
      store: an ``ActivationStore`` or its directory.
      mesh: the device mesh.
      batch_size: SAE batch rows (global).
      seed: shuffle seed (resampling samples use seed + 1).
      shuffle / window_chunks / prefetch: loader settings.
      kind: the source kind recorded in the identity.
    """

    def __init__(self, store, mesh: jax.sharding.Mesh, *, batch_size: int, seed: int,
                 shuffle: bool = True, window_chunks: int = 4, prefetch: int = 2,
                 kind: str = "store"):
        loader = LoaderConfig(batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=None,
                              window_chunks=window_chunks, prefetch=prefetch)
        self.acts = ActivationLoader(store, loader, mesh, batch_field="batch_size")
        self.store = self.acts.store
        self.samples = ActivationLoader(self.store, dataclasses.replace(loader, seed=seed + 1),
                                        mesh, batch_field="batch_size")
        self.width, self.kind = self.store.d, kind

    def activation_store(self):
        """The ``ActivationStore`` it reads."""
        return self.store

    def identity(self) -> dict:
        plan = self.store.metadata["plan"]
        return {"kind": self.kind, "store": os.path.abspath(self.store.directory),
                "rows": self.store.rows, "fingerprint": self.store.fingerprint,
                "site": plan.get("site"), "lm": plan.get("lm")}

    def statistics(self) -> ActivationStats:
        return self.store.statistics()

    def init_sample(self, n: int) -> Float[np.ndarray, "S D"]:
        """The first n rows of the store, in file order (whole chunks read)."""
        chunks = -(-min(n, self.store.rows) // self.store.chunk_rows)
        return np.concatenate([np.asarray(self.store.read_chunk(i), np.float32)
                               for i in range(chunks)])[:n]

    def init_device_state(self):
        return {}

    def abstract_device_state(self):
        return {}

    def next(self, dev):
        return dev, next(self.acts)

    def resample_sample(self, n: int) -> Float[Array, "S D"]:
        return _draw(lambda: next(self.samples), n)

    def get_state(self) -> dict:
        return {"acts": self.acts.get_state(), "sample": self.samples.get_state()}

    def set_state(self, state: dict) -> None:
        self.acts.set_state(state["acts"])
        self.samples.set_state(state["sample"])
