"""The pretrained-weights cache of the training scripts, EXP/model/<stage>/<model>/<model>.safetensors, fetched
once (on a login node, say) and read by every later run, so that offline compute nodes never download; and
create_model, which builds either stage's network from them, and compute_budget, which both stages log against
the challenge's limit.

    python tools/models.py list --output_dir EXP                          # cached models per stage, with sizes
    python tools/models.py download --output_dir EXP --stage 1            # stage 1's model (its flags apply)
    python tools/models.py download --output_dir EXP --stage 2 --config configs/stage2_recipe.json
    python tools/models.py download --output_dir EXP --stage 1 --model_name convnext_tiny --url file:///m/w.pth
    python tools/models.py clear --output_dir EXP --stage 2 [--model_name NAME]   # or --all

`download` takes the stage script's own flags (--config, --model_name, --model_cache_dir, ...), so it fetches
exactly what that stage's run will look for. --url fetches from a mirror (http(s):// or file://) instead of
the model's hub. The training scripts call fetch_pretrained when the cache is empty.
"""
import argparse
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import timm
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import wfas_data  # noqa: E402
from wfas_data import UserError  # noqa: E402

STAGES = ("stage1", "stage2")
# The WFAS challenge accepts a single model of at most this many GFLOPs per image.
CHALLENGE_GFLOPS_LIMIT = 5.0


def cache_dir(output_dir, stage, model_name):
    """Where a stage keeps one model's weights unless --model_cache_dir says otherwise."""
    return Path(output_dir) / "model" / stage / model_name


