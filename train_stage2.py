"""Stage 2 of the NetEase WFAS recipe: a MaxViT student trained with focal + triplet + distillation losses
against stage 1's soft labels, and its final val/test results.

    accelerate launch train_stage2.py --output_dir EXP                  # after stage 1 wrote EXP
    python train_stage2.py --output_dir EXP --config configs/stage2_recipe.json

Writes into EXP: stage2_config.json, checkpoints/stage2/, logs/stage2/ (the log, summary.csv), final_results.json
(test metrics, threshold, operating points, compute), stage2_{val,test}_predictions.csv, plots/, report.md.
The submission, folder scoring and ONNX export are tools/predict.py and tools/export_onnx.py. What both stages
run the same way (the run's frame, checkpoints, evaluation, networks) is in the modules imported below.
"""

import argparse
import dataclasses
import functools
import json
import math
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
import losses
import networks
import training_run
import wfas_data
from checkpoints import Checkpoints, StopOnSignal
from errors import UserError, run_cli
from output_files import write_json
from training_run import EpochMeter, RunLog
from wfas_data import LIVE, SPOOF

STAGE = "stage2"
logger = get_logger(STAGE)
warn = functools.partial(logger.warning, main_process_only=False)  # a warning from whichever process meets it

# The learning rate's floor, as a share of the peak: where the warmup starts and the cosine ends.
LR_FLOOR = 0.01


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=training_run.HelpFormatter)
    parser.add_argument("--config", help="JSON file with any of these flags as keys; command-line flags override it")

    group = parser.add_argument_group("data")
    group.add_argument("--data_root", help="the data root of stage 1 (default: the one in EXP/stage1_config.json)")
    group.add_argument("--output_dir", default="output", help="experiment folder of stage 1")
    group.add_argument("--soft_labels_path", help="stage 1's soft labels (default: EXP/stage1_soft_labels.pth)")
    group.add_argument(
        "--face_crop_scale",
        type=float,
        default=wfas_data.DEFAULT_FACE_CROP_SCALE,
        help="face box expansion before the square crop",
    )
    group.add_argument("--img_size", type=int, default=None, help="input size (default: the model's)")
    group.add_argument("--color_jitter", type=float, default=0.1, help="as for stage 1; 0 turns it off")
    group.add_argument("--num_workers", type=int, default=None, help="loader workers per process (as for stage 1)")
    group.add_argument("--face_cache", action=argparse.BooleanOptionalAction, default=True, help="as for stage 1")
    group.add_argument("--face_cache_dir", help="as for stage 1 (default: EXP/face_cache, stage 1's)")
    group.add_argument(
        "--balanced_sampling",
        action=argparse.BooleanOptionalAction,
        help="half live, half spoof batches (default: on when --triplet_weight > 0)",
    )

    group = parser.add_argument_group("model")
    group.add_argument("--model_name", default="maxvit_base_tf_224", help="any timm model")
    group.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True, help="ImageNet weights")
    group.add_argument("--pretrained_file", help="local .safetensors or .pth weights to start from")
    group.add_argument("--model_cache_dir", help="as for stage 1 (default: EXP/model/stage2/<model>)")
    group.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth")
    group.add_argument(
        "--channels_last",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="NHWC memory layout (as for stage 1)",
    )
    group.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the model for training and evaluation (as for stage 1)",
    )

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
    args = training_run.parse_with_config(build_parser(), argv, STAGE)
    if not timm.is_model(args.model_name):
        raise UserError(
            f"--model_name {args.model_name} is not a timm model; e.g. {', '.join(timm.list_models('maxvit_*')[:6])}"
        )
    stage1_config = Path(args.output_dir) / "stage1_config.json"
    if args.data_root is None and stage1_config.is_file():
        args.data_root = json.loads(stage1_config.read_text()).get("data_root")
    args.soft_labels_path = args.soft_labels_path or str(Path(args.output_dir) / "stage1_soft_labels.pth")
    args.balanced_sampling = args.triplet_weight > 0 if args.balanced_sampling is None else args.balanced_sampling
    if args.balanced_sampling and args.batch_size < 2:
        raise UserError(
            f"--balanced_sampling puts half live, half spoof images in each batch and needs "
            f"--batch_size 2 or more (got {args.batch_size}); or pass --no-balanced_sampling"
        )
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
        self.live = np.flatnonzero(labels == LIVE)
        self.spoof = np.flatnonzero(labels == SPOOF)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
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
        batches = np.concatenate(
            [draw(self.live, live_per_batch), draw(self.spoof, self.batch_size - live_per_batch)], axis=1
        )
        yield from (batch.tolist() for batch in batches)


