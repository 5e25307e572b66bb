"""The dashboard's unit page: one static ``feature.html`` for every unit.

``feature.html?id=N`` (or ``feature.html#N``) loads ``data/meta.js`` and ``data/vocab.js``,
then the shard holding unit N (``data/shard_<N // shard_size>.js``), and renders the unit
with DOM APIs and ``textContent`` only: header (density, activations, site, tags), an SVG
activation histogram, logit effects, ablation effect, interpretability explanation and
scores, neighbours, and the top activating contexts and interval samples with each token's
background shaded by its activation (the example's own token outlined).
"""

from __future__ import annotations

import html

from saejax.analysis.dashboard_assets import COMMON_JS, CSS

UNIT_JS = r"""
(function () {
  "use strict";
  var M = window.SAEJAX_META, el = SJ.el, main = document.getElementById("main");
  var L = M.levels;
  function fail(msg) { main.appendChild(el("p", msg, "error")); }
  function parseId() {
    var m = /[?&]id=(\d+)/.exec(window.location.search) ||
            /^#(?:id=)?(\d+)$/.exec(window.location.hash);
    return m ? parseInt(m[1], 10) : null;
  }
  function link(href, text) { var a = el("a", text); a.href = href; return a; }
  function unitHref(i) { return "feature.html?id=" + i; }
  function section(title, note) {
    main.appendChild(el("h2", title));
    if (note) { main.appendChild(el("p", note, "note")); }
  }
  function histogram(h) {
    var NS = "http://www.w3.org/2000/svg", counts = h[2] || [], W = 380, H = 130, P = 20;
    var svg = document.createElementNS(NS, "svg");
    svg.setAttribute("width", W); svg.setAttribute("height", H);
    svg.setAttribute("role", "img"); svg.setAttribute("aria-label", "activation histogram");
    function add(tag, attrs, text) {
      var e = document.createElementNS(NS, tag);
      Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
      if (text !== undefined) { e.textContent = text; }
      svg.appendChild(e);
      return e;
    }
    var top = Math.max.apply(null, counts.concat([1])), bw = (W - 2 * P) / Math.max(counts.length, 1);
    counts.forEach(function (c, j) {
      var bh = (H - 2 * P) * c / top;
      var r = add("rect", { x: P + j * bw, y: H - P - bh, width: Math.max(bw - 1, 1), height: bh,
                            fill: "#4c72b0" });
      var t = document.createElementNS(NS, "title");
      t.textContent = c + " tokens";
      r.appendChild(t);
    });
    add("line", { x1: P, y1: H - P, x2: W - P, y2: H - P, stroke: "#999" });
    add("text", { x: P, y: H - 5, "font-size": 10 }, SJ.fmt(h[0]));
    add("text", { x: W - P, y: H - 5, "font-size": 10, "text-anchor": "end" }, SJ.fmt(h[1]));
    add("text", { x: W / 2, y: H - 5, "font-size": 10, "text-anchor": "middle" }, "activation");
    add("text", { x: P, y: 12, "font-size": 10 }, "max count " + top + " tokens");
    return svg;
  }
  function logitTable(pairs, cls) {
    var t = el("table");
    pairs.forEach(function (p) {
      var tr = el("tr"), td = el("td");
      td.appendChild(SJ.tokNode(p[0]));
      tr.appendChild(td);
      tr.appendChild(el("td", SJ.fmt(p[1]), "num " + cls));
      t.appendChild(tr);
    });
    return t;
  }
  function context(c, u) {
    var div = el("div", null, "ctx"), toks = SJ.decList(c[2], M.tok_digits), acts = c[3];
    var center = c.length > 4 ? c[4] : M.before, lev = toks.map(function () { return 0; });
    var pw = M.pos_digits;
    for (var j = 0; j + pw + 2 <= acts.length; j += pw + 2) {
      lev[SJ.dec(acts, j, pw)] = SJ.dec(acts, j + pw, 2);
    }
    function val(l) { return l ? SJ.fmt(l / L * u.s) : (M.unit === "feature" ? "0" : "\u2264 0"); }
    div.appendChild(el("span", val(lev[center]), "act"));
    toks.forEach(function (t, j) {
      var span = SJ.tokNode(t, j === center ? "tok center" : "tok");
      span.style.background = "rgba(255,110,0," + (lev[j] / L).toFixed(3) + ")";
      span.title = "activation " + (lev[j] ? "\u2248 " : "") + val(lev[j]);
      div.appendChild(span);
    });
    div.appendChild(el("span", " (context " + c[0] + ", token " + c[1] + ")", "meta"));
    return div;
  }
  function neighbours(title, pairs, what) {
    if (!pairs || !pairs.length) { return; }
    var p = el("p", title + ": ");
    pairs.forEach(function (q, j) {
      if (j) { p.appendChild(document.createTextNode(", ")); }
      p.appendChild(link(unitHref(q[0]), M.label + " " + q[0]));
      p.appendChild(el("span", " (" + what + " " + SJ.fmt(q[1]) + ")", "meta"));
    });
    main.appendChild(p);
  }

  function render(u, id) {
    var label = M.label + " " + id;
    document.title = label + " \u2014 " + M.title;
    var h1 = el("h1", label);
    SJ.tagNames(u.t).forEach(function (t) { h1.appendChild(el("span", t, "tag")); });
    main.appendChild(h1);
    main.appendChild(el("div", "density " + SJ.fmt(u.d) + " \u00b7 mean activation " +
      SJ.fmt(u.m) + " (all tokens), " + SJ.fmt(u.ma) + " (where active) \u00b7 max activation " +
      SJ.fmt(u.x) + " \u00b7 site " + M.site, "meta"));
    var cols = el("div", null, "cols"), box = el("div");
    box.appendChild(el("h2", "Activation histogram"));
    box.appendChild(histogram(u.h));
    if (u.h[3]) {
      box.appendChild(el("div", "counts estimated from a sample of the " + M.unit +
        "'s firings (at most 16 per batch of contexts), scaled to its firing count", "meta"));
    }
    cols.appendChild(box);
    box = el("div");
    box.appendChild(el("h2", "Logit effects (" + M.logit_mode + ")"));
    box.appendChild(el("p", "The " + M.unit + "'s decoder direction read through the " +
      "unembedding: positive = the " + M.unit + "'s decoder direction raises that token's " +
      "logit, negative = lowers it.", "note"));
    var two = el("div", null, "cols"), a = el("div"), b = el("div");
    a.appendChild(el("div", "raised most", "meta")); a.appendChild(logitTable(u.lt, "pos"));
    b.appendChild(el("div", "lowered most", "meta")); b.appendChild(logitTable(u.lb, "neg"));
    two.appendChild(a); two.appendChild(b); box.appendChild(two);
    cols.appendChild(box);
    main.appendChild(cols);
    section("Ablation", "Mean change of the next token's log-likelihood when the " + M.unit +
            " is set to zero: negative \u0394 log-likelihood = the model predicts worse " +
            "without the " + M.unit + ".");
    main.appendChild(u.ab ? el("p", "\u0394 log-likelihood " + SJ.fmt(u.ab[0]) +
      " averaged over all tokens, " + SJ.fmt(u.ab[1]) + " over the tokens where it fires (" +
      u.ab[2] + " top contexts)") : el("p", "not measured", "meta"));
    if (u.ip) {
      section("Interpretability", "A one-rule explanation scored on held-out tokens.");
      main.appendChild(el("p", "Explanation: " + SJ.interpText(u.ip.kind, u.ip.tokens)));
      main.appendChild(el("p", "precision " + SJ.fmt(u.ip.precision) + " \u00b7 recall " +
        SJ.fmt(u.ip.recall) + " \u00b7 F1 " + SJ.fmt(u.ip.f1) + " \u00b7 held-out AUROC " +
        SJ.fmt(u.ip.auroc), "meta"));
    }
    if (u.nb && ((u.nb.decoder || []).length || (u.nb.coact || []).length)) {
      section("Neighbours");
      neighbours("Nearest decoder directions", u.nb.decoder, "cosine");
      neighbours("Most co-active", u.nb.coact, "Jaccard");
    }
    section("Top activating contexts", "Each token's background is shaded by the " + M.unit +
            "'s activation there (relative to its max); the example's own token is outlined; " +
            "\u23ce newline, \u2192 tab, faint dots mark spaces.");
    if (!u.top.length) { main.appendChild(el("p", "never fired on the analysed tokens", "meta")); }
    u.top.forEach(function (c) { main.appendChild(context(c, u)); });
    if (u.iv.length) {
      section("Samples by activation interval");
      u.iv.slice().reverse().forEach(function (iv) {
        main.appendChild(el("div", "activation in [" + SJ.fmt(iv[0]) + ", " + SJ.fmt(iv[1]) +
                            "]", "interval"));
        iv[2].forEach(function (c) { main.appendChild(context(c, u)); });
      });
    }
  }

  var id = parseId(), nav = document.getElementById("nav");
  nav.appendChild(link("index.html", "\u2191 index"));
  if (M.other) { nav.appendChild(link(M.other.href, M.other.label)); }
  if (id === null || id >= M.n) {
    fail("no " + M.unit + " " + (id === null ? "given (open feature.html?id=N)" : id) +
         "; there are " + M.n);
    return;
  }
  if (id > 0) { nav.appendChild(link(unitHref(id - 1), "\u2190 " + (id - 1))); }
  if (id + 1 < M.n) { nav.appendChild(link(unitHref(id + 1), (id + 1) + " \u2192")); }
  var k = Math.floor(id / M.shard_size);
  window.saejaxShard = function (shard, data) {
    if (shard !== k) { return; }
    var u = data.units[id - k * M.shard_size];
    if (!u || u.i !== id) { fail("data/shard_" + k + ".js does not hold " + id); return; }
    render(u, id);
  };
  var s = document.createElement("script");
  s.src = "data/shard_" + k + ".js";
  s.onerror = function () { fail("data/shard_" + k + ".js did not load"); };
  document.body.appendChild(s);
})();
"""


def unit_page(css: str = CSS) -> str:
    """The HTML of ``feature.html`` (the same for every unit; the data names the unit)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape('saejax unit')}</title><style>{css}</style></head>\n<body>\n"
            "<div class=\"nav\" id=\"nav\"></div><div id=\"main\"></div>\n"
            "<script src=\"data/meta.js\"></script>\n<script src=\"data/vocab.js\"></script>\n"
            f"<script>{COMMON_JS}{UNIT_JS}</script>\n</body></html>\n")
