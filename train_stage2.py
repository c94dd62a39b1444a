"""Stage 2 of the NetEase WFAS recipe: a MaxViT student trained with focal + triplet + distillation losses
against stage 1's soft labels; final val/test results and the challenge submission.

    accelerate launch train_stage2.py --output_dir EXP                  # after stage 1 wrote EXP
    python train_stage2.py --output_dir EXP --predict_lists WFAS/Dev/Dev.txt WFAS/Test/Test.txt
    python train_stage2.py --predict_only --output_dir EXP --predict_lists Dev.txt Test.txt
    python train_stage2.py --predict_only --output_dir EXP --predict_folder photos/   # any folder of images
    python train_stage2.py --export_onnx --output_dir EXP                            # EXP/stage2_best.onnx

Writes into EXP: stage2_config.json, checkpoints/stage2/{stage2_best.safetensors, stage2_latest/}, logs/stage2/,
final_results.json (test metrics, threshold, operating points, compute), stage2_{val,test}_predictions.csv and,
with --predict_lists, submission.txt/.zip; with --predict_folder, predictions_<folder name>.csv.
"""
import argparse
import csv
import datetime
import inspect
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
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
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list, set_seed
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.flop_counter import FlopCounterMode
try:  # tqdm comes with huggingface_hub (timm and accelerate need it); its notebook bars need ipywidgets
    import ipywidgets  # noqa: F401
    from tqdm.auto import tqdm
except ImportError:
    from tqdm import tqdm

import losses
import wfas_data
from wfas_data import LIVE, SPOOF, UserError

STAGE = "stage2"
logger = get_logger(STAGE)

# Per-image brightness, contrast and saturation factors in [0.9, 1.1], drawn on the device (light: the attack
# cues include colour casts)
COLOR_JITTER = 0.1

# Flags that control one invocation rather than describe the experiment; they stay out of stage2_config.json.
RUN_CONTROL_KEYS = ("config", "resume_from_checkpoint", "download_only", "predict_only", "predict_folder",
                    "threshold", "checkpoint", "export_onnx", "onnx_tolerance")


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
    group.add_argument("--resume_from_checkpoint",
                       help="'latest' (starts fresh when there is no saved state yet, so a requeued job can "
                            "rerun the same command) or a stage2_latest folder")
    group.add_argument("--checkpointing_steps", type=int, default=0,
                       help="also write stage2_latest every N updates, for a mid-epoch resume (0: per epoch)")
    group.add_argument("--report_to", default="none",
                       help="tensorboard, wandb, ... or all: any tracker accelerate supports")
    group.add_argument("--predict_lists", nargs="+", default=None, metavar="LIST",
                       help="unlabelled challenge lists (Dev.txt Test.txt) to score into EXP/submission.txt")
    group.add_argument("--predict_folder", metavar="DIR",
                       help="also score every image below DIR into EXP/predictions_<DIR name>.csv (path,score,"
                            "decision), cropped around the bbox .txt next to an image when there is one")
    group.add_argument("--threshold", type=float, default=None,
                       help="live when P(live) >= this, for --predict_folder (default: the val EER threshold)")
    group.add_argument("--predict_only", action="store_true",
                       help="no training: score --predict_lists and/or --predict_folder with EXP's stage2_best "
                            "(or --checkpoint)")
    group.add_argument("--checkpoint", help="weights for --predict_only and --export_onnx (default: "
                                            "EXP/checkpoints/stage2/stage2_best.safetensors)")

    group = parser.add_argument_group("deployment")
    group.add_argument("--export_onnx", action="store_true",
                       help="no training: export EXP's stage2_best (or --checkpoint) to EXP/<name>.onnx, checked "
                            "against PyTorch with onnxruntime (pip install onnx onnxscript onnxruntime)")
    group.add_argument("--onnx_tolerance", type=float, default=1e-4,
                       help="largest difference in P(live) between onnxruntime and PyTorch (fp32) that --export_onnx "
                            "accepts")
    return parser


def parse_args(argv=None):
    args = parse_with_config(build_parser(), argv)
    if args.predict_only and not (args.predict_lists or args.predict_folder):
        raise UserError("--predict_only needs --predict_lists (e.g. WFAS/Dev/Dev.txt WFAS/Test/Test.txt) or "
                        "--predict_folder DIR")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise UserError(f"--threshold {args.threshold} is not a probability: P(live) lies in [0, 1]")
    if not (args.predict_only or args.export_onnx) and not timm.is_model(args.model_name):
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


# ----------------------------------------------------------------------------------------------------------
# Run plumbing. The same in train_stage1.py and train_stage2.py, deliberately: each script stays one file to
# read and edit. tests/test_copies.py fails when the two copies of a helper differ.
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
        args.model_cache_dir = str(Path(args.output_dir) / "model" / STAGE / args.model_name)
    if args.face_cache_dir is None:
        args.face_cache_dir = str(Path(args.output_dir) / "face_cache")
    return args


def setup_logging(accelerator, log_dir):
    """Console on every process (accelerate's logger keeps non-main quiet), plus a file on the main process."""
    handlers = [logging.StreamHandler(sys.stdout)]
    if accelerator.is_main_process:
        log_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        handlers.append(logging.FileHandler(log_dir / f"{STAGE}_training_{stamp}.log"))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, handlers=handlers, force=True)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # per-file save_state chatter
    return handlers[-1].baseFilename if accelerator.is_main_process else None


def log_warning_here(message):
    """A warning from whichever process meets it (accelerate's logger speaks on the main process only)."""
    logger.warning(message, main_process_only=False)


