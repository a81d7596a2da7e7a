"""gsp features: what an SAE's features mean, from a store (no model needed) or from a prompt.

Three uses of one command:
- `--sae S --store P`: stream the store's activations through the SAE, keep per feature its
  frequency, mean and max activation, activation histogram and top-k activating tokens with a
  window of context (the store keeps token ids), rank the tokens each decoder direction promotes
  (logit lens), and write a self-contained HTML feature browser plus the same data as JSON;
- `--feature N`: the same pass, printing that one feature in the terminal;
- `--prompt "..."`: run the model on a prompt and show, token by token, which features fire.
The model (for token text, the logit lens and prompts) is the store's, at its revision, chosen by
pipeline/models.py's `model_to_run` as evaluate and steer choose it, and checked before the pass.
"""

import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pipeline import __version__
from pipeline.config import opt, stage_config
from pipeline.console import console, progress, status
from pipeline.errors import GspError
from pipeline.features import HIST_LOW, HIST_STEP, TopActivations, logit_lens
from pipeline.models import model_to_run, resolve_device
from pipeline.sae_formats import LoadedSAE, check_against_store, load_sae, open_input_store
from pipeline.store import ActivationStore


@stage_config("features")
@dataclass
class FeaturesConfig:
    sae: str | None = opt(None, "SAE: a gsp fit folder, a pretrained SAE folder, or a Hub path.")
    sae_revision: str | None = opt(None, "Hub revision of a Hub --sae.")
    store: str | None = opt(None, "Store to find top activations in (default: the store a gsp fit SAE was trained on).")
    tokens: int = opt(1_048_576, "Ordinary tokens of the store to stream (all if fewer).")
    top_k: int = opt(10, "Top-activating tokens kept per feature.")
    before: int = opt(12, "Tokens of context shown before the activating token.")
    after: int = opt(4, "Tokens of context shown after it.")
    max_features: int = opt(16_384, "Features in the browser and JSON, most frequent first (dead ones left out).")
    feature: int | None = opt(None, "Print this feature in the terminal instead of writing the browser.")
    prompt: str | None = opt(None, "Run the model on this text and show which features fire on each token.")
    model: str | None = opt(None, "Model for tokens, logit lens and --prompt (default: the store's model).")
    revision: str | None = opt(None, "Hub revision of --model.")
    logit_lens: bool = opt(True, "Rank the tokens each decoder row promotes (loads the model's unembedding).")
    device: str = opt("auto", "auto (CUDA if present), cpu, cuda or cuda:N.")
    out: str = opt("reports", "Folder for features_<timestamp>.html and .json.")

    def __post_init__(self):
        for name in ("tokens", "top_k", "max_features"):
            if getattr(self, name) <= 0:
                raise GspError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.before < 0 or self.after < 0:
            raise GspError("--before and --after must not be negative")
        if self.prompt is not None and not self.prompt.strip():
            raise GspError("--prompt is empty: give the text whose features you want to see")


def run_features(cfg: FeaturesConfig, *, token: str | None = None) -> Path | None:
    """Write the browser (returns the HTML path), or print one feature, or analyse a prompt."""
    if not cfg.sae:
        raise GspError("--sae is required: a gsp fit folder, a pretrained SAE folder, or a Hub path")
    loaded = load_sae(cfg.sae, revision=cfg.sae_revision, token=token)
    if cfg.feature is not None and not 0 <= cfg.feature < loaded.sae.width:
        raise GspError(f"--feature {cfg.feature} is out of range: this SAE has features 0..{loaded.sae.width - 1}")
    if cfg.prompt is not None:
        _prompt(cfg, loaded, token)
        return None
    store = _store(cfg, loaded)
    spec, revision = model_to_run(cfg.model, cfg.revision, harvested=store.meta.model)  # checked before the pass
    device = resolve_device(cfg.device)
    top = stream(loaded.sae.to(device), store, cfg.tokens, cfg.top_k, device)
    lm = _model(spec, revision, cfg.device, token, full=cfg.logit_lens)
    feats = [cfg.feature] if cfg.feature is not None else _chosen(top, cfg.max_features)
    data = collect(loaded, store, top, feats, cfg, lm)
    if cfg.feature is not None:
        _print_feature(data, cfg.feature)
        return None
    return _write(data, loaded, Path(cfg.out))


