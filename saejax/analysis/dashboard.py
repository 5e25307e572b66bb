"""Static HTML dashboard of feature statistics: an index and one page per feature.

    write_dashboard(stats, "runs/x/dashboard", metrics_path="runs/x/metrics.jsonl")
    # open runs/x/dashboard/index.html (works from file://, no server, no network)

``index.html`` holds a summary, the report plots and a table of every feature (sortable by
any column, searchable by id / token text, dead features hidden by default) built by an
inline script from embedded JSON. ``features/<id>.html`` shows one feature: its top
activating contexts and samples from each activation interval with every token's
background shaded by the feature's activation, its activation histogram (inline SVG), its
logit effects and ablation effect.

Safety: corpus and vocabulary text is HTML-escaped wherever it is written into markup
(``html.escape``), and the embedded JSON escapes ``<``, ``>`` and ``&`` so that no string
can close the script element; the index script only ever sets ``textContent``.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from typing import Any

from saejax.analysis import plots
from saejax.analysis.dashboard_assets import CSS, INDEX_JS

_MAX_INDEX_ROWS = 2000  # rows the index table renders at once (after filtering and sorting)


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _json_for_script(obj: Any) -> str:
    """JSON safe inside a <script> element (cannot close it or open a comment)."""
    text = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    for ch, rep in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, rep)
    return text


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    return f"{x:.2e}" if abs(x) < 1e-3 else f"{x:.3g}"


def _tok_text(stats: dict, tid: int) -> str:
    vocab = stats.get("vocab")
    s = vocab[tid] if vocab and 0 <= tid < len(vocab) else f"<{tid}>"
    # Visible whitespace: a context must show where its newlines and tabs are.
    return s.replace("\n", "\u23ce").replace("\r", "\u240d").replace("\t", "\u2192") or "\u2205"


def _page(title: str, body: str, script: str = "") -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            + (f"<script>{script}</script>\n" if script else "") + "</body></html>\n")


# ------------------------------------------------------------------------------------------
# Feature pages
# ------------------------------------------------------------------------------------------


def _context_html(stats: dict, ex: dict, max_act: float) -> str:
    spans = []
    for j, (tid, a) in enumerate(zip(ex["tokens"], ex["acts"], strict=True)):
        a = a or 0.0
        alpha = min(max(a / max_act, 0.0), 1.0) if max_act and max_act > 0 else 0.0
        cls = "tok center" if j == ex["center"] else "tok"
        spans.append(f"<span class=\"{cls}\" style=\"background:rgba(255,110,0,{alpha:.3f})\" "
                     f"title=\"{_e(_fmt(a))}\">{_e(_tok_text(stats, tid))}</span>")
    return (f"<div class=\"ctx\"><span class=\"act\">{_e(_fmt(ex['act']))}</span>"
            + "".join(spans) + f" <span class=\"meta\">(context {ex['row']}, token "
            f"{ex['pos']})</span></div>")


def _histogram_svg(counts: Sequence[int], lo: float, hi: float | None) -> str:
    w, h, pad = 360, 120, 18
    n = len(counts)
    top = max(counts) if counts and max(counts) > 0 else 1
    bw = (w - 2 * pad) / max(n, 1)
    bars = []
    for j, c in enumerate(counts):
        bh = (h - 2 * pad) * c / top
        bars.append(f"<rect x=\"{pad + j * bw:.1f}\" y=\"{h - pad - bh:.1f}\" width=\""
                    f"{max(bw - 1, 1):.1f}\" height=\"{bh:.1f}\" fill=\"#4c72b0\">"
                    f"<title>{c}</title></rect>")
    return (f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" "
            f"role=\"img\" aria-label=\"activation histogram\">"
            f"<line x1=\"{pad}\" y1=\"{h - pad}\" x2=\"{w - pad}\" y2=\"{h - pad}\" "
            f"stroke=\"#999\"/>{''.join(bars)}"
            f"<text x=\"{pad}\" y=\"{h - 3}\" font-size=\"10\">{_e(_fmt(lo))}</text>"
            f"<text x=\"{w - pad}\" y=\"{h - 3}\" font-size=\"10\" text-anchor=\"end\">"
            f"{_e(_fmt(hi))}</text><text x=\"{pad}\" y=\"12\" font-size=\"10\">max count "
            f"{top}</text></svg>")


def _logit_table(stats: dict, pairs: list, cls: str) -> str:
    rows = "".join(f"<tr><td class=\"tok\">{_e(_tok_text(stats, t))}</td>"
                   f"<td class=\"num {cls}\">{_e(_fmt(v))}</td></tr>" for t, v in pairs)
    return f"<table>{rows}</table>"


def _tags(stats: dict, i: int) -> list[str]:
    out = []
    for name in ("dead", "ultralow", "dense"):
        if i in stats.get(f"_{name}_set", ()):
            out.append(name)
    return out


def feature_page(stats: dict, i: int) -> str:
    """The HTML of feature ``i``'s page."""
    f = stats["features"][i]
    n = len(stats["features"])
    max_act = f["max_act"] or 0.0
    nav = ("<div class=\"nav\"><a href=\"../index.html\">index</a>"
           + (f"<a href=\"{i - 1}.html\">&larr; {i - 1}</a>" if i > 0 else "")
           + (f"<a href=\"{i + 1}.html\">{i + 1} &rarr;</a>" if i + 1 < n else "") + "</div>")
    tags = "".join(f"<span class=\"tag\">{_e(t)}</span>" for t in _tags(stats, i))
    head = (f"<h1>Feature {i}{tags}</h1><div class=\"meta\">density {_e(_fmt(f['density']))}"
            f" &middot; mean activation {_e(_fmt(f['mean_act']))} &middot; max "
            f"{_e(_fmt(max_act))} &middot; site {_e(stats['meta']['site'])}</div>")
    abl = f.get("ablation")
    abl_html = ("<p class=\"meta\">not measured</p>" if not abl else
                f"<p>mean &Delta; log-likelihood when ablated: {_e(_fmt(abl['delta_logp_all']))}"
                f" over all tokens, {_e(_fmt(abl['delta_logp_active']))} where it fires "
                f"({abl['contexts']} top contexts)</p>")
    logit_mode = stats["meta"].get("logit_mode", "fold_ln")
    cols = (f"<div class=\"cols\"><div><h2>Activation histogram</h2>"
            f"{_histogram_svg(f['hist']['counts'], f['hist']['lo'], f['hist']['hi'])}</div>"
            f"<div><h2>Logit effects <span class=\"meta\">({_e(logit_mode)})</span></h2>"
            f"<div class=\"cols\"><div>{_logit_table(stats, f['logits']['top'], 'pos')}</div>"
            f"<div>{_logit_table(stats, f['logits']['bottom'], 'neg')}</div></div></div>"
            f"<div><h2>Ablation</h2>{abl_html}</div></div>")
    top = "".join(_context_html(stats, ex, max_act) for ex in f["top"]) or \
        "<p class=\"meta\">never fired on the analysed tokens</p>"
    intervals = []
    for iv in f["intervals"]:
        if not iv["examples"]:
            continue
        intervals.append(f"<div class=\"interval\">activation in [{_e(_fmt(iv['lo']))}, "
                         f"{_e(_fmt(iv['hi']))}]</div>"
                         + "".join(_context_html(stats, ex, max_act) for ex in iv["examples"]))
    body = (nav + head + cols + "<h2>Top activating contexts</h2>" + top
            + ("<h2>Samples by activation interval</h2>" + "".join(reversed(intervals))
               if intervals else ""))
    return _page(f"Feature {i}", body)


