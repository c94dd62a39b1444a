"""Stage 1 of the NetEase WFAS recipe: train a ConvNeXt teacher, evaluate it, and write soft labels.

    accelerate launch train_stage1.py --data_root WFAS --output_dir EXP
    python train_stage1.py --data_root WFAS --output_dir EXP          # one device
    python train_stage1.py --config configs/stage1_recipe.json --data_root WFAS --output_dir EXP

Writes into EXP: split.csv, stage1_config.json, checkpoints/stage1/{stage1_best.safetensors, stage1_latest/},
logs/stage1/ (the log and summary.csv), stage1_soft_labels.pth ({image path: [prob_spoof, prob_live]}),
stage1_{val,test}_predictions.csv, stage1_results.json, plots/ and report.md.
Exporting, scoring and the weights cache are programs of their own in tools/ (see the README). What both stages
run the same way (the run's frame, checkpoints, evaluation, networks) is in the modules imported below.
"""

import argparse
import csv
import dataclasses
import datetime
import functools
import math
import shutil
import time
from pathlib import Path

import numpy as np
import timm
import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torchvision.transforms import v2 as T

import challenge
import evaluation
import experiment_report
import face_cache
import fas_formats
import losses
import networks
import training_run
import wfas_data
from checkpoints import Checkpoints, StopOnSignal
from errors import UserError, run_cli
from output_files import aside, write_json, write_with
from training_run import EpochMeter, RunLog

STAGE = "stage1"
logger = get_logger(STAGE)
warn = functools.partial(logger.warning, main_process_only=False)  # a warning from whichever process meets it

# The learning rate's floor, as a share of the peak: where the warmup starts and the cosine ends.
LR_FLOOR = 0.01


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=training_run.HelpFormatter)
    parser.add_argument("--config", help="JSON file with any of these flags as keys; command-line flags override it")

    group = parser.add_argument_group("data")
    group.add_argument(
        "--data_root",
        nargs="+",
        metavar="SOURCE",
        help="WFAS folder (holding Train/), a folder of live/ and spoof/, a labelled list file, frames of a video set "
        "(tools/data.py frames), or FORMAT:DIR (celeba_spoof, frames, ...: docs/data.md); several train together",
    )
    group.add_argument(
        "--protocol",
        nargs="+",
        default=[],
        metavar="FORMAT:PROTOCOL",
        help="the official protocol of a source that has several: oulu_npu:1 ... oulu_npu:4, with the phone held out "
        "in 3 and 4 (oulu_npu:3.2), celeba_spoof:intra_test (default: the first)",
    )
    group.add_argument("--output_dir", default="output", help="experiment folder")
    group.add_argument("--val_fraction", type=float, default=0.1, help="share of subjects held out for val")
    group.add_argument("--test_fraction", type=float, default=0.1, help="share of subjects held out for test")
    group.add_argument(
        "--split_by",
        choices=("subject", "image"),
        default="subject",
        help="image: for data without subjects (one person's images may then sit in train and test)",
    )
    group.add_argument(
        "--unseen_attacks",
        type=lambda text: [t for t in text.split(",") if t],
        default=[],
        metavar="TYPE[,TYPE...]",
        help="attack types kept out of train, their subjects split between "
        "val and test (WFAS's dev and test hold 8 types its train lacks); results report them apart",
    )
    group.add_argument(
        "--face_crop_scale",
        type=float,
        default=wfas_data.DEFAULT_FACE_CROP_SCALE,
        help="face box expansion before the square crop",
    )
    group.add_argument("--img_size", type=int, default=None, help="input size (default: the model's)")
    group.add_argument(
        "--color_jitter",
        type=float,
        default=0.1,
        help="per-image brightness, contrast and saturation factors in [1 - j, 1 + j], drawn on the "
        "device (light: the attack cues include colour casts); 0 turns it off",
    )
    group.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="loader workers per process (default: this node's cores shared by its processes, up to 12)",
    )
    group.add_argument(
        "--face_cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read face crops from a cache built once (memory-mapped shards of small JPEGs) rather "
        "than decoding the original photos every epoch",
    )
    group.add_argument(
        "--face_cache_dir",
        help="where face caches live; share one between experiments on the same data (default: EXP/face_cache)",
    )

    group = parser.add_argument_group("model")
    group.add_argument("--model_name", default="convnext_base", help="any timm model")
    group.add_argument(
        "--pretrained", action=argparse.BooleanOptionalAction, default=True, help="start from ImageNet weights"
    )
    group.add_argument("--pretrained_file", help="local .safetensors or .pth weights to start from")
    group.add_argument(
        "--model_cache_dir",
        help="where fetched weights are kept (default: EXP/model/stage1/<model>; "
        "tools/models.py fills it ahead of time)",
    )
    group.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth")
    group.add_argument(
        "--channels_last",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="NHWC memory layout: faster convolutions with AMP on GPUs, and for MaxViT on CPU (docs/performance.md)",
    )
    group.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the model for training and evaluation: faster steps on GPUs after a compile of a "
        "minute or more per mode (docs/performance.md); checkpoints hold the plain model's weights",
    )

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
    group.add_argument(
        "--soft_label_folds",
        type=int,
        default=1,
        metavar="K",
        help="K > 1: K teachers, each trained on K-1 subject-disjoint folds of train, label the fold "
        "they never saw (soft labels with the teacher's doubt); 1: one labels its own images",
    )
    group.add_argument(
        "--model_ema_decay",
        type=float,
        default=0.0,
        help="keep timm's EMA of the weights (ModelEmaV3, with its decay warm-up; e.g. 0.999) and "
        "validate, keep and deploy it; 0 turns it off",
    )

    group = parser.add_argument_group("checkpoints and logging")
    group.add_argument(
        "--resume_from_checkpoint",
        help="'latest' (starts fresh when there is no saved state yet, so a requeued job can "
        "rerun the same command) or a stage1_latest folder",
    )
    group.add_argument(
        "--checkpointing_steps",
        type=int,
        default=0,
        help="also write stage1_latest every N updates, for a mid-epoch resume (0: per epoch)",
    )
    group.add_argument(
        "--report_to", default="none", help="tensorboard, wandb, ... or all: any tracker accelerate supports"
    )
    return parser


