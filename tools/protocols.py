"""The field's cross-dataset protocols in one command. ocim: the leave-one-out table of OULU-NPU (O), CASIA-FASD
(C), Idiap Replay-Attack (I) and MSU-MFSD (M): trained on three, tested on the fourth, for each of the four and
each seed.

    python tools/protocols.py ocim --oulu_npu DIR --casia_fasd DIR --replay_attack DIR --msu_mfsd DIR \
        [--seeds 3] [--out OCIM] [--frames_per_video 10] [--config_stage1 F] [--config_stage2 F] \
        [--stage1_args "..."] [--stage2_args "..."]

It samples each dataset's frames once (OUT/frames/<dataset>, tools/data.py frames), then for each target and
seed trains as run_all.sh does (both stages, on the three other datasets' frames and their official splits,
OUT/<target>/seed<k>) and scores the target's official test split (tools/predict.py --evaluate). Each cell resumes
where it stopped; a cell whose metrics exist is kept. It writes OUT/ocim_table.md and ocim_results.json: HTER %,
AUC % and TPR at FPR = 1 % for each target, video level (a video's score is the mean of its frames'), as
mean +- std over the seeds.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from errors import UserError, run_cli  # noqa: E402
from output_files import write_json, write_text  # noqa: E402
from tools import data  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OCIM = {"oulu_npu": "O", "casia_fasd": "C", "replay_attack": "I", "msu_mfsd": "M"}
COLUMNS = {"hter": "HTER (%)", "auc": "AUC (%)", "tpr_at_fpr_1%": "TPR@FPR=1% (%)"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol", choices=("ocim",), help="the cross-dataset protocol")
    for name in OCIM:
        parser.add_argument(f"--{name}", required=True, metavar="DIR", help=f"{name} in its own layout")
    parser.add_argument("--out", default="ocim", help="where the frames, the runs and the table go (default: ocim)")
    parser.add_argument("--seeds", type=int, default=3, help="runs per target, seeds 0 .. N-1 (default: 3)")
    parser.add_argument("--frames_per_video", type=int, default=10, help="frames sampled per video (default: 10)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes sampling frames")
    parser.add_argument("--config_stage1", help="as for run_all.sh (default: the recipe's)")
    parser.add_argument("--config_stage2", help="as for run_all.sh (default: the recipe's)")
    parser.add_argument("--stage1_args", default="", help="extra flags for train_stage1.py, as for run_all.sh")
    parser.add_argument("--stage2_args", default="", help="extra flags for train_stage2.py, as for run_all.sh")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: give 1 or more")
    return args


def run_cell(args, *, target, seed, frames):
    """One training on the three datasets other than target, and its score on target's test split; the metrics."""
    exp = Path(args.out) / target / f"seed{seed}"
    metrics_path = exp / "cross_dataset" / f"{target}_metrics.json"
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    sources = ",".join(f"frames:{frames[name]}" for name in OCIM if name != target)
    command = ["bash", str(REPO / "run_all.sh"), "--data_root", sources, "--output_dir", str(exp), "--resume"]
    for flag in ("config_stage1", "config_stage2"):
        if getattr(args, flag):
            command += [f"--{flag}", getattr(args, flag)]
    command += [
        "--stage1_args",
        f"{args.stage1_args} --seed {seed}",
        "--stage2_args",
        f"{args.stage2_args} --seed {seed}",
    ]
    print(f"=== {target} <- {' & '.join(OCIM[n] for n in OCIM if n != target)}, seed {seed}: {shlex.join(command)}")
    if subprocess.run(command).returncode != 0:
        raise UserError(f"the training of {exp} failed (its log is in {exp / 'logs'}); rerun to resume it")
    evaluate = [sys.executable, str(REPO / "tools" / "predict.py"), "--output_dir", str(exp)]
    evaluate += ["--evaluate", f"frames:{frames[target]}"]
    if subprocess.run(evaluate).returncode != 0:
        raise UserError(f"scoring {target} with {exp} failed; rerun to resume")
    return json.loads(metrics_path.read_text())


def table_lines(results):
    """The leave-one-out table: a row per target, mean +- std over the seeds, in %."""
    lines = [
        "| protocol | " + " | ".join(COLUMNS.values()) + " | seeds |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for target, runs in results.items():
        trained = "&".join(OCIM[name] for name in OCIM if name != target)
        level = "video" if all("video" in run for run in runs) else "frame"
        cells = []
        for key in COLUMNS:
            values = 100 * np.array([run[level][key] for run in runs])
            cells.append(f"{values.mean():.2f} ± {values.std():.2f}")
        lines.append(f"| {trained} to {OCIM[target]} | " + " | ".join(cells) + f" | {len(runs)} |")
    return lines


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    frames = {}
    for name in OCIM:
        frames[name] = out / "frames" / name
        data.sample_frames(
            f"{name}:{getattr(args, name)}",
            frames[name],
            frames_per_video=args.frames_per_video,
            workers=args.workers,
        )
    results = {}
    for target in OCIM:
        results[target] = [run_cell(args, target=target, seed=seed, frames=frames) for seed in range(args.seeds)]
    lines = [
        "# OCIM leave-one-out",
        "",
        "Trained on three datasets, tested on the official test split of the fourth, at the threshold fitted on the "
        "training data's val; video level (a video's score is the mean of its frames'); mean ± std over the seeds.",
        "",
        *table_lines(results),
    ]
    write_text(out / "ocim_table.md", "\n".join(lines) + "\n")
    write_json(out / "ocim_results.json", results)
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    run_cli(main)
