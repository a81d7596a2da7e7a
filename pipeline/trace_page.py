"""An attribution graph as JSON (the schema Neuronpedia's graph viewer and circuit-tracer's frontend
read) and as one self-contained HTML page (inline CSS, JS and data; no server, no network).

The JSON: {"metadata", "qParams", "nodes", "links"} as circuit-tracer 0.5.0 writes them (node ids
`{layer}_{latent}_{pos}` for latents, `E_{token id}_{pos}` for tokens, `{layers + 1}_{token id}_{pos}`
for logits; "influence" is the node's cumulative influence share, the pruning's rank; "weight" is the
signed adjacency entry A[target, source]) with one change: an error node's id is `err_{layer}_{pos}`,
not circuit-tracer's `0_{layer}_{pos}`, which is also the id of latent `layer` at layer 0 and
position `pos` when both are in a graph (the viewers key nodes by id). gsp's own figures (scores,
raw influence, timing) are under the extra key "gsp".

The page: the prompt's tokens along the x axis, embeddings, then layers 0 … L−1, then the logits up
the y axis; each kept node drawn at its (position, layer), sized by its influence, each kept edge a
line coloured by sign (blue positive, red negative) and as wide as its weight. Clicking a node (or
the URL hash `#n=<node id>`) shows its strongest incoming and outgoing edges and, for a latent, the
tokens its decoder promotes and its top-activating contexts from the training store.
"""

import html
import json

import torch


def _cantor(a: int, b: int) -> int:
    return (a + b) * (a + b + 1) // 2 + b


def _node(node_id, feature, layer, pos, kind, js, influence, activation=None, **extra) -> dict:
    return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos, "feature_type": kind,
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js,
            "clerp": "", "influence": influence, "activation": activation, **extra}  # fmt: skip


def graph_json(graph, pruned, tokenizer, *, slug: str, scan: str, node_threshold: float) -> dict:
    """The pruned graph in Neuronpedia's schema (see the module's docstring)."""
    sl, S, L = graph.slices(), graph.n_pos, graph.layers
    ids = graph.ids.tolist()
    cumulative = pruned.cumulative.tolist()
    nodes: dict[int, dict] = {}
    for i in torch.nonzero(pruned.nodes).flatten().tolist():
        c = cumulative[i]
        if i < sl["error"].start:
            layer, pos, latent = graph.latents[i].tolist()
            act = graph.activations[i].item()
            nodes[i] = _node(f"{layer}_{latent}_{pos}", _cantor(layer, latent), str(layer), pos,
                             "cross layer transcoder", f"{layer}_{latent}-0", c, act)  # fmt: skip
        elif i < sl["token"].start:
            layer, pos = divmod(i - sl["error"].start, S)
            nodes[i] = _node(f"err_{layer}_{pos}", -1, str(layer), pos, "mlp reconstruction error",
                             f"err_{layer}_{pos}-0", c)  # fmt: skip
        elif i < sl["logit"].start:
            pos = i - sl["token"].start
            nodes[i] = _node(f"E_{ids[pos]}_{pos}", pos, "E", pos, "embedding", f"E_{ids[pos]}-{pos}", c)
        else:
            k = i - sl["logit"].start
            t, p = graph.logit_ids[k].item(), graph.logit_probs[k].item()
            text = tokenizer.decode([t])
            nodes[i] = _node(f"{L + 1}_{t}_{S - 1}", t, str(L + 1), S - 1, "logit", f"L_{t}-{S - 1}", None,
                             token_prob=p, is_target_logit=k == 0, clerp=f'Output "{text}" (p={p:.3f})')  # fmt: skip
    links = []
    for target, source in torch.nonzero(pruned.edges).tolist():  # by target, then source
        if target in nodes and source in nodes:
            links.append({"source": nodes[source]["node_id"], "target": nodes[target]["node_id"],
                          "weight": graph.adjacency[target, source].item()})  # fmt: skip
    linked = {x for link in links for x in (link["source"], link["target"])}
    kept = {i: n for i, n in nodes.items() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")}
    return {
        "metadata": {
            "slug": slug,
            "scan": scan,
            "transcoder_list": [],
            "prompt_tokens": [tokenizer.decode([t]) for t in ids],
            "prompt": tokenizer.decode(ids),
            "node_threshold": node_threshold,
            "schema_version": 1,
        },  # fmt: skip
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": list(kept.values()),
        "links": links,
        "gsp": {"influence": {n["node_id"]: pruned.influence[i].item() for i, n in kept.items()}},
    }


def dumps(doc: dict) -> str:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False) + "\n"


def page(doc: dict, details: dict) -> str:
    """The self-contained page of a graph (`doc`, graph_json's, with its "gsp" section) and its latents'
    details (stages/trace.py: decoder tokens and contexts, by `{layer}_{latent}`, and their vocabulary)."""
    data = json.dumps({"graph": doc, "details": details}, separators=(",", ":"), allow_nan=False)
    title = f"gsp trace · {doc['metadata']['prompt']}"
    return _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data.replace("</", "<\\/"))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>__TITLE__</title>
