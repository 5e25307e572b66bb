"""Static CSS and JavaScript of the HTML dashboard (inlined into every page: no external
resources, no CDN, works from file://).

The index script reads its data from a ``<script type="application/json">`` element and
builds the table with ``textContent`` only (never ``innerHTML``), so corpus text cannot
inject markup even if it reached the script unescaped.
"""

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.2em 2em;
       color: #222; background: #fff; }
h1 { font-size: 1.4em; margin-bottom: .2em; } h2 { font-size: 1.1em; margin-top: 1.4em; }
.meta { color: #555; font-size: .9em; }
.plots img { max-width: 31%; min-width: 240px; border: 1px solid #ddd; margin: 4px; }
table { border-collapse: collapse; font-size: .88em; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
th.sortable { cursor: pointer; user-select: none; background: #f4f4f4; }
th.sortable:hover { background: #e8e8e8; }
th.asc::after { content: " \\25B2"; } th.desc::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.controls { margin: .8em 0; } .controls input[type=search] { width: 22em; padding: 3px; }
.tok { white-space: pre; font-family: Menlo, Consolas, monospace; font-size: .92em;
       border-radius: 2px; }
.tok.center { outline: 1px solid #333; }
.ctx { margin: 2px 0; line-height: 1.7; } .ctx .act { color: #777; font-size: .8em;
       display: inline-block; width: 5em; }
.pos { color: #1a7f37; } .neg { color: #b42318; }
.nav a { margin-right: 1em; } .tag { font-size: .75em; background: #eee; padding: 1px 5px;
       border-radius: 8px; margin-left: .5em; }
.interval { color: #555; font-size: .85em; margin-top: .6em; }
.cols { display: flex; gap: 2.5em; flex-wrap: wrap; }
"""

INDEX_JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("feature-data").textContent);
  var rows = data.rows;
  var limit = data.limit;
  var state = { key: "density", dir: -1, query: "", hideDead: true };
  var tbody = document.getElementById("rows");
  var shown = document.getElementById("shown");

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) { td.className = cls; }
    tr.appendChild(td);
    return td;
  }

  function fmt(x) {
    if (x === null || x === undefined) { return ""; }
    if (x === 0) { return "0"; }
    return Math.abs(x) < 1e-3 ? x.toExponential(2) : x.toPrecision(3);
  }

  // "#12" finds feature 12; other text matches an id exactly or the token text and tags.
  function matches(r, q) {
    if (!q) { return true; }
    if (q.charAt(0) === "#") { return String(r.id) === q.slice(1); }
    return String(r.id) === q || r.search.indexOf(q) !== -1;
  }

  function render() {
    var q = state.query.toLowerCase();
    var list = rows.filter(function (r) {
      return (!state.hideDead || r.density > 0) && matches(r, q);
    });
    var key = state.key, dir = state.dir;
    list.sort(function (a, b) {
      var x = a[key], y = b[key];
      if (typeof x === "string") { return dir * x.localeCompare(y); }
      return dir * ((x === null ? -Infinity : x) - (y === null ? -Infinity : y));
    });
    while (tbody.firstChild) { tbody.removeChild(tbody.firstChild); }
    var frag = document.createDocumentFragment();
    list.slice(0, limit).forEach(function (r) {
      var tr = document.createElement("tr");
      var td = document.createElement("td");
      var a = document.createElement("a");
      a.href = "features/" + r.id + ".html";
      a.textContent = String(r.id);
      td.appendChild(a);
      tr.appendChild(td);
      cell(tr, fmt(r.density), "num");
      cell(tr, r.density > 0 ? Math.log10(r.density).toFixed(2) : "dead", "num");
      cell(tr, fmt(r.mean_act_active), "num");
      cell(tr, fmt(r.max_act), "num");
      cell(tr, r.top_token, "tok");
      cell(tr, r.logits, "tok");
      cell(tr, r.tags);
      frag.appendChild(tr);
    });
    tbody.appendChild(frag);
    shown.textContent = list.length > limit
      ? "showing " + limit + " of " + list.length + " matching features"
      : list.length + " matching features";
  }

  var headers = document.querySelectorAll("th.sortable");
  Array.prototype.forEach.call(headers, function (th) {
    th.addEventListener("click", function () {
      var key = th.getAttribute("data-key");
      state.dir = (state.key === key) ? -state.dir : (key === "id" ? 1 : -1);
      state.key = key;
      Array.prototype.forEach.call(headers, function (h) { h.className = "sortable"; });
      th.className = "sortable " + (state.dir > 0 ? "asc" : "desc");
      render();
    });
  });
  document.getElementById("search").addEventListener("input", function (e) {
    state.query = e.target.value.trim();
    render();
  });
  document.getElementById("hide-dead").addEventListener("change", function (e) {
    state.hideDead = e.target.checked;
    render();
  });
  render();
})();
"""