def load_soft_labels(path, splits):
    """Stage 1's {path: [prob_spoof, prob_live]} as a [num_train, 2] tensor aligned with the train dataset (the
    workers do no per-path lookups); images without one get their hard label. Refuses another run's file: one
    that holds val/test images, or covers under 99% of the train images stage 1 could decode."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"no soft labels at {path}; run stage 1 first (train_stage1.py --output_dir "
            f"{path.parent}) or pass --soft_labels_path"
        )
    try:
        soft_labels = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means the same thing to the user
        raise UserError(f"cannot read soft labels {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(soft_labels, dict):
        raise UserError(f"{path} is not a soft-label file: expected a dict {{image path: [prob_spoof, prob_live]}}")
    held_out = [p for name in ("val", "test") for p in splits[name].paths() if p in soft_labels]
    if held_out:
        raise UserError(
            f"soft labels {path} contain {len(held_out)} val/test images (e.g. {held_out[0]}): "
            "they come from another run or split; use the stage 1 output of this EXP folder"
        )
    train_paths = splits["train"].paths()
    targets = np.eye(2, dtype=np.float32)[splits["train"].label]  # the hard-label fallback
    covered = [i for i, image_path in enumerate(train_paths) if image_path in soft_labels]
    for i in covered:
        probs = soft_labels[train_paths[i]]
        if not isinstance(probs, (list, tuple, torch.Tensor)) or len(probs) != 2:
            raise UserError(
                f"soft labels {path}: the entry of {train_paths[i]} is {probs!r}, not [prob_spoof, prob_live]"
            )
        targets[i] = probs
    results = path.with_name("stage1_results.json")
    undecodable = set(json.loads(results.read_text()).get("undecodable_train_images", []) if results.is_file() else [])
    decodable = len(train_paths) - len(undecodable.intersection(train_paths))
    if len(covered) < 0.99 * decodable:
        raise UserError(
            f"soft labels {path} cover {len(covered)} of the {decodable} train images stage 1 could "
            "decode (< 99%): they belong to another run or data root; use the stage 1 output of this EXP "
            "folder"
        )
    return torch.from_numpy(targets), len(train_paths) - len(covered)


def train_transform(img_size):
    """The student's train augmentation, per image in the loader workers (uint8 in and out): as stage 1's, a mild
    zoom into the face crop (the cache's crop is the box x --face_crop_scale: to zoom out, raise it) and a flip."""
    return T.Compose(
        [T.RandomResizedCrop(img_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True), T.RandomHorizontalFlip()]
    )


def build_scheduler(optimizer, args, *, updates_per_epoch, total_updates):
    """Warmup, then cosine decay to LR_FLOOR of the peak, per update (as stage 1's, tuned apart); a function of
    the update count and this run's flags alone, so a resumed run follows an uninterrupted run's schedule."""
    warmup = min(round(args.warmup_epochs * updates_per_epoch), total_updates // 2)  # short runs still decay
    floor = args.learning_rate * LR_FLOOR
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_updates - warmup, 1),
        lr_min=floor,
        warmup_t=warmup,
        warmup_lr_init=floor,
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
    net,
    ema,
    criterion,
    soft_targets,
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
            logits, embeddings = forward(images)
            loss, parts = criterion(
                logits,
                embeddings,
                labels=batch["label"],
                teacher_probs=soft_targets[batch["index"]],
                weights=batch["ok"].float(),  # undecodable images weigh 0
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()  # accelerate steps only at the end of an accumulation
            optimizer.zero_grad()
        state.images_done += meter.add(batch, loss, parts)
        if not accelerator.sync_gradients:
            continue

        state.global_step += 1
        scheduler.step_update(state.global_step)
        if ema is not None:
            ema.update(net, step=state.global_step)
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
class TrainedStudent:
    """What training leaves: the best student's val metrics (the threshold: their EER point), its test metrics at
    that threshold, their predictions, the operating points, the best epoch and the run's totals."""

    val: dict
    test: dict
    val_predictions: evaluation.Predictions
    test_predictions: evaluation.Predictions
    operating_points: list
    best_epoch: int
    totals: dict


def train_student(
    args, *, student, criterion, soft_targets, splits, datasets, loaders, accelerator, metadata, start_time
):
    """Trains the student, keeps its best epoch (the lowest val ACER), fits the threshold on val and scores test
    at it."""
    output_dir = Path(args.output_dir)
    img_size, mean, std = networks.model_input(student, args.img_size)

    # One prepare(): the model, its optimizer and every loader the student reads.
    sampler = None
    if args.balanced_sampling:
        sampler = BalancedBatchSampler(splits["train"].label, args.batch_size, args.seed)
    train_loader = loaders.make(datasets["train"], shuffle=True, batch_sampler=sampler, persistent=True)
    val_loader = loaders.make(datasets["val"], persistent=True)
    test_loader = loaders.make(datasets["test"])
    net = LogitsAndEmbedding(student)
    optimizer = create_optimizer_v2(
        student,
        "adamw",
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        fused=accelerator.device.type in ("cpu", "cuda"),  # docs/performance.md
    )
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        net, optimizer, train_loader, val_loader, test_loader
    )
    set_seed(args.seed, device_specific=True)
    checkpoints = Checkpoints(accelerator, output_dir, STAGE)
    ema = checkpoints.track_ema(net, args.model_ema_decay)  # when on, what is validated, kept and deployed
    forward = networks.compiled(model, args.compile)
    validated = forward
    if ema is not None:
        validated = networks.compiled(ema.module, args.compile)
    soft_targets = soft_targets.to(accelerator.device)

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
    scheduler.step_update(state.global_step)

    stopper = StopOnSignal()
    run_log = RunLog(
        accelerator,
        num_epochs=args.num_epochs,
        updates_per_epoch=updates_per_epoch,
        total_updates=total_updates,
        first_update=state.global_step,
        start_time=start_time,
        desc="stage 2",
        summary_path=output_dir / "logs" / STAGE / "summary.csv",
    )
    for epoch in range(state.epoch + 1, args.num_epochs):
        if state.global_step >= total_updates:
            break
        if sampler is not None:  # the balanced sampler draws each epoch's batches anew
            sampler.set_epoch(epoch)
        meter = train_one_epoch(
            epoch,
            args,
            accelerator=accelerator,
            model=model,
            forward=forward,
            net=net,
            ema=ema,
            criterion=criterion,
            soft_targets=soft_targets,
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

        # The best student: the lowest val ACER.
        val, _ = evaluation.evaluate(
            validated, val_loader, accelerator, split_table=splits["val"], mean=mean, std=std, log_warning=warn
        )
        state.epoch = epoch
        state.images_done = 0
        improved = val["acer"] < state.best_val_acer
        if improved:
            state.best_epoch = epoch
            state.best_val_acer = val["acer"]
            kept = ema.module.net if ema else student
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
    checkpoints.load_best(student)

    # The threshold is the EER point of the best model on val; test is scored at it, never fitted on test.
    val, val_predictions = evaluation.evaluate(
        forward, val_loader, accelerator, split_table=splits["val"], mean=mean, std=std, tta=args.tta, log_warning=warn
    )
    test, test_predictions = evaluation.evaluate(
        forward,
        test_loader,
        accelerator,
        split_table=splits["test"],
        mean=mean,
        std=std,
        threshold=val["threshold"],
        tta=args.tta,
        desc="test",
        log_warning=warn,
    )
    # deployers trade one error for the other: thresholds fitted on val for the error rates they can afford
    operating_points = evaluation.operating_points(
        val_scores=val_predictions.scores,
        val_labels=val_predictions.labels,
        test_scores=test_predictions.scores,
        test_labels=test_predictions.labels,
    )
    return TrainedStudent(
        val=val,
        test=test,
        val_predictions=val_predictions,
        test_predictions=test_predictions,
        operating_points=operating_points,
        best_epoch=state.best_epoch + 1,
        totals=run_log.totals(),
    )


def main(argv=None):
    args = parse_args(argv)
    start_time = time.time()
    output_dir = Path(args.output_dir)
    if not (output_dir / "split.csv").is_file():
        raise UserError(
            f"no split at {output_dir / 'split.csv'}: stage 2 trains on stage 1's split; run stage 1 first "
            f"(accelerate launch train_stage1.py --data_root WFAS --output_dir {output_dir})"
        )
    if not args.data_root:
        raise UserError(f"--data_root is required: {output_dir / 'stage1_config.json'} does not name one")
    accelerator, log_file = training_run.start(args, output_dir, STAGE)

    # Data, soft labels and the student: the main process fetches the weights first, the others reuse them.
    table = wfas_data.load_or_create_split(args.data_root, output_dir, log=logger.info)
    splits = {name: table.of_split(name) for name in wfas_data.SPLITS}
    soft_targets, num_fallback = load_soft_labels(args.soft_labels_path, splits)

    def create_student():
        return networks.create_model(
            args.model_name,
            img_size=args.img_size,
            pretrained=args.pretrained,
            pretrained_file=args.pretrained_file,
            cache_dir=args.model_cache_dir,
            drop_path_rate=args.drop_path_rate,
            channels_last=args.channels_last,
        )

    student = training_run.main_process_first(accelerator, create_student)
    img_size, mean, std = networks.model_input(student, args.img_size)
    compute = challenge.compute_budget(student, args.model_name, img_size)
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
    weights = "pretrained" if args.pretrained else "from scratch"
    batch = f"{args.batch_size} x {accelerator.num_processes} x {args.gradient_accumulation_steps}"
    sampling = ", class-balanced" if args.balanced_sampling else ""
    stage1_config = output_dir / "stage1_config.json"
    teacher_pretrained = stage1_config.is_file() and json.loads(stage1_config.read_text()).get("pretrained", False)
    training_run.log_setup(
        accelerator,
        description=f"Stage 2: {args.model_name} ({weights}), image size {img_size}, batch {batch}{sampling}",
        compute=compute,
        broken_rules=challenge.rules_broken(
            pretrained=args.pretrained, compute=compute, teacher_pretrained=teacher_pretrained
        ),
        table=table,
        loader_line=loaders.describe(cache),
        log_file=log_file,
    )
    logger.info(
        f"Soft labels {args.soft_labels_path}: {len(splits['train']) - num_fallback} train images, "
        f"{num_fallback} fall back to their hard label"
    )
    datasets = wfas_data.build_datasets(
        table, img_size, train_transform(img_size), face_crop_scale=args.face_crop_scale, cache=cache
    )

    # The loss, built once: focal + triplet + distillation, each term weighted by its --<term>_weight.
    term_weights = {name: getattr(args, f"{name}_weight") for name in losses.STAGE2_TERMS}
    term_settings = {
        "focal_gamma": args.focal_gamma,
        "focal_alpha": args.focal_alpha,
        "triplet_margin": args.triplet_margin,
        "kd_temperature": args.kd_temperature,
    }
    criterion = functools.partial(losses.stage2_loss, term_weights=term_weights, **term_settings)
    terms = " + ".join(f"{weight:g} {name}" for name, weight in term_weights.items())
    settings = ", ".join(f"{key} {value}" for key, value in term_settings.items())
    logger.info(f"Loss = {terms} ({settings})")

    metadata = {
        "model_name": args.model_name,
        "img_size": str(img_size),
        "face_crop_scale": str(args.face_crop_scale),
        "compute": compute,
    }
    trained = train_student(
        args,
        student=student,
        criterion=criterion,
        soft_targets=soft_targets,
        splits=splits,
        datasets=datasets,
        loaders=loaders,
        accelerator=accelerator,
        metadata=metadata,
        start_time=start_time,
    )
    val = trained.val
    test = trained.test

    stage1_results = output_dir / "stage1_results.json"
    teacher_test = {}
    if stage1_results.is_file():
        teacher_test = json.loads(stage1_results.read_text())["test"]
    not_reported = ("threshold", "num_images", "loss", "unreadable")
    results = {
        # test_: every test metric (with --unseen_attacks, of the seen and unseen types too)
        **{f"test_{key}": value for key, value in test.items() if key not in not_reported},
        "threshold": val["threshold"],
        "operating_points": trained.operating_points,
        "best_epoch": trained.best_epoch,
        "val_acc": val["acc"],
        "val_acer": val["acer"],
        "val_auc": val["auc"],
        "num_val_images": val["num_images"],
        "num_test_images": test["num_images"],
        "num_soft_label_fallbacks": num_fallback,
        "teacher_test_acer": teacher_test.get("acer"),
        "teacher_test_acc": teacher_test.get("acc"),
        "model_name": args.model_name,
        "img_size": img_size,
        **trained.totals,
        "compute": compute,
    }
    if args.compile:
        logger.info(networks.compile_summary())
    logger.info(f"Best epoch {results['best_epoch']}: val {evaluation.format_metrics(val)}")
    logger.info(f"Test at the val threshold {val['threshold']:.4f}: {evaluation.format_metrics(test, True)}")
    logger.info(evaluation.format_operating_points(trained.operating_points))
    if results["teacher_test_acer"] is not None:
        logger.info(f"Teacher (stage 1) test ACER {teacher_test['acer']:.4f}, student {test['acer']:.4f}")
    if accelerator.is_main_process:
        evaluation.write_predictions(output_dir / "stage2_val_predictions.csv", trained.val_predictions)
        evaluation.write_predictions(output_dir / "stage2_test_predictions.csv", trained.test_predictions)
        write_json(output_dir / "final_results.json", results)
        report = experiment_report.write_all(output_dir, (STAGE,), log=logger.warning)
        logger.info(
            f"Wrote {output_dir / 'final_results.json'}, the per-image predictions and the report {report} "
            f"(plots in {output_dir / 'plots'})"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_cli(main)
