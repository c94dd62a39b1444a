#!/usr/bin/env bash
# One command from data to results: stage 1 (ConvNeXt teacher + soft labels), then stage 2 (MaxViT student).
#
#   bash run_all.sh                                   # the demo: generated data, small models, any device
#   bash run_all.sh --data_root /path/to/WFAS [--output_dir EXP]     # the real recipe
#
# Each stage runs under `accelerate launch`, so your accelerate config (GPUs, nodes, mixed precision)
# applies; ACCELERATE_ARGS adds launcher flags, e.g. ACCELERATE_ARGS="--num_processes 8 --mixed_precision bf16".
# Without a GPU, an accelerate config and ACCELERATE_ARGS, there is nothing to launch: plain python runs them.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"

usage() {
  cat <<'EOF'
usage: bash run_all.sh [--data_root DIR] [--output_dir EXP] [--stage1_only | --stage2_only] [--resume] [--download_only]
                       [--soft_labels_path P] [--stage1_args "..."] [--stage2_args "..."]
                       [--config_stage1 F.json] [--config_stage2 F.json]

With no --data_root it runs the demo: generated data (demo_data/), small models, results in demo_output/.
With --data_root it runs the recipe: convnext_base 50 epochs, then maxvit_base_tf_224 30 epochs, pretrained.
  --output_dir EXP          experiment folder (default: experiments/wfas, or demo_output for the demo);
                            it wins over an output_dir in the config files
  --stage1_only             train the teacher and write soft labels, then stop
  --stage2_only             train the student on an existing EXP (split.csv and soft labels)
  --resume                  go on from where an earlier run of this command stopped (preempted, killed):
                            a finished stage 1 is kept, an unfinished stage resumes from its latest state,
                            and with no state yet it starts fresh, so a requeued job can always pass it
  --soft_labels_path P      soft labels for stage 2 (default: EXP/stage1_soft_labels.pth)
  --download_only           fetch both stages' pretrained weights into their caches (EXP/model/...) with
                            tools/models.py and say where they are; run it on a login node with internet, then
                            train on the compute nodes
  --stage1_args "..."       flags appended to stage 1's command (they win over the defaults)
  --stage2_args "..."       flags appended to stage 2's command
  --config_stage1 F.json    a JSON config for stage 1 (see train_stage1.py --help)
  --config_stage2 F.json    a JSON config for stage 2
Environment: ACCELERATE_ARGS (launcher flags), PYTHON (default: python), DEMO_SUBJECTS (demo size, default 150).
Started on every node of a multi-node job, only the main node writes experiment_info.json; the node rank is
--machine_rank in ACCELERATE_ARGS, else MACHINE_RANK, NODE_RANK or SLURM_NODEID, else 0.
EOF
}

fail() { echo "run_all.sh: $*" >&2; exit 2; }

DATA_ROOT="" OUTPUT_DIR="" STAGE1_ONLY=0 STAGE2_ONLY=0 RESUME=0 DOWNLOAD_ONLY=0 SOFT_LABELS="" STAGE1_ARGS="" STAGE2_ARGS=""
CONFIG1="" CONFIG2=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --resume) RESUME=1; shift; continue ;;
    --download_only) DOWNLOAD_ONLY=1; shift; continue ;;
    --stage1_only) STAGE1_ONLY=1; shift; continue ;;
    --stage2_only) STAGE2_ONLY=1; shift; continue ;;
    --data_root|--output_dir|--soft_labels_path|--stage1_args|--stage2_args|--config_stage1|--config_stage2)
      [[ $# -ge 2 ]] || fail "$1 needs a value (see --help)" ;;
    *) fail "unknown option '$1' (see bash run_all.sh --help)" ;;
  esac
  case "$1" in
    --data_root) DATA_ROOT="$2" ;;
    --output_dir) OUTPUT_DIR="$2" ;;
    --soft_labels_path) SOFT_LABELS="$2" ;;
    --stage1_args) STAGE1_ARGS="$2" ;;
    --stage2_args) STAGE2_ARGS="$2" ;;
    --config_stage1) CONFIG1="$2" ;;
    --config_stage2) CONFIG2="$2" ;;
  esac
  shift 2
