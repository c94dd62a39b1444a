#!/usr/bin/env bash
# The first thing to run on a GPU node, in about 8 minutes on one H100 or H200:
#   1. the versions and the device;
#   2. the recipe's models (convnext_base, maxvit_base_tf_224 at 224) in the stages' step on this GPU: fp32 and
#      bf16, NCHW and channels_last, batch 32 and the largest that fits, eager and torch.compile
#      (benchmarks/benchmark_train.py --recipe), each model in its own time (CONVNEXT_SECONDS, MAXVIT_SECONDS);
#   3. run_all.sh as a user runs it, on generated photos with the recipe's models from scratch, 2 epochs each: it
#      picks the GPUs and the mixed precision itself; img/s and the data wait per epoch from each summary.csv;
#   4. stage 1 again with --compile (channels_last), set against part 3's eager stage 1;
#   5. the training loader from the face cache with the workers this node gives one process, and per core.
# Each part writes its output under OUT (default gpu_check_output/) as it goes, so a cut-short run keeps the
# parts it finished.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... for another interpreter, OUT=... for another folder
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check_output}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
started=$SECONDS

echo "== 1. versions and device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
"$PYTHON" -c 'import torch, timm, accelerate
print(f"torch {torch.__version__}, timm {timm.__version__}, accelerate {accelerate.__version__}, "
      f"cuda {torch.version.cuda}, {torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"}")' \
  2>&1 | tee -a "$OUT/device.txt"
nproc | sed 's/^/cores: /' | tee -a "$OUT/device.txt"

echo "== 2. the recipe's step on this device"
timeout "${CONVNEXT_SECONDS:-110}" "$PYTHON" benchmarks/benchmark_train.py --recipe --recipe_models convnext_base \
  --recipe_max_batch 512 2>&1 | tee "$OUT/recipe_table.md"
timeout "${MAXVIT_SECONDS:-150}" "$PYTHON" benchmarks/benchmark_train.py --recipe --recipe_models maxvit_base_tf_224 \
  --recipe_max_batch 256 2>&1 | tail -n +3 | tee -a "$OUT/recipe_table.md"
echo "(parts 1-2: $((SECONDS - started)) s)"

summary() {  # summary.csv of an experiment's stage: img/s and data wait per epoch
  [[ -f $1/logs/$2/summary.csv ]] && "$PYTHON" - "$1/logs/$2/summary.csv" <<'PY'
import csv, sys
for row in csv.DictReader(open(sys.argv[1])):
    print(f"   epoch {row['epoch']}: {float(row['images_per_second']):.0f} img/s, data wait {float(row['data_wait_share']):.0%}")
PY
}

echo "== 3. run_all.sh on generated photos (recipe models from scratch, 2 epochs each)"
"$PYTHON" tools/make_demo.py "$OUT/data" --subjects 100 >/dev/null
common="--no-pretrained --num_epochs 2 --batch_size 64"
PYTHON="$PYTHON" timeout 150 bash run_all.sh --data_root "$OUT/data" --output_dir "$OUT/exp" \
  --stage1_args "--model_name convnext_base --channels_last $common" --stage2_args "--model_name maxvit_base_tf_224 $common" \
  >"$OUT/run_all.log" 2>&1 || { echo "run_all.sh failed:"; tail -n 20 "$OUT/run_all.log"; }
{ head -n 3 "$OUT/run_all.log"; grep -h "mixed precision" "$OUT"/exp/logs/stage*/stage*_training_*.log | head -n 2
  for stage in stage1 stage2; do echo "-- $stage"; summary "$OUT/exp" $stage; done; } 2>&1 | tee "$OUT/run_all.txt"
echo "(parts 1-3: $((SECONDS - started)) s)"

echo "== 4. stage 1 with --compile"
PYTHON="$PYTHON" timeout 120 bash run_all.sh --data_root "$OUT/data" --output_dir "$OUT/exp_compile" --stage1_only \
  --stage1_args "--model_name convnext_base --channels_last --compile $common" >"$OUT/compile.log" 2>&1 \
  || { echo "stage 1 --compile failed:"; tail -n 20 "$OUT/compile.log"; }
{ grep -h "torch.compile:" "$OUT"/exp_compile/logs/stage1/*.log; summary "$OUT/exp_compile" stage1; } 2>&1 \
  | tee "$OUT/compile.txt"
echo "(parts 1-4: $((SECONDS - started)) s)"

echo "== 5. the data path"
timeout 25 "$PYTHON" benchmarks/benchmark_loader.py --node 1 --n 1000 2>&1 | tee "$OUT/loader.txt"
timeout 15 "$PYTHON" benchmarks/benchmark_loader.py --n 100 2>&1 | tee -a "$OUT/loader.txt"
echo "(all: $((SECONDS - started)) s)"
