"""Stage 1 of the NetEase WFAS recipe: train a ConvNeXt teacher, evaluate it, and write soft labels.

    accelerate launch train_stage1.py --data_root WFAS --output_dir EXP
    python train_stage1.py --data_root WFAS --output_dir EXP          # one device
    python train_stage1.py --config configs/stage1_recipe.json --data_root WFAS --output_dir EXP

Writes into EXP: split.csv, stage1_config.json, checkpoints/stage1/{stage1_best.safetensors, stage1_latest/},
logs/stage1/ (the log and summary.csv), stage1_soft_labels.pth ({image path: [prob_spoof, prob_live]}),
stage1_{val,test}_predictions.csv, stage1_results.json, plots/ and report.md.
Exporting, scoring and the weights cache are programs of their own in tools/ (see the README).
"""
import argparse
import csv
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
from wfas_data import UserError

STAGE = "stage1"
logger = get_logger(STAGE)
warn = functools.partial(logger.warning, main_process_only=False)  # a warning from whichever process meets it

# Flags that control one invocation rather than describe the experiment; they stay out of stage1_config.json.
RUN_CONTROL_KEYS = ("config", "resume_from_checkpoint")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", help="JSON file with any of these flags as keys; command-line flags override it")

    group = parser.add_argument_group("data")
    group.add_argument("--data_root", help="WFAS folder (holding Train/), Train/ itself, a folder of live/ and spoof/, "
                       "or a labelled list file")
    group.add_argument("--output_dir", default="output", help="experiment folder")
    group.add_argument("--val_fraction", type=float, default=0.1, help="share of subjects held out for val")
    group.add_argument("--test_fraction", type=float, default=0.1, help="share of subjects held out for test")
    group.add_argument("--split_by", choices=("subject", "image"), default="subject",
                       help="image: for data without subjects (one person's images may then sit in train and test)")
    group.add_argument("--unseen_attacks", type=lambda text: [t for t in text.split(",") if t], default=[],
                       metavar="TYPE[,TYPE...]", help="attack types kept out of train, their subjects split between "
                       "val and test (WFAS's dev and test hold 8 types its train lacks); results report them apart")
    group.add_argument("--face_crop_scale", type=float, default=wfas_data.DEFAULT_FACE_CROP_SCALE,
                       help="face box expansion before the square crop")
    group.add_argument("--img_size", type=int, default=None, help="input size (default: the model's)")
    group.add_argument("--color_jitter", type=float, default=0.1,
                       help="per-image brightness, contrast and saturation factors in [1 - j, 1 + j], drawn on the "
                            "device (light: the attack cues include colour casts); 0 turns it off")
    group.add_argument("--num_workers", type=int, default=None,
                       help="loader workers per process (default: this node's cores shared by its processes, up to 12)")
    group.add_argument("--face_cache", action=argparse.BooleanOptionalAction, default=True,
                       help="read face crops from a cache built once (memory-mapped shards of small JPEGs) rather "
                            "than decoding the original photos every epoch")
    group.add_argument("--face_cache_dir", help="where face caches live; share one between experiments on the same "
                                                "data (default: EXP/face_cache)")

    group = parser.add_argument_group("model")
    group.add_argument("--model_name", default="convnext_base", help="any timm model")
    group.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                       help="start from ImageNet weights")
    group.add_argument("--pretrained_file", help="local .safetensors or .pth weights to start from")
    group.add_argument("--model_cache_dir", help="where fetched weights are kept (default: EXP/model/stage1/<model>; "
                                                 "tools/models.py fills it ahead of time)")
    group.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth")
    group.add_argument("--channels_last", action="store_true", help="NHWC memory layout: faster convolutions with "
                                                                   "AMP on GPUs, and for MaxViT on CPU (README)")

    group = parser.add_argument_group("training")
    group.add_argument("--num_epochs", type=int, default=50, help="passes over the train split")
    group.add_argument("--batch_size", type=int, default=32, help="per device")
    group.add_argument("--learning_rate", type=float, default=2e-4, help="peak AdamW learning rate")
    group.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (not on norms and biases)")
    group.add_argument("--warmup_epochs", type=float, default=1.0, help="linear warmup, then cosine decay")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer update")
    group.add_argument("--max_grad_norm", type=float, default=5.0, help="gradient clipping; 0 turns it off")
    group.add_argument("--max_train_steps", type=int, default=None, help="stop after this many updates (smoke runs)")
    group.add_argument("--seed", type=int, default=42, help="seed of the split, the shuffle and the model init")
    group.add_argument("--tta", action="store_true", help="average with a horizontal flip when predicting")
    group.add_argument("--soft_label_folds", type=int, default=1, metavar="K",
                       help="K > 1: K teachers, each trained on K-1 subject-disjoint folds of train, label the fold "
                            "they never saw (soft labels with the teacher's doubt); 1: one labels its own images")
    group.add_argument("--model_ema_decay", type=float, default=0.0,
                       help="keep timm's EMA of the weights (ModelEmaV3, with its decay warm-up; e.g. 0.999) and "
                            "validate, keep and deploy it; 0 turns it off")

    group = parser.add_argument_group("checkpoints and logging")
    group.add_argument("--resume_from_checkpoint",
                       help="'latest' (starts fresh when there is no saved state yet, so a requeued job can "
                            "rerun the same command) or a stage1_latest folder")
    group.add_argument("--checkpointing_steps", type=int, default=0,
                       help="also write stage1_latest every N updates, for a mid-epoch resume (0: per epoch)")
    group.add_argument("--report_to", default="none",
                       help="tensorboard, wandb, ... or all: any tracker accelerate supports")
    return parser


