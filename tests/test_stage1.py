import json
import shutil
import subprocess
import sys
import time

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import REPO, TINY_STAGE1, launch_two_processes, run_script, split_paths
import train_stage1
import wfas_data
from wfas_data import UserError


def train_paths(exp):
    return set(split_paths(exp, "train"))


def test_outputs_exist_in_their_formats(stage1_run):
    exp, results = stage1_run
    best = exp / "checkpoints" / "stage1" / "stage1_best.safetensors"
    with safe_open(best, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["model_name"] == "convnext_atto" and metadata["img_size"] == "64"
    assert "acer" in json.loads(metadata["val_metrics"]) and metadata["epoch"] == "0"
    model = timm.create_model("convnext_atto", num_classes=2)
    model.load_state_dict(load_file(best))  # plain timm weights
    latest = exp / "checkpoints" / "stage1" / "stage1_latest"
    assert (latest / "model.safetensors").is_file() and (latest / "optimizer.bin").is_file()
    assert json.loads((latest / "training_state.json").read_text())["epoch"] == 0
    logs = list((exp / "logs" / "stage1").glob("stage1_training_*.log"))
    assert len(logs) == 1
    log = logs[0].read_text()
    assert "1 process(es)" in log and "mixed precision no" in log and "train:" in log
    assert "epoch 1/1" in log and "img/s" in log and "val ACC" in log and "ACER" in log
    saved = json.loads((exp / "stage1_results.json").read_text())
    assert saved["best_epoch"] == 1 and saved["soft_labels_path"] == str(exp / "stage1_soft_labels.pth")
    for key in ("acc", "apcer", "bpcer", "acer", "auc", "eer", "apcer_per_attack"):
        assert key in saved["test"] and key in saved["val"]
    assert saved["test"]["threshold"] == saved["val"]["threshold"] == saved["threshold"]
    assert saved["images_per_second"] > 0 and saved["wall_time_s"] > 0
    assert results["soft_labels_path"] == saved["soft_labels_path"]


def test_soft_labels_cover_the_train_split_exactly(stage1_run):
    exp, results = stage1_run
    soft_labels = torch.load(exp / "stage1_soft_labels.pth", weights_only=True)
    assert set(soft_labels) == train_paths(exp)
    assert results["num_soft_labels"] == len(soft_labels)
    for probs in soft_labels.values():
        assert len(probs) == 2 and sum(probs) == pytest.approx(1, abs=1e-5) and min(probs) >= 0


def test_config_round_trips(stage1_run):
    exp, _ = stage1_run
    saved = json.loads((exp / "stage1_config.json").read_text())
    assert saved["model_name"] == "convnext_atto" and saved["pretrained"] is False and saved["img_size"] == 64
    assert "resume_from_checkpoint" not in saved and "config" not in saved
    again = vars(train_stage1.parse_args(["--config", str(exp / "stage1_config.json")]))
    assert {k: again[k] for k in saved} == saved
    override = train_stage1.parse_args(["--config", str(exp / "stage1_config.json"), "--num_epochs", "7"])
    assert override.num_epochs == 7 and override.model_name == "convnext_atto"


def test_the_users_config_format_works_as_it_is(tmp_path):
    config = {"data_root": "/data/WFAS", "model_name": "convnext_base", "pretrained": True, "num_epochs": 50,
              "batch_size": 32, "learning_rate": 2e-4, "model_cache_dir": "./model"}
    (tmp_path / "c.json").write_text(json.dumps(config))
    args = train_stage1.parse_args(["--config", str(tmp_path / "c.json")])
    assert {k: getattr(args, k) for k in config} == config


def test_unknown_config_key_is_refused_in_one_line(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"data_root": "x", "learning_rat": 1e-3}))
    result = run_script([sys.executable, "train_stage1.py", "--config", str(tmp_path / "c.json")])
    assert result.returncode == 2
    assert "learning_rat" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_resume_from_latest_continues(stage1_run, demo_root, tmp_path):
    exp = tmp_path / "EXP"
    shutil.copytree(stage1_run[0], exp)
    results = train_stage1.main(["--data_root", str(demo_root), "--output_dir", str(exp), *TINY_STAGE1,
                                 "--num_epochs", "2", "--resume_from_checkpoint", "latest"])
    state = json.loads((exp / "checkpoints" / "stage1" / "stage1_latest" / "training_state.json").read_text())
    assert state["epoch"] == 1 and state["global_step"] == 2 * json.loads(
        (stage1_run[0] / "checkpoints" / "stage1" / "stage1_latest" / "training_state.json").read_text()
    )["global_step"]
    log = max((exp / "logs" / "stage1").glob("*.log")).read_text()
    assert "Resumed from" in log and "epoch 2/2" in log and "epoch 1/2" not in log
    assert results["best_epoch"] in (1, 2)
    assert not (exp / "checkpoints" / "stage1" / "stage1_latest.tmp").exists()


def test_resume_from_a_missing_checkpoint_is_a_clear_error(demo_root, tmp_path):
    with pytest.raises(UserError, match="no saved state"):
        train_stage1.main(["--data_root", str(demo_root), "--output_dir", str(tmp_path), *TINY_STAGE1,
                           "--resume_from_checkpoint", "latest"])


