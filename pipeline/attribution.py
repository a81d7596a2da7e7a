"""Attribution graphs: the direct effects between transcoder latents, MLP errors, token embeddings and
the top logits of one prompt (Ameisen et al. 2025, "Circuit Tracing"; the facts from its methods page
and circuit-tracer 0.5.0's source, the code gsp's own).

The replacement model. Every MLP of a Gemma 3 model is replaced by its layer's transcoder (a
transcoder set, pipeline/transcoder_set.py; or a cross-layer transcoder, pipeline/clt.py, whose
latents also write into every later layer's MLP output) plus an error node, the true MLP output
minus the transcoders' prediction, so the replacement reproduces the model exactly: the forward pass
here computes the model's own values. Only gradients are rerouted (`frozen`): every RMSNorm's scale
1/rms(x) is held at its value on the prompt, the attention patterns are held (queries and keys
detached), and an MLP output passes gradient only through its transcoder's skip connection W_skip,
if it has one. The residual stream is then a linear function of the sources:

    sources  latent (layer l, position p, latent i)   writes a·W_dec[i] into layer l's MLP output (a
                                                      CLT's: a·W_dec[i, m] into each layer m ≥ l's)
             error (l, p)                             writes the MLP output minus the transcoder's
             token (p)                                writes its embedding (× √d_model, as Gemma does)
    targets  latent (l, p, i)                         reads W_enc[:, i] at layer l's MLP input (its
                                                      pre-activation, less b_enc)
             logit t (last position)                  reads W_U[t] − mean_v W_U[v] after the final norm

A[target, source] = the source's written vector · d(target)/d(where it is written), from one
backward pass in which the target's read vector is injected as the gradient at its input. Each row
of a batch of copies of the prompt carries one target, so one backward pass gives `batch` rows.

What no node carries (the "biases" of the completeness identity): b_enc, every layer's b_dec, and
the MLP outputs at special-token positions (BOS): as in circuit-tracer, latents there are zeroed and
their error node is 0; the token embedding at BOS stays a node. So a latent's pre-activation is the
sum of its row plus b_enc plus those constants carried to it through the frozen model.

Node order (circuit-tracer's): latents by (layer, position, latent), then error nodes layer by
layer (every position), then tokens by position, then logits by falling probability. Rows of A are
targets, columns sources; the rows of error and token nodes, and the columns of logits, are 0.
"""

import contextlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pipeline.errors import GspError
from pipeline.models import decoder_layers

MAX_LOGITS = 10  # at most this many logit targets,
LOGIT_PROBABILITY = 0.95  # the fewest whose probability sums to this
UPDATE_INTERVAL = 4  # batches of latent rows between re-rankings by influence


@dataclass
class Graph:
    """An attribution graph, unpruned. Node order: see the module's docstring."""

    ids: torch.Tensor  # (S,) the prompt's token ids
    layers: int  # the model's layers (one transcoder each)
    latents: torch.Tensor  # (n, 3) long: (layer, position, latent) of each latent node, sorted
    activations: torch.Tensor  # (n,) their activations
    logit_ids: torch.Tensor  # (K,) the target tokens, most likely first
    logit_probs: torch.Tensor  # (K,) their probabilities
    adjacency: torch.Tensor  # (N, N) float32, A[target, source]
    active: int  # latents active on the prompt (outside special positions); len(latents) ≤ it

    @property
    def n_pos(self) -> int:
        return len(self.ids)

    @property
    def n_latents(self) -> int:
        return len(self.latents)

    def slices(self) -> dict[str, slice]:
        n, e, s = self.n_latents, self.layers * self.n_pos, self.n_pos
        return {"latent": slice(0, n), "error": slice(n, n + e), "token": slice(n + e, n + e + s),
                "logit": slice(n + e + s, len(self.adjacency))}  # fmt: skip


# ------------------------------------------------------------------------------ the frozen model
def _frozen_norm(module: torch.nn.Module, args, output):
    """A Gemma RMSNorm's output with its scale 1/rms(x) held (detached): linear in x, same value."""
    x = args[0]
    xf = x.float()
    scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + module.eps).detach()
    return (xf * scale * (1.0 + module.weight.float())).type_as(x)


def _detached(module, args, output):
    return output.detach()


@dataclass
class Capture:
    """The frozen forward's tensors that edges are read at: each layer's MLP input and (replaced)
    output, the token embeddings, and the final normed residual."""

    embed: torch.Tensor | None = None
    mlp_in: dict | None = None
    mlp_out: dict | None = None  # each layer's true MLP output (detached)
    held: dict | None = None  # each layer's MLP output less its skip path, a leaf: the gradient there is the output's


