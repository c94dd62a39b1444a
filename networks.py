"""The networks of both stages and the tools: a timm model with a 2-class head, built from scratch or from the
pretrained weights kept in a cache that is filled once (on a login node, say: tools/models.py) and read by every
later run, so that offline compute nodes never download; and a trained checkpoint of either stage loaded back
with its metadata. What a network costs against the challenge's rules is in challenge.py.
"""

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

from errors import UserError
from output_files import aside


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


def create_model(
    model_name,
    img_size=None,
    *,
    pretrained=False,
    pretrained_file=None,
    cache_dir=None,
    drop_path_rate=0.0,
    channels_last=False,
):
    """A timm model with a 2-class head (live = 1) at img_size: from scratch, or from pretrained_file, or from
    the weights cached in cache_dir (fetched there once: fetch_pretrained); in NHWC memory with channels_last
    (set before accelerate's prepare())."""
    kwargs = dict(num_classes=2, drop_path_rate=drop_path_rate)
    cfg = timm.get_pretrained_cfg(model_name)
    if img_size and cfg and cfg.fixed_input_size:  # e.g. MaxViT: its window grid is built for one input size
        kwargs["img_size"] = img_size
    if not pretrained:
        net = timm.create_model(model_name, pretrained=False, **kwargs)
    else:
        weights = Path(pretrained_file) if pretrained_file else fetch_pretrained(model_name, cache_dir)
        if not weights.is_file():
            raise UserError(f"--pretrained_file {weights} does not exist")
        try:  # timm loads the file, drops the 1000-class head and resizes what depends on the input size
            net = timm.create_model(
                model_name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs
            )
        except (RuntimeError, OSError, ValueError) as error:
            raise UserError(f"cannot load {weights} into {model_name}: {str(error).splitlines()[0]}") from None
    if channels_last:
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
