"""gsp's attribution graphs against circuit-tracer 0.5.0's on the same transcoder set, prompt and settings.

    python benchmarks/trace_circuit_tracer.py --set SET --prompt "The capital of the state containing Dallas is"
        [--max-nodes 1000] [--batch-size 32] [--threads N] [--model cache/models/gemma-3-270m-pt-q4km-1.0.0]

SET is a gsp transcoder set for the model (gsp fit --transcoders mlp_in:mlp_out --layers all). The
script exports it with `gsp export --to circuit-tracer` (once per set, into cache/bench/ct-export-…),
then runs each library in its own process — circuit-tracer (NNSight backend, its default lazy decoder)
from its own virtual environment, because it needs transformers ≤ 4.57.3 and gsp needs ≥ 5; built on
first use at cache/bench/circuit-tracer-venv with gsp's own torch build — and `pipeline.attribution.
attribute` from gsp's. Each process loads the model in float32 on the CPU, computes one graph (the
first call in the process: one-time costs count) and writes its adjacency matrix, nodes and logits
(`--out`/<library>.npz) with its seconds and peak RSS (<library>.json).

The comparison, node for node: the prompt's tokens, the logit targets and their probabilities, the
latent nodes (layer, position, latent) in order, then the adjacency entries on the rows of latents and
logits, max over rows of (the row's largest |difference|) / (the row's largest |entry|), separately
for the columns of latents and error nodes and for the token columns. circuit-tracer's token
sources are the embedding rows as stored, gsp's the embeddings as Gemma 3 feeds them into the residual
stream (× √d_model), so its token columns are expected to be circuit-tracer's × √d_model exactly; the
ratio is printed, then the difference left after dividing by √d_model. When --max-nodes caps the
latents, both rank them by influence, normalising each row with its token columns, so the token
vectors also shift which latents are chosen near the cap: a third run, gsp with circuit-tracer's
token vectors (`gsp-ct-tokens`, this script only), must then choose circuit-tracer's very latents.
Memory: each process's peak RSS, and the peak of the attribution alone (the high-water mark reset
once the model and transcoders are loaded).
"""

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "cache/bench/circuit-tracer-venv"
CT_PACKAGES = ["circuit-tracer==0.5.0", "transformers<=4.57.3", "nnsight==0.6.3"]
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # where torch's +cpu builds live
MODEL = ROOT / "cache/models/gemma-3-270m-pt-q4km-1.0.0"
LIBS = ("circuit-tracer", "gsp")
# gsp with circuit-tracer's token vectors (the embedding rows as stored, not × √d_model): a control run
# that must select circuit-tracer's very latents when --max-nodes caps them (the ranking normalises each
# row, token columns included), showing that the token vectors are the only difference
CONTROL = "gsp-ct-tokens"


