#!/usr/bin/env bash
# The performance suite in one run on this machine: every benchmark prints its ratios measured in
# one process (ours against the bare floor, ours against SAELens where `.[bench]` is installed),
# then harvest and fit at 1 and 2 processes under torchrun. Needs the main job's stores and SAE
# (`gsp run` first) and the offline Wikipedia package. Paste the tables into benchmarks/RESULTS.md
# with the machine's name.
#
#   bash benchmarks/suite.sh            (PYTHON=.venv/bin/python by default)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
STORE=cache/stores/gemma-3-270m_L12_resid_post_train_491520
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== harvest against the bare early-stopped forward";  $PY benchmarks/harvest.py 2>&1 | grep -E "^\||machine|rror"
echo "== fit step and loader against the bare SAE step";   $PY benchmarks/fit.py 2>&1 | grep -E "^\||machine|rror"
echo "== evaluate against its floors";                      $PY benchmarks/evaluate.py 2>&1 | grep -E "^\||machine|rror"
echo "== against SAELens (same rows and shapes)";          $PY benchmarks/peers.py 2>&1 | grep -E "^\||machine|SAELens is not|rror"

echo "== 1 and 2 processes (torchrun, gloo on the CPU; one process per GPU on a GPU box)"
seconds() { local t0; t0=$(date +%s.%N); "$@" >"$WORK/log" 2>&1 || { tail -3 "$WORK/log"; return 1; }; echo "$(date +%s.%N) - $t0" | bc; }
TR="$PY -m torch.distributed.run --standalone --nproc-per-node 2 -m stages"
H="harvest --tokens 65536 --shard-mib 8 --device cpu"
F="fit --store $STORE --target-l0 60 --steps 200 --batch-size 1024 --checkpoint-every 0 --device cpu"
echo "| work | 1 process (s) | 2 processes (s) |"
echo "|---|---|---|"
echo "| harvest 65,536 tokens | $(seconds $PY -m stages $H --store "$WORK/h1") | $(OMP_NUM_THREADS=1 seconds $TR $H --store "$WORK/h2") |"
echo "| fit 200 steps × 1,024 rows | $(seconds $PY -m stages $F --out "$WORK/f1") | $(OMP_NUM_THREADS=1 seconds $TR $F --out "$WORK/f2") |"
