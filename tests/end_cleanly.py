"""A program that succeeds under several processes, with the watcher of errors.end_with_other_processes polling
its store as often as it can, so that the interpreter's end finds it inside a store call unless run_cli stopped it
first (which once aborted rank 0 of a finished run: "terminate called without an active exception").

    accelerate launch tests/end_cleanly.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as distributed  # noqa: E402
from accelerate import Accelerator  # noqa: E402

import errors  # noqa: E402

errors.POLL_SECONDS = 0.0005


def main():
    accelerator = Accelerator(cpu=True)
    errors.end_with_other_processes()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    assert not distributed.is_initialized()


if __name__ == "__main__":
    errors.run_cli(main)
