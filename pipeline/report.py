"""The evaluation report: a rich table in the terminal, and reports/report_<timestamp>.{md,json} + plots.

The JSON keys are stable (documented in docs/evaluate.md); the Markdown says the same
for people, with the plots a researcher looks at first: feature density, L0 distribution, error by
position in the context.
"""

import datetime
import json
import math
import os
from pathlib import Path

import torch
from rich.table import Table

from pipeline.console import console

JSON_FORMAT = "gsp-evaluation"
JSON_FORMAT_VERSION = 1


def write(results: dict, freq_F: torch.Tensor, folder: Path) -> Path:
    """Print the table and write the report files; returns the Markdown path."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    stem = free_stem(folder, f"report_{now:%Y%m%d-%H%M%S}")
    results = {"format": JSON_FORMAT, "format_version": JSON_FORMAT_VERSION, "created_at": now.isoformat(), **results}
    plots = _plots(results, freq_F, folder, stem)
    results["files"] = {"markdown": f"{stem}.md", "json": f"{stem}.json", "plots": plots}
    atomic_write(folder / f"{stem}.json", json.dumps(_finite(results), indent=1, allow_nan=False) + "\n")
    atomic_write(folder / f"{stem}.md", markdown(results))
    console.print(table(results))
    console.print(f"report: [bold]{folder / stem}.md[/] (+ .json, {len(plots)} plots)", highlight=False)
    return folder / f"{stem}.md"


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


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def table(r: dict) -> Table:
    s = r["sae"]
    t = Table(title=f"gsp evaluate · {s['source']}", title_justify="left", show_header=False)
    for k, v in _rows(r):
        t.add_row(k, v)
    return t


def _transcoder_line(r: dict) -> list[str]:
    s = r["sae"]
    if not s.get("transcoder"):
        return []
    skip = ", with an affine skip connection" if s["skip"] else ""
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
        "",
        "## Most frequent latents",
        "",
        "| latent | frequency | mean activation | max activation |",
        "|---|---|---|---|",
        *(
            f"| {f['feature']} | {f['frequency']:.4f} | {f['mean_activation']:.4g} | {f['max_activation']:.4g} |"
            for f in rec["top_features"]
        ),
        "",
        "## Plots",
        "",
        *(f"![{p}]({p})" for p in r["files"]["plots"]),
        "",
        "## Definitions",
        "",
        "Rows holding BOS, EOS or PAD are excluded from every figure. FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² with x̄ the "
        "per-dimension mean of the measured tokens; explained variance = 1 − FVU; MSE is per element; a dead "
        "latent never fired on the measured tokens; error by position = mean ‖x − x̂‖² at that position / mean "
        "‖x − x̄‖² over all tokens. The delta loss re-runs the model on the store's first contexts: clean, with "
        "x̂ spliced in at the hook and with zeros there (special-token positions keep their activation); a "
        "prediction counts when neither the token it is made from nor the token it predicts is special. Loss "
        "recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean); the ± is the standard error over contexts.",
        "",
    ]
    return "\n".join(lines)


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
        fig.tight_layout()
        fig.savefig(folder / f"{stem}_{name}.png", dpi=110)
        plt.close(fig)
        names.append(f"{stem}_{name}.png")

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