done
[[ $STAGE1_ONLY == 1 && $STAGE2_ONLY == 1 ]] && fail "--stage1_only and --stage2_only exclude each other"
[[ -n $SOFT_LABELS && $STAGE1_ONLY == 1 ]] && fail "--soft_labels_path is for stage 2; it makes no sense with --stage1_only"
for config in "$CONFIG1" "$CONFIG2"; do
  [[ -z $config || -f $config ]] || fail "config file $config does not exist"
done

STAGE1=() STAGE2=()
if [[ $DOWNLOAD_ONLY == 1 ]]; then
  OUTPUT_DIR="${OUTPUT_DIR:-experiments/wfas}"
  for n in 1 2; do
    config_var="CONFIG$n" args_var="STAGE${n}_ARGS"
    config=() && [[ -n ${!config_var} ]] && config=(--config "${!config_var}")
    # shellcheck disable=SC2206  # word splitting of the user's extra flags is intended
    extra=(${!args_var})
    echo "=== Stage $n: fetching the pretrained weights ==="
    "$PYTHON" "$HERE/tools/models.py" download --stage "$n" "${config[@]}" --output_dir "$OUTPUT_DIR" "${extra[@]}"
  done
  echo "Weights cached under $OUTPUT_DIR/model/; runs with --output_dir $OUTPUT_DIR (or the same --model_cache_dir) reuse them offline"
  exit 0
fi
# torch's version (its build too: +cu130, +cpu), the GPUs' mixed precision (bf16 from Ampere on, else fp16 with
# loss scaling; empty without a GPU), then the GPUs' names, a line each, for experiment_info.json; no GPU: the
# launch below can be plain python. Read in the background: importing torch takes seconds, which the demo
# data's generation, on one core, hides.
GPU_CHECK_FILE="$(mktemp)" GPU_CHECK_ERRORS="$(mktemp)"
trap 'rm -f "$GPU_CHECK_FILE" "$GPU_CHECK_ERRORS"' EXIT
"$PYTHON" -c 'import torch
print(torch.__version__)
gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
print("bf16" if gpus and torch.cuda.is_bf16_supported() else "fp16" if gpus else "")
for i in range(gpus): print(torch.cuda.get_device_name(i))' \
  > "$GPU_CHECK_FILE" 2> "$GPU_CHECK_ERRORS" &
GPU_CHECK_PID=$!
if [[ -z $DATA_ROOT && -z $CONFIG1 && -z $CONFIG2 ]]; then
  DEMO=1
  DATA_ROOT="demo_data"
  OUTPUT_DIR="${OUTPUT_DIR:-demo_output}"
  echo "=== DEMO: a small run on GENERATED data (not real faces), to check the pipeline end to end ==="
  echo "=== For WFAS: bash run_all.sh --data_root /path/to/WFAS                                     ==="
  if [[ ! -d $DATA_ROOT/Train ]]; then
    "$PYTHON" "$HERE/tools/make_demo.py" "$DATA_ROOT" --subjects "${DEMO_SUBJECTS:-150}"
  fi
  # configs/demo_stage*.json: small models from scratch at 64 px. A ConvNeXt trained from scratch needs far more
  # epochs than a CPU demo has; ResNet-18 learns the demo's cues in a few. The real recipe's teacher is
  # convnext_base, pretrained (configs/stage1_recipe.json).
  STAGE1=(--config "$HERE/configs/demo_stage1.json")
  STAGE2=(--config "$HERE/configs/demo_stage2.json")
else
  DEMO=0
  OUTPUT_DIR="${OUTPUT_DIR:-experiments/wfas}"
