"""Run a stage script with one failure injected on the last process, at a named point, to test that every
process of the run ends with the same line:

    accelerate launch tests/inject_failure.py POINT train_stage1.py FLAGS...

POINT: face_cache (a storage error while that process builds its shards of the cache), batch_check (a storage
error found checking its third batch) or training (a crash, as a CUDA out-of-memory error, in its third step).
"""

import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import face_cache  # noqa: E402
import losses  # noqa: E402
import wfas_data  # noqa: E402
from errors import StorageError  # noqa: E402


def fail_on_call(function, call, error):
    """function, raising error on its call-th call."""
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return function(*args, **kwargs)

    return failing


point, script, *flags = sys.argv[1:]
if int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1:
    unreadable = StorageError("Train/living/000007/0001.jpg", OSError(5, "Input/output error"))
    if point == "face_cache":
        face_cache._build_shards = fail_on_call(face_cache._build_shards, 1, unreadable)
    elif point == "batch_check":
        wfas_data.check_batch = fail_on_call(wfas_data.check_batch, 3, unreadable)
    elif point == "training":
        crash = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        losses.cross_entropy = fail_on_call(losses.cross_entropy, 3, crash)
    else:
        raise SystemExit(f"unknown failure point {point}")
sys.argv = [script, *flags]
runpy.run_path(script, run_name="__main__")