# ------------------------------------------------------------------------------------------
# Index
# ------------------------------------------------------------------------------------------


def _index_rows(stats: dict) -> list[dict]:
    rows = []
    for f in stats["features"]:
        i = f["id"]
        top_tok = ""
        if f["top"]:
            ex = f["top"][0]
            top_tok = _tok_text(stats, ex["tokens"][ex["center"]])
        logit_toks = " ".join(_tok_text(stats, t) for t, _ in f["logits"]["top"][:5])
        tags = " ".join(_tags(stats, i))
        rows.append({"id": i, "density": stats["density"][i],
                     "mean_act_active": stats["mean_act_active"][i], "max_act": f["max_act"],
                     "top_token": top_tok, "logits": logit_toks, "tags": tags,
                     "search": f"{top_tok} {logit_toks} {tags}".lower()})
    return rows


def index_page(stats: dict, images: Sequence[str] = (), title: str = "saejax features") -> str:
    """The HTML of the index page; ``images`` are PNG paths relative to the index."""
    meta, summ = stats["meta"], stats["summary"]
    head = (f"<h1>{_e(title)}</h1><div class=\"meta\">site {_e(meta['site'])} &middot; "
            f"{meta['n_features']} features &middot; {meta['n_tokens']} tokens "
            f"({meta['n_contexts']} contexts of {meta['seq_len']}) &middot; norm_scale "
            f"{_e(_fmt(meta['norm_scale']))}</div><p>alive {summ['alive']} &middot; dead "
            f"{summ['dead']} &middot; ultralow-density {summ['ultralow']} (density &lt; "
            f"{_e(_fmt(meta['ultralow_threshold']))}) &middot; dense {summ['dense']} "
            f"(&gt; {_e(_fmt(meta['dense_threshold']))}) &middot; mean L0 "
            f"{_e(_fmt(summ['mean_l0']))}</p>")
    imgs = "".join(f"<img src=\"{_e(p)}\" alt=\"{_e(os.path.splitext(p)[0])}\">"
                   for p in images)
    controls = ("<div class=\"controls\"><input type=\"search\" id=\"search\" placeholder="
                "\"#id, token text or tag\" aria-label=\"search\"> <label><input "
                "type=\"checkbox\" id=\"hide-dead\" checked> hide dead</label> <span "
                "id=\"shown\" class=\"meta\"></span></div>")
    cols = [("id", "id"), ("density", "density"), ("density", "log10 density"),
            ("mean_act_active", "mean act (active)"), ("max_act", "max act"),
            ("top_token", "top token"), ("logits", "top logit tokens"), ("tags", "tags")]
    ths = "".join(f"<th class=\"sortable{' desc' if k == 'density' and n == 'density' else ''}"
                  f"\" data-key=\"{k}\">{_e(n)}</th>" for k, n in cols)
    table = (f"<table id=\"features\"><thead><tr>{ths}</tr></thead>"
             "<tbody id=\"rows\"></tbody></table>")
    data = {"rows": _index_rows(stats), "limit": _MAX_INDEX_ROWS}
    body = (head + (f"<div class=\"plots\">{imgs}</div>" if imgs else "") + controls + table
            + f"<script type=\"application/json\" id=\"feature-data\">{_json_for_script(data)}"
            "</script>")
    return _page(title, body, INDEX_JS)


