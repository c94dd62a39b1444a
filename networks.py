"""The networks of both stages and the tools: a timm model with a 2-class head, built from scratch or from the
pretrained weights kept in a cache that is filled once (on a login node, say: tools/models.py) and read by every
later run, so that offline compute nodes never download; its compute budget against the challenge's limit; and
a trained checkpoint of either stage loaded back with its metadata.
"""

import argparse
import json
import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from errors import UserError
from output_files import aside

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
    source = url
    if not source and cfg:
        source = huggingface_hub.constants.ENDPOINT if cfg.hf_hub_id else cfg.url
    if not network_reachable(source):
        raise UserError(
            f"no network to fetch pretrained {model_name} weights and no cached copy at {cached}: "
            "run `python tools/models.py download` on a machine with internet (a login node), or pass "
            "--pretrained_file PATH, or train from scratch with --no-pretrained"
        )
    download_dir = Path(model_cache_dir) / "download"
    overlay = dict(url=url, hf_hub_id=None, source="") if url else None
    try:
        model = timm.create_model(model_name, pretrained=True, cache_dir=download_dir, pretrained_cfg_overlay=overlay)
    except (OSError, RuntimeError, ValueError) as error:
        raise UserError(
            f"could not download pretrained {model_name} weights ({str(error).splitlines()[0]}); "
            "retry, or pass --pretrained_file PATH, or --no-pretrained"
        ) from None
    tmp = aside(cached)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, cached)
    shutil.rmtree(download_dir, ignore_errors=True)
    return cached


def create_model(model_name, img_size=None, pretrained=False, pretrained_file=None, cache_dir=None, drop_path_rate=0.0):
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


def create_from_flags(args):
    """A stage's network from its flags: --model_name, --img_size, --pretrained, --pretrained_file,
    --model_cache_dir, --drop_path_rate and --channels_last (NHWC memory, set before prepare())."""
    net = create_model(
        args.model_name,
        args.img_size,
        args.pretrained,
        args.pretrained_file,
        args.model_cache_dir,
        args.drop_path_rate,
    )
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    return net


def compiled(net, enabled):
    """net under torch.compile when enabled, else net itself. Both share the module and its weights: what
    prepare(), the EMA and the checkpoints hold stays the plain module (no _orig_mod. prefix). The batch turns a
    dynamic dimension at its second size (a last, smaller batch): each mode, train and eval, compiles about twice
    in a run, not once per shape or epoch."""
    if not enabled:
        return net
    return torch.compile(net)


def compile_summary():
    """What torch.compile did in this process, for the log: the graphs it compiled. About two per mode (train,
    eval) and model: the first batch shape, then one dynamic in the batch size (a batch of 1 is one more); a count
    that grows with the epochs or the fold teachers means recompiling."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    return f"torch.compile: {graphs} graphs compiled in this process"


def model_input(net, img_size=None):
    """(input size, mean, std) of a timm model's input: img_size, or the model's own when None."""
    config = timm.data.resolve_data_config({}, model=net)
    return img_size or config["input_size"][-1], config["mean"], config["std"]


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
    gmacs = gflops / 2
    limit = CHALLENGE_GFLOPS_LIMIT
    # "FLOPs" in papers and model cards are often MACs: say what holds under each reading
    if gflops <= limit:
        within = "yes"
        verdict = f"within the challenge's single-model limit of {limit:g} GFLOPs"
    elif gmacs <= limit:
        within = "as MACs only"
        verdict = (
            f"within the challenge's {limit:g} GFLOPs limit only if FLOPs are read "
            "as multiply-accumulates (as timm's tables do), over it at 2 FLOPs each"
        )
    else:
        within = "no"
        verdict = f"over the challenge's single-model limit of {limit:g} GFLOPs however FLOPs are counted"
    return {
        "model_name": model_name,
        "img_size": img_size,
        "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
        "gmacs": gmacs,
        "gflops": gflops,
        "within_challenge_limit": within,
        "challenge_limit": f"{model_name} at {img_size}x{img_size}: {gmacs:.3g} GMACs = {gflops:.3g} GFLOPs, "
        f"{verdict}.",
    }


def challenge_rules_broken(stage, args, compute):
    """The WFAS challenge rules a stage's settings break, one phrase each (empty: a valid entry). The rules allow
    no extra data and no model pretrained on it, ImageNet included, and one model of at most 5 GFLOPs (the
    student: the teacher is not submitted). Stage 2 also answers for the teacher that made its soft labels."""
    broken = (
        [f"{stage} starts from pretrained weights (--pretrained; --no-pretrained trains from scratch)"]
        if args.pretrained
        else []
    )
    if stage == "stage2":
        stage1_config = Path(args.output_dir) / "stage1_config.json"
        if stage1_config.is_file() and json.loads(stage1_config.read_text()).get("pretrained"):
            broken.append("its soft labels come from a pretrained teacher (stage 1 ran with --pretrained)")
        if compute["gflops"] > CHALLENGE_GFLOPS_LIMIT:
            broken.append(
                f"the student costs {compute['gflops']:.3g} GFLOPs ({compute['gmacs']:.3g} GMACs), over "
                f"the {CHALLENGE_GFLOPS_LIMIT:g} GFLOPs limit"
            )
    return broken


def checkpoint_parser(description):
    """A tool's parser with the flags that pick a trained checkpoint: --output_dir, --stage, --checkpoint."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="output", help="the experiment folder (default: output)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2, help="whose best checkpoint (default: 2)")
    parser.add_argument(
        "--checkpoint",
        help="a .safetensors written by either stage (default: EXP/checkpoints/stageN/stageN_best.safetensors)",
    )
    return parser


def best_checkpoint(output_dir, stage):
    return Path(output_dir) / "checkpoints" / f"stage{stage}" / f"stage{stage}_best.safetensors"


def load_checkpoint(checkpoint, output_dir, stage=2):
    """The timm model of a checkpoint written by either training script (default: EXP's best of `stage`), on
    the CPU in eval mode, with its metadata (JSON values decoded) and its path."""
    checkpoint = Path(checkpoint or best_checkpoint(output_dir, stage))
    if not checkpoint.is_file():
        raise UserError(f"no checkpoint at {checkpoint}; train stage {stage} first or pass --checkpoint PATH")
    try:
        with safe_open(checkpoint, framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise UserError(f"cannot read {checkpoint}: {str(error).splitlines()[0]}") from None
    if "model_name" not in raw or "img_size" not in raw:
        raise UserError(
            f"{checkpoint} has no model_name/img_size metadata: it was not written by "
            "train_stage1.py or train_stage2.py"
        )
    metadata = {}
    for key, value in raw.items():
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:  # plain strings, such as the model name
            metadata[key] = value
    net = create_model(metadata["model_name"], int(metadata["img_size"]))
    try:
        net.load_state_dict(load_file(checkpoint))
    except RuntimeError as error:
        raise UserError(f"{checkpoint} does not fit {metadata['model_name']}: {str(error).splitlines()[0]}") from None
    return net.eval(), metadata, checkpoint
