"""Stage 2 of the NetEase WFAS recipe: a MaxViT student trained with focal + triplet + distillation losses
against stage 1's soft labels; final val/test results and the challenge submission.

    accelerate launch train_stage2.py --output_dir EXP                  # after stage 1 wrote EXP
    python train_stage2.py --output_dir EXP --predict_lists WFAS/Dev/Dev.txt WFAS/Test/Test.txt
    python train_stage2.py --predict_only --output_dir EXP --predict_lists Dev.txt Test.txt

Writes into EXP: stage2_config.json, checkpoints/stage2/{stage2_best.safetensors, stage2_latest/}, logs/stage2/,
final_results.json, stage2_{val,test}_predictions.csv and, with --predict_lists, submission.txt/.zip.
"""
import argparse
import csv
import datetime
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import numpy as np
import timm
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.tracking import get_available_trackers
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2
from tqdm.auto import tqdm

import losses
import wfas_data
from wfas_data import LIVE, SPOOF, UserError

logger = get_logger("stage2")

# Flags that control one invocation rather than describe the experiment; they stay out of stage2_config.json.
RUN_CONTROL_KEYS = ("config", "resume_from_checkpoint", "download_only", "predict_only", "checkpoint")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring keeps its layout; every flag shows its default unless its help already tells it."""

    def _get_help_string(self, action):
        if "(default" in action.help or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return action.help + " (default: %(default)s)"


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", help="JSON file with any of these flags as keys; command-line flags override it")

    group = parser.add_argument_group("data")
    group.add_argument("--data_root", help="the data root of stage 1 (default: the one in EXP/stage1_config.json)")
    group.add_argument("--output_dir", default="output", help="experiment folder of stage 1")
    group.add_argument("--soft_labels_path", help="stage 1's soft labels (default: EXP/stage1_soft_labels.pth)")
    group.add_argument("--face_crop_scale", type=float, default=wfas_data.DEFAULT_FACE_CROP_SCALE,
                       help="face box expansion before the square crop")
    group.add_argument("--img_size", type=int, default=None, help="input size, fixed at creation for MaxViT "
                                                                  "(default: the model's)")
    group.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader workers")
    group.add_argument("--balanced_sampling", action=argparse.BooleanOptionalAction, default=None,
                       help="half live, half spoof batches (default: on when --triplet_weight > 0)")

    group = parser.add_argument_group("model")
    group.add_argument("--model_name", default="maxvit_base_tf_224", help="any timm model")
    group.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                       help="start from ImageNet weights")
    group.add_argument("--pretrained_file", help="local .safetensors or .pth weights to start from")
    group.add_argument("--model_cache_dir", help="where fetched weights are kept (default: EXP/model/stage2/<model>)")
    group.add_argument("--download_only", action="store_true",
                       help="fetch the pretrained weights into the cache and exit (run it on a login node)")
    group.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth")

    group = parser.add_argument_group("losses")
    group.add_argument("--focal_weight", type=float, default=1.0, help="weight of the focal loss")
    group.add_argument("--triplet_weight", type=float, default=0.5, help="weight of the batch-hard triplet loss")
    group.add_argument("--kd_weight", type=float, default=1.0, help="weight of the distillation loss")
    group.add_argument("--focal_gamma", type=float, default=2.0, help="focusing parameter; 0 is cross-entropy")
    group.add_argument("--focal_alpha", type=float, nargs=2, default=None, metavar=("SPOOF", "LIVE"),
                       help="per-class focal weights")
    group.add_argument("--triplet_margin", type=float, default=0.3, help="margin on L2-normalised embeddings")
    group.add_argument("--kd_temperature", type=float, default=1.0, help="distillation temperature T")

    group = parser.add_argument_group("training")
    group.add_argument("--num_epochs", type=int, default=30, help="passes over the train split")
    group.add_argument("--batch_size", type=int, default=32, help="per device")
    group.add_argument("--learning_rate", type=float, default=1e-4, help="peak AdamW learning rate")
    group.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (not on norms and biases)")
    group.add_argument("--warmup_epochs", type=float, default=1.0, help="linear warmup, then cosine decay")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer update")
    group.add_argument("--max_grad_norm", type=float, default=5.0, help="gradient clipping; 0 turns it off")
    group.add_argument("--max_train_steps", type=int, default=None, help="stop after this many updates (smoke runs)")
    group.add_argument("--seed", type=int, default=42, help="seed of the shuffle and the model init")
    group.add_argument("--tta", action="store_true", help="average with a horizontal flip when predicting")

    group = parser.add_argument_group("checkpoints, logging and prediction")
    group.add_argument("--resume_from_checkpoint", help="'latest' or a stage2_latest folder")
    group.add_argument("--checkpointing_steps", type=int, default=0,
                       help="also write stage2_latest every N updates, for a mid-epoch resume (0: per epoch)")
    group.add_argument("--report_to", default="none",
                       help="tensorboard, wandb, ... or all: any tracker accelerate supports")
    group.add_argument("--predict_lists", nargs="+", default=None, metavar="LIST",
                       help="unlabelled challenge lists (Dev.txt Test.txt) to score into EXP/submission.txt")
    group.add_argument("--predict_only", action="store_true",
                       help="no training: score --predict_lists with EXP's stage2_best (or --checkpoint)")
    group.add_argument("--checkpoint", help="weights for --predict_only (default: EXP/checkpoints/stage2/"
                                            "stage2_best.safetensors)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    config_path = argparse.ArgumentParser(add_help=False)
    config_path.add_argument("--config")
    config_file = config_path.parse_known_args(argv)[0].config
    if config_file:
        try:
            config = json.loads(Path(config_file).read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read --config {config_file}: {error}") from None
        known = {action.dest for action in parser._actions} - {"help", "config"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise UserError(f"unknown key(s) {', '.join(unknown)} in {config_file}; valid keys are the flags of "
                            "`python train_stage2.py --help` without the dashes")
        parser.set_defaults(**config)
    args = parser.parse_args(argv)
    args.output_dir = str(Path(args.output_dir).expanduser())
    trackers = [str(t) for t in get_available_trackers()]
    if args.report_to not in ("none", "all", *trackers):
        raise UserError(f"--report_to {args.report_to}: no such tracker is installed here (installed: "
                        f"{', '.join(trackers) or 'none'}); e.g. pip install tensorboard")
    if args.predict_only and not args.predict_lists:
        raise UserError("--predict_only needs --predict_lists (e.g. WFAS/Dev/Dev.txt WFAS/Test/Test.txt)")
    if not args.predict_only and not timm.is_model(args.model_name):
        raise UserError(f"--model_name {args.model_name} is not a timm model; "
                        f"e.g. {', '.join(timm.list_models('maxvit_*')[:6])}")
    stage1_config = Path(args.output_dir) / "stage1_config.json"
    if args.data_root is None and stage1_config.is_file():
        args.data_root = json.loads(stage1_config.read_text()).get("data_root")
    if args.soft_labels_path is None:
        args.soft_labels_path = str(Path(args.output_dir) / "stage1_soft_labels.pth")
    if args.model_cache_dir is None:
        args.model_cache_dir = str(Path(args.output_dir) / "model" / "stage2" / args.model_name)
    if args.balanced_sampling is None:
        args.balanced_sampling = args.triplet_weight > 0
    return args


def setup_logging(accelerator, log_dir):
    """Console on every process (accelerate's logger keeps non-main quiet), plus a file on the main process."""
    handlers = [logging.StreamHandler(sys.stdout)]
    if accelerator.is_main_process:
        log_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        handlers.append(logging.FileHandler(log_dir / f"stage2_training_{stamp}.log"))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, handlers=handlers, force=True)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # per-file save_state chatter
    return handlers[-1].baseFilename if accelerator.is_main_process else None


