"""Every program under benchmarks/ runs, at its smallest size: a benchmark that no longer runs measures nothing.
Their figures are not checked here (speed targets live in the benchmarks, not in timed tests)."""

import json
import re
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_STAGE1, TINY_STAGE2, run_script

pytestmark = pytest.mark.slow


def config_of(flags, path):
    """A --config file holding the tests' tiny settings (`--flag value` pairs and `--no-flag` switches)."""
    config = {}
    for i, flag in enumerate(flags):
        if not flag.startswith("--"):
            continue
        if flag.startswith("--no-"):
            config[flag[5:]] = False
        else:
            config[flag[2:]] = json.loads(flags[i + 1]) if flags[i + 1][0].isdigit() else flags[i + 1]
    path.write_text(json.dumps(config))
    return str(path)


def run_benchmark(*args):
    result = run_script([sys.executable, *args], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_benchmark_train_runs_both_stages(tmp_path):
    out = run_benchmark(
        "benchmarks/benchmark_train.py", "--runs", "1", "--epochs", "2", "--subjects", "12", "--batch_size", "8"
    )
    assert "stage 1" in out and "stage 2" in out and "time per image" in out


def test_benchmark_loader_runs():
    out = run_benchmark("benchmarks/benchmark_loader.py", "--n", "4")
    assert "cache/plain" in out


def test_benchmark_index_runs(tmp_path):
    out = run_benchmark("benchmarks/benchmark_index.py", str(tmp_path / "tree"), "--images", "200")
    assert "indexed 200 images" in out
    out = run_benchmark(
        "benchmarks/benchmark_index.py", str(tmp_path / "celeba"), "--images", "200", "--format", "celeba_spoof"
    )
    assert "indexed 200 CelebA-Spoof images" in out


def test_benchmark_detector_runs():
    out = run_benchmark("benchmarks/benchmark_detector.py", "--threads", "1", "--repeats", "1")
    assert "IoU" in out


def test_benchmark_deployment_budget_and_export_run():
    assert "convnext_atto" in run_benchmark("benchmarks/benchmark_deployment.py", "budget", "convnext_atto@64")
    out = run_benchmark("benchmarks/benchmark_deployment.py", "export", "resnet18", "--img_size", "64")
    assert "export + parity" in out


def test_benchmark_unseen_runs(demo_root, tmp_path):
    config = config_of(TINY_STAGE1, tmp_path / "stage1.json")
    out = run_benchmark(
        "benchmarks/benchmark_unseen.py",
        "--data_root",
        str(demo_root),
        "--output_dir",
        str(tmp_path / "out"),
        "--config",
        config,
        "--types",
        "3D-Mask",
    )
    assert "3D-Mask" in out


@pytest.mark.parametrize("what", ["soft_labels", "ema"])
def test_benchmark_recipe_runs(what, demo_root, tmp_path):
    out = run_benchmark(
        "benchmarks/benchmark_recipe.py",
        what,
        "--data_root",
        str(demo_root),
        "--output_dir",
        str(tmp_path / "out"),
        "--seeds",
        "42",
        "--folds",
        "2",
        "--stage1_config",
        config_of(TINY_STAGE1, tmp_path / "stage1.json"),
        "--stage2_config",
        config_of(TINY_STAGE2, tmp_path / "stage2.json"),
    )
    assert "ACER" in out or "acer" in out


def test_benchmarks_all_have_a_test():
    tested = set(re.findall(r'"benchmarks/(\w+\.py)"', Path(__file__).read_text()))
    assert tested == {path.name for path in (REPO / "benchmarks").glob("*.py")}
