#!/usr/bin/env bash
# The CUDA path in one prepared run (a few minutes on one GPU): the GPU tests, the card's
# arithmetic floors, harvest throughput against the bare early-stopped forward, then gsp fit
# (JumpReLU and TopK, width 16k) and gsp evaluate (delta loss included) on CUDA, all on a Gemma 3
# 270M-shaped model. Prints figures to paste into benchmarks/RESULTS.md.
#
# On a GPU box with gsp installed:   bash benchmarks/gpu_check.sh
# Where the offline model's package is missing (a bare GPU machine), a folder holding the 270M's
# config.json and tokenizer files can stand in: GSP_GPU_MODEL_CONFIG=DIR (random weights of the
# same shape: throughput is the same, the activations are not Gemma's).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${GSP_GPU_WORK:-/tmp/gsp-gpu-check}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 GSP_CACHE="$WORK/cache"

MODEL=offline:gemma-3-270m
if [ -n "${GSP_GPU_MODEL_CONFIG:-}" ]; then
  MODEL="$WORK/g270"
  $PY - "$GSP_GPU_MODEL_CONFIG" "$MODEL" <<'PY'
import shutil, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = map(Path, sys.argv[1:])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.bfloat16)
model.save_pretrained(dst)
for f in src.glob("tokenizer*"):
    shutil.copy(f, dst)
print("random-weight model of the 270M's shape at", dst)
PY
fi

echo "== GPU tests"
$PY -m pytest -q tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -3

echo "== arithmetic floors"
$PY - <<'PY'
import torch, time
dev = torch.device("cuda")
print("card:", torch.cuda.get_device_name(), "| torch", torch.__version__)
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): a @ b
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
print(f"bf16 matmul 8192^3: {2 * 8192**3 / dt / 1e12:,.0f} TFLOP/s")
x = torch.empty(2**30, dtype=torch.uint8, device=dev); y = torch.empty_like(x)
y.copy_(x); torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): y.copy_(x)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
print(f"device copy: {2 * 2**30 / dt / 1e12:.2f} TB/s (read + write)")
h = torch.empty(2**28, dtype=torch.uint8, pin_memory=True); torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(5): h.copy_(x[: 2**28])
torch.cuda.synchronize(); print(f"device -> pinned host: {5 * 2**28 / (time.perf_counter() - t) / 1e9:.1f} GB/s")
PY

echo "== corpus: the offline Wikipedia, 4 passes as one local file (enough tokens for a GPU)"
$PY - "$WORK/wiki4.txt" <<'PY'
import sys
from pipeline.corpus import documents
docs = [t.replace("\n\n", "\n") for _, t in documents("wiki")]
open(sys.argv[1], "w").write("\n\n".join(f"{d} ({i})" for i in range(4) for d in docs))
PY

echo "== the harvest's parts alone: corpus reader (tokenize + pack) and shard writer"
$PY - "$MODEL" "$WORK" <<'PY'
import itertools, os, sys, time
import numpy as np
from concurrent.futures import ThreadPoolExecutor
from transformers import AutoTokenizer
from pipeline.corpus import documents, pack
from pipeline.models import offline_model_dir
from pipeline.store import Layout, StoreWriter
from pipeline.tiny import synthetic_meta
model, work = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(offline_model_dir() if model.startswith("offline:") else model)
for ds in ("wiki", f"{work}/wiki4.txt"):
    try:
        it = pack(documents(ds), tok, 1024); next(it); t = time.perf_counter()
        n = sum(1 for _ in itertools.islice(it, 600))
        print(f"reader {ds}: {n * 1024 / (time.perf_counter() - t):,.0f} tok/s")
    except Exception as e:
        print(f"reader {ds}: {type(e).__name__}: {e}")