@contextlib.contextmanager
def frozen(model: torch.nn.Module, skips: dict, outputs: torch.Tensor | None = None) -> Iterator[Capture]:
    """Hooks that make `model` (a Gemma 3 causal LM) the frozen replacement model for the forward passes
    run under it, capturing where edges are read. Values are the model's own. `skips`: layer -> its
    transcoder's W_skip (D, D), for the layers that have one. With `outputs` (L, S, D), the MLP outputs
    of a pass already made on the same prompt, the MLPs are not run again (their outputs are constants
    here but for the skip paths, which read the MLP inputs)."""
    base = model.model
    layers = decoder_layers(model)
    cap = Capture(mlp_in={}, mlp_out={}, held={})
    handles = []

    def embed(module, args, output):
        cap.embed = output.detach().requires_grad_(True)
        return cap.embed

    def mlp_in(layer):
        def hook(module, args, output):
            cap.mlp_in[layer] = _frozen_norm(module, args, output)
            return cap.mlp_in[layer]

        return hook

    def mlp_out(layer):
        w_skip = skips.get(layer)

        def hook(module, args, output):
            if outputs is not None:
                output = outputs[layer].to(output.dtype).expand_as(output)
            x = cap.mlp_in[layer]
            skip = x @ w_skip if w_skip is not None else None
            # held at its value but for the skip path; a leaf, so the gradient at the output is read there
            cap.mlp_out[layer] = output.detach()
            cap.held[layer] = (output if skip is None else output - skip).detach().requires_grad_(True)
            return cap.held[layer] if skip is None else cap.held[layer] + skip

        return hook

    try:
        handles.append(base.embed_tokens.register_forward_hook(embed))
        for layer, block in enumerate(layers):
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                handles.append(norm.register_forward_hook(_frozen_norm))
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj):  # the attention pattern held
                handles.append(proj.register_forward_hook(_detached))
            handles.append(block.pre_feedforward_layernorm.register_forward_hook(mlp_in(layer)))
            handles.append(block.post_feedforward_layernorm.register_forward_hook(mlp_out(layer)))
            if outputs is not None:  # its output is replaced by the one given: skip its work
                handles.append(block.mlp.register_forward_hook(_detached))
                block.mlp.forward = _identity
        handles.append(base.norm.register_forward_hook(_frozen_norm))
        yield cap
    finally:
        for h in handles:
            h.remove()
        for block in layers:
            block.mlp.__dict__.pop("forward", None)


def _identity(x):
    return x


def check_model(model: torch.nn.Module, tset) -> None:
    """A Gemma 3 causal LM (Gemma's RMSNorm, four norms per layer) with a transcoder for every layer."""
    layers = decoder_layers(model)
    block = layers[0]
    needed = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    if not all(hasattr(block, n) for n in needed) or "Gemma" not in type(block.input_layernorm).__name__:
        raise GspError(f"gsp trace replaces the MLPs of Gemma 3 models; this model's layers are {type(block).__name__}")
    if tset.layers != list(range(len(layers))):
        raise GspError(f"the model has {len(layers)} layers and tracing needs a transcoder for each; the set has "
                       f"layers {', '.join(map(str, tset.layers))}")  # fmt: skip
    if getattr(model.config, "final_logit_softcapping", None):
        raise GspError("this model soft-caps its logits; gsp trace's logit targets assume it does not")


# ------------------------------------------------------------------------------ the prompt's nodes
@dataclass
class Setup:
    """One clean pass over the prompt: the latent nodes, error vectors, token vectors and logit targets."""

    latents: torch.Tensor  # (n, 3) long (layer, pos, latent), sorted
    activations: torch.Tensor  # (n,)
    reads: torch.Tensor  # (n, D) each latent's encoder column: what it reads at its layer's MLP input
    skips: dict  # layer -> W_skip (D, D), for the layers whose transcoder has one
    writes: dict  # layer m -> [(position, first, last + 1 index into `latents`, vectors a·W_dec written into m)]
    mlp_out: torch.Tensor  # (L, S, D) the true MLP outputs
    errors: torch.Tensor  # (L, S, D)
    tokens: torch.Tensor  # (S, D) the embeddings as they enter the residual stream
    logit_ids: torch.Tensor
    logit_probs: torch.Tensor
    logit_vecs: torch.Tensor  # (K, D) W_U[t] − mean W_U


