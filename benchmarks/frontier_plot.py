"""A frontier plot (gsp evaluate's L0–FVU or L0–delta-loss figure) from evaluation reports already
written, without measuring again: one point per SAE of the reports, labelled by its folder's name.

    python benchmarks/frontier_plot.py REPORT.json [REPORT.json …] --out PNG [--metric l0_delta_loss]
        [--only NAME …]

Each REPORT is a `gsp evaluate` JSON (one SAE's, or a comparison's); `--only` keeps the SAEs whose
folder names are listed (e.g. topk_60 from a report that holds more).
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from pipeline.report import _frontier_plots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--metric", choices=("l0_fvu", "l0_delta_loss"), default="l0_delta_loss")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    es, seen = [], set()
    for report in args.reports:
        doc = json.loads(report.read_text())
        for e in doc.get("evaluations", [doc]):  # (one SAE's report is itself)
            name = Path(e["sae"]["source"].rstrip("/")).name
            if (args.only is None or name in args.only) and e["sae"]["source"] not in seen:  # each SAE once
                seen.add(e["sae"]["source"])
                es.append({**e, "label": name})
    folder = Path(tempfile.mkdtemp())
    try:
        _frontier_plots(es, [torch.zeros(e["sae"]["width"]) for e in es], folder, "frontier")
        shutil.copy(folder / f"frontier_{args.metric}.png", args.out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{len(es)} SAEs: {', '.join(e['label'] for e in es)} → {args.out}")


if __name__ == "__main__":
    main()
