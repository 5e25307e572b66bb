"""The check that keeps the hand-written backward honest for every architecture.

:func:`check_backward` compares :func:`saejax.sae.model.forward_backward` with ``jax.grad``
of :func:`saejax.sae.model.per_input_loss` on a small random problem shaped like the
config, once per architecture and variant per process; ``make_train_step`` calls it before
building the step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from saejax.sae.config import SAEConfig
from saejax.sae import model
from saejax.sae.registry import get_architecture

_CHECKED: set[tuple] = set()


def check_backward(config: SAEConfig, *, rtol: float = 1e-4, atol: float = 1e-6,
                   sparse: bool = False) -> None:
    """Checks :func:`forward_backward` against ``jax.grad`` of :func:`per_input_loss`.

    Runs once per architecture (and layout) per process, on a small random float32 problem
    shaped like ``config`` (k, coefficients and the architecture kept; D 8, F >= 16,
    B 32), in the layout the train step will use. This keeps the one loss definition and
    its hand-written gradient from diverging for any registered architecture.

    Raises:
      RuntimeError: the loss or a gradient differs; the message names the architecture.
    """
    arch = get_architecture(config.architecture)
    feature_major = arch.feature_major and model.cpu_layout() and not arch.nested
    key = (arch.name, feature_major, config.decoder, config.jumprelu_threshold_param, config.target_l0 > 0,
           sparse)
    if key in _CHECKED:
        return
    # The sparse BatchTopK kernel runs only where its 2 k candidates per row leave features
    # out (F > 2 k), and takes the dense path when many rows keep more than 2 k: inputs of
    # nearly one direction keep the per-row counts even (its path is checked below).
    batch_sparse = sparse and arch.batch_wide
    d, f = 8, max(16, (4 if batch_sparse else 2) * config.k)
    # A penalty coefficient of 0 would leave the penalty's gradient unchecked for the
    # process (the check is cached per architecture): check with a live one. A wide
    # straight-through window makes the threshold gradients non-zero on this small problem.
    cfg = dataclasses.replace(config, d_in=d, n_features=f, precision="f32", aux_k=0,
                              l1_coefficient=config.l1_coefficient or 3e-2,
                              l0_coefficient=config.l0_coefficient or 3e-2,
                              target_l0=min(config.target_l0, 4.0), matryoshka_groups=(),
                              k_anneal_start=0, k_anneal_fraction=0.0, jumprelu_bandwidth=0.1,
                              init_decoder_norm=1.0 if config.decoder == "unit" else 0.5)
    rng = np.random.RandomState(0)
    x = rng.randn(32, d).astype(np.float32) + 0.5
    if batch_sparse:
        x = x[:1] + 0.05 * rng.randn(32, d).astype(np.float32)
    x = jnp.asarray(x)
    params = model.init_params(jax.random.PRNGKey(1), cfg, jnp.full((d,), 0.1, jnp.float32))
    params = params.replace(b_enc=jnp.asarray(rng.randn(f).astype(np.float32) * 0.1))
    specs = model.param_specs(cfg)
    params = params.replace(extra={
        name: v + jnp.asarray(np.abs(rng.randn(*v.shape)).astype(np.float32) * 0.2) if specs[name].trained else v
        for name, v in sorted(params.extra.items())})
    out = model.forward_backward(params, x, cfg, feature_major=feature_major, sparse=sparse)
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(model.per_input_loss(p, x, cfg)))(params)
    pairs = [("loss", out.loss, loss)] + [(k, getattr(out.grads, k), getattr(grads, k))
                                          for k in ("W_enc", "b_enc", "W_dec", "b_dec")]
    pairs += [(f"extra[{k!r}]", out.grads.extra[k], grads.extra[k]) for k in params.extra
              if specs[k].trained]
    bad = []
    if sparse and int(out.stats.get("path", 0)) == 2:
        bad.append("the problem (the sparse kernel fell back to the dense path, so it went unchecked)")
    for name, got, want in pairs:
        got, want = np.asarray(got), np.asarray(want)
        if not np.allclose(got, want, rtol=rtol, atol=atol):
            bad.append(f"{name} (max abs difference {float(np.max(np.abs(got - want))):.3g})")
    if bad:
        raise RuntimeError(
            f"SAE architecture {arch.name!r}: the hand-written backward "
            f"(model.forward_backward, feature_major={feature_major}, sparse={sparse}) disagrees with autodiff "
            f"of model.per_input_loss in {', '.join(bad)}; its activation or penalty breaks an "
            f"assumption of the shared backward")
    _CHECKED.add(key)
