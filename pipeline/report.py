"""The evaluation report: a rich table in the terminal, and reports/report_<timestamp>.{md,json} + plots.

One SAE gets the single report (format gsp-evaluation: its figures, with the plots a researcher looks
at first: feature density, L0 distribution, error by position in the context); several SAEs of one
hook point get the comparison (format gsp-evaluation-set: a row per SAE and the L0–FVU and
L0–delta-loss frontier). The JSON keys are stable (documented in docs/evaluate.md); the Markdown says
the same for people. Every file is written atomically, and a report that cannot be written whole (a
full disk) leaves none of its files behind.
"""

import contextlib
import datetime
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.table import Table

from pipeline.console import console
from pipeline.files import atomic_path, atomic_write_text

JSON_FORMAT = "gsp-evaluation"
JSON_FORMAT_VERSION = 1
SET_FORMAT = "gsp-evaluation-set"  # several SAEs of one hook point, compared
SET_FORMAT_VERSION = 1


def write(evaluations: list[dict], freqs: list[torch.Tensor], folder: Path) -> Path:
    """Print the table and write the report files of the SAEs evaluated (each one's figures as the
    JSON holds them, and its latents' firing frequencies); returns the Markdown path."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    stem = free_stem(folder, f"report_{now:%Y%m%d-%H%M%S}")
    with _whole(folder, stem):
        if len(evaluations) == 1:
            return _write_one(evaluations[0], freqs[0], folder, stem, now)
        return _write_set(evaluations, freqs, folder, stem, now)


def _write_one(results: dict, freq_F: torch.Tensor, folder: Path, stem: str, now) -> Path:
    results = {"format": JSON_FORMAT, "format_version": JSON_FORMAT_VERSION, "created_at": now.isoformat(), **results}
    return _finish(folder, stem, results, _plots(results, freq_F, folder, stem), markdown, table)


def _finish(folder: Path, stem: str, doc: dict, plots: list[str], markdown_fn, table_fn) -> Path:
    """Name the files in the JSON, write the JSON and the Markdown, print the table; the Markdown's path."""
    doc["files"] = {"markdown": f"{stem}.md", "json": f"{stem}.json", "plots": plots}
    atomic_write_text(folder / f"{stem}.json", json.dumps(_finite(doc), indent=1, allow_nan=False) + "\n")
    atomic_write_text(folder / f"{stem}.md", markdown_fn(doc))
    title, t = table_fn(doc)
    console.print(title, highlight=False, markup=False)  # a line of its own: a long path never wraps in a title
    console.print(t)
    console.print(f"report: [bold]{folder / stem}.md[/] (+ .json, {len(plots)} plots)", highlight=False)
    return folder / f"{stem}.md"


@contextlib.contextmanager
def _whole(folder: Path, stem: str) -> Iterator[None]:
    """A report written whole or not at all: on a failure (a full disk), its files already written go."""
    try:
        yield
    except BaseException:
        for file in [*folder.glob(f"{stem}.*"), *folder.glob(f"{stem}_*.png")]:
            file.unlink(missing_ok=True)
        raise


def free_stem(folder: Path, stem: str) -> str:
    """<stem>, or <stem>-2 … when a file of that name (a run in the same second) is already there."""
    candidate, n = stem, 1
    while (folder / f"{candidate}.json").exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def _finite(obj):
    """NaN and infinities become null: the JSON stays valid for every reader."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _save(fig, folder: Path, name: str) -> str:
    """A plot written as `name` in `folder`, atomically; returns the name."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        with atomic_path(folder / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return name