def write_dashboard(stats: dict[str, Any], out_dir: str, *, metrics_path: str | None = None,
                    title: str = "saejax features", make_plots: bool = True) -> str:
    """Writes the dashboard (index, per-feature pages, plots) and returns the index path.

    Args:
      stats: the output of :func:`saejax.analysis.features.compute_feature_stats` (or
        :func:`~saejax.analysis.features.load_stats`).
      out_dir: directory to write (created; existing pages are overwritten).
      metrics_path: a training-metrics JSONL; adds the training-curve plot.
      title: page title.
      make_plots: write and show the density, L0 and training-curve PNGs.
    """
    os.makedirs(os.path.join(out_dir, "features"), exist_ok=True)
    stats = dict(stats)
    for name in ("dead", "ultralow", "dense"):
        stats[f"_{name}_set"] = frozenset(stats.get(name, ()))
    images = []
    if make_plots:
        plots.plot_density_histogram(stats["density"], os.path.join(out_dir, "density.png"),
                                     ultralow_threshold=stats["meta"]["ultralow_threshold"])
        plots.plot_l0_histogram(stats["l0_hist"], os.path.join(out_dir, "l0.png"))
        images += ["density.png", "l0.png"]
        if metrics_path and os.path.isfile(metrics_path):
            plots.plot_training_curves(metrics_path, os.path.join(out_dir, "training.png"))
            images.append("training.png")
    for i in range(len(stats["features"])):
        with open(os.path.join(out_dir, "features", f"{i}.html"), "w", encoding="utf-8") as fh:
            fh.write(feature_page(stats, i))
    index = os.path.join(out_dir, "index.html")
    with open(index, "w", encoding="utf-8") as fh:
        fh.write(index_page(stats, images, title))
    return index