def network_reachable(model_name):
    """A quick look before a download: huggingface_hub retries a dead network for most of a minute."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connection says nothing; let the download try
    cfg = timm.get_pretrained_cfg(model_name)
    url = huggingface_hub.constants.ENDPOINT if cfg and cfg.hf_hub_id else (cfg.url if cfg else "")
    parsed = urlparse(url)
    if not parsed.hostname:
        return True
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=5).close()
        return True
    except OSError:
        return False


def fetch_pretrained(model_name, cache_dir):
    """Pretrained weights as a local safetensors file, downloaded once into cache_dir and reused after that."""
    cached = Path(cache_dir) / f"{model_name}.safetensors"
    if cached.is_file():
        return cached
    if not network_reachable(model_name):
        raise UserError(f"no network to fetch pretrained {model_name} weights and no cached copy at {cached}: "
                        "run with --download_only on a machine with internet (a login node), or pass "
                        "--pretrained_file PATH, or train from scratch with --no-pretrained")
    download_dir = Path(cache_dir) / "download"
    try:
        model = timm.create_model(model_name, pretrained=True, cache_dir=download_dir)
    except (OSError, RuntimeError) as error:
        raise UserError(f"could not download pretrained {model_name} weights ({error}); retry, or pass "
                        "--pretrained_file PATH, or --no-pretrained") from None
    tmp = cached.with_name(cached.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, cached)
    shutil.rmtree(download_dir, ignore_errors=True)
    return cached


def create_model(model_name, img_size=None, pretrained=False, pretrained_file=None, cache_dir=None,
                 drop_path_rate=0.0):
    kwargs = dict(num_classes=2, drop_path_rate=drop_path_rate)
    cfg = timm.get_pretrained_cfg(model_name)
    if img_size and cfg and cfg.fixed_input_size:  # MaxViT's window grid is built for one input size
        kwargs["img_size"] = img_size
    if not pretrained:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    weights = Path(pretrained_file) if pretrained_file else fetch_pretrained(model_name, cache_dir)
    if not weights.is_file():
        raise UserError(f"--pretrained_file {weights} does not exist")
    try:  # timm loads the file, drops the 1000-class head and resizes what depends on the input size
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                                 **kwargs)
    except (RuntimeError, OSError, ValueError) as error:
        raise UserError(f"cannot load {weights} into {model_name}: {str(error).splitlines()[0]}") from None


class LogitsAndEmbedding(torch.nn.Module):
    """A timm classifier whose forward returns (logits, pooled pre-logits embedding) from one pass, so that
    DDP sees a single forward and the triplet loss's gradients are synchronised with the others."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images):
        embedding = self.net.forward_head(self.net.forward_features(images), pre_logits=True)
        return self.net.get_classifier()(embedding), embedding


