"""Attribution graphs (pipeline/attribution.py) against a frozen Gemma 3 written out here by hand: the
residual stream rebuilt layer by layer from the model's weights, with the norm scales, attention
patterns and MLP outputs of a clean pass held, and the transcoders applied from their files in numpy.
Adding δ·(its written vector) to any one source must move every target by δ × its adjacency entry."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import gsp_subprocess, headless_chromium
from safetensors.torch import load_file

from pipeline.attribution import attribute, influence, logit_weights, normalized, prune, scores
from pipeline.transcoder_set import TranscoderSet


@pytest.fixture(scope="module", params=["plain", "skip", "clt", "clt-skip"])
def traced(request, every_mlp, tiny_model, tmp_path_factory):
    """(model, the transcoders' files by layer, prompt ids, graph) for a set fitted on the tiny Gemma 3
    (plain or skip transcoders), or a random cross-layer transcoder in Gemma Scope 2's files."""
    from test_clt import write_clt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.transcoder_set import load_transcoders

    out = tmp_path_factory.mktemp("set") / "set"
    if request.param.startswith("clt"):
        write_clt(out, skip=request.param == "clt-skip")
        files = [out / f"params_layer_{layer}.safetensors" for layer in range(4)]
    else:
        args = ["fit", "--store", every_mlp / "store", "--transcoders", "mlp_in:mlp_out", "--out", out, "--width",
                48, "--steps", 30, "--batch-size", 128, "--target-l0", 6, *(["--skip"] if "skip" in request.param
                else [])]  # fmt: skip
        assert gsp_subprocess(*args).returncode == 0
        files = [out / f"layer_{layer}" / "params.safetensors" for layer in range(4)]
    lm = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = torch.tensor(
        [tok.bos_token_id, *tok("the king of the north river is", add_special_tokens=False)["input_ids"]]
    )
    tset = load_transcoders(out)
    graph = attribute(lm, tset, ids, [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id], batch=16)
    params = {layer: {k: v.double() for k, v in load_file(file).items()} for layer, file in enumerate(files)}
    _SETS[id(graph)] = (tset, out)
    return lm, params, ids, graph


_SETS: dict = {}


def graph_set(traced):
    """The fixture's transcoders (a TranscoderSet or a CrossLayerTranscoder)."""
    return _SETS[id(traced[-1])][0]


def _writes(p: dict, layer: int, latent: int, n_layers: int) -> dict:
    """What one latent writes per unit activation, by the MLP output it writes into: its layer's (a
    transcoder, w_dec (F, D)), or every later layer's (a cross-layer transcoder, w_dec (F, L, D))."""
    if p["w_dec"].ndim == 3:
        return {m: p["w_dec"][latent, m] for m in range(layer, n_layers)}
    return {layer: p["w_dec"][latent]}


class Frozen:
    """A Gemma 3 with every norm scale, attention pattern and MLP output held at a clean pass's
    values (float64), run from given embeddings and additions to the MLP outputs. `params` are the
    transcoders' files by layer: a set's (w_dec (F, D)) or a CLT's (w_dec (F, L, D))."""

    def __init__(self, lm, params, ids):
        self.lm, self.params, self.S = lm, params, len(ids)
        self.scale, self.mlp_in, self.mlp_out, handles = {}, {}, {}, []
        norms = {"final": lm.model.norm}
        for layer, block in enumerate(lm.model.layers):
            for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm"):
                norms[(layer, name)] = getattr(block, name)
            handles.append(
                block.pre_feedforward_layernorm.register_forward_hook(
                    lambda m, a, o, i=layer: self.mlp_in.update({i: o[0].double()})
                )
            )
            handles.append(block.post_feedforward_layernorm.register_forward_hook(
                lambda m, a, o, i=layer: self.mlp_out.update({i: o[0].double()})))  # fmt: skip
        for key, norm in norms.items():
            handles.append(norm.register_forward_hook(lambda m, a, o, k=key: self.scale.update({k: (
                a[0][0].double(), torch.rsqrt(a[0][0].double().pow(2).mean(-1, keepdim=True) + m.eps))})))  # fmt: skip
        with torch.no_grad():
            out = lm(input_ids=ids[None], output_attentions=True)
        for h in handles:
            h.remove()
        self.patterns = [a[0].double() for a in out.attentions]  # (H, S, S) each
        self.logits = out.logits[0].double()
        self.embed = lm.model.embed_tokens(ids[None])[0].double()
        special = ids == 2
        self.latents, self.errors = {}, {}
        for layer, p in params.items():  # the transcoders, from their files
            pre = self.mlp_in[layer] @ p["w_enc"] + p["b_enc"]
            self.latents[layer] = pre.relu() * (pre > p["threshold"])
            self.latents[layer][special] = 0
        for m in params:
            self.errors[m] = torch.where(special[:, None], 0.0, self.mlp_out[m] - self.predict(m))

    def predict(self, m: int) -> torch.Tensor:
        """The transcoders' prediction of layer m's MLP output on the clean pass (no error node)."""
        p = self.params[m]
        y = p["b_dec"] + sum(
            self.latents[layer] @ (q["w_dec"][:, m] if q["w_dec"].ndim == 3 else q["w_dec"])
            for layer, q in self.params.items()
            if layer == m or (q["w_dec"].ndim == 3 and layer < m)
        )
        return y + self.mlp_in[m] @ p["affine_skip_connection"] if "affine_skip_connection" in p else y

    def norm(self, key, x, module):
        return x * self.scale[key][1] * (1 + module.weight.double())

    def run(self, embed, add):
        """(each layer's MLP input, the final normed residual) with add[layer] (S, D) added to its MLP output."""
        cfg = self.lm.config
        h, ins = embed, {}
        for layer, block in enumerate(self.lm.model.layers):
            att = block.self_attn
            x = self.norm((layer, "input_layernorm"), h, block.input_layernorm)
            v = (x @ att.v_proj.weight.double().T).view(self.S, cfg.num_key_value_heads, cfg.head_dim)
            v = v.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)
            mixed = torch.einsum("hqk,khd->qhd", self.patterns[layer], v).reshape(self.S, -1)
            h = h + self.norm((layer, "post_attention_layernorm"), mixed @ att.o_proj.weight.double().T,
                              block.post_attention_layernorm)  # fmt: skip
            ins[layer] = self.norm((layer, "pre_feedforward_layernorm"), h, block.pre_feedforward_layernorm)
            y = self.mlp_out[layer] + add.get(layer, 0)
            if "affine_skip_connection" in self.params[layer]:  # the skip path stays live
                y = y + (ins[layer] - self.mlp_in[layer]) @ self.params[layer]["affine_skip_connection"]
            h = h + y
        return ins, self.norm("final", h, self.lm.model.norm)

    def targets(self, graph, ins, final):
        """Every target's value: latents' pre-activations less b_enc, then the logits' de-meaned values."""
        w_u = self.lm.lm_head.weight.double()
        lat = [ins[ly][p] @ self.params[ly]["w_enc"][:, i] for ly, p, i in graph.latents.tolist()]
        logit = [final[-1] @ (w_u[t] - w_u.mean(0)) for t in graph.logit_ids.tolist()]
        return torch.stack(lat + logit)


