"""Per-device memory estimate of SAE training for a config, mesh and batch size.

Counts what a step keeps live: params, Adam moments (sharded like the params), the
per-feature counters, the donated state's new copy during the update, the batch, and the
[B, F] activations of forward and backward (pre-activations, features, their gradients).
An estimate for planning (XLA may fuse some [B, F] buffers away), not a measurement.
"""

from __future__ import annotations

from jax.sharding import Mesh

from saejax.parallel import named_sharding
from saejax.sae.config import SAEConfig


def _axis_size(mesh: Mesh, logical: str) -> int:
    axis = named_sharding(mesh, (logical,)).spec[0]
    return 1 if axis is None else mesh.shape[axis]


def estimate_memory(config: SAEConfig, mesh: Mesh, batch_size: int) -> dict[str, int]:
    """Bytes per device, by component and in total.

    Args:
      config: SAE config (d_in, n_features).
      mesh: the mesh the step runs on (latent and batch shard sizes).
      batch_size: global batch rows.

    Returns:
      Dict with "params", "optimizer", "counters", "update_copy", "batch", "activations"
      and "total", each in bytes on one device.
    """
    d, f = config.d_in, config.n_features
    m, b = _axis_size(mesh, "latent"), _axis_size(mesh, "batch")
    f_local = -(-f // m)
    b_local = -(-batch_size // b)
    from saejax.sae import model, registry

    specs = model.param_specs(config)
    n_extra = sum(f_local if spec.per_feature else 1 for spec in specs.values())
    params = 4 * (2 * d * f_local + f_local + d + n_extra)
    out = {
        "params": params,
        "optimizer": 2 * params,
        "counters": 4 * f_local,
        # Donation reuses the state buffers, but gradients and updates coexist with them.
        "update_copy": 2 * params,
        "batch": 4 * b_local * d * 2,
        # pre, f, d_f, d_pre in f32 (+ bf16 copies of f and d_pre in bf16 mode); Gated's
        # auxiliary reconstruction adds its gate features and their gradient.
        "activations": b_local * f_local * (4 * 4 + (2 * 2 if config.precision == "bf16" else 0)
                                            + (2 * 4 if registry.get_architecture(config.architecture).aux_recon
                                               else 0)),
    }
    out["total"] = sum(out.values())
    return out