@torch.no_grad()
def setup(model, tset, ids: torch.Tensor, special: torch.Tensor, max_logits: int, logit_probability: float) -> Setup:
    """The prompt run once through the model (with the hooks, so the captured tensors are the ones
    edges use): each layer's latents (zero at special positions), its error, the tokens' embeddings,
    and the logit targets (the most likely next tokens, up to `max_logits`, until their probability
    sums to `logit_probability`). Everything the attribution needs of the transcoders is copied out
    here, one layer at a time (the active latents' encoder columns and decoder rows, the skips and
    biases), so a set that reads its layers from disk (`TranscoderSet(streamed=True)`) holds one."""
    with frozen(model, {}) as cap:  # (the skip paths only reroute gradients: no need of them here)
        hidden = model.model(input_ids=ids[None]).last_hidden_state[0]
    x = {layer: cap.mlp_in[layer][0].float() for layer in tset.layers}
    # the transcoders' predictions, from the active latents' decoder rows only, plus each layer's bias
    # and skip path (added at its own layer's turn: a CLT's earlier layers write into it before that)
    y = {m: torch.zeros_like(x[m]) for m in tset.layers}
    rows, acts, reads, skips, n = [], [], [], {}, 0
    writes: dict[int, list] = {m: [] for m in tset.layers}  # by the MLP output written into
    for layer in tset.layers:
        if (w := tset.skip_matrix(layer)) is not None:
            skips[layer] = w.float()
            y[layer] += x[layer] @ skips[layer]
        y[layer] += tset.decoder_bias(layer)
        f = tset.encode_layer(layer, x[layer])
        f[special] = 0
        pos, idx = f.nonzero(as_tuple=True)  # row-major: by position, then latent
        a = f[pos, idx]
        rows.append(torch.stack([torch.full_like(pos, layer), pos, idx], 1))
        acts.append(a)
        reads.append(tset.encoder(layer)[:, idx].T.float())
        counts = torch.bincount(pos, minlength=len(ids)).tolist()
        starts = [0, *itertools.accumulate(counts)]
        for m, w_dec in tset.decoders(layer, idx).items():  # a CLT's latents write into every later layer
            vecs = a[:, None] * w_dec
            y[m] = y[m].index_add(0, pos, vecs)
            writes[m] += [(p, n + starts[p], n + starts[p + 1], vecs[starts[p] : starts[p + 1]])
                          for p in range(len(ids)) if counts[p]]  # fmt: skip
        n += len(pos)
    errors = [torch.where(special[:, None], 0.0, cap.mlp_out[m][0].float() - y[m]) for m in tset.layers]
    logits = model.lm_head(hidden[-1:]).float()[0]
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(max_logits)
    k = min(int(torch.searchsorted(top_p.cumsum(0), torch.tensor(logit_probability))) + 1, max_logits)
    w_u = model.lm_head.weight.float()
    mlp_out = torch.stack([cap.mlp_out[layer][0] for layer in tset.layers])
    return Setup(torch.cat(rows), torch.cat(acts), torch.cat(reads), skips, writes, mlp_out, torch.stack(errors),
                 cap.embed[0].detach().float(), top_i[:k], top_p[:k], w_u[top_i[:k]] - w_u.mean(0))  # fmt: skip