def _sources(frozen: Frozen, graph):
    """Each source node's (kind, position, what it writes: {MLP output layer: vector}, or the embedding),
    in the graph's column order."""
    out, n_layers = [], len(frozen.params)
    for (layer, pos, latent), a in zip(graph.latents.tolist(), graph.activations.tolist(), strict=True):
        writes = _writes(frozen.params[layer], layer, latent, n_layers)
        out.append(("mlp", pos, {m: a * v for m, v in writes.items()}))
    out += [("mlp", pos, {layer: frozen.errors[layer][pos]}) for layer in frozen.params for pos in range(frozen.S)]
    out += [("embed", pos, frozen.embed[pos]) for pos in range(frozen.S)]
    return out


def _perturbed(frozen: Frozen, source, delta: float):
    """(embeddings, additions to the MLP outputs) with δ times one source's written vectors added."""
    kind, pos, what = source
    embed, add = frozen.embed.clone(), {}
    if kind == "embed":
        embed[pos] += delta * what
    else:
        for m, vec in what.items():
            add[m] = torch.zeros_like(frozen.embed)
            add[m][pos] = delta * vec
    return embed, add


def test_the_frozen_model_here_is_the_model(traced):
    lm, params, ids, graph = traced
    frozen = Frozen(lm, params, ids)
    _, final = frozen.run(frozen.embed, {})
    torch.testing.assert_close(final @ lm.lm_head.weight.double().T, frozen.logits, rtol=1e-4, atol=1e-4)
    # and the transcoders with their error nodes are the MLPs (BOS keeps its own output: no node there)
    for layer in range(4):
        torch.testing.assert_close((frozen.predict(layer) + frozen.errors[layer])[1:], frozen.mlp_out[layer][1:])


