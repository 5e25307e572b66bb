"""Restore a trained run for analysis: the dictionary, its LM and the tokenizer, on any mesh.

    run = restore_run("runs/demo/sae")                      # all devices, data-parallel
    f = run.encode_text("def main():\\n    return 0")        # [T, F] feature activations
    acts = run.activations(tokens)                           # [B*T, D] LM activations
    f = run.feature_activations_over_store(split="val", num_contexts=256)

Everything numeric is one jitted function per shape, with token batches sharded over
"batch" and the dictionary over "latent" (see :mod:`saejax.parallel`). Feature activations
are in the SAE's (normalised) units; reconstructions in the LM's units (the bundle's
``encode`` / ``decode`` apply the run's normaliser).

Legend: B contexts, T tokens, D site width, F features.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from saejax import parallel
from saejax.config import ConfigError, MeshConfig
from saejax.lm.model import forward, lm_module, split_lm
from saejax.record import SAERunRecord, load_sae
from saejax.sae.bundle import SAEBundle


@dataclasses.dataclass
class Run:
    """A restored SAE run. Build it with :func:`restore_run`."""

    sae: SAEBundle
    lm: Any
    tokenizer: Any
    store: Any
    mesh: jax.sharding.Mesh
    record: SAERunRecord

    def __post_init__(self):
        graphdef, self._lm_params = split_lm(self.lm)
        site = self.sae.site
        rows = parallel.named_sharding(self.mesh, ("batch", None))

        def acts_fn(lm_params, tokens):
            (acts,) = forward(graphdef, lm_params, tokens, sites=(site,),
                              logits=False).acts.values()
            return acts.reshape(-1, acts.shape[-1]).astype(jnp.float32)

        self._acts = jax.jit(acts_fn, out_shardings=rows)
        self._encode = jax.jit(lambda sae, x: sae.encode(x),
                               out_shardings=parallel.named_sharding(self.mesh, ("batch", "latent")))
        self._decode = jax.jit(lambda sae, f: sae.decode(f), out_shardings=rows)

    # -- activations ------------------------------------------------------------------
    def _global(self, tokens: np.ndarray) -> jax.Array:
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
        return parallel.host_to_global(tokens, self.mesh, ("batch", None))

    def activations(self, tokens: Int[np.ndarray, "B T"]) -> Float[Array, "BT D"]:
        """LM activations at the dictionary's site (B must divide over "data")."""
        return self._acts(self._lm_params, self._global(tokens))

    def _rows(self, fn, x) -> jax.Array:
        """``fn(sae, x)`` on rows sharded over "batch": padded to a multiple of the
        data-parallel size (any N works), the padding cut off again."""
        x = jnp.asarray(x, jnp.float32)
        n = x.shape[0]
        pad = -n % parallel.data_parallel_size(self.mesh)
        if pad:
            x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
        out = fn(self.sae, x)
        return out[:n] if pad else out

    def encode(self, acts: Float[Array, "N D"]) -> Float[Array, "N F"]:
        """Feature activations of LM activations (normalisation applied; any N)."""
        return self._rows(self._encode, acts)

    def decode(self, f: Float[Array, "N F"]) -> Float[Array, "N D"]:
        """Reconstruction in the LM's units (any N)."""
        return self._rows(self._decode, f)

    def features(self, tokens: Int[np.ndarray, "B T"]) -> Float[Array, "BT F"]:
        return self.encode(self.activations(tokens))

    def encode_text(self, text: str) -> Float[np.ndarray, "T F"]:
        """Feature activations for each token of ``text`` (one context, padded to shard)."""
        ids = self.tokenizer.encode(text)[: self.lm_config.max_len]
        if not ids:
            raise ValueError("text encodes to no tokens")
        n = parallel.data_parallel_size(self.mesh)
        tokens = np.zeros((n, len(ids)), np.int32)
        tokens[:] = ids
        return np.asarray(self.features(tokens))[: len(ids)]

    def feature_activations_over_store(self, split: str = "val", num_contexts: int = 256,
                                       batch_contexts: int | None = None
                                       ) -> Float[np.ndarray, "N F"]:
        """Feature activations over the first contexts of a token-store split, batched."""
        n = parallel.data_parallel_size(self.mesh)
        b = batch_contexts or max(n, 32 // n * n)
        total = min(num_contexts, self.store.rows(split)) // b * b
        if total == 0:
            raise ValueError(f"split {split!r} has fewer than one batch ({b}) of contexts")
        t = min(self.store.seq_len, self.lm_config.max_len)
        out = [np.asarray(self.features(self.store.read(split, a, a + b)[:, :t]))
               for a in range(0, total, b)]
        return np.concatenate(out)

    @property
    def lm_config(self):
        return lm_module(self.lm).cfg


def restore_run(workdir: str, *, member: str | None = None, mesh: jax.sharding.Mesh | None = None,
                step: int | None = None) -> Run:
    """Restores an SAE training run (``launch/train_sae.py``'s workdir) for analysis.

    Args:
      workdir: the SAE run's workdir (or a sweep's).
      member: the dictionary of a sweep to restore (required for a sweep's workdir).
      mesh: target mesh (any shape; default all devices, data-parallel).
      step: checkpoint step (default latest).
    """
    from saejax.data.token_store import TokenStore
    from saejax.lm.restore import load_lm

    mesh = mesh or parallel.make_mesh(MeshConfig())
    sae, record = load_sae(workdir, step=step, mesh=mesh, member=member)
    if record.lm is None or record.lm.token_store is None:
        raise ConfigError(f"SAE run {workdir!r} was trained without a saejax LM; restore its "
                          f"dictionary with saejax.record.load_sae (encode / decode work "
                          f"on activations) instead of restore_run")
    lm, _ = load_lm(record.lm.dir, step=record.lm.step, mesh=mesh)  # the one it trained on
    store = TokenStore.open(record.lm.token_store)
    return Run(sae=sae, lm=lm, tokenizer=store.tokenizer(), store=store, mesh=mesh, record=record)
