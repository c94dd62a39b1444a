"""Stage 2 of the NetEase WFAS recipe: a MaxViT student trained with focal + triplet + distillation losses
against stage 1's soft labels, and its final val/test results.

    accelerate launch train_stage2.py --output_dir EXP                  # after stage 1 wrote EXP
    python train_stage2.py --output_dir EXP --config configs/stage2_recipe.json

Writes into EXP: stage2_config.json, checkpoints/stage2/{stage2_best.safetensors, stage2_latest/}, logs/stage2/
(the log and summary.csv), final_results.json (test metrics, threshold, operating points, compute),
stage2_{val,test}_predictions.csv, plots/ and report.md. The challenge submission, scoring a folder and the
ONNX export are programs of their own: tools/predict.py and tools/export_onnx.py.
"""
import argparse
import atexit
import datetime
import functools
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import timm
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.tracking import get_available_trackers
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list, set_seed
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torchvision.transforms import v2 as T

import losses
import wfas_data
from tools import models, report
from wfas_data import LIVE, SPOOF, UserError

STAGE = "stage2"
logger = get_logger(STAGE)

# Flags that control one invocation rather than describe the experiment; they stay out of stage2_config.json.
RUN_CONTROL_KEYS = ("config", "resume_from_checkpoint")


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
    group.add_argument("--color_jitter", type=float, default=0.1,
                       help="per-image brightness, contrast and saturation factors in [1 - j, 1 + j], drawn on the "
                            "device; 0 turns it off")
    group.add_argument("--num_workers", type=int, default=None,
                       help="loader workers per process (default: this node's cores shared by its processes, up to 12)")
    group.add_argument("--face_cache", action=argparse.BooleanOptionalAction, default=True,
                       help="read face crops from a cache built once (memory-mapped shards of small JPEGs) rather "
                            "than decoding the original photos every epoch")
    group.add_argument("--face_cache_dir", help="where face caches live; share one between experiments on the same "
                                                "data (default: EXP/face_cache)")
    group.add_argument("--balanced_sampling", action=argparse.BooleanOptionalAction, default=None,
                       help="half live, half spoof batches (default: on when --triplet_weight > 0)")

    group = parser.add_argument_group("model")
    group.add_argument("--model_name", default="maxvit_base_tf_224", help="any timm model")
    group.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                       help="start from ImageNet weights")
    group.add_argument("--pretrained_file", help="local .safetensors or .pth weights to start from")
    group.add_argument("--model_cache_dir", help="where fetched weights are kept (default: EXP/model/stage2/<model>; "
                                                 "tools/models.py fills it ahead of time)")
    group.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth")

    group = parser.add_argument_group("losses (a term's weight: --<term>_weight; see losses.STAGE2_TERMS)")
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

    group = parser.add_argument_group("checkpoints and logging")
    group.add_argument("--resume_from_checkpoint",
                       help="'latest' (starts fresh when there is no saved state yet, so a requeued job can "
                            "rerun the same command) or a stage2_latest folder")
    group.add_argument("--checkpointing_steps", type=int, default=0,
                       help="also write stage2_latest every N updates, for a mid-epoch resume (0: per epoch)")
    group.add_argument("--report_to", default="none",
                       help="tensorboard, wandb, ... or all: any tracker accelerate supports")
    return parser


def parse_args(argv=None):
    args = parse_with_config(build_parser(), argv)
    if not timm.is_model(args.model_name):
        raise UserError(f"--model_name {args.model_name} is not a timm model; "
                        f"e.g. {', '.join(timm.list_models('maxvit_*')[:6])}")
    stage1_config = Path(args.output_dir) / "stage1_config.json"
    if args.data_root is None and stage1_config.is_file():
        args.data_root = json.loads(stage1_config.read_text()).get("data_root")
    if args.soft_labels_path is None:
        args.soft_labels_path = str(Path(args.output_dir) / "stage1_soft_labels.pth")
    if args.balanced_sampling is None:
        args.balanced_sampling = args.triplet_weight > 0
    if args.balanced_sampling and args.batch_size < 2:
        raise UserError(f"--balanced_sampling puts half live, half spoof images in each batch and needs "
                        f"--batch_size 2 or more (got {args.batch_size}); or pass --no-balanced_sampling")
    return args


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
    label. Refuses soft labels that touch val/test, or cover under 99% of the train images that stage 1
    could decode (listed in the stage1_results.json next to them): another run's file."""
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
    stage1_results = path.with_name("stage1_results.json")
    undecodable = set(json.loads(stage1_results.read_text()).get("undecodable_train_images", [])
                      if stage1_results.is_file() else [])
    decodable = len(train_paths) - len(undecodable.intersection(train_paths))
    if covered < 0.99 * decodable:
        raise UserError(f"soft labels {path} cover {covered} of the {decodable} train images stage 1 could decode "
                        "(< 99%): they belong to another run or data root; use the stage 1 output of this EXP folder")
    return torch.from_numpy(targets), len(train_paths) - covered