def test_every_source_moves_every_target_by_its_edge(traced):
    lm, params, ids, graph = traced
    frozen = Frozen(lm, params, ids)
    assert graph.n_latents == graph.active == sum(int((f != 0).sum()) for f in frozen.latents.values()) > 20
    want_latents = [[ly, p, i] for ly in range(4) for p, i in (frozen.latents[ly] != 0).nonzero().tolist()]
    assert graph.latents.tolist() == want_latents  # by layer, position, latent
    want = torch.stack([frozen.latents[ly][p, i] for ly, p, i in want_latents])
    torch.testing.assert_close(graph.activations.double(), want, rtol=1e-5, atol=1e-6)
    base = frozen.targets(graph, *frozen.run(frozen.embed, {}))
    rows = torch.cat([torch.arange(graph.n_latents), torch.arange(len(graph.logit_ids)) + len(graph.adjacency) - len(
        graph.logit_ids)])  # fmt: skip
    adjacency = graph.adjacency.double()
    delta = 0.5
    for col, source in enumerate(_sources(frozen, graph)):
        moved = frozen.targets(graph, *frozen.run(*_perturbed(frozen, source, delta))) - base
        want = delta * adjacency[rows, col]
        torch.testing.assert_close(moved, want, rtol=1e-3, atol=1e-4 * (1 + base.abs().max().item()))
    # rows of errors and tokens, and columns of logits, are empty
    sl = graph.slices()
    assert not graph.adjacency[sl["error"].start : sl["logit"].start].any()
    assert not graph.adjacency[:, sl["logit"]].any()


