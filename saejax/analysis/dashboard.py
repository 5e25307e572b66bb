"""Static HTML dashboard of unit statistics (SAE features, or LM neurons beside them).

    write_dashboard(stats, "runs/x/dashboard", metrics_path="runs/x/metrics.jsonl",
                    neurons=neuron_stats)   # optional: the LM's MLP neurons, same format
    # open runs/x/dashboard/index.html (works from file://, no server, no network)

Layout (``neurons/`` has the same layout, without training plots, and links back)::

  index.html     summary, plots, and a table of every unit: client-side paging (100 rows a
                 page), sorting by any column, search over id, top token, top logit tokens,
                 tags, interpretability explanation and the text of the top contexts
  feature.html   one unit: feature.html?id=N (see saejax.analysis.dashboard_unit)
  data/          meta.js, vocab.js, index.js, search.js, shard_<k>.js (compact; see
                 saejax.analysis.dashboard_data)
  plots/         density.png, l0.png, training_<metric>.png (one per metric),
                 interp_comparison.png (features vs neurons, when both are scored)

Safety: text written into markup is HTML-escaped; the data files are JSON literals with
``<``, ``>``, ``&``, U+2028/9 escaped; the scripts only ever set ``textContent``.
"""

from __future__ import annotations

import glob
import html
import os
import shutil
from collections.abc import Sequence
from typing import Any

from saejax.analysis import plots
from saejax.analysis.dashboard_assets import COMMON_JS, CSS, INDEX_JS
from saejax.analysis.dashboard_data import (
    LEVELS, Encoder, index_columns, interp_aurocs, js_json, sig, silent_ids, tag_bits)
from saejax.analysis.dashboard_unit import unit_page

SHARD_SIZE = 128  # units per data/shard_<k>.js
PAGE_SIZE = 100  # index rows per page


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _fmt(x: Any) -> str:
    x = sig(x, 3)
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    return f"{x:.2e}" if abs(x) < 1e-3 else f"{x:g}"


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _labels(stats: dict) -> tuple[str, str, str]:
    """(unit, label, plural) of the stats' units, e.g. ("feature", "Feature", "features")."""
    unit = stats["meta"].get("unit") or "feature"
    return unit, unit.capitalize(), unit + "s"