fi
[[ -n $DATA_ROOT ]] && STAGE1+=(--data_root "$DATA_ROOT") && STAGE2+=(--data_root "$DATA_ROOT")
STAGE1+=(--output_dir "$OUTPUT_DIR")
STAGE2+=(--output_dir "$OUTPUT_DIR")
[[ -n $CONFIG1 ]] && STAGE1=(--config "$CONFIG1" "${STAGE1[@]}")
[[ -n $CONFIG2 ]] && STAGE2=(--config "$CONFIG2" "${STAGE2[@]}")
[[ -n $SOFT_LABELS ]] && STAGE2+=(--soft_labels_path "$SOFT_LABELS")
if [[ $RESUME == 1 ]]; then
  STAGE1+=(--resume_from_checkpoint latest)
  STAGE2+=(--resume_from_checkpoint latest)
fi
# the challenge lists shipped next to Train/ are scored into EXP/submission.txt after stage 2 (tools/predict.py)
LISTS=()
ROOT="${DATA_ROOT%/}"; [[ $(basename "$ROOT") == Train ]] && ROOT="$(dirname "$ROOT")"
for name in Dev Test; do
  [[ -n $ROOT && -f $ROOT/$name/$name.txt ]] && LISTS+=("$ROOT/$name/$name.txt")
done
# shellcheck disable=SC2206  # word splitting of the user's extra flags is intended
STAGE1+=($STAGE1_ARGS)
# shellcheck disable=SC2206
STAGE2+=($STAGE2_ARGS)

mkdir -p "$OUTPUT_DIR"
START_TIME="$(date -Iseconds)"
COMMAND_LINE="bash run_all.sh $*"
STATUS1="skipped" STATUS2="skipped" SECONDS1="" SECONDS2=""

node_rank() {  # which node this is, when the job starts this script on every node (SLURM's usual way)
  if [[ " ${ACCELERATE_ARGS:-} " =~ [[:space:]]--machine_rank[=[:space:]]+([0-9]+) ]]; then
    echo "${BASH_REMATCH[1]}"
  else
    echo "${MACHINE_RANK:-${NODE_RANK:-${SLURM_NODEID:-0}}}"
  fi
}
NODE_RANK_HERE="$(node_rank)"