class PlainProgress:
    """tqdm's interface for output that is not a terminal (SLURM .out files, CI, `> log`): one plain line
    at the first update and then every `interval` seconds, instead of a frame per update."""

    def __init__(self, iterable=None, total=None, initial=0, desc="", disable=False, leave=True, interval=60, **_):
        self.iterable, self.desc, self.disable, self.interval = iterable, desc, disable, interval
        self.first_line = leave  # a short-lived bar (leave=False) speaks only once it has run `interval`
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.initial = initial
        self.start = self.last = time.time()
        self.postfix = {}

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n=1):
        self.n += n
        first = self.first_line and self.n - self.initial == n
        if self.disable or (not first and time.time() - self.last < self.interval):
            return
        self.last = time.time()
        rate = (self.n - self.initial) / max(self.last - self.start, 1e-9)
        line = f"{self.desc}: {self.n}" + (f"/{self.total} ({100 * self.n / self.total:.1f}%)" if self.total else "")
        line += f", {rate:.2f} it/s"
        if self.total and rate > 0:
            line += f", ETA {datetime.timedelta(seconds=round((self.total - self.n) / rate))}"
        logger.info(line + "".join(f", {k} {v}" for k, v in self.postfix.items()))

    def set_postfix(self, **postfix):
        self.postfix = postfix

    def close(self):
        pass


def progress_bar(iterable=None, **kwargs):
    """A live tqdm bar on a terminal and in notebooks; plain progress lines anywhere else."""
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    return (tqdm if interactive else PlainProgress)(iterable, **kwargs)


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
    tmp = wfas_data.aside(cached)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, cached)
    shutil.rmtree(download_dir, ignore_errors=True)
    return cached


def create_model(model_name, img_size=None, pretrained=False, pretrained_file=None, cache_dir=None,
                 drop_path_rate=0.0):
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
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                                 **kwargs)
    except (RuntimeError, OSError, ValueError) as error:
        raise UserError(f"cannot load {weights} into {model_name}: {str(error).splitlines()[0]}") from None


def save_best(accelerator, module, path, metadata):
    """A plain timm model's weights in safetensors, with metadata; written aside and renamed into place.
    module: the unwrapped model, accelerator.unwrap_model(model, keep_torch_compile=False), so that the keys
    carry no DDP or torch.compile prefix."""
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


def load_training_state(accelerator, resume_dir):
    """accelerator.load_state with accelerate's INFO lines shown, so that the log says what it could not
    restore (the random states of another number of processes, say), plus our counters."""
    accelerate_logger = logging.getLogger("accelerate")
    level = accelerate_logger.level
    accelerate_logger.setLevel(logging.INFO)
    try:
        accelerator.load_state(str(resume_dir))
    finally:
        accelerate_logger.setLevel(level)
    return json.loads((resume_dir / "training_state.json").read_text())


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
    several processes check it every CHECK_EVERY updates only."""
    CHECK_EVERY = 10

    def __init__(self):
        self.signum = None
        self.handled = (signal.SIGTERM, signal.SIGUSR1)
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

    @staticmethod
    def shield_loader_worker(worker_id):
        """A DataLoader worker_init_fn. Schedulers signal every process of a job, loader workers too, and a
        worker dies of SIGTERM by default, which would break the step the run is finishing; workers ignore
        the stop signals and are shut down by their parent as usual."""
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_IGN)

    def restore(self):
        """Back to the default actions: past the training loop, a signal should end the run at once."""
        if threading.current_thread() is threading.main_thread():
            for signum in self.handled:
                signal.signal(signum, signal.SIG_DFL)

# ----------------------------------------------------------------------------------------------------------
# Deployment: compute budget, the best checkpoint and its ONNX export. Also the same in both scripts.
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def compute_budget(net, model_name, img_size):
    """Parameters and multiply-accumulates (MACs) of one image's forward pass at img_size, counted by torch's
    FLOP counter (convolutions, matmuls and attention, as timm's published GMACs), and where they stand
    against the challenge's single-model limit."""
    training = net.training
    net.eval()
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, img_size, img_size, device=next(net.parameters()).device))
    net.train(training)
    gflops = counter.get_total_flops() / 1e9  # the counter counts a multiply-accumulate as 2 FLOPs
    gmacs, limit = gflops / 2, wfas_data.CHALLENGE_GFLOPS_LIMIT
    # "FLOPs" in papers and model cards are often MACs: say what holds under each reading
    if gflops <= limit:
        within, verdict = "yes", f"within the challenge's single-model limit of {limit:g} GFLOPs"
    elif gmacs <= limit:
        within, verdict = "as MACs only", (f"within the challenge's {limit:g} GFLOPs limit only if FLOPs are read "
                                           "as multiply-accumulates (as timm's tables do), over it at 2 FLOPs each")
    else:
        within, verdict = "no", f"over the challenge's single-model limit of {limit:g} GFLOPs however FLOPs are counted"
    return {"model_name": model_name, "img_size": img_size,
            "params_m": sum(p.numel() for p in net.parameters()) / 1e6, "gmacs": gmacs, "gflops": gflops,
            "within_challenge_limit": within,
            "challenge_limit": f"{model_name} at {img_size}x{img_size}: {gmacs:.3g} GMACs = {gflops:.3g} GFLOPs, "
                               f"{verdict}."}