def write_data(stats: dict, data_dir: str, *, title: str, other: dict | None = None,
               shard_size: int = SHARD_SIZE) -> None:
    """Writes ``data_dir``'s meta.js, vocab.js, index.js, search.js and shard files."""
    feats = stats["features"]
    for j, f in enumerate(feats):
        if f["id"] != j:
            raise ValueError(f"stats['features'][{j}] has id {f['id']}: ids must be 0..F-1")
    os.makedirs(data_dir, exist_ok=True)
    unit, label, plural = _labels(stats)
    enc = Encoder(stats)
    enc.widen(stats)
    tags = tag_bits(stats)
    meta = stats["meta"]
    info = {"unit": unit, "label": label, "plural": plural, "title": title, "n": len(feats),
            "shard_size": shard_size, "n_shards": -(-len(feats) // shard_size),
            "page_size": PAGE_SIZE, "tok_digits": enc.tok_digits, "pos_digits": enc.pos_digits,
            "levels": LEVELS, "before": enc.before, "site": meta.get("site"),
            "logit_mode": meta.get("logit_mode", "fold_ln"), "other": other}
    _write(os.path.join(data_dir, "meta.js"), f"window.SAEJAX_META = {js_json(info)};\n")
    _write(os.path.join(data_dir, "vocab.js"),
           f"window.SAEJAX_VOCAB = {js_json(stats.get('vocab'))};\n")
    _write(os.path.join(data_dir, "index.js"),
           f"window.SAEJAX_INDEX = {js_json({'columns': index_columns(stats, tags)})};\n")
    mact = stats.get("mean_act_active") or [None] * len(feats)
    search = []
    for k in range(info["n_shards"]):
        units = []
        for f in feats[k * shard_size:(k + 1) * shard_size]:
            rec, codes = enc.unit(f, tags[f["id"]])
            rec["ma"] = sig(mact[f["id"]])
            units.append(rec)
            search.append(codes)
        _write(os.path.join(data_dir, f"shard_{k}.js"),
               f"saejaxShard({k}, {js_json({'k': k, 'units': units})});\n")
    _write(os.path.join(data_dir, "search.js"), f"window.SAEJAX_SEARCH = {js_json(search)};\n")


def _summary_html(stats: dict, title: str, other: dict | None) -> str:
    meta, summ = stats["meta"], stats.get("summary") or {}
    unit, label, plural = _labels(stats)
    n = len(stats["features"])
    silent = summ.get("silent", summ.get("dead", len(silent_ids(stats))))
    split = f" of the {_e(meta['split'])} split" if meta.get("split") else ""
    parts = [f"<h1>{_e(title)}</h1>"]
    if other:
        parts.append(f"<div class=\"nav\"><a href=\"{_e(other['href'])}\">"
                     f"{_e(other['label'])}</a></div>")
    parts.append(f"<div class=\"meta\">site {_e(meta.get('site'))} &middot; {n} {plural} &middot;"
                 f" {_e(meta.get('n_tokens'))} tokens ({_e(meta.get('n_contexts'))} contexts of "
                 f"{_e(meta.get('seq_len'))}{split}) &middot; norm_scale "
                 f"{_e(_fmt(meta.get('norm_scale')))}</div>")
    counts = [f"alive {_e(summ.get('alive'))}",
              f"silent (never fired on the analysed tokens) {_e(silent)}",
              f"ultralow-density {_e(summ.get('ultralow'))} (density &lt; "
              f"{_e(_fmt(meta.get('ultralow_threshold')))})",
              f"dense {_e(summ.get('dense'))} (density &gt; "
              f"{_e(_fmt(meta.get('dense_threshold')))})",
              f"mean L0 {_e(_fmt(summ.get('mean_l0')))}"]
    td = meta.get("train_dead")
    if isinstance(td, dict) and td.get("fraction") is not None:
        counts.append(f"dead (silent for the last {_e(td.get('window'))} training steps): "
                      f"{100 * float(td['fraction']):.1f}%")
    parts.append("<p>" + " &middot; ".join(counts) + "</p>")
    ip = summ.get("interp")
    if isinstance(ip, dict) and ip.get("n_scored"):
        parts.append(f"<p>interpretability: {_e(ip['n_scored'])} {plural} scored, median "
                     f"held-out AUROC {_e(_fmt(ip.get('auroc_median')))}</p>")
    return "".join(parts)


def index_page(stats: dict, images: Sequence[tuple[str, Sequence[str]]] = (),
               title: str = "saejax features", other: dict | None = None) -> str:
    """The HTML of the index; ``images`` are (heading, PNG paths relative to the index)."""
    _, _, plural = _labels(stats)
    plots_html = "".join(
        f"<h2>{_e(head)}</h2><div class=\"plots\">"
        + "".join(f"<img src=\"{_e(p)}\" alt=\"{_e(os.path.basename(p))}\" loading=\"lazy\">"
                  for p in paths) + "</div>" for head, paths in images if paths)
    controls = ("<h2>All " + _e(plural) + "</h2><div class=\"controls\"><input type=\"search\" "
                "id=\"search\" placeholder=\"#id, token, tag, explanation or context text\" "
                "aria-label=\"search\"> <label><input type=\"checkbox\" id=\"hide-silent\" "
                "checked> hide silent</label> <span class=\"pager\"><button id=\"prev\" "
                "type=\"button\">&larr; prev</button><span id=\"page\"></span><button "
                "id=\"next\" type=\"button\">next &rarr;</button></span> <span id=\"shown\" "
                "class=\"meta\"></span></div>")
    table = ("<table id=\"units\"><thead id=\"head\"></thead><tbody id=\"rows\"></tbody>"
             "</table>")
    body = (_summary_html(stats, title, other) + plots_html + controls + table
            + "\n<script src=\"data/meta.js\"></script>\n<script src=\"data/vocab.js\"></script>"
            "\n<script src=\"data/index.js\"></script>\n<script src=\"data/search.js\"></script>\n"
            f"<script>{COMMON_JS}{INDEX_JS}</script>\n")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n{body}</body>"
            "</html>\n")


