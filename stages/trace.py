"""gsp trace: the attribution graph of a prompt through a transcoder set (pipeline/attribution.py),
pruned, written as JSON in the schema Neuronpedia's graph viewer and circuit-tracer's frontend read,
and as a static HTML page (pipeline/trace_page.py) that also shows, for each latent in the graph, its
top-activating contexts from the set's training store and the tokens its decoder promotes.

The model is the one the set's store was harvested from (pipeline/models.py's `model_to_run`), run
in float32: attribution sums many small products.
"""

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import __version__
from pipeline.attribution import LOGIT_PROBABILITY, MAX_LOGITS, attribute, prune, scores
from pipeline.config import opt, stage_config
from pipeline.console import console, info, status
from pipeline.errors import GspError
from pipeline.features import TopActivations, logit_lens
from pipeline.files import atomic_write_text
from pipeline.models import load_model, model_to_run
from pipeline.store import ActivationStore
from pipeline.transcoder_set import load_transcoders


@stage_config("trace")
@dataclass
class TraceConfig:
    transcoders: str | None = opt(
        None, "A transcoder for every layer: a set gsp fit --transcoders wrote, a Gemma Scope 2 cross-layer "
        "transcoder folder, or a folder of Gemma Scope 2 per-layer transcoders (transcoder_all/); local, or a "
        "Hub path owner/repo/sub/folder (e.g. google/gemma-scope-2-270m-pt/transcoder_all with --variant).",
        path=True,
    )  # fmt: skip
    variant: str | None = opt(None, "Of Gemma Scope 2 per-layer transcoders: which, e.g. width_16k_l0_small_affine.")
    prompt: str | None = opt(None, "The text whose next-token prediction is traced (BOS is added).")
    max_nodes: int = opt(7500, "Latent nodes at most: the most influential on the logits when more are active.")
    batch_size: int = opt(64, "Targets per backward pass (the prompt runs as this many copies).")
    max_logits: int = opt(MAX_LOGITS, "Logit targets at most,")
    logit_probability: float = opt(LOGIT_PROBABILITY, "the fewest likeliest tokens whose probability sums to this.")
    node_threshold: float = opt(0.8, "Pruning: keep the nodes carrying this share of the logits' influence.")
    edge_threshold: float = opt(0.98, "Pruning: keep the edges carrying this share of the rest's.")
    store: str | None = opt(
        None, "Store for the latents' top-activating contexts (default: the set's training store).", path=True
    )
    context_tokens: int = opt(65_536, "Store rows scanned for those contexts (0: none).")
    model: str | None = opt(None, "Model (default: the one the set's store was harvested from).")
    revision: str | None = opt(None, "Hub revision of --model.")
    slug: str | None = opt(None, "File name of the graph (default: from the prompt).")
    out: str = opt("reports/traces", "Folder for <slug>.json and <slug>.html.", run_only=True)
    device: str = opt("cpu", "cpu, cuda or cuda:N.", run_only=True)

    def __post_init__(self):
        for name in ("max_nodes", "batch_size", "max_logits"):
            if getattr(self, name) <= 0:
                raise GspError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("logit_probability", "node_threshold", "edge_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise GspError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(self, name)}")
        if self.context_tokens < 0:
            raise GspError(f"--context-tokens must not be negative, got {self.context_tokens}")


def run_trace(cfg: TraceConfig, *, token: str | None = None) -> Path:
    """Trace, prune, write the JSON and the page; returns the page's path."""
    from pipeline import trace_page

    if not cfg.transcoders:
        raise GspError("--transcoders is required: a transcoder set (gsp fit --transcoders mlp_in:mlp_out)")
    if not cfg.prompt or not cfg.prompt.strip():
        raise GspError("--prompt is required: the text whose next token is traced")
    slug = cfg.slug or _slug(cfg.prompt)
    json_path, page_path = Path(cfg.out) / f"{slug}.json", Path(cfg.out) / f"{slug}.html"
    for path in (json_path, page_path):
        _check_ours(path)
    # one layer in memory at a time; a Hub path's files fetched into the Hub cache
    tset = load_transcoders(cfg.transcoders, cfg.variant, streamed=True, token=token)
    folder = Path(cfg.transcoders).expanduser()
    where = str(folder.resolve()) if folder.is_dir() else cfg.transcoders  # (else a Hub path)
    first = next(iter(getattr(tset, "members", {}).values()), None)  # a CLT's files name no model or store
    spec, revision = model_to_run(cfg.model, cfg.revision, store_path=first and first.training_store,
                                  named=first and first.model_name)  # fmt: skip
    store_paths = _stores(cfg, tset)
    lm = load_model(spec, device=cfg.device, dtype="float32", revision=revision, token=token)
    tset.to(lm.device)
    ids = _tokens(lm.tokenizer, cfg.prompt)
    special = [i for i in (lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id)
               if i is not None]  # fmt: skip
    t0 = time.perf_counter()
    with status(f"attributing {len(ids)} tokens through {tset.n_layers} transcoders"):
        graph = attribute(lm.model, tset, ids.to(lm.device), special, max_latents=cfg.max_nodes,
                          batch=cfg.batch_size, max_logits=cfg.max_logits,
                          logit_probability=cfg.logit_probability)  # fmt: skip
    seconds = time.perf_counter() - t0
    pruned = prune(graph, cfg.node_threshold, cfg.edge_threshold)
    graph_scores = scores(graph, pruned.influence)
    kept = graph.latents[pruned.nodes[: graph.n_latents]].tolist()
    details = _latent_details(lm, tset, kept, store_paths, cfg.context_tokens)
    doc = trace_page.graph_json(graph, pruned, lm.tokenizer, slug=slug, scan=where,
                                node_threshold=cfg.node_threshold)  # fmt: skip
    doc["gsp"] |= {"version": __version__, "model": lm.name, "model_revision": lm.revision,
                  "transcoders": where, "edge_threshold": cfg.edge_threshold,
                  "max_nodes": cfg.max_nodes, "active_latents": graph.active, "latent_nodes": graph.n_latents,
                  "replacement_score": graph_scores["replacement"],
                  "completeness_score": graph_scores["completeness"], "seconds": seconds,
                  "kept_nodes": int(pruned.nodes.sum()), "kept_edges": int(pruned.edges.sum())}  # fmt: skip
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, trace_page.dumps(doc))
    atomic_write_text(page_path, trace_page.page(doc, details))
    g = doc["gsp"]
    console.print(
        f"{len(ids)} tokens · {graph.active:,} active latents, {graph.n_latents:,} attributed in {seconds:.1f} s · "
        f"kept {g['kept_nodes']:,} nodes, {g['kept_edges']:,} edges · replacement score "
        f"{g['replacement_score']:.3f}, completeness {g['completeness_score']:.3f}\n"
        f"graph: {json_path}\npage:  {page_path}", highlight=False,
    )  # fmt: skip
    return page_path