def load_checkpoint(checkpoint, output_dir):
    """The timm model of a checkpoint written by save_best (default: EXP's best of this stage), on the CPU in
    eval mode, with the checkpoint's metadata (JSON values decoded) and its path."""
    checkpoint = Path(checkpoint or Path(output_dir) / "checkpoints" / STAGE / f"{STAGE}_best.safetensors")
    if not checkpoint.is_file():
        raise UserError(f"no checkpoint at {checkpoint}; train {STAGE} first or pass --checkpoint PATH")
    try:
        with safe_open(checkpoint, framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise UserError(f"cannot read {checkpoint}: {str(error).splitlines()[0]}") from None
    if "model_name" not in raw or "img_size" not in raw:
        raise UserError(f"{checkpoint} has no model_name/img_size metadata: it was not written by "
                        "train_stage1.py or train_stage2.py")
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


class DeployedModel(torch.nn.Module):
    """What the ONNX file computes: uint8 RGB face crops [N, 3, H, W] in, P(live) [N] out. It normalises as
    wfas_data.to_model_input does, so that a deployer only crops and resizes."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, face_crops):
        return self.net((face_crops.float() / 255 - self.mean) / self.std).softmax(-1)[:, LIVE]


def parity_crops(output_dir, data_root, img_size, face_crop_scale, count=64):
    """Up to count val face crops of EXP's split, made as the loader makes them, to compare an export with
    PyTorch on; generated crops when the split or its images are not at hand.
    Returns (uint8 [N, 3, H, W], what they are)."""
    if not (Path(output_dir) / "split.csv").is_file():
        reason = f"no split.csv in {output_dir}"
    elif not data_root:
        reason = f"{output_dir} names no data root; pass --data_root"
    else:
        try:
            val = wfas_data.load_or_create_split(data_root, output_dir, log=lambda message: None).of_split("val")
            sample = val.select(np.unique(np.linspace(0, len(val) - 1, min(count, len(val))).round().astype(int)))
            dataset = wfas_data.FaceDataset(sample, img_size, face_crop_scale=face_crop_scale)
            images = [item["image"] for item in map(dataset.__getitem__, range(len(dataset))) if item["ok"]]
            if images:
                return torch.stack(images), f"{len(images)} val images of {data_root}"
            reason = f"none of the sampled val images of {data_root} could be read"
        except UserError as error:
            reason = str(error)
    generator = torch.Generator().manual_seed(0)
    crops = torch.randint(0, 256, (count, 3, img_size, img_size), dtype=torch.uint8, generator=generator)
    return crops, f"{count} generated crops ({reason})"


def export_onnx(args, accelerator, batch_size=32):
    """EXP/<checkpoint name>.onnx from this stage's best checkpoint (or --checkpoint), with the preprocessing a
    deployer must reproduce in its metadata. It is written only when onnxruntime gives the checkpoint's
    P(live) within --onnx_tolerance (fp32) on val images."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter runs on it)
    except ImportError as error:
        raise UserError(f"--export_onnx needs onnx, onnxscript and onnxruntime ({error}): "
                        "pip install onnx onnxscript onnxruntime") from None
    if "external_data" not in inspect.signature(torch.onnx.export).parameters:
        raise UserError(f"--export_onnx needs torch's torch.export-based ONNX exporter (torch 2.6 or later); this is "
                        f"torch {torch.__version__}")
    if accelerator.num_processes > 1:
        raise UserError(f"--export_onnx runs in one process: python train_{STAGE}.py --export_onnx --output_dir "
                        f"{args.output_dir}")
    net, metadata, checkpoint = load_checkpoint(args.checkpoint, args.output_dir)
    img_size = int(metadata["img_size"])
    face_crop_scale = float(metadata.get("face_crop_scale", args.face_crop_scale))
    data_config = timm.data.resolve_data_config({}, model=net)
    mean, std = data_config["mean"], data_config["std"]
    threshold = metadata.get("val_metrics", {}).get("threshold")
    compute = metadata.get("compute") or compute_budget(net, metadata["model_name"], img_size)
    crops, source = parity_crops(args.output_dir, args.data_root or stage1_data_root(args.output_dir), img_size,
                                 face_crop_scale)
    batches = list(crops.split(batch_size))

    def timed(predict):
        predict(batches[0])  # warm-up: the first call allocates and picks kernels
        start = time.perf_counter()
        scores = np.concatenate([predict(batch) for batch in batches])
        return scores, len(crops) / (time.perf_counter() - start)

    @torch.no_grad()
    def reference(batch):  # what training and prediction compute
        return net(wfas_data.to_model_input(batch, mean, std)).softmax(-1)[:, LIVE].numpy()

    expected, torch_speed = timed(reference)

    # torch.export cannot decompose timm's fused attention with MaxViT's relative position bias; the plain
    # softmax(QK^T)V path exports (the parity check compares it with the fused one)
    for module in net.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    onnx_path = Path(args.output_dir) / f"{checkpoint.stem}.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = wfas_data.aside(onnx_path)
    logger.info(f"Exporting {checkpoint} ({metadata['model_name']}, image size {img_size}) to ONNX")
    for chatty in ("onnxscript", "onnx_ir"):  # their graph optimiser logs every rewrite at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        torch.onnx.export(DeployedModel(net, mean, std).eval(), (crops[:2],), tmp, input_names=["face_crops"],
                          output_names=["p_live"], dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                          opset_version=18, external_data=False, verbose=False)  # 18: runtimes of 2023 on
    except Exception as error:  # the exporter's errors are long reports; their first line says what failed
        tmp.unlink(missing_ok=True)
        raise UserError(f"torch.onnx.export cannot export {metadata['model_name']}: "
                        f"{str(error).splitlines()[0]}") from None
    deployment = {
        "stage": STAGE, "model_name": metadata["model_name"], "source_checkpoint": str(checkpoint.resolve()),
        "input": f"face_crops: uint8 [batch, 3, {img_size}, {img_size}], RGB",
        "output": "p_live: float32 [batch], the probability that the face is live (label convention: live = 1, "
                  "spoof = 0)",
        "img_size": str(img_size), "face_crop_scale": str(face_crop_scale),
        "face_crop": f"the square around the face box, its longer side times face_crop_scale, centred on the box and "
                     f"shifted (then shrunk) to stay inside the image, resized to {img_size}x{img_size} bilinear "
                     "with antialiasing; the whole image when there is no box (wfas_data.face_crop_box)",
        "mean": json.dumps(list(mean)), "std": json.dumps(list(std)),
        "normalisation": "inside the model: (face_crops / 255 - mean) / std",
        "threshold": json.dumps(threshold), "decision": "live when p_live >= threshold (the val EER point)",
        "val_metrics": json.dumps(metadata.get("val_metrics")), "compute": json.dumps(compute),
        "exported_with": f"torch {torch.__version__}, timm {timm.__version__}",
    }
    model = onnx.load(tmp)
    onnx.helper.set_model_props(model, deployment)
    onnx.checker.check_model(model)
    onnx.save(model, tmp)

    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    exported, onnx_speed = timed(lambda batch: session.run(None, {"face_crops": batch.numpy()})[0])
    largest, tolerance = float(np.abs(exported - expected).max()), args.onnx_tolerance
    if not largest <= tolerance:  # NaN fails too
        tmp.unlink()
        raise UserError(f"the ONNX export of {checkpoint} gives P(live) up to {largest:.2e} away from PyTorch on "
                        f"{source} (tolerance {tolerance:g}); {onnx_path} was not written (--onnx_tolerance sets the "
                        "limit)")
    os.replace(tmp, onnx_path)
    logger.info(f"Parity on {source}: largest |P(live) difference| {largest:.1e} (tolerance {tolerance:g}); "
                f"{torch_speed:.0f} img/s in PyTorch, {onnx_speed:.0f} img/s in onnxruntime on this CPU "
                f"({torch.get_num_threads()} threads, batches of {batch_size})")
    logger.info(f"Wrote {onnx_path}: input {deployment['input']}, output p_live [batch]; live when p_live >= "
                f"{threshold}. {compute['challenge_limit']}")
    return {"onnx_path": str(onnx_path), "max_abs_diff": largest, "parity_images": len(crops),
            "parity_source": source, "torch_images_per_second": torch_speed, "onnx_images_per_second": onnx_speed,
            **deployment}


