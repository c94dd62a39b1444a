"""The frame of a training run, the same for both stages: flags from --config, the Accelerator and the log, the
work the main process does first, the run's description in the log, and per epoch the meter, the progress bar,
the log line, summary.csv and the trackers. The stage scripts hold the recipe; this holds none of it.
"""

import argparse
import csv
import datetime
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.tracking import get_available_trackers
from accelerate.utils import (
    DataLoaderConfiguration,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)

import networks
import wfas_data
from errors import UserError, end_with_other_processes
from evaluation import format_metrics
from output_files import aside, format_score, write_json
from progress import progress_bar

logger = get_logger(__name__)

# The longest a process waits in a collective for the others. The slowest legitimate wait is at the start: the
# main process indexing WFAS's 488k training images on a network file system and fetching the weights while the
# others wait (docs/clusters.md says how to do both ahead of time). NCCL's own default, 10 minutes, is too short
# for that; a failure on another process ends the run at once anyway (errors.end_with_other_processes).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)

# Flags that control one invocation rather than describe the experiment; they stay out of <stage>_config.json.
RUN_CONTROL_KEYS = ("config", "resume_from_checkpoint")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring keeps its layout; every flag shows its default unless its help already tells it."""

    def _get_help_string(self, action):
        told = "(default" in action.help or action.default in (None, False, argparse.SUPPRESS)
        if told:
            return action.help
        return action.help + " (default: %(default)s)"


def parse_with_config(parser, argv, stage):
    """Flags from --config FILE.json first, then the command line on top; an unknown key is a user error."""
    config_path = argparse.ArgumentParser(add_help=False)
    config_path.add_argument("--config")
    config_file = config_path.parse_known_args(argv)[0].config
    if config_file:
        try:
            config = json.loads(Path(config_file).read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read --config {config_file}: {error}") from None
        flags = {action.dest for action in parser._actions} - {"help", "config"}
        unknown = sorted(set(config) - flags)
        if unknown:
            raise UserError(
                f"unknown key(s) {', '.join(unknown)} in {config_file}; valid keys are the flags of "
                f"`python train_{stage}.py --help` without the dashes"
            )
        parser.set_defaults(**config)
    args = parser.parse_args(argv)

    args.output_dir = str(Path(args.output_dir).expanduser())
    trackers = [str(tracker) for tracker in get_available_trackers()]
    if args.report_to not in ("none", "all", *trackers):
        raise UserError(
            f"--report_to {args.report_to}: no such tracker is installed here (installed: "
            f"{', '.join(trackers) or 'none'}); e.g. pip install tensorboard"
        )
    if not args.model_cache_dir:
        args.model_cache_dir = str(networks.cache_dir(args.output_dir, stage, args.model_name))
    if not args.face_cache_dir:
        args.face_cache_dir = str(Path(args.output_dir) / "face_cache")
    return args


def setup_logging(log_file=None):
    """Log lines with the time on stdout, and in log_file when given; accelerate's per-file chatter off."""
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO,
        handlers=handlers,
        force=True,
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def start(args, output_dir, stage):
    """The Accelerator, the log (the console, and a file on the main process), the seed and the saved flags.
    Returns (accelerator, the log file's path on the main process or None)."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # the same shuffle on every resume, so that --resume_from_checkpoint continues the same run; copies to the
        # GPU from pinned memory that do not wait for the step before them
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)],
    )
    end_with_other_processes()
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (Ampere and later)

    log_file = None
    if accelerator.is_main_process:
        log_dir = output_dir / "logs" / stage
        log_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        log_file = log_dir / f"{stage}_training_{stamp}.log"
        saved_flags = {key: value for key, value in vars(args).items() if key not in RUN_CONTROL_KEYS}
        write_json(output_dir / f"{stage}_config.json", saved_flags)
    setup_logging(log_file)

    set_seed(args.seed)  # the model's init and the shuffle; the stages seed each process apart after prepare()
    tracked = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
    accelerator.init_trackers(stage, config=tracked)
    return accelerator, log_file


def main_process_first(accelerator, work):
    """work() on the main process, then on the others (it writes what they read); a user error on the main
    process is raised on every process, so that none waits at a barrier."""
    result = None
    error = None
    if accelerator.is_main_process:
        try:
            result = work()
        except UserError as exc:
            error = str(exc)
    error = broadcast_object_list([error])[0]
    if error is not None:
        raise UserError(error)
    if accelerator.is_main_process:
        return result
    return work()


def log_setup(accelerator, *, description, compute, broken_rules, table, loader_line, log_file):
    """The run's settings (description: the stage, model and batch), compute budget, challenge validity, data and
    loader, at the top of the log."""
    logger.info(
        f"{description}; {accelerator.num_processes} process(es) on {accelerator.device.type}, mixed precision "
        f"{accelerator.mixed_precision}"
    )
    logger.info(f"Compute: {compute['params_m']:.2f} M parameters; {compute['challenge_limit']}")
    if broken_rules:  # configs/challenge_stage*.json keep them
        logger.warning(f"Not a valid WFAS challenge entry: {'; '.join(broken_rules)}")
    logger.info(f"Data {table.root}, {len(table)} images:\n{wfas_data.describe_split(table)}")
    if log_file:
        loader_line += f"\nLogging to {log_file}"
    logger.info(loader_line)


class EpochMeter:
    """An epoch's images, data wait, undecodable images and loss parts (summed on the device: no host sync)."""

    def __init__(self, accelerator, log_warning):
        self.accelerator = accelerator
        self.log_warning = log_warning
        self.sums = {}
        self.start = time.time()
        self.images = 0
        self.steps = 0
        self.undecodable = 0
        self.seen = 0
        self.data_wait = 0.0

    def timed(self, batches):
        waiting_since = time.perf_counter()
        for batch in batches:
            self.data_wait += time.perf_counter() - waiting_since
            self.undecodable += wfas_data.check_batch(batch, self.log_warning)
            self.seen += len(batch["error"])
            wfas_data.check_undecodable_share(self.undecodable, self.seen)
            yield batch
            waiting_since = time.perf_counter()

    def add(self, batch, loss, parts=None):
        """A batch's loss parts; returns its images over all processes."""
        for name, value in {"loss": loss.detach(), **(parts or {})}.items():
            self.sums[name] = self.sums.get(name, 0) + value
        self.steps += 1
        images = len(batch["error"]) * self.accelerator.num_processes
        self.images += images
        return images

    def finish(self):
        """The epoch's mean loss parts; its undecodable images summed over the processes."""
        self.seconds = time.time() - self.start
        undecodable = torch.tensor(self.undecodable, device=self.accelerator.device)
        self.undecodable = int(self.accelerator.reduce(undecodable, reduction="sum"))
        return {name: value.item() / self.steps for name, value in self.sums.items()}


