"""Leave one attack type out: one stage-1 run per attack type, that type kept out of train (--unseen_attacks)
and split between val and test, and its test ACER beside that of the types the teacher trained on.

Every run has the same data, seed and settings (default: configs/demo_stage1.json) and the same split of live
and of the other types, so the rows differ only in the type held out. They share one face cache.

    python benchmarks/benchmark_unseen.py [--data_root DIR] [--output_dir OUT] [--seeds 42] [--types T ...]
        [-- extra stage-1 flags]

Without --data_root it generates the demo data (tools/make_demo.py, 150 subjects) into OUT/data.
Prints a Markdown table: per held-out type, the seen and unseen test APCER and ACER (ACER with the BPCER of all
live test images) and the pooled ACER, as mean (min-max) over the seeds.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_stage1  # noqa: E402
import wfas_data  # noqa: E402
from tools import make_demo  # noqa: E402
import errors  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", help="a WFAS folder (default: the demo, generated into OUT/data)")
    parser.add_argument("--output_dir", default="benchmark_unseen", help="one experiment folder per type and seed")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo_stage1.json"), help="stage 1's config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="one run per type and seed")
    parser.add_argument("--types", nargs="+", help="the attack types to hold out in turn (default: all)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags for train_stage1.py")
    return parser.parse_args(argv)


def spread(values):
    values = [v for v in values if v == v]  # NaN: the group had no image in that run's test
    if not values:
        return "n/a"
    return f"{statistics.mean(values):.4f}" + (f" ({min(values):.4f}-{max(values):.4f})" if len(values) > 1 else "")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    data_root = Path(args.data_root) if args.data_root else out / "data"
    if not args.data_root and not (data_root / "Train").is_dir():
        make_demo.make_demo(data_root, subjects=150, seed=0)
    attack_types = args.types or sorted(set(wfas_data.index_wfas(data_root).attack_types()) - {wfas_data.LIVE_TYPE})
    extra = [a for a in args.extra if a != "--"]
    rows = []
    for attack_type in attack_types:
        results = []
        for seed in args.seeds:
            exp = out / f"{attack_type}_seed{seed}"
            start = time.time()
            results.append(
                train_stage1.main(
                    [
                        "--config",
                        args.config,
                        "--data_root",
                        str(data_root),
                        "--output_dir",
                        str(exp),
                        "--seed",
                        str(seed),
                        "--unseen_attacks",
                        attack_type,
                        "--face_cache_dir",
                        str(out / "face_cache"),
                        *extra,
                    ]
                )["test"]
            )
            print(
                f"held out {attack_type}, seed {seed}: unseen ACER {results[-1]['unseen_acer']:.4f}, seen ACER "
                f"{results[-1]['seen_acer']:.4f} ({time.time() - start:.0f} s)",
                flush=True,
            )
        rows.append(
            (
                attack_type,
                {
                    k: [r[k] for r in results]
                    for k in ("seen_apcer", "seen_acer", "unseen_apcer", "unseen_acer", "acer", "num_images")
                },
            )
        )
    (out / "results.json").write_text(json.dumps(dict(rows), indent=1))
    print(
        f"\nLeave one type out, {data_root}, seeds {' '.join(map(str, args.seeds))}, {Path(args.config).name}"
        + (f" {' '.join(extra)}" if extra else "")
        + "\n"
    )
    print("| held out | seen APCER | seen ACER | unseen APCER | unseen ACER | pooled ACER |")
    print("|---|---|---|---|---|---|")
    for attack_type, values in rows:
        print(
            f"| {attack_type} | "
            + " | ".join(spread(values[k]) for k in ("seen_apcer", "seen_acer", "unseen_apcer", "unseen_acer", "acer"))
            + " |"
        )


if __name__ == "__main__":
    errors.run_cli(main)