def test_a_latents_pre_activation_is_its_row_plus_the_biases(traced):
    """Completeness: pre-activation = Σ incoming edges + b_enc + what the frozen model makes of the
    sources no node carries (every b_dec, the MLP outputs at BOS) — the run with every node zeroed."""
    lm, params, ids, graph = traced
    frozen = Frozen(lm, params, ids)
    everything = frozen.targets(graph, *frozen.run(frozen.embed, {}))
    remove = {}
    for kind, pos, what in _sources(frozen, graph):
        if kind == "mlp":
            for m, vec in what.items():
                remove.setdefault(m, torch.zeros_like(frozen.embed))[pos] -= vec
    nothing = frozen.targets(graph, *frozen.run(torch.zeros_like(frozen.embed), remove))
    n, k = graph.n_latents, len(graph.logit_ids)
    row_sums = graph.adjacency.double().sum(1)
    torch.testing.assert_close(everything[:n], row_sums[:n] + nothing[:n], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(everything[n:], row_sums[-k:] + nothing[n:], rtol=1e-4, atol=1e-4)
    # and each latent's true pre-activation, from the MLP input of the clean pass
    where = graph.latents.tolist()
    pre = torch.stack([frozen.mlp_in[ly][p] @ params[ly]["w_enc"][:, i] + params[ly]["b_enc"][i] for ly, p, i in where])
    b_enc = torch.stack([params[ly]["b_enc"][i] for ly, _, i in where])
    torch.testing.assert_close(pre, row_sums[:n] + nothing[:n] + b_enc, rtol=1e-4, atol=1e-4)


def test_logit_targets_are_the_likeliest_tokens(traced):
    lm, params, ids, graph = traced
    probs = Frozen(lm, params, ids).logits[-1].softmax(-1)
    top = probs.topk(10)
    k = len(graph.logit_ids)
    assert graph.logit_ids.tolist() == top.indices[:k].tolist()
    torch.testing.assert_close(graph.logit_probs.double(), top.values[:k], rtol=1e-4, atol=1e-6)
    cumulative = top.values.cumsum(0)
    assert k == 10 or (cumulative[k - 1] >= 0.95 and (k == 1 or cumulative[k - 2] < 0.95))


def test_a_capped_graph_keeps_the_most_influential_latents(traced):
    """With a cap below the active latents, the rows and columns kept are those latents' (the others'
    edges dropped), the same entries as in the full graph, and they reach the logits more than most."""
    lm, params, ids, graph = traced
    cap = graph.n_latents // 3
    small = attribute(lm, graph_set(traced), ids, [2], max_latents=cap, batch=8)
    assert small.n_latents == cap and small.active == graph.n_latents
    index = {tuple(x): j for j, x in enumerate(graph.latents.tolist())}
    kept = torch.tensor([index[tuple(x)] for x in small.latents.tolist()])
    assert kept.tolist() == sorted(kept.tolist())  # still in index order
    sl, ssl = graph.slices(), small.slices()
    cols = torch.cat([kept, torch.arange(sl["error"].start, sl["logit"].start)])
    src = slice(0, ssl["logit"].start)
    torch.testing.assert_close(small.adjacency[:cap, src], graph.adjacency[kept][:, cols])
    torch.testing.assert_close(small.adjacency[ssl["logit"], src], graph.adjacency[sl["logit"]][:, cols])
    infl = influence(normalized(graph.adjacency), logit_weights(graph))[: graph.n_latents]
    assert infl[kept].mean() > 1.5 * infl.mean()


def test_a_streamed_set_reads_each_layer_once_and_traces_the_same_graph(traced, monkeypatch):
    """A set that holds one layer's transcoder at a time (what gsp trace reads) holds no weights once
    loaded, reads each layer from disk once while tracing, and gives the same graph to the bit."""
    import pipeline.sae_formats

    lm, _, ids, graph = traced
    if not isinstance(graph_set(traced), TranscoderSet):
        pytest.skip("a cross-layer transcoder is held whole")
    streamed = TranscoderSet.load(_SETS[id(graph)][1], streamed=True)
    assert not list(streamed.parameters()) and all(m.sae is None for m in streamed.members.values())
    reads, load = [], pipeline.sae_formats.load_sae
    monkeypatch.setattr(pipeline.sae_formats, "load_sae", lambda path: reads.append(path) or load(path))
    again = attribute(lm, streamed, ids, [0, 1, 2], batch=16)
    assert reads == [str(streamed.members[layer].path) for layer in range(4)]
    assert torch.equal(again.adjacency, graph.adjacency) and torch.equal(again.latents, graph.latents)


def _influence_by_inverse(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """w·(A + A² + …) = w·((I − A)⁻¹ − I), in float64."""
    n = np.abs(a) / np.maximum(np.abs(a).sum(1, keepdims=True), 1e-10)
    return w @ (np.linalg.inv(np.eye(len(n)) - n) - np.eye(len(n))), n


def test_pruning_and_scores_by_hand(traced):
    *_, graph = traced
    a, sl = graph.adjacency.double().numpy(), graph.slices()
    w = logit_weights(graph).double().numpy()
    infl, n = _influence_by_inverse(a, w)
    p = prune(graph, 0.8, 0.98)
    nodes = p.nodes.numpy()
    assert nodes[sl["token"].start :].all()  # tokens and logits always kept
    ranked = np.sort(infl)[::-1]
    threshold = ranked[np.searchsorted(np.cumsum(ranked) / ranked.sum(), 0.8)]
    inner = slice(0, sl["token"].start)
    assert (infl[inner][nodes[inner]] >= threshold * (1 - 1e-5)).all()  # only influential latents and errors
    assert 0 < nodes[: graph.n_latents].sum() < graph.n_latents
    edges = p.edges.numpy()
    assert not edges[~nodes].any() and not edges[:, ~nodes].any()
    for i in np.flatnonzero(nodes[inner]):  # every kept latent and error feeds a kept node
        assert edges[:, i].any()
    for i in np.flatnonzero(nodes[: graph.n_latents]):  # every kept latent is fed by one
        assert edges[i].any()
    s = scores(graph)
    tokens, errors = infl[sl["token"]].sum(), infl[sl["error"]].sum()
    assert s["replacement"] == pytest.approx(tokens / (tokens + errors), rel=1e-4)
    weight = infl + w
    completeness = ((1 - n[:, sl["error"]].sum(1)) * weight).sum() / weight.sum()
    assert s["completeness"] == pytest.approx(completeness, rel=1e-4)
    assert 0 < s["replacement"] < 1 and 0 < s["completeness"] < 1
    again = scores(graph, p.influence)  # as gsp trace calls it, with prune's influence
    assert again == pytest.approx(s, rel=1e-6)


# ------------------------------------------------------------------------------ gsp trace: the JSON and the page
@pytest.fixture(scope="module")
def trace_files(traced, tmp_path_factory):
    """gsp trace through the fixture's set (as a subprocess: the CLI end to end), its JSON and page."""
    import json

    out = tmp_path_factory.mktemp("trace")
    folder = _SETS[id(traced[-1])][1]
    model = ["--model", traced[0].config.name_or_path]  # a CLT's files name no model
    r = gsp_subprocess("trace", "--transcoders", folder, "--prompt", "the king of the north river is", "--out", out,
                       "--batch-size", 16, "--slug", "g", *model)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads((out / "g.json").read_text()), out / "g.html"


def test_the_trace_json_is_the_graph_in_neuronpedias_schema(traced, trace_files):
    lm, params, ids, graph = traced
    doc, _ = trace_files
    assert list(doc)[:4] == ["metadata", "qParams", "nodes", "links"]
    assert doc["metadata"]["schema_version"] == 1 and len(doc["metadata"]["prompt_tokens"]) == len(ids)
    nodes = {n["node_id"]: n for n in doc["nodes"]}
    assert len(nodes) == len(doc["nodes"])  # ids are unique
    assert {n["feature_type"] for n in doc["nodes"]} <= {"cross layer transcoder", "mlp reconstruction error",
                                                          "embedding", "logit"}  # fmt: skip
    assert sum(n["feature_type"] == "embedding" for n in doc["nodes"]) == len(ids)  # every token, always
    logits = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    assert [n["feature"] for n in logits] == graph.logit_ids.tolist() and logits[0]["is_target_logit"]
    # every link is an entry of the adjacency matrix the library computes, between nodes of the JSON
    sl = graph.slices()
    index = {f"{ly}_{i}_{p}": j for j, (ly, p, i) in enumerate(graph.latents.tolist())}
    index |= {f"err_{ly}_{p}": sl["error"].start + ly * graph.n_pos + p for ly in range(4) for p in range(graph.n_pos)}
    index |= {f"E_{t}_{p}": sl["token"].start + p for p, t in enumerate(ids.tolist())}
    index |= {f"5_{t}_{graph.n_pos - 1}": sl["logit"].start + k for k, t in enumerate(graph.logit_ids.tolist())}
    assert doc["links"] and all(x["source"] in nodes and x["target"] in nodes for x in doc["links"])
    for x in doc["links"]:
        want = graph.adjacency[index[x["target"]], index[x["source"]]].item()
        assert x["weight"] == pytest.approx(want, rel=1e-3, abs=1e-6)  # (the CLI ran sdpa attention, the fixture eager)
    latent = next(n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder")
    ly, f, p = map(int, latent["node_id"].split("_"))
    assert latent["activation"] == pytest.approx(graph.activations[index[latent["node_id"]]].item(), rel=1e-5)
    assert latent["feature"] == (ly + f) * (ly + f + 1) // 2 + f and latent["ctx_idx"] == p
    assert 0 < doc["gsp"]["replacement_score"] <= 1 and 0 < doc["gsp"]["completeness_score"] <= 1


def test_the_trace_page_in_a_headless_browser(trace_files, tmp_path):
    import re
    import subprocess

    args = headless_chromium()
    doc, page = trace_files
    latent = max((n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"),
                 key=lambda n: sum(x["target"] == n["node_id"] for x in doc["links"]))  # fmt: skip
    url = f"file://{page}#n={latent['node_id']}"
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    shot = tmp_path / "trace.png"
    subprocess.run([*args, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert 'data-ready="1"' in dom and '<div id="errors"></div>' in dom  # ran to its end, no error caught
    dom = dom.split("<script")[0]
    drawn = re.findall(r'<circle class="node[^"]*"[^>]*data-id="([^"]+)"', dom)
    assert sorted(drawn) == sorted(n["node_id"] for n in doc["nodes"])  # every node of the JSON, once
    assert dom.count('<path class="edge') == len(doc["links"])
    incoming = sum(x["target"] == latent["node_id"] for x in doc["links"])
    assert f"<h2>Incoming ({incoming})</h2>" in dom  # #n=<id> opened the node, with its edges
    assert 'id="promoted"' in dom and 'id="contexts"' in dom
    assert shot.read_bytes()[:4] == b"\x89PNG"


def test_bad_traces_are_one_line_errors(gsp, traced, every_mlp, tmp_path):
    from conftest import one_line_error

    folder = _SETS[id(traced[-1])][1]

    def trace(*args):
        return gsp("trace", "--out", tmp_path / "t", *args)

    one_line_error(trace("--prompt", "the"), "--transcoders is required")
    one_line_error(trace("--transcoders", folder), "--prompt is required")
    one_line_error(trace("--transcoders", every_mlp / "store", "--prompt", "the"), "is not a transcoder set")
    one_line_error(trace("--transcoders", tmp_path / "nowhere", "--prompt", "the"), "nowhere is not a folder")
    one_line_error(trace("--transcoders", folder, "--prompt", "the", "--node-threshold", "0"), "--node-threshold")
    one_line_error(trace("--transcoders", folder, "--prompt", "the", "--max-nodes", "0"), "--max-nodes")
    r = gsp("fit", "--store", every_mlp / "store", "--transcoders", "mlp_in:mlp_out", "--layers", "1,2", "--out",
            tmp_path / "partial", "--width", 32, "--steps", 5, "--batch-size", 64)  # fmt: skip
    assert r.exit_code == 0, r.output
    one_line_error(trace("--transcoders", tmp_path / "partial", "--prompt", "the"), "needs a transcoder for each")
    # a file of the graph's name that gsp did not write is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "g.json").write_text('{"my": "notes"}')
    r = gsp("trace", "--transcoders", folder, "--prompt", "the", "--out", tmp_path / "mine", "--slug", "g")
    one_line_error(r, "was not written by gsp trace")
    assert (tmp_path / "mine" / "g.json").read_text() == '{"my": "notes"}'
    assert not (tmp_path / "mine" / "g.html").exists()
    for _ in range(2):  # its own graph, though, is replaced by a new run
        r = gsp("trace", "--transcoders", folder, "--prompt", "the", "--out", tmp_path / "again", "--slug", "g",
                "--context-tokens", 0, "--model", traced[0].config.name_or_path)  # fmt: skip
        assert r.exit_code == 0, r.output
    assert not (tmp_path / "t").exists()
    if not isinstance(graph_set(traced), TranscoderSet):
        return
    # a set whose training store is gone (fitted elsewhere): --model says which model, and no contexts
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    for config in moved.glob("layer_*/config.json"):
        config.write_text(json.dumps(json.loads(config.read_text()) | {"store": str(tmp_path / "gone")}))
    one_line_error(trace("--transcoders", moved, "--prompt", "the"), "pass --model")
    r = trace("--transcoders", moved, "--prompt", "the", "--model", traced[0].config.name_or_path, "--slug", "m")
    assert r.exit_code == 0 and "no latents' contexts for 4 layers (give --store)" in " ".join(r.output.split())
    page = (tmp_path / "t" / "m.html").read_text().replace(" ", "")
    assert '"contexts":[]' in page and '"contexts":[{' not in page


@pytest.mark.slow
def test_a_sample_of_edges_on_the_real_gemma(gsp, tmp_path):
    """The real Gemma 3 270M with an 18-layer set fitted briefly on its activations: the replacement
    is the model, and 30 sources drawn at random move every target by δ × their edges."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models import offline_model_dir

    store, out = tmp_path / "store", tmp_path / "set"
    r = gsp("harvest", "--layer", "all", "--site", "mlp_in,mlp_out", "--tokens", 1024, "--context-size", 64,
            "--batch-size", 4, "--store", store, "--store-dtype", "float32", "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    r = gsp("fit", "--store", store, "--transcoders", "mlp_in:mlp_out", "--out", out, "--width", 256, "--steps", 10,
            "--batch-size", 128, "--target-l0", 8, "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    folder = offline_model_dir()
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(
        [2, *tok("The capital of the state containing Dallas is", add_special_tokens=False)["input_ids"]]
    )
    graph = attribute(lm, TranscoderSet.load(out), ids, [0, 1, 2], batch=64)
    params = {layer: {k: v.double() for k, v in load_file(out / f"layer_{layer}" / "params.safetensors").items()}
              for layer in range(18)}  # fmt: skip
    frozen = Frozen(lm, params, ids)
    _, final = frozen.run(frozen.embed, {})
    torch.testing.assert_close(final @ lm.lm_head.weight.double().T, frozen.logits, rtol=1e-3, atol=1e-3)
    assert graph.n_latents == sum(int((f != 0).sum()) for f in frozen.latents.values()) > 100
    base = frozen.targets(graph, *frozen.run(frozen.embed, {}))
    k = len(graph.logit_ids)
    rows = torch.cat([torch.arange(graph.n_latents), torch.arange(k) + len(graph.adjacency) - k])
    sources = _sources(frozen, graph)
    for col in np.random.default_rng(0).choice(len(sources), 30, replace=False).tolist():
        moved = frozen.targets(graph, *frozen.run(*_perturbed(frozen, sources[col], 0.5))) - base
        want = 0.5 * graph.adjacency.double()[rows, col]
        scale = want.abs().max().item() + 1e-6
        assert (moved - want).abs().max().item() <= 2e-3 * scale, sources[col][:2]


def test_gemma_scope_2_per_layer_transcoders_trace_as_the_set(traced, gsp, tmp_path):
    """A folder of Gemma Scope 2 per-layer transcoders (its transcoder_all/ layout, here the fixture's set
    exported layer by layer) is read as a set: the same graph."""
    from pipeline.errors import GspError
    from pipeline.transcoder_set import load_transcoders

    lm, _, ids, graph = traced
    tset = graph_set(traced)
    if not isinstance(tset, TranscoderSet):
        pytest.skip("a cross-layer transcoder has no per-layer folders")
    for layer, member in tset.members.items():
        r = gsp("export", member.path, "--to", "gemma-scope-2", "--out", tmp_path / f"x{layer}")
        assert r.exit_code == 0, r.output
        (sub,) = (tmp_path / f"x{layer}").glob("*/layer_*")
        (tmp_path / "transcoder_all").mkdir(exist_ok=True)
        sub.rename(tmp_path / "transcoder_all" / sub.name)
    folders = sorted(p.name for p in (tmp_path / "transcoder_all").iterdir())
    assert len(folders) == 4 and all(f.startswith(f"layer_{i}_width_") for i, f in enumerate(folders))
    again = attribute(lm, load_transcoders(tmp_path / "transcoder_all"), ids, [0, 1, 2], batch=16)
    torch.testing.assert_close(again.adjacency, graph.adjacency, rtol=1e-5, atol=1e-6)
    assert again.latents.tolist() == graph.latents.tolist()
    # a folder holding two variants needs --variant
    other = tmp_path / "transcoder_all" / folders[0].replace("_width_", "_width_9")  # layer 0 of another variant
    (tmp_path / "transcoder_all" / folders[0]).rename(other)
    with pytest.raises(GspError, match="several transcoder variants"):
        load_transcoders(tmp_path / "transcoder_all")
    with pytest.raises(GspError, match="has no variant width_nope"):
        load_transcoders(tmp_path / "transcoder_all", "width_nope")


def test_transcoders_from_a_hub_path_fetch_only_what_is_traced(traced, tmp_path, monkeypatch):
    """A Hub path to a set, a CLT, or a folder of Gemma Scope 2 per-layer transcoders holding two variants
    fetches only the files read (one variant's; without --variant, only the small files that tell the
    variants apart), with the token; what is read is the transcoders of the local folder."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from pipeline.errors import GspError
    from pipeline.transcoder_set import load_transcoders

    local = _SETS[id(traced[-1])][1]
    repo, fetched = tmp_path / "repo", []  # the Hub repository's files; each fetch's files

    def fake_snapshot_download(repo_id, *, revision, token, allow_patterns):
        assert (repo_id, revision, token) == ("google/gs2", None, "hf_tok")
        files = [p.relative_to(repo).as_posix() for p in sorted(repo.rglob("*")) if p.is_file()]
        fetched.append(list(filter_repo_objects(files, allow_patterns=allow_patterns)))
        for name in fetched[-1]:
            (tmp_path / "snap" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / name, tmp_path / "snap" / name)
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)  # so the specs are no local paths

    def weights(t) -> list:
        return [v for m in t.modules() for v in m.parameters(recurse=False)]

    def read(spec, variant=None):
        fetched.clear()
        return load_transcoders(spec, variant, token="hf_tok")

    want = weights(load_transcoders(local))
    if not isinstance(graph_set(traced), TranscoderSet):
        shutil.copytree(local, repo / "clt" / "w")
        got = read("google/gs2/clt/w")
        assert fetched[-1] == sorted(f"clt/w/{p.name}" for p in local.glob("params_layer_*.safetensors"))
        assert all(torch.equal(a, b) for a, b in zip(weights(got), want, strict=True))
        return
    shutil.copytree(local, repo / "sets" / "mine")
    assert all(torch.equal(a, b) for a, b in zip(weights(read("google/gs2/sets/mine")), want, strict=True))
    members = [f"sets/mine/layer_{i}/{n}" for i in range(4) for n in ("config.json", "params.safetensors")]
    assert fetched[-1] == sorted(["sets/mine/transcoder_set.json", *members])
    for i in range(4):  # two variants of every layer
        for variant in ("width_48_l0_small", "width_48_l0_big"):
            shutil.copytree(local / f"layer_{i}", repo / "all" / f"layer_{i}_{variant}")
    with pytest.raises(GspError, match=r"several transcoder variants \(width_48_l0_big, width_48_l0_small\)"):
        read("google/gs2/all")
    assert all(name.endswith("/config.json") for name in fetched[-1]) and len(fetched) == 1
    got = read("google/gs2/all", "width_48_l0_big")
    assert fetched == [sorted(f"all/layer_{i}_width_48_l0_big/{n}" for i in range(4)
                              for n in ("config.json", "params.safetensors"))]  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(weights(got), want, strict=True))
    with pytest.raises(GspError, match="has no Gemma Scope 2 transcoders of variant width_9"):
        read("google/gs2/all", "width_9")


def test_a_page_of_hundreds_of_thousands_of_edges_renders(tmp_path):
    """A real 18-layer graph kept 289,330 edges; the page once took their maximum with Math.max(...xs),
    which overflows the browser's call stack beyond ~125k arguments. 140,000 edges here."""
    import re
    import subprocess

    from pipeline import trace_page

    args = headless_chromium()
    nodes = [
        {
            "node_id": f"E_{t}_{p}",
            "feature": p,
            "layer": "E",
            "ctx_idx": p,
            "feature_type": "embedding",
            "token_prob": 0.0,
            "influence": 0.5,
            "activation": None,
            "clerp": "",
        }
        for p, t in enumerate((2, 7, 9))
    ]
    nodes += [{"node_id": f"0_{i}_{p}", "feature": i, "layer": "0", "ctx_idx": p, "feature_type": "cross layer "
               "transcoder", "token_prob": 0.0, "influence": 0.1, "activation": 1.0, "clerp": ""}
              for i in range(20) for p in range(3)]  # fmt: skip
    logit = {"node_id": "2_5_2", "feature": 5, "layer": "2", "ctx_idx": 2, "feature_type": "logit",
             "token_prob": 0.9, "influence": None, "activation": None, "clerp": 'Output "x" (p=0.900)'}  # fmt: skip
    nodes.append(logit)
    rng = np.random.default_rng(0)
    links = [{"source": nodes[int(a)]["node_id"], "target": "2_5_2", "weight": float(w)}
             for a, w in zip(rng.integers(0, 63, 140_000), rng.standard_normal(140_000), strict=True)]  # fmt: skip
    doc = {"metadata": {"prompt_tokens": ["<bos>", "a", "b"], "prompt": "<bos>ab"}, "qParams": {}, "nodes": nodes,
           "links": links, "gsp": {"influence": {n["node_id"]: 0.1 for n in nodes}}}  # fmt: skip
    page = tmp_path / "big.html"
    page.write_text(trace_page.page(doc, {"latents": {}, "vocab": {}}))
    dom = subprocess.run([*args, "--dump-dom", f"file://{page}"], capture_output=True, text=True, timeout=300).stdout
    assert 'data-ready="1"' in dom and '<div id="errors"></div>' in dom
    assert len(re.findall(r'<path class="edge', dom.split("<script")[0])) == 140_000
