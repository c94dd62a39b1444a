"""The recipe's options measured on one dataset: out-of-fold soft labels against in-fold ones and no
distillation, and the EMA of the weights against none, each over several seeds.

    python benchmarks/benchmark_recipe.py soft_labels [--folds 5] [--seeds 42 43 44] [--data_root DIR]
        [--output_dir OUT]
    python benchmarks/benchmark_recipe.py ema [--ema_decay 0.99] [--seeds 42 43 44] ...

soft_labels: stage 1 twice on one split (configs/demo_stage1.json): one teacher labelling its own training images
(in-fold), and --soft_label_folds K (out-of-fold). For each soft-label file, the share of labels within 0.01 of
one-hot; then stage 2 (configs/demo_stage2.json) per seed with the in-fold labels, the out-of-fold ones, and
--kd_weight 0, and its test ACER.
ema: stage 1 and stage 2 with and without --model_ema_decay, per seed (stage 2 on the in-fold soft labels of one
stage 1 run without EMA, so that only the student's EMA differs), and their test ACER.

Without --data_root it generates the demo data (tools/make_demo.py, 150 subjects) into OUT/data. Prints Markdown
tables with mean, min-max and every seed's value; all runs share one face cache.
"""

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_stage1  # noqa: E402
import train_stage2  # noqa: E402
from tools import make_demo  # noqa: E402
import errors  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAGE1_FILES = ("split.csv", "split_source.json", "stage1_config.json", "stage1_results.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("soft_labels", "ema"))
    parser.add_argument("--data_root", help="a WFAS folder (default: the demo, generated into OUT/data)")
    parser.add_argument("--output_dir", default="benchmark_recipe")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[42, 43, 44], help="stage 2's seeds (and stage 1's, for ema)"
    )
    parser.add_argument("--folds", type=int, default=5, help="K of the out-of-fold soft labels")
    parser.add_argument("--ema_decay", type=float, default=0.99, help="--model_ema_decay of the EMA runs")
    parser.add_argument("--stage1_config", default=str(REPO / "configs" / "demo_stage1.json"))
    parser.add_argument("--stage2_config", default=str(REPO / "configs" / "demo_stage2.json"))
    return parser.parse_args(argv)


def one_hot_share(path):
    """The share of soft labels within 0.01 of one-hot (their larger probability >= 0.99)."""
    probs = np.array(list(torch.load(path, weights_only=True).values()))
    return float((probs.max(1) >= 0.99).mean()), len(probs)


def test_acer(exp):
    """The test ACER of the last stage an experiment folder ran."""
    if (exp / "final_results.json").is_file():
        return json.loads((exp / "final_results.json").read_text())["test_acer"]
    return json.loads((exp / "stage1_results.json").read_text())["test"]["acer"]


def spread(values):
    return (
        f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f}; "
        + ", ".join(f"{v:.4f}" for v in values)
        + ")"
    )


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    data_root = Path(args.data_root) if args.data_root else out / "data"
    if not args.data_root and not (data_root / "Train").is_dir():
        make_demo.make_demo(data_root, subjects=150, seed=0)
    common = ["--data_root", str(data_root), "--face_cache_dir", str(out / "face_cache")]

    def stage1(name, *flags):
        exp = out / name
        if not (exp / "stage1_results.json").is_file():
            start = time.time()
            train_stage1.main(["--config", args.stage1_config, "--output_dir", str(exp), *common, *flags])
            print(f"stage 1 {name}: {time.time() - start:.0f} s", flush=True)
        return exp

    def stage2(stage1_exp, name, seed, *flags):
        exp = out / f"{name}_seed{seed}"
        if not (exp / "final_results.json").is_file():
            exp.mkdir(parents=True, exist_ok=True)
            for file in STAGE1_FILES:  # stage 1's split and records; the soft labels are read where they lie
                shutil.copy(stage1_exp / file, exp / file)
            start = time.time()
            results = train_stage2.main(
                [
                    "--config",
                    args.stage2_config,
                    "--output_dir",
                    str(exp),
                    *common,
                    "--soft_labels_path",
                    str(stage1_exp / "stage1_soft_labels.pth"),
                    "--seed",
                    str(seed),
                    *flags,
                ]
            )
            print(
                f"stage 2 {name} seed {seed}: test ACER {results['test_acer']:.4f} ({time.time() - start:.0f} s)",
                flush=True,
            )
        return test_acer(exp)

    rows = []
    if args.what == "soft_labels":
        in_fold = stage1("stage1_in_fold")
        out_of_fold = stage1(f"stage1_folds{args.folds}", "--soft_label_folds", str(args.folds))
        print("\n| soft labels | within 0.01 of one-hot |\n|---|---|")
        for name, exp in (("in-fold (one teacher)", in_fold), (f"out-of-fold (K = {args.folds})", out_of_fold)):
            share, count = one_hot_share(exp / "stage1_soft_labels.pth")
            print(f"| {name} | {share:.1%} of {count} |")
        conditions = [
            ("in-fold soft labels", in_fold, "in_fold", []),
            (f"out-of-fold soft labels (K = {args.folds})", out_of_fold, f"folds{args.folds}", []),
            ("--kd_weight 0", in_fold, "kd0", ["--kd_weight", "0"]),
        ]
        for label, stage1_exp, name, flags in conditions:
            rows.append((label, [stage2(stage1_exp, name, seed, *flags) for seed in args.seeds]))
    else:
        for label, flags in (
            ("stage 1, no EMA", []),
            (f"stage 1, EMA {args.ema_decay:g}", ["--model_ema_decay", str(args.ema_decay)]),
        ):
            runs = [
                stage1(f"stage1_{'ema' if flags else 'plain'}_seed{seed}", "--seed", str(seed), *flags)
                for seed in args.seeds
            ]
            rows.append((label, [test_acer(exp) for exp in runs]))
        teacher = stage1(f"stage1_plain_seed{args.seeds[0]}", "--seed", str(args.seeds[0]))
        for label, name, flags in (
            ("stage 2, no EMA", "plain", []),
            (f"stage 2, EMA {args.ema_decay:g}", "ema", ["--model_ema_decay", str(args.ema_decay)]),
        ):
            rows.append((label, [stage2(teacher, name, seed, *flags) for seed in args.seeds]))
    print(f"\n{args.what}: {data_root}, seeds {' '.join(map(str, args.seeds))}\n")
    print("| run | test ACER: mean (min-max; per seed) |\n|---|---|")
    for label, values in rows:
        print(f"| {label} | {spread(values)} |")


if __name__ == "__main__":
    errors.run_cli(main)
