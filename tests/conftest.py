"""Shared fixtures: one small generated dataset and one tiny run of each stage, reused across tests. Nothing heavy
is imported here: a test module imports what it tests.

Two tiers: `pytest -m "not slow"` runs the unit tests (no training beyond a few steps, no subprocesses, no
notebooks); `pytest` runs them all, as CI does. A test that trains, launches a process or runs a notebook is
marked slow (pytestmark in its module, or @pytest.mark.slow)."""

import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


TINY_STAGE1 = [
    "--model_name",
    "convnext_atto",
    "--no-pretrained",
    "--img_size",
    "64",
    "--num_epochs",
    "1",
    "--batch_size",
    "8",
    "--num_workers",
    "0",
    "--learning_rate",
    "1e-3",
]
TINY_STAGE2 = [
    "--model_name",
    "maxvit_rmlp_pico_rw_256",
    "--no-pretrained",
    "--img_size",
    "64",
    "--num_epochs",
    "1",
    "--batch_size",
    "8",
    "--num_workers",
    "0",
    "--learning_rate",
    "1e-3",
]


def pytest_configure(config):
    """Under pytest-xdist (.ci/run: -n 2) each worker, and the processes it starts, computes on one thread: two
    workers of two threads each on two cores would fight for them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"


def run_script(args, env=None, timeout=600):
    """Run a command from the repository root; returns the CompletedProcess (text, both streams)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def split_paths(exp, name):
    """The paths of one split of EXP/split.csv, in file order."""
    with open(exp / "split.csv") as f:
        return [row["path"] for row in csv.DictReader(f) if row["split"] == name]


def free_port():
    """A TCP port nobody listens on now: runs launched side by side (pytest -n 2) each get their own."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_process_command(script, args):
    """Two real gloo processes on CPU (accelerate launch --cpu would silently run one); needs
    ACCELERATE_USE_CPU=1 in the environment."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(REPO / script),
        *args,
    ]


def launch_two_processes(script, args):
    return run_script(two_process_command(script, args), env={"ACCELERATE_USE_CPU": "1"})


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    from tools import make_demo

    root = tmp_path_factory.mktemp("demo") / "WFAS"
    make_demo.make_demo(root, subjects=12, seed=1, unlabelled=6)
    return root


@pytest.fixture(scope="session")
def stage1_run(demo_root, tmp_path_factory):
    import train_stage1

    exp = tmp_path_factory.mktemp("exp") / "EXP"
    results = train_stage1.main(["--data_root", str(demo_root), "--output_dir", str(exp), *TINY_STAGE1])
    return exp, results


@pytest.fixture(scope="session")
def stage2_run(stage1_run, demo_root, tmp_path_factory):
    """A copy of the stage 1 experiment, then stage 2 on it, then its submission from the Dev/Test lists."""
    import train_stage2
    from tools import predict

    exp = tmp_path_factory.mktemp("exp2") / "EXP"
    shutil.copytree(stage1_run[0], exp)
    results = train_stage2.main(["--output_dir", str(exp), *TINY_STAGE2])
    results.update(
        predict.main(
            [
                "--output_dir",
                str(exp),
                "--num_workers",
                "0",
                "--predict_lists",
                str(demo_root / "Dev" / "Dev.txt"),
                str(demo_root / "Test" / "Test.txt"),
            ]
        )
    )
    return exp, results