# ------------------------------------------------------------------------------ the graph
def attribute(
    model: torch.nn.Module,
    tset,
    ids: torch.Tensor,
    special_ids: list[int],
    *,
    max_latents: int | None = None,
    batch: int = 64,
    max_logits: int = MAX_LOGITS,
    logit_probability: float = LOGIT_PROBABILITY,
) -> Graph:
    """The attribution graph of the prompt `ids` (1-D, starting with BOS) through `tset` (a transcoder
    for every layer of `model`): logit rows first, then latent rows, every active latent in index order
    when there are at most `max_latents` of them, else the `max_latents` most influential on the logits,
    re-ranked every UPDATE_INTERVAL batches (circuit-tracer's order)."""
    check_model(model, tset)
    model.requires_grad_(False)
    special = torch.isin(ids, torch.tensor(special_ids, dtype=ids.dtype))
    s = setup(model, tset, ids, special, max_logits, logit_probability)
    L, S, K, n_active = len(tset.layers), len(ids), len(s.logit_ids), len(s.latents)
    n_src = n_active + L * S + S
    cap_n = n_active if max_latents is None else min(max_latents, n_active)
    with frozen(model, s.skips, s.mlp_out) as cap, torch.enable_grad():  # (the transcoders are done with)
        hidden = model.model(input_ids=ids[None].expand(batch, S)).last_hidden_state  # B copies, one target each
        rows_of = _Rows(cap, hidden, s, tset.layers)
        logit_rows = torch.cat([rows_of(("logit", k) for k in range(i, min(i + batch, K))) for i in range(0, K, batch)])
        latent_rows = torch.zeros(cap_n, n_src)  # in the order visited
        visited = torch.zeros(n_active, dtype=torch.bool)
        done: list[int] = []
        while len(done) < cap_n:
            if cap_n == n_active:
                queue = torch.arange(n_active)
            else:  # the most influential unvisited latents, by the rows so far (a batch's in layer order)
                influence = _partial_influence(logit_rows, latent_rows[: len(done)], done, s.logit_probs, n_active)
                order = influence.argsort(descending=True)
                queue = order[~visited[order]][: min(UPDATE_INTERVAL * batch, cap_n - len(done))].sort().values
            for i in range(0, len(queue), batch):
                chunk = queue[i : i + batch].tolist()
                latent_rows[len(done) : len(done) + len(chunk)] = rows_of(("latent", j) for j in chunk)
                visited[chunk] = True
                done += chunk
    done_t = torch.tensor(done, dtype=torch.long)
    chosen, where = done_t.sort()  # the latents kept, in index order, and their rows
    cols = torch.cat([chosen, torch.arange(n_active, n_src)])
    n = len(chosen)
    adjacency = torch.zeros(n + L * S + S + K, n + L * S + S + K)
    adjacency[:n, : n + L * S + S] = latent_rows[where[:, None], cols]  # (one gather: no full-width copy)
    adjacency[-K:, : n + L * S + S] = logit_rows[:, cols]
    return Graph(ids, L, s.latents[chosen], s.activations[chosen], s.logit_ids, s.logit_probs, adjacency, n_active)


class _Rows:
    """Attribution rows (A[target, every source]) of up to `batch` targets from one backward pass."""

    def __init__(self, cap: Capture, hidden: torch.Tensor, s: Setup, layers: list[int]):
        self.cap, self.hidden, self.s, self.layers = cap, hidden, s, layers
        self.L, self.S = len(layers), hidden.shape[1]

    def __call__(self, targets) -> torch.Tensor:
        targets = list(targets)
        cap, s = self.cap, self.s
        injected: dict[int | str, torch.Tensor] = {}  # layer (an MLP input) or "logit" -> (B, S, D) gradient
        for b, (kind, j) in enumerate(targets):
            if kind == "logit":
                if "logit" not in injected:
                    injected["logit"] = torch.zeros_like(self.hidden)
                injected["logit"][b, -1] = s.logit_vecs[j]
            else:
                layer, pos, latent = s.latents[j].tolist()
                if layer not in injected:
                    injected[layer] = torch.zeros_like(cap.mlp_in[layer])
                injected[layer][b, pos] = s.reads[j]
        outputs = [self.hidden if k == "logit" else cap.mlp_in[k] for k in injected]
        top = self.L if "logit" in injected else max(injected)  # sources below the highest target only
        below = [layer for layer in self.layers if layer < top]
        grads = torch.autograd.grad(outputs, [cap.embed, *(cap.held[layer] for layer in below)],
                                    list(injected.values()), retain_graph=True)  # fmt: skip
        g_embed, g_out = grads[0].float(), dict(zip(below, (g.float() for g in grads[1:]), strict=True))
        B, n, L, S = len(targets), len(s.latents), self.L, self.S
        row = torch.zeros(B, n + L * S + S)
        for layer, g in g_out.items():
            g = g[:B]
            for pos, first, end, vecs in s.writes[layer]:  # the latents written at one position
                row[:, first:end] += g[:, pos] @ vecs.T
            row[:, n + layer * S : n + (layer + 1) * S] = (g * s.errors[layer]).sum(-1)
        row[:, n + L * S :] = (g_embed[:B] * s.tokens).sum(-1)
        return row


def _partial_influence(logit_rows, latent_rows, done: list[int], logit_probs, n_active: int) -> torch.Tensor:
    """Each active latent's influence on the logits through the rows computed so far (circuit-tracer's
    ranking): with |rows| scaled to sum 1, the logits' probabilities flowed back along every path.
    `latent_rows[i]` is the row of latent `done[i]`."""
    rows = torch.cat([logit_rows, latent_rows]).abs_()  # targets: the logits, the visited latents
    rows /= rows.sum(1, keepdim=True).clamp(min=1e-8)  # (in place: these are the graph's largest arrays)
    n_src = rows.shape[1]
    row_nodes = torch.cat([torch.arange(len(logit_rows)) + n_src, torch.tensor(done, dtype=torch.long)])
    weight = torch.zeros(n_src + len(logit_rows))
    weight[n_src:] = logit_probs.float()
    total = torch.zeros(n_src)
    for _ in range(128):
        flow = weight[row_nodes] @ rows  # onto every source
        if not flow.any():
            break
        total += flow
        weight = torch.cat([flow, torch.zeros(len(logit_rows))])
    return total[:n_active]