write_experiment_info() {  # on the main node only: the experiment folder is shared by all nodes
  [[ $NODE_RANK_HERE == 0 ]] || return 0
  "$PYTHON" - "$OUTPUT_DIR" "$START_TIME" "$COMMAND_LINE" "$STATUS1" "$SECONDS1" "$STATUS2" "$SECONDS2" "$HERE" \
    "$TORCH_AND_GPUS" <<'EOF'
import json, os, platform, subprocess, sys, datetime
from importlib.metadata import version  # timm's and accelerate's, without the seconds their imports take
out, start, command, status1, seconds1, status2, seconds2, here, torch_and_gpus = sys.argv[1:]
sys.path.insert(0, here)
from output_files import write_json  # standard library only: no torch import here
torch_version, *gpus = torch_and_gpus.splitlines()
def results(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else {}
def stage(status, seconds, result):
    return {"exit_status": status, "wall_time_s": float(seconds) if seconds else None,
            "images_per_second": result.get("images_per_second")}
commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
s1 = results("stage1_results.json")
s2 = results("final_results.json")
info = {
    "start_time": start, "end_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "command_line": command, "git_commit": commit or None,
    "versions": {"python": platform.python_version(), "torch": torch_version, "timm": version("timm"),
                 "accelerate": version("accelerate")},
    "devices": gpus or [platform.processor() or "cpu"],
    "num_processes": s2.get("num_processes", s1.get("num_processes")),
    "mixed_precision": s2.get("mixed_precision", s1.get("mixed_precision")),
    "accelerate_args": os.environ.get("ACCELERATE_ARGS", ""),
    "stage1": stage(status1, seconds1, s1), "stage2": stage(status2, seconds2, s2),
}
write_json(os.path.join(out, "experiment_info.json"), info)
EOF
}

run_stage() {  # run_stage N script args...: launch one stage (or tool), stop everything if it fails
  local n="$1" script="$2"; shift 2
  local began=$SECONDS status=0
  echo "=== Stage $n: ${LAUNCH[*]} ${ACCELERATE_ARGS:+$ACCELERATE_ARGS }$script $* ==="
  # shellcheck disable=SC2086  # ACCELERATE_ARGS holds several launcher flags
  "${LAUNCH[@]}" ${ACCELERATE_ARGS:-} "$HERE/$script" "$@" || status=$?
  printf -v "SECONDS$n" "%s" "$((SECONDS - began))"
  if [[ $status -ne 0 ]]; then
    printf -v "STATUS$n" "%s" "failed ($status)"
    write_experiment_info || true
    if [[ $status -eq 143 || $status -eq 138 ]]; then  # 128 + SIGTERM / SIGUSR1: stopped with its state saved
      echo "run_all.sh: stage $n was stopped by a signal and saved its state; run the same command with --resume to go on" >&2
    else
      echo "run_all.sh: stage $n failed (exit $status); its log is the newest $OUTPUT_DIR/logs/stage$n/stage${n}_training_*.log" >&2
    fi
    exit "$status"
  fi
  printf -v "STATUS$n" "%s" "ok"
}

command -v accelerate >/dev/null || fail "accelerate is not installed: pip install -r requirements.txt"
LAUNCH=(accelerate launch)
HF_HOME_DIR="${HF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/huggingface}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG_FILE:-$HF_HOME_DIR/accelerate/default_config.yaml}"  # where accelerate looks
# its traceback's last line only ("No module named 'torch'", a CUDA library missing...): one line for a user error
wait "$GPU_CHECK_PID" \
  || fail "$PYTHON cannot import torch ($(tail -n 1 "$GPU_CHECK_ERRORS")): pip install -r requirements.txt"
cat "$GPU_CHECK_ERRORS" >&2  # torch's warnings, if any (an NVIDIA driver too old for this build...)
TORCH_VERSION="$(sed -n 1p "$GPU_CHECK_FILE")"
GPU_PRECISION="$(sed -n 2p "$GPU_CHECK_FILE")"
GPUS="$(tail -n +3 "$GPU_CHECK_FILE")"
TORCH_AND_GPUS="$(printf '%s\n%s' "$TORCH_VERSION" "$GPUS")"
if [[ -n $GPUS ]]; then
  NUM_GPUS="$(wc -l <<< "$GPUS")"
  if [[ -n ${ACCELERATE_ARGS:-} || -f $ACCELERATE_CONFIG ]]; then
    echo "=== $NUM_GPUS GPU(s): launched as ACCELERATE_ARGS and the accelerate config say (${ACCELERATE_ARGS:-$ACCELERATE_CONFIG}) ==="
  else
    # accelerate's own defaults would train in fp32, about half the speed of bf16 on these models (docs/performance.md)
    ACCELERATE_ARGS="--num_processes $NUM_GPUS --mixed_precision $GPU_PRECISION --num_machines 1 --dynamo_backend no"
    [[ $NUM_GPUS -gt 1 ]] && ACCELERATE_ARGS="--multi_gpu $ACCELERATE_ARGS"
    echo "=== $NUM_GPUS GPU(s) ($(head -n 1 <<< "$GPUS")): every GPU, mixed precision $GPU_PRECISION; set ACCELERATE_ARGS or an accelerate config to choose otherwise ==="
  fi
else
  if [[ -z ${ACCELERATE_ARGS:-} && ! -f $ACCELERATE_CONFIG ]]; then
    # one process on the CPU and no accelerate config: all that accelerate launch would set up is the thread count,
    # and its own start costs 6 s a call here, so the stages run under plain python, on all the cores
    LAUNCH=(env "OMP_NUM_THREADS=$(nproc)" "$PYTHON")
  elif [[ " ${ACCELERATE_ARGS:-} " != *" --num_cpu_threads_per_process"* && " ${ACCELERATE_ARGS:-} " != *" --num_processes"* ]]; then
    # accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise: on a machine without a GPU, one process would
    # then train on one core (measured here: resnet18 at 43 img/s instead of 74 on 2 cores)
    ACCELERATE_ARGS="${ACCELERATE_ARGS:-} --num_cpu_threads_per_process $(nproc)"
  fi
fi
if [[ $RESUME == 1 && $STAGE2_ONLY == 0 && -f $OUTPUT_DIR/stage1_results.json ]]; then
  echo "=== Stage 1 finished earlier ($OUTPUT_DIR/stage1_results.json): kept (--resume) ==="
  STAGE2_ONLY=1 STATUS1="ok (earlier run)"
fi
[[ $STAGE2_ONLY == 1 ]] || run_stage 1 train_stage1.py "${STAGE1[@]}"
if [[ $STAGE1_ONLY == 0 ]]; then
  run_stage 2 train_stage2.py "${STAGE2[@]}"
fi
# the report reads neither the submission nor experiment_info.json: drawn meanwhile, on a core of its own
"$PYTHON" "$HERE/tools/report.py" "$OUTPUT_DIR" >/dev/null &
REPORT_PID=$!
if [[ $STAGE1_ONLY == 0 && ${#LISTS[@]} -gt 0 ]]; then
  echo "=== Submission: tools/predict.py on ${LISTS[*]} ==="
  # shellcheck disable=SC2086
  "${LAUNCH[@]}" ${ACCELERATE_ARGS:-} "$HERE/tools/predict.py" --output_dir "$OUTPUT_DIR" --predict_lists "${LISTS[@]}" \
    || fail "the submission failed; rerun: python tools/predict.py --output_dir $OUTPUT_DIR --predict_lists ${LISTS[*]}"
fi
write_experiment_info
wait "$REPORT_PID" || echo "run_all.sh: tools/report.py $OUTPUT_DIR failed" >&2

"$PYTHON" - "$OUTPUT_DIR" "$DEMO" <<'EOF'
import json, os, sys
out, demo = sys.argv[1], sys.argv[2] == "1"
print("\n=== Results" + (" of the DEMO on generated data" if demo else "") + " ===")
final = os.path.join(out, "final_results.json")
if os.path.exists(final):
    r = json.load(open(final))
    print(f"test ACC {r['test_acc']:.4f}  ACER {r['test_acer']:.4f}  APCER {r['test_apcer']:.4f}  "
          f"BPCER {r['test_bpcer']:.4f}  AUC {r['test_auc']:.4f}  on {r['num_test_images']} images, "
          f"at the val threshold {r['threshold']:.4f}")
    if r.get("teacher_test_acer") is not None:
        print(f"stage 1 teacher test ACER {r['teacher_test_acer']:.4f}")
    if r.get("compute"):
        print(f"student compute: {r['compute']['challenge_limit']}")
elif os.path.exists(os.path.join(out, "stage1_results.json")):
    r = json.load(open(os.path.join(out, "stage1_results.json")))["test"]
    print(f"stage 1 teacher: test ACC {r['acc']:.4f}  ACER {r['acer']:.4f}  AUC {r['auc']:.4f}")
if os.path.exists(os.path.join(out, "report.md")):
    print(f"\nReport (metrics, plots, configuration, data): {os.path.join(out, 'report.md')}")
print(f"\nOutputs in {out}/:")
for name, what in [("final_results.json", "final test metrics"), ("stage1_results.json", "teacher metrics"),
                   ("stage1_soft_labels.pth", "soft labels {path: [prob_spoof, prob_live]}"),
                   ("stage2_test_predictions.csv", "per-image test scores"), ("split.csv", "the split"),
                   ("submission.txt", "challenge submission (and submission.zip)"),
                   ("checkpoints", "stage1_best / stage2_best weights and resumable states"),
                   ("logs", "training logs"), ("experiment_info.json", "versions, devices, timings")]:
    if os.path.exists(os.path.join(out, name)):
        print(f"  {name:<28} {what}")
if os.path.exists(final):
    print(f"\nTo deploy: python tools/export_onnx.py --output_dir {out}   (ONNX, checked with onnxruntime)\n"
          f"           python tools/predict.py --output_dir {out} --predict_folder DIR   (any images)\n"
          f"Thresholds for BPCER or APCER targets: operating points in the report")
EOF