def _tokens(tokenizer, prompt: str) -> torch.Tensor:
    """The prompt's ids, BOS first (added unless the text starts with a special token)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids or ids[0] not in tokenizer.all_special_ids:
        ids = [tokenizer.bos_token_id, *ids]
    return torch.tensor(ids)


def _check_ours(path: Path) -> None:
    """A graph's file may replace only an earlier graph's (gsp never writes over what it did not write)."""
    if not path.exists():
        return
    mark = '"gsp":{"influence":' if path.suffix == ".json" else "<title>gsp trace · "
    try:
        ours = path.is_file() and mark in path.read_text(errors="replace")
    except OSError:
        ours = False
    if not ours:
        raise GspError(f"{path} exists and was not written by gsp trace; choose another --slug or --out")


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "graph"


def _stores(cfg: TraceConfig, tset) -> dict[int, str]:
    """Each layer's MLP-input store for the contexts: --store's hook points, checked now (a missing store
    fails before the model loads), or each transcoder's training store where it is still there (a set
    fetched from the Hub names stores on the machine that fitted it)."""
    if cfg.context_tokens == 0:
        return {}
    if cfg.store:
        paths = {layer: f"{str(cfg.store).rstrip('/')}/L{layer}.mlp_in" for layer in tset.layers}
        for path in paths.values():
            ActivationStore.open(path)
        return paths
    paths, gone = {}, []
    for layer in tset.layers:
        member = getattr(tset, "members", {}).get(layer)  # (a CLT's files name no store)
        if member is None or not member.training_store:
            continue
        try:
            ActivationStore.open(member.training_store)
            paths[layer] = member.training_store
        except GspError as e:
            gone.append(str(e))
    if gone:
        info(f"no latents' contexts for {len(gone)} layers (give --store): their training store: {gone[0]}")
    elif not paths:
        info("the transcoders name no training store: the page shows no latents' contexts (give --store)")
    return paths


@torch.no_grad()
def _latent_details(lm, tset, latents: list, stores: dict[int, str], tokens: int, k: int = 5) -> dict:
    """For each (layer, latent) of the kept nodes: the tokens its decoder promotes (what it writes into
    every layer's MLP output, summed, through the final norm and the unembedding), and its top-k
    contexts among the first `tokens` rows of its layer's store."""
    from stages.features import token_strings

    by_layer: dict[int, list[int]] = {}
    for layer, _, latent in latents:
        by_layer.setdefault(layer, [])
        if latent not in by_layer[layer]:
            by_layer[layer].append(latent)
    out, used = {}, set()
    for layer, feats in by_layer.items():
        written = sum(tset.decoders(layer, torch.tensor(feats)).values())
        lens_ids, lens_vals = logit_lens(lm.model, written.detach(), 8)
        contexts = _contexts(tset, layer, stores.get(layer), feats, tokens, k)
        for j, f in enumerate(feats):
            promoted = [[int(i), round(float(v), 3)] for i, v in zip(lens_ids[j], lens_vals[j], strict=True)]
            out[f"{layer}_{f}"] = {"logits": promoted, "contexts": contexts.get(f, [])}
            used.update(i for i, _ in promoted)
            for c in contexts.get(f, []):
                used.update(c["tokens"])
    return {"latents": out, "vocab": {str(i): s for i, s in token_strings(lm.tokenizer, sorted(used)).items()}}


def _contexts(tset, layer: int, path: str | None, feats: list[int], tokens: int, k: int, before: int = 12,
              after: int = 2) -> dict:  # fmt: skip
    """Top-k activations of latents `feats` of `layer` over the first `tokens` ordinary rows of the store
    at `path`, each with its window of token ids (the activation's position marked)."""
    if path is None or tokens == 0:
        return {}
    store = ActivationStore.open(path)
    device = tset.encoder(layer).device
    idx, top = torch.tensor(feats, device=device), TopActivations(len(feats), k)  # column j: latent feats[j]
    for x, rows in store.ordinary_rows(tokens, 4096):
        f = tset.encode_some(layer, torch.from_numpy(x).to(device), idx).float().cpu()
        top.update(f, torch.from_numpy(rows).long())
    C, out = store.context_size, {}
    for j, f in enumerate(feats):
        items = []
        for v, r in top.top(j):  # (fired ones only)
            start, stop = max(r - before, r - r % C), min(r + after + 1, r - r % C + C)
            ids = store.read_tokens(start, stop).astype(np.int64).tolist()
            items.append({"act": round(v, 4), "at": r - start, "tokens": ids})
        out[f] = items
    return out
