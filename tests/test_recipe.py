"""The recipe's options: EMA of the weights, the challenge-valid preset, held-out (unseen) attack types."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO, TINY_STAGE1, TINY_STAGE2, launch_two_processes, run_script, split_paths
import train_stage1
import train_stage2
import wfas_data
from tools import make_demo
import errors
import evaluation
import face_cache
import challenge
import networks


def latest_file(exp, stage, name):
    return load_file(exp / "checkpoints" / stage / f"{stage}_latest" / name)


def differ(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


@pytest.mark.slow
def test_ema_weights_are_validated_kept_and_differ_from_the_raw_ones(demo_root, tmp_path):
    exp = tmp_path / "EXP"
    for script, tiny in ((train_stage1, ["--data_root", str(demo_root), *TINY_STAGE1]), (train_stage2, TINY_STAGE2)):
        stage = script.STAGE
        results = script.main(["--output_dir", str(exp), *tiny, "--model_ema_decay", "0.9"])
        ema, raw = latest_file(exp, stage, "ema.safetensors"), latest_file(exp, stage, "model.safetensors")
        assert differ(ema, raw)
        # one epoch: the best checkpoint is the EMA at its end (stage 2's net is wrapped: LogitsAndEmbedding)
        best = load_file(exp / "checkpoints" / stage / f"{stage}_best.safetensors")
        prefix = "net." if stage == "stage2" else ""
        assert all(torch.equal(best[k], ema[prefix + k]) for k in best)
        # the epoch's validation scored the EMA: the final val, rescored with the kept weights, agrees
        with safe_open(exp / "checkpoints" / stage / f"{stage}_best.safetensors", "pt") as f:
            epoch_val = json.loads(f.metadata()["val_metrics"])
        assert epoch_val["auc"] == (results["val"]["auc"] if stage == "stage1" else results["val_auc"])


@pytest.mark.slow
def test_a_killed_run_resumes_the_same_ema(demo_root, tmp_path):
    command = [
        sys.executable,
        "train_stage1.py",
        "--data_root",
        str(demo_root),
        *TINY_STAGE1,
        "--num_epochs",
        "2",
        "--model_ema_decay",
        "0.9",
    ]
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
    resumed = run_script(command + ["--output_dir", str(tmp_path / "B"), "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted, after_resume = (latest_file(tmp_path / run, "stage1", "ema.safetensors") for run in "AB")
    assert all(torch.equal(uninterrupted[k], after_resume[k]) for k in uninterrupted)


@pytest.mark.slow
def test_a_resume_on_two_processes_continues_the_same_average(demo_root, tmp_path):
    """One update after a one-process epoch, on two processes: EMA' = d * EMA + (1 - d) * W', d the warm-up decay."""
    exp = tmp_path / "EXP"
    args = ["--data_root", str(demo_root), "--output_dir", str(exp), *TINY_STAGE1, "--model_ema_decay", "0.99"]
    train_stage1.main(args)
    before = latest_file(exp, "stage1", "ema.safetensors")
    # the new schedule's position after one epoch: whole batches of 8 on each of two processes
    position = len(split_paths(exp, "train")) // 16
    resumed = launch_two_processes(
        "train_stage1.py",
        [*args, "--num_epochs", "2", "--max_train_steps", str(position + 1), "--resume_from_checkpoint", "latest"],
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((exp / "checkpoints" / "stage1" / "stage1_latest" / "training_state.json").read_text())
    assert state["global_step"] == position + 1
    after, weights = latest_file(exp, "stage1", "ema.safetensors"), latest_file(exp, "stage1", "model.safetensors")
    decay = min(1 - (1 + position) ** (-2 / 3), 0.99)  # ModelEmaV3's warm-up at update position + 1
    for k in after:
        assert torch.allclose(after[k], decay * before[k] + (1 - decay) * weights[k], atol=1e-6), k


@pytest.mark.slow
def test_resuming_an_ema_run_from_a_state_without_ema_is_one_line(stage1_run, demo_root, tmp_path):
    exp = tmp_path / "EXP"
    shutil.copytree(stage1_run[0], exp)
    result = run_script(
        [
            sys.executable,
            "train_stage1.py",
            "--data_root",
            str(demo_root),
            "--output_dir",
            str(exp),
            *TINY_STAGE1,
            "--num_epochs",
            "2",
            "--model_ema_decay",
            "0.9",
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    assert result.returncode == 2 and "holds no EMA weights" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- the challenge preset


@pytest.mark.slow
def test_the_challenge_preset_runs_and_logs_no_warning(demo_root, tmp_path):
    """The presets as they are, on the demo: the student at its 256 px (the size its GFLOPs are counted at), the
    teacher smaller, so that the test stays short; a handful of updates each."""
    exp = tmp_path / "EXP"
    quick = ["--num_workers", "0", "--num_epochs", "1", "--max_train_steps", "4"]
    train_stage1.main(
        [
            "--config",
            str(REPO / "configs" / "challenge_stage1.json"),
            "--data_root",
            str(demo_root),
            "--output_dir",
            str(exp),
            "--img_size",
            "64",
            "--batch_size",
            "8",
            *quick,
        ]
    )
    results = train_stage2.main(
        [
            "--config",
            str(REPO / "configs" / "challenge_stage2.json"),
            "--output_dir",
            str(exp),
            "--batch_size",
            "4",
            *quick,
        ]
    )
    assert results["compute"]["gflops"] <= challenge.GFLOPS_LIMIT and results["img_size"] == 256
    for stage in ("stage1", "stage2"):
        log = next((exp / "logs" / stage).glob("*.log")).read_text()
        assert "from scratch" in log and " WARNING " not in log, stage


@pytest.mark.slow
def test_a_run_that_breaks_a_rule_says_so_in_one_warning(stage1_run, tmp_path):
    exp = tmp_path / "EXP"
    shutil.copytree(stage1_run[0], exp)
    config = json.loads((exp / "stage1_config.json").read_text())
    (exp / "stage1_config.json").write_text(json.dumps({**config, "pretrained": True}))  # as if its teacher were
    train_stage2.main(["--output_dir", str(exp), *TINY_STAGE2, "--max_train_steps", "4"])
    log = next((exp / "logs" / "stage2").glob("*.log")).read_text()
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "Not a valid WFAS challenge entry" in warnings[0]
    assert "pretrained teacher" in warnings[0]


# ---------------------------------------------------------------------------------------------- unseen attack types

HELD_OUT = ["2D-Display-Phone", "3D-Mask"]


def test_unseen_types_never_train_and_split_between_val_and_test_by_subject(demo_root):
    unseen = wfas_data.assign_splits(wfas_data.index_wfas(demo_root), 0.2, 0.2, seed=3, unseen_attacks=HELD_OUT)
    plain = wfas_data.assign_splits(wfas_data.index_wfas(demo_root), 0.2, 0.2, seed=3)
    types, splits = np.array(unseen.attack_types()), np.array(wfas_data.SPLITS)[unseen.split]
    held_out = np.isin(types, HELD_OUT)
    assert held_out.sum() > 0 and not (splits[held_out] == "train").any()
    for attack_type in HELD_OUT:
        rows = types == attack_type
        assert {"val", "test"} <= set(splits[rows])  # both hold each held-out type, as WFAS's dev and test do
        assert abs((splits[rows] == "val").sum() - (splits[rows] == "test").sum()) <= 8  # 1:1, whole subjects
        subjects = np.char.add(unseen.attack_type[rows], unseen.subject[rows])
        assert all(len(set(splits[rows][subjects == s])) == 1 for s in set(subjects))
    assert (unseen.split[~held_out] == plain.split[~held_out]).all()  # live and the seen types split as without it
    assert unseen.unseen_attacks == tuple(sorted(HELD_OUT))


@pytest.mark.parametrize(
    "held_out, message",
    [
        (["3D-Mask", "Paper-Cut"], "Paper-Cut: not an attack type of this data"),
        (["live"], "live: not an attack type of this data"),
        (list(make_demo.DEMO_ATTACK_TYPES), "holds out every attack type"),
    ],
)
def test_a_type_not_in_the_data_or_holding_out_every_type_is_one_line(demo_root, held_out, message):
    with pytest.raises(errors.UserError, match=message):
        wfas_data.assign_splits(wfas_data.index_wfas(demo_root), unseen_attacks=held_out)


@pytest.mark.slow
def test_another_list_on_the_same_folder_is_refused(demo_root, tmp_path):
    wfas_data.load_or_create_split(demo_root, tmp_path, log=lambda _: None, unseen_attacks=HELD_OUT)
    assert json.loads((tmp_path / "split_source.json").read_text())["unseen_attacks"] == sorted(HELD_OUT)
    again = wfas_data.load_or_create_split(demo_root, tmp_path, log=lambda _: None)  # stage 2: follows the record
    assert again.unseen_attacks == tuple(sorted(HELD_OUT))
    for other in (["3D-Mask"], []):
        with pytest.raises(errors.UserError, match="pass the same --unseen_attacks"):
            wfas_data.load_or_create_split(demo_root, tmp_path, log=lambda _: None, unseen_attacks=other)
    result = run_script(
        [
            sys.executable,
            "train_stage1.py",
            "--data_root",
            str(demo_root),
            "--output_dir",
            str(tmp_path),
            *TINY_STAGE1,
            "--unseen_attacks",
            "3D-Mask",
        ]
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "was made with --unseen_attacks" in result.stderr


def recompute_groups(csv_path, threshold):
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    scores, labels = np.array([float(r["score"]) for r in rows]), np.array([int(r["label"]) for r in rows])
    types = np.array([r["attack_type"] for r in rows])
    metrics = evaluation.compute_metrics(
        scores, labels, types, threshold=threshold, unseen_attacks=tuple(sorted(HELD_OUT))
    )
    return metrics, types


@pytest.mark.slow
def test_both_stages_report_seen_and_unseen_types_as_the_prediction_csvs_give_them(demo_root, tmp_path):
    exp = tmp_path / "EXP"
    stage1 = train_stage1.main(
        ["--data_root", str(demo_root), "--output_dir", str(exp), *TINY_STAGE1, "--unseen_attacks", ",".join(HELD_OUT)]
    )
    assert not set(HELD_OUT) & {row.split("/")[2] for row in split_paths(exp, "train") if "/spoof/" in row}
    final = train_stage2.main(["--output_dir", str(exp), *TINY_STAGE2])
    reported = {"stage1": stage1["test"], "stage2": {k.removeprefix("test_"): v for k, v in final.items()}}
    for stage, threshold in (("stage1", stage1["threshold"]), ("stage2", final["threshold"])):
        again, types = recompute_groups(exp / f"{stage}_test_predictions.csv", threshold)
        assert set(HELD_OUT) <= set(types)
        for key in ("seen_apcer", "seen_acer", "unseen_apcer", "unseen_acer", "apcer_per_attack"):
            assert reported[stage][key] == again[key], (stage, key)
        assert again["unseen_acer"] == (again["unseen_apcer"] + again["bpcer"]) / 2
        log = next((exp / "logs" / stage).glob("*.log")).read_text()
        assert "unseen ACER" in log and "seen APCER" in log
    assert "unseen attack types (in val and test, never in train): 2D-Display-Phone, 3D-Mask" in log
    report_md = (exp / "report.md").read_text()
    assert "## Attack types never seen in training (test)" in report_md and "| 3D-Mask (unseen) |" in report_md
    assert f"| student (stage 2) | {final['test_acer']:.4f} | {final['test_seen_apcer']:.4f} |" in report_md


# ---------------------------------------------------------------------------------------------- out-of-fold soft labels


def read_folds(exp):
    with open(exp / "stage1_folds.csv") as f:
        return {row["path"]: int(row["fold"]) for row in csv.DictReader(f)}


def fold_teacher_probs(exp, fold, paths):
    """P(spoof), P(live) of the given train images by one fold's kept teacher, through the run's own face cache."""
    table = wfas_data.load_or_create_split(
        json.loads((exp / "stage1_config.json").read_text())["data_root"], exp, log=lambda _: None
    )
    train = table.of_split("train")
    rows = train.select(np.isin(train.paths(), paths))
    cache = face_cache.build_face_cache(table, exp / "face_cache", 64, log=lambda _: None, workers=0)
    net = timm.create_model("convnext_atto", num_classes=2)
    net.load_state_dict(load_file(exp / "checkpoints" / "stage1" / f"stage1_fold{fold}_best.safetensors"))
    images = torch.stack([wfas_data.FaceDataset(rows, 64, cache=cache)[i]["image"] for i in range(len(rows))])
    with torch.no_grad():
        probs = net.eval()(wfas_data.to_model_input(images, *networks.model_input(net)[1:])).softmax(-1)
    return dict(zip(rows.paths(), probs.tolist()))


@pytest.mark.slow
def test_every_soft_label_comes_from_the_teacher_that_never_trained_on_it(demo_root, tmp_path):
    exp = tmp_path / "EXP"
    results = train_stage1.main(
        ["--data_root", str(demo_root), "--output_dir", str(exp), *TINY_STAGE1, "--soft_label_folds", "3"]
    )
    folds, train = read_folds(exp), split_paths(exp, "train")
    assert sorted(folds) == sorted(train) and set(folds.values()) == {0, 1, 2}
    subjects = {}
    for path, fold in folds.items():  # a subject (its folder) lies in one fold
        subjects.setdefault(path.rsplit("/", 1)[0], set()).add(fold)
    assert all(len(f) == 1 for f in subjects.values())
    recorded = results["soft_label_folds"]["folds"]
    assert [f["train_images"] for f in recorded] == [sum(v != k for v in folds.values()) for k in range(3)]
    soft_labels = torch.load(exp / "stage1_soft_labels.pth", weights_only=True)
    assert set(soft_labels) == set(train)
    for fold in range(3):
        own = [p for p, f in folds.items() if f == fold]
        for path, probs in fold_teacher_probs(exp, fold, own).items():
            assert probs == pytest.approx(soft_labels[path], abs=1e-5), (fold, path)
    deployed = load_file(exp / "checkpoints" / "stage1" / "stage1_best.safetensors")
    assert results["soft_label_folds"]["deployed"].endswith(
        f"stage1_fold{np.argmin([f['val_acer'] for f in recorded])}_best.safetensors"
    )
    kept = load_file(results["soft_label_folds"]["deployed"])
    assert all(torch.equal(deployed[k], kept[k]) for k in kept)
    # the reported teacher is the fold teachers' mean, and the CSVs give its numbers back
    again, _ = recompute_groups(exp / "stage1_test_predictions.csv", results["threshold"])
    assert (
        again["acer"] == results["test"]["acer"]
        and "mean of 3 fold teachers" in next((exp / "logs" / "stage1").glob("*.log")).read_text()
    )


@pytest.mark.slow
def test_a_k_fold_run_killed_in_its_second_fold_resumes_there(demo_root, tmp_path):
    command = [
        sys.executable,
        "train_stage1.py",
        "--data_root",
        str(demo_root),
        *TINY_STAGE1,
        "--num_epochs",
        "2",
        "--soft_label_folds",
        "3",
    ]
    assert run_script(command + ["--output_dir", str(tmp_path / "A")]).returncode == 0
    killed = subprocess.Popen(
        command + ["--output_dir", str(tmp_path / "B")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    in_second_fold = False
    for line in killed.stdout:
        in_second_fold = in_second_fold or "Fold 1/3:" in line
        if in_second_fold and "epoch 1/2" in line:  # the second fold's first epoch, its state written
            killed.kill()
            break
    killed.wait()
    assert in_second_fold and not (tmp_path / "B" / "stage1_soft_labels.pth").exists()
    resumed = run_script(command + ["--output_dir", str(tmp_path / "B"), "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage1_fold0_latest: epoch 2 of 2 done" in resumed.stdout  # the first fold is not trained again
    assert "stage1_fold1_latest: epoch 1 of 2 done" in resumed.stdout
    assert "No saved state in" in resumed.stdout and "stage1_fold2_latest" in resumed.stdout
    runs = {run: json.loads((tmp_path / run / "stage1_results.json").read_text()) for run in "AB"}
    assert [f["updates"] for f in runs["A"]["soft_label_folds"]["folds"]] == [
        f["updates"] for f in runs["B"]["soft_label_folds"]["folds"]
    ]
    uninterrupted, after_resume = (
        torch.load(tmp_path / run / "stage1_soft_labels.pth", weights_only=True) for run in "AB"
    )
    assert uninterrupted == after_resume  # every image labelled by the same fold teacher, trained the same way
    assert read_folds(tmp_path / "A") == read_folds(tmp_path / "B")
    other = run_script(command[:-1] + ["2", "--output_dir", str(tmp_path / "B"), "--resume_from_checkpoint", "latest"])
    assert other.returncode == 2 and "--soft_label_folds 3: resume with it" in other.stderr
    assert "Traceback" not in other.stderr


@pytest.mark.slow
def test_folds_under_two_processes_label_every_train_image_once(demo_root, tmp_path):
    result = launch_two_processes(
        "train_stage1.py",
        ["--data_root", str(demo_root), "--output_dir", str(tmp_path), *TINY_STAGE1, "--soft_label_folds", "2"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    soft_labels = torch.load(tmp_path / "stage1_soft_labels.pth", weights_only=True)
    assert sorted(soft_labels) == sorted(split_paths(tmp_path, "train")) == sorted(read_folds(tmp_path))
    assert result.stdout.count("Fold ") >= 2
