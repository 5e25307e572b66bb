"""Static CSS and JavaScript of the HTML dashboard (inlined into its pages: no external
resources, no CDN, works from file://).

The scripts read the data files of :mod:`saejax.analysis.dashboard_data` (loaded with
``<script src>``) and build every element with DOM APIs and ``textContent`` only (never
``innerHTML``), so corpus text cannot inject markup even if it reached a script unescaped.
``COMMON_JS`` (helpers: formatting, base-64 decoding, token rendering with visible
whitespace) precedes ``INDEX_JS`` here and the unit page's script in
:mod:`saejax.analysis.dashboard_unit`.
"""

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.2em 2em;
       color: #222; background: #fff; }
h1 { font-size: 1.4em; margin-bottom: .2em; } h2 { font-size: 1.1em; margin-top: 1.4em; }
.meta { color: #555; font-size: .9em; } .note { color: #555; font-size: .85em; max-width: 60em; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr));
         gap: 10px; }
.plots img { width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: .88em; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
th.sortable { cursor: pointer; user-select: none; background: #f4f4f4; }
th.sortable:hover { background: #e8e8e8; }
th.asc::after { content: " \\25B2"; } th.desc::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.controls { margin: .8em 0; } .controls input[type=search] { width: 26em; padding: 3px; }
.pager button { margin: 0 .3em; }
.tok { white-space: pre; font-family: Menlo, Consolas, monospace; font-size: .92em;
       border-radius: 2px; }
.chip { background: #f2f2f2; margin-right: 3px; padding: 0 2px; }
.tok.center { outline: 1.5px solid #222; }
.sp { background-image: radial-gradient(circle, rgba(0,0,0,.4) 0.08em, transparent 0.1em);
      background-size: 1ch 100%; background-repeat: repeat-x; }
.ws { color: #999; }
.ctx { margin: 2px 0; line-height: 1.8; } .ctx .act { color: #777; font-size: .8em;
       display: inline-block; width: 5em; }
.pos { color: #1a7f37; } .neg { color: #b42318; }
.nav a { margin-right: 1em; } .tag { font-size: .75em; background: #eee; padding: 1px 5px;
       border-radius: 8px; margin-left: .5em; }
.interval { color: #555; font-size: .85em; margin-top: .6em; }
.cols { display: flex; gap: 2.5em; flex-wrap: wrap; }
.error { color: #b42318; }
"""

COMMON_JS = r"""
var SJ = (function () {
  "use strict";
  var B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  var VAL = {};
  for (var b = 0; b < 64; b++) { VAL[B64.charAt(b)] = b; }
  var TAGS = ["silent", "ultralow", "dense"];

  function dec(s, i, w) {
    var v = 0;
    for (var j = 0; j < w; j++) { v = v * 64 + VAL[s.charAt(i + j)]; }
    return v;
  }
  function decList(s, w) {
    var out = [];
    for (var i = 0; i + w <= s.length; i += w) { out.push(dec(s, i, w)); }
    return out;
  }
  function fmt(x) {
    if (x === null || x === undefined) { return "n/a"; }
    if (x === 0) { return "0"; }
    return Math.abs(x) < 1e-3 ? x.toExponential(2) : String(Number(x.toPrecision(3)));
  }
  function tokText(id) {
    var v = window.SAEJAX_VOCAB;
    return (v && id >= 0 && id < v.length) ? v[id] : "<" + id + ">";
  }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) { e.textContent = text; }
    if (cls) { e.className = cls; }
    return e;
  }
  // A token as a span: newline, CR and tab drawn as symbols, runs of spaces kept as real
  // spaces (so the page's text stays searchable) with a faint dot per space.
  function tokNode(id, cls) {
    var span = el("span", null, cls || "tok");
    var s = tokText(id);
    if (s === "") { span.appendChild(el("span", "\u2205", "ws")); return span; }
    var re = / +|\n|\r|\t/g, last = 0, m;
    while ((m = re.exec(s)) !== null) {
      if (m.index > last) { span.appendChild(document.createTextNode(s.slice(last, m.index))); }
      var t = m[0];
      if (t === "\n") { span.appendChild(el("span", "\u23ce", "ws")); }
      else if (t === "\r") { span.appendChild(el("span", "\u240d", "ws")); }
      else if (t === "\t") { span.appendChild(el("span", "\u2192", "ws")); }
      else { span.appendChild(el("span", t, "sp")); }
      last = m.index + t.length;
    }
    if (last < s.length) { span.appendChild(document.createTextNode(s.slice(last))); }
    return span;
  }
  function tagNames(bits) {
    var out = [];
    for (var j = 0; j < TAGS.length; j++) { if (bits & (1 << j)) { out.push(TAGS[j]); } }
    return out;
  }
  function quote(ids) {
    return ids.map(function (t) { return JSON.stringify(tokText(t)); }).join(", ");
  }
  function interpText(kind, ids) {
    if (!kind) { return ""; }
    if (kind === "prev_token") { return "fires after " + quote(ids); }
    if (kind === "token") { return "fires on " + quote(ids); }
    return kind + ": " + quote(ids);
  }
  return { dec: dec, decList: decList, fmt: fmt, tokText: tokText, el: el, tokNode: tokNode,
           tagNames: tagNames, interpText: interpText };
})();
"""

INDEX_JS = r"""
(function () {
  "use strict";
  var M = window.SAEJAX_META, D = window.SAEJAX_INDEX;
  var status = document.getElementById("shown");
  if (!M || !D) { status.textContent = "data/index.js did not load"; return; }
  var C = D.columns, n = C.id.length, PAGE = M.page_size || 100, el = SJ.el;
  var hasInterp = !!C.auroc;
  var cols = [["id", "id", "num"], ["density", "density", "num"],
              ["log_density", "log10 density", "num"],
              ["mean_act_active", "mean act (active)", "num"], ["max_act", "max act", "num"],
              ["top_token", "top token", ""], ["logits", "top logit tokens", ""],
              ["tags", "tags", ""]];
  if (hasInterp) { cols.push(["auroc", "AUROC", "num"], ["explanation", "explanation", ""]); }
  var state = { key: "density", dir: -1, query: "", hideSilent: true, page: 0 };
  var texts = null;

  function value(i, key) {
    if (key === "log_density") { key = "density"; }
    if (key === "top_token") { return C.top_token[i] < 0 ? "" : SJ.tokText(C.top_token[i]); }
    if (key === "logits") { return C.logits[i].map(SJ.tokText).join(" "); }
    if (key === "tags") { return SJ.tagNames(C.tags[i]).join(" "); }
    if (key === "explanation") { return SJ.interpText(C.interp_kind[i], C.interp_tokens[i]); }
    return C[key][i];
  }
  // Lower-case search text of every unit, built on the first query: id, token columns,
  // tags, explanation and the text of its top contexts (data/search.js).
  function searchTexts() {
    if (texts) { return texts; }
    var S = window.SAEJAX_SEARCH || [], w = M.tok_digits;
    texts = new Array(n);
    for (var i = 0; i < n; i++) {
      var ctx = (S[i] || "").split(".").map(function (seg) {
        return SJ.decList(seg, w).map(SJ.tokText).join("");
      }).join("\n");
      texts[i] = [C.id[i], value(i, "top_token"), value(i, "logits"), value(i, "tags"),
                  hasInterp ? value(i, "explanation") : "", ctx].join("\n").toLowerCase();
    }
    return texts;
  }
  // "#12" finds unit 12; other text matches an id exactly or any part of the search text.
  function matches(i, q) {
    if (!q) { return true; }
    if (q.charAt(0) === "#") { return String(C.id[i]) === q.slice(1); }
    return String(C.id[i]) === q || searchTexts()[i].indexOf(q) !== -1;
  }
  function cmp(a, b) {
    var x = value(a, state.key), y = value(b, state.key);
    if (typeof x === "string" || typeof y === "string") {
      return state.dir * String(x).localeCompare(String(y)) || a - b;
    }
    x = (x === null || x === undefined) ? -Infinity : x;
    y = (y === null || y === undefined) ? -Infinity : y;
    return (x === y) ? a - b : (x < y ? -state.dir : state.dir);
  }

  var thead = document.getElementById("head"), tbody = document.getElementById("rows");
  var pageInfo = document.getElementById("page"), prev = document.getElementById("prev");
  var next = document.getElementById("next");
  var list = [];

  function filter() {
    var q = state.query.toLowerCase();
    list = [];
    for (var i = 0; i < n; i++) {
      if ((!state.hideSilent || !(C.tags[i] & 1)) && matches(i, q)) { list.push(i); }
    }
    list.sort(cmp);
    state.page = 0;
  }
  function render() {
    var pages = Math.max(1, Math.ceil(list.length / PAGE));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    while (tbody.firstChild) { tbody.removeChild(tbody.firstChild); }
    var frag = document.createDocumentFragment();
    list.slice(state.page * PAGE, (state.page + 1) * PAGE).forEach(function (i) {
      var tr = el("tr"), td = el("td", null, "num"), a = el("a", String(C.id[i]));
      a.href = "feature.html?id=" + C.id[i];
      td.appendChild(a);
      tr.appendChild(td);
      var d = C.density[i];
      tr.appendChild(el("td", SJ.fmt(d), "num"));
      tr.appendChild(el("td", d > 0 ? Math.log10(d).toFixed(2) : "silent", "num"));
      tr.appendChild(el("td", SJ.fmt(C.mean_act_active[i]), "num"));
      tr.appendChild(el("td", SJ.fmt(C.max_act[i]), "num"));
      td = el("td");
      if (C.top_token[i] >= 0) { td.appendChild(SJ.tokNode(C.top_token[i], "tok chip")); }
      tr.appendChild(td);
      td = el("td");
      C.logits[i].forEach(function (t) { td.appendChild(SJ.tokNode(t, "tok chip")); });
      tr.appendChild(td);
      tr.appendChild(el("td", value(i, "tags")));
      if (hasInterp) {
        tr.appendChild(el("td", C.auroc[i] === null ? "" : SJ.fmt(C.auroc[i]), "num"));
        tr.appendChild(el("td", value(i, "explanation")));
      }
      frag.appendChild(tr);
    });
    tbody.appendChild(frag);
    status.textContent = list.length + " matching " + M.plural + " (of " + n + ")";
    pageInfo.textContent = "page " + (state.page + 1) + " of " + pages;
    prev.disabled = state.page === 0;
    next.disabled = state.page >= pages - 1;
  }

  var tr = el("tr"), ths = [];
  cols.forEach(function (c) {
    var th = el("th", c[1], "sortable" + (c[0] === state.key ? " desc" : ""));
    th.setAttribute("data-key", c[0]);
    th.addEventListener("click", function () {
      state.dir = (state.key === c[0]) ? -state.dir : (c[0] === "id" ? 1 : -1);
      state.key = c[0];
      ths.forEach(function (h) { h.className = "sortable"; });
      th.className = "sortable " + (state.dir > 0 ? "asc" : "desc");
      filter();
      render();
    });
    ths.push(th);
    tr.appendChild(th);
  });
  thead.appendChild(tr);
  document.getElementById("search").addEventListener("input", function (e) {
    state.query = e.target.value.trim();
    filter();
    render();
  });
  document.getElementById("hide-silent").addEventListener("change", function (e) {
    state.hideSilent = e.target.checked;
    filter();
    render();
  });
  prev.addEventListener("click", function () { state.page -= 1; render(); });
  next.addEventListener("click", function () { state.page += 1; render(); });
  filter();
  render();
})();
"""
