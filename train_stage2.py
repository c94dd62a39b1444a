"""Stage 2 of the NetEase WFAS recipe: a MaxViT student trained with focal + triplet + distillation losses
against stage 1's soft labels, and its final val/test results.

    accelerate launch train_stage2.py --output_dir EXP                  # after stage 1 wrote EXP
    python train_stage2.py --output_dir EXP --config configs/stage2_recipe.json

Writes into EXP: stage2_config.json, checkpoints/stage2/, logs/stage2/ (the log, summary.csv), final_results.json
(test metrics, threshold, operating points, compute), stage2_{val,test}_predictions.csv, plots/, report.md.
The submission, folder scoring and ONNX export are tools/predict.py and tools/export_onnx.py.
"""
import argparse
import datetime
import functools
import json
import logging
import math
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
from timm.utils import ModelEmaV3
from torchvision.transforms import v2 as T

import losses
import wfas_data
from tools import models, report
from wfas_data import LIVE, SPOOF, UserError

STAGE = "stage2"
logger = get_logger(STAGE)
warn = functools.partial(logger.warning, main_process_only=False)  # a warning from whichever process meets it

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
    group.add_argument("--img_size", type=int, default=None, help="input size (default: the model's)")
    group.add_argument("--color_jitter", type=float, default=0.1, help="as for stage 1; 0 turns it off")
    group.add_argument("--num_workers", type=int, default=None, help="loader workers per process (as for stage 1)")
    group.add_argument("--face_cache", action=argparse.BooleanOptionalAction, default=True, help="as for stage 1")
    group.add_argument("--face_cache_dir", help="as for stage 1 (default: EXP/face_cache, stage 1's)")
    group.add_argument("--balanced_sampling", action=argparse.BooleanOptionalAction,
                       help="half live, half spoof batches (default: on when --triplet_weight > 0)")

    group = parser.add_argument_group("model")
    group.add_argument("--model_name", default="maxvit_base_tf_224", help="any timm model")
    group.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True, help="ImageNet weights")
    group.add_argument("--pretrained_file", help="local .safetensors or .pth weights to start from")
    group.add_argument("--model_cache_dir", help="as for stage 1 (default: EXP/model/stage2/<model>)")
    group.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth")
    group.add_argument("--channels_last", action="store_true", help="NHWC memory layout (as for stage 1)")

    group = parser.add_argument_group("losses (a term's weight: --<term>_weight; see losses.STAGE2_TERMS)")
    group.add_argument("--focal_weight", type=float, default=1.0, help="weight of the focal loss")
    group.add_argument("--triplet_weight", type=float, default=0.5, help="weight of the batch-hard triplet loss")
    group.add_argument("--kd_weight", type=float, default=1.0, help="weight of the distillation loss")
    group.add_argument("--focal_gamma", type=float, default=2.0, help="focusing parameter; 0 is cross-entropy")
    group.add_argument("--focal_alpha", type=float, nargs=2, metavar=("SPOOF", "LIVE"), help="per-class weights")
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
    group.add_argument("--model_ema_decay", type=float, default=0.0, help="as for stage 1 (e.g. 0.999); 0: off")

    group = parser.add_argument_group("checkpoints and logging")
    group.add_argument("--resume_from_checkpoint", help="'latest' or a stage2_latest folder (as for stage 1)")
    group.add_argument("--checkpointing_steps", type=int, default=0, help="as for stage 1 (0: per epoch)")
    group.add_argument("--report_to", default="none", help="tensorboard, wandb, ... or all (as for stage 1)")
    return parser


