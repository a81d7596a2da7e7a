"""JumpReLU against TopK on the main job, by training budget (issue 24): held-out L0, FVU, dead and dense
latents and delta loss of each architecture at each budget, seed, L0 and weighting.

    python benchmarks/budget.py --train TRAIN_STORE --heldout HELDOUT_STORE [--budgets 1,2,3,5]
        [--seeds 0,1] [--l0 60] [--archs jumprelu,topk] [--weighting reads,none] [--delta-tokens 16384]
        [--out cache/budget]

Each (budget, seed, weighting) is one sweep of len(--archs) × len(--l0) SAEs from one read of the store:
JumpReLU at target L0 T and TopK at k T, width 4096, batch 1024, budget × 1,474,560 tokens (1× is the
main job's budget before 2026-12-06; it is 3× now), every other setting gsp's default. An SAE already
fitted with the same settings is kept, and an interrupted sweep resumes, so a rerun goes on where a
stop left off. Then every SAE is measured in
one `gsp evaluate` on the held-out store: reconstruction over all its ordinary rows, delta loss with
each SAE spliced into the same contexts (--delta-tokens tokens: 4,096 gives ±0.04 nats, decisions
need 16,384). Prints one Markdown table; the evaluation report (Markdown, JSON, frontier plots) is
written to --out/reports. "sweep s" is the wall time of the sweep an SAE was fitted in (tokens over
the rate it logged), which its SAEs share.
"""

import argparse
import json
import platform
from pathlib import Path

import torch

from pipeline.files import read_json
from stages.evaluate import EvaluateConfig, run_evaluate
from stages.fit import FitConfig, run_sweep

BASE_TOKENS = 1_474_560  # the main job's budget: 3 epochs of its 491,520-token store


def configs(args, budget: float, seed: int, weighting: str) -> list[FitConfig]:
    tokens = int(round(budget * BASE_TOKENS / 1024)) * 1024
    common = dict(store=args.train, width=4096, batch_size=1024, tokens=tokens, seed=seed, weighting=weighting)
    out = Path(args.out) / f"{budget:g}x_seed{seed}_{weighting}"
    made = {"jumprelu": lambda t: FitConfig(arch="jumprelu", target_l0=t, out=str(out / f"jumprelu_{t:g}"), **common),
            "topk": lambda t: FitConfig(arch="topk", k=int(t), out=str(out / f"topk_{t:g}"), **common)}  # fmt: skip
    return [made[arch](t) for t in args.l0 for arch in args.archs]


def fit_missing(cfgs: list[FitConfig]) -> None:
    """Fit the SAEs not already saved with these settings, in one sweep; resume one that was interrupted."""
    todo = []
    for c in cfgs:
        saved = c.out_dir / "config.json"
        if saved.is_file() and not c.differences(read_json(saved)["fit_config"], "the SAE"):
            continue
        todo.append(c)
    if todo:
        run_sweep(todo, resume=any((c.checkpoints / "latest.json").is_file() for c in todo))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True, help="the main job's train store (recording read gains)")
    ap.add_argument("--heldout", required=True, help="its held-out store")
    ap.add_argument("--budgets", default="1,2,3,5", help="multiples of 1,474,560 tokens")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--l0", default="60", help="JumpReLU targets and TopK k's, e.g. 20,60,120")
    ap.add_argument("--archs", default="jumprelu,topk", help="the architectures fitted at each L0")
    ap.add_argument("--weighting", default="reads")
    ap.add_argument("--delta-tokens", type=int, default=16_384)
    ap.add_argument("--out", default="cache/budget")
    args = ap.parse_args()
    args.l0 = [float(v) for v in args.l0.split(",")]
    args.archs = args.archs.split(",")
    if not set(args.archs) <= {"jumprelu", "topk"}:
        ap.error(f"--archs takes jumprelu and/or topk, got {','.join(args.archs)}")
    runs = [(float(b), int(s), w) for w in args.weighting.split(",") for s in args.seeds.split(",")
            for b in args.budgets.split(",")]  # fmt: skip
    saes = []
    for budget, seed, weighting in runs:
        cfgs = configs(args, budget, seed, weighting)
        fit_missing(cfgs)
        saes += [(budget, seed, weighting, c) for c in cfgs]
    reports = str(Path(args.out) / "reports")
    evaluate = EvaluateConfig(sae=[str(c.out_dir) for *_, c in saes], store=args.heldout,
                              delta_tokens=args.delta_tokens, reports=reports)  # fmt: skip
    report = run_evaluate(evaluate)
    doc = json.loads(report.with_suffix(".json").read_text())
    found = {e["sae"]["source"]: e for e in doc.get("evaluations", [doc])}  # (one SAE's report is itself)

    print(f"\n# {args.train} → {args.heldout} · {platform.node()} · torch {torch.__version__} · "
          f"{torch.get_num_threads()} threads · delta loss over {args.delta_tokens:,} tokens\n")  # fmt: skip
    print("| SAE | budget | seed | weighting | L0 | FVU | dead | dense | delta loss | loss recovered | sweep s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for budget, seed, weighting, c in saes:
        e = found[str(c.out_dir)]
        r, d = e["reconstruction"], e["delta_loss"]
        train = read_json(c.out_dir / "config.json")
        seconds = train["tokens_seen"] / train["final_train_metrics"]["tok_s"]
        name = f"JumpReLU target {c.target_l0:g}" if c.arch == "jumprelu" else f"TopK k {c.k}"
        print(f"| {name} | {budget:g}× | {seed} | {weighting} | {r['l0']:.1f} | {r['fvu']:.3f} | "
              f"{100 * r['dead_fraction']:.1f} % | {r['dense_features']} | {d['delta_loss']:.3f} ± "
              f"{d['delta_loss_stderr']:.3f} | {d['loss_recovered']:.3f} | {seconds:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
