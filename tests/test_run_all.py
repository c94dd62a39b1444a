"""run_all.sh end to end: the demo path at a smaller size, the options, and failing fast."""

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.slow  # each test runs run_all.sh

SMALL_STAGE1 = "--model_name convnext_atto --num_epochs 1 --batch_size 8 --num_workers 0"
SMALL_STAGE2 = "--num_epochs 1 --batch_size 8 --num_workers 0"


def run_all(cwd, *args, env=None):
    full_env = {**os.environ, "PYTHON": sys.executable, "DEMO_SUBJECTS": "9", **(env or {})}
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    return subprocess.run(
        ["bash", str(REPO / "run_all.sh"), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=900
    )


def test_demo_path_writes_the_experiment_folder(tmp_path):
    result = run_all(tmp_path, "--stage1_args", SMALL_STAGE1, "--stage2_args", SMALL_STAGE2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "DEMO" in result.stdout and "GENERATED data" in result.stdout
    assert "test ACC" in result.stdout and "ACER" in result.stdout and "Outputs in demo_output/" in result.stdout
    exp = tmp_path / "demo_output"
    for path in [
        "checkpoints/stage1/stage1_best.safetensors",
        "checkpoints/stage1/stage1_latest",
        "checkpoints/stage2/stage2_best.safetensors",
        "checkpoints/stage2/stage2_latest",
        "split.csv",
        "stage1_config.json",
        "stage2_config.json",
        "stage1_soft_labels.pth",
        "stage1_results.json",
        "final_results.json",
        "stage2_val_predictions.csv",
        "stage2_test_predictions.csv",
        "experiment_info.json",
        "submission.txt",
        "submission.zip",
    ]:
        assert (exp / path).exists(), path
    assert len(list((exp / "logs" / "stage1").glob("stage1_training_*.log"))) == 1
    assert len(list((exp / "logs" / "stage2").glob("stage2_training_*.log"))) == 1
    assert json.loads((exp / "stage1_config.json").read_text())["model_name"] == "convnext_atto"
    assert json.loads((exp / "stage2_config.json").read_text())["model_name"] == "maxvit_rmlp_pico_rw_256"
    assert isinstance(torch.load(exp / "stage1_soft_labels.pth", weights_only=True), dict)
    with zipfile.ZipFile(exp / "submission.zip") as zf:
        assert zf.namelist() == ["submission.txt"]
    info = json.loads((exp / "experiment_info.json").read_text())
    for key in (
        "start_time",
        "end_time",
        "command_line",
        "git_commit",
        "versions",
        "devices",
        "num_processes",
        "mixed_precision",
    ):
        assert key in info, key
    assert set(info["versions"]) == {"python", "torch", "timm", "accelerate"}
    assert info["versions"]["torch"] == torch.__version__ and info["devices"]  # the build too (+cu130, +cpu)
    for stage in ("stage1", "stage2"):
        assert info[stage]["exit_status"] == "ok"
        assert info[stage]["wall_time_s"] >= 0 and info[stage]["images_per_second"] > 0

    # the data is there now: a second run reuses it, and --stage2_only retrains only the student
    result = run_all(tmp_path, "--stage2_only", "--stage2_args", SMALL_STAGE2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "make_demo" not in result.stdout and "Stage 1" not in result.stdout and "Stage 2" in result.stdout
    assert json.loads((exp / "experiment_info.json").read_text())["stage1"]["exit_status"] == "skipped"

    # a requeued job reruns the same command with --resume: the finished stage 1 is kept, stage 2 goes on
    result = run_all(tmp_path, "--resume", "--stage2_args", SMALL_STAGE2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Stage 1 finished earlier" in result.stdout and "Resumed from" in result.stdout
    assert json.loads((exp / "experiment_info.json").read_text())["stage1"]["exit_status"] == "ok (earlier run)"


def test_unknown_option_is_a_clear_error(tmp_path):
    result = run_all(tmp_path, "--data-root", "x")
    assert result.returncode == 2 and "unknown option '--data-root'" in result.stderr
    result = run_all(tmp_path, "--output_dir")
    assert result.returncode == 2 and "needs a value" in result.stderr
    result = run_all(tmp_path, "--stage1_only", "--stage2_only")
    assert result.returncode == 2 and "exclude each other" in result.stderr
    assert not (tmp_path / "demo_data").exists()


def test_a_failing_stage_1_stops_before_stage_2(tmp_path):
    data = tmp_path / "not_wfas"
    data.mkdir()
    result = run_all(
        tmp_path, "--data_root", str(data), "--output_dir", str(tmp_path / "EXP"), "--stage1_args", "--no-pretrained"
    )
    assert result.returncode != 0
    assert "stage 1 failed" in result.stderr and "logs/stage1" in result.stderr
    assert "Stage 2" not in result.stdout
    info = json.loads((tmp_path / "EXP" / "experiment_info.json").read_text())
    assert info["stage1"]["exit_status"].startswith("failed") and info["stage2"]["exit_status"] == "skipped"


def test_only_the_main_node_writes_the_shared_experiment_info(tmp_path):
    data = tmp_path / "not_wfas"
    data.mkdir()
    for env in ({"SLURM_NODEID": "1"}, {"ACCELERATE_ARGS": "--machine_rank 1 --num_machines 1"}):
        result = run_all(
            tmp_path,
            "--data_root",
            str(data),
            "--output_dir",
            str(tmp_path / "EXP"),
            "--stage1_args",
            "--no-pretrained",
            env=env,
        )
        assert result.returncode != 0 and "stage 1 failed" in result.stderr
        assert not (tmp_path / "EXP" / "experiment_info.json").exists()
    result = run_all(
        tmp_path,
        "--data_root",
        str(data),
        "--output_dir",
        str(tmp_path / "EXP"),
        "--stage1_args",
        "--no-pretrained",
        env={"SLURM_NODEID": "0"},
    )
    assert (tmp_path / "EXP" / "experiment_info.json").exists()


def test_a_python_without_torch_is_one_clear_line(tmp_path):
    python = tmp_path / "python"  # stands for an interpreter of another environment, where torch is missing
    python.write_text(
        "#!/bin/sh\n"
        "echo 'Traceback (most recent call last):' >&2\n"
        "echo '  File \"<string>\", line 1' >&2\n"
        "echo \"ModuleNotFoundError: No module named 'torch'\" >&2\n"
        "exit 1\n"
    )
    python.chmod(0o755)
    result = run_all(
        tmp_path, "--data_root", str(tmp_path), "--output_dir", str(tmp_path / "EXP"), env={"PYTHON": str(python)}
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"run_all.sh: {python} cannot import torch (ModuleNotFoundError: No module named 'torch'): "
        "pip install -r requirements.txt"
    ]
    assert "Stage 1" not in result.stdout