lay = Layout.plan(1024, 640, 2)
threads = min(8, max(2, os.cpu_count() // 2))
st = StoreWriter.create(f"{work}/wbench", synthetic_meta(16 * lay.shard_rows // 1024, 640, lay, dtype="bfloat16"))
x = np.random.randint(0, 2**16, (lay.shard_rows, 640), dtype=np.uint16); t_ = np.zeros(lay.shard_rows, np.int32)
t = time.perf_counter()
with ThreadPoolExecutor(threads) as ex:
    list(ex.map(lambda i: st.write_shard_data(i, x, t_), range(16)))
print(f"writer, {threads} threads: {16 * x.nbytes / (time.perf_counter() - t) / 1e6:,.0f} MB/s = {16 * lay.shard_rows / (time.perf_counter() - t):,.0f} tok/s at d_in 640 bf16")
PY

DATA="--dataset $WORK/wiki4.txt --tokens 2097152"
$PY -c "import datasets" 2>/dev/null || DATA="--dataset wiki --tokens 786432"  # local files need `datasets`
for workers in threads processes; do
  echo "== harvest benchmark, layer 12, context 1024, batch 32, workers: $workers"
  $PY benchmarks/harvest.py --model "$MODEL" --device cuda --layer 12 $DATA --context-size 1024 \
      --batch-size 32 --workers $workers 2>&1 | grep -E "^\||machine|tokens,|rror"
done

echo "== fit and evaluate on CUDA, from the store the harvest benchmark left (or a fresh 1M-token one)"
STORE=$WORK/eval-store
$PY -m stages harvest --model "$MODEL" --device cuda --layer 12 $DATA --context-size 1024 --batch-size 32 \
    --tokens 1048576 --store "$STORE" 2>&1 | grep -E "wrote|rror"
$PY -m stages harvest --model "$MODEL" --device cuda --layer 12 $DATA --context-size 1024 --batch-size 32 \
    --tokens 65536 --part heldout --store "$STORE-heldout" 2>&1 | grep -E "wrote|rror"
for arch in "--arch jumprelu --target-l0 60" "--arch topk --k 60"; do
  rm -rf "$WORK/sae"
  $PY -m stages fit --store "$STORE" --out "$WORK/sae" $arch --width 16384 --batch-size 4096 --tokens 2097152 \
      --device cuda 2>&1 | grep -E "saved|rror"
done
$PY -m stages evaluate --sae "$WORK/sae" --store "$STORE-heldout" --device cuda --delta-tokens 65536 \
    --lm-batch-tokens 8192 --reports "$WORK/reports" 2>&1 | grep -E "tokens measured|FVU|delta loss|recovered|rror"
$PY - "$WORK/reports" <<'PY'
import json, pathlib, sys
r = json.loads(sorted(pathlib.Path(sys.argv[1]).glob("*.json"))[-1].read_text())["timing"]
print(f"evaluate on {r['device']}: reconstruction {r['reconstruction_tokens_per_s']:,.0f} tok/s, "
      f"delta loss {r['delta_loss_tokens_per_s']:,.0f} tok/s (three passes)")
PY

echo "== the fit step on CUDA against a bare step (width 16k and 64k, batch 4096, TF32), and the loader on CUDA"
for w in 16384 65536; do
  $PY benchmarks/fit.py --store "$STORE" --device cuda --width $w --batch-size 4096 --steps 50 2>&1 \
      | grep -E "^\||machine|rror"
done
$PY benchmarks/loader.py --store "$STORE" --device cuda --fit-steps 200 2>&1 | grep -E "^\||machine|raw read|rror"

echo "== a sweep of 4 SAEs at width 16k against 4 separate fits on CUDA (the data path paid once)"
$PY benchmarks/sweep.py --store "$STORE" --width 16384 --n 4 --steps 300 --batch-size 4096 --repeat 2 2>&1 \
    | grep -E "TopK SAEs|gsp fit|sweep /|data path|rror"

echo "== the main job's SAE on CUDA with --matmul tf32 (the default there) and fp32: held-out FVU"
MAIN=$WORK/main-train; HELD=$WORK/main-heldout
$PY -m stages harvest --model "$MODEL" --device cuda --store "$MAIN" 2>&1 | grep -E "wrote|rror"
$PY -m stages harvest --model "$MODEL" --device cuda --part heldout --tokens 32768 --store "$HELD" 2>&1 | grep -E "wrote|rror"
for mm in tf32 fp32; do
  rm -rf "$WORK/main-$mm"
  $PY -m stages fit --store "$MAIN" --out "$WORK/main-$mm" --target-l0 60 --device cuda --matmul $mm 2>&1 \
      | grep -E "saved|rror"
  $PY -m stages evaluate --sae "$WORK/main-$mm" --store "$HELD" --device cuda --no-delta-loss \
      --reports "$WORK/reports-$mm" 2>&1 | grep -E "FVU|L0|rror"
done