def parse_args(argv=None):
    args = parse_with_config(build_parser(), argv)
    if not timm.is_model(args.model_name):
        raise UserError(f"--model_name {args.model_name} is not a timm model; "
                        f"e.g. {', '.join(timm.list_models('maxvit_*')[:6])}")
    stage1_config = Path(args.output_dir) / "stage1_config.json"
    if args.data_root is None and stage1_config.is_file():
        args.data_root = json.loads(stage1_config.read_text()).get("data_root")
    args.soft_labels_path = args.soft_labels_path or str(Path(args.output_dir) / "stage1_soft_labels.pth")
    args.balanced_sampling = args.triplet_weight > 0 if args.balanced_sampling is None else args.balanced_sampling
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
    """Batches of half live, half spoof images, so that every batch holds the positives and negatives the triplet
    loss needs; the smaller class is cycled, and an epoch has as many batches as a plain pass. Every process draws
    the same sequence from (seed, epoch); accelerate gives each its share of the batches: balanced under DDP."""

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

        def draw(pool, per_batch):  # the pool shuffled, and again as often as the epoch needs
            count = self.num_batches * per_batch
            order = np.concatenate([rng.permutation(pool) for _ in range(math.ceil(count / len(pool)))])
            return order[:count].reshape(self.num_batches, per_batch)

        live_per_batch = self.batch_size // 2
        batches = np.concatenate([draw(self.live, live_per_batch), draw(self.spoof, self.batch_size - live_per_batch)],
                                 axis=1)
        yield from (batch.tolist() for batch in batches)


def load_soft_labels(path, splits):
    """Stage 1's {path: [prob_spoof, prob_live]} as a [num_train, 2] tensor aligned with the train dataset (the
    workers do no per-path lookups); images without one get their hard label. Refuses another run's file: one
    that holds val/test images, or covers under 99% of the train images stage 1 could decode."""
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
    targets = np.eye(2, dtype=np.float32)[splits["train"].label]  # the hard-label fallback
    covered = [i for i, image_path in enumerate(train_paths) if image_path in soft_labels]
    for i in covered:
        probs = soft_labels[train_paths[i]]
        if not isinstance(probs, (list, tuple, torch.Tensor)) or len(probs) != 2:
            raise UserError(f"soft labels {path}: the entry of {train_paths[i]} is {probs!r}, not "
                            "[prob_spoof, prob_live]")
        targets[i] = probs
    results = path.with_name("stage1_results.json")
    undecodable = set(json.loads(results.read_text()).get("undecodable_train_images", []) if results.is_file() else [])
    decodable = len(train_paths) - len(undecodable.intersection(train_paths))
    if len(covered) < 0.99 * decodable:
        raise UserError(f"soft labels {path} cover {len(covered)} of the {decodable} train images stage 1 could "
                        "decode (< 99%): they belong to another run or data root; use the stage 1 output of this EXP "
                        "folder")
    return torch.from_numpy(targets), len(train_paths) - len(covered)


