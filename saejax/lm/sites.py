"""Named activation sites of the transformer and interventions on them.

A *site* is a named intermediate of the forward pass: ``blocks.{l}.{kind}`` with ``kind`` one
of :data:`SITE_KINDS`; the short form ``{kind}`` means layer 0 (the paper's one-layer model).

An *intervention* is a small pytree dataclass (array fields are traced data; the site name and
any function are static) whose ``__call__`` maps the site's activations to new activations.
The forward pass applies every intervention at its site, in order, and the rest of the network
sees the result. Because they are pytrees they pass through ``jax.jit`` as ordinary arguments;
changing a function (not its parameters) recompiles.

Legend: B batch, T sequence, D site width (d_model or d_mlp).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float

# Order inside one block: resid.pre -> attn.out -> resid.mid -> mlp.pre -> mlp.post -> mlp.out
# -> resid.post.
SITE_KINDS = ("resid.pre", "attn.out", "resid.mid", "mlp.pre", "mlp.post", "mlp.out",
              "resid.post")


def site_name(kind: str, layer: int = 0) -> str:
    """Canonical site name, e.g. ``site_name("mlp.post") == "blocks.0.mlp.post"``."""
    if kind not in SITE_KINDS:
        raise ValueError(f"unknown site kind {kind!r}; known: {list(SITE_KINDS)}")
    return f"blocks.{layer}.{kind}"


def canonical_site(name: str, n_layers: int) -> str:
    """Validates a site name and expands the short form; raises ValueError naming valid ones."""
    full = name if name.startswith("blocks.") else f"blocks.0.{name}"
    parts = full.split(".", 2)
    ok = (len(parts) == 3 and parts[1].isdigit() and int(parts[1]) < n_layers
          and parts[2] in SITE_KINDS)
    if not ok:
        raise ValueError(f"unknown activation site {name!r}; valid: blocks.<0..{n_layers - 1}>."
                         f"<kind> (or <kind> for layer 0) with kind in {list(SITE_KINDS)}")
    return full


def site_layer_and_kind(name: str) -> tuple[int, str]:
    _, layer, kind = name.split(".", 2)
    return int(layer), kind


@struct.dataclass
class Replace:
    """Replaces the activations by ``fn(params, acts)``: the SAE splice (encode + decode).

    ``fn`` must be a hashable, pure function (e.g. a module-level function); ``params`` is any
    pytree of arrays (the SAE parameters) and is traced, so new parameters do not recompile.
    """

    site: str = struct.field(pytree_node=False)
    fn: Callable[[Any, Array], Array] = struct.field(pytree_node=False)
    params: Any = None

    def __call__(self, acts: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self.fn(self.params, acts).astype(acts.dtype)


@struct.dataclass
class Ablate:
    """Sets the activations to ``value`` (broadcast over [B, T]): zero- or mean-ablation."""

    site: str = struct.field(pytree_node=False)
    value: Float[Array, " D"] | float = 0.0

    @classmethod
    def zero(cls, site: str) -> Ablate:
        return cls(site=site, value=0.0)

    @classmethod
    def mean(cls, site: str, mean: Float[Array, " D"]) -> Ablate:
        return cls(site=site, value=jnp.asarray(mean))

    def __call__(self, acts: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return jnp.broadcast_to(jnp.asarray(self.value, acts.dtype), acts.shape)


@struct.dataclass
class Add:
    """Adds ``scale * vector`` at every position: steering along a direction."""

    site: str = struct.field(pytree_node=False)
    vector: Float[Array, " D"] = None
    scale: float | Array = 1.0

    def __call__(self, acts: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return acts + (self.scale * self.vector).astype(acts.dtype)


@struct.dataclass
class Clamp:
    """Pins a scalar function of the activations to ``value`` by moving along ``direction``.

    With ``read_fn`` unset the pinned quantity is the projection ``acts . direction /
    |direction|^2``, which the result sets exactly to ``value``. With ``read_fn(read_params,
    acts) -> [B, T]`` (e.g. one SAE feature's activation) the result is ``acts + (value -
    read) * direction`` (with ``direction`` the feature's decoder vector this pins the feature
    in the reconstruction: pinned-feature sampling).
    """

    site: str = struct.field(pytree_node=False)
    direction: Float[Array, " D"] = None
    value: float | Array = 0.0
    read_fn: Callable[[Any, Array], Array] | None = struct.field(pytree_node=False, default=None)
    read_params: Any = None

    def __call__(self, acts: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        d = self.direction.astype(jnp.float32)
        x = acts.astype(jnp.float32)
        if self.read_fn is None:
            current = x @ d / jnp.sum(d * d)
        else:
            current = self.read_fn(self.read_params, acts).astype(jnp.float32)
        return (x + (self.value - current)[..., None] * d).astype(acts.dtype)


Intervention = Replace | Ablate | Add | Clamp


def group_by_site(interventions: Sequence[Intervention], n_layers: int
                  ) -> dict[str, list[Intervention]]:
    """Canonical site name -> interventions there, in the given order."""
    out: dict[str, list[Intervention]] = {}
    for iv in interventions:
        out.setdefault(canonical_site(iv.site, n_layers), []).append(iv)
    return out