def ensure_venv() -> Path:
    """circuit-tracer's virtual environment, built if absent (or unfinished); its python."""
    py = VENV / "bin/python"
    check = [py, "-c", "import circuit_tracer, nnsight"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    import torch

    print(f"building circuit-tracer's environment in {VENV} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    pip = [py, "-m", "pip", "install", "--quiet"]
    # gsp's own torch build (a +cpu build is not on the default index, whose Linux wheels pull CUDA)
    if subprocess.run([*pip, f"torch=={torch.__version__}"]).returncode:
        subprocess.run([*pip, f"torch=={torch.__version__}", "--extra-index-url", TORCH_CPU_INDEX], check=True)
    subprocess.run([*pip, *CT_PACKAGES], check=True)
    return py


def export(tset: Path) -> Path:
    """The set in circuit-tracer's layout, written once per version of its files (an absolute path:
    circuit-tracer looks a relative name up in its cache)."""
    files = sorted(tset.glob("*/params.safetensors")) + [tset / "transcoder_set.json"]
    key = hashlib.sha1(str(tset.resolve()).encode())
    for f in files:
        key.update(f"{f.name}{f.stat().st_size}{f.stat().st_mtime_ns}".encode())
    out = ROOT / f"cache/bench/ct-export-{tset.resolve().name}-{key.hexdigest()[:10]}"
    if not out.is_dir():  # gsp export writes the folder whole or not at all
        cmd = [sys.executable, "-m", "stages", "export", str(tset), "--to", "circuit-tracer", "--out", str(out)]
        subprocess.run(cmd, check=True, cwd=ROOT)
    return out


# ------------------------------------------------------------------------------ the runners (own processes)
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_high_water() -> None:
    """Start the process's RSS high-water mark (VmHWM) afresh (Linux: clear_refs 5), so that it then
    measures the attribution alone, the model and transcoders loaded."""
    Path("/proc/self/clear_refs").write_text("5")


def high_water_mib() -> float:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def run_circuit_tracer(a) -> tuple[dict, dict]:
    import torch
    from circuit_tracer import ReplacementModel, attribute

    t0 = time.perf_counter()
    model = ReplacementModel.from_pretrained(str(a.model), str(a.transcoders), backend="nnsight",
                                             device=torch.device("cpu"), dtype=torch.float32)  # fmt: skip
    loaded, load_rss = time.perf_counter() - t0, peak_rss_mib()
    reset_high_water()
    t0 = time.perf_counter()
    g = attribute(a.prompt, model, max_feature_nodes=a.max_nodes, batch_size=a.batch_size)
    seconds, attribution_peak = time.perf_counter() - t0, high_water_mib()
    active, selected = g.active_features.cpu().numpy(), g.selected_features.cpu().numpy()
    values = g.activation_values.float().cpu().numpy()
    arrays = {"adjacency": g.adjacency_matrix.float().cpu().numpy(), "latents": active[selected],
              "activations": values[selected], "active_features": active, "selected_features": selected,
              "activation_values": values,
              "logit_ids": np.array([t.vocab_idx for t in g.logit_targets]),
              "logit_probs": g.logit_probabilities.float().cpu().numpy(),
              "input_tokens": g.input_tokens.cpu().numpy()}  # fmt: skip
    import circuit_tracer
    import transformers

    versions = {"circuit_tracer": circuit_tracer.__version__, "transformers": transformers.__version__}
    return arrays, {"seconds": seconds, "load_seconds": loaded, "rss_after_load_mib": load_rss,
                    "attribution_peak_rss_mib": attribution_peak, "active": len(active),
                    "versions": versions}  # fmt: skip


def run_gsp(a) -> tuple[dict, dict]:
    import transformers

    import pipeline.attribution
    from pipeline.attribution import attribute
    from pipeline.models import load_model
    from pipeline.transcoder_set import load_transcoders
    from stages.trace import _tokens

    t0 = time.perf_counter()
    lm = load_model(str(a.model), device="cpu", dtype="float32")
    tset = load_transcoders(a.transcoders, streamed=True)  # as gsp trace reads a set
    loaded, load_rss = time.perf_counter() - t0, peak_rss_mib()
    ids = _tokens(lm.tokenizer, a.prompt)
    special = [i for i in (lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id)
               if i is not None]  # fmt: skip
    if a.runner == CONTROL:  # circuit-tracer's token vectors: the embedding rows as stored
        setup, scale = pipeline.attribution.setup, float(lm.model.model.embed_tokens.embed_scale)

        def unscaled(*args, **kw):
            s = setup(*args, **kw)
            s.tokens = s.tokens / scale
            return s

        pipeline.attribution.setup = unscaled
    reset_high_water()
    t0 = time.perf_counter()
    g = attribute(lm.model, tset, ids, special, max_latents=a.max_nodes, batch=a.batch_size)
    seconds, attribution_peak = time.perf_counter() - t0, high_water_mib()
    arrays = {"adjacency": g.adjacency.numpy(), "latents": g.latents.numpy(), "activations": g.activations.numpy(),
              "logit_ids": g.logit_ids.numpy(), "logit_probs": g.logit_probs.float().numpy(),
              "input_tokens": ids.numpy()}  # fmt: skip
    embed = lm.model.model.embed_tokens
    return arrays, {"seconds": seconds, "load_seconds": loaded, "rss_after_load_mib": load_rss, "active": g.active,
                    "attribution_peak_rss_mib": attribution_peak,
                    "embed_scale": float(getattr(embed, "embed_scale", 1.0)), "d_model": lm.model.config.hidden_size,
                    "versions": {"transformers": transformers.__version__}}  # fmt: skip


def runner(a) -> None:
    """One library's graph, written to a.result + .npz / .json."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    arrays, info = (run_circuit_tracer if a.runner == "circuit-tracer" else run_gsp)(a)
    info |= {"peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    np.savez(a.result + ".npz", **arrays)
    Path(a.result + ".json").write_text(json.dumps(info, indent=2) + "\n")


# ------------------------------------------------------------------------------ the comparison
def keys(z, n_layers: int) -> list[tuple]:
    """Each node of a graph's adjacency, as a key both libraries share (circuit-tracer's node order)."""
    S = len(z["input_tokens"])
    latents = [("latent", *map(int, r)) for r in z["latents"]]
    errors = [("error", layer, pos) for layer in range(n_layers) for pos in range(S)]
    return latents + errors + [("token", pos) for pos in range(S)] + [("logit", int(t)) for t in z["logit_ids"]]


def row_rel(a: np.ndarray, b: np.ndarray) -> float:
    """Max over rows of max |a − b| / max |b| (rows of b that are all zero must be zero in a)."""
    scale, diff = np.abs(b).max(1), np.abs(a - b).max(1)
    rel = np.where(scale > 0, diff / np.maximum(scale, 1e-300), np.where(diff > 0, np.inf, 0.0))
    return float(rel.max(initial=0))


def compare(ct, ours, n_layers: int, d_model: int, embed_scale: float) -> dict:
    out = {"same_tokens": np.array_equal(ct["input_tokens"], ours["input_tokens"]),
           "same_logits": np.array_equal(ct["logit_ids"], ours["logit_ids"]),
           "same_latents_in_order": np.array_equal(ct["latents"], ours["latents"])}  # fmt: skip
    if out["same_logits"]:
        out["logit_prob_max_abs_diff"] = float(np.abs(ct["logit_probs"] - ours["logit_probs"]).max())
    if out["same_latents_in_order"]:
        a, b = ct["activations"].astype(np.float64), ours["activations"]
        out["activation_max_rel_diff"] = float(np.abs(a - b).max(initial=0) / max(np.abs(a).max(initial=0), 1e-30))
    if not out["same_tokens"]:
        return out
    kc, kg = keys(ct, n_layers), keys(ours, n_layers)
    at = {k: i for i, k in enumerate(kg)}
    common = [k for k in kc if k in at]
    out["latents"] = {"circuit-tracer": len(ct["latents"]), "gsp": len(ours["latents"]),
                      "common": sum(k[0] == "latent" for k in common)}  # fmt: skip
    rows = [k for k in common if k[0] in ("latent", "logit")]
    src = [k for k in common if k[0] in ("latent", "error")]
    tok = [k for k in common if k[0] == "token"]
    ic, ig = {k: i for i, k in enumerate(kc)}, at

    def block(z, idx, r, c):
        return z["adjacency"][np.ix_([idx[k] for k in r], [idx[k] for k in c])].astype(np.float64)

    for kind in ("latent", "logit"):
        part, r = f"{kind} rows", [k for k in rows if k[0] == kind]
        a_le, b_le = block(ct, ic, r, src), block(ours, ig, r, src)
        a_t, b_t = block(ct, ic, r, tok), block(ours, ig, r, tok)
        big = np.abs(a_t) > 1e-3 * np.abs(a_t).max(initial=0)
        ratio = b_t[big] / a_t[big]
        out[part] = {"rows": len(r), "latent/error columns": row_rel(b_le, a_le),
                     "token columns ratio gsp/ct (median, min, max)": [float(np.median(ratio)), float(ratio.min()),
                                                                       float(ratio.max())] if big.any() else None,
                     "token columns after ÷ embed scale": row_rel(b_t / embed_scale, a_t)}  # fmt: skip
    out["sqrt_d_model"], out["embed_scale"] = d_model**0.5, embed_scale
    return out


def summary(c: dict) -> str:
    """The comparison in one line."""
    if not (c["same_tokens"] and "latent rows" in c):
        return f"graphs: different prompt tokens (circuit-tracer's and gsp's tokenisations differ): {c}"
    n = c["latents"]
    same = (f"the same latent nodes in the same order (activations within {c['activation_max_rel_diff']:.1g})"
            if c["same_latents_in_order"] else f"{n['common']} latent nodes in common")  # fmt: skip
    rel = max(c[p]["latent/error columns"] for p in ("latent rows", "logit rows"))
    ratio = c["latent rows"]["token columns ratio gsp/ct (median, min, max)"]
    after = max(c[p]["token columns after ÷ embed scale"] for p in ("latent rows", "logit rows"))
    return (f"graphs: {'the same' if c['same_logits'] else 'DIFFERENT'} logits (probabilities within "
            f"{c.get('logit_prob_max_abs_diff', float('nan')):.1g}), {same} (of {n['circuit-tracer']} / "
            f"{n['gsp']}); adjacency on latent and logit rows: "
            f"latent/error columns within {rel:.1g} (relative, per row); token columns gsp/circuit-tracer "
            f"{ratio[0]:.4f} (min {ratio[1]:.4f}, max {ratio[2]:.4f}; √d_model = {c['sqrt_d_model']:.4f}), within "
            f"{after:.1g} after ÷ Gemma's embed scale")  # fmt: skip


def table(info: dict, a, n_tokens: int) -> str:
    ct, ours = info["circuit-tracer"], info["gsp"]
    rows = [("seconds per prompt (attribution)", "seconds", "{:.1f}"),
            ("model + transcoders load, s", "load_seconds", "{:.1f}"),
            ("peak RSS, MiB", "peak_rss_mib", "{:,.0f}"),
            ("peak RSS of the attribution (high-water mark reset after loading), MiB", "attribution_peak_rss_mib",
             "{:,.0f}"),
            ("RSS after load, MiB", "rss_after_load_mib", "{:,.0f}")]  # fmt: skip
    lines = [f"prompt {a.prompt!r} ({n_tokens} tokens) · max nodes {a.max_nodes} · batch {a.batch_size} · active "
             f"latents {ct['active']:,} (circuit-tracer) / {ours['active']:,} (gsp)", "",
             f"| | circuit-tracer {ct['versions']['circuit_tracer']} (nnsight) | gsp | circuit-tracer / gsp |",
             "|---|---|---|---|"]  # fmt: skip
    for name, key, fmt in rows:
        lines.append(f"| {name} | {fmt.format(ct[key])} | {fmt.format(ours[key])} | {ct[key] / ours[key]:.2f}× |")
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), platform.processor())
    lines += ["", f"machine {platform.node()} ({cpu}, {os.cpu_count()} CPUs) · torch {ct['torch']} (circuit-tracer, "
              f"transformers {ct['versions']['transformers']}) / {ours['torch']} (gsp, transformers "
              f"{ours['versions']['transformers']}) · threads {ct['threads']} / {ours['threads']}"]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", type=Path, help="A gsp transcoder set for --model (every layer).")
    p.add_argument("--prompt", default="The capital of the state containing Dallas is")
    p.add_argument("--model", type=Path, default=MODEL, help="The model, a local transformers folder.")
    p.add_argument("--max-nodes", type=int, default=1000, help="Latent nodes at most (both libraries).")
    p.add_argument("--batch-size", type=int, default=32, help="Targets per backward pass (both libraries).")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each process (0: torch's default).")
    p.add_argument("--out", type=Path, default=ROOT / "cache/bench/trace_circuit_tracer",
                   help="Folder for each library's graph and times, and the comparison.")  # fmt: skip
    p.add_argument("--runner", choices=(*LIBS, CONTROL), help=argparse.SUPPRESS)  # internal: one library's run
    p.add_argument("--transcoders", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.runner:
        return runner(a)
    if a.set is None:
        p.error("--set is required")
    py = ensure_venv()
    folder = export(a.set)
    a.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = (("circuit-tracer", py, folder), ("gsp", sys.executable, a.set.resolve()),
            (CONTROL, sys.executable, a.set.resolve()))  # fmt: skip
    for lib, python, transcoders in runs:
        print(f"running {lib}", flush=True)
        cmd = [str(python), __file__, "--runner", lib, "--transcoders", str(transcoders), "--result", str(a.out / lib),
               "--model", str(a.model.resolve()), "--prompt", a.prompt, "--max-nodes", str(a.max_nodes),
               "--batch-size", str(a.batch_size), "--threads", str(a.threads)]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    info = {lib: json.loads((a.out / f"{lib}.json").read_text()) for lib in (*LIBS, CONTROL)}
    graphs = {lib: np.load(a.out / f"{lib}.npz") for lib in (*LIBS, CONTROL)}
    n_layers = len(json.loads((a.set / "transcoder_set.json").read_text())["layers"])
    result = compare(graphs["circuit-tracer"], graphs["gsp"], n_layers, info["gsp"]["d_model"],
                     info["gsp"]["embed_scale"])  # fmt: skip
    control = compare(graphs["circuit-tracer"], graphs[CONTROL], n_layers, info["gsp"]["d_model"], 1.0)
    text = (table(info, a, len(graphs["gsp"]["input_tokens"])) + "\n\n" + summary(result) + "\n\ncontrol, gsp with "
            "circuit-tracer's token vectors (the embedding rows as stored): " + summary(control))  # fmt: skip
    doc = json.dumps({"runs": info, "comparison": result, "control": control}, indent=2, ensure_ascii=False)
    (a.out / "comparison.json").write_text(doc + "\n")
    (a.out / "table.md").write_text(text + "\n")
    print(text)
    print(f"details: {a.out / 'comparison.json'}")


if __name__ == "__main__":
    main()
