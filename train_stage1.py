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
import atexit
import datetime
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
from wfas_data import UserError

STAGE = "stage1"
logger = get_logger(STAGE)

# Flags that control one invocation rather than describe the experiment; they stay out of stage1_config.json.
RUN_CONTROL_KEYS = ("config", "resume_from_checkpoint")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", help="JSON file with any of these flags as keys; command-line flags override it")

    group = parser.add_argument_group("data")
    group.add_argument("--data_root", help="WFAS folder (holding Train/), Train/ itself, or a labelled list file")
    group.add_argument("--output_dir", default="output", help="experiment folder")
    group.add_argument("--val_fraction", type=float, default=0.1, help="share of subjects held out for val")
    group.add_argument("--test_fraction", type=float, default=0.1, help="share of subjects held out for test")
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
    return args


def train_transform(img_size):
    """What a loader worker does to each train face crop, uint8 tensor in and out; normalisation and
    --color_jitter run batched on the device. Attack cues are fine textures (halftone, moire), so it stays mild.
    The crop it starts from is the face box times --face_crop_scale, all that the face cache stores (at
    img_size / 0.875): scale 0.8-1.0 only zooms in; to zoom out, raise --face_crop_scale (a new cache)."""
    return T.Compose([T.RandomResizedCrop(img_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
                      T.RandomHorizontalFlip()])


def write_soft_labels(path, table, probs, indices):
    """{relative image path: [prob_spoof, prob_live]}, loadable with torch.load(..., weights_only=True)."""
    paths = table.paths()
    soft_labels = {paths[i]: [float(p[0]), float(p[1])] for i, p in zip(indices, probs)}
    tmp = wfas_data.aside(path)
    torch.save(soft_labels, tmp)
    os.replace(tmp, path)
    return len(soft_labels)


def main(argv=None):
    args = parse_args(argv)
    start_time = time.time()
    output_dir = Path(args.output_dir)
    ckpt_dir = output_dir / "checkpoints" / STAGE
    best_path, latest_dir = ckpt_dir / f"{STAGE}_best.safetensors", ckpt_dir / f"{STAGE}_latest"
    accelerator, log_file = start_run(args, output_dir, ckpt_dir)

    def load_split_and_model():  # the main process writes split.csv and fetches the weights first
        split_table = wfas_data.load_or_create_split(args.data_root, output_dir, args.val_fraction,
                                                     args.test_fraction, args.seed, log=logger.info)
        return split_table, create_model(args.model_name, args.img_size, args.pretrained, args.pretrained_file,
                                         args.model_cache_dir, args.drop_path_rate)

    table, teacher = main_process_first(accelerator, load_split_and_model)
    splits = {name: table.of_split(name) for name in wfas_data.SPLITS}
    mean, std, img_size, compute, loader_settings, cache, datasets = prepare_data(accelerator, args, table, teacher)
    log_setup(accelerator, args, img_size, compute, table, loader_settings, cache, log_file)

    train_loader = make_loader(datasets["train"], args.batch_size, loader_settings, shuffle=True)
    if len(train_loader) == 0:
        raise UserError(f"the train split has {len(datasets['train'])} images, fewer than one batch of "
                        f"{args.batch_size}; lower --batch_size")
    val_loader = make_loader(datasets["val"], args.batch_size, loader_settings)
    optimizer = create_optimizer_v2(teacher, "adamw", lr=args.learning_rate, weight_decay=args.weight_decay)
    model, optimizer, train_loader, val_loader = accelerator.prepare(teacher, optimizer, train_loader, val_loader)
    set_seed(args.seed, device_specific=True)
    scheduler, total_updates, updates_per_epoch = build_scheduler(optimizer, args, len(train_loader))
    state, skip_batches = resume_or_start(accelerator, args, latest_dir, updates_per_epoch)
    scheduler.step_update(state["global_step"])

    stopper = StopOnSignal(train_loader, val_loader)
    progress = wfas_data.progress_bar(total=total_updates, initial=state["global_step"], desc="stage 1",
                                      disable=not accelerator.is_local_main_process)
    run_meter = RunMeter(args.num_epochs, total_updates, updates_per_epoch)
    checkpoint_metadata = {"model_name": args.model_name, "img_size": str(img_size),
                           "face_crop_scale": str(args.face_crop_scale), "compute": compute}
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
            meter.add(batch, loss)
            if accelerator.sync_gradients and after_update(accelerator, args, state, scheduler, progress, meter,
                                                           stopper, latest_dir, total_updates):
                break
        train = meter.finish()
        val, _ = wfas_data.evaluate(model, val_loader, splits["val"], accelerator, mean, std, log_warning=warn)
        improved = keep_best(accelerator, state, epoch, val, teacher, best_path, checkpoint_metadata)
        save_latest(accelerator, latest_dir, state)
        run_meter.log_epoch(accelerator, output_dir, epoch, state, train, val, meter, optimizer, improved, start_time)
        stopper.stop_if_requested(accelerator, latest_dir, state)
    progress.close()
    stopper.restore()
    load_best(accelerator, teacher, best_path)
    # Val is scored again as test will be (with --tta too), so that the threshold fits the test scores.
    best_val, val_rows = wfas_data.evaluate(model, val_loader, splits["val"], accelerator, mean, std, tta=args.tta,
                                            log_warning=warn)
    logger.info(f"Best epoch {state['best_epoch'] + 1}: val {wfas_data.format_metrics(best_val)}")
    test_loader = accelerator.prepare(make_loader(datasets["test"], args.batch_size, loader_settings))
    test, test_rows = wfas_data.evaluate(model, test_loader, splits["test"], accelerator, mean, std,
                                         best_val["threshold"], args.tta, desc="test", log_warning=warn)
    logger.info(f"Teacher test at the val threshold {best_val['threshold']:.4f}: {wfas_data.format_metrics(test)}")

    soft_dataset = wfas_data.FaceDataset(splits["train"], img_size, face_crop_scale=args.face_crop_scale, cache=cache)
    soft_loader = accelerator.prepare(make_loader(soft_dataset, args.batch_size, loader_settings))
    probs, indices, ok = wfas_data.predict_probs(model, soft_loader, accelerator, mean, std, args.tta, "soft labels",
                                                 warn)
    soft_labels_path = output_dir / f"{STAGE}_soft_labels.pth"
    train_paths = splits["train"].paths()
    results = {
        "best_epoch": state["best_epoch"] + 1, "val": best_val, "test": test, "threshold": best_val["threshold"],
        "soft_labels_path": str(soft_labels_path), "num_soft_labels": int(ok.sum()),
        "num_train_images": len(splits["train"]),
        # stage 2 checks the soft labels' coverage against the images that could be read
        "undecodable_train_images": sorted(train_paths[i] for i in indices[~ok]),
        **run_meter.totals(accelerator, start_time), "compute": compute,
    }
    if accelerator.is_main_process:
        write_soft_labels(soft_labels_path, splits["train"], probs[ok], indices[ok])
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
# Shared with train_stage2.py. Each helper below is copied there under a `# Copied from train_stage1.py`
# marker, so that each script stays one file to read and edit; `python tests/test_copies.py --fix` rewrites
# the copies from these, and the test suite fails when one drifts.
# ----------------------------------------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring keeps its layout; every flag shows its default unless its help already tells it."""

    def _get_help_string(self, action):
        if "(default" in action.help or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return action.help + " (default: %(default)s)"


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


def warn(message):
    """A warning from whichever process meets it (accelerate's logger speaks on the main process only)."""
    logger.warning(message, main_process_only=False)


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


def make_loader(dataset, batch_size, loader_settings, shuffle=False, batch_sampler=None):
    """A DataLoader whose workers ignore the stop signals (StopOnSignal) and persist across epochs, as timm's
    do: StopOnSignal shuts them down before the process exits."""
    workers = dict(worker_init_fn=StopOnSignal.shield_loader_worker,
                   persistent_workers=loader_settings["num_workers"] > 0, **loader_settings)
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **workers)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, **workers)


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


def keep_best(accelerator, state, epoch, val, net, best_path, metadata):
    """Ends the epoch in the state; saves net (the plain timm model) as the best checkpoint when its val ACER is
    the lowest so far. Returns whether it was."""
    state.update(epoch=epoch, images_done=0)
    improved = val["acer"] < state["best_val_acer"]
    if improved:
        state.update(best_epoch=epoch, best_val_acer=val["acer"])
        save_best(accelerator, net, best_path, {**metadata, "epoch": str(epoch), "val_metrics": val})
    return improved


def load_best(accelerator, net, best_path):
    if not best_path.is_file():
        raise UserError(f"no best checkpoint at {best_path}: training ran no epoch (check --num_epochs)")
    accelerator.wait_for_everyone()
    net.load_state_dict(load_file(best_path))


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


def save_best(accelerator, module, path, metadata):
    """A plain timm model's weights in safetensors, with metadata; written aside and renamed into place.
    module: the model before prepare(), so that the keys carry no DDP or torch.compile prefix."""
    if accelerator.is_main_process:
        weights = {k: v.contiguous().cpu() for k, v in module.state_dict().items()}
        tmp = wfas_data.aside(path)
        save_file(weights, tmp, metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
        os.replace(tmp, path)


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