def train_transform(img_size):
    """The student's train augmentation, run per image in the loader workers (uint8 in and out): a mild random
    zoom into the face crop (the face cache stores the box times --face_crop_scale at img_size / 0.875, so
    scale < 1 only zooms in; zooming out needs a larger --face_crop_scale) and a horizontal flip."""
    return T.Compose([T.RandomResizedCrop(img_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
                      T.RandomHorizontalFlip()])


def main(argv=None):
    args = parse_args(argv)
    start_time = time.time()
    output_dir = Path(args.output_dir)
    ckpt_dir = output_dir / "checkpoints" / STAGE
    best_path, latest_dir = ckpt_dir / f"{STAGE}_best.safetensors", ckpt_dir / f"{STAGE}_latest"
    if not (output_dir / "split.csv").is_file():
        raise UserError(f"no split at {output_dir / 'split.csv'}: stage 2 trains on stage 1's split; run stage 1 "
                        f"first (accelerate launch train_stage1.py --data_root WFAS --output_dir {output_dir})")
    if not args.data_root:
        raise UserError(f"--data_root is required: {output_dir / 'stage1_config.json'} does not name one")
    accelerator, log_file = start_run(args, output_dir, ckpt_dir)
    table = wfas_data.load_or_create_split(args.data_root, output_dir, log=logger.info)
    splits = {name: table.of_split(name) for name in wfas_data.SPLITS}
    soft_targets, num_fallback = load_soft_labels(args.soft_labels_path, splits)
    student = main_process_first(accelerator, lambda: create_model(  # the others reuse the fetched weights
        args.model_name, args.img_size, args.pretrained, args.pretrained_file, args.model_cache_dir,
        args.drop_path_rate))
    mean, std, img_size, compute, loader_settings, cache, datasets = prepare_data(accelerator, args, table, student)
    log_setup(accelerator, args, img_size, compute, table, loader_settings, cache, log_file,
              ", class-balanced" if args.balanced_sampling else "")
    logger.info(f"Soft labels {args.soft_labels_path}: {len(splits['train']) - num_fallback} train images, "
                f"{num_fallback} fall back to their hard label")
    # one criterion, built once: the weight of each term comes from its --<term>_weight flag
    term_weights = {name: getattr(args, f"{name}_weight") for name in losses.STAGE2_TERMS}
    term_settings = dict(focal_gamma=args.focal_gamma, focal_alpha=args.focal_alpha,
                         triplet_margin=args.triplet_margin, kd_temperature=args.kd_temperature)
    criterion = functools.partial(losses.stage2_loss, term_weights=term_weights, **term_settings)
    logger.info("Loss = " + " + ".join(f"{weight:g} {name}" for name, weight in term_weights.items())
                + f" ({', '.join(f'{k} {v}' for k, v in term_settings.items())})")

    train_sampler = BalancedBatchSampler(splits["train"].label, args.batch_size, args.seed) \
        if args.balanced_sampling else None
    train_loader = make_loader(datasets["train"], args.batch_size, loader_settings, True, train_sampler)
    if len(train_loader) == 0:
        raise UserError(f"the train split has {len(datasets['train'])} images, fewer than one batch of "
                        f"{args.batch_size}; lower --batch_size")
    val_loader = make_loader(datasets["val"], args.batch_size, loader_settings)
    model = LogitsAndEmbedding(student)
    optimizer = create_optimizer_v2(student, "adamw", lr=args.learning_rate, weight_decay=args.weight_decay)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    set_seed(args.seed, device_specific=True)
    soft_targets = soft_targets.to(accelerator.device)
    scheduler, total_updates, updates_per_epoch = build_scheduler(optimizer, args, len(train_loader))
    state, skip_batches = resume_or_start(accelerator, args, latest_dir, updates_per_epoch)
    scheduler.step_update(state["global_step"])

    stopper = StopOnSignal(train_loader, val_loader)
    progress = wfas_data.progress_bar(total=total_updates, initial=state["global_step"], desc="stage 2",
                                      disable=not accelerator.is_local_main_process)
    run_meter = RunMeter(args.num_epochs, total_updates, updates_per_epoch)
    checkpoint_metadata = {"model_name": args.model_name, "img_size": str(img_size),
                           "face_crop_scale": str(args.face_crop_scale), "compute": compute}
    for epoch in range(state["epoch"] + 1, args.num_epochs):
        if state["global_step"] >= total_updates:
            break
        model.train()
        for sampler in (train_loader, train_sampler):  # the balanced sampler draws each epoch's batches anew
            if sampler is not None:
                sampler.set_epoch(epoch)
        meter = EpochMeter(accelerator, state)
        batches = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
        skip_batches = 0  # the seedable sampler replays the epoch: a mid-epoch resume skips what was trained
        for batch in meter.timed(batches):
            with accelerator.accumulate(model):
                images = wfas_data.to_model_input(batch["image"], mean, std, color_jitter=args.color_jitter)
                logits, embeddings = model(images)
                loss, parts = criterion(logits, embeddings, batch["label"], soft_targets[batch["index"]],
                                        weights=batch["ok"].float())  # undecodable images weigh 0
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            meter.add(batch, loss, parts)
            if accelerator.sync_gradients and after_update(accelerator, args, state, scheduler, progress, meter,
                                                           stopper, latest_dir, total_updates):
                break
        train = meter.finish()
        val, _ = wfas_data.evaluate(model, val_loader, splits["val"], accelerator, mean, std, log_warning=warn)
        improved = keep_best(accelerator, state, epoch, val, student, best_path, checkpoint_metadata)
        save_latest(accelerator, latest_dir, state)
        run_meter.log_epoch(accelerator, output_dir, epoch, state, train, val, meter, optimizer, improved, start_time)
        stopper.stop_if_requested(accelerator, latest_dir, state)
    progress.close()
    stopper.restore()
    load_best(accelerator, student, best_path)
    # The threshold is the EER point of the best model on val; test is scored at it, never fitted on test.
    val, val_rows = wfas_data.evaluate(model, val_loader, splits["val"], accelerator, mean, std, tta=args.tta,
                                       log_warning=warn)
    test_loader = accelerator.prepare(make_loader(datasets["test"], args.batch_size, loader_settings))
    test, test_rows = wfas_data.evaluate(model, test_loader, splits["test"], accelerator, mean, std,
                                         val["threshold"], args.tta, desc="test", log_warning=warn)
    # deployers trade one error for the other: thresholds fitted on val for the error rates they can afford
    operating_points = wfas_data.operating_points(val_rows[3], val_rows[1], test_rows[3], test_rows[1])
    stage1_results = output_dir / "stage1_results.json"
    teacher_test = json.loads(stage1_results.read_text())["test"] if stage1_results.is_file() else {}
    results = {
        **{f"test_{k}": test[k] for k in ("acc", "acer", "apcer", "bpcer", "auc", "eer", "apcer_per_attack")},
        "test_worst_apcer": test["worst_apcer"], "threshold": val["threshold"], "operating_points": operating_points,
        "val_acc": val["acc"], "val_acer": val["acer"], "val_auc": val["auc"], "best_epoch": state["best_epoch"] + 1,
        "num_test_images": test["num_images"], "num_val_images": val["num_images"],
        "teacher_test_acer": teacher_test.get("acer"), "teacher_test_acc": teacher_test.get("acc"),
        "num_soft_label_fallbacks": num_fallback, "model_name": args.model_name, "img_size": img_size,
        **run_meter.totals(accelerator, start_time), "compute": compute,
    }
    logger.info(f"Best epoch {results['best_epoch']}: val {wfas_data.format_metrics(val)}")
    logger.info(f"Test at the val threshold {val['threshold']:.4f}: {wfas_data.format_metrics(test)}")
    logger.info(wfas_data.format_operating_points(operating_points))
    if results["teacher_test_acer"] is not None:
        logger.info(f"Teacher (stage 1) test ACER {results['teacher_test_acer']:.4f}, "
                    f"student {results['test_acer']:.4f}")
    if accelerator.is_main_process:
        wfas_data.write_predictions(output_dir / "stage2_val_predictions.csv", *val_rows)
        wfas_data.write_predictions(output_dir / "stage2_test_predictions.csv", *test_rows)
        wfas_data.write_json(output_dir / "final_results.json", results)
        logger.info(f"Wrote {output_dir / 'final_results.json'} and the per-image predictions")
        logger.info(f"Report: {report.write_all(output_dir, (STAGE,), log=logger.warning)} (plots in "
                    f"{output_dir / 'plots'})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


# ----------------------------------------------------------------------------------------------------------
# Shared with train_stage1.py: each helper below is a copy of train_stage1.py's, under its marker. Edit them
# there, then run `python tests/test_copies.py --fix`; the test suite fails when a copy drifts.
# ----------------------------------------------------------------------------------------------------------

# Copied from train_stage1.py
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring keeps its layout; every flag shows its default unless its help already tells it."""

    def _get_help_string(self, action):
        if "(default" in action.help or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return action.help + " (default: %(default)s)"


# Copied from train_stage1.py
def parse_with_config(parser, argv):
    """Flags from --config FILE.json first, then the command line on top; an unknown key is a user error."""
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
                            f"`python train_{STAGE}.py --help` without the dashes")
        parser.set_defaults(**config)
    args = parser.parse_args(argv)
    args.output_dir = str(Path(args.output_dir).expanduser())
    trackers = [str(t) for t in get_available_trackers()]
    if args.report_to not in ("none", "all", *trackers):
        raise UserError(f"--report_to {args.report_to}: no such tracker is installed here (installed: "
                        f"{', '.join(trackers) or 'none'}); e.g. pip install tensorboard")
    if args.model_cache_dir is None:
        args.model_cache_dir = str(models.cache_dir(args.output_dir, STAGE, args.model_name))
    if args.face_cache_dir is None:
        args.face_cache_dir = str(Path(args.output_dir) / "face_cache")
    return args


# Copied from train_stage1.py
def start_run(args, output_dir, ckpt_dir):
    """The Accelerator, the log (console on every process, accelerate's logger keeping the others quiet, plus a
    file on the main process), the shared seed, and the resolved flags saved next to the checkpoints."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # the same shuffle on every resume, so that --resume_from_checkpoint continues the same run
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (Ampere and later)
    handlers = [logging.StreamHandler(sys.stdout)]
    if accelerator.is_main_process:
        (output_dir / "logs" / STAGE).mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        handlers.append(logging.FileHandler(output_dir / "logs" / STAGE / f"{STAGE}_training_{stamp}.log"))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, handlers=handlers, force=True)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # per-file save_state chatter
    # The same seed on every process for the model's init and the seedable sampler's shuffle (taken at
    # prepare()); a per-process seed after prepare() for augmentation and stochastic depth.
    set_seed(args.seed)
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in RUN_CONTROL_KEYS}
        wfas_data.write_json(output_dir / f"{STAGE}_config.json", config)
    accelerator.init_trackers(STAGE, config={k: v for k, v in vars(args).items()
                                             if isinstance(v, (int, float, str, bool))})
    return accelerator, handlers[-1].baseFilename if accelerator.is_main_process else None