def parse_args(argv=None):
    args = training_run.parse_with_config(build_parser(), argv, STAGE)
    if isinstance(args.data_root, list):  # several sources: one comma-separated text, as --config may give it
        args.data_root = ",".join(args.data_root)
    if not args.data_root:
        raise UserError(
            "--data_root is required (the WFAS folder that holds Train/); "
            "`python tools/make_demo.py DIR` writes a small demo dataset"
        )
    if not timm.is_model(args.model_name):
        raise UserError(
            f"--model_name {args.model_name} is not a timm model; e.g. {', '.join(timm.list_models('convnext_*')[:6])}"
        )
    if args.soft_label_folds < 1 or args.soft_label_folds > 1 and args.resume_from_checkpoint not in (None, "latest"):
        raise UserError(
            f"--soft_label_folds {args.soft_label_folds}: give 1 or more, and resume its run with "
            "--resume_from_checkpoint latest (each fold resumes from its own state)"
        )
    return args


def train_transform(img_size):
    """What a loader worker does to each train face crop, uint8 tensor in and out; normalisation and
    --color_jitter run batched on the device. Attack cues are fine textures (halftone, moire), so it stays mild.
    The crop it starts from is the face box times --face_crop_scale, all that the face cache stores (at
    img_size / 0.875): scale 0.8-1.0 only zooms in; to zoom out, raise --face_crop_scale (a new cache)."""
    return T.Compose(
        [T.RandomResizedCrop(img_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True), T.RandomHorizontalFlip()]
    )


def assign_folds(train, num_folds, seed):
    """A fold 0..num_folds-1 per train image (all 0 for one fold): subject-disjoint and stratified by attack type
    as the split is; within a type the shuffled subjects go, one by one, to the fold with the fewest images of
    that type (ties: the fewest images in all)."""
    folds = np.zeros(len(train), dtype=np.int64)
    rng = np.random.default_rng((seed, num_folds))
    total = np.zeros(num_folds)
    if num_folds == 1:
        return folds
    for attack_type in np.unique(train.attack_type):
        in_type = np.flatnonzero(train.attack_type == attack_type)
        subjects, subject_of_row, counts = np.unique(train.subject[in_type], return_inverse=True, return_counts=True)
        fold_of_subject = np.zeros(len(subjects), dtype=np.int64)
        taken = np.zeros(num_folds)
        for subject in rng.permutation(len(subjects)):
            fold_of_subject[subject] = fold = np.lexsort((total, taken))[0]
            taken[fold] = taken[fold] + counts[subject]
            total[fold] = total[fold] + counts[subject]
        folds[in_type] = fold_of_subject[subject_of_row]
    return folds