def _fmt(v, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return format(v, spec) if isinstance(v, float) else f"{v:,}"


def _rows(r: dict) -> list[tuple[str, str]]:
    """(metric, value) rows shared by the terminal table and the Markdown."""
    rec, d = r["reconstruction"], r["delta_loss"]
    rows = [
        ("tokens measured", f"{rec['tokens']:,} (special tokens excluded)"),
        ("L0", f"{rec['l0']:.2f} (std {rec['l0_std']:.1f})"),
        ("FVU", _fmt(rec["fvu"])),
        ("explained variance", _fmt(rec["explained_variance"])),
        ("MSE (per element)", _fmt(rec["mse"])),
        ("cosine(x, x̂)", _fmt(rec["cosine"])),
        ("‖x̂‖ / ‖x‖", _fmt(rec["relative_norm"])),
        ("dead latents", f"{rec['dead_features']:,} of {r['sae']['width']:,} ({100 * rec['dead_fraction']:.2f} %) "
                         f"never fired in {rec['tokens']:,} tokens"),
        ("dense latents", f"{rec['dense_features']:,} fire on > {100 * rec['dense_threshold']:.0f} % of tokens"),
    ]  # fmt: skip
    if d and d.get("predictions"):
        rows += [
            ("LM loss predictions", f"{d['predictions']:,} in {d['contexts']:,} contexts ({d['tokens']:,} tokens)"),
            ("CE clean", _fmt(d["ce_clean"])),
            ("CE spliced", _fmt(d["ce_spliced"])),
            ("delta loss", f"{d['delta_loss']:.4f} ± {_fmt(d['delta_loss_stderr'], '.4f')} (standard error)"),
            ("CE zero-ablated", _fmt(d["ce_zero_ablated"])),
            ("loss recovered", _fmt(d["loss_recovered"])),
            ("KL(clean ‖ spliced)", _fmt(d["kl_clean_spliced"])),
        ]
    return rows


def table(r: dict) -> tuple[str, Table]:
    """(its title, the terminal's table of one SAE)."""
    t = Table(show_header=False)
    for k, v in _rows(r):
        t.add_row(k, v)
    return f"gsp evaluate · {r['sae']['source']}", t


def _transcoder_line(r: dict) -> list[str]:
    s = r["sae"]
    if not s.get("transcoder"):
        return []
    skip = ", with an affine skip connection" if s["skip"] else ""
    if s.get("set_layers"):
        return [f"- **Transcoder set** of {len(s['set_layers'])} layers ({_layer_list(s['set_layers'])}){skip}: "
                "each layer's transcoder reads its MLP input and predicts its MLP output; the figures pool "
                "all layers, and the delta loss replaces every MLP's output at once (each layer's FVU, and "
                "its delta loss replaced alone, in the table below)"]  # fmt: skip
    if s.get("clt_layers"):
        return [f"- **Cross-layer transcoder** over {s['clt_layers']} layers{skip}: reads every layer's MLP input, "
                f"predicts every layer's MLP output; the figures pool all layers (per-layer FVU in the JSON, "
                f"`reconstruction.layer_fvu`); the delta loss replaces every MLP's output at once"]  # fmt: skip
    return [f"- **Transcoder**: reads layer {s['layer']} {s['site']}, predicts layer {s['layer_out']} "
            f"{s['site_out']} (d_out {s['d_out']}{skip}); the figures are of its prediction of "
            f"`{r['target_store']['path']}`"]  # fmt: skip


def markdown(r: dict) -> str:
    s, st, m, rec = r["sae"], r["store"], r["model"], r["reconstruction"]
    k = f", k={s['k']}" if s["k"] else ""
    lines = [
        f"# SAE evaluation — {s['source']}",
        "",
        f"- **SAE**: `{s['source']}` ({s['format']}, {s['architecture']}{k}, width {s['width']:,}, d_in {s['d_in']}), "
        f"trained on {s['model_name'] or 'an unnamed model'}",
        f"- **Store**: `{st['path']}` — {st['model']} ({st['model_revision']}), `{st['hook_point']}`, "
        f"{st['rows_written']:,} rows in contexts of {st['context_size']}, corpus "
        + ", ".join(f"{k_}={v}" for k_, v in st["dataset"].items() if v is not None),
        *_transcoder_line(r),
        f"- **Model for the rerun**: {m['name']} ({m['revision']}) on {m['device']} in {m['dtype']}"
        if m
        else "- **Model for the rerun**: not run (`--no-delta-loss`)",
        f"- Written by gsp {r['gsp_version']} at {r['created_at']}",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k_} | {v} |" for k_, v in _rows(r)),
        *_layer_table(r),
        "",
        "## Most frequent latents",
        "",
        "| latent | frequency | mean activation | max activation |",
        "|---|---|---|---|",
        *(
            f"| {f['feature']} | {f['frequency']:.4f} | {f['mean_activation']:.4g} | {f['max_activation']:.4g} |"
            for f in rec["top_features"]
        ),
        *_plots_and_definitions(r["files"]["plots"]),
    ]
    return "\n".join(lines)