# Copied from train_stage1.py
def log_setup(accelerator, args, img_size, compute, table, loader_settings, cache, log_file, extra=""):
    logger.info(f"{STAGE.replace('stage', 'Stage ')}: {args.model_name} "
                f"({'pretrained' if args.pretrained else 'from scratch'}), {accelerator.num_processes} process(es) "
                f"on {accelerator.device.type}, mixed precision {accelerator.mixed_precision}, image size {img_size}, "
                f"batch {args.batch_size} x {accelerator.num_processes} x {args.gradient_accumulation_steps}{extra}")
    logger.info(f"Compute: {compute['params_m']:.2f} M parameters; {compute['challenge_limit']}")
    logger.info(f"Data {table.root}, {len(table)} images:\n{wfas_data.describe_split(table)}")
    logger.info(wfas_data.describe_loader(loader_settings, cache))
    if log_file:
        logger.info(f"Logging to {log_file}")


# Copied from train_stage1.py
def warn(message):
    """A warning from whichever process meets it (accelerate's logger speaks on the main process only)."""
    logger.warning(message, main_process_only=False)


# Copied from train_stage1.py
def main_process_first(accelerator, work):
    """work() on the main process, then on the others (it writes what they read). A user error on the main
    process reaches every process, which then raises it too: none is left waiting at a barrier."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except UserError as exc:
            error = str(exc)
    error = broadcast_object_list([error])[0]
    if error is not None:
        raise UserError(error)
    if not accelerator.is_main_process:
        result = work()
    return result


# Copied from train_stage1.py
def create_model(model_name, img_size=None, pretrained=False, pretrained_file=None, cache_dir=None,
                 drop_path_rate=0.0):
    kwargs = dict(num_classes=2, drop_path_rate=drop_path_rate)
    cfg = timm.get_pretrained_cfg(model_name)
    if img_size and cfg and cfg.fixed_input_size:  # e.g. MaxViT: its window grid is built for one input size
        kwargs["img_size"] = img_size
    if not pretrained:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    weights = Path(pretrained_file) if pretrained_file else models.fetch_pretrained(model_name, cache_dir)
    if not weights.is_file():
        raise UserError(f"--pretrained_file {weights} does not exist")
    try:  # timm loads the file, drops the 1000-class head and resizes what depends on the input size
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                                 **kwargs)
    except (RuntimeError, OSError, ValueError) as error:
        raise UserError(f"cannot load {weights} into {model_name}: {str(error).splitlines()[0]}") from None


# Copied from train_stage1.py
def prepare_data(accelerator, args, table, net):
    """The model's normalisation and input size, its compute budget, the loader settings, the face cache (built
    by all processes together when it is missing) and the datasets of a split table."""
    data_config = timm.data.resolve_data_config({}, model=net)
    img_size = args.img_size or data_config["input_size"][-1]
    compute = wfas_data.compute_budget(net, args.model_name, img_size)
    loader_settings = wfas_data.default_loader_settings(args.num_workers)
    cache = wfas_data.build_face_cache(
        table, args.face_cache_dir, img_size, args.face_crop_scale, loader_settings["num_workers"],
        accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone, logger.info,
    ) if args.face_cache else None
    datasets = wfas_data.build_datasets(table, img_size, train_transform(img_size), args.face_crop_scale, cache)
    return data_config["mean"], data_config["std"], img_size, compute, loader_settings, cache, datasets


# Copied from train_stage1.py
def make_loader(dataset, batch_size, loader_settings, shuffle=False, batch_sampler=None):
    """A DataLoader whose workers ignore the stop signals (StopOnSignal) and persist across epochs, as timm's
    do: StopOnSignal shuts them down before the process exits."""
    workers = dict(worker_init_fn=StopOnSignal.shield_loader_worker,
                   persistent_workers=loader_settings["num_workers"] > 0, **loader_settings)
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **workers)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, **workers)


# Copied from train_stage1.py
def build_scheduler(optimizer, args, batches_per_epoch):
    """Linear warmup, then cosine decay to 1% of the peak, per update. The LR is a function of the update count
    and of this run's settings alone, never saved: a resumed run follows the schedule of an uninterrupted run
    with its own settings, whatever the saved one used. Returns (scheduler, total updates, updates per epoch)."""
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total_updates = args.num_epochs * updates_per_epoch
    if args.max_train_steps:
        total_updates = min(total_updates, args.max_train_steps)
    warmup = min(round(args.warmup_epochs * updates_per_epoch), total_updates // 2)  # short runs still decay
    scheduler = CosineLRScheduler(optimizer, t_initial=max(total_updates - warmup, 1), lr_min=args.learning_rate * 0.01,
                                  warmup_t=warmup, warmup_lr_init=args.learning_rate * 0.01, warmup_prefix=True,
                                  t_in_epochs=False)
    return scheduler, total_updates, updates_per_epoch


# Copied from train_stage1.py
class EpochMeter:
    """One epoch's counters: images, the wait for data, undecodable images, and the loss and its parts, summed
    on the device (.item() every step would make the CPU wait for it)."""

    def __init__(self, accelerator, state):
        self.accelerator, self.state = accelerator, state
        self.start, self.images, self.steps, self.undecodable, self.seen, self.data_wait = time.time(), 0, 0, 0, 0, 0.0
        self.sums = {}

    def timed(self, batches):
        """The batches, with the wait for each one timed and its undecodable images counted."""
        waiting_since = time.perf_counter()
        for batch in batches:
            self.data_wait += time.perf_counter() - waiting_since
            self.undecodable += wfas_data.check_batch(batch, warn)
            self.seen += len(batch["error"])
            wfas_data.check_undecodable_share(self.undecodable, self.seen)
            yield batch
            waiting_since = time.perf_counter()

    def add(self, batch, loss, parts=None):
        for name, value in {"loss": loss.detach(), **(parts or {})}.items():
            self.sums[name] = self.sums.get(name, 0) + value
        self.steps += 1
        batch_images = len(batch["error"]) * self.accelerator.num_processes
        self.state["images_done"] += batch_images
        self.images += batch_images

    def mean(self, name):
        return self.sums[name].item() / self.steps

    def finish(self):
        """The epoch's mean loss and parts; the undecodable count summed over processes (on every process)."""
        self.seconds = time.time() - self.start
        self.undecodable = int(self.accelerator.reduce(torch.tensor(self.undecodable, device=self.accelerator.device),
                                                       reduction="sum"))
        return {name: self.mean(name) for name in self.sums}


