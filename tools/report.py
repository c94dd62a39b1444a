"""Redraw EXP/plots/ and EXP/report.md from an experiment folder's files alone (results, prediction CSVs,
summary.csv, split.csv, configs), e.g. after editing a plot in experiment_report.py. Each stage draws them when
it ends.

    python tools/report.py EXP [--force]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import experiment_report  # noqa: E402
from errors import UserError, run_cli  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", metavar="EXP", help="the experiment folder")
    parser.add_argument("--force", action="store_true", help="redraw every plot, even those newer than their inputs")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    if not any((output_dir / name).is_file() for name in experiment_report.RESULTS.values()):
        raise UserError(
            f"{output_dir} holds no {' or '.join(experiment_report.RESULTS.values())}: train a stage into it first "
            "(accelerate launch train_stage1.py --data_root WFAS --output_dir EXP)"
        )
    report = experiment_report.write_all(
        output_dir, log=lambda message: print(message, file=sys.stderr), force=args.force
    )
    plots = sorted((output_dir / "plots").glob("*.png")) if (output_dir / "plots").is_dir() else []
    print(f"Wrote {report} and {len(plots)} plots in {output_dir / 'plots'}")
    return report


if __name__ == "__main__":
    run_cli(main)