class RunLog:
    """Progress, throughput and ETA; per epoch the log line, summary.csv and the trackers, derived from the loss
    parts, so that a new loss term shows up everywhere by itself."""

    def __init__(
        self, accelerator, *, num_epochs, updates_per_epoch, total_updates, first_update, start_time, desc, summary_path
    ):
        self.accelerator = accelerator
        self.start_time = start_time
        self.num_epochs = num_epochs
        self.updates_per_epoch = updates_per_epoch
        self.total_updates = total_updates
        self.summary_path = summary_path
        self.images = 0
        self.seconds = 0.0
        self.epochs = 0
        self.loop_start = time.time()
        self.progress = progress_bar(
            total=total_updates,
            initial=first_update,
            desc=desc,
            disable=not accelerator.is_local_main_process,
        )

    def show_update(self, meter, global_step):
        """One update on the progress bar; every 20, the epoch's mean loss and images per second (a host sync,
        on the process that shows the bar only)."""
        self.progress.update(1)
        if global_step % 20 == 0 and not self.progress.disable:
            speed = meter.images / (time.time() - meter.start)
            mean_loss = meter.sums["loss"].item() / meter.steps
            self.progress.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{speed:.0f}")

    def log_epoch(self, epoch, *, train, val, meter, lr, improved, global_step):
        self.images += meter.images
        self.seconds += meter.seconds
        self.epochs += 1
        updates_left = self.total_updates - global_step
        epochs_left = min(self.num_epochs - epoch - 1, math.ceil(updates_left / self.updates_per_epoch))
        eta = (time.time() - self.loop_start) / self.epochs * epochs_left
        speed = meter.images / meter.seconds
        wait = meter.data_wait / meter.seconds
        elapsed = datetime.timedelta(seconds=round(time.time() - self.start_time))

        train_line = f"train loss {train['loss']:.4f}"
        parts = " ".join(f"{name} {value:.4f}" for name, value in train.items() if name != "loss")
        if parts:
            train_line += f" ({parts})"
        line = (
            f"epoch {epoch + 1}/{self.num_epochs}  {train_line}  val loss {val['loss']:.4f}  "
            f"val {format_metrics(val)}  lr {lr:.2e}  {speed:.0f} img/s  data wait {wait:.0%}  "
            f"elapsed {elapsed}  ETA {datetime.timedelta(seconds=round(eta))}"
        )
        if improved:
            line += "  (best)"
        if meter.undecodable:
            line += f"  {meter.undecodable} undecodable images skipped"
        logger.info(line)

        if self.accelerator.is_main_process:
            row = {
                "epoch": epoch + 1,
                **{f"train_{name}": value for name, value in train.items()},
                **{f"val_{name}": val[name] for name in ("loss", "acer", "apcer", "bpcer", "auc")},
                "lr": lr,
                "images_per_second": speed,
                "data_wait_share": wait,
            }
            write_summary_row(self.summary_path, row)
        tracked = {
            **{f"train/{name}": value for name, value in train.items()},
            "train/lr": lr,
            "train/images_per_second": speed,
            "train/data_wait_share": wait,
            **{f"val/{name}": value for name, value in val.items() if isinstance(value, (int, float))},
        }
        self.accelerator.log(tracked, step=epoch)

    def close(self):
        self.progress.close()

    def totals(self):
        """The run's wall time and throughput, for the results."""
        images_per_second = round(self.images / self.seconds, 1) if self.seconds else None
        return {
            "wall_time_s": round(time.time() - self.start_time, 1),
            "images_per_second": images_per_second,
            "num_processes": self.accelerator.num_processes,
            "mixed_precision": self.accelerator.mixed_precision,
        }


def write_summary_row(path, row):
    """One epoch's row added to a summary.csv (as timm's train.py keeps one), written aside and renamed. A resumed
    run drops the rows of this epoch and later: no epoch is there twice."""
    path = Path(path)
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < int(row["epoch"])]
    rows.append({key: format_score(value) if isinstance(value, float) else value for key, value in row.items()})
    columns = list(dict.fromkeys(key for r in rows for key in r))
    tmp = aside(path)
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