def mean_of_folds(fold_predictions, split_table, threshold=None):
    """(metrics, Predictions) of the fold teachers' mean scores of a split, at threshold or its EER point."""
    first = fold_predictions[0]  # the fold teachers' predictions of a split list the same images
    scores = np.mean([predictions.scores for predictions in fold_predictions], axis=0)
    metrics = evaluation.compute_metrics(
        scores, first.labels, first.attack_types, threshold=threshold, unseen_attacks=split_table.unseen_attacks
    )
    true_class_probs = np.clip(np.where(first.labels == wfas_data.LIVE, scores, 1 - scores), 1e-12, None)
    metrics.update(loss=float(-np.log(true_class_probs).mean()), unreadable=len(split_table) - len(first.labels))
    return metrics, first._replace(scores=scores)


def write_folds(path, train, folds):
    """path,fold of every train image: the fold teacher that labelled it, the one that did not train on it."""
    tmp = aside(path)
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([("path", "fold"), *zip(train.paths(), folds.tolist())])
    tmp.replace(path)


def write_soft_labels(path, soft_labels):
    """{relative image path: [prob_spoof, prob_live]}, loadable with torch.load(..., weights_only=True)."""
    write_with(path, lambda tmp: torch.save(soft_labels, tmp))


def create_teacher(args):
    """A new teacher from the flags (for each fold teacher)."""
    return networks.create_model(
        args.model_name,
        img_size=args.img_size,
        pretrained=args.pretrained,
        pretrained_file=args.pretrained_file,
        cache_dir=args.model_cache_dir,
        drop_path_rate=args.drop_path_rate,
        channels_last=args.channels_last,
    )


def build_scheduler(optimizer, args, *, updates_per_epoch, total_updates):
    """Warmup, then cosine decay to LR_FLOOR of the peak, per update; a function of the update count and this
    run's flags alone, so a resumed run follows the schedule an uninterrupted run with its flags would."""
    warmup = min(round(args.warmup_epochs * updates_per_epoch), total_updates // 2)  # short runs still decay
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_updates - warmup, 1),
        lr_min=args.learning_rate * LR_FLOOR,
        warmup_t=warmup,
        warmup_lr_init=args.learning_rate * LR_FLOOR,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def train_one_epoch(
    epoch,
    args,
    *,
    accelerator,
    model,
    forward,
    teacher,
    ema,
    optimizer,
    scheduler,
    train_loader,
    skip_batches,
    state,
    total_updates,
    checkpoints,
    stopper,
    run_log,
    mean,
    std,
):
    """One pass over train, from batch skip_batches on (a mid-epoch resume): each update's clipping, optimizer
    step, schedule step, EMA update, checkpoint and stop check. Returns the epoch's meter."""
    model.train()
    train_loader.set_epoch(epoch)
    meter = EpochMeter(accelerator, warn)
    batches = train_loader
    if skip_batches:  # the seedable sampler replays the epoch: a mid-epoch resume skips what was trained
        batches = accelerator.skip_first_batches(train_loader, skip_batches)

    for batch in meter.timed(batches):
        with accelerator.accumulate(model):
            images = wfas_data.to_model_input(batch["image"], mean, std, color_jitter=args.color_jitter)
            # undecodable images were replaced by zeros: weighted out of the loss, without a host sync
            loss = losses.cross_entropy(forward(images), batch["label"], weights=batch["ok"].float())
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()  # accelerate steps only at the end of an accumulation
            optimizer.zero_grad()
        state.images_done += meter.add(batch, loss)
        if not accelerator.sync_gradients:
            continue

        state.global_step += 1
        scheduler.step_update(state.global_step)
        if ema is not None:
            ema.update(teacher, step=state.global_step)
        run_log.show_update(meter, state.global_step)
        if args.checkpointing_steps and state.global_step % args.checkpointing_steps == 0:
            checkpoints.save_latest(state)
            logger.info(
                f"Wrote {checkpoints.latest_dir} at update {state.global_step} (epoch {epoch + 1}, "
                f"{state.images_done} images)"
            )
        if stopper.requested(accelerator, update=state.global_step):
            checkpoints.save_latest(state)
            stopper.stop(checkpoints.latest_dir, state.global_step)
        if state.global_step >= total_updates:
            break
    return meter