def _layer_table(r: dict) -> list[str]:
    """Per layer, of a CLT or a transcoder set: its FVU, and (a set's) its delta loss replaced alone."""
    rec, d = r["reconstruction"], r["delta_loss"] or {}
    if "layer_fvu" not in rec:
        return []
    alone = d.get("layers", {})
    rows = []
    for layer, fvu in zip(rec.get("layers", range(len(rec["layer_fvu"]))), rec["layer_fvu"], strict=True):
        a = alone.get(str(layer))
        delta = f"{a['delta_loss']:.4f} ± {_fmt(a['delta_loss_stderr'], '.4f')}" if a else "n/a"
        rows.append(f"| {layer} | {fvu:.4f} | {delta} |")
    return ["", "## By layer", "", "| layer | FVU | delta loss, this layer alone |", "|---|---|---|", *rows]


def _layer_list(layers: list[int]) -> str:
    """0–17, or 1, 3, 9 when not contiguous."""
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}–{layers[-1]}" if contiguous else ", ".join(map(str, layers))


def _plots_and_definitions(plots: list[str]) -> list[str]:
    """The Markdown's last sections, in every report."""
    return ["", "## Plots", "", *(f"![{p}]({p})" for p in plots), "", "## Definitions", "", DEFINITIONS, ""]


DEFINITIONS = (
    "Rows holding BOS, EOS or PAD are excluded from every figure. FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² with x̄ the "
    "per-dimension mean of the measured tokens; explained variance = 1 − FVU; MSE is per element; a dead "
    "latent never fired on the measured tokens; a dense one fired on more than 10 % of them; error by position = "
    "mean ‖x − x̂‖² at that position / mean ‖x − x̄‖² over all tokens. The delta loss re-runs the model on the "
    "store's first contexts: clean, with x̂ spliced in at the hook and with zeros there (special-token positions "
    "keep their activation); a prediction counts when neither the token it is made from nor the token it "
    "predicts is special. Loss recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean); the ± is the standard "
    "error over contexts."
)


def _quantile(counts: list[int], q: float) -> int:
    """The smallest value with at least a share q of the histogram's mass at or below it."""
    total, seen = sum(counts), 0
    for value, c in enumerate(counts):
        seen += c
        if seen >= q * total:
            return value
    return len(counts) - 1