# Copied from train_stage1.py
def after_update(accelerator, args, state, scheduler, progress, meter, stopper, latest_dir, total_updates):
    """The bookkeeping of one optimizer update: schedule, progress, --checkpointing_steps, and a stop signal,
    which saves the state where the run stands and exits. Returns whether the run has made all its updates."""
    state["global_step"] += 1
    scheduler.step_update(state["global_step"])
    progress.update(1)
    if state["global_step"] % 20 == 0:
        speed = meter.images / (time.time() - meter.start)
        progress.set_postfix(loss=f"{meter.mean('loss'):.4f}", img_s=f"{speed:.0f}")
    if args.checkpointing_steps and state["global_step"] % args.checkpointing_steps == 0:
        save_latest(accelerator, latest_dir, state)
        logger.info(f"Wrote {latest_dir} at update {state['global_step']} (epoch {state['epoch'] + 2}, "
                    f"{state['images_done']} images)")
    if stopper.requested(accelerator, state["global_step"]):
        save_latest(accelerator, latest_dir, state)
        stopper.stop(latest_dir, state)
    return state["global_step"] >= total_updates


# Copied from train_stage1.py
def keep_best(accelerator, state, epoch, val, net, best_path, metadata):
    """Ends the epoch in the state; saves net (the plain timm model) as the best checkpoint when its val ACER is
    the lowest so far. Returns whether it was."""
    state.update(epoch=epoch, images_done=0)
    improved = val["acer"] < state["best_val_acer"]
    if improved:
        state.update(best_epoch=epoch, best_val_acer=val["acer"])
        save_best(accelerator, net, best_path, {**metadata, "epoch": str(epoch), "val_metrics": val})
    return improved


