"""The resumable state of a training run and preemption, the same for both stages: where the run stands
(RunState), the best weights and the latest state (written aside and renamed, resumed with
--resume_from_checkpoint latest), and catching SIGTERM or SIGUSR1. When to save, what counts as "best" and when
to stop are the stage scripts' choices.
"""

import dataclasses
import json
import logging
import math
import shutil
import signal
import threading
import time
from pathlib import Path

from accelerate.logging import get_logger
from safetensors.torch import load_file, save_file
from timm.utils import ModelEmaV3

from errors import UserError
from output_files import aside, write_json

logger = get_logger(__name__)


@dataclasses.dataclass
class RunState:
    """Where a run stands, saved as training_state.json in <name>_latest."""

    epoch: int = -1  # the last finished epoch
    images_done: int = 0  # images of the next epoch trained, over all processes
    global_step: int = 0  # optimizer updates
    best_epoch: int = -1
    best_val_acer: float = math.inf
    batch_size: int = 0  # what images_done was counted in: a mid-epoch resume needs the same
    num_processes: int = 1
    soft_label_folds: int | None = None  # stage 1's fold teachers: a run with another K trains other teachers

    @classmethod
    def read(cls, path):
        """The state in a training_state.json; one line for a file this code did not write."""
        saved = json.loads(Path(path).read_text())
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - names)
        missing = sorted(names - set(saved) - {"soft_label_folds"})  # stage 2's states have none
        if unknown or missing:
            raise UserError(
                f"{path} is not a state this code can resume (unknown keys: {', '.join(unknown) or 'none'}; "
                f"missing: {', '.join(missing) or 'none'}): resume with the code that wrote it, or start a new "
                "--output_dir"
            )
        return cls(**saved)