def parse_args(argv=None):
    args = parse_with_config(build_parser(), argv)
    if not args.data_root:
        raise UserError("--data_root is required (the WFAS folder that holds Train/); "
                        "`python tools/make_demo.py DIR` writes a small demo dataset")
    if not timm.is_model(args.model_name):
        raise UserError(f"--model_name {args.model_name} is not a timm model; "
                        f"e.g. {', '.join(timm.list_models('convnext_*')[:6])}")
    if args.soft_label_folds < 1 or args.soft_label_folds > 1 and args.resume_from_checkpoint not in (None, "latest"):
        raise UserError(f"--soft_label_folds {args.soft_label_folds}: give 1 or more, and resume its run with "
                        "--resume_from_checkpoint latest (each fold resumes from its own state)")
    return args


def train_transform(img_size):
    """What a loader worker does to each train face crop, uint8 tensor in and out; normalisation and
    --color_jitter run batched on the device. Attack cues are fine textures (halftone, moire), so it stays mild.
    The crop it starts from is the face box times --face_crop_scale, all that the face cache stores (at
    img_size / 0.875): scale 0.8-1.0 only zooms in; to zoom out, raise --face_crop_scale (a new cache)."""
    return T.Compose([T.RandomResizedCrop(img_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
                      T.RandomHorizontalFlip()])


def assign_folds(train, num_folds, seed):
    """A fold 0..num_folds-1 per train image (all 0 for one fold): subject-disjoint and stratified by attack type
    as the split is; within a type the shuffled subjects go, one by one, to the fold with the fewest images of
    that type (ties: the fewest images in all)."""
    folds, rng = np.zeros(len(train), dtype=np.int64), np.random.default_rng((seed, num_folds))
    total = np.zeros(num_folds)
    for attack_type in np.unique(train.attack_type) if num_folds > 1 else []:
        in_type = np.flatnonzero(train.attack_type == attack_type)
        subjects, subject_of_row, counts = np.unique(train.subject[in_type], return_inverse=True, return_counts=True)
        fold_of_subject, taken = np.zeros(len(subjects), dtype=np.int64), np.zeros(num_folds)
        for subject in rng.permutation(len(subjects)):
            fold_of_subject[subject] = fold = np.lexsort((total, taken))[0]
            taken[fold], total[fold] = taken[fold] + counts[subject], total[fold] + counts[subject]
        folds[in_type] = fold_of_subject[subject_of_row]
    return folds


def mean_of_folds(fold_rows, split_table, threshold=None):
    paths, labels, attack_types, _ = fold_rows[0]  # the fold teachers' rows of a split list the same images
    scores = np.mean([rows[3] for rows in fold_rows], axis=0)
    metrics = wfas_data.compute_metrics(scores, labels, attack_types, threshold, split_table.unseen_attacks)
    true_class_probs = np.clip(np.where(labels == wfas_data.LIVE, scores, 1 - scores), 1e-12, None)
    metrics.update(loss=float(-np.log(true_class_probs).mean()), unreadable=len(split_table) - len(labels))
    return metrics, (paths, labels, attack_types, scores)


def write_folds(path, train, folds):
    """path,fold of every train image: the fold teacher that labelled it, the one that did not train on it."""
    tmp = wfas_data.aside(path)
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([("path", "fold"), *zip(train.paths(), folds.tolist())])
    os.replace(tmp, path)


def write_soft_labels(path, soft_labels):
    """{relative image path: [prob_spoof, prob_live]}, loadable with torch.load(..., weights_only=True)."""
    tmp = wfas_data.aside(path)
    torch.save(soft_labels, tmp)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    start_time = time.time()
    output_dir = Path(args.output_dir)
    accelerator, log_file = start_run(args, output_dir)

    def load_split_and_model():  # the main process writes split.csv and fetches the weights first
        split_table = wfas_data.load_or_create_split(args.data_root, output_dir, args.val_fraction, args.test_fraction,
                                                     args.seed, logger.info, args.unseen_attacks, args.split_by)
        return split_table, new_teacher()

    def new_teacher():
        return models.create_model(args.model_name, args.img_size, args.pretrained, args.pretrained_file,
                                   args.model_cache_dir, args.drop_path_rate)

    table, teacher = main_process_first(accelerator, load_split_and_model)
    splits = {name: table.of_split(name) for name in wfas_data.SPLITS}
    mean, std, img_size, compute, loaders, cache, datasets = prepare_data(accelerator, args, table, teacher, log_file)
    num_folds, best_metadata = args.soft_label_folds, {"model_name": args.model_name, "img_size": str(img_size),
                                                       "face_crop_scale": str(args.face_crop_scale), "compute": compute}
    folds = assign_folds(splits["train"], num_folds, args.seed)
    if num_folds > 1:
        logger.info(f"Out-of-fold soft labels: {num_folds} teachers, each trained on {num_folds - 1} of {num_folds} "
                    f"subject-disjoint folds of train and labelling the other ({np.bincount(folds).tolist()} images)")
    fold_summaries, soft_labels, undecodable, val_rows, test_rows = [], {}, [], [], []
    for fold in range(num_folds):  # one fold: the teacher trains on all of train and labels its own images
        fold_start, name = time.time(), STAGE if num_folds == 1 else f"{STAGE}_fold{fold}"
        if fold > 0:  # a fresh teacher, the same way: accelerate forgets the last one, whose state is saved
            accelerator.free_memory()
            set_seed(args.seed + fold)
            teacher = new_teacher()
            if args.channels_last:
                teacher.to(memory_format=torch.channels_last)
        trained_on = splits["train"].select(folds != fold) if num_folds > 1 else splits["train"]
        checkpoints = Checkpoints(accelerator, output_dir, name)
        train_loader = loaders.make(wfas_data.FaceDataset(trained_on, img_size, train_transform(img_size),
                                                          args.face_crop_scale, cache), shuffle=True, persistent=True)
        val_loader = loaders.make(datasets["val"], persistent=True)
        optimizer = create_optimizer_v2(teacher, "adamw", lr=args.learning_rate, weight_decay=args.weight_decay,
                                        fused=accelerator.device.type in ("cpu", "cuda"))  # README: Performance
        model, optimizer, train_loader, val_loader = accelerator.prepare(teacher, optimizer, train_loader, val_loader)
        set_seed(args.seed + fold, device_specific=True)
        ema = checkpoints.track_ema(teacher, args.model_ema_decay)  # when on, what is validated, kept and deployed
        scheduler, total_updates, updates_per_epoch = build_scheduler(optimizer, args, len(train_loader))
        state, skip_batches = checkpoints.resume(args, updates_per_epoch)
        if state.setdefault("soft_label_folds", num_folds) != num_folds:
            raise UserError(f"{checkpoints.latest_dir} was saved by a run with --soft_label_folds "
                            f"{state['soft_label_folds']}: resume with it, or start a new --output_dir")
        scheduler.step_update(state["global_step"])

        stopper = StopOnSignal(train_loader, val_loader)
        run_log = RunLog(accelerator, args, state, total_updates, updates_per_epoch, start_time,
                         "stage 1" + (f" fold {fold + 1}/{num_folds}" if num_folds > 1 else ""),
                         "summary.csv" if num_folds == 1 else f"summary_fold{fold}.csv")
        for epoch in range(state["epoch"] + 1, args.num_epochs):
            if state["global_step"] >= total_updates:
                break
            model.train()
            train_loader.set_epoch(epoch)
            meter = EpochMeter(accelerator, state)
            batches = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
            skip_batches = 0  # the seedable sampler replays the epoch: a mid-epoch resume skips what was trained
            for batch in meter.timed(batches):
                with accelerator.accumulate(model):
                    images = wfas_data.to_model_input(batch["image"], mean, std, color_jitter=args.color_jitter)
                    # undecodable images were replaced by zeros: weighted out of the loss, without a host sync
                    loss = losses.cross_entropy(model(images), batch["label"], weights=batch["ok"].float())
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                    if ema is not None and accelerator.sync_gradients:
                        ema.update(teacher, step=state["global_step"] + 1)
                meter.add(batch, loss)
                if accelerator.sync_gradients and run_log.after_update(meter, scheduler, checkpoints, stopper):
                    break
            train = meter.finish()
            val, _ = wfas_data.evaluate(ema or model, val_loader, splits["val"], accelerator, mean, std,
                                        log_warning=warn)
            improved = checkpoints.keep_best(state, epoch, val, ema.module if ema else teacher, best_metadata)
            checkpoints.save_latest(state)
            run_log.log_epoch(output_dir, epoch, train, val, meter, optimizer.param_groups[0]["lr"], improved)
            if stopper.requested(accelerator):
                stopper.stop(checkpoints.latest_dir, state)
        run_log.progress.close()
        stopper.restore()
        checkpoints.load_best(teacher)

        # Val is scored again as test will be (with --tta too), so that the threshold fits the test scores.
        fold_val, rows = wfas_data.evaluate(model, val_loader, splits["val"], accelerator, mean, std, tta=args.tta,
                                            log_warning=warn)
        val_rows.append(rows)
        test_loader = accelerator.prepare(loaders.make(datasets["test"]))
        test_rows.append(wfas_data.evaluate(model, test_loader, splits["test"], accelerator, mean, std, tta=args.tta,
                                            desc="test", log_warning=warn)[1])
        labelled = splits["train"].select(folds == fold)
        soft_dataset = wfas_data.FaceDataset(labelled, img_size, face_crop_scale=args.face_crop_scale, cache=cache)
        soft_loader = accelerator.prepare(loaders.make(soft_dataset))
        probs, indices, ok = wfas_data.predict_probs(model, soft_loader, accelerator, mean, std, args.tta,
                                                     "soft labels", warn)
        paths = labelled.paths()
        soft_labels.update({paths[i]: [float(p[0]), float(p[1])] for i, p in zip(indices[ok], probs[ok])})
        undecodable += [paths[i] for i in indices[~ok]]
        fold_summaries.append({"fold": fold, "train_images": len(trained_on), "labelled_images": len(labelled),
                               "best_epoch": state["best_epoch"] + 1, "val_acer": fold_val["acer"],
                               "updates": state["global_step"], "seconds": round(time.time() - fold_start, 1),
                               "checkpoint": str(checkpoints.best_path)})
        if num_folds > 1:
            logger.info(f"Fold {fold + 1}/{num_folds}: trained on {len(trained_on)} images, best epoch "
                        f"{state['best_epoch'] + 1} (val ACER {fold_val['acer']:.4f}), labelled {len(labelled)} "
                        f"images it never saw, {datetime.timedelta(seconds=round(time.time() - fold_start))}")

    # The teacher's val and test: the mean of the fold teachers' scores (one fold: its own), the threshold on val.
    best_val, val_rows = mean_of_folds(val_rows, splits["val"])
    test, test_rows = mean_of_folds(test_rows, splits["test"], best_val["threshold"])
    best_fold = min(fold_summaries, key=lambda summary: summary["val_acer"])
    logger.info((f"Teacher (mean of {num_folds} fold teachers)" if num_folds > 1 else
                 f"Best epoch {best_fold['best_epoch']}") + f": val {wfas_data.format_metrics(best_val)}")
    logger.info(f"Teacher test at val threshold {best_val['threshold']:.4f}: {wfas_data.format_metrics(test, True)}")
    soft_labels_path = output_dir / f"{STAGE}_soft_labels.pth"
    results = {
        "best_epoch": best_fold["best_epoch"], "val": best_val, "test": test, "threshold": best_val["threshold"],
        "soft_labels_path": str(soft_labels_path), "num_soft_labels": len(soft_labels),
        "num_train_images": len(splits["train"]),
        # stage 2 checks the soft labels' coverage against the images that could be read
        "undecodable_train_images": sorted(undecodable),
        "soft_label_folds": {"num_folds": num_folds, "file": str(output_dir / f"{STAGE}_folds.csv"),
                             "deployed": best_fold["checkpoint"], "folds": fold_summaries},
        **run_log.totals(), "compute": compute}
    if accelerator.is_main_process:
        if num_folds > 1:  # the deployable teacher: the fold teacher with the best val ACER
            deployed = checkpoints.best_path.with_name(f"{STAGE}_best.safetensors")
            shutil.copyfile(best_fold["checkpoint"], wfas_data.aside(deployed))
            os.replace(wfas_data.aside(deployed), deployed)
        write_folds(output_dir / f"{STAGE}_folds.csv", splits["train"], folds)
        write_soft_labels(soft_labels_path, soft_labels)
        wfas_data.write_predictions(output_dir / f"{STAGE}_val_predictions.csv", *val_rows)
        wfas_data.write_predictions(output_dir / f"{STAGE}_test_predictions.csv", *test_rows)
        wfas_data.write_json(output_dir / f"{STAGE}_results.json", results)
        logger.info(f"Wrote {results['num_soft_labels']} soft labels to {soft_labels_path} and results to "
                    f"{output_dir / f'{STAGE}_results.json'}")
        logger.info(f"Report: {report.write_all(output_dir, (STAGE,), log=logger.warning)} (plots in "
                    f"{output_dir / 'plots'})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


# ----------------------------------------------------------------------------------------------------------
# Shared with train_stage2.py, which keeps a copy of each helper below under a `# Copied from` marker, so that
# each script stays one file to read: edit them here, then `python tests/test_copies.py --fix`.
# ----------------------------------------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring keeps its layout; every flag shows its default unless its help already tells it."""

    def _get_help_string(self, action):
        told = "(default" in action.help or action.default in (None, False, argparse.SUPPRESS)
        return action.help + ("" if told else " (default: %(default)s)")


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