def network_reachable(url):
    """A quick look before a download: huggingface_hub retries a dead network for most of a minute."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connection says nothing; let the download try
    parsed = urlparse(url)
    if not parsed.hostname:  # file:// and the like
        return True
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=5).close()
        return True
    except OSError:
        return False


def fetch_pretrained(model_name, model_cache_dir, url=None):
    """Pretrained weights as a local safetensors file, downloaded once into model_cache_dir (from the model's hub,
    or from url) and reused after that. Written aside and renamed: a killed download leaves no file."""
    cached = Path(model_cache_dir) / f"{model_name}.safetensors"
    if cached.is_file():
        return cached
    cfg = timm.get_pretrained_cfg(model_name)
    source = url or (huggingface_hub.constants.ENDPOINT if cfg and cfg.hf_hub_id else (cfg.url if cfg else ""))
    if not network_reachable(source):
        raise UserError(f"no network to fetch pretrained {model_name} weights and no cached copy at {cached}: "
                        "run `python tools/models.py download` on a machine with internet (a login node), or pass "
                        "--pretrained_file PATH, or train from scratch with --no-pretrained")
    download_dir = Path(model_cache_dir) / "download"
    overlay = dict(url=url, hf_hub_id=None, source="") if url else None
    try:
        model = timm.create_model(model_name, pretrained=True, cache_dir=download_dir,
                                  pretrained_cfg_overlay=overlay)
    except (OSError, RuntimeError, ValueError) as error:
        raise UserError(f"could not download pretrained {model_name} weights ({str(error).splitlines()[0]}); "
                        "retry, or pass --pretrained_file PATH, or --no-pretrained") from None
    tmp = wfas_data.aside(cached)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, cached)
    shutil.rmtree(download_dir, ignore_errors=True)
    return cached


@torch.no_grad()
def compute_budget(net, model_name, img_size):
    """Parameters and multiply-accumulates (MACs) of one image's forward pass, counted by torch's FLOP counter
    (convolutions, matmuls and attention, as timm's published GMACs), against the challenge's limit."""
    training = net.training
    net.eval()
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, img_size, img_size, device=next(net.parameters()).device))
    net.train(training)
    gflops = counter.get_total_flops() / 1e9  # the counter counts a multiply-accumulate as 2 FLOPs
    gmacs, limit = gflops / 2, CHALLENGE_GFLOPS_LIMIT
    # "FLOPs" in papers and model cards are often MACs: say what holds under each reading
    if gflops <= limit:
        within, verdict = "yes", f"within the challenge's single-model limit of {limit:g} GFLOPs"
    elif gmacs <= limit:
        within, verdict = "as MACs only", (f"within the challenge's {limit:g} GFLOPs limit only if FLOPs are read "
                                           "as multiply-accumulates (as timm's tables do), over it at 2 FLOPs each")
    else:
        within, verdict = "no", f"over the challenge's single-model limit of {limit:g} GFLOPs however FLOPs are counted"
    return {"model_name": model_name, "img_size": img_size,
            "params_m": sum(p.numel() for p in net.parameters()) / 1e6, "gmacs": gmacs, "gflops": gflops,
            "within_challenge_limit": within,
            "challenge_limit": f"{model_name} at {img_size}x{img_size}: {gmacs:.3g} GMACs = {gflops:.3g} GFLOPs, "
                               f"{verdict}."}


def challenge_rules_broken(stage, args, compute):
    """The WFAS challenge rules a stage's settings break, one phrase each (empty: a valid entry). The rules allow
    no extra data and no model pretrained on it, ImageNet included, and one model of at most 5 GFLOPs (the
    student: the teacher is not submitted). Stage 2 also answers for the teacher that made its soft labels."""
    broken = [f"{stage} starts from pretrained weights (--pretrained; --no-pretrained trains from scratch)"
              ] if args.pretrained else []
    if stage == "stage2":
        stage1_config = Path(args.output_dir) / "stage1_config.json"
        if stage1_config.is_file() and json.loads(stage1_config.read_text()).get("pretrained"):
            broken.append("its soft labels come from a pretrained teacher (stage 1 ran with --pretrained)")
        if compute["gflops"] > CHALLENGE_GFLOPS_LIMIT:
            broken.append(f"the student costs {compute['gflops']:.3g} GFLOPs ({compute['gmacs']:.3g} GMACs), over "
                          f"the {CHALLENGE_GFLOPS_LIMIT:g} GFLOPs limit")
    return broken


def create_model(model_name, img_size=None, pretrained=False, pretrained_file=None, cache_dir=None,
                 drop_path_rate=0.0):
    """A timm model with a 2-class head (live = 1) at img_size: from scratch, or from pretrained_file, or from
    the weights cached in cache_dir (fetched there once: fetch_pretrained)."""
    kwargs = dict(num_classes=2, drop_path_rate=drop_path_rate)
    cfg = timm.get_pretrained_cfg(model_name)
    if img_size and cfg and cfg.fixed_input_size:  # e.g. MaxViT: its window grid is built for one input size
        kwargs["img_size"] = img_size
    if not pretrained:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    weights = Path(pretrained_file) if pretrained_file else fetch_pretrained(model_name, cache_dir)
    if not weights.is_file():
        raise UserError(f"--pretrained_file {weights} does not exist")
    try:  # timm loads the file, drops the 1000-class head and resizes what depends on the input size
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
    except (RuntimeError, OSError, ValueError) as error:
        raise UserError(f"cannot load {weights} into {model_name}: {str(error).splitlines()[0]}") from None


def cached_models(output_dir):
    """[(stage, model name, file, size in bytes)] of EXP/model/, sorted."""
    found = []
    for stage in STAGES:
        for path in sorted((Path(output_dir) / "model" / stage).glob("*/*.safetensors")):
            found.append((stage, path.parent.name, path, path.stat().st_size))
    return found


def stage_args(stage, argv):
    """The stage script's own settings for argv (its flags, --config included), without needing --data_root."""
    import train_stage1
    import train_stage2
    script = {"stage1": train_stage1, "stage2": train_stage2}[stage]
    args = script.parse_with_config(script.build_parser(), argv)
    if not timm.is_model(args.model_name):
        raise UserError(f"--model_name {args.model_name} is not a timm model")
    return args


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the cached models of each stage, with their sizes")
    download = commands.add_parser("download", help="fetch a stage's pretrained weights into its cache; any other "
                                                    "flag is the stage script's (--config, --model_name, ...)")
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
        weights = fetch_pretrained(settings.model_name, settings.model_cache_dir, args.url)
        print(f"Pretrained {settings.model_name} weights for {stage} are in {weights} "
              f"({weights.stat().st_size / 2**20:.1f} MiB); runs with --output_dir {args.output_dir} reuse them")
        return weights
    if not (args.all or args.stage or args.model_name):
        raise UserError("clear needs --stage N, --model_name NAME or --all (see python tools/models.py clear --help)")
    stages = STAGES if args.stage is None else (f"stage{args.stage}",)
    removed = [f for f in cached_models(args.output_dir)
               if f[0] in stages and (args.model_name is None or f[1] == args.model_name)]
    for _, _, path, _ in removed:
        shutil.rmtree(path.parent)
    print(f"Removed {len(removed)} cached model(s) from {model_root}, {sum(f[3] for f in removed) / 2**20:.1f} MiB")
    return removed


if __name__ == "__main__":
    wfas_data.run_cli(main)