# Copied from train_stage1.py
def load_best(accelerator, net, best_path):
    if not best_path.is_file():
        raise UserError(f"no best checkpoint at {best_path}: training ran no epoch (check --num_epochs)")
    accelerator.wait_for_everyone()
    net.load_state_dict(load_file(best_path))


# Copied from train_stage1.py
class RunMeter:
    """The run's throughput and ETA, and the per-epoch log line, summary.csv row and tracker values, all derived
    from the parts of the loss, so that a new loss term shows up everywhere by itself."""

    def __init__(self, num_epochs, total_updates, updates_per_epoch):
        self.num_epochs, self.total_updates, self.updates_per_epoch = num_epochs, total_updates, updates_per_epoch
        self.images, self.seconds, self.epochs, self.start = 0, 0.0, 0, time.time()

    def log_epoch(self, accelerator, output_dir, epoch, state, train, val, meter, optimizer, improved, start_time):
        self.images += meter.images
        self.seconds += meter.seconds
        self.epochs += 1
        epochs_left = min(self.num_epochs - epoch - 1,
                          math.ceil((self.total_updates - state["global_step"]) / self.updates_per_epoch))
        eta = (time.time() - self.start) / self.epochs * epochs_left
        lr, speed, wait = optimizer.param_groups[0]["lr"], meter.images / meter.seconds, meter.data_wait / meter.seconds
        parts = " ".join(f"{k} {v:.4f}" for k, v in train.items() if k != "loss")
        logger.info(f"epoch {epoch + 1}/{self.num_epochs}  train loss {train['loss']:.4f}"
                    + (f" ({parts})" if parts else "") + f"  val loss {val['loss']:.4f}  "
                    f"val {wfas_data.format_metrics(val)}  lr {lr:.2e}  {speed:.0f} img/s  data wait {wait:.0%}  "
                    f"elapsed {datetime.timedelta(seconds=round(time.time() - start_time))}  "
                    f"ETA {datetime.timedelta(seconds=round(eta))}" + ("  (best)" if improved else "")
                    + (f"  {meter.undecodable} undecodable images skipped" if meter.undecodable else ""))
        val_numbers = {k: val[k] for k in ("loss", "acer", "apcer", "bpcer", "auc")}
        if accelerator.is_main_process:
            wfas_data.write_summary_row(output_dir / "logs" / STAGE / "summary.csv", {
                "epoch": epoch + 1, **{f"train_{k}": v for k, v in train.items()},
                **{f"val_{k}": v for k, v in val_numbers.items()}, "lr": lr, "images_per_second": speed,
                "data_wait_share": wait})
        accelerator.log({**{f"train/{k}": v for k, v in train.items()}, "train/lr": lr,
                         "train/images_per_second": speed, "train/data_wait_share": wait,
                         **{f"val/{k}": v for k, v in val.items() if isinstance(v, (int, float))}}, step=epoch)

    def totals(self, accelerator, start_time):
        return {"wall_time_s": round(time.time() - start_time, 1),
                "images_per_second": round(self.images / self.seconds, 1) if self.seconds else None,
                "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision}


# Copied from train_stage1.py
def save_best(accelerator, module, path, metadata):
    """A plain timm model's weights in safetensors, with metadata; written aside and renamed into place.
    module: the model before prepare(), so that the keys carry no DDP or torch.compile prefix."""
    if accelerator.is_main_process:
        weights = {k: v.contiguous().cpu() for k, v in module.state_dict().items()}
        tmp = wfas_data.aside(path)
        save_file(weights, tmp, metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
        os.replace(tmp, path)


# Copied from train_stage1.py
def save_latest(accelerator, latest_dir, training_state):
    """The full accelerate state (model, optimizer, RNG, sampler) plus our counters, written to a .tmp
    folder and swapped in. A kill at any instruction leaves a complete state in latest, in .tmp (once its
    training_state.json is written) or in an .old-* folder, and resolve_resume finds it. The replaced state
    goes to an .old-* name of its own, so a leftover that cannot be deleted (an NFS silly-rename file, a
    kill during rmtree) never blocks the next swap."""
    tmp = latest_dir.with_name(latest_dir.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():  # a kill's leftover: moved aside, as it may not delete
        tmp.rename(latest_dir.with_name(f"{latest_dir.name}.old-{time.time_ns()}"))
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        wfas_data.write_json(tmp / "training_state.json", training_state)
        if latest_dir.exists():
            latest_dir.rename(latest_dir.with_name(f"{latest_dir.name}.old-{time.time_ns()}"))
        tmp.rename(latest_dir)
        for old in latest_dir.parent.glob(f"{latest_dir.name}.old*"):
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# Copied from train_stage1.py
def resolve_resume(resume, latest_dir):
    """The state to resume from, or None to start fresh: `latest` with no saved state yet is a first start,
    so that a requeued job can run the same command every time; an explicit folder must exist."""
    path = latest_dir if resume == "latest" else Path(resume)
    candidates = [path, path.with_name(path.name + ".tmp"),  # a kill between the two renames of save_latest
                  *sorted(path.parent.glob(f"{path.name}.old*"), reverse=True)]
    for candidate in candidates:
        if (candidate / "training_state.json").is_file():
            return candidate
    if resume == "latest":
        return None
    raise UserError(f"--resume_from_checkpoint {resume}: no saved state at {path} "
                    f"(expected a {STAGE}_latest folder written by an earlier run)")


# Copied from train_stage1.py
def resume_or_start(accelerator, args, latest_dir, updates_per_epoch):
    """The training state (the last finished epoch, the images of the next one already trained over all
    processes, the update count, the best so far) and the batches each process skips in the unfinished epoch:
    from --resume_from_checkpoint, or a fresh start. Logs accelerate's own lines of the load, so that the log
    says what it could not restore (the random states of another number of processes, say)."""
    state = {"epoch": -1, "images_done": 0, "global_step": 0, "best_epoch": -1, "best_val_acer": math.inf}
    skip_batches = 0
    resume_dir = args.resume_from_checkpoint and resolve_resume(args.resume_from_checkpoint, latest_dir)
    if resume_dir:
        accelerate_logger = logging.getLogger("accelerate")
        accelerate_logger.setLevel(logging.INFO)
        try:
            accelerator.load_state(str(resume_dir))
        finally:
            accelerate_logger.setLevel(logging.WARNING)
        state = json.loads((resume_dir / "training_state.json").read_text())
        skip_batches, global_step = resume_position(state, args.batch_size, accelerator.num_processes,
                                                    args.gradient_accumulation_steps, updates_per_epoch)
        if global_step != state["global_step"]:
            logger.info(f"The batch size, processes or accumulation changed: the run goes on at update {global_step} "
                        f"of the new schedule (update {state['global_step']} of the old one)")
        state["global_step"] = global_step
        logger.info(f"Resumed from {resume_dir}: epoch {state['epoch'] + 1} of {args.num_epochs} done"
                    + (f" and {skip_batches} batches of the next" if skip_batches else "")
                    + f", {state['global_step']} updates, best val ACER {state['best_val_acer']:.4f}")
    elif args.resume_from_checkpoint:
        logger.info(f"No saved state in {latest_dir} yet: starting from the beginning")
    state.update(batch_size=args.batch_size, num_processes=accelerator.num_processes)
    return state, skip_batches


# Copied from train_stage1.py
def resume_position(state, batch_size, num_processes, gradient_accumulation_steps, updates_per_epoch):
    """Where a resumed run goes on: the batches of the unfinished epoch each process skips, and the update
    count an uninterrupted run with the current settings has there, which the LR schedule follows.
    Counted in images, which holds when the number of processes or the batch size changed."""
    images_per_batch = batch_size * num_processes
    if state["images_done"] % images_per_batch:
        raise UserError(f"the saved state is {state['images_done']} images into an epoch, not a whole number of "
                        f"batches of {batch_size} x {num_processes} processes: resume mid-epoch with the batch "
                        f"size and processes it was saved with ({state['batch_size']} x {state['num_processes']})"
                        ", or from a state saved at the end of an epoch")
    batches = state["images_done"] // images_per_batch
    return batches, (state["epoch"] + 1) * updates_per_epoch + batches // gradient_accumulation_steps


# Copied from train_stage1.py
class StopOnSignal:
    """SIGTERM (preemption) and SIGUSR1 (SLURM's --signal) ask the run to stop: every process finishes its
    step, the resumable state is saved where the run stands, and it exits. Processes agree on the update at
    which they stop through accelerate's trigger, an all-reduce that makes the CPU wait for the device, so
    several processes check it every CHECK_EVERY updates only.

    Schedulers signal every process of a job, loader workers too, so workers ignore the stop signals
    (shield_loader_worker). They persist across epochs: restore() shuts those of `loaders` down when training
    ends, and at exit any that are left are killed, as multiprocessing's exit would wait on them forever."""
    CHECK_EVERY = 10
    exit_hook = False

    def __init__(self, *loaders):
        self.signum, self.loaders = None, loaders
        self.handled = (signal.SIGTERM, signal.SIGUSR1)
        if threading.current_thread() is threading.main_thread():  # Python takes signals there only
            for signum in self.handled:
                signal.signal(signum, self._handler)
        if not StopOnSignal.exit_hook:  # registered after multiprocessing's exit hook, so it runs before it
            atexit.register(StopOnSignal.end_loader_workers)
            StopOnSignal.exit_hook = True

    def _handler(self, signum, frame):
        self.signum = signum

    def requested(self, accelerator, update=None):
        """Whether to stop now; the same answer on every process. Call it on all of them at the same point."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        if update is not None and update % self.CHECK_EVERY:
            return False
        if self.signum is not None:
            accelerator.set_trigger()
        return accelerator.check_trigger()

    def stop_if_requested(self, accelerator, latest_dir, state):
        if self.requested(accelerator):
            self.stop(latest_dir, state)

    def stop(self, latest_dir, state):
        signum = self.signum or signal.SIGTERM
        logger.info(f"Stopped by {signal.Signals(signum).name} at update {state['global_step']}; the resumable "
                    f"state is in {latest_dir}. To go on, run the same command with --resume_from_checkpoint latest")
        raise SystemExit(128 + signum)

    @staticmethod
    def shield_loader_worker(worker_id):
        """A DataLoader worker_init_fn: a worker dies of SIGTERM by default, which would break the step the run
        is finishing; workers ignore the stop signals and are shut down by their parent."""
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_IGN)

    @staticmethod
    def end_loader_workers():
        """multiprocessing's exit terminates (SIGTERM) its daemonic children, loader workers, and waits for
        them; at exit their work is over, so those that ignore SIGTERM are killed instead (without torch's
        SIGCHLD handler, which would report each one as a failed worker)."""
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()

    def restore(self):
        """Back to the default actions: past the training loop, a signal should end the run at once. The
        loaders' persistent workers are shut down as torch does when an iterator is dropped."""
        for loader in self.loaders:
            loader = getattr(loader, "base_dataloader", loader)  # accelerate's wrapper
            if getattr(loader, "_iterator", None) is not None:
                loader._iterator._shutdown_workers()
                loader._iterator = None
        if threading.current_thread() is threading.main_thread():
            for signum in self.handled:
                signal.signal(signum, signal.SIG_DFL)


if __name__ == "__main__":
    wfas_data.run_cli(main)