def _plots(r: dict, freq_F: torch.Tensor, folder: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec, names = r["reconstruction"], []

    def save(fig, name: str) -> None:
        names.append(_save(fig, folder, f"{stem}_{name}.png"))

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    alive = freq_F[freq_F > 0].log10().numpy()
    ax.hist(alive, bins=rec["frequency_histogram"]["log10_edges"], color="#4477aa")
    ax.axvline(math.log10(rec["dense_threshold"]), color="#cc6677", ls="--", label="dense")
    ax.set(xlabel="log10 firing frequency", ylabel="latents",
           title=f"Feature density ({rec['dead_features']:,} dead not shown, {rec['tokens']:,} tokens)")  # fmt: skip
    ax.legend()
    save(fig, "feature_density")

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    counts = rec["l0_histogram"]
    cut = _quantile(counts, 0.999)  # a handful of outlier tokens would squeeze the bulk into one bar
    tail = sum(counts[cut + 1 :])
    ax.bar(range(cut + 1), counts[: cut + 1], width=1.0, color="#228833")
    ax.axvline(rec["l0"], color="black", ls="--", label=f"mean {rec['l0']:.1f}")
    note = f" ({tail:,} tokens above {cut} not shown, max {len(counts) - 1})" if tail else ""
    ax.set(xlabel="active latents per token (L0)", ylabel="tokens", title=f"L0 distribution{note}")
    ax.legend()
    save(fig, "l0")

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    pos = [(i, v) for i, v in enumerate(rec["position_fvu"]) if v is not None]
    ax.plot([p for p, _ in pos], [v for _, v in pos], color="#aa3377")
    ax.set(xlabel="position in context", ylabel="error / mean variance", title="Reconstruction error by position")
    ax2 = ax.twinx()
    l0s = [(i, v) for i, v in enumerate(rec["position_l0"]) if v is not None]
    ax2.plot([p for p, _ in l0s], [v for _, v in l0s], color="#66ccee", alpha=0.7)
    ax2.set_ylabel("L0", color="#3399bb")
    save(fig, "position_error")
    return names


# ------------------------------------------------------------------------------ several SAEs
def _write_set(results: list[dict], freqs: list[torch.Tensor], folder: Path, stem: str, now) -> Path:
    """The comparison of several SAEs of one hook point: a terminal table, the Markdown and the JSON
    (format gsp-evaluation-set: each SAE's figures as a single report holds them, under `evaluations`,
    by architecture, width and L0), the frontier plots and the SAEs' feature densities."""
    labels = _labels([r["sae"]["source"] for r in results])
    order = sorted(range(len(results)), key=lambda i: (_kind(results[i]), results[i]["sae"]["width"],
                                                       results[i]["reconstruction"]["l0"]))  # fmt: skip
    doc = {"format": SET_FORMAT, "format_version": SET_FORMAT_VERSION, "created_at": now.isoformat(),
           "evaluations": [{"label": labels[i], **results[i]} for i in order]}  # fmt: skip
    freqs = [freqs[i] for i in order]
    plots = _frontier_plots(doc["evaluations"], freqs, folder, stem)
    return _finish(folder, stem, doc, plots, markdown_many, table_many)


def _labels(sources: list[str]) -> list[str]:
    """Each SAE's folder name, or its whole source where two folder names are the same."""
    names = [source.rstrip("/").rsplit("/", 1)[-1] for source in sources]
    return [n if names.count(n) == 1 else src for n, src in zip(names, sources, strict=True)]


def _kind(e: dict) -> str:
    """How the plots tell architectures apart: JumpReLU / TopK (transcoder)."""
    name = {"jumprelu": "JumpReLU", "topk": "TopK"}.get(e["sae"]["architecture"], e["sae"]["architecture"])
    return name + (" transcoder" if e["sae"]["transcoder"] else "")


def _cells(e: dict) -> list[str]:
    """One SAE's row: label, architecture, width, L0, FVU, dead, dense, delta loss, loss recovered, KL."""
    rec, d, s = e["reconstruction"], e["delta_loss"], e["sae"]
    arch = _kind(e) + (f" k={s['k']}" if s["k"] else "")
    lm = d and d.get("predictions")
    return [
        e["label"], arch, f"{s['width']:,}", f"{rec['l0']:.1f}", f"{rec['fvu']:.4f}",
        f"{rec['dead_features']:,} ({100 * rec['dead_fraction']:.1f} %)", f"{rec['dense_features']:,}",
        f"{d['delta_loss']:.4f} ± {_fmt(d['delta_loss_stderr'], '.4f')}" if lm else "n/a",
        _fmt(d["loss_recovered"]) if lm else "n/a", _fmt(d["kl_clean_spliced"]) if lm else "n/a",
    ]  # fmt: skip


HEADER = ["SAE", "architecture", "width", "L0", "FVU", "dead", "dense", "delta loss", "loss recovered", "KL"]


def table_many(doc: dict) -> tuple[str, Table]:
    """(its title, the terminal's narrower table: the Markdown's columns less width and KL, in short form)."""
    first = doc["evaluations"][0]
    t = Table()
    for h in ("SAE", "arch", "L0", "FVU", "dead", "dense", "Δ loss", "recovered"):
        t.add_column(h, overflow="fold")
    for e in doc["evaluations"]:
        label, arch, _, l0, fvu, dead, dense, delta, recovered, _ = _cells(e)
        t.add_row(label, arch, l0, fvu, dead.split(" ")[0], dense, delta.replace(" ± ", "±"), recovered)
    return f"gsp evaluate · {len(doc['evaluations'])} SAEs on {first['store']['path']}", t


def markdown_many(doc: dict) -> str:
    es = doc["evaluations"]
    first = es[0]
    st, m, rec = first["store"], first["model"], first["reconstruction"]
    d = first["delta_loss"]
    lines = [
        f"# SAE comparison — {len(es)} SAEs of `{st['hook_point']}`",
        "",
        f"- **Store**: `{st['path']}` — {st['model']} ({st['model_revision']}), {rec['tokens']:,} ordinary tokens "
        "measured for every SAE",
        f"- **Delta loss**: {m['name']} ({m['revision']}) on {m['device']} in {m['dtype']} re-run on {d['tokens']:,} "
        "tokens: one clean and one zero-ablated pass, shared, and one spliced pass per SAE"
        if m and d
        else "- **Delta loss**: not run (`--no-delta-loss`)",
        f"- Written by gsp {first['gsp_version']} at {doc['created_at']}",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
        *("| " + " | ".join(_cells(e)) + " |" for e in es),
        *_plots_and_definitions(doc["files"]["plots"]),
    ]
    return "\n".join(lines)


def _frontier_plots(es: list[dict], freqs: list[torch.Tensor], folder: Path, stem: str) -> list[str]:
    """L0 vs FVU and L0 vs delta loss, one point per SAE (colour: architecture; marker: width; a line
    joins the SAEs of one architecture and width in L0 order); and every SAE's feature density."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    kinds = list(dict.fromkeys(_kind(e) for e in es))
    widths = sorted({e["sae"]["width"] for e in es})
    colours, markers = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#aa3377", "#66ccee"], "osD^vP*X"

    def frontier(metric: str, value, err, ylabel: str) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, kind in enumerate(kinds):
            for j, width in enumerate(widths):
                pts = sorted((e["reconstruction"]["l0"], value(e), err(e), e["label"]) for e in es
                             if _kind(e) == kind and e["sae"]["width"] == width and value(e) is not None)  # fmt: skip
                if not pts:
                    continue
                xs, ys, es_, labels = zip(*pts, strict=True)
                ax.errorbar(xs, ys, yerr=es_ if any(v for v in es_) else None, color=colours[i % len(colours)],
                            marker=markers[j % len(markers)], capsize=3, label=f"{kind}, width {width:,}")  # fmt: skip
                if len(es) <= 12:
                    for x, y, label in zip(xs, ys, labels, strict=True):
                        ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 20, 60, 120 rather than 2×10¹
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set(xlabel="L0 (active latents per token)", ylabel=ylabel, title=f"L0 vs {ylabel}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        names.append(_save(fig, folder, f"{stem}_{metric}.png"))

    frontier("l0_fvu", lambda e: e["reconstruction"]["fvu"], lambda e: 0.0, "FVU")
    if any(e["delta_loss"] and e["delta_loss"].get("predictions") for e in es):
        ok = lambda e: e["delta_loss"] and e["delta_loss"].get("predictions")  # noqa: E731
        frontier("l0_delta_loss", lambda e: e["delta_loss"]["delta_loss"] if ok(e) else None,
                 lambda e: (e["delta_loss"]["delta_loss_stderr"] or 0.0) if ok(e) else 0.0, "delta loss")  # fmt: skip

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for e, freq in zip(es, freqs, strict=True):
        alive = freq[freq > 0].log10().numpy()
        ax.hist(
            alive, bins=e["reconstruction"]["frequency_histogram"]["log10_edges"], histtype="step", label=e["label"]
        )
    ax.axvline(math.log10(es[0]["reconstruction"]["dense_threshold"]), color="#cc6677", ls="--", label="dense")
    ax.set(xlabel="log10 firing frequency", ylabel="latents", title="Feature density (dead latents not shown)")
    ax.legend(fontsize=6)
    names.append(_save(fig, folder, f"{stem}_feature_density.png"))
    return names