class BalancedBatchSampler(torch.utils.data.Sampler):
    """Batches of half live, half spoof images, so that every batch holds the positives and negatives the
    triplet loss needs; the smaller class is cycled. An epoch has as many batches as a plain pass would.

    Every process draws the same sequence from (seed, epoch); accelerate then gives each process its own
    share of the batches, which keeps them balanced under DDP."""

    def __init__(self, labels, batch_size, seed=0):
        self.live, self.spoof = np.flatnonzero(labels == LIVE), np.flatnonzero(labels == SPOOF)
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.num_batches = len(labels) // batch_size

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        live_per_batch = self.batch_size // 2
        spoof_per_batch = self.batch_size - live_per_batch

        def draw(pool, count):
            repeats = math.ceil(count / len(pool))
            return np.concatenate([rng.permutation(pool) for _ in range(repeats)])[:count]

        live = draw(self.live, self.num_batches * live_per_batch).reshape(self.num_batches, live_per_batch)
        spoof = draw(self.spoof, self.num_batches * spoof_per_batch).reshape(self.num_batches, spoof_per_batch)
        for batch in np.concatenate([live, spoof], axis=1):
            yield batch.tolist()


def load_soft_labels(path, splits):
    """Stage 1's {path: [prob_spoof, prob_live]} as a [num_train, 2] tensor aligned with the train dataset,
    built once here so that workers do no per-path lookups. Images without a soft label get their hard
    label. Refuses soft labels that touch val/test or cover under 99% of train: another run's file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no soft labels at {path}; run stage 1 first (train_stage1.py --output_dir "
                        f"{path.parent}) or pass --soft_labels_path")
    try:
        soft_labels = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means the same thing to the user
        raise UserError(f"cannot read soft labels {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(soft_labels, dict):
        raise UserError(f"{path} is not a soft-label file: expected a dict {{image path: [prob_spoof, prob_live]}}")
    held_out = [p for name in ("val", "test") for p in splits[name].paths() if p in soft_labels]
    if held_out:
        raise UserError(f"soft labels {path} contain {len(held_out)} val/test images (e.g. {held_out[0]}): "
                        "they come from another run or split; use the stage 1 output of this EXP folder")
    train_paths = splits["train"].paths()
    labels = splits["train"].label
    targets = np.zeros((len(train_paths), 2), dtype=np.float32)
    targets[np.arange(len(labels)), labels] = 1.0  # hard-label fallback
    covered = 0
    for i, image_path in enumerate(train_paths):
        probs = soft_labels.get(image_path)
        if probs is None:
            continue
        if not isinstance(probs, (list, tuple, torch.Tensor)) or len(probs) != 2:
            raise UserError(f"soft labels {path}: the entry of {image_path} is {probs!r}, not "
                            "[prob_spoof, prob_live]")
        targets[i] = probs
        covered += 1
    if covered < 0.99 * len(train_paths):
        raise UserError(f"soft labels {path} cover {covered} of {len(train_paths)} train images (< 99%): they "
                        "belong to another run or data root; use the stage 1 output of this EXP folder")
    return torch.from_numpy(targets), len(train_paths) - covered


@torch.no_grad()
def predict(model, loader, accelerator, tta=False, desc="predicting"):
    """P(live) for every image of loader, each counted once across processes.
    Returns (scores [N], dataset indices [N], decoded-ok mask [N]) on every process."""
    model.eval()
    scores, indices, oks = [], [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        batch_scores = model(batch["image"])[0].float().softmax(-1)[:, LIVE]
        if tta:
            batch_scores = (batch_scores + model(batch["image"].flip(-1))[0].float().softmax(-1)[:, LIVE]) / 2
        for error in batch["error"]:
            if error:
                logger.warning(f"skipping unreadable image {error}", main_process_only=False)
        # inside the loop: only here does gather_for_metrics drop the sampler's padding duplicates
        batch_scores, batch_indices, batch_ok = accelerator.gather_for_metrics(
            (batch_scores, batch["index"], batch["ok"].to(torch.uint8)))
        scores.append(batch_scores.cpu())
        indices.append(batch_indices.cpu())
        oks.append(batch_ok.cpu())
    return torch.cat(scores).numpy(), torch.cat(indices).numpy(), torch.cat(oks).numpy().astype(bool)


def score_split(model, loader, split_table, accelerator, tta=False, desc="val"):
    """(paths, labels, attack types, scores) of the decodable images of one split, in dataset order."""
    scores, indices, ok = predict(model, loader, accelerator, tta, desc)
    order = np.argsort(indices[ok], kind="stable")
    indices, scores = indices[ok][order], scores[ok][order]
    paths, attack_types = np.array(split_table.paths()), np.array(split_table.attack_types())
    return paths[indices], split_table.label[indices], attack_types[indices], scores


def write_predictions(path, paths, labels, attack_types, scores):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "attack_type", "score"])
        writer.writerows(zip(paths, labels.tolist(), attack_types, (f"{s:.6f}" for s in scores)))
    os.replace(tmp, path)


def save_best(accelerator, model, path, metadata):
    """The plain timm model's weights in safetensors, with metadata; written aside and renamed into place."""
    if accelerator.is_main_process:
        # keep_torch_compile=False: the plain module's keys, without torch.compile's "_orig_mod." prefix
        state_dict = accelerator.unwrap_model(model, keep_torch_compile=False).net.state_dict()
        weights = {k: v.contiguous().cpu() for k, v in state_dict.items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(weights, tmp, metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
        os.replace(tmp, path)


def save_latest(accelerator, latest_dir, training_state):
    """The full accelerate state (model, optimizer, scheduler, RNG) plus our counters. Written aside and
    swapped in, so a kill leaves either the previous or the new state, never half of one."""
    tmp, old = latest_dir.with_name(latest_dir.name + ".tmp"), latest_dir.with_name(latest_dir.name + ".old")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        wfas_data.write_json(tmp / "training_state.json", training_state)
        if latest_dir.exists():
            latest_dir.rename(old)
        tmp.rename(latest_dir)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resolve_resume(resume, latest_dir):
    path = latest_dir if resume == "latest" else Path(resume)
    if not (path / "training_state.json").is_file():
        old = path.with_name(path.name + ".old")  # a kill between the two renames of save_latest
        if (old / "training_state.json").is_file():
            return old
        raise UserError(f"--resume_from_checkpoint {resume}: no saved state at {path} "
                        "(expected a stage2_latest folder written by an earlier run)")
    return path


def write_submission(model, accelerator, args, img_size, data_config, face_crop_scale):
    """EXP/submission.txt: `dev/<name> <P(live)>` lines in list order, dev before test; and a zip of it.
    An image that cannot be decoded still gets its line, with 0.5, and a warning."""
    lines = []
    for list_file in sorted(args.predict_lists, key=lambda p: Path(p).stem.lower() != "dev"):
        folder, names = wfas_data.read_prediction_list(list_file)
        table = wfas_data.unlabelled_table(folder, names)
        dataset = wfas_data.FaceDataset(table, img_size, data_config["mean"], data_config["std"],
                                        face_crop_scale=face_crop_scale)
        loader = accelerator.prepare(torch.utils.data.DataLoader(dataset, batch_size=args.batch_size,
                                                                 num_workers=args.num_workers))
        scores, indices, ok = predict(model, loader, accelerator, args.tta, desc=Path(list_file).name)
        list_scores = np.full(len(names), 0.5)
        list_scores[indices[ok]] = scores[ok]
        if (~ok).any():
            logger.warning(f"{int((~ok).sum())} images of {list_file} could not be decoded; they are scored 0.5")
        prefix = Path(list_file).stem.lower()
        keys = [name if name.startswith(prefix + "/") else f"{prefix}/{name}" for name in names]
        lines += [f"{key} {score:.6f}" for key, score in zip(keys, np.clip(list_scores, 0, 1))]
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        txt, archive = output_dir / "submission.txt", output_dir / "submission.zip"
        tmp = txt.with_name(txt.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, txt)
        tmp = archive.with_name(archive.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.write(txt, arcname="submission.txt")
        os.replace(tmp, archive)
        logger.info(f"Wrote {len(lines)} scores to {txt} and {archive}")
    accelerator.wait_for_everyone()
    return str(output_dir / "submission.txt")


def predict_only(args, accelerator):
    checkpoint = Path(args.checkpoint or Path(args.output_dir) / "checkpoints" / "stage2" / "stage2_best.safetensors")
    if not checkpoint.is_file():
        raise UserError(f"no checkpoint at {checkpoint}; train stage 2 first or pass --checkpoint PATH")
    with safe_open(checkpoint, framework="pt") as f:
        metadata = f.metadata() or {}
    if "model_name" not in metadata or "img_size" not in metadata:
        raise UserError(f"{checkpoint} has no model_name/img_size metadata; it was not written by train_stage2.py")
    img_size = int(metadata["img_size"])
    net = create_model(metadata["model_name"], img_size)
    net.load_state_dict(load_file(checkpoint))
    data_config = timm.data.resolve_data_config({}, model=net)
    face_crop_scale = float(metadata.get("face_crop_scale", args.face_crop_scale))
    logger.info(f"Scoring with {checkpoint} ({metadata['model_name']}, image size {img_size})")
    model = accelerator.prepare(LogitsAndEmbedding(net))
    return {"submission_path": write_submission(model, accelerator, args, img_size, data_config, face_crop_scale)}


def main(argv=None):
    args = parse_args(argv)
    start_time = time.time()
    output_dir = Path(args.output_dir)
    ckpt_dir = output_dir / "checkpoints" / "stage2"
    best_path, latest_dir = ckpt_dir / "stage2_best.safetensors", ckpt_dir / "stage2_latest"

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # the same shuffle on every resume, so that --resume_from_checkpoint continues the same run
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (Ampere and later)
    log_file = setup_logging(accelerator, output_dir / "logs" / "stage2")

    if args.download_only:
        if accelerator.is_main_process:
            weights = fetch_pretrained(args.model_name, args.model_cache_dir)
            logger.info(f"Pretrained {args.model_name} weights are in {weights}; compute nodes will reuse them")
        return {"pretrained_file": str(Path(args.model_cache_dir) / f"{args.model_name}.safetensors")}
    if args.predict_only:
        return predict_only(args, accelerator)

    split_csv = output_dir / "split.csv"
    if not split_csv.is_file():
        raise UserError(f"no split at {split_csv}: stage 2 trains on stage 1's split; run stage 1 first "
                        f"(accelerate launch train_stage1.py --data_root WFAS --output_dir {output_dir})")
    if not args.data_root:
        raise UserError(f"--data_root is required: {output_dir / 'stage1_config.json'} does not name one")
    set_seed(args.seed)
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in RUN_CONTROL_KEYS}
        wfas_data.write_json(output_dir / "stage2_config.json", config)

    source = Path(args.data_root).expanduser()
    table = wfas_data.read_split_csv(split_csv, source.parent if source.is_file() else
                                     wfas_data.resolve_data_root(source))
    splits = {name: table.of_split(name) for name in wfas_data.SPLITS}
    soft_targets, num_fallback = load_soft_labels(args.soft_labels_path, splits)

    with accelerator.main_process_first():  # the main process fetches the weights, the others reuse them
        net = create_model(args.model_name, args.img_size, args.pretrained, args.pretrained_file,
                           args.model_cache_dir, args.drop_path_rate)
    data_config = timm.data.resolve_data_config({}, model=net)
    img_size = args.img_size or data_config["input_size"][-1]
    datasets = wfas_data.build_datasets(table, img_size, data_config["mean"], data_config["std"],
                                        args.face_crop_scale)

    logger.info(f"Stage 2: {args.model_name} ({'pretrained' if args.pretrained else 'from scratch'}), "
                f"{accelerator.num_processes} process(es) on {accelerator.device.type}, "
                f"mixed precision {accelerator.mixed_precision}, image size {img_size}, "
                f"batch {args.batch_size} x {accelerator.num_processes} x {args.gradient_accumulation_steps}"
                f"{', class-balanced' if args.balanced_sampling else ''}")
    logger.info(f"Data {table.root}, {len(table)} images:\n{wfas_data.describe_split(table)}")
    logger.info(f"Soft labels {args.soft_labels_path}: {len(splits['train']) - num_fallback} train images, "
                f"{num_fallback} fall back to their hard label")
    logger.info(f"Loss = {args.focal_weight} focal(gamma {args.focal_gamma}) + {args.triplet_weight} "
                f"triplet(margin {args.triplet_margin}) + {args.kd_weight} KD(T {args.kd_temperature})")
    if log_file:
        logger.info(f"Logging to {log_file}")

    workers = dict(num_workers=args.num_workers, pin_memory=torch.cuda.is_available())

    def loader(dataset):
        return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, **workers)

    train_sampler = None
    persistent = args.num_workers > 0
    if args.balanced_sampling:
        train_sampler = BalancedBatchSampler(splits["train"].label, args.batch_size, args.seed)
        train_loader = torch.utils.data.DataLoader(datasets["train"], batch_sampler=train_sampler,
                                                   persistent_workers=persistent, **workers)
    else:
        train_loader = torch.utils.data.DataLoader(datasets["train"], batch_size=args.batch_size, shuffle=True,
                                                   drop_last=True, persistent_workers=persistent, **workers)
    if len(train_loader) == 0:
        raise UserError(f"the train split has {len(datasets['train'])} images, fewer than one batch of "
                        f"{args.batch_size}; lower --batch_size")
    model = LogitsAndEmbedding(net)
    optimizer = create_optimizer_v2(net, "adamw", lr=args.learning_rate, weight_decay=args.weight_decay)
    val_loader = loader(datasets["val"])
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    soft_targets = soft_targets.to(accelerator.device)

    updates_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_updates = args.num_epochs * updates_per_epoch
    if args.max_train_steps:
        total_updates = min(total_updates, args.max_train_steps)
    warmup = min(round(args.warmup_epochs * updates_per_epoch), total_updates // 2)  # short runs still decay
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=max(warmup, 1)),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_updates - warmup, 1),
                                                   eta_min=args.learning_rate * 0.01),
    ], milestones=[warmup])
    accelerator.register_for_checkpointing(scheduler)  # stepped per update by us, saved with the state

    # epoch: the last finished one; batches_done: batches of the next one already trained (mid-epoch saves)
    state = {"epoch": -1, "batches_done": 0, "global_step": 0, "best_epoch": -1, "best_val_acer": math.inf}
    if args.resume_from_checkpoint:
        resume_dir = resolve_resume(args.resume_from_checkpoint, latest_dir)
        accelerator.load_state(str(resume_dir))
        state = json.loads((resume_dir / "training_state.json").read_text())
        logger.info(f"Resumed from {resume_dir}: epoch {state['epoch'] + 1} of {args.num_epochs} done"
                    + (f" and {state['batches_done']} batches of the next" if state["batches_done"] else "")
                    + f", {state['global_step']} updates, best val ACER {state['best_val_acer']:.4f}")
    accelerator.init_trackers("stage2", config={k: v for k, v in vars(args).items()
                                                if isinstance(v, (int, float, str, bool))})

    loss_weights = dict(focal_weight=args.focal_weight, triplet_weight=args.triplet_weight,
                        kd_weight=args.kd_weight, focal_gamma=args.focal_gamma, focal_alpha=args.focal_alpha,
                        triplet_margin=args.triplet_margin, kd_temperature=args.kd_temperature)
    progress = tqdm(total=total_updates, initial=state["global_step"], desc="stage 2",
                    disable=not accelerator.is_local_main_process)
    train_images, train_seconds, epochs_run, loop_start = 0, 0.0, 0, time.time()
    for epoch in range(state["epoch"] + 1, args.num_epochs):
        if state["global_step"] >= total_updates:
            break
        model.train()
        train_loader.set_epoch(epoch)
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        epoch_start, epoch_images, steps, skipped = time.time(), 0, 0, 0
        # summed on the device: .item() every step would wait for the GPU
        sums = {name: torch.zeros((), device=accelerator.device) for name in ("loss", "focal", "triplet", "kd")}
        # the seedable sampler replays this epoch's order, so a mid-epoch resume skips what was trained
        batches = accelerator.skip_first_batches(train_loader, state["batches_done"]) if state["batches_done"] \
            else train_loader
        for batch in batches:
            with accelerator.accumulate(model):
                logits, embeddings = model(batch["image"])
                ok = batch["ok"]
                if ok.any():  # undecodable images were replaced by zeros; they take no part in the loss
                    loss, parts = losses.stage2_loss(logits[ok], embeddings[ok], batch["label"][ok],
                                                     soft_targets[batch["index"][ok]], **loss_weights)
                else:
                    loss, parts = logits.sum() * 0, {}
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            for error in filter(None, batch["error"]):
                logger.warning(f"skipping unreadable image {error}", main_process_only=False)
                skipped += 1
            sums["loss"] += loss.detach()
            for name, value in parts.items():
                sums[name] += value
            steps += 1
            state["batches_done"] += 1
            epoch_images += len(ok) * accelerator.num_processes
            if accelerator.sync_gradients:
                scheduler.step()
                state["global_step"] += 1
                progress.update(1)
                if state["global_step"] % 20 == 0:
                    progress.set_postfix(loss=f"{sums['loss'].item() / steps:.4f}",
                                         img_s=f"{epoch_images / (time.time() - epoch_start):.0f}")
                if args.checkpointing_steps and state["global_step"] % args.checkpointing_steps == 0:
                    save_latest(accelerator, latest_dir, state)
                    logger.info(f"Wrote {latest_dir} at update {state['global_step']} (epoch {epoch + 1}, "
                                f"batch {state['batches_done']})")
                if state["global_step"] >= total_updates:
                    break
        epoch_seconds = time.time() - epoch_start
        skipped = int(accelerator.reduce(torch.tensor(skipped, device=accelerator.device), reduction="sum"))
        train_images += epoch_images
        train_seconds += epoch_seconds
        train = {name: value.item() / max(steps, 1) for name, value in sums.items()}

        paths, labels, attack_types, scores = score_split(model, val_loader, splits["val"], accelerator)
        val = wfas_data.compute_metrics(scores, labels, attack_types)
        state.update(epoch=epoch, batches_done=0)
        improved = val["acer"] < state["best_val_acer"]
        if improved:
            state.update(best_epoch=epoch, best_val_acer=val["acer"])
            save_best(accelerator, model, best_path, {
                "model_name": args.model_name, "img_size": str(img_size), "epoch": str(epoch),
                "face_crop_scale": str(args.face_crop_scale), "val_metrics": val})
        save_latest(accelerator, latest_dir, state)

        epochs_run += 1
        epochs_left = min(args.num_epochs - epoch - 1,
                          math.ceil((total_updates - state["global_step"]) / updates_per_epoch))
        eta = (time.time() - loop_start) / epochs_run * epochs_left
        logger.info(f"epoch {epoch + 1}/{args.num_epochs}  loss {train['loss']:.4f} (focal {train['focal']:.4f} "
                    f"triplet {train['triplet']:.4f} kd {train['kd']:.4f})  val {wfas_data.format_metrics(val)}  "
                    f"lr {scheduler.get_last_lr()[0]:.2e}  {epoch_images / epoch_seconds:.0f} img/s  "
                    f"elapsed {datetime.timedelta(seconds=round(time.time() - start_time))}  "
                    f"ETA {datetime.timedelta(seconds=round(eta))}" + ("  (best)" if improved else "")
                    + (f"  {skipped} unreadable images skipped" if skipped else ""))
        accelerator.log({**{f"train/{k}": v for k, v in train.items()}, "train/lr": scheduler.get_last_lr()[0],
                         "train/images_per_second": epoch_images / epoch_seconds,
                         **{f"val/{k}": v for k, v in val.items() if isinstance(v, (int, float))}}, step=epoch)
    progress.close()

    if not best_path.is_file():
        raise UserError(f"no best checkpoint at {best_path}: training ran no epoch (check --num_epochs)")
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model, keep_torch_compile=False).net.load_state_dict(load_file(best_path))

    # The threshold is the EER point of the best model on val; test is scored at it, never fitted on test.
    val_rows = score_split(model, val_loader, splits["val"], accelerator, args.tta, desc="val")
    val = wfas_data.compute_metrics(val_rows[3], val_rows[1], val_rows[2])
    test_loader = accelerator.prepare(loader(datasets["test"]))
    test_rows = score_split(model, test_loader, splits["test"], accelerator, args.tta, desc="test")
    test = wfas_data.compute_metrics(test_rows[3], test_rows[1], test_rows[2], threshold=val["threshold"])
    stage1_results = output_dir / "stage1_results.json"
    teacher_test = json.loads(stage1_results.read_text())["test"] if stage1_results.is_file() else {}
    results = {
        "test_acc": test["acc"], "test_acer": test["acer"], "test_apcer": test["apcer"],
        "test_bpcer": test["bpcer"], "test_auc": test["auc"], "test_eer": test["eer"],
        "test_apcer_per_attack": test["apcer_per_attack"], "test_worst_apcer": test["worst_apcer"],
        "threshold": val["threshold"], "val_acc": val["acc"], "val_acer": val["acer"], "val_auc": val["auc"],
        "best_epoch": state["best_epoch"] + 1, "num_test_images": test["num_images"],
        "num_val_images": val["num_images"], "teacher_test_acer": teacher_test.get("acer"),
        "teacher_test_acc": teacher_test.get("acc"), "num_soft_label_fallbacks": num_fallback,
        "model_name": args.model_name, "img_size": img_size,
        "wall_time_s": round(time.time() - start_time, 1),
        "images_per_second": round(train_images / train_seconds, 1) if train_seconds else None,
        "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
    }
    logger.info(f"Best epoch {results['best_epoch']}: val {wfas_data.format_metrics(val)}")
    logger.info(f"Test at the val threshold {val['threshold']:.4f}: {wfas_data.format_metrics(test)}")
    if results["teacher_test_acer"] is not None:
        logger.info(f"Teacher (stage 1) test ACER {results['teacher_test_acer']:.4f}, "
                    f"student {results['test_acer']:.4f}")
    if accelerator.is_main_process:
        write_predictions(output_dir / "stage2_val_predictions.csv", *val_rows)
        write_predictions(output_dir / "stage2_test_predictions.csv", *test_rows)
        wfas_data.write_json(output_dir / "final_results.json", results)
        logger.info(f"Wrote {output_dir / 'final_results.json'} and the per-image predictions")
    if args.predict_lists:
        results["submission_path"] = write_submission(model, accelerator, args, img_size, data_config,
                                                      args.face_crop_scale)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    wfas_data.run_cli(main)
