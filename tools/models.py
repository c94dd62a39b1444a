"""Fill, list and clear the pretrained-weights cache of the training scripts,
EXP/model/<stage>/<model>/<model>.safetensors: fetched once (on a login node, say) and read by every later run,
so that offline compute nodes never download (networks.py builds the models from it).

    python tools/models.py list --output_dir EXP                          # cached models per stage, with sizes
    python tools/models.py download --output_dir EXP --stage 1            # stage 1's model (its flags apply)
    python tools/models.py download --output_dir EXP --stage 2 --config configs/stage2_recipe.json
    python tools/models.py download --output_dir EXP --stage 1 --model_name convnext_tiny --url file:///m/w.pth
    python tools/models.py clear --output_dir EXP --stage 2 [--model_name NAME]   # or --all

`download` takes the stage script's own flags (--config, --model_name, --model_cache_dir, ...), so it fetches
exactly what that stage's run will look for. --url fetches from a mirror (http(s):// or file://) instead of
the model's hub. The training scripts fetch into the cache themselves when it is empty.
"""

import argparse
import shutil
import sys
from pathlib import Path

import timm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import networks  # noqa: E402
import train_stage1  # noqa: E402
import train_stage2  # noqa: E402
import training_run  # noqa: E402
from errors import UserError, run_cli  # noqa: E402

STAGES = ("stage1", "stage2")


def cached_models(output_dir):
    """[(stage, model name, file, size in bytes)] of EXP/model/, sorted."""
    found = []
    for stage in STAGES:
        for path in sorted((Path(output_dir) / "model" / stage).glob("*/*.safetensors")):
            found.append((stage, path.parent.name, path, path.stat().st_size))
    return found


def stage_args(stage, argv):
    """The stage script's own settings for argv (its flags, --config included), without needing --data_root."""
    script = {"stage1": train_stage1, "stage2": train_stage2}[stage]
    args = training_run.parse_with_config(script.build_parser(), argv, stage)
    if not timm.is_model(args.model_name):
        raise UserError(f"--model_name {args.model_name} is not a timm model")
    return args


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the cached models of each stage, with their sizes")
    download = commands.add_parser(
        "download",
        help="fetch a stage's pretrained weights into its cache; any other "
        "flag is the stage script's (--config, --model_name, ...)",
    )
    download.add_argument("--stage", type=int, choices=(1, 2), required=True, help="whose model to fetch")
    download.add_argument("--url", help="fetch from this address (http(s):// or file://) instead of the hub")
    clear = commands.add_parser("clear", help="delete cached weights: one model, one stage, or all")
    clear.add_argument("--stage", type=int, choices=(1, 2), help="only this stage's cache")
    clear.add_argument("--model_name", help="only this model")
    clear.add_argument("--all", action="store_true", help="every cached model of EXP")
    for command in (listing, download, clear):
        command.add_argument("--output_dir", default="output", help="the experiment folder (default: output)")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "download":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.stage_argv = rest
    return args


def main(argv=None):
    args = parse_args(argv)
    model_root = Path(args.output_dir) / "model"
    if args.command == "list":
        found = cached_models(args.output_dir)
        for stage, name, path, size in found:
            print(f"{stage}  {name:<32} {size / 2**20:9.1f} MiB  {path}")
        print(f"{len(found)} cached model(s) under {model_root}, {sum(f[3] for f in found) / 2**20:.1f} MiB")
        return found
    if args.command == "download":
        stage = f"stage{args.stage}"
        settings = stage_args(stage, [*args.stage_argv, "--output_dir", args.output_dir])
        weights = networks.fetch_pretrained(settings.model_name, settings.model_cache_dir, args.url)
        print(
            f"Pretrained {settings.model_name} weights for {stage} are in {weights} "
            f"({weights.stat().st_size / 2**20:.1f} MiB); runs with --output_dir {args.output_dir} reuse them"
        )
        return weights
    if not (args.all or args.stage or args.model_name):
        raise UserError("clear needs --stage N, --model_name NAME or --all (see python tools/models.py clear --help)")
    stages = STAGES if args.stage is None else (f"stage{args.stage}",)
    removed = [
        f
        for f in cached_models(args.output_dir)
        if f[0] in stages and (args.model_name is None or f[1] == args.model_name)
    ]
    for _, _, path, _ in removed:
        shutil.rmtree(path.parent)
    print(f"Removed {len(removed)} cached model(s) from {model_root}, {sum(f[3] for f in removed) / 2**20:.1f} MiB")
    return removed


if __name__ == "__main__":
    run_cli(main)