def stage1_data_root(output_dir):
    """The data root stage 1 recorded in EXP/stage1_config.json, or None."""
    config = Path(output_dir) / "stage1_config.json"
    return json.loads(config.read_text()).get("data_root") if config.is_file() else None


# ----------------------------------------------------------------------------------------------------------
# Stage 2: the student, its sampler, soft labels, prediction and the submission
# ----------------------------------------------------------------------------------------------------------

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


@torch.no_grad()
def predict_scores(model, loader, accelerator, data_config, tta=False, desc="predicting"):
    """P(live) for every image of loader, each counted once across processes.
    Returns (scores [N], dataset indices [N], decoded-ok mask [N]) on every process."""
    model.eval()
    scores, indices, oks = [], [], []
    for batch in progress_bar(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        wfas_data.check_batch(batch, log_warning_here)
        images = wfas_data.to_model_input(batch["image"], data_config["mean"], data_config["std"])
        batch_scores = model(images)[0].float().softmax(-1)[:, LIVE]
        if tta:
            batch_scores = (batch_scores + model(images.flip(-1))[0].float().softmax(-1)[:, LIVE]) / 2
        # inside the loop: only here does gather_for_metrics drop the sampler's padding duplicates
        batch_scores, batch_indices, batch_ok = accelerator.gather_for_metrics(
            (batch_scores, batch["index"], batch["ok"].to(torch.uint8)))
        scores.append(batch_scores.cpu())
        indices.append(batch_indices.cpu())
        oks.append(batch_ok.cpu())
    return torch.cat(scores).numpy(), torch.cat(indices).numpy(), torch.cat(oks).numpy().astype(bool)


def score_split(model, loader, split_table, accelerator, data_config, tta=False, desc="val"):
    """(paths, labels, attack types, scores) of the decodable images of one split, in dataset order."""
    scores, indices, ok = predict_scores(model, loader, accelerator, data_config, tta, desc)
    order = np.argsort(indices[ok], kind="stable")
    indices, scores = indices[ok][order], scores[ok][order]
    paths, attack_types = np.array(split_table.paths()), np.array(split_table.attack_types())
    return paths[indices], split_table.label[indices], attack_types[indices], scores


def write_predictions(path, paths, labels, attack_types, scores):
    """path,label,attack_type,score; scores exactly as computed, so that the metrics recomputed from the file
    at the reported threshold are the reported ones."""
    tmp = wfas_data.aside(path)
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "attack_type", "score"])
        writer.writerows(zip(paths, labels.tolist(), attack_types, map(wfas_data.format_score, scores)))
    os.replace(tmp, path)


def challenge_set(list_file):
    """'dev' or 'test': the challenge set of a list, from its file name or else its folder's name."""
    path = Path(list_file).expanduser().absolute()
    for name in (path.stem.lower(), path.parent.name.lower()):
        found = [candidate for candidate in ("dev", "test") if candidate in name]
        if len(found) == 1:
            return found[0]
    raise UserError(f"cannot tell whether {list_file} is the dev or the test list: its file name or folder must "
                    "contain 'dev' or 'test' (as WFAS/Dev/Dev.txt and WFAS/Test/Test.txt do)")