<style>
body{margin:0;font:13px/1.4 system-ui,sans-serif;color:#222;display:flex;height:100vh}
#left{flex:1;overflow:auto;padding:10px}
#side{width:380px;border-left:1px solid #ddd;overflow-y:auto;padding:10px 14px}
h1{font-size:16px;margin:0 0 4px}h2{font-size:14px;margin:14px 0 4px}
.meta{color:#555;font-size:12px}
svg text{font-size:11px;fill:#333}
.node{cursor:pointer;stroke:#fff;stroke-width:1}
.node.sel{stroke:#000;stroke-width:2}
.latent{fill:#7a5cc7}.error{fill:#999}.embedding{fill:#3a8f5c}.logit{fill:#d08a1e}
.edge{fill:none;opacity:.35}.edge.hi{opacity:.95}
.list div{cursor:pointer;padding:1px 0}.list div:hover{background:#eef4ff}
.ctx{font-family:ui-monospace,monospace;font-size:12px;padding:3px 0;border-bottom:1px solid #f3f3f3;
  white-space:pre-wrap}
.ctx .at{background:#fbd38d;border-radius:2px}
.tokens span{display:inline-block;margin:2px 3px;padding:1px 5px;background:#eef7ee;border-radius:3px;
  font-family:ui-monospace,monospace}
#errors{color:#b00}
</style></head>
<body>
<div id="left"><h1>__TITLE__</h1><div class="meta" id="summary"></div><div id="errors"></div>
<svg id="graph"></svg></div>
<div id="side"><h2 id="node-title">Click a node</h2><div id="node-info"></div></div>
<script>
window.onerror = function (m) { document.getElementById("errors").textContent = "error: " + m; };
(function () {  // its own scope: no clash with the window's globals (top, left, …)
const DATA = __DATA__;
const G = DATA.graph, D = DATA.details, GSP = G.gsp || {};
const NS = "http://www.w3.org/2000/svg";
const tokens = G.metadata.prompt_tokens, S = tokens.length;
// maxima by reduce, never Math.max(...xs): a graph's hundreds of thousands of edges overflow the call stack
const most = (xs, f, floor) => xs.reduce((m, x) => Math.max(m, f(x)), floor);
const L = most(G.nodes.filter(n => n.feature_type === "logit"), n => +n.layer, 0) - 1;  // layers
const byId = {};
G.nodes.forEach(n => byId[n.node_id] = n);
function row(n) { return n.layer === "E" ? 0 : (n.feature_type === "logit" ? L + 1 : +n.layer + 1); }
const colW = Math.max(70, Math.min(150, 1100 / S)), rowH = 44, left = 60, top = 30;
const W = left + colW * S + 20, H = top + rowH * (L + 2) + 40;
const cells = {};
G.nodes.forEach(n => { const k = row(n) + "_" + n.ctx_idx; (cells[k] = cells[k] || []).push(n); });
const maxInfl = most(Object.values(GSP.influence || {}), v => v, 1e-12);
Object.values(cells).forEach(list => list.forEach((n, i) => {
  const spread = Math.min(10, (colW - 16) / Math.max(1, list.length));
  n.x = left + colW * (n.ctx_idx + 0.5) + (i - (list.length - 1) / 2) * spread;
  n.y = top + rowH * (L + 1 - row(n)) + 12;
  const infl = (GSP.influence || {})[n.node_id];
  n.r = n.feature_type === "logit" ? 4 + 8 * Math.sqrt(n.token_prob) : 2.5 + 7 * Math.sqrt((infl || 0) / maxInfl);
}));
function el(name, attrs, parent) {
  const e = document.createElementNS(NS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
const svg = document.getElementById("graph");
svg.setAttribute("width", W); svg.setAttribute("height", H);
for (let r = 0; r <= L + 1; r++) {
  const y = top + rowH * (L + 1 - r) + 12;
  el("line", {x1: left, x2: W - 10, y1: y, y2: y, stroke: "#f0f0f0"}, svg);
  el("text", {x: 4, y: y + 4}, svg).textContent = r === 0 ? "emb" : (r === L + 1 ? "logits" : "L" + (r - 1));
}
tokens.forEach((t, p) => {
  const tx = el("text", {x: left + colW * (p + 0.5), y: H - 12, "text-anchor": "middle"}, svg);
  tx.textContent = JSON.stringify(t).slice(1, -1);
});
const maxW = most(G.links, l => Math.abs(l.weight), 1e-12);
const edges = G.links.map(l => {
  const a = byId[l.source], b = byId[l.target];
  const mid = (a.y + b.y) / 2;
  const path = el("path", {class: "edge", d: `M${a.x},${a.y} C${a.x},${mid} ${b.x},${mid} ${b.x},${b.y}`,
    stroke: l.weight >= 0 ? "#2b6cb0" : "#c53030", "stroke-width": 0.4 + 3 * Math.abs(l.weight) / maxW}, svg);
  return {link: l, path: path};
});
G.nodes.forEach(n => {
  const c = el("circle", {class: "node " + (n.feature_type === "cross layer transcoder" ? "latent" :
    n.feature_type === "mlp reconstruction error" ? "error" : n.feature_type), cx: n.x, cy: n.y, r: n.r,
    "data-id": n.node_id}, svg);
  el("title", {}, c).textContent = label(n);
  c.addEventListener("click", () => { location.hash = "n=" + encodeURIComponent(n.node_id); });
  n.el = c;
});
G.nodes.filter(n => n.feature_type === "logit").forEach(n => {
  el("text", {x: n.x, y: n.y - n.r - 3, "text-anchor": "middle"}, svg).textContent = n.clerp.replace(/^Output /, "");
});
function label(n) {
  if (n.feature_type === "cross layer transcoder") {
    return `latent ${n.node_id.split("_")[1]} · layer ${n.layer} · pos ${n.ctx_idx}`;
  }
  if (n.feature_type === "mlp reconstruction error") return `error · layer ${n.layer} · pos ${n.ctx_idx}`;
  if (n.feature_type === "embedding") return `token ${JSON.stringify(tokens[n.ctx_idx])} · pos ${n.ctx_idx}`;
  return n.clerp;
}
const ESC = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"};
function esc(s) { return String(s).replace(/[&<>"]/g, c => ESC[c]); }
function vocab(i) { return D.vocab[String(i)] !== undefined ? D.vocab[String(i)] : "#" + i; }
function show(id) {
  const n = byId[id];
  G.nodes.forEach(m => m.el.classList.toggle("sel", m === n));
  edges.forEach(e => e.path.classList.toggle("hi", !!n && (e.link.source === id || e.link.target === id)));
  if (!n) return;
  document.getElementById("node-title").textContent = label(n);
  const infl = (GSP.influence || {})[id];
  let h = `<div class="meta">node ${esc(id)}` +
    (n.activation != null ? ` · activation ${n.activation.toFixed(3)}` : "") +
    (infl != null ? ` · influence ${infl.toExponential(2)}` : "") + "</div>";
  const strongest = ls => ls.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 12);
  const inc = G.links.filter(l => l.target === id), out = G.links.filter(l => l.source === id);
  const line = (l, arrow, other) =>
    `<div data-go="${esc(other)}">${l.weight.toFixed(3)} ${arrow} ${esc(label(byId[other]))}</div>`;
  h += `<h2>Incoming (${inc.length})</h2><div class="list" id="incoming">` +
    strongest(inc).map(l => line(l, "←", l.source)).join("") + "</div>";
  h += `<h2>Outgoing (${out.length})</h2><div class="list" id="outgoing">` +
    strongest(out).map(l => line(l, "→", l.target)).join("") + "</div>";
  const key = n.feature_type === "cross layer transcoder" ? n.layer + "_" + n.node_id.split("_")[1] : null;
  const d = key && D.latents[key];
  if (d) {
    h += `<h2>Its decoder promotes</h2><div class="tokens" id="promoted">` +
      d.logits.map(([t, v]) => `<span title="${v}">${esc(JSON.stringify(vocab(t)).slice(1, -1))}</span>`).join("") +
      "</div>";
    h += `<h2>Top contexts</h2><div id="contexts">` + (d.contexts.length ? d.contexts.map(c =>
      `<div class="ctx">${c.act.toFixed(2)}  ` + c.tokens.map((t, i) =>
        `<span${i === c.at ? ' class="at"' : ""}>${esc(vocab(t))}</span>`).join("") + "</div>").join("") :
      '<div class="meta">none in the rows scanned</div>') + "</div>";
  }
  document.getElementById("node-info").innerHTML = h;
  document.querySelectorAll("[data-go]").forEach(e => e.addEventListener("click", () => {
    location.hash = "n=" + encodeURIComponent(e.getAttribute("data-go")); }));
}
const scores = GSP.replacement_score != null ?
  ` · replacement score ${GSP.replacement_score.toFixed(3)}, completeness ${GSP.completeness_score.toFixed(3)}` : "";
const counts = GSP.active_latents != null ?
  ` · ${GSP.latent_nodes} of ${GSP.active_latents} active latents attributed` : "";
document.getElementById("summary").textContent =
  `${G.nodes.length} nodes, ${G.links.length} edges kept` + scores + counts;
function fromHash() { const m = location.hash.match(/n=([^&]+)/); show(m ? decodeURIComponent(m[1]) : null); }
window.addEventListener("hashchange", fromHash);
fromHash();
document.body.setAttribute("data-ready", "1");
})();
</script></body></html>
"""
