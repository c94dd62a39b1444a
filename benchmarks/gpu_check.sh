#!/usr/bin/env bash
# The first thing to run on a GPU node, in about 8 minutes on one H100 or H200:
#   1. the versions and the device;
#   2. the recipe's models (convnext_base, maxvit_base_tf_224 at 224) in the stages' step on this GPU: fp32 and
#      bf16, NCHW and channels_last, batch 32 and the largest that fits, eager and torch.compile
#      (benchmarks/benchmark_train.py --recipe);
#   3. both stages end to end on generated photos with the recipe's models from scratch, 2 epochs each, in bf16
#      and in fp32, with img/s and the data wait per epoch from their summary.csv;
#   4. the data path per core (benchmarks/benchmark_loader.py).
# Each part writes its output under OUT (default gpu_check_output/) as it goes, so a cut-short run keeps the
# parts it finished; part 2 stops after TABLE_SECONDS (default 300; compiling MaxViT takes minutes).
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... for another interpreter, OUT=... for another folder
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check_output}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

echo "== 1. versions and device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
"$PYTHON" -c 'import torch, timm, accelerate
print(f"torch {torch.__version__}, timm {timm.__version__}, accelerate {accelerate.__version__}, "
      f"cuda {torch.version.cuda}, {torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"}")' \
  2>&1 | tee -a "$OUT/device.txt"
nproc | sed 's/^/cores: /' | tee -a "$OUT/device.txt"

echo "== 2. the recipe's step on this device"
timeout "${TABLE_SECONDS:-300}" "$PYTHON" benchmarks/benchmark_train.py --recipe 2>&1 | tee "$OUT/recipe_table.md"

echo "== 3. both stages end to end on generated photos (recipe models from scratch)"
"$PYTHON" tools/make_demo.py "$OUT/data" --subjects 150 >/dev/null
for precision in bf16 no; do
  exp="$OUT/exp_$precision"
  launch=("$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision "$precision"
          --dynamo_backend no)
  common=(--no-pretrained --num_epochs 2 --batch_size 64 --checkpointing_steps 10 --output_dir "$exp")
  "${launch[@]}" train_stage1.py --data_root "$OUT/data" --model_name convnext_base "${common[@]}" \
    >"$OUT/stage1_$precision.log" 2>&1 || { echo "stage 1 ($precision) failed:"; tail -n 20 "$OUT/stage1_$precision.log"; }
  "${launch[@]}" train_stage2.py --model_name maxvit_base_tf_224 "${common[@]}" \
    >"$OUT/stage2_$precision.log" 2>&1 || { echo "stage 2 ($precision) failed:"; tail -n 20 "$OUT/stage2_$precision.log"; }
  for stage in stage1 stage2; do
    echo "-- $stage, mixed precision $precision: epoch, img/s, data wait share"
    [[ -f $exp/logs/$stage/summary.csv ]] && "$PYTHON" - "$exp/logs/$stage/summary.csv" <<'EOF'
import csv, sys
for row in csv.DictReader(open(sys.argv[1])):
    print(f"   epoch {row['epoch']}: {float(row['images_per_second']):.0f} img/s, data wait {float(row['data_wait_share']):.0%}")
EOF
  done
done 2>&1 | tee "$OUT/stages.txt"

echo "== 4. the data path per core"
"$PYTHON" benchmarks/benchmark_loader.py --n 100 2>&1 | tee "$OUT/loader.txt"