def _write_one(stats: dict, out_dir: str, *, title: str, other: dict | None,
               make_plots: bool, metrics_path: str | None,
               extra_images: Sequence[str] = ()) -> str:
    """Writes one dashboard (index, unit page, data, plots) and returns its index path."""
    unit, label, plural = _labels(stats)
    os.makedirs(out_dir, exist_ok=True)
    images: list[tuple[str, list[str]]] = []
    if make_plots:
        pdir = os.path.join(out_dir, "plots")
        stat_imgs = [
            plots.plot_density_histogram(stats["density"], os.path.join(pdir, "density.png"),
                                         ultralow_threshold=stats["meta"].get("ultralow_threshold"),
                                         title=f"{label} density", unit=unit),
            plots.plot_l0_histogram(stats.get("l0_hist") or [0], os.path.join(pdir, "l0.png"),
                                    unit=unit)]
        images.append((f"{label} statistics",
                       [os.path.relpath(p, out_dir) for p in [*stat_imgs, *extra_images]]))
        if metrics_path and os.path.isfile(metrics_path):
            curves = plots.plot_training_curves(metrics_path, pdir, allow_empty=True)
            images.append(("Training curves", [os.path.relpath(p, out_dir) for p in curves]))
    write_data(stats, os.path.join(out_dir, "data"), title=title, other=other)
    _write(os.path.join(out_dir, "feature.html"), unit_page())
    index = os.path.join(out_dir, "index.html")
    _write(index, index_page(stats, images, title, other))
    return index


def clear_previous(out_dir: str) -> None:
    """Removes what a dashboard (this layout or the old one) wrote into ``out_dir``."""
    for name in ("data", "plots", "neurons"):
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
    old = os.path.join(out_dir, "features")
    if os.path.isdir(old):
        for f in glob.glob(os.path.join(old, "*.html")):
            os.remove(f)
        if not os.listdir(old):
            os.rmdir(old)


def write_dashboard(stats: dict[str, Any], out_dir: str, *, metrics_path: str | None = None,
                    title: str = "saejax features", make_plots: bool = True,
                    neurons: dict[str, Any] | None = None) -> str:
    """Writes the dashboard (index, unit page, data files, plots); returns the index path.

    Args:
      stats: the output of :func:`saejax.analysis.features.compute_feature_stats` (or
        :func:`~saejax.analysis.features.load_stats`).
      out_dir: directory to write (created). What an earlier dashboard wrote there is
        removed first (``data/``, ``plots/``, ``neurons/``, and the one-page-per-feature
        ``features/*.html`` of the old layout), so stale shards or pages never remain;
        other files are left alone.
      metrics_path: a training-metrics JSONL; adds one training-curve plot per metric.
      title: page title.
      make_plots: write and show the density, L0, training-curve (and comparison) PNGs.
      neurons: statistics of the LM's MLP neurons in the same format: written under
        ``out_dir/neurons/`` with the same layout, the two indexes linked to each other,
        and, when both are scored, a plot comparing their held-out AUROCs on the index.
    """
    clear_previous(out_dir)
    extra = []
    if neurons is not None:
        ntitle = f"{title}: neurons"
        _write_one(dict(neurons, meta={"unit": "neuron", **neurons["meta"]}),
                   os.path.join(out_dir, "neurons"), title=ntitle, make_plots=make_plots,
                   metrics_path=None, other={"href": "../index.html",
                                             "label": f"\u2190 {_labels(stats)[2]}: {title}"})
        fa, na = interp_aurocs(stats), interp_aurocs(neurons)
        if make_plots and fa and na:
            extra.append(plots.plot_interp_comparison(
                fa, na, os.path.join(out_dir, "plots", "interp_comparison.png")))
    other = None if neurons is None else {"href": "neurons/index.html",
                                          "label": "neurons of the same LM \u2192"}
    return _write_one(stats, out_dir, title=title, other=other, make_plots=make_plots,
                      metrics_path=metrics_path, extra_images=extra)
