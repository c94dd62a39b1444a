"""run_all.sh's launch on GPU nodes, with torch's GPU report faked: bf16 on every GPU (fp16 where bf16 is not
supported), unless ACCELERATE_ARGS or an accelerate config choose; on a CPU, plain python."""

import os
import stat
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # each test runs run_all.sh

FAKE_PYTHON = """#!/usr/bin/env bash
# torch's GPU report, faked; everything else runs the real interpreter
if [[ "$1" == "-c" && "$2" == *torch.cuda.device_count* ]]; then
  printf '%s\\n' "{torch_version}" {report}
  exit 0
fi
exec "{python}" "$@"
"""
FAKE_ACCELERATE = """#!/usr/bin/env bash
echo "$*" >> "{record}"
"""


def run_with_fake_gpus(tmp_path, report, env=None, returncode=0):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "launches.txt"
    fake_python = bin_dir / "python"
    quoted = " ".join(f"'{line}'" for line in report)
    fake_python.write_text(FAKE_PYTHON.format(torch_version="2.9.0+cu130", report=quoted, python=sys.executable))
    fake_accelerate = bin_dir / "accelerate"
    fake_accelerate.write_text(FAKE_ACCELERATE.format(record=record))
    for path in (fake_python, fake_accelerate):
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    data = tmp_path / "data"
    data.mkdir()
    full_env = {**os.environ, "PYTHON": str(fake_python), "HF_HOME": str(tmp_path / "hf"), **(env or {})}
    full_env.pop("ACCELERATE_CONFIG_FILE", None)
    full_env["PATH"] = f"{bin_dir}{os.pathsep}{full_env['PATH']}"
    result = subprocess.run(
        [
            "bash",
            str(REPO / "run_all.sh"),
            "--data_root",
            str(data),
            "--output_dir",
            str(tmp_path / "exp"),
            "--stage1_only",
        ],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == returncode, result.stdout + result.stderr
    launches = []
    if record.exists():
        launches = record.read_text().splitlines()
    return result.stdout, launches


@pytest.mark.parametrize(
    ("precision", "gpus", "expected_launch"),
    [
        ("bf16", 8, "launch --multi_gpu --num_processes 8 --mixed_precision bf16"),
        ("fp16", 2, "launch --multi_gpu --num_processes 2 --mixed_precision fp16"),  # a V100: no bf16
        ("bf16", 1, "launch --num_processes 1 --mixed_precision bf16"),
    ],
)
def test_every_gpu_in_mixed_precision(tmp_path, precision, gpus, expected_launch):
    stdout, launches = run_with_fake_gpus(tmp_path, [precision] + ["NVIDIA H200"] * gpus)

    assert f"{gpus} GPU(s) (NVIDIA H200): every GPU, mixed precision {precision}" in stdout.splitlines()[0]
    assert len(launches) == 1
    assert launches[0].startswith(expected_launch)
    assert "train_stage1.py" in launches[0]


def test_accelerate_args_win(tmp_path):
    stdout, launches = run_with_fake_gpus(
        tmp_path, ["bf16", "NVIDIA H200", "NVIDIA H200"], env={"ACCELERATE_ARGS": "--num_processes 1"}
    )

    assert "launched as ACCELERATE_ARGS and the accelerate config say" in stdout
    assert launches[0].startswith("launch --num_processes 1 ")
    assert "--mixed_precision" not in launches[0]


def test_an_accelerate_config_wins(tmp_path):
    config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("mixed_precision: fp16\n")

    stdout, launches = run_with_fake_gpus(tmp_path, ["bf16", "NVIDIA H200"])

    assert "launched as ACCELERATE_ARGS and the accelerate config say" in stdout
    assert "--mixed_precision" not in launches[0]


def test_without_a_gpu_the_stages_run_under_plain_python(tmp_path):
    stdout, launches = run_with_fake_gpus(tmp_path, [""], returncode=2)  # the empty data folder stops stage 1

    assert "GPU(s)" not in stdout
    assert launches == []  # one process on the CPU: plain python on every core, no launcher
    assert stdout.startswith("=== Stage 1: env OMP_NUM_THREADS=")