def test_pretrained_weights_load_from_a_local_file_and_from_the_cache(tmp_path):
    source = timm.create_model("convnext_atto", pretrained=False)  # an "ImageNet" model, 1000 classes
    save_file(source.state_dict(), tmp_path / "weights.safetensors")
    args = train_stage1.parse_args(["--data_root", "x", "--model_name", "convnext_atto", "--pretrained_file",
                                    str(tmp_path / "weights.safetensors"), "--output_dir", str(tmp_path)])
    model = train_stage1.create_model(args)
    assert torch.equal(model.stem[0].weight, source.stem[0].weight)
    assert model.get_classifier().out_features == 2

    # a fetched copy in the cache is reused without any network
    cache = tmp_path / "EXP" / "model" / "stage1" / "convnext_atto"
    cache.mkdir(parents=True)
    shutil.copy(tmp_path / "weights.safetensors", cache / "convnext_atto.safetensors")
    args = train_stage1.parse_args(["--data_root", "x", "--model_name", "convnext_atto",
                                    "--output_dir", str(tmp_path / "EXP")])
    assert args.model_cache_dir == str(cache)
    model = train_stage1.create_model(args)
    assert torch.equal(model.stem[0].weight, source.stem[0].weight)


def test_offline_with_an_empty_cache_stops_at_once(demo_root, tmp_path):
    start = time.time()
    # nothing listens on port 9: as quick and as final as a machine without network
    result = run_script([sys.executable, "train_stage1.py", "--data_root", str(demo_root), "--output_dir",
                         str(tmp_path), "--model_name", "convnext_atto"],
                        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HTTPS_PROXY": "", "https_proxy": "",
                             "ALL_PROXY": "", "all_proxy": ""})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--download_only" in result.stderr and "--pretrained_file" in result.stderr
    assert "Traceback" not in result.stderr and time.time() - start < 60
    assert not (tmp_path / "checkpoints" / "stage1" / "stage1_best.safetensors").exists()


def test_an_unreadable_train_image_does_not_stop_the_run(demo_root, tmp_path):
    root = tmp_path / "WFAS"
    shutil.copytree(demo_root, root)
    exp = tmp_path / "EXP"
    table = wfas_data.load_or_create_split(root, exp, log=lambda _: None)
    broken = table.of_split("train").paths()[0]
    (root / broken).write_bytes(b"\xff\xd8\xff truncated")
    # batch size 1: no drop_last tail, so the epoch surely meets the broken image
    results = train_stage1.main(["--data_root", str(root), "--output_dir", str(exp), *TINY_STAGE1,
                                 "--batch_size", "1"])
    soft_labels = torch.load(exp / "stage1_soft_labels.pth", weights_only=True)
    assert broken not in soft_labels and len(soft_labels) == len(train_paths(exp)) - 1
    assert results["num_soft_labels"] == len(soft_labels)
    log = max((exp / "logs" / "stage1").glob("*.log")).read_text()
    assert broken in log and "1 unreadable images skipped" in log


def test_a_tracker_that_is_not_installed_is_a_clear_error():
    with pytest.raises(UserError, match="no such tracker"):
        train_stage1.parse_args(["--data_root", "x", "--report_to", "nosuchtracker"])


def test_two_processes_give_the_same_soft_label_keys(stage1_run, demo_root, tmp_path):
    exp = tmp_path / "EXP"
    exp.mkdir()
    shutil.copy(stage1_run[0] / "split.csv", exp / "split.csv")
    result = launch_two_processes("train_stage1.py", ["--data_root", str(demo_root), "--output_dir", str(exp),
                                                      *TINY_STAGE1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout + result.stderr
    two = torch.load(exp / "stage1_soft_labels.pth", weights_only=True)
    one = torch.load(stage1_run[0] / "stage1_soft_labels.pth", weights_only=True)
    assert set(two) == set(one) == train_paths(exp)
    saved = json.loads((exp / "stage1_results.json").read_text())
    assert saved["num_soft_labels"] == len(one) and saved["test"]["num_images"] == stage1_run[1]["test"]["num_images"]


def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(demo_root, tmp_path):
    command = [sys.executable, "train_stage1.py", "--data_root", str(demo_root), *TINY_STAGE1, "--num_epochs", "2"]
    assert run_script(command + ["--output_dir", str(tmp_path / "A")]).returncode == 0
    killed = subprocess.Popen(command + ["--output_dir", str(tmp_path / "B")], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    for line in killed.stdout:  # the epoch line comes after stage1_latest is written
        if "epoch 1/2" in line:
            killed.kill()
            break
    killed.wait()
    assert not (tmp_path / "B" / "stage1_results.json").exists()
    resumed = run_script(command + ["--output_dir", str(tmp_path / "B"), "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = load_file(tmp_path / "A" / "checkpoints" / "stage1" / "stage1_latest" / "model.safetensors")
    after_resume = load_file(tmp_path / "B" / "checkpoints" / "stage1" / "stage1_latest" / "model.safetensors")
    assert all(torch.equal(uninterrupted[k], after_resume[k]) for k in uninterrupted)


def test_a_run_killed_mid_epoch_resumes_at_the_next_batch(demo_root, tmp_path):
    command = [sys.executable, "train_stage1.py", "--data_root", str(demo_root), *TINY_STAGE1, "--num_epochs", "2",
               "--checkpointing_steps", "3", "--output_dir", str(tmp_path)]
    killed = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in killed.stdout:
        if "at update 6 (epoch 1, batch 6)" in line:
            killed.kill()
            break
    killed.wait()
    state = json.loads((tmp_path / "checkpoints" / "stage1" / "stage1_latest" / "training_state.json").read_text())
    assert state["epoch"] == -1 and state["batches_done"] == 6 and state["global_step"] == 6
    resumed = run_script(command + ["--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 0 of 2 done and 6 batches of the next, 6 updates" in resumed.stdout
    updates_per_epoch = len(train_paths(tmp_path)) // 8
    state = json.loads((tmp_path / "checkpoints" / "stage1" / "stage1_latest" / "training_state.json").read_text())
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (1, 0, 2 * updates_per_epoch)