# ------------------------------------------------------------------------------ the pass over the store
@torch.no_grad()
def stream(sae, store: ActivationStore, tokens: int, k: int, device: torch.device) -> TopActivations:
    """Encode up to `tokens` ordinary rows; batches sized so that (B, F) latents stay near 256 MiB."""
    batch = max(64, min(4096, 2**26 // sae.width))
    top = TopActivations(sae.width, k, device)
    with progress("tok") as bar:
        task = bar.add_task("features", total=min(tokens, store.rows_written))
        for x_BD, rows_B in store.ordinary_rows(tokens, batch):
            f = sae.encode(torch.from_numpy(x_BD).to(device))[0]
            top.update(f, torch.from_numpy(rows_B).to(device))
            bar.update(task, completed=top.n)
        bar.update(task, total=top.n, completed=top.n)
    if top.n == 0:
        raise GspError(f"store {store.path} holds no ordinary tokens")
    return top


def _chosen(top: TopActivations, limit: int) -> list[int]:
    freq = top.frequency()
    order = torch.argsort(freq, descending=True, stable=True)
    return [int(i) for i in order[: int((freq > 0).sum())][:limit]]


@torch.no_grad()
def window_activations(sae, store: ActivationStore, pairs_rows: np.ndarray, pairs_feats: np.ndarray) -> np.ndarray:
    """The activation of feature pairs_feats[i] at store row pairs_rows[i], reading each chunk once."""
    out = np.zeros(len(pairs_rows), dtype=np.float32)
    order = np.argsort(pairs_rows, kind="stable")
    rows, feats = pairs_rows[order], pairs_feats[order]
    device = sae.w_enc.device
    span = store.chunk_rows
    for start in np.unique(rows // span) * span:
        lo, hi = np.searchsorted(rows, [start, start + span])
        if lo == hi:
            continue
        x = torch.from_numpy(store.read(start, min(start + span, store.rows_written))).to(device)
        uniq, inv = torch.unique(torch.from_numpy(rows[lo:hi] - start).to(device), return_inverse=True)
        acts = sae.activation_at(x[uniq], inv, torch.from_numpy(feats[lo:hi]).to(device))
        out[order[lo:hi]] = acts.cpu().numpy()
    return out


def collect(loaded: LoadedSAE, store: ActivationStore, top: TopActivations, feats: list[int], cfg, lm) -> dict:
    """Everything the browser and the JSON hold for the chosen features."""
    C = store.context_size
    # every top activation's window [start, stop) within its context, and where its pairs begin
    items, pair_rows, pair_feats = [], [], []
    for f in feats:
        for act, r in top.top(f):
            start, stop = max(r - cfg.before, r - r % C), min(r + cfg.after + 1, r - r % C + C)
            items.append((f, act, r, start, stop, len(pair_rows)))
            pair_rows.extend(range(start, stop))
            pair_feats.extend([f] * (stop - start))
    acts = window_activations(loaded.sae, store, np.array(pair_rows, np.int64), np.array(pair_feats, np.int64))
    ids = _token_ids(store, pair_rows)
    special = set(store.special_ids)
    acts[[i for i, row in enumerate(pair_rows) if ids[row] in special]] = 0.0  # BOS/EOS/PAD are not SAE data
    lens_ids = lens_vals = None
    if lm is not None and cfg.logit_lens and feats:
        with status("logit lens of the decoder rows"):
            lens_ids, lens_vals = logit_lens(lm.model, loaded.sae.w_dec[feats].detach(), 10)

    freq, mean, maxes, hist = top.frequency(), top.mean(), top.max_F.cpu(), top.hist_FH.cpu()
    by_feature: dict[int, list] = {f: [] for f in feats}
    used: set[int] = set()
    for f, act, r, start, stop, at in items:
        window = [ids[row] for row in range(start, stop)]
        used.update(window)
        by_feature[f].append({"act": round(act, 4), "at": r - start, "tokens": window,
                              "acts": [round(float(a), 4) for a in acts[at : at + stop - start]]})  # fmt: skip
    features = []
    for j, f in enumerate(feats):
        nz = torch.nonzero(hist[f]).flatten().tolist() or [0]
        logits = (
            []
            if lens_ids is None
            else [[int(i), round(float(v), 3)] for i, v in zip(lens_ids[j], lens_vals[j], strict=True)]
        )
        used.update(i for i, _ in logits)
        features.append({"id": f, "frequency": freq[f].item(), "mean": mean[f].item(), "max": maxes[f].item(),
                         "hist_start": nz[0], "hist": hist[f, nz[0] : nz[-1] + 1].tolist(),
                         "contexts": by_feature[f], "logits": logits})  # fmt: skip
    m = store.meta
    return {
        "meta": {
            "sae": loaded.source,
            "sae_format": loaded.format,
            "store": store.path,
            "model": m.model.name,
            "layer": store.hook.layer,
            "site": store.hook.site,
            "tokens": top.n,
            "width": loaded.sae.width,
            "dead": int((top.count_F == 0).sum()),
            "top_k": cfg.top_k,
            "before": cfg.before,
            "after": cfg.after,
            "hist_low": HIST_LOW,
            "hist_step": HIST_STEP,
            "gsp_version": __version__,
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
        },  # fmt: skip
        "vocab": token_strings(lm.tokenizer, sorted(used)) if lm is not None else {},
        "features": features,
    }


def _token_ids(store: ActivationStore, rows: list[int]) -> dict[int, int]:
    """Token id of each row, reading each needed chunk once."""
    ids, span = {}, store.chunk_rows
    wanted = np.unique(np.array(rows, np.int64))
    for start in np.unique(wanted // span) * span:
        chunk = store.read_tokens(int(start), min(int(start) + span, store.rows_written))
        for row in wanted[(wanted >= start) & (wanted < start + span)]:
            ids[int(row)] = int(chunk[row - start])
    return ids


_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_strings(tokenizer, ids: list[int]) -> dict[int, str]:
    """Readable text of single tokens: SentencePiece's ▁ and byte-level BPE's Ġ/Ċ as spaces and newlines."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    out = {}
    for i, p in zip(ids, pieces, strict=True):
        p = p if isinstance(p, str) else str(p)
        p = _BYTE.sub(lambda m: chr(int(m.group(1), 16)), p)
        out[i] = p.replace("▁", " ").replace("Ġ", " ").replace("Ċ", "\n")
    return out


# ------------------------------------------------------------------------------ inputs
def _store(cfg: FeaturesConfig, loaded: LoadedSAE) -> ActivationStore:
    path = cfg.store or loaded.training_store
    if not path:
        raise GspError("--store is required for this SAE (a store harvested at the SAE's layer and site)")
    store = open_input_store(loaded, path)
    check_against_store(loaded, store)
    return store


def _model(spec: str, revision: str | None, device: str, token, *, full: bool):
    """The model (for the logit lens and prompts) with its tokenizer, or just the tokenizer."""
    from pipeline.models import load_model, load_tokenizer

    if full:
        return load_model(spec, device=device, revision=revision, token=token)
    return SimpleNamespace(model=None, tokenizer=load_tokenizer(spec, revision=revision, token=token))


# ------------------------------------------------------------------------------ outputs
def _write(data: dict, loaded: LoadedSAE, folder: Path) -> Path:
    from pipeline.browser import render
    from pipeline.files import atomic_write_text
    from pipeline.report import free_stem

    folder.mkdir(parents=True, exist_ok=True)
    stem = free_stem(folder, f"features_{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}")
    atomic_write_text(folder / f"{stem}.json", json.dumps(data, separators=(",", ":")) + "\n")
    page = folder / f"{stem}.html"
    atomic_write_text(page, render(data, f"gsp features · {loaded.source}"))
    m = data["meta"]
    console.print(
        f"{len(data['features']):,} features ({m['dead']:,} dead) over {m['tokens']:,} tokens: "
        f"[bold]{page}[/] (+ .json); open it in a browser, no server needed",
        highlight=False,
    )
    return page


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _shade(text: str, act: float, peak: float, at: bool):
    from rich.text import Text

    level = min(1.0, act / peak) if peak > 0 else 0.0
    style = f"on rgb({255},{int(255 - 135 * level)},{int(255 - 255 * level)})" if level > 0 else ""
    return Text(text, style=f"{style} bold underline" if at else style)


def _print_feature(data: dict, feature: int) -> None:
    from rich.text import Text

    if not data["features"]:
        console.print(f"feature {feature} never fired on {data['meta']['tokens']:,} tokens (dead)")
        return
    shown, vocab = data["features"][0], data["vocab"]
    console.print(
        f"[bold]feature {feature}[/]: fires on {100 * shown['frequency']:.3g} % of {data['meta']['tokens']:,} tokens, "
        f"mean {_num(shown['mean'])}, max {_num(shown['max'])}",
        highlight=False,
    )
    for c in shown["contexts"]:
        line = Text(f"{_num(c['act']):>10}  ")
        for i, (t, a) in enumerate(zip(c["tokens"], c["acts"], strict=True)):
            line.append_text(_shade(vocab.get(t, f"<{t}>").replace("\n", "⏎"), a, shown["max"], i == c["at"]))
        console.print(line)
    if shown["logits"]:
        console.print(
            "promotes: " + "  ".join(vocab.get(i, f"<{i}>").strip() or repr(vocab.get(i)) for i, _ in shown["logits"])
        )


@torch.no_grad()
def _prompt(cfg: FeaturesConfig, loaded: LoadedSAE, token) -> None:
    """Token by token, the features that fire on a prompt and how strongly."""
    from rich.table import Table

    from pipeline.hooks import activations, check_width

    store = open_input_store(loaded, cfg.store) if cfg.store else None
    if store is None and loaded.training_store and Path(loaded.training_store).exists():
        store = ActivationStore.open(loaded.training_store)
    layer = loaded.layer if loaded.layer is not None else (store.hook.layer if store else None)
    site = loaded.site or (store.hook.site if store else None)
    if layer is None or site is None:
        raise GspError("this SAE's files name no layer or site: pass --store harvested at its hook point")
    harvested = store.meta.model if store is not None else None
    spec, revision = model_to_run(cfg.model, cfg.revision, harvested=harvested, store_path=loaded.training_store,
                                  named=loaded.model_name)  # fmt: skip
    lm = _model(spec, revision, cfg.device, token, full=True)
    check_width(lm.model, layer, site, loaded.sae.d_in, f"the SAE {loaded.source}")
    ids = lm.tokenizer(cfg.prompt, return_tensors="pt").input_ids.to(lm.device)
    x = activations(lm.model, ids, layer, site)[0].float()
    sae = loaded.sae.to(lm.device)
    f_SF = sae.encode(x)[0]
    text = token_strings(lm.tokenizer, ids[0].tolist())
    table = Table(title=f"features of {loaded.source} on the prompt", title_justify="left")
    table.add_column("pos", justify="right")
    table.add_column("token")
    table.add_column("L0", justify="right")
    table.add_column("strongest features (#id activation)")
    special = set(lm.tokenizer.all_special_ids)
    for pos, t in enumerate(ids[0].tolist()):
        row = f_SF[pos]
        vals, idx = row.topk(min(6, len(row)))
        shown = "  ".join(f"#{i} {_num(v)}" for v, i in zip(vals.tolist(), idx.tolist(), strict=True) if v > 0)
        note = " (special: not SAE data)" if t in special else ""
        table.add_row(str(pos), repr(text[t]) + note, str(int((row > 0).sum())), shown)
    console.print(table)
