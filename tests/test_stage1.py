import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import (
    QUICK_STAGE,
    REPO,
    TINY_STAGE1,
    eer_pair_by_scikit_learn,
    launch_two_processes,
    metrics_by_loop,
    run_script,
    saved_model_probabilities,
    split_paths,
    two_process_command,
)
import evaluation
import train_stage1
import wfas_data
from errors import UserError


def train_paths(exp):
    return set(split_paths(exp, "train"))


def split_table(exp, demo_root, name):
    return wfas_data.read_split_csv(exp / "split.csv", demo_root).of_split(name)


def read_predictions(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    return [r["path"] for r in rows], labels, [r["attack_type"] for r in rows], scores


def test_soft_labels_are_the_teachers_spoof_then_live_probabilities_of_every_train_image(quick_stage1_run, demo_root):
    exp, results = quick_stage1_run
    soft_labels = torch.load(exp / "stage1_soft_labels.pth", weights_only=True)
    train = split_table(exp, demo_root, "train")
    assert list(soft_labels) == train.paths() and results["num_soft_labels"] == len(train)
    expected = saved_model_probabilities(exp / "checkpoints" / "stage1" / "stage1_best.safetensors", train)
    got = np.array([soft_labels[path] for path in train.paths()])
    # float32 softmax in the run against float64 here
    assert np.allclose(got, expected, atol=1e-5)
    assert wfas_data.SPOOF == 0 and wfas_data.LIVE == 1  # so the file holds [prob_spoof, prob_live]
    assert np.abs(got - got[:, ::-1]).max() > 1e-3  # the test can tell the two columns apart


def test_the_predictions_hold_the_teachers_p_live_and_give_the_reported_numbers(quick_stage1_run, demo_root):
    exp, results = quick_stage1_run
    checkpoint = exp / "checkpoints" / "stage1" / "stage1_best.safetensors"
    rows = {}
    for name in ("val", "test"):
        table = split_table(exp, demo_root, name)
        paths, labels, attack_types, scores = read_predictions(exp / f"stage1_{name}_predictions.csv")
        assert paths == table.paths() and labels.tolist() == table.label.tolist()
        assert attack_types == table.attack_types()
        assert np.allclose(scores, saved_model_probabilities(checkpoint, table)[:, 1], atol=1e-5)
        rows[name] = (scores, labels, attack_types)

    # the threshold is val's EER point, and test is scored at it
    val_apcer, val_bpcer = eer_pair_by_scikit_learn(rows["val"][0], rows["val"][1])
    assert results["threshold"] == results["val"]["threshold"] == results["test"]["threshold"]
    for name, expected_pair in (("val", (val_apcer, val_bpcer)), ("test", None)):
        expected = metrics_by_loop(*rows[name], results["threshold"])
        if expected_pair:
            assert (expected["apcer"], expected["bpcer"]) == pytest.approx(expected_pair, abs=1e-12)
        for key in ("acc", "apcer", "bpcer", "acer", "worst_apcer"):
            assert results[name][key] == pytest.approx(expected[key], abs=1e-12), (name, key)
        assert results[name]["apcer_per_attack"] == pytest.approx(expected["apcer_per_attack"])
        assert results[name]["num_images"] == len(rows[name][1])
    saved = json.loads((exp / "stage1_results.json").read_text())
    assert saved["test"] == results["test"] and saved["threshold"] == results["threshold"]


@pytest.mark.parametrize("num_folds", [1, 2, 3])
def test_folds_are_subject_disjoint_balanced_per_attack_type_and_deterministic(tmp_path, num_folds):
    # subjects of 1 to 6 images: balancing by images, not by subjects, shows
    rng = np.random.default_rng(num_folds)
    lines = [
        f"{kind}/{s}/{i}.jpg {int(kind == 'live')} {kind} {kind}{s}"
        for kind in ("live", "print", "mask")
        for s in range(9)
        for i in range(int(rng.integers(1, 7)))
    ]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    train = wfas_data.index_labelled_list(tmp_path / "list.txt")
    folds = train_stage1.assign_folds(train, num_folds, seed=5)
    assert np.array_equal(folds, train_stage1.assign_folds(train, num_folds, seed=5))
    assert sorted(set(folds.tolist())) == list(range(num_folds))
    for attack_type in set(train.attack_types()):
        in_type = [i for i, a in enumerate(train.attack_types()) if a == attack_type]
        fold_of = {}
        sizes = {}
        for i in in_type:  # one fold per subject
            subject = train.subject[i]
            assert fold_of.setdefault(subject, folds[i]) == folds[i]
            sizes[subject] = sizes.get(subject, 0) + 1
        per_fold = [sum(size for subject, size in sizes.items() if fold_of[subject] == f) for f in range(num_folds)]
        assert max(per_fold) - min(per_fold) <= max(sizes.values())  # within one subject of each other
    assert folds.dtype == np.int64
    in_all = np.bincount(folds, minlength=num_folds)
    assert in_all.max() - in_all.min() <= 6  # ties go to the fold with the fewest images in all


def test_the_teacher_of_several_folds_scores_an_image_with_their_mean(demo_root):
    table = wfas_data.assign_splits(wfas_data.index_wfas(demo_root), 0.2, 0.2, seed=0).of_split("val")
    labels = table.label.copy()
    types = np.array(table.attack_types())
    rng = np.random.default_rng(0)
    fold_scores = [rng.random(len(table)) for _ in range(3)]
    fold_scores[0][0] = fold_scores[1][0] = fold_scores[2][0] = 1.0 - labels[0]  # all three sure of the wrong class
    rows = [
        evaluation.Predictions(paths=np.array(table.paths()), labels=labels, attack_types=types, scores=scores)
        for scores in fold_scores
    ]
    table.unseen_attacks = (types[labels == 0][0],)
    metrics, (paths, _, _, scores) = train_stage1.mean_of_folds(rows, table, threshold=0.45)
    by_hand = [(a + b + c) / 3 for a, b, c in zip(*fold_scores)]
    assert list(paths) == table.paths() and np.allclose(scores, by_hand, rtol=0, atol=1e-15)
    expected = metrics_by_loop(by_hand, labels, types, 0.45, unseen=table.unseen_attacks)
    assert metrics["threshold"] == 0.45 and metrics["acer"] == pytest.approx(expected["acer"], abs=1e-12)
    assert metrics["unseen_acer"] == pytest.approx(expected["unseen_acer"], abs=1e-12)
    # a probability of 0 for the true class counts as 1e-12: the loss stays finite
    loss = -np.mean([math.log(max(p if label == 1 else 1 - p, 1e-12)) for p, label in zip(by_hand, labels)])
    assert metrics["loss"] == pytest.approx(loss, rel=1e-12) and metrics["unreadable"] == 0


def test_soft_labels_are_saved_for_a_weights_only_load(tmp_path):
    soft_labels = {"Train/living/1/a.jpg": [0.25, 0.75], "Train/spoof/print/2/b.jpg": [0.9, 0.1]}
    train_stage1.write_soft_labels(tmp_path / "stage1_soft_labels.pth", soft_labels)
    assert torch.load(tmp_path / "stage1_soft_labels.pth", weights_only=True) == soft_labels
    assert [p.name for p in tmp_path.iterdir()] == ["stage1_soft_labels.pth"]


@pytest.mark.slow
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
    optimizer = torch.load(latest / "optimizer.bin", weights_only=True)  # fused AdamW: README, Performance
    assert optimizer["state"] and all(group["fused"] for group in optimizer["param_groups"])
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


@pytest.mark.slow
def test_soft_labels_cover_the_train_split_exactly(stage1_run):
    exp, results = stage1_run
    soft_labels = torch.load(exp / "stage1_soft_labels.pth", weights_only=True)
    assert set(soft_labels) == train_paths(exp)
    assert results["num_soft_labels"] == len(soft_labels)
    for probs in soft_labels.values():
        assert len(probs) == 2 and sum(probs) == pytest.approx(1, abs=1e-5) and min(probs) >= 0


@pytest.mark.slow
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
    config = {
        "data_root": "/data/WFAS",
        "model_name": "convnext_base",
        "pretrained": True,
        "num_epochs": 50,
        "batch_size": 32,
        "learning_rate": 2e-4,
        "model_cache_dir": "./model",
    }
    (tmp_path / "c.json").write_text(json.dumps(config))
    args = train_stage1.parse_args(["--config", str(tmp_path / "c.json")])
    assert {k: getattr(args, k) for k in config} == config


@pytest.mark.slow
def test_unknown_config_key_is_refused_in_one_line(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"data_root": "x", "learning_rat": 1e-3}))
    result = run_script([sys.executable, "train_stage1.py", "--config", str(tmp_path / "c.json")])
    assert result.returncode == 2
    assert "learning_rat" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_resume_from_latest_continues(stage1_run, demo_root, tmp_path):
    exp = tmp_path / "EXP"
    shutil.copytree(stage1_run[0], exp)
    results = train_stage1.main(
        [
            "--data_root",
            str(demo_root),
            "--output_dir",
            str(exp),
            *TINY_STAGE1,
            "--num_epochs",
            "2",
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    state = json.loads((exp / "checkpoints" / "stage1" / "stage1_latest" / "training_state.json").read_text())
    assert (
        state["epoch"] == 1
        and state["global_step"]
        == 2
        * json.loads((stage1_run[0] / "checkpoints" / "stage1" / "stage1_latest" / "training_state.json").read_text())[
            "global_step"
        ]
    )
    log = max((exp / "logs" / "stage1").glob("*.log")).read_text()
    assert "Resumed from" in log and "epoch 2/2" in log and "epoch 1/2" not in log
    assert results["best_epoch"] in (1, 2)
    assert not (exp / "checkpoints" / "stage1" / "stage1_latest.tmp").exists()


@pytest.mark.slow
def test_resume_latest_without_a_state_starts_fresh_and_a_missing_folder_is_an_error(demo_root, tmp_path):
    # a requeued job runs the same command every time: the first start has no state yet
    train_stage1.main(
        [
            "--data_root",
            str(demo_root),
            "--output_dir",
            str(tmp_path),
            *TINY_STAGE1,
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    log = max((tmp_path / "logs" / "stage1").glob("*.log")).read_text()
    assert "No saved state" in log and "starting from the beginning" in log and "epoch 1/1" in log
    with pytest.raises(UserError, match="no saved state"):
        train_stage1.main(
            [
                "--data_root",
                str(demo_root),
                "--output_dir",
                str(tmp_path),
                *TINY_STAGE1,
                "--resume_from_checkpoint",
                str(tmp_path / "nowhere"),
            ]
        )


@pytest.mark.slow
def test_offline_with_an_empty_cache_stops_at_once(demo_root, tmp_path):
    # nothing listens on port 9: as quick and as final as a machine without network
    result = run_script(
        [
            sys.executable,
            "train_stage1.py",
            "--data_root",
            str(demo_root),
            "--output_dir",
            str(tmp_path),
            "--model_name",
            "convnext_atto",
        ],
        env={
            "HF_ENDPOINT": "http://127.0.0.1:9",
            "HTTPS_PROXY": "",
            "https_proxy": "",
            "ALL_PROXY": "",
            "all_proxy": "",
        },
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "tools/models.py download" in result.stderr and "--pretrained_file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints" / "stage1" / "stage1_best.safetensors").exists()


@pytest.mark.slow
def test_an_unreadable_train_image_does_not_stop_the_run(demo_root, tmp_path):
    root = tmp_path / "WFAS"
    shutil.copytree(demo_root, root)
    exp = tmp_path / "EXP"
    table = wfas_data.load_or_create_split(root, exp, log=lambda _: None)
    broken, broken_val = table.of_split("train").paths()[0], table.of_split("val").paths()[0]
    for path in (broken, broken_val):
        (root / path).write_bytes(b"\xff\xd8\xff truncated")
    # batch size 1: no drop_last tail, so the epoch surely meets the broken image
    results = train_stage1.main(["--data_root", str(root), "--output_dir", str(exp), *TINY_STAGE1, "--batch_size", "1"])
    soft_labels = torch.load(exp / "stage1_soft_labels.pth", weights_only=True)
    assert broken not in soft_labels and len(soft_labels) == len(train_paths(exp)) - 1
    assert results["num_soft_labels"] == len(soft_labels)
    log = max((exp / "logs" / "stage1").glob("*.log")).read_text()
    assert broken in log and "1 undecodable images skipped" in log
    results = json.loads((exp / "stage1_results.json").read_text())
    assert results["undecodable_train_images"] == [broken]
    assert (results["val"]["unreadable"], results["test"]["unreadable"]) == (1, 0)  # counted, not scored


def test_a_tracker_that_is_not_installed_is_a_clear_error():
    with pytest.raises(UserError, match="no such tracker"):
        train_stage1.parse_args(["--data_root", "x", "--report_to", "nosuchtracker"])


@pytest.mark.slow
def test_two_processes_give_each_image_its_own_soft_label(stage1_run, demo_root, tmp_path):
    """Each process scores half of train; the gathered probabilities belong to the images they name: the 2-process
    teacher's own softmax, computed here, and as many images as one process labels."""
    exp = tmp_path / "EXP"
    exp.mkdir()
    for name in ("split.csv", "split_source.json"):  # the split of stage1_run, with its record
        shutil.copy(stage1_run[0] / name, exp / name)
    # the photos, not the face cache's JPEG crops: scored here the same way
    args = ["--data_root", str(demo_root), "--output_dir", str(exp), *TINY_STAGE1, "--no-face_cache"]
    result = launch_two_processes("train_stage1.py", args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout + result.stderr
    two = torch.load(exp / "stage1_soft_labels.pth", weights_only=True)
    one = torch.load(stage1_run[0] / "stage1_soft_labels.pth", weights_only=True)
    train = split_table(exp, demo_root, "train")
    assert list(two) == train.paths() and set(one) == set(two)
    expected = saved_model_probabilities(exp / "checkpoints" / "stage1" / "stage1_best.safetensors", train)
    assert np.allclose([two[path] for path in train.paths()], expected, atol=1e-5)  # float32 run, float64 here
    saved = json.loads((exp / "stage1_results.json").read_text())
    assert saved["num_soft_labels"] == len(one) and saved["test"]["num_images"] == stage1_run[1]["test"]["num_images"]


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(demo_root, tmp_path):
    command = [sys.executable, "train_stage1.py", "--data_root", str(demo_root), *TINY_STAGE1, "--num_epochs", "2"]
    assert run_script(command + ["--output_dir", str(tmp_path / "A")]).returncode == 0
    killed = subprocess.Popen(
        command + ["--output_dir", str(tmp_path / "B")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_at_the_next_batch(demo_root, tmp_path):
    command = [
        sys.executable,
        "train_stage1.py",
        "--data_root",
        str(demo_root),
        *TINY_STAGE1,
        "--num_epochs",
        "2",
        "--checkpointing_steps",
        "3",
        "--output_dir",
        str(tmp_path),
    ]
    killed = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in killed.stdout:
        if "at update 6 (epoch 1, 48 images)" in line:
            killed.kill()
            break
    killed.wait()
    state = json.loads((tmp_path / "checkpoints" / "stage1" / "stage1_latest" / "training_state.json").read_text())
    assert state["epoch"] == -1 and state["images_done"] == 48 and state["global_step"] == 6
    resumed = run_script(command + ["--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 0 of 2 done and 6 batches of the next, 6 updates" in resumed.stdout
    updates_per_epoch = len(train_paths(tmp_path)) // 8
    state = json.loads((tmp_path / "checkpoints" / "stage1" / "stage1_latest" / "training_state.json").read_text())
    assert (state["epoch"], state["images_done"], state["global_step"]) == (1, 0, 2 * updates_per_epoch)


# ---------------------------------------------------------------------------------------------- hardening


def record_learning_rates():
    """The learning rate of every optimizer update, as the optimizer sees it."""
    rates = []
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: rates.append(optimizer.param_groups[0]["lr"])
    )
    return rates, handle


@pytest.mark.slow
def test_a_resumed_run_follows_the_schedule_of_its_new_settings(demo_root, tmp_path):
    command = ["--data_root", str(demo_root), *TINY_STAGE1]
    rates, handle = record_learning_rates()
    try:
        train_stage1.main(command + ["--output_dir", str(tmp_path / "A"), "--num_epochs", "3"])
        uninterrupted = list(rates)
        rates.clear()
        train_stage1.main(command + ["--output_dir", str(tmp_path / "B"), "--num_epochs", "1"])
        updates_per_epoch = len(rates)
        rates.clear()
        train_stage1.main(
            command + ["--output_dir", str(tmp_path / "B"), "--num_epochs", "3", "--resume_from_checkpoint", "latest"]
        )
    finally:
        handle.remove()
    assert len(uninterrupted) == 3 * updates_per_epoch
    assert rates == pytest.approx(uninterrupted[updates_per_epoch:], rel=1e-12)
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # past the warmup: it only decays, never climbs again


AUGMENTATION_PROBE = """
import json, os, sys
sys.path.insert(0, {repo!r})
from torchvision.transforms import v2 as T
import train_stage1, wfas_data

crops, indices = [], []
make_params = T.RandomResizedCrop.make_params
def record_crop(self, flat_inputs):
    params = make_params(self, flat_inputs)
    crops.append([params["top"], params["left"], params["height"], params["width"]])
    return params
T.RandomResizedCrop.make_params = record_crop
getitem = wfas_data.FaceDataset.__getitem__
def record_index(self, index):
    if isinstance(self.transform, T.Compose):  # the augmented train set
        indices.append(int(index))
    return getitem(self, index)
wfas_data.FaceDataset.__getitem__ = record_index
train_stage1.main(sys.argv[1:])
with open(os.path.join({out!r}, f"rank{{os.environ['RANK']}}.json"), "w") as f:
    json.dump({{"crops": crops, "indices": indices}}, f)
"""


@pytest.mark.slow
def test_processes_draw_their_own_augmentation_but_share_the_shuffle(stage1_run, demo_root, tmp_path):
    exp = tmp_path / "EXP"
    exp.mkdir()
    for name in ("split.csv", "split_source.json"):  # the split of stage1_run, with its record
        shutil.copy(stage1_run[0] / name, exp / name)
    probe = tmp_path / "probe.py"
    probe.write_text(AUGMENTATION_PROBE.format(repo=str(REPO), out=str(tmp_path)))
    result = launch_two_processes(str(probe), ["--data_root", str(demo_root), "--output_dir", str(exp), *TINY_STAGE1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # with the face cache every stored crop has the same size, so the crop boxes depend on the RNG alone
    assert len(rank0["crops"]) == len(rank1["crops"]) > 0
    assert rank0["crops"][:8] != rank1["crops"][:8]  # the same step, different augmentation
    # one shuffle shared by both: their shards of the epoch never overlap
    assert not set(rank0["indices"]) & set(rank1["indices"])
    assert len(rank0["indices"]) == len(rank1["indices"]) == 4 * 8


@pytest.mark.slow
def test_an_image_gone_after_the_split_stops_the_run_with_one_line(demo_root, tmp_path):
    root = tmp_path / "WFAS"
    shutil.copytree(demo_root, root)
    exp = tmp_path / "EXP"
    table = wfas_data.load_or_create_split(root, exp, log=lambda _: None)
    # a train image that the start-up check of a sample of files does not look at
    sampled = set(table.paths()[:: math.ceil(len(table) / 64)])
    gone = next(p for p in table.of_split("train").paths() if p not in sampled)
    (root / gone).unlink()
    result = run_script(
        [sys.executable, "train_stage1.py", "--data_root", str(root), "--output_dir", str(exp), *TINY_STAGE1]
    )
    assert result.returncode == 2
    assert f"cannot read {root / gone}" in result.stderr and "mounted" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
    assert not (exp / "stage1_results.json").exists()


@pytest.mark.slow
def test_undecodable_images_beyond_1_percent_stop_the_run(demo_root, tmp_path):
    root = tmp_path / "WFAS"
    shutil.copytree(demo_root, root)
    exp = tmp_path / "EXP"
    table = wfas_data.load_or_create_split(root, exp, log=lambda _: None)
    for path in table.of_split("train").paths()[:20]:
        (root / path).write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot be decoded"):
        train_stage1.main(["--data_root", str(root), "--output_dir", str(exp), *TINY_STAGE1])


@pytest.mark.slow
def test_leftover_tmp_and_old_folders_do_not_block_a_resume(stage1_run, demo_root, tmp_path):
    exp = tmp_path / "EXP"
    shutil.copytree(stage1_run[0], exp)
    ckpt = exp / "checkpoints" / "stage1"
    for leftover in ("stage1_latest.tmp", "stage1_latest.old"):  # a kill during the swap or during rmtree
        (ckpt / leftover).mkdir()
        (ckpt / leftover / "model.safetensors").write_bytes(b"half")
    train_stage1.main(
        [
            "--data_root",
            str(demo_root),
            "--output_dir",
            str(exp),
            *TINY_STAGE1,
            "--num_epochs",
            "2",
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    assert json.loads((ckpt / "stage1_latest" / "training_state.json").read_text())["epoch"] == 1
    assert sorted(p.name for p in ckpt.iterdir()) == ["stage1_best.safetensors", "stage1_latest"]


@pytest.mark.slow
def test_a_user_error_on_the_main_process_stops_every_process(tmp_path):
    # a process left waiting at a barrier would hang to the timeout, which fails the test
    result = launch_two_processes(
        "train_stage1.py",
        ["--data_root", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "EXP"), *TINY_STAGE1],
        timeout=300,
    )
    assert result.returncode != 0
    # each process prints the line and exits itself, none waits at the barrier to be killed
    assert result.stderr.count("error: --data_root") == 2


def stop_with_a_signal(command, signum):
    """Start command in a process group of its own and, after its first update, signal the whole group as a
    scheduler does (loader workers and launcher included). Returns (exit code, output)."""
    run = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"},
    )
    output = []
    for line in run.stdout:
        output.append(line)
        if "stage 1: 1/" in line:  # the first update's progress line
            os.killpg(run.pid, signum)
    return run.wait(timeout=120), "".join(output)


@pytest.mark.slow
def test_sigusr1_mid_epoch_saves_where_the_run_stands_and_the_same_command_resumes(demo_root, tmp_path):
    # the same command line for the first start and every restart, as a requeued job runs it
    command = [
        sys.executable,
        "train_stage1.py",
        "--data_root",
        str(demo_root),
        *TINY_STAGE1,
        "--num_epochs",
        "2",
        "--num_workers",
        "1",
        "--output_dir",
        str(tmp_path),
        "--resume_from_checkpoint",
        "latest",
    ]
    returncode, output = stop_with_a_signal(command, signal.SIGUSR1)  # as SLURM's --signal=USR1@... sends it
    assert returncode == 128 + signal.SIGUSR1, output[-3000:]
    assert "Stopped by SIGUSR1" in output and "--resume_from_checkpoint latest" in output
    state = json.loads((tmp_path / "checkpoints" / "stage1" / "stage1_latest" / "training_state.json").read_text())
    assert state["epoch"] == -1 and 0 < state["global_step"] < 4 and state["images_done"] == 8 * state["global_step"]
    resumed = run_script(command)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"and {state['global_step']} batches of the next" in resumed.stdout
    state = json.loads((tmp_path / "checkpoints" / "stage1" / "stage1_latest" / "training_state.json").read_text())
    assert state["global_step"] == 2 * (len(train_paths(tmp_path)) // 8)  # as many updates as uninterrupted


@pytest.mark.slow
def test_sigterm_stops_two_processes_at_the_same_update_mid_epoch(stage1_run, demo_root, tmp_path):
    for name in ("split.csv", "split_source.json"):
        shutil.copy(stage1_run[0] / name, tmp_path / name)
    args = [
        "--data_root",
        str(demo_root),
        *TINY_STAGE1,
        "--num_epochs",
        "2",
        "--batch_size",
        "2",
        "--num_workers",
        "1",
        "--output_dir",
        str(tmp_path),
        "--resume_from_checkpoint",
        "latest",
    ]
    returncode, output = stop_with_a_signal(two_process_command("train_stage1.py", args), signal.SIGTERM)
    assert returncode != 0 and output.count("Stopped by SIGTERM at update 10;") == 1, output[-3000:]
    state = json.loads((tmp_path / "checkpoints" / "stage1" / "stage1_latest" / "training_state.json").read_text())
    assert (state["epoch"], state["global_step"], state["images_done"]) == (-1, 10, 10 * 2 * 2)
    resumed = launch_two_processes("train_stage1.py", args)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    state = json.loads((tmp_path / "checkpoints" / "stage1" / "stage1_latest" / "training_state.json").read_text())
    assert state["global_step"] == 2 * (len(train_paths(tmp_path)) // 4)


@pytest.mark.slow
def test_a_resume_says_what_it_could_not_restore(stage1_run, demo_root, tmp_path):
    exp = tmp_path / "EXP"
    shutil.copytree(stage1_run[0], exp)
    (exp / "checkpoints" / "stage1" / "stage1_latest" / "random_states_0.pkl").unlink()
    train_stage1.main(
        [
            "--data_root",
            str(demo_root),
            "--output_dir",
            str(exp),
            *TINY_STAGE1,
            "--num_epochs",
            "2",
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    log = max((exp / "logs" / "stage1").glob("*.log")).read_text()
    assert "Could not load random states" in log
    assert "saved in" not in log  # save_state's per-file lines stay out


@pytest.mark.slow
def test_output_that_is_not_a_terminal_gets_plain_progress_lines_and_loader_workers_let_it_exit(demo_root, tmp_path):
    # loader workers ignore SIGTERM (a scheduler signals them too): none may be left for the exit to terminate
    result = run_script(
        [
            sys.executable,
            "train_stage1.py",
            "--data_root",
            str(demo_root),
            "--output_dir",
            str(tmp_path),
            *TINY_STAGE1,
            "--num_workers",
            "1",
        ],
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stdout + result.stderr and "\x1b[" not in result.stdout + result.stderr
    assert "stage 1: 1/8 (12.5%)" in result.stdout and "ETA" in result.stdout


@pytest.mark.parametrize("subjects_per_type, per_type", [(4, [1, 1, 2]), (9, [3, 3, 3])])
def test_folds_of_one_image_subjects_by_hand(tmp_path, subjects_per_type, per_type):
    """Subjects of one image each, 3 types, 3 folds: within a type the fold with the fewest of that type takes the
    next subject, and a tie goes to the fold with the fewest in all, so the extra subjects of the types rotate."""
    lines = [
        f"{kind}/{s}/0.jpg {int(kind == 'live')} {kind} {kind}{s}"
        for kind in ("live", "print", "mask")
        for s in range(subjects_per_type)
    ]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    train = wfas_data.index_labelled_list(tmp_path / "list.txt")
    for seed in range(3):
        folds = train_stage1.assign_folds(train, 3, seed)
        for kind in ("live", "print", "mask"):
            assert sorted(np.bincount(folds[train.attack_type == kind.encode()], minlength=3)) == per_type
        assert np.bincount(folds, minlength=3).tolist() == [subjects_per_type] * 3


@pytest.mark.end_to_end
@pytest.mark.parametrize(
    "accumulation, epochs, max_steps",
    [(3, 2, None), (1, 3, 7)],  # a last, shorter accumulation still updates; --max_train_steps cuts the run
)
def test_a_run_makes_the_updates_counted_by_hand(demo_root, tmp_path, accumulation, epochs, max_steps):
    flags = [*QUICK_STAGE, "--num_epochs", str(epochs), "--gradient_accumulation_steps", str(accumulation)]
    if max_steps:
        flags += ["--max_train_steps", str(max_steps)]
    results = train_stage1.main(["--data_root", str(demo_root), "--output_dir", str(tmp_path), *flags])
    with open(tmp_path / "split.csv", newline="") as f:
        train_images = sum(row["split"] == "train" for row in csv.DictReader(f))
    batches = train_images // 8  # shuffled batches drop the last incomplete one
    updates_per_epoch = -(-batches // accumulation)
    expected = epochs * updates_per_epoch if max_steps is None else min(epochs * updates_per_epoch, max_steps)
    assert results["soft_label_folds"]["folds"][0]["updates"] == expected