class Checkpoints:
    """checkpoints/<stage>/: <name>_best.safetensors (the timm model's weights, with metadata) and <name>_latest/
    (accelerate's state: model, optimizer, RNG, sampler; and ours: the last finished epoch, the images of the next
    one trained over all processes, the updates, the best so far). Both are written aside and renamed. name is the
    stage's, or a fold teacher's (stage1_fold2)."""

    def __init__(self, accelerator, output_dir, stage, name=None):
        folder = Path(output_dir) / "checkpoints" / stage
        name = name or stage
        self.accelerator = accelerator
        self.stage = stage
        self.ema = None
        self.best_path = folder / f"{name}_best.safetensors"
        self.latest_dir = folder / f"{name}_latest"
        folder.mkdir(parents=True, exist_ok=True)

    def track_ema(self, net, decay):
        """timm's EMA of net (on its device), saved in <name>_latest as safetensors (not pickled); None at 0."""
        if decay:
            self.ema = ModelEmaV3(net, decay=decay, use_warmup=True)
        return self.ema

    def resume(self, resume_from, *, batch_size, gradient_accumulation_steps, updates_per_epoch, num_epochs):
        """(RunState, batches each process skips in the unfinished epoch), from resume_from ('latest', a folder,
        or None: fresh). accelerate's lines say what it could not restore (the RNG of another number of processes,
        say)."""
        state = RunState()
        skip_batches = 0
        resume_dir = None
        if resume_from:
            resume_dir = self.resolve(resume_from)

        if resume_dir:
            logging.getLogger("accelerate").setLevel(logging.INFO)
            try:
                self.accelerator.load_state(str(resume_dir))
            finally:
                logging.getLogger("accelerate").setLevel(logging.WARNING)
            state = RunState.read(resume_dir / "training_state.json")
            if self.ema is not None:
                if not (resume_dir / "ema.safetensors").is_file():
                    raise UserError(
                        f"{resume_dir} holds no EMA weights (saved without --model_ema_decay): resume "
                        "without it, or start a new run"
                    )
                self.ema.module.load_state_dict(load_file(resume_dir / "ema.safetensors"))
            skip_batches, global_step = self.position(
                state,
                batch_size=batch_size,
                num_processes=self.accelerator.num_processes,
                gradient_accumulation_steps=gradient_accumulation_steps,
                updates_per_epoch=updates_per_epoch,
            )
            if global_step != state.global_step:
                logger.info(
                    f"The batch size, processes or accumulation changed: the run goes on at update "
                    f"{global_step} of the new schedule (update {state.global_step} of the old one)"
                )
            state.global_step = global_step
            position = f"epoch {state.epoch + 1} of {num_epochs} done"
            if skip_batches:
                position += f" and {skip_batches} batches of the next"
            logger.info(
                f"Resumed from {resume_dir}: {position}, {state.global_step} updates, best val ACER "
                f"{state.best_val_acer:.4f}"
            )
        elif resume_from:
            logger.info(f"No saved state in {self.latest_dir} yet: starting from the beginning")

        state.batch_size = batch_size
        state.num_processes = self.accelerator.num_processes
        return state, skip_batches

    def resolve(self, resume):
        """The state to resume from, or None: `latest` with no state yet is a first start (a requeued job runs
        the same command every time); an explicit folder must exist."""
        path = self.latest_dir if resume == "latest" else Path(resume)
        candidates = [
            path,
            path.with_name(path.name + ".tmp"),  # a kill between save_latest's renames
            *sorted(path.parent.glob(f"{path.name}.old*"), reverse=True),
        ]
        for candidate in candidates:
            if (candidate / "training_state.json").is_file():
                return candidate
        if resume != "latest":
            raise UserError(
                f"--resume_from_checkpoint {resume}: no saved state at {path} "
                f"(expected a {self.stage}_latest folder written by an earlier run)"
            )
        return None

    @staticmethod
    def position(state, *, batch_size, num_processes, gradient_accumulation_steps, updates_per_epoch):
        """The batches of the unfinished epoch each process skips, and the update an uninterrupted run with these
        settings is at there; counted in images, which holds when the processes or the batch size changed."""
        images_per_batch = batch_size * num_processes
        if state.images_done % images_per_batch:
            raise UserError(
                f"the saved state is {state.images_done} images into an epoch, not a whole number of "
                f"batches of {batch_size} x {num_processes} processes: resume mid-epoch with the batch "
                f"size and processes it was saved with ({state.batch_size} x "
                f"{state.num_processes}), or from a state saved at the end of an epoch"
            )
        batches = state.images_done // images_per_batch
        global_step = (state.epoch + 1) * updates_per_epoch + batches // gradient_accumulation_steps
        return batches, global_step

    def save_latest(self, state):
        """Written to .tmp and swapped in: a kill at any instruction leaves a complete state in latest, .tmp (once
        its training_state.json is written) or an .old-* folder, which resolve() finds; a leftover that cannot be
        deleted (an NFS silly-rename file) never blocks the next swap."""
        latest = self.latest_dir
        accelerator = self.accelerator
        tmp = latest.with_name(latest.name + ".tmp")
        if accelerator.is_main_process and tmp.exists():  # a kill's leftover: moved aside, as it may not delete
            tmp.rename(latest.with_name(f"{latest.name}.old-{time.time_ns()}"))
        accelerator.wait_for_everyone()

        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()

        if accelerator.is_main_process:
            if self.ema is not None:
                save_file(self.weights(self.ema.module), tmp / "ema.safetensors")
            write_json(tmp / "training_state.json", dataclasses.asdict(state))  # the last file: it marks tmp complete
            if latest.exists():
                latest.rename(latest.with_name(f"{latest.name}.old-{time.time_ns()}"))
            tmp.rename(latest)
            for old in latest.parent.glob(f"{latest.name}.old*"):
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def save_best(self, net, metadata):
        """net's weights (the module before prepare(): no DDP or compile prefix) with metadata, as the best."""
        if not self.accelerator.is_main_process:
            return
        as_text = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
        tmp = aside(self.best_path)
        save_file(self.weights(net), tmp, as_text)
        tmp.replace(self.best_path)

    @staticmethod
    def weights(net):
        return {key: value.contiguous().cpu() for key, value in net.state_dict().items()}

    def load_best(self, net):
        if not self.best_path.is_file():
            raise UserError(f"no best checkpoint at {self.best_path}: training ran no epoch (check --num_epochs)")
        self.accelerator.wait_for_everyone()
        net.load_state_dict(load_file(self.best_path))


class StopOnSignal:
    """Catches SIGTERM (preemption) and SIGUSR1 (SLURM's --signal), for the stage script to save its state and
    stop. The processes agree on the update through accelerate's trigger, an all-reduce (a host sync), every
    CHECK_EVERY updates. Loader workers ignore these signals (wfas_data.Loaders)."""

    CHECK_EVERY = 10
    HANDLED = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum = None
        if threading.current_thread() is threading.main_thread():  # Python takes signals there only
            for signum in self.HANDLED:
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

    def stop(self, latest_dir, global_step):
        """The run's end, its state saved in latest_dir: the exit status says which signal stopped it."""
        signum = self.signum or signal.SIGTERM
        logger.info(
            f"Stopped by {signal.Signals(signum).name} at update {global_step}; the resumable "
            f"state is in {latest_dir}. To go on, run the same command with --resume_from_checkpoint latest"
        )
        raise SystemExit(128 + signum)

    def restore(self):
        """Past the loop: a signal ends the run at once."""
        if threading.current_thread() is threading.main_thread():
            for signum in self.HANDLED:
                signal.signal(signum, signal.SIG_DFL)