def score_unlabelled(model, accelerator, args, table, img_size, data_config, face_crop_scale, cache, desc):
    """P(live) of every image of an unlabelled table, in table order; NaN where an image cannot be decoded."""
    dataset = wfas_data.FaceDataset(table, img_size, face_crop_scale=face_crop_scale, cache=cache)
    loader = accelerator.prepare(torch.utils.data.DataLoader(dataset, batch_size=args.batch_size,
                                                             **wfas_data.default_loader_settings(args.num_workers)))
    scores, indices, ok = predict_scores(model, loader, accelerator, data_config, args.tta, desc=desc)
    table_scores = np.full(len(table), np.nan)
    table_scores[indices[ok]] = scores[ok]
    return table_scores


def write_submission(model, accelerator, args, img_size, data_config, face_crop_scale):
    """EXP/submission.txt: `dev/<name> <P(live)>` lines in list order, dev before test; and a zip of it.
    An image that cannot be decoded still gets its line, with 0.5, and a warning. Scores keep 12 decimals,
    so that confident ones do not collapse into ties at 1 or 0."""
    sets = {list_file: challenge_set(list_file) for list_file in args.predict_lists}
    if len(set(sets.values())) < len(sets):
        raise UserError(f"--predict_lists {' '.join(args.predict_lists)}: give one dev and one test list, not "
                        f"{', '.join(sets.values())}")
    lines = []
    for list_file in sorted(args.predict_lists, key=lambda p: sets[p] != "dev"):
        folder, names = wfas_data.read_prediction_list(list_file)
        table = wfas_data.unlabelled_table(folder, names)
        loader_settings = wfas_data.default_loader_settings(args.num_workers)
        cache = wfas_data.build_face_cache(
            table, args.face_cache_dir, img_size, face_crop_scale, loader_settings["num_workers"],
            accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone, logger.info,
        ) if args.face_cache else None
        list_scores = score_unlabelled(model, accelerator, args, table, img_size, data_config, face_crop_scale, cache,
                                       desc=Path(list_file).name)
        undecodable = np.isnan(list_scores)
        if undecodable.any():
            logger.warning(f"{int(undecodable.sum())} images of {list_file} could not be decoded; they are scored 0.5")
            list_scores[undecodable] = 0.5
        prefix = sets[list_file]
        keys = [name if name.startswith(prefix + "/") else f"{prefix}/{name}" for name in names]
        lines += [f"{key} {score:.12f}" for key, score in zip(keys, np.clip(list_scores, 0, 1))]
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        txt, archive = output_dir / "submission.txt", output_dir / "submission.zip"
        tmp = wfas_data.aside(txt)
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, txt)
        tmp = wfas_data.aside(archive)
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.write(txt, arcname="submission.txt")
        os.replace(tmp, archive)
        logger.info(f"Wrote {len(lines)} scores to {txt} and {archive}")
    accelerator.wait_for_everyone()
    return str(output_dir / "submission.txt")


def score_folder(model, accelerator, args, img_size, data_config, face_crop_scale, val_threshold):
    """EXP/predictions_<folder name>.csv: path,score,decision for every image below --predict_folder, live when
    P(live) >= --threshold or else the val threshold. An image is cropped around the face box of the bbox
    .txt next to it, or taken whole without one. One that cannot be decoded keeps its row, with an empty
    score and the decision "undecodable"."""
    folder = Path(args.predict_folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"--predict_folder {folder} is not a folder")
    paths = wfas_data.list_images(folder)
    if not paths:
        raise UserError(f"--predict_folder {folder} holds no images ({', '.join(sorted(wfas_data.IMAGE_EXTENSIONS))} "
                        "files, at any depth)")
    threshold = val_threshold if args.threshold is None else args.threshold
    if threshold is None:
        raise UserError("the checkpoint records no val threshold; pass --threshold T")
    folder_scores = score_unlabelled(model, accelerator, args, wfas_data.unlabelled_table(folder, paths), img_size,
                                     data_config, face_crop_scale, cache=None, desc=folder.name)
    decisions = np.where(np.isnan(folder_scores), "undecodable", np.where(folder_scores >= threshold, "live", "spoof"))
    csv_path = Path(args.output_dir) / f"predictions_{folder.resolve().name}.csv"
    if accelerator.is_main_process:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = wfas_data.aside(csv_path)
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "score", "decision"])
            writer.writerows((path, "" if np.isnan(score) else wfas_data.format_score(score), decision)
                             for path, score, decision in zip(paths, folder_scores, decisions))
        os.replace(tmp, csv_path)
    num_undecodable = int((decisions == "undecodable").sum())
    if num_undecodable:
        logger.warning(f"{num_undecodable} of the {len(paths)} images below {folder} could not be decoded: their rows "
                       "in the CSV have an empty score")
    logger.info(f"Scored {len(paths)} images below {folder}: {int((decisions == 'live').sum())} live, "
                f"{int((decisions == 'spoof').sum())} spoof at threshold {threshold:.6f} "
                f"({'--threshold' if args.threshold is not None else 'the val EER point'}); wrote {csv_path}")
    accelerator.wait_for_everyone()
    return str(csv_path)


def predict_only(args, accelerator):
    net, metadata, checkpoint = load_checkpoint(args.checkpoint, args.output_dir)
    img_size = int(metadata["img_size"])
    data_config = timm.data.resolve_data_config({}, model=net)
    face_crop_scale = float(metadata.get("face_crop_scale", args.face_crop_scale))
    logger.info(f"Scoring with {checkpoint} ({metadata['model_name']}, image size {img_size})")
    model = accelerator.prepare(LogitsAndEmbedding(net))
    results = {}
    if args.predict_lists:
        results["submission_path"] = write_submission(model, accelerator, args, img_size, data_config,
                                                      face_crop_scale)
    if args.predict_folder:
        results["folder_predictions"] = score_folder(model, accelerator, args, img_size, data_config,
                                                     face_crop_scale, metadata.get("val_metrics", {}).get("threshold"))
    return results


