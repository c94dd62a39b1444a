"""tools/: the weights cache (models.py) and the challenge submission under several processes (predict.py). The
ONNX export and folder scoring are in test_deployment.py, the report in test_reports.py, make_demo in
test_wfas_data.py."""

import pytest
import shutil
import sys

import numpy as np
import timm
import torch
from safetensors.torch import load_file

from conftest import launch_two_processes, run_script

OFFLINE = {"HF_ENDPOINT": "http://127.0.0.1:9", "HTTPS_PROXY": "", "https_proxy": "", "ALL_PROXY": "", "all_proxy": ""}


def models(*args):
    return run_script([sys.executable, "tools/models.py", *args], env=OFFLINE)


@pytest.mark.slow
def test_models_download_from_a_local_source_then_list_and_clear(tmp_path):
    exp = tmp_path / "EXP"
    assert "0 cached model(s)" in models("list", "--output_dir", str(exp)).stdout
    source = timm.create_model("convnext_atto")  # as a mirror would serve it: a .pth state dict
    torch.save(source.state_dict(), tmp_path / "convnext_atto_mirror.pth")
    url = (tmp_path / "convnext_atto_mirror.pth").as_uri()
    fetched = models(
        "download", "--stage", "1", "--model_name", "convnext_atto", "--url", url, "--output_dir", str(exp)
    )
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    cached = exp / "model" / "stage1" / "convnext_atto" / "convnext_atto.safetensors"
    assert str(cached) in fetched.stdout and not (cached.parent / "download").exists()
    weights = load_file(cached)
    assert all(torch.equal(weights[k], v) for k, v in source.state_dict().items())
    # the stage's own flags name the model: a config file and a --model_cache_dir are followed
    (tmp_path / "stage2.json").write_text('{"model_name": "test_vit"}')
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "test_vit.pth")
    fetched = models(
        "download",
        "--stage",
        "2",
        "--config",
        str(tmp_path / "stage2.json"),
        "--url",
        (tmp_path / "test_vit.pth").as_uri(),
        "--output_dir",
        str(exp),
    )
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    listed = models("list", "--output_dir", str(exp)).stdout
    assert "stage1  convnext_atto" in listed and "stage2  test_vit" in listed and "2 cached model(s)" in listed
    # a second download is the cached file, without any network
    again = models("download", "--stage", "1", "--model_name", "convnext_atto", "--output_dir", str(exp))
    assert again.returncode == 0 and str(cached) in again.stdout

    cleared = models("clear", "--stage", "1", "--output_dir", str(exp))
    assert cleared.returncode == 0 and "Removed 1 cached model(s)" in cleared.stdout and not cached.exists()
    assert "stage2  test_vit" in models("list", "--output_dir", str(exp)).stdout
    assert "Removed 1" in models("clear", "--all", "--output_dir", str(exp)).stdout
    assert "0 cached model(s)" in models("list", "--output_dir", str(exp)).stdout


@pytest.mark.slow
def test_models_errors_are_one_line(tmp_path):
    offline = models("download", "--stage", "1", "--model_name", "convnext_atto", "--output_dir", str(tmp_path))
    assert offline.returncode == 2 and "no network" in offline.stderr and "Traceback" not in offline.stderr
    missing = models(
        "download",
        "--stage",
        "1",
        "--url",
        (tmp_path / "none.pth").as_uri(),
        "--model_name",
        "convnext_atto",
        "--output_dir",
        str(tmp_path),
    )
    assert missing.returncode == 2 and "could not download" in missing.stderr and "Traceback" not in missing.stderr
    assert not list(tmp_path.rglob("*.safetensors"))
    unnamed = models("clear", "--output_dir", str(tmp_path))
    assert unnamed.returncode == 2 and "--stage N, --model_name NAME or --all" in unnamed.stderr
    wrong = models("download", "--stage", "2", "--model_name", "no_such_model", "--output_dir", str(tmp_path))
    assert wrong.returncode == 2 and "not a timm model" in wrong.stderr


@pytest.mark.slow
def test_two_processes_write_the_submission_one_process_wrote(stage2_run, demo_root, tmp_path):
    exp, _ = stage2_run
    lists = [str(demo_root / "Dev" / "Dev.txt"), str(demo_root / "Test" / "Test.txt")]
    result = launch_two_processes(
        "tools/predict.py",
        [
            "--output_dir",
            str(tmp_path),
            "--checkpoint",
            str(exp / "checkpoints" / "stage2" / "stage2_best.safetensors"),
            "--num_workers",
            "0",
            "--batch_size",
            "4",
            "--predict_lists",
            *lists,
        ],
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = [line.split() for line in (exp / "submission.txt").read_text().splitlines()]
    got = [line.split() for line in (tmp_path / "submission.txt").read_text().splitlines()]
    assert [g[0] for g in got] == [e[0] for e in expected]  # every image once, in list order
    assert np.allclose([float(g[1]) for g in got], [float(e[1]) for e in expected], atol=1e-5)


@pytest.mark.slow
def test_the_teacher_scores_a_folder_too(stage2_run, demo_root, tmp_path):
    exp = shutil.copytree(stage2_run[0], tmp_path / "EXP", ignore=shutil.ignore_patterns("face_cache", "*_latest"))
    result = run_script(
        [
            sys.executable,
            "tools/predict.py",
            "--output_dir",
            str(exp),
            "--stage",
            "1",
            "--predict_folder",
            str(demo_root / "Dev"),
            "--num_workers",
            "0",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage1_best.safetensors" in result.stdout and (exp / "predictions_Dev.csv").is_file()