@dataclasses.dataclass
class TrainedTeacher:
    """What one teacher leaves: its val and test predictions (the threshold and the teacher's metrics come from
    them), the soft labels of the images it labelled, those it could not decode, and its line in the results."""

    val: evaluation.Predictions
    test: evaluation.Predictions
    soft_labels: dict
    undecodable: list
    summary: dict
    totals: dict


def train_teacher(args, *, fold, folds, teacher, splits, face_dataset, loaders, accelerator, metadata, start_time):
    """Trains a teacher, keeps its best epoch (the lowest val ACER) and scores val, test and the train images it
    labels with it. One fold: all of train, labelled by the teacher that trained on it; K folds: the teacher of
    `fold` trains on the others and labels this one."""
    fold_start = time.time()
    num_folds = args.soft_label_folds
    output_dir = Path(args.output_dir)
    name = STAGE
    desc = "stage 1"
    summary_name = "summary.csv"
    trained_on = splits["train"]
    if num_folds > 1:
        name = f"{STAGE}_fold{fold}"
        desc += f" fold {fold + 1}/{num_folds}"
        summary_name = f"summary_fold{fold}.csv"
        trained_on = splits["train"].select(folds != fold)
    labelled = splits["train"].select(folds == fold)
    img_size, mean, std = networks.model_input(teacher, args.img_size)

    # One prepare(): the model, its optimizer and every loader the teacher reads.
    train_loader = loaders.make(
        face_dataset(trained_on, transform=train_transform(img_size)), shuffle=True, persistent=True
    )
    val_loader = loaders.make(face_dataset(splits["val"]), persistent=True)
    test_loader = loaders.make(face_dataset(splits["test"]))
    labelled_loader = loaders.make(face_dataset(labelled))
    optimizer = create_optimizer_v2(
        teacher,
        "adamw",
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        fused=accelerator.device.type in ("cpu", "cuda"),  # docs/performance.md
    )
    model, optimizer, train_loader, val_loader, test_loader, labelled_loader = accelerator.prepare(
        teacher, optimizer, train_loader, val_loader, test_loader, labelled_loader
    )
    set_seed(args.seed + fold, device_specific=True)
    checkpoints = Checkpoints(accelerator, output_dir, STAGE, name=name)
    ema = checkpoints.track_ema(teacher, args.model_ema_decay)  # when on, what is validated, kept and deployed
    forward = networks.compiled(model, args.compile)
    validated = forward
    if ema is not None:
        validated = networks.compiled(ema.module, args.compile)

    # The schedule: per update, over the whole run, picked up where a resumed run stood.
    updates_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_updates = min(args.num_epochs * updates_per_epoch, args.max_train_steps or math.inf)
    scheduler = build_scheduler(optimizer, args, updates_per_epoch=updates_per_epoch, total_updates=total_updates)
    state, skip_batches = checkpoints.resume(
        args.resume_from_checkpoint,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        updates_per_epoch=updates_per_epoch,
        num_epochs=args.num_epochs,
    )
    saved_folds = state.soft_label_folds or num_folds  # None: a fresh state
    if saved_folds != num_folds:
        raise UserError(
            f"{checkpoints.latest_dir} was saved by a run with --soft_label_folds {saved_folds}: resume with it, "
            "or start a new --output_dir"
        )
    state.soft_label_folds = num_folds
    scheduler.step_update(state.global_step)

    stopper = StopOnSignal()
    run_log = RunLog(
        accelerator,
        num_epochs=args.num_epochs,
        updates_per_epoch=updates_per_epoch,
        total_updates=total_updates,
        first_update=state.global_step,
        start_time=start_time,
        desc=desc,
        summary_path=output_dir / "logs" / STAGE / summary_name,
    )
    for epoch in range(state.epoch + 1, args.num_epochs):
        if state.global_step >= total_updates:
            break
        meter = train_one_epoch(
            epoch,
            args,
            accelerator=accelerator,
            model=model,
            forward=forward,
            teacher=teacher,
            ema=ema,
            optimizer=optimizer,
            scheduler=scheduler,
            train_loader=train_loader,
            skip_batches=skip_batches,
            state=state,
            total_updates=total_updates,
            checkpoints=checkpoints,
            stopper=stopper,
            run_log=run_log,
            mean=mean,
            std=std,
        )
        skip_batches = 0
        train = meter.finish()

        # The best teacher: the lowest val ACER.
        val, _ = evaluation.evaluate(
            validated, val_loader, accelerator, split_table=splits["val"], mean=mean, std=std, log_warning=warn
        )
        state.epoch = epoch
        state.images_done = 0
        improved = val["acer"] < state.best_val_acer
        if improved:
            state.best_epoch = epoch
            state.best_val_acer = val["acer"]
            kept = ema.module if ema else teacher
            checkpoints.save_best(kept, {**metadata, "epoch": str(epoch), "val_metrics": val})
        checkpoints.save_latest(state)
        lr = optimizer.param_groups[0]["lr"]
        run_log.log_epoch(
            epoch, train=train, val=val, meter=meter, lr=lr, improved=improved, global_step=state.global_step
        )
        if stopper.requested(accelerator):
            stopper.stop(checkpoints.latest_dir, state.global_step)
    run_log.close()
    loaders.shut_down(train_loader, val_loader)
    stopper.restore()
    checkpoints.load_best(teacher)

    # Val is scored again as test will be (with --tta too), so that the threshold fits the test scores.
    val, val_predictions = evaluation.evaluate(
        forward, val_loader, accelerator, split_table=splits["val"], mean=mean, std=std, tta=args.tta, log_warning=warn
    )
    _, test_predictions = evaluation.evaluate(
        forward,
        test_loader,
        accelerator,
        split_table=splits["test"],
        mean=mean,
        std=std,
        tta=args.tta,
        desc="test",
        log_warning=warn,
    )

    # The soft labels of the images this teacher never trained on (one fold: all of train).
    probs, indices, ok = evaluation.predict_probs(
        forward, labelled_loader, accelerator, mean=mean, std=std, tta=args.tta, desc="soft labels", log_warning=warn
    )
    paths = labelled.paths()
    soft_labels = {paths[i]: [float(p[0]), float(p[1])] for i, p in zip(indices[ok], probs[ok])}
    summary = {
        "fold": fold,
        "train_images": len(trained_on),
        "labelled_images": len(labelled),
        "best_epoch": state.best_epoch + 1,
        "val_acer": val["acer"],
        "updates": state.global_step,
        "seconds": round(time.time() - fold_start, 1),
        "checkpoint": str(checkpoints.best_path),
    }
    if num_folds > 1:
        logger.info(
            f"Fold {fold + 1}/{num_folds}: trained on {len(trained_on)} images, best epoch "
            f"{state.best_epoch + 1} (val ACER {val['acer']:.4f}), labelled {len(labelled)} "
            f"images it never saw, {datetime.timedelta(seconds=round(time.time() - fold_start))}"
        )
    return TrainedTeacher(
        val=val_predictions,
        test=test_predictions,
        soft_labels=soft_labels,
        undecodable=[paths[i] for i in indices[~ok]],
        summary=summary,
        totals=run_log.totals(),
    )