# ------------------------------------------------------------------------------ influence and pruning
def normalized(a: torch.Tensor) -> torch.Tensor:
    """|A| with each row scaled to sum 1 (a zero row stays 0)."""
    a = a.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def influence(a: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """w·(A + A² + A³ + …): the flow of `weights` (on the targets) to every node over paths of any
    length (A is nilpotent: edges only go forward in layers and positions)."""
    total = torch.zeros_like(weights)
    flow = weights @ a
    for _ in range(len(a) + 1):
        if not flow.any():
            return total
        total += flow
        flow = flow @ a
    raise GspError("internal: the attribution graph has a cycle")


def logit_weights(g: Graph) -> torch.Tensor:
    w = torch.zeros(len(g.adjacency))
    w[g.slices()["logit"]] = g.logit_probs.float()
    return w


def _threshold(scores: torch.Tensor, share: float) -> float:
    """The smallest score among the top scores that carry `share` of the total."""
    ranked = scores.flatten().sort(descending=True).values
    cumulative = ranked.cumsum(0) / ranked.sum().clamp(min=1e-30)
    return ranked[min(int(torch.searchsorted(cumulative, torch.tensor(share))), len(ranked) - 1)].item()


@dataclass
class Pruned:
    nodes: torch.Tensor  # (N,) bool: kept
    edges: torch.Tensor  # (N, N) bool: kept
    cumulative: torch.Tensor  # (N,) each node's cumulative influence share (its rank's; the JSON's "influence")
    influence: torch.Tensor  # (N,) each node's influence on the logits, w·(A + A² + …) of the normalised graph


def prune(g: Graph, node_share: float = 0.8, edge_share: float = 0.98) -> Pruned:
    """Keep the nodes carrying `node_share` of the logits' influence (tokens and logits always), then
    the edges carrying `edge_share` of the remaining graph's; drop nodes left without a path (a latent
    or error with no kept outgoing edge, a latent with no kept incoming edge), until nothing changes."""
    a, w, sl = g.adjacency, logit_weights(g), g.slices()
    infl = influence(normalized(a), w)
    nodes = infl >= _threshold(infl, node_share)
    nodes[sl["token"].start :] = True
    kept = a.clone()
    kept[~nodes] = 0
    kept[:, ~nodes] = 0
    n = normalized(kept)
    scores = n * (influence(n, w) + w)[:, None]
    edges = scores >= _threshold(scores, edge_share)
    inner = torch.zeros(len(a), dtype=torch.bool)
    inner[: sl["token"].start] = True  # latents and errors
    while True:
        before = nodes.clone()
        nodes &= ~inner | edges.any(0)  # something reads it
        nodes[: sl["error"].start] &= edges[: sl["error"].start].any(1)  # a latent reads something
        edges[~nodes] = False
        edges[:, ~nodes] = False
        if torch.equal(nodes, before):
            break
    order = infl.argsort(descending=True)
    cumulative = torch.empty_like(infl)
    cumulative[order] = infl[order].cumsum(0) / infl.sum().clamp(min=1e-30)
    return Pruned(nodes, edges, cumulative, infl)


def scores(g: Graph, infl: torch.Tensor | None = None) -> dict[str, float]:
    """The unpruned graph's replacement score (the share of the logits' influence that reaches the
    tokens rather than error nodes) and completeness score (the share of every node's input, weighted
    by its influence, that does not come from error nodes). `infl`: the graph's influence when it is
    already computed (prune's `Pruned.influence`), so that the largest sum is not done twice."""
    a, w, sl = g.adjacency.abs(), logit_weights(g), g.slices()
    row = a.sum(1).clamp(min=1e-10)
    infl = influence(a / row[:, None], w) if infl is None else infl
    tokens, errors = infl[sl["token"]].sum(), infl[sl["error"]].sum()
    weight = infl + w
    completeness = ((1 - a[:, sl["error"]].sum(1) / row) * weight).sum() / weight.sum()
    return {"replacement": (tokens / (tokens + errors)).item() if tokens + errors > 0 else math.nan,
            "completeness": completeness.item()}  # fmt: skip
