"""Feature splitting across dictionary sizes: match features by decoder cosine similarity.

Bricken et al. compare runs of 512, 4,096 and 16,384 features: one feature of a small
dictionary reappears in a larger one as a family of more specific features. Here every
feature of the large dictionary is assigned to its nearest small-dictionary feature (the
*parent*: highest cosine similarity of decoder vectors, if at least ``min_cosine``), and a
small feature's *children* are the large features assigned to it. A small feature with
several children has split; one with a single close child has carried over; one with
none has no counterpart.

Similarities are computed ``chunk`` large features at a time (jitted, one compilation), so
a 131,072-feature dictionary never materialises the full [F1, F2] matrix.

Legend: F1 small-dictionary features, F2 large-dictionary features, C chunk, D site width.
"""

from __future__ import annotations

import functools
import html
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from saejax.sae.model import unit_rows


@functools.partial(jax.jit, static_argnames=("k",))
def _chunk_match(small: Float[Array, "F1 D"], large: Float[Array, "C D"], *, k: int):
    cos = jnp.dot(large, small.T, precision=jax.lax.Precision.HIGHEST)  # [C, F1]
    best_small = jnp.argmax(cos, axis=1)
    best_cos = jnp.max(cos, axis=1)
    top_large_cos, top_large = jax.lax.top_k(cos.T, k)  # [F1, k] within the chunk
    return best_small, best_cos, top_large_cos, top_large


def decoder_cosine(w_small: Float[Array, "F1 D"], w_large: Float[Array, "F2 D"]
                   ) -> Float[Array, "F1 F2"]:
    """Cosine similarity of every pair of decoder vectors (small dictionaries only)."""
    return jnp.dot(unit_rows(jnp.asarray(w_small, jnp.float32)),
                   unit_rows(jnp.asarray(w_large, jnp.float32)).T,
                   precision=jax.lax.Precision.HIGHEST)


def match_features(w_small: Float[Array, "F1 D"], w_large: Float[Array, "F2 D"], *,
                   min_cosine: float = 0.5, chunk: int = 8192, nearest: int = 3
                   ) -> dict[str, Any]:
    """Matches the features of two dictionaries over the same site by decoder cosine.

    Args:
      w_small: decoder of the small dictionary (rows = dictionary vectors).
      w_large: decoder of the large dictionary.
      min_cosine: a large feature whose best cosine is below this has no parent.
      chunk: large-dictionary rows per jitted block.
      nearest: for each small feature also report its ``nearest`` most similar large
        features (whatever their parents), to see near misses.

    Returns:
      A JSON-serialisable dict: ``parent`` [F2] (small id or -1), ``parent_cos`` [F2],
      ``children`` [F1] lists of [large id, cosine] sorted by cosine, ``nearest`` [F1]
      lists of [large id, cosine], and ``summary`` counts (split = >= 2 children,
      carried = exactly 1, unmatched = 0).
    """
    small = unit_rows(jnp.asarray(w_small, jnp.float32))
    large = unit_rows(jnp.asarray(w_large, jnp.float32))
    if small.shape[1] != large.shape[1]:
        raise ValueError(f"decoders have different widths: {small.shape[1]} vs "
                         f"{large.shape[1]} (match dictionaries of the same site)")
    f1, f2 = small.shape[0], large.shape[0]
    chunk = min(chunk, f2)
    k = min(nearest, chunk)
    pad = (-f2) % chunk
    large = jnp.concatenate([large, jnp.zeros((pad, large.shape[1]), large.dtype)])
    parents, pcos, near_cos, near_ids = [], [], [], []
    for s in range(0, f2 + pad, chunk):
        b, c, tc, ti = _chunk_match(small, large[s:s + chunk], k=k)
        parents.append(np.asarray(b))
        pcos.append(np.asarray(c))
        near_cos.append(np.asarray(tc))
        near_ids.append(np.asarray(ti) + s)
    parent = np.concatenate(parents)[:f2]
    parent_cos = np.concatenate(pcos)[:f2]
    parent = np.where(parent_cos >= min_cosine, parent, -1)
    # Merge the per-chunk nearest lists (padding rows have cosine 0 and id >= f2).
    nc, ni = np.concatenate(near_cos, axis=1), np.concatenate(near_ids, axis=1)
    nc = np.where(ni < f2, nc, -np.inf)
    order = np.argsort(-nc, axis=1, kind="stable")[:, :k]
    children: list[list] = [[] for _ in range(f1)]
    for j in np.argsort(-parent_cos, kind="stable"):
        if parent[j] >= 0:
            children[parent[j]].append([int(j), round(float(parent_cos[j]), 4)])
    n_children = np.asarray([len(c) for c in children])
    return {
        "n_small": f1, "n_large": f2, "min_cosine": min_cosine,
        "parent": parent.tolist(), "parent_cos": [round(float(x), 4) for x in parent_cos],
        "children": children,
        "nearest": [[[int(ni[i, o]), round(float(nc[i, o]), 4)] for o in order[i]]
                    for i in range(f1)],
        "summary": {"split": int(np.sum(n_children >= 2)), "carried": int(np.sum(n_children == 1)),
                    "unmatched": int(np.sum(n_children == 0)),
                    "orphans": int(np.sum(parent < 0))},
    }


def splitting_table(match: dict[str, Any], *, fmt: str = "markdown", max_rows: int = 50,
                    max_children: int = 8, small_name: str = "small", large_name: str = "large",
                    labels: dict[str, dict[int, str]] | None = None) -> str:
    """A table of the small features that split most, as Markdown or HTML.

    Args:
      match: the output of :func:`match_features`.
      fmt: "markdown" or "html".
      max_rows: small features shown (those with most children first).
      max_children: children listed per row.
      small_name, large_name: column titles (e.g. "A/0 (512)", "A/1 (4,096)").
      labels: optional {"small": {id: text}, "large": {id: text}} shown next to ids (e.g.
        each feature's top token); HTML output escapes them.
    """
    if fmt not in ("markdown", "html"):
        raise ValueError(f"fmt must be 'markdown' or 'html', got {fmt!r}")
    labels = labels or {}
    order = sorted(range(match["n_small"]),
                   key=lambda i: (-len(match["children"][i]), i))[:max_rows]

    def name(kind: str, i: int) -> str:
        text = labels.get(kind, {}).get(i)
        return f"{i} ({text})" if text else str(i)

    rows = []
    for i in order:
        kids = match["children"][i]
        shown = [f"{name('large', j)}: {c:.2f}" for j, c in kids[:max_children]]
        if len(kids) > max_children:
            shown.append(f"... +{len(kids) - max_children}")
        rows.append((name("small", i), str(len(kids)), shown))
    head = (f"{small_name} feature", "children", f"{large_name} features (cosine)")
    if fmt == "markdown":
        esc = lambda s: s.replace("|", "\\|")  # noqa: E731
        lines = [f"| {' | '.join(head)} |", "|---|---:|---|"]
        lines += [f"| {esc(a)} | {b} | {esc(', '.join(c))} |" for a, b, c in rows]
        return "\n".join(lines) + "\n"
    e = html.escape
    body = "".join(f"<tr><td>{e(a)}</td><td>{b}</td><td>{'<br>'.join(e(x) for x in c)}</td></tr>"
                   for a, b, c in rows)
    ths = "".join(f"<th>{e(h)}</th>" for h in head)
    return (f"<table class=\"splitting\"><thead><tr>{ths}</tr></thead><tbody>{body}</tbody>"
            "</table>\n")