def main(argv=None):
    args = parse_args(argv)
    start_time = time.time()
    output_dir = Path(args.output_dir)
    ckpt_dir = output_dir / "checkpoints" / STAGE
    best_path, latest_dir = ckpt_dir / f"{STAGE}_best.safetensors", ckpt_dir / f"{STAGE}_latest"

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # the same shuffle on every resume, so that --resume_from_checkpoint continues the same run
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (Ampere and later)
    log_file = setup_logging(accelerator, output_dir / "logs" / STAGE)

    if args.download_only:
        weights = main_process_first(accelerator, lambda: fetch_pretrained(args.model_name, args.model_cache_dir))
        logger.info(f"Pretrained {args.model_name} weights are in {weights}; compute nodes will reuse them")
        return {"pretrained_file": str(weights)}
    if args.export_onnx:
        return export_onnx(args, accelerator)
    if args.predict_only:
        return predict_only(args, accelerator)

    if not (output_dir / "split.csv").is_file():
        raise UserError(f"no split at {output_dir / 'split.csv'}: stage 2 trains on stage 1's split; run stage 1 "
                        f"first (accelerate launch train_stage1.py --data_root WFAS --output_dir {output_dir})")
    if not args.data_root:
        raise UserError(f"--data_root is required: {output_dir / 'stage1_config.json'} does not name one")
    # The same seed on every process for the model's init and the seedable sampler's shuffle (taken at
    # prepare()); a per-process seed after prepare() for augmentation and stochastic depth.
    set_seed(args.seed)
    table = wfas_data.load_or_create_split(args.data_root, output_dir, log=logger.info)
    splits = {name: table.of_split(name) for name in wfas_data.SPLITS}
    soft_targets, num_fallback = load_soft_labels(args.soft_labels_path, splits)
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in RUN_CONTROL_KEYS}
        wfas_data.write_json(output_dir / f"{STAGE}_config.json", config)

    net = main_process_first(accelerator, lambda: create_model(  # the others reuse the fetched weights
        args.model_name, args.img_size, args.pretrained, args.pretrained_file, args.model_cache_dir,
        args.drop_path_rate))
    data_config = timm.data.resolve_data_config({}, model=net)
    img_size = args.img_size or data_config["input_size"][-1]
    compute = compute_budget(net, args.model_name, img_size)
    loader_settings = wfas_data.default_loader_settings(args.num_workers)
    cache = wfas_data.build_face_cache(
        table, args.face_cache_dir, img_size, args.face_crop_scale, loader_settings["num_workers"],
        accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone, logger.info,
    ) if args.face_cache else None
    datasets = wfas_data.build_datasets(table, img_size, args.face_crop_scale, cache)

    logger.info(f"Stage 2: {args.model_name} ({'pretrained' if args.pretrained else 'from scratch'}), "
                f"{accelerator.num_processes} process(es) on {accelerator.device.type}, "
                f"mixed precision {accelerator.mixed_precision}, image size {img_size}, "
                f"batch {args.batch_size} x {accelerator.num_processes} x {args.gradient_accumulation_steps}"
                f"{', class-balanced' if args.balanced_sampling else ''}")
    logger.info(f"Compute: {compute['params_m']:.2f} M parameters; {compute['challenge_limit']}")
    logger.info(f"Data {table.root}, {len(table)} images:\n{wfas_data.describe_split(table)}")
    logger.info(wfas_data.describe_loader(loader_settings, cache))
    logger.info(f"Soft labels {args.soft_labels_path}: {len(splits['train']) - num_fallback} train images, "
                f"{num_fallback} fall back to their hard label")
    logger.info(f"Loss = {args.focal_weight} focal(gamma {args.focal_gamma}) + {args.triplet_weight} "
                f"triplet(margin {args.triplet_margin}) + {args.kd_weight} KD(T {args.kd_temperature})")
    if log_file:
        logger.info(f"Logging to {log_file}")

    # Workers are not persistent: an epoch that ends shuts its workers down, so none is left for the exit to
    # terminate (they ignore SIGTERM, see StopOnSignal); forking them again costs well under a second an epoch.
    workers = dict(worker_init_fn=StopOnSignal.shield_loader_worker, **loader_settings)

    def loader(dataset):
        return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, **workers)

    train_sampler = None
    if args.balanced_sampling:
        train_sampler = BalancedBatchSampler(splits["train"].label, args.batch_size, args.seed)
        train_loader = torch.utils.data.DataLoader(datasets["train"], batch_sampler=train_sampler,
                                                   **workers)
    else:
        train_loader = torch.utils.data.DataLoader(datasets["train"], batch_size=args.batch_size, shuffle=True,
                                                   drop_last=True, **workers)
    if len(train_loader) == 0:
        raise UserError(f"the train split has {len(datasets['train'])} images, fewer than one batch of "
                        f"{args.batch_size}; lower --batch_size")
    model = LogitsAndEmbedding(net)
    optimizer = create_optimizer_v2(net, "adamw", lr=args.learning_rate, weight_decay=args.weight_decay)
    val_loader = loader(datasets["val"])
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    set_seed(args.seed, device_specific=True)
    soft_targets = soft_targets.to(accelerator.device)

    updates_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_updates = args.num_epochs * updates_per_epoch
    if args.max_train_steps:
        total_updates = min(total_updates, args.max_train_steps)
    warmup = min(round(args.warmup_epochs * updates_per_epoch), total_updates // 2)  # short runs still decay
    # The LR is a function of the update count and of this run's settings alone, never saved: a resumed run
    # follows the schedule of an uninterrupted run with its own settings, whatever the saved one used.
    scheduler = CosineLRScheduler(optimizer, t_initial=max(total_updates - warmup, 1), lr_min=args.learning_rate * 0.01,
                                  warmup_t=warmup, warmup_lr_init=args.learning_rate * 0.01, warmup_prefix=True,
                                  t_in_epochs=False)

    # epoch: the last finished one; images_done: images of the next one already trained, over all processes
    state = {"epoch": -1, "images_done": 0, "global_step": 0, "best_epoch": -1, "best_val_acer": math.inf}
    skip_batches = 0
    resume_dir = args.resume_from_checkpoint and resolve_resume(args.resume_from_checkpoint, latest_dir)
    if resume_dir:
        state = load_training_state(accelerator, resume_dir)
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
    scheduler.step_update(state["global_step"])
    state.update(batch_size=args.batch_size, num_processes=accelerator.num_processes)
    accelerator.init_trackers(STAGE, config={k: v for k, v in vars(args).items()
                                             if isinstance(v, (int, float, str, bool))})

    loss_weights = dict(focal_weight=args.focal_weight, triplet_weight=args.triplet_weight,
                        kd_weight=args.kd_weight, focal_gamma=args.focal_gamma, focal_alpha=args.focal_alpha,
                        triplet_margin=args.triplet_margin, kd_temperature=args.kd_temperature)
    stopper = StopOnSignal()
    progress = progress_bar(total=total_updates, initial=state["global_step"], desc="stage 2",
                            disable=not accelerator.is_local_main_process)
    train_images, train_seconds, epochs_run, loop_start = 0, 0.0, 0, time.time()
    for epoch in range(state["epoch"] + 1, args.num_epochs):
        if state["global_step"] >= total_updates:
            break
        model.train()
        train_loader.set_epoch(epoch)
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        epoch_start, epoch_images, steps, undecodable, seen, data_wait = time.time(), 0, 0, 0, 0, 0.0
        # summed on the device: .item() every step would wait for the GPU
        sums = {name: torch.zeros((), device=accelerator.device) for name in ("loss", "focal", "triplet", "kd")}
        # the seedable sampler replays this epoch's order, so a mid-epoch resume skips what was trained
        batches = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
        skip_batches, stop_requested = 0, False
        waiting_since = time.perf_counter()
        for batch in batches:
            data_wait += time.perf_counter() - waiting_since
            undecodable += wfas_data.check_batch(batch, log_warning_here)
            seen += len(batch["error"])
            wfas_data.check_undecodable_share(undecodable, seen)
            with accelerator.accumulate(model):
                images = wfas_data.to_model_input(batch["image"], data_config["mean"], data_config["std"],
                                                  color_jitter=COLOR_JITTER)
                logits, embeddings = model(images)
                # undecodable images were replaced by zeros: weighted out of the loss, without a host sync
                loss, parts = losses.stage2_loss(logits, embeddings, batch["label"], soft_targets[batch["index"]],
                                                 weights=batch["ok"].float(), **loss_weights)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            sums["loss"] += loss.detach()
            for name, value in parts.items():
                sums[name] += value
            steps += 1
            batch_images = len(batch["error"]) * accelerator.num_processes
            state["images_done"] += batch_images
            epoch_images += batch_images
            if accelerator.sync_gradients:
                state["global_step"] += 1
                scheduler.step_update(state["global_step"])
                progress.update(1)
                if state["global_step"] % 20 == 0:
                    progress.set_postfix(loss=f"{sums['loss'].item() / steps:.4f}",
                                         img_s=f"{epoch_images / (time.time() - epoch_start):.0f}")
                if args.checkpointing_steps and state["global_step"] % args.checkpointing_steps == 0:
                    save_latest(accelerator, latest_dir, state)
                    logger.info(f"Wrote {latest_dir} at update {state['global_step']} (epoch {epoch + 1}, "
                                f"{state['images_done']} images)")
                stop_requested = stopper.requested(accelerator, state["global_step"])
                if stop_requested or state["global_step"] >= total_updates:
                    break
            waiting_since = time.perf_counter()
        if stop_requested:  # out of the loop, whose end shut its loader workers down
            save_latest(accelerator, latest_dir, state)
            stopper.stop(latest_dir, state)
        epoch_seconds = time.time() - epoch_start
        undecodable = int(accelerator.reduce(torch.tensor(undecodable, device=accelerator.device), reduction="sum"))
        train_images += epoch_images
        train_seconds += epoch_seconds
        train = {name: value.item() / max(steps, 1) for name, value in sums.items()}

        paths, labels, attack_types, scores = score_split(model, val_loader, splits["val"], accelerator, data_config)
        val = wfas_data.compute_metrics(scores, labels, attack_types)
        state.update(epoch=epoch, images_done=0)
        improved = val["acer"] < state["best_val_acer"]
        if improved:
            state.update(best_epoch=epoch, best_val_acer=val["acer"])
            save_best(accelerator, accelerator.unwrap_model(model, keep_torch_compile=False).net, best_path, {
                "model_name": args.model_name, "img_size": str(img_size), "epoch": str(epoch),
                "face_crop_scale": str(args.face_crop_scale), "val_metrics": val, "compute": compute})
        save_latest(accelerator, latest_dir, state)

        epochs_run += 1
        epochs_left = min(args.num_epochs - epoch - 1,
                          math.ceil((total_updates - state["global_step"]) / updates_per_epoch))
        eta = (time.time() - loop_start) / epochs_run * epochs_left
        lr = optimizer.param_groups[0]["lr"]
        logger.info(f"epoch {epoch + 1}/{args.num_epochs}  loss {train['loss']:.4f} (focal {train['focal']:.4f} "
                    f"triplet {train['triplet']:.4f} kd {train['kd']:.4f})  val {wfas_data.format_metrics(val)}  "
                    f"lr {lr:.2e}  {epoch_images / epoch_seconds:.0f} img/s  data wait {data_wait / epoch_seconds:.0%}  "
                    f"elapsed {datetime.timedelta(seconds=round(time.time() - start_time))}  "
                    f"ETA {datetime.timedelta(seconds=round(eta))}" + ("  (best)" if improved else "")
                    + (f"  {undecodable} undecodable images skipped" if undecodable else ""))
        if accelerator.is_main_process:
            wfas_data.write_summary_row(output_dir / "logs" / STAGE / "summary.csv", {
                "epoch": epoch + 1, **{f"train_{k}": v for k, v in train.items()}, "val_acer": val["acer"],
                "val_apcer": val["apcer"], "val_bpcer": val["bpcer"], "val_auc": val["auc"], "lr": lr,
                "images_per_second": epoch_images / epoch_seconds, "data_wait_share": data_wait / epoch_seconds})
        accelerator.log({**{f"train/{k}": v for k, v in train.items()}, "train/lr": lr,
                         "train/images_per_second": epoch_images / epoch_seconds,
                         "train/data_wait_share": data_wait / epoch_seconds,
                         **{f"val/{k}": v for k, v in val.items() if isinstance(v, (int, float))}}, step=epoch)
        if stopper.requested(accelerator):
            stopper.stop(latest_dir, state)
    progress.close()
    stopper.restore()

    if not best_path.is_file():
        raise UserError(f"no best checkpoint at {best_path}: training ran no epoch (check --num_epochs)")
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model, keep_torch_compile=False).net.load_state_dict(load_file(best_path))

    # The threshold is the EER point of the best model on val; test is scored at it, never fitted on test.
    val_rows = score_split(model, val_loader, splits["val"], accelerator, data_config, args.tta, desc="val")
    val = wfas_data.compute_metrics(val_rows[3], val_rows[1], val_rows[2])
    test_loader = accelerator.prepare(loader(datasets["test"]))
    test_rows = score_split(model, test_loader, splits["test"], accelerator, data_config, args.tta, desc="test")
    test = wfas_data.compute_metrics(test_rows[3], test_rows[1], test_rows[2], threshold=val["threshold"])
    # deployers trade one error for the other: thresholds fitted on val for the error rates they can afford
    operating_points = wfas_data.operating_points(val_rows[3], val_rows[1], test_rows[3], test_rows[1])
    stage1_results = output_dir / "stage1_results.json"
    teacher_test = json.loads(stage1_results.read_text())["test"] if stage1_results.is_file() else {}
    results = {
        "test_acc": test["acc"], "test_acer": test["acer"], "test_apcer": test["apcer"],
        "test_bpcer": test["bpcer"], "test_auc": test["auc"], "test_eer": test["eer"],
        "test_apcer_per_attack": test["apcer_per_attack"], "test_worst_apcer": test["worst_apcer"],
        "threshold": val["threshold"], "operating_points": operating_points,
        "val_acc": val["acc"], "val_acer": val["acer"], "val_auc": val["auc"],
        "best_epoch": state["best_epoch"] + 1, "num_test_images": test["num_images"],
        "num_val_images": val["num_images"], "teacher_test_acer": teacher_test.get("acer"),
        "teacher_test_acc": teacher_test.get("acc"), "num_soft_label_fallbacks": num_fallback,
        "model_name": args.model_name, "img_size": img_size,
        "wall_time_s": round(time.time() - start_time, 1),
        "images_per_second": round(train_images / train_seconds, 1) if train_seconds else None,
        "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        "compute": compute,
    }
    logger.info(f"Best epoch {results['best_epoch']}: val {wfas_data.format_metrics(val)}")
    logger.info(f"Test at the val threshold {val['threshold']:.4f}: {wfas_data.format_metrics(test)}")
    logger.info(wfas_data.format_operating_points(operating_points))
    if results["teacher_test_acer"] is not None:
        logger.info(f"Teacher (stage 1) test ACER {results['teacher_test_acer']:.4f}, "
                    f"student {results['test_acer']:.4f}")
    if accelerator.is_main_process:
        write_predictions(output_dir / "stage2_val_predictions.csv", *val_rows)
        write_predictions(output_dir / "stage2_test_predictions.csv", *test_rows)
        wfas_data.write_json(output_dir / "final_results.json", results)
        logger.info(f"Wrote {output_dir / 'final_results.json'} and the per-image predictions")
        teacher_csv = output_dir / "stage1_test_predictions.csv"
        teacher_test = wfas_data.read_predictions_csv(teacher_csv) if teacher_csv.is_file() else None
        wfas_data.make_plots(output_dir / "plots", STAGE, output_dir / "logs" / STAGE / "summary.csv", val_rows[1:],
                             test_rows[1:], val["threshold"], test, teacher_test, log=logger.warning)
        logger.info(f"Report: {wfas_data.write_report(output_dir)} (plots in {output_dir / 'plots'})")
    if args.predict_lists:
        results["submission_path"] = write_submission(model, accelerator, args, img_size, data_config,
                                                      args.face_crop_scale)
    if args.predict_folder:
        results["folder_predictions"] = score_folder(model, accelerator, args, img_size, data_config,
                                                     args.face_crop_scale, val["threshold"])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    wfas_data.run_cli(main)
