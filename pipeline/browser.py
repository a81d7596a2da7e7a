"""The feature browser: one self-contained HTML file (inline CSS and JS, data embedded), no server.

Left: a searchable list of features (search by id or by a token of its contexts or logit lens),
sorted by frequency, max activation or id. Right: the chosen feature's statistics, activation
histogram, top contexts with each token shaded by the feature's activation there (hover for the
value), and the tokens its decoder direction promotes through the unembedding.
The URL hash `#f=<id>` opens a feature (links can be shared; the browser test uses it).
"""

import html
import json

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>__TITLE__</title>
<style>
body{margin:0;font:14px/1.4 system-ui,sans-serif;color:#222;display:flex;height:100vh}
#side{width:330px;border-right:1px solid #ddd;display:flex;flex-direction:column}
#side header{padding:10px;border-bottom:1px solid #ddd;overflow-wrap:anywhere}
#side input,#side select{width:100%;box-sizing:border-box;margin-top:6px;padding:5px}
#list{overflow-y:auto;flex:1}
.item{padding:6px 10px;border-bottom:1px solid #f0f0f0;cursor:pointer}
.item:hover,.item.sel{background:#eef4ff}
.item .id{font-weight:600}.item small{color:#666}
#main{flex:1;overflow-y:auto;padding:16px 24px}
h1{font-size:18px;margin:0 0 4px}h2{font-size:15px;margin:18px 0 6px}
.meta{color:#555;font-size:12px}
.stats span{display:inline-block;margin-right:18px}
.ctx{font-family:ui-monospace,monospace;font-size:13px;padding:4px 6px;border-bottom:1px solid #f3f3f3;
  white-space:pre-wrap}
.ctx .v{display:inline-block;width:70px;color:#777}
.tok{border-radius:2px}.tok.at{outline:1px solid #c60}
.lens span{display:inline-block;margin:2px 4px;padding:1px 5px;background:#eef7ee;border-radius:3px;
  font-family:ui-monospace,monospace}
#errors{color:#b00}
</style></head>
<body>
<div id="side"><header><b>__TITLE__</b><div class="meta" id="summary"></div>
<input id="q" placeholder="search: feature id or token">
<select id="sort"><option value="frequency">sort by frequency</option>
<option value="max">sort by max activation</option><option value="id">sort by id</option></select></header>
<div id="list"></div></div>
<div id="main"><div id="errors"></div><div id="detail"><p>Choose a feature on the left.</p></div></div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
window.onerror = (m) => { document.getElementById("errors").textContent += "error: " + m + "\\n"; };
const D = JSON.parse(document.getElementById("data").textContent);
const tok = (i) => D.vocab[i] === undefined ? "<" + i + ">" : D.vocab[i];
const fmt = (x) => x >= 100 ? x.toFixed(0) : x >= 1 ? x.toFixed(2) : x.toPrecision(2);
const esc = (s) => s.replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const byId = new Map(D.features.map((f) => [f.id, f]));
for (const f of D.features) {
  f.text = f.contexts.map((c) => c.tokens.map(tok).join("")).join(" ").toLowerCase()
    + " " + f.logits.map((l) => tok(l[0])).join(" ").toLowerCase();
}
document.getElementById("summary").textContent = D.features.length + " features, " + D.meta.tokens.toLocaleString()
  + " tokens; " + D.meta.sae;
function list() {
  const q = document.getElementById("q").value.trim().toLowerCase();
  const key = document.getElementById("sort").value;
  let fs = D.features.filter((f) => !q || String(f.id) === q || f.text.includes(q));
  fs.sort((a, b) => key === "id" ? a.id - b.id : b[key] - a[key]);
  const el = document.getElementById("list");
  el.innerHTML = fs.slice(0, 2000).map((f) => '<div class="item" data-id="' + f.id + '"><span class="id">#' + f.id
    + "</span> <small>freq " + (100 * f.frequency).toPrecision(2) + "%, max " + fmt(f.max) + "</small><br><small>"
    + esc(f.logits.slice(0, 5).map((l) => tok(l[0])).join(" ")) + "</small></div>").join("");
}
function hist(f) {
  const w = 360, h = 80, n = f.hist.length, m = Math.max(...f.hist, 1);
  const bars = f.hist.map((c, i) => '<rect x="' + (i * w / n) + '" y="' + (h - h * c / m) + '" width="'
    + Math.max(w / n - 1, 1) + '" height="' + (h * c / m) + '" fill="#4477aa"><title>' + c + " tokens at 10^"
    + (D.meta.hist_low + (f.hist_start + i) * D.meta.hist_step).toFixed(1) + "</title></rect>").join("");
  const lo = Math.pow(10, D.meta.hist_low + f.hist_start * D.meta.hist_step);
  const hi = Math.pow(10, D.meta.hist_low + (f.hist_start + n) * D.meta.hist_step);
  return '<svg width="' + w + '" height="' + (h + 16) + '">' + bars + '<text x="0" y="' + (h + 13)
    + '" font-size="11">' + fmt(lo) + '</text><text x="' + w + '" y="' + (h + 13)
    + '" font-size="11" text-anchor="end">' + fmt(hi) + "</text></svg>";
}
function show(id) {
  const f = byId.get(id);
  const el = document.getElementById("detail");
  if (!f) { el.innerHTML = "<p>Feature " + id + " is not in this page (dead, or beyond --max-features).</p>"; return; }
  document.querySelectorAll(".item.sel").forEach((e) => e.classList.remove("sel"));
  const item = document.querySelector('.item[data-id="' + id + '"]');
  if (item) item.classList.add("sel");
  const ctx = f.contexts.map((c) => '<div class="ctx"><span class="v">' + fmt(c.act) + "</span>"
    + c.tokens.map((t, i) => '<span class="tok' + (i === c.at ? " at" : "") + '" title="' + fmt(c.acts[i])
      + '" style="background:rgba(255,120,0,' + Math.min(1, c.acts[i] / f.max).toFixed(2) + ')">'
      + esc(tok(t)) + "</span>").join("") + "</div>").join("");
  el.innerHTML = '<h1 id="feature-title">Feature ' + f.id + "</h1>"
    + '<div class="stats"><span>frequency ' + (100 * f.frequency).toPrecision(3) + "%</span><span>mean "
    + fmt(f.mean) + "</span><span>max " + fmt(f.max) + "</span></div>"
    + "<h2>Activation histogram (log scale)</h2>" + hist(f)
    + '<h2>Top activations</h2><div id="contexts">' + ctx + "</div>"
    + '<h2>Promoted tokens (logit lens)</h2><div class="lens">'
    + f.logits.map((l) => "<span>" + esc(tok(l[0])) + " <small>" + l[1].toFixed(2) + "</small></span>").join("")
    + "</div>";
}
document.getElementById("q").addEventListener("input", list);
document.getElementById("sort").addEventListener("change", list);
document.getElementById("list").addEventListener("click", (e) => {
  const it = e.target.closest(".item");
  if (it) location.hash = "f=" + it.dataset.id;
});
window.addEventListener("hashchange", route);
function route() { const m = location.hash.match(/f=(\\d+)/); if (m) show(Number(m[1])); }
list();
route();
document.body.dataset.ready = "1";
</script></body></html>
"""


def render(data: dict, title: str) -> str:
    """The page, with `data` (meta, vocab, features) embedded as JSON."""
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # never close the script tag early
    return _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)