def train_transform(img_size):
    """The student's train augmentation, per image in the loader workers (uint8 in and out): as stage 1's, a mild
    zoom into the face crop (the cache's crop is the box x --face_crop_scale: to zoom out, raise it) and a flip."""
    return T.Compose([T.RandomResizedCrop(img_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
                      T.RandomHorizontalFlip()])


def main(argv=None):
    args = parse_args(argv)
    start_time = time.time()
    output_dir = Path(args.output_dir)
    if not (output_dir / "split.csv").is_file():
        raise UserError(f"no split at {output_dir / 'split.csv'}: stage 2 trains on stage 1's split; run stage 1 "
                        f"first (accelerate launch train_stage1.py --data_root WFAS --output_dir {output_dir})")
    if not args.data_root:
        raise UserError(f"--data_root is required: {output_dir / 'stage1_config.json'} does not name one")
    accelerator, log_file = start_run(args, output_dir)
    checkpoints = Checkpoints(accelerator, output_dir)
    table = wfas_data.load_or_create_split(args.data_root, output_dir, log=logger.info)
    splits = {name: table.of_split(name) for name in wfas_data.SPLITS}
    soft_targets, num_fallback = load_soft_labels(args.soft_labels_path, splits)
    student = main_process_first(accelerator, lambda: models.create_model(  # the others reuse the fetched weights
        args.model_name, args.img_size, args.pretrained, args.pretrained_file, args.model_cache_dir,
        args.drop_path_rate))
    mean, std, img_size, compute, loaders, cache, datasets = prepare_data(
        accelerator, args, table, student, log_file, ", class-balanced" if args.balanced_sampling else "")
    logger.info(f"Soft labels {args.soft_labels_path}: {len(splits['train']) - num_fallback} train images, "
                f"{num_fallback} fall back to their hard label")
    term_weights = {name: getattr(args, f"{name}_weight") for name in losses.STAGE2_TERMS}  # --<term>_weight
    term_settings = dict(focal_gamma=args.focal_gamma, focal_alpha=args.focal_alpha,
                         triplet_margin=args.triplet_margin, kd_temperature=args.kd_temperature)
    criterion = functools.partial(losses.stage2_loss, term_weights=term_weights, **term_settings)  # built once
    logger.info("Loss = " + " + ".join(f"{weight:g} {name}" for name, weight in term_weights.items())
                + f" ({', '.join(f'{k} {v}' for k, v in term_settings.items())})")

    sampler = BalancedBatchSampler(splits["train"].label, args.batch_size, args.seed) if args.balanced_sampling \
        else None
    train_loader = loaders.make(datasets["train"], shuffle=True, batch_sampler=sampler, persistent=True)
    val_loader = loaders.make(datasets["val"], persistent=True)
    net = LogitsAndEmbedding(student)
    optimizer = create_optimizer_v2(student, "adamw", lr=args.learning_rate, weight_decay=args.weight_decay,
                                    fused=accelerator.device.type in ("cpu", "cuda"))  # README: Performance
    model, optimizer, train_loader, val_loader = accelerator.prepare(net, optimizer, train_loader, val_loader)
    set_seed(args.seed, device_specific=True)
    ema = checkpoints.track_ema(net, args.model_ema_decay)  # when on, what is validated, kept and deployed
    soft_targets = soft_targets.to(accelerator.device)
    scheduler, total_updates, updates_per_epoch = build_scheduler(optimizer, args, len(train_loader))
    state, skip_batches = checkpoints.resume(args, updates_per_epoch)
    scheduler.step_update(state["global_step"])

    stopper = StopOnSignal(train_loader, val_loader)
    run_log = RunLog(accelerator, args, state, total_updates, updates_per_epoch, start_time, "stage 2", "summary.csv")
    best_metadata = {"model_name": args.model_name, "img_size": str(img_size),
                     "face_crop_scale": str(args.face_crop_scale), "compute": compute}
    for epoch in range(state["epoch"] + 1, args.num_epochs):
        if state["global_step"] >= total_updates:
            break
        model.train()
        train_loader.set_epoch(epoch)
        if sampler is not None:  # the balanced sampler draws each epoch's batches anew
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
                if ema is not None and accelerator.sync_gradients:
                    ema.update(net, step=state["global_step"] + 1)
            meter.add(batch, loss, parts)
            if accelerator.sync_gradients and run_log.after_update(meter, scheduler, checkpoints, stopper):
                break
        train = meter.finish()
        val, _ = wfas_data.evaluate(ema or model, val_loader, splits["val"], accelerator, mean, std, log_warning=warn)
        improved = checkpoints.keep_best(state, epoch, val, ema.module.net if ema else student, best_metadata)
        checkpoints.save_latest(state)
        run_log.log_epoch(output_dir, epoch, train, val, meter, optimizer.param_groups[0]["lr"], improved)
        if stopper.requested(accelerator):
            stopper.stop(checkpoints.latest_dir, state)
    run_log.progress.close()
    stopper.restore()
    checkpoints.load_best(student)

    # The threshold is the EER point of the best model on val; test is scored at it, never fitted on test.
    val, val_rows = wfas_data.evaluate(model, val_loader, splits["val"], accelerator, mean, std, tta=args.tta,
                                       log_warning=warn)
    test_loader = accelerator.prepare(loaders.make(datasets["test"]))
    test, test_rows = wfas_data.evaluate(model, test_loader, splits["test"], accelerator, mean, std,
                                         val["threshold"], args.tta, desc="test", log_warning=warn)
    # deployers trade one error for the other: thresholds fitted on val for the error rates they can afford
    operating_points = report.operating_points(val_rows[3], val_rows[1], test_rows[3], test_rows[1])
    stage1_results = output_dir / "stage1_results.json"
    teacher_test = json.loads(stage1_results.read_text())["test"] if stage1_results.is_file() else {}
    results = {  # test_: every test metric (with --unseen_attacks, of the seen and unseen types too)
        **{f"test_{k}": v for k, v in test.items() if k not in ("threshold", "num_images", "loss", "unreadable")},
        "threshold": val["threshold"], "operating_points": operating_points, "best_epoch": state["best_epoch"] + 1,
        "val_acc": val["acc"], "val_acer": val["acer"], "val_auc": val["auc"], "num_val_images": val["num_images"],
        "num_test_images": test["num_images"], "num_soft_label_fallbacks": num_fallback,
        "teacher_test_acer": teacher_test.get("acer"), "teacher_test_acc": teacher_test.get("acc"),
        "model_name": args.model_name, "img_size": img_size, **run_log.totals(), "compute": compute}
    logger.info(f"Best epoch {results['best_epoch']}: val {wfas_data.format_metrics(val)}")
    logger.info(f"Test at the val threshold {val['threshold']:.4f}: {wfas_data.format_metrics(test, True)}")
    logger.info(report.format_operating_points(operating_points))
    if results["teacher_test_acer"] is not None:
        logger.info(f"Teacher (stage 1) test ACER {teacher_test['acer']:.4f}, student {test['acer']:.4f}")
    if accelerator.is_main_process:
        wfas_data.write_predictions(output_dir / "stage2_val_predictions.csv", *val_rows)
        wfas_data.write_predictions(output_dir / "stage2_test_predictions.csv", *test_rows)
        wfas_data.write_json(output_dir / "final_results.json", results)
        logger.info(f"Wrote {output_dir / 'final_results.json'}, the per-image predictions and the report "
                    f"{report.write_all(output_dir, (STAGE,), log=logger.warning)} (plots in {output_dir / 'plots'})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


# ----------------------------------------------------------------------------------------------------------
# Shared with train_stage1.py: each helper below is a copy of train_stage1.py's, under its marker. Edit them there,
# then run `python tests/test_copies.py --fix`; the test suite fails when a copy drifts.

# Copied from train_stage1.py
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring keeps its layout; every flag shows its default unless its help already tells it."""

    def _get_help_string(self, action):
        told = "(default" in action.help or action.default in (None, False, argparse.SUPPRESS)
        return action.help + ("" if told else " (default: %(default)s)")


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
        if unknown := sorted(set(config) - ({action.dest for action in parser._actions} - {"help", "config"})):
            raise UserError(f"unknown key(s) {', '.join(unknown)} in {config_file}; valid keys are the flags of "
                            f"`python train_{STAGE}.py --help` without the dashes")
        parser.set_defaults(**config)
    args = parser.parse_args(argv)
    args.output_dir = str(Path(args.output_dir).expanduser())
    trackers = [str(t) for t in get_available_trackers()]
    if args.report_to not in ("none", "all", *trackers):
        raise UserError(f"--report_to {args.report_to}: no such tracker is installed here (installed: "
                        f"{', '.join(trackers) or 'none'}); e.g. pip install tensorboard")
    args.model_cache_dir = args.model_cache_dir or str(models.cache_dir(args.output_dir, STAGE, args.model_name))
    args.face_cache_dir = args.face_cache_dir or str(Path(args.output_dir) / "face_cache")
    return args


# Copied from train_stage1.py
def start_run(args, output_dir):
    """The Accelerator, the log (the console, and a file on the main process), the seed, the saved flags."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # the same shuffle on every resume, so that --resume_from_checkpoint continues the same run
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (Ampere and later)
    handlers, log_dir = [logging.StreamHandler(sys.stdout)], output_dir / "logs" / STAGE
    if accelerator.is_main_process:
        log_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        handlers.append(logging.FileHandler(log_dir / f"{STAGE}_training_{stamp}.log"))
        wfas_data.write_json(output_dir / f"{STAGE}_config.json",
                             {k: v for k, v in vars(args).items() if k not in RUN_CONTROL_KEYS})
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, handlers=handlers, force=True)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # per-file save_state chatter
    set_seed(args.seed)  # the model's init and the shuffle; main() seeds each process apart after prepare()
    accelerator.init_trackers(STAGE, config={k: v for k, v in vars(args).items()
                                             if isinstance(v, (int, float, str, bool))})
    return accelerator, handlers[-1].baseFilename if accelerator.is_main_process else None


# Copied from train_stage1.py
def main_process_first(accelerator, work):
    """work() on the main process, then on the others (it writes what they read); a user error on the main
    process is raised on every process, so that none waits at a barrier."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except UserError as exc:
            error = str(exc)
    if (error := broadcast_object_list([error])[0]) is not None:
        raise UserError(error)
    return work() if not accelerator.is_main_process else result


# Copied from train_stage1.py
def prepare_data(accelerator, args, table, net, log_file, extra=""):
    """The model's memory layout, input settings and compute budget, the loaders, the face cache (all processes
    build it together when it is missing) and the datasets of a split table; all of it logged."""
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    data_config = timm.data.resolve_data_config({}, model=net)
    img_size = args.img_size or data_config["input_size"][-1]
    compute = models.compute_budget(net, args.model_name, img_size)
    loaders = wfas_data.Loaders(args.batch_size, args.num_workers)
    cache = wfas_data.build_face_cache(
        table, args.face_cache_dir, img_size, args.face_crop_scale, loaders.settings["num_workers"],
        accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone, logger.info,
    ) if args.face_cache else None
    logger.info(f"{STAGE.replace('stage', 'Stage ')}: {args.model_name} "
                f"({'pretrained' if args.pretrained else 'from scratch'}), {accelerator.num_processes} process(es) "
                f"on {accelerator.device.type}, mixed precision {accelerator.mixed_precision}, image size {img_size}, "
                f"batch {args.batch_size} x {accelerator.num_processes} x {args.gradient_accumulation_steps}{extra}")
    logger.info(f"Compute: {compute['params_m']:.2f} M parameters; {compute['challenge_limit']}")
    if broken := models.challenge_rules_broken(STAGE, args, compute):  # configs/challenge_stage*.json keep them
        logger.warning(f"Not a valid WFAS challenge entry: {'; '.join(broken)}")
    logger.info(f"Data {table.root}, {len(table)} images:\n{wfas_data.describe_split(table)}")
    logger.info(loaders.describe(cache) + (f"\nLogging to {log_file}" if log_file else ""))
    datasets = wfas_data.build_datasets(table, img_size, train_transform(img_size), args.face_crop_scale, cache)
    return data_config["mean"], data_config["std"], img_size, compute, loaders, cache, datasets


# Copied from train_stage1.py
def build_scheduler(optimizer, args, batches_per_epoch):
    """Warmup, then cosine decay to 1% of the peak, per update; a function of the update count and this run's
    flags alone, so a resumed run follows the schedule an uninterrupted run with its flags would."""
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total_updates = min(args.num_epochs * updates_per_epoch, args.max_train_steps or math.inf)
    warmup = min(round(args.warmup_epochs * updates_per_epoch), total_updates // 2)  # short runs still decay
    scheduler = CosineLRScheduler(optimizer, t_initial=max(total_updates - warmup, 1), lr_min=args.learning_rate * 0.01,
                                  warmup_t=warmup, warmup_lr_init=args.learning_rate * 0.01, warmup_prefix=True,
                                  t_in_epochs=False)
    return scheduler, total_updates, updates_per_epoch


# Copied from train_stage1.py
class Checkpoints:
    """checkpoints/<stage>/: <stage>_best.safetensors (the timm model's weights, with metadata) and <stage>_latest/
    (accelerate's state: model, optimizer, RNG, sampler; and ours: the last finished epoch, the images of the next
    one trained over all processes, the updates, the best so far). Both are written aside and renamed."""

    def __init__(self, accelerator, output_dir, name=STAGE):
        self.accelerator, self.ema, folder = accelerator, None, Path(output_dir) / "checkpoints" / STAGE
        self.best_path, self.latest_dir = folder / f"{name}_best.safetensors", folder / f"{name}_latest"
        folder.mkdir(parents=True, exist_ok=True)

    def track_ema(self, net, decay):
        """timm's EMA of net (on its device), saved in <stage>_latest as safetensors (not pickled); None at 0."""
        self.ema = ModelEmaV3(net, decay=decay, use_warmup=True) if decay else None
        return self.ema

    def resume(self, args, updates_per_epoch):
        """(state, batches each process skips in the unfinished epoch), from --resume_from_checkpoint or fresh.
        accelerate's lines say what it could not restore (the RNG of another number of processes, say)."""
        state, skip_batches = {"epoch": -1, "images_done": 0, "global_step": 0, "best_epoch": -1,
                               "best_val_acer": math.inf}, 0
        resume_dir = args.resume_from_checkpoint and self.resolve(args.resume_from_checkpoint, self.latest_dir)
        if resume_dir:
            logging.getLogger("accelerate").setLevel(logging.INFO)
            try:
                self.accelerator.load_state(str(resume_dir))
            finally:
                logging.getLogger("accelerate").setLevel(logging.WARNING)
            state = json.loads((resume_dir / "training_state.json").read_text())
            if self.ema is not None:
                if not (resume_dir / "ema.safetensors").is_file():
                    raise UserError(f"{resume_dir} holds no EMA weights (saved without --model_ema_decay): resume "
                                    "without it, or start a new run")
                self.ema.module.load_state_dict(load_file(resume_dir / "ema.safetensors"))
            skip_batches, global_step = self.position(state, args.batch_size, self.accelerator.num_processes,
                                                      args.gradient_accumulation_steps, updates_per_epoch)
            if global_step != state["global_step"]:
                logger.info(f"The batch size, processes or accumulation changed: the run goes on at update "
                            f"{global_step} of the new schedule (update {state['global_step']} of the old one)")
            state["global_step"] = global_step
            logger.info(f"Resumed from {resume_dir}: epoch {state['epoch'] + 1} of {args.num_epochs} done"
                        + (f" and {skip_batches} batches of the next" if skip_batches else "")
                        + f", {state['global_step']} updates, best val ACER {state['best_val_acer']:.4f}")
        elif args.resume_from_checkpoint:
            logger.info(f"No saved state in {self.latest_dir} yet: starting from the beginning")
        state.update(batch_size=args.batch_size, num_processes=self.accelerator.num_processes)
        return state, skip_batches

    @staticmethod
    def resolve(resume, latest_dir):
        """The state to resume from, or None: `latest` with no state yet is a first start (a requeued job runs
        the same command every time); an explicit folder must exist."""
        path = latest_dir if resume == "latest" else Path(resume)
        for candidate in [path, path.with_name(path.name + ".tmp"),  # a kill between save_latest's renames
                          *sorted(path.parent.glob(f"{path.name}.old*"), reverse=True)]:
            if (candidate / "training_state.json").is_file():
                return candidate
        if resume != "latest":
            raise UserError(f"--resume_from_checkpoint {resume}: no saved state at {path} "
                            f"(expected a {STAGE}_latest folder written by an earlier run)")

    @staticmethod
    def position(state, batch_size, num_processes, gradient_accumulation_steps, updates_per_epoch):
        """The batches of the unfinished epoch each process skips, and the update an uninterrupted run with these
        settings is at there; counted in images, which holds when the processes or the batch size changed."""
        if state["images_done"] % (batch_size * num_processes):
            raise UserError(f"the saved state is {state['images_done']} images into an epoch, not a whole number of "
                            f"batches of {batch_size} x {num_processes} processes: resume mid-epoch with the batch "
                            f"size and processes it was saved with ({state['batch_size']} x "
                            f"{state['num_processes']}), or from a state saved at the end of an epoch")
        batches = state["images_done"] // (batch_size * num_processes)
        return batches, (state["epoch"] + 1) * updates_per_epoch + batches // gradient_accumulation_steps

    def save_latest(self, state):
        """Written to .tmp and swapped in: a kill at any instruction leaves a complete state in latest, .tmp (once
        its training_state.json is written) or an .old-* folder, which resolve() finds; a leftover that cannot be
        deleted (an NFS silly-rename file) never blocks the next swap."""
        latest, accelerator = self.latest_dir, self.accelerator
        tmp = latest.with_name(latest.name + ".tmp")
        if accelerator.is_main_process and tmp.exists():  # a kill's leftover: moved aside, as it may not delete
            tmp.rename(latest.with_name(f"{latest.name}.old-{time.time_ns()}"))
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if self.ema is not None:
                save_file(self.weights(self.ema.module), tmp / "ema.safetensors")
            wfas_data.write_json(tmp / "training_state.json", state)  # the last file: it marks tmp complete
            if latest.exists():
                latest.rename(latest.with_name(f"{latest.name}.old-{time.time_ns()}"))
            tmp.rename(latest)
            for old in latest.parent.glob(f"{latest.name}.old*"):
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def keep_best(self, state, epoch, val, net, metadata):
        """Ends the epoch; saves net (before prepare(): no DDP or compile prefix) if its val ACER is the best."""
        state.update(epoch=epoch, images_done=0)
        if val["acer"] >= state["best_val_acer"]:
            return False
        state.update(best_epoch=epoch, best_val_acer=val["acer"])
        if self.accelerator.is_main_process:
            tmp = wfas_data.aside(self.best_path)
            metadata = {k: v if isinstance(v, str) else json.dumps(v)
                        for k, v in {**metadata, "epoch": str(epoch), "val_metrics": val}.items()}
            save_file(self.weights(net), tmp, metadata)
            os.replace(tmp, self.best_path)
        return True

    @staticmethod
    def weights(net):
        return {k: v.contiguous().cpu() for k, v in net.state_dict().items()}

    def load_best(self, net):
        if not self.best_path.is_file():
            raise UserError(f"no best checkpoint at {self.best_path}: training ran no epoch (check --num_epochs)")
        self.accelerator.wait_for_everyone()
        net.load_state_dict(load_file(self.best_path))


# Copied from train_stage1.py
class EpochMeter:
    """An epoch's images, data wait, undecodable images and loss parts (summed on the device: no host sync)."""

    def __init__(self, accelerator, state):
        self.accelerator, self.state, self.sums = accelerator, state, {}
        self.start, self.images, self.steps, self.undecodable, self.seen, self.data_wait = time.time(), 0, 0, 0, 0, 0.0

    def timed(self, batches):
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
        images = len(batch["error"]) * self.accelerator.num_processes
        self.images, self.state["images_done"] = self.images + images, self.state["images_done"] + images

    def finish(self):
        self.seconds = time.time() - self.start
        self.undecodable = int(self.accelerator.reduce(torch.tensor(self.undecodable, device=self.accelerator.device),
                                                       reduction="sum"))
        return {name: value.item() / self.steps for name, value in self.sums.items()}


# Copied from train_stage1.py
class RunLog:
    """Progress, throughput and ETA; per epoch the log line, summary.csv and the trackers, derived from the loss
    parts, so that a new loss term shows up everywhere by itself."""

    def __init__(self, accelerator, args, state, total_updates, updates_per_epoch, start_time, desc, summary):
        self.accelerator, self.args, self.state, self.start_time = accelerator, args, state, start_time
        self.total_updates, self.updates_per_epoch, self.summary = total_updates, updates_per_epoch, summary
        self.images, self.seconds, self.epochs, self.loop_start = 0, 0.0, 0, time.time()
        self.progress = wfas_data.progress_bar(total=total_updates, initial=state["global_step"], desc=desc,
                                               disable=not accelerator.is_local_main_process)

    def after_update(self, meter, scheduler, checkpoints, stopper):
        """An update's schedule, progress, --checkpointing_steps and stop signal (save, then exit); True when done."""
        state, every = self.state, self.args.checkpointing_steps
        state["global_step"] += 1
        scheduler.step_update(state["global_step"])
        self.progress.update(1)
        if state["global_step"] % 20 == 0:
            speed = meter.images / (time.time() - meter.start)
            self.progress.set_postfix(loss=f"{meter.sums['loss'].item() / meter.steps:.4f}", img_s=f"{speed:.0f}")
        if every and state["global_step"] % every == 0:
            checkpoints.save_latest(state)
            logger.info(f"Wrote {checkpoints.latest_dir} at update {state['global_step']} (epoch "
                        f"{state['epoch'] + 2}, {state['images_done']} images)")
        if stopper.requested(self.accelerator, state["global_step"]):
            checkpoints.save_latest(state)
            stopper.stop(checkpoints.latest_dir, state)
        return state["global_step"] >= self.total_updates

    def log_epoch(self, output_dir, epoch, train, val, meter, lr, improved):
        self.images, self.seconds = self.images + meter.images, self.seconds + meter.seconds
        self.epochs += 1
        epochs_left = min(self.args.num_epochs - epoch - 1,
                          math.ceil((self.total_updates - self.state["global_step"]) / self.updates_per_epoch))
        eta = (time.time() - self.loop_start) / self.epochs * epochs_left
        speed, wait = meter.images / meter.seconds, meter.data_wait / meter.seconds
        parts = " ".join(f"{k} {v:.4f}" for k, v in train.items() if k != "loss")
        logger.info(f"epoch {epoch + 1}/{self.args.num_epochs}  train loss {train['loss']:.4f}"
                    + (f" ({parts})" if parts else "") + f"  val loss {val['loss']:.4f}  "
                    f"val {wfas_data.format_metrics(val)}  lr {lr:.2e}  {speed:.0f} img/s  data wait {wait:.0%}  "
                    f"elapsed {datetime.timedelta(seconds=round(time.time() - self.start_time))}  "
                    f"ETA {datetime.timedelta(seconds=round(eta))}" + ("  (best)" if improved else "")
                    + (f"  {meter.undecodable} undecodable images skipped" if meter.undecodable else ""))
        if self.accelerator.is_main_process:
            report.write_summary_row(output_dir / "logs" / STAGE / self.summary, {
                "epoch": epoch + 1, **{f"train_{k}": v for k, v in train.items()},
                **{f"val_{k}": val[k] for k in ("loss", "acer", "apcer", "bpcer", "auc")}, "lr": lr,
                "images_per_second": speed, "data_wait_share": wait})
        self.accelerator.log({**{f"train/{k}": v for k, v in train.items()}, "train/lr": lr,
                              "train/images_per_second": speed, "train/data_wait_share": wait,
                              **{f"val/{k}": v for k, v in val.items() if isinstance(v, (int, float))}}, step=epoch)

    def totals(self):
        return {"wall_time_s": round(time.time() - self.start_time, 1),
                "images_per_second": round(self.images / self.seconds, 1) if self.seconds else None,
                "num_processes": self.accelerator.num_processes, "mixed_precision": self.accelerator.mixed_precision}


# Copied from train_stage1.py
class StopOnSignal:
    """SIGTERM (preemption) and SIGUSR1 (SLURM's --signal) stop the run where it stands, its state saved. The
    processes agree on the update through accelerate's trigger, an all-reduce (a host sync), every CHECK_EVERY
    updates. Loader workers ignore these signals (wfas_data.Loaders); restore() shuts those of `loaders` down."""
    CHECK_EVERY = 10

    def __init__(self, *loaders):
        self.signum, self.loaders, self.handled = None, loaders, (signal.SIGTERM, signal.SIGUSR1)
        if threading.current_thread() is threading.main_thread():  # Python takes signals there only
            for signum in self.handled:
                signal.signal(signum, self._handler)

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

    def stop(self, latest_dir, state):
        signum = self.signum or signal.SIGTERM
        logger.info(f"Stopped by {signal.Signals(signum).name} at update {state['global_step']}; the resumable "
                    f"state is in {latest_dir}. To go on, run the same command with --resume_from_checkpoint latest")
        raise SystemExit(128 + signum)

    def restore(self):
        """Past the loop: the workers shut down, and a signal ends the run at once."""
        wfas_data.Loaders.shut_down(*self.loaders)
        if threading.current_thread() is threading.main_thread():
            for signum in self.handled:
                signal.signal(signum, signal.SIG_DFL)


if __name__ == "__main__":
    wfas_data.run_cli(main)