def main(argv=None):
    args = parse_args(argv)
    start_time = time.time()
    output_dir = Path(args.output_dir)
    accelerator, log_file = training_run.start(args, output_dir, STAGE)

    # Data and model: the main process writes split.csv and fetches the weights first, the others reuse them.
    def load_split_and_model():
        table = wfas_data.load_or_create_split(
            args.data_root,
            output_dir,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
            log=logger.info,
            unseen_attacks=args.unseen_attacks,
            split_by=args.split_by,
            protocols=fas_formats.parse_protocols(args.protocol),
        )
        return table, create_teacher(args)

    table, teacher = training_run.main_process_first(accelerator, load_split_and_model)
    splits = {name: table.of_split(name) for name in wfas_data.SPLITS}
    img_size, _, _ = networks.model_input(teacher, args.img_size)
    compute = challenge.compute_budget(teacher, args.model_name, img_size)
    loaders = wfas_data.Loaders(args.batch_size, args.num_workers)
    cache = None
    if args.face_cache:  # all processes build it together when it is missing
        cache = face_cache.build_for_processes(
            table,
            args.face_cache_dir,
            img_size=img_size,
            face_crop_scale=args.face_crop_scale,
            workers=loaders.settings["num_workers"],
            accelerator=accelerator,
            log=logger.info,
        )
    face_dataset = functools.partial(
        wfas_data.FaceDataset, img_size=img_size, face_crop_scale=args.face_crop_scale, cache=cache
    )
    weights = "pretrained" if args.pretrained else "from scratch"
    batch = f"{args.batch_size} x {accelerator.num_processes} x {args.gradient_accumulation_steps}"
    training_run.log_setup(
        accelerator,
        description=f"Stage 1: {args.model_name} ({weights}), image size {img_size}, batch {batch}",
        compute=compute,
        broken_rules=challenge.rules_broken(pretrained=args.pretrained),
        table=table,
        loader_line=loaders.describe(cache),
        log_file=log_file,
    )

    # The teachers: one by default; with --soft_label_folds K, one per subject-disjoint fold of train.
    num_folds = args.soft_label_folds
    folds = assign_folds(splits["train"], num_folds, args.seed)
    if num_folds > 1:
        logger.info(
            f"Out-of-fold soft labels: {num_folds} teachers, each trained on {num_folds - 1} of {num_folds} "
            f"subject-disjoint folds of train and labelling the other ({np.bincount(folds).tolist()} images)"
        )
    metadata = {
        "model_name": args.model_name,
        "img_size": str(img_size),
        "face_crop_scale": str(args.face_crop_scale),
        "compute": compute,
    }
    teachers = []
    for fold in range(num_folds):
        if fold > 0:  # a fresh teacher, the same way: accelerate forgets the last one, whose state is saved
            accelerator.free_memory()
            set_seed(args.seed + fold)
            teacher = create_teacher(args)
        trained = train_teacher(
            args,
            fold=fold,
            folds=folds,
            teacher=teacher,
            splits=splits,
            face_dataset=face_dataset,
            loaders=loaders,
            accelerator=accelerator,
            metadata=metadata,
            start_time=start_time,
        )
        teachers.append(trained)

    # The teacher's val and test: the mean of the fold teachers' scores (one fold: its own), the threshold on val.
    best_val, val_predictions = mean_of_folds([t.val for t in teachers], splits["val"])
    test, test_predictions = mean_of_folds([t.test for t in teachers], splits["test"], best_val["threshold"])
    soft_labels = {}
    for trained in teachers:
        soft_labels.update(trained.soft_labels)
    fold_summaries = [trained.summary for trained in teachers]
    best_fold = min(fold_summaries, key=lambda summary: summary["val_acer"])
    teacher_name = f"Best epoch {best_fold['best_epoch']}"
    if num_folds > 1:
        teacher_name = f"Teacher (mean of {num_folds} fold teachers)"
    if args.compile:
        logger.info(networks.compile_summary())
    logger.info(f"{teacher_name}: val {evaluation.format_metrics(best_val)}")
    logger.info(f"Teacher test at val threshold {best_val['threshold']:.4f}: {evaluation.format_metrics(test, True)}")

    soft_labels_path = output_dir / f"{STAGE}_soft_labels.pth"
    results = {
        "best_epoch": best_fold["best_epoch"],
        "val": best_val,
        "test": test,
        "threshold": best_val["threshold"],
        "soft_labels_path": str(soft_labels_path),
        "num_soft_labels": len(soft_labels),
        "num_train_images": len(splits["train"]),
        # stage 2 checks the soft labels' coverage against the images that could be read
        "undecodable_train_images": sorted(path for trained in teachers for path in trained.undecodable),
        "soft_label_folds": {
            "num_folds": num_folds,
            "file": str(output_dir / f"{STAGE}_folds.csv"),
            "deployed": best_fold["checkpoint"],
            "folds": fold_summaries,
        },
        **teachers[-1].totals,
        "compute": compute,
    }
    if accelerator.is_main_process:
        if num_folds > 1:  # the deployable teacher: the fold teacher with the best val ACER
            deployed = output_dir / "checkpoints" / STAGE / f"{STAGE}_best.safetensors"
            write_with(deployed, lambda tmp: shutil.copyfile(best_fold["checkpoint"], tmp))
        write_folds(output_dir / f"{STAGE}_folds.csv", splits["train"], folds)
        write_soft_labels(soft_labels_path, soft_labels)
        evaluation.write_predictions(output_dir / f"{STAGE}_val_predictions.csv", val_predictions)
        evaluation.write_predictions(output_dir / f"{STAGE}_test_predictions.csv", test_predictions)
        write_json(output_dir / f"{STAGE}_results.json", results)
        logger.info(
            f"Wrote {results['num_soft_labels']} soft labels to {soft_labels_path} and results to "
            f"{output_dir / f'{STAGE}_results.json'}"
        )
        report = experiment_report.write_all(output_dir, (STAGE,), log=logger.warning)
        logger.info(f"Report: {report} (plots in {output_dir / 'plots'})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_cli(main)
