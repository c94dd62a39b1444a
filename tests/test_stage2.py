import csv
import json
import shutil
import sys
import zipfile
from fractions import Fraction

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open

from conftest import (
    TINY_STAGE2,
    eer_pair_by_scikit_learn,
    launch_two_processes,
    metrics_by_loop,
    run_script,
    saved_model_probabilities,
    split_paths,
)
import train_stage2
import wfas_data
from tools import predict
from errors import UserError


def read_predictions(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return (
        [r["path"] for r in rows],
        np.array([int(r["label"]) for r in rows]),
        np.array([r["attack_type"] for r in rows]),
        np.array([float(r["score"]) for r in rows]),
    )


def test_the_predictions_hold_the_students_p_live_and_give_the_reported_numbers(quick_stage2_run, demo_root):
    exp, results = quick_stage2_run
    final = json.loads((exp / "final_results.json").read_text())
    checkpoint = exp / "checkpoints" / "stage2" / "stage2_best.safetensors"
    splits = wfas_data.read_split_csv(exp / "split.csv", demo_root)
    rows = {}
    for name in ("val", "test"):
        table = splits.of_split(name)
        paths, labels, attack_types, scores = read_predictions(exp / f"stage2_{name}_predictions.csv")
        assert paths == table.paths() and labels.tolist() == table.label.tolist()
        assert attack_types.tolist() == table.attack_types()
        # float32 in the run against float64 here
        assert np.allclose(scores, saved_model_probabilities(checkpoint, table)[:, 1], atol=1e-5)
        rows[name] = (scores, labels, attack_types)

    # the threshold is val's EER point, and test is scored at it
    val = metrics_by_loop(*rows["val"], final["threshold"])
    assert (val["apcer"], val["bpcer"]) == pytest.approx(eer_pair_by_scikit_learn(*rows["val"][:2]), abs=1e-12)
    assert final["val_acer"] == pytest.approx(val["acer"], abs=1e-12)
    test = metrics_by_loop(*rows["test"], final["threshold"])
    for key in ("acc", "apcer", "bpcer", "acer"):
        assert final[f"test_{key}"] == pytest.approx(test[key], abs=1e-12), key
    assert final["test_apcer_per_attack"] == pytest.approx(test["apcer_per_attack"])
    assert final["num_test_images"] == len(rows["test"][1])
    assert results["test_acer"] == final["test_acer"]


def test_the_submission_lists_every_image_in_list_order_with_the_students_p_live(quick_stage2_run, demo_root):
    exp, results = quick_stage2_run
    lines = [line.split(" ") for line in (exp / "submission.txt").read_text().splitlines()]
    assert all(len(line) == 2 and len(line[1].split(".")[1]) == 12 for line in lines)
    checkpoint = exp / "checkpoints" / "stage2" / "stage2_best.safetensors"
    expected_names = []
    expected_scores = []
    for name, list_file in (("dev", demo_root / "Dev" / "Dev.txt"), ("test", demo_root / "Test" / "Test.txt")):
        folder, names = wfas_data.read_prediction_list(list_file)
        assert names == list_file.read_text().split()
        expected_names += [f"{name}/{n}" for n in names]
        table = wfas_data.unlabelled_table(folder, names)
        expected_scores += saved_model_probabilities(checkpoint, table)[:, 1].tolist()
    assert [line[0] for line in lines] == expected_names
    assert np.allclose([float(line[1]) for line in lines], expected_scores, atol=1e-5)
    with zipfile.ZipFile(exp / "submission.zip") as zf:
        assert zf.namelist() == ["submission.txt"]
        assert zf.read("submission.txt").decode() == (exp / "submission.txt").read_text()
    assert results["submission_path"] == str(exp / "submission.txt")


@pytest.mark.slow
def test_outputs_exist_in_their_formats(stage2_run):
    exp, results = stage2_run
    best = exp / "checkpoints" / "stage2" / "stage2_best.safetensors"
    with safe_open(best, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["model_name"] == "maxvit_rmlp_pico_rw_256" and metadata["img_size"] == "64"
    assert (exp / "checkpoints" / "stage2" / "stage2_latest" / "training_state.json").is_file()
    optimizer = torch.load(exp / "checkpoints" / "stage2" / "stage2_latest" / "optimizer.bin", weights_only=True)
    assert optimizer["state"] and all(group["fused"] for group in optimizer["param_groups"])
    assert json.loads((exp / "stage2_config.json").read_text())["triplet_weight"] == 0.5
    log = max((exp / "logs" / "stage2").glob("stage2_training_*.log")).read_text()
    assert "focal" in log and "triplet" in log and "kd" in log and "0 fall back to their hard label" in log
    final = json.loads((exp / "final_results.json").read_text())
    for key in (
        "test_acc",
        "test_acer",
        "test_apcer",
        "test_bpcer",
        "test_auc",
        "test_apcer_per_attack",
        "threshold",
        "val_acer",
        "best_epoch",
        "num_test_images",
        "teacher_test_acer",
    ):
        assert key in final, key
    assert final["teacher_test_acer"] == json.loads((exp / "stage1_results.json").read_text())["test"]["acer"]
    assert results["test_acc"] == final["test_acc"] and results["test_acer"] == final["test_acer"]


@pytest.mark.slow
def test_predict_reproduces_the_submission_whatever_the_list_order(stage2_run, demo_root, tmp_path):
    exp, _ = stage2_run
    out = tmp_path / "PRED"
    result = run_script(
        [
            sys.executable,
            "tools/predict.py",
            "--output_dir",
            str(out),
            "--checkpoint",
            str(exp / "checkpoints" / "stage2" / "stage2_best.safetensors"),
            "--num_workers",
            "0",
            "--predict_lists",
            str(demo_root / "Test" / "Test.txt"),
            str(demo_root / "Dev" / "Dev.txt"),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [line.split() for line in (exp / "submission.txt").read_text().splitlines()]
    got = [line.split() for line in (out / "submission.txt").read_text().splitlines()]
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert np.allclose([float(g[1]) for g in got], [float(e[1]) for e in expected], atol=1e-5)


@pytest.mark.slow
def test_predict_without_a_checkpoint_is_a_clear_error(tmp_path, demo_root):
    result = run_script(
        [
            sys.executable,
            "tools/predict.py",
            "--output_dir",
            str(tmp_path),
            "--predict_lists",
            str(demo_root / "Dev" / "Dev.txt"),
        ]
    )
    assert result.returncode == 2 and "no checkpoint" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_missing_split_says_to_run_stage_1(tmp_path, demo_root):
    result = run_script(
        [sys.executable, "train_stage2.py", "--output_dir", str(tmp_path), "--data_root", str(demo_root), *TINY_STAGE2]
    )
    assert result.returncode == 2 and "run stage 1 first" in result.stderr and "Traceback" not in result.stderr


def splits_of(exp, demo_root):
    table = wfas_data.read_split_csv(exp / "split.csv", demo_root)
    return {name: table.of_split(name) for name in wfas_data.SPLITS}


@pytest.mark.slow
def test_foreign_soft_labels_are_refused(stage1_run, demo_root, tmp_path):
    exp = stage1_run[0]
    splits = splits_of(exp, demo_root)
    soft_labels = torch.load(exp / "stage1_soft_labels.pth", weights_only=True)

    with_val = {**soft_labels, splits["val"].paths()[0]: [0.5, 0.5]}
    torch.save(with_val, tmp_path / "with_val.pth")
    with pytest.raises(UserError, match="val/test images"):
        train_stage2.load_soft_labels(tmp_path / "with_val.pth", splits)

    partial = dict(list(soft_labels.items())[: len(soft_labels) // 2])
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="< 99%"):
        train_stage2.load_soft_labels(tmp_path / "partial.pth", splits)

    torch.save({p: [0.5] for p in soft_labels}, tmp_path / "one_number.pth")
    with pytest.raises(UserError, match="not \\[prob_spoof, prob_live\\]"):
        train_stage2.load_soft_labels(tmp_path / "one_number.pth", splits)

    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(UserError, match="not a soft-label file"):
        train_stage2.load_soft_labels(tmp_path / "list.pth", splits)


def table_of(paths, labels, split):
    n = len(paths)
    return wfas_data.SampleTable(
        root=".",
        path=np.array([p.encode() for p in paths]),
        label=np.array(labels, np.int8),
        attack_type=np.array([b"x"] * n),
        subject=np.array([b"s"] * n),
        has_bbox=np.ones(n, bool),
        split=np.full(n, split, np.int8),
    )


def test_soft_labels_align_with_the_train_dataset_and_fall_back_to_hard_labels(tmp_path):
    paths = [f"img{i}.jpg" for i in range(200)]
    labels = [i % 2 for i in range(200)]
    splits = {
        "train": table_of(paths, labels, 0),
        "val": table_of(["v.jpg"], [1], 1),
        "test": table_of(["t.jpg"], [0], 2),
    }
    soft_labels = {p: [0.25, 0.75] for p in reversed(paths[1:])}  # order of the file does not matter
    torch.save(soft_labels, tmp_path / "s.pth")
    targets, fallbacks = train_stage2.load_soft_labels(tmp_path / "s.pth", splits)
    assert fallbacks == 1 and targets.shape == (200, 2)
    assert targets[0].tolist() == [1.0, 0.0]  # img0 is spoof: its hard label
    assert torch.allclose(targets[1:], torch.tensor([0.25, 0.75]))
    del soft_labels["img5.jpg"], soft_labels["img6.jpg"]  # 3 of 200 missing: under 99%
    torch.save(soft_labels, tmp_path / "s.pth")
    with pytest.raises(UserError, match="< 99%"):
        train_stage2.load_soft_labels(tmp_path / "s.pth", splits)


def test_balanced_batches_hold_both_classes_and_depend_only_on_seed_and_epoch():
    labels = np.array([1] * 10 + [0] * 30)
    sampler = train_stage2.BalancedBatchSampler(labels, batch_size=8, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    for batch in batches:
        assert (labels[batch] == 1).sum() == 4 and (labels[batch] == 0).sum() == 4
    other_process = train_stage2.BalancedBatchSampler(labels, batch_size=8, seed=0)
    assert list(other_process) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_logits_and_embedding_come_from_one_forward():
    net = timm.create_model("maxvit_rmlp_pico_rw_256", num_classes=2, img_size=64).eval()
    model = train_stage2.LogitsAndEmbedding(net)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, embedding = model(images)
        assert torch.allclose(logits, net(images), atol=1e-5)
    assert embedding.shape == (2, net.num_features)


@pytest.mark.slow
def test_two_processes_count_every_test_image_once(stage1_run, demo_root, tmp_path):
    exp = tmp_path / "EXP"
    shutil.copytree(stage1_run[0], exp)
    result = launch_two_processes("train_stage2.py", ["--output_dir", str(exp), *TINY_STAGE2, "--batch_size", "6"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout + result.stderr
    test_paths = read_predictions(exp / "stage2_test_predictions.csv")[0]
    assert sorted(test_paths) == sorted(split_paths(exp, "test"))  # no padding duplicates, nothing lost
    assert json.loads((exp / "final_results.json").read_text())["num_test_images"] == len(split_paths(exp, "test"))


@pytest.mark.parametrize("balanced", [True, False])
def test_skipping_batches_replays_the_epoch_order(balanced):
    """What a mid-epoch resume relies on: with the seedable sampler (or our balanced sampler) an epoch's
    order depends only on the seed and the epoch, whatever the global RNG did meanwhile."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    data = list(range(100))
    if balanced:
        sampler = train_stage2.BalancedBatchSampler(np.array([1] * 40 + [0] * 60), batch_size=10, seed=0)
        loader = accelerator.prepare(torch.utils.data.DataLoader(data, batch_sampler=sampler))
    else:
        sampler = None
        loader = accelerator.prepare(torch.utils.data.DataLoader(data, batch_size=10, shuffle=True))

    def start_epoch(epoch):
        loader.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)

    start_epoch(2)
    full = [batch.tolist() for batch in loader]
    torch.manual_seed(1234)
    start_epoch(2)
    assert [batch.tolist() for batch in accelerator.skip_first_batches(loader, 4)] == full[4:]


# ---------------------------------------------------------------------------------------------- hardening


@pytest.mark.parametrize(
    "list_path, expected",
    [
        ("WFAS/Dev/Dev.txt", "dev"),
        ("lists/dev_list.txt", "dev"),
        ("WFAS/Test/list.txt", "test"),
        ("x/TEST-2023.txt", "test"),
    ],
)
def test_the_challenge_set_of_a_list_comes_from_its_name_or_folder(list_path, expected):
    assert predict.challenge_set(list_path) == expected


@pytest.mark.slow
def test_a_list_that_names_no_set_is_a_clear_error(stage2_run, demo_root, tmp_path):
    exp, _ = stage2_run
    with pytest.raises(UserError, match="dev or the test list"):
        predict.challenge_set(tmp_path / "lists" / "images.txt")
    (tmp_path / "dev_list.txt").write_text((demo_root / "Dev" / "Dev.txt").read_text())
    for name in (demo_root / "Dev" / "Dev.txt").read_text().split():
        (tmp_path / name).write_bytes((demo_root / "Dev" / "data" / name).read_bytes())
    result = run_script(
        [
            sys.executable,
            "tools/predict.py",
            "--output_dir",
            str(tmp_path),
            "--checkpoint",
            str(exp / "checkpoints" / "stage2" / "stage2_best.safetensors"),
            "--num_workers",
            "0",
            "--predict_lists",
            str(tmp_path / "dev_list.txt"),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(line.startswith("dev/") for line in (tmp_path / "submission.txt").read_text().splitlines())


@pytest.mark.slow
def test_soft_labels_are_checked_against_the_images_stage_1_could_decode(stage1_run, demo_root, tmp_path):
    exp = stage1_run[0]
    splits = splits_of(exp, demo_root)
    soft_labels = torch.load(exp / "stage1_soft_labels.pth", weights_only=True)
    broken = splits["train"].paths()[:2]  # 2 of ~70 images stage 1 could not decode: over 1%
    for path in broken:
        del soft_labels[path]
    torch.save(soft_labels, tmp_path / "stage1_soft_labels.pth")
    with pytest.raises(UserError, match="< 99%"):  # nothing says why they are missing: another run's file
        train_stage2.load_soft_labels(tmp_path / "stage1_soft_labels.pth", splits)
    results = json.loads((exp / "stage1_results.json").read_text())
    (tmp_path / "stage1_results.json").write_text(json.dumps({**results, "undecodable_train_images": broken}))
    targets, fallbacks = train_stage2.load_soft_labels(tmp_path / "stage1_soft_labels.pth", splits)
    assert fallbacks == 2 and targets.shape == (len(splits["train"]), 2)


def test_balanced_sampling_with_batches_of_one_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="--batch_size 2 or more"):
        train_stage2.parse_args(["--output_dir", str(tmp_path), "--batch_size", "1"])
    assert (
        train_stage2.parse_args(
            ["--output_dir", str(tmp_path), "--batch_size", "1", "--no-balanced_sampling"]
        ).batch_size
        == 1
    )


def three_splits(num_train=200):
    paths = [f"img{i}.jpg" for i in range(num_train)]
    return {
        "train": table_of(paths, [i % 2 for i in range(num_train)], 0),
        "val": table_of(["v.jpg"], [1], 1),
        "test": table_of(["t.jpg"], [0], 2),
    }


def test_soft_labels_of_images_stage_1_could_not_decode_may_be_missing(tmp_path):
    splits = three_splits()
    paths = splits["train"].paths()
    torch.save({p: [0.5, 0.5] for p in paths[3:]}, tmp_path / "stage1_soft_labels.pth")
    with pytest.raises(
        UserError, match="cover 197 of the 200 train images stage 1 could decode \\(< 99%\\).*this EXP folder$"
    ):
        train_stage2.load_soft_labels(tmp_path / "stage1_soft_labels.pth", splits)
    # stage 1 says it could not decode two of them: 197 of 198 is enough, and those 3 fall back to hard labels
    results = {"undecodable_train_images": paths[:2] + ["not/in/train.jpg"]}
    (tmp_path / "stage1_results.json").write_text(json.dumps(results))
    targets, fallbacks = train_stage2.load_soft_labels(tmp_path / "stage1_soft_labels.pth", splits)
    assert fallbacks == 3 and targets[:3].tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    # without stage 1's word on undecodable images (no results file, or one without the list): exactly 99% is enough
    (tmp_path / "alone").mkdir()
    torch.save({p: [0.5, 0.5] for p in paths[2:]}, tmp_path / "alone" / "stage1_soft_labels.pth")
    assert train_stage2.load_soft_labels(tmp_path / "alone" / "stage1_soft_labels.pth", splits)[1] == 2
    (tmp_path / "alone" / "stage1_results.json").write_text("{}")
    assert train_stage2.load_soft_labels(tmp_path / "alone" / "stage1_soft_labels.pth", splits)[1] == 2


def test_each_wrong_soft_label_file_is_one_line_that_says_what_to_do(tmp_path):
    splits = three_splits()
    good = {p: [0.5, 0.5] for p in splits["train"].paths()}
    with pytest.raises(
        UserError, match=f"no soft labels at {tmp_path / 'none.pth'}; run stage 1 first .*soft_labels_path"
    ):
        train_stage2.load_soft_labels(tmp_path / "none.pth", splits)
    (tmp_path / "text.pth").write_text("not a torch file\nsecond line")
    with pytest.raises(UserError, match="cannot read soft labels .*text.pth: [^\n]+$"):
        train_stage2.load_soft_labels(tmp_path / "text.pth", splits)
    torch.save({**good, "img0.jpg": Fraction(1, 2)}, tmp_path / "pickled.pth")  # not a weights-only object
    with pytest.raises(UserError, match="cannot read soft labels .*pickled.pth"):
        train_stage2.load_soft_labels(tmp_path / "pickled.pth", splits)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(UserError, match="is not a soft-label file: expected a dict \\{image path: \\[prob_spoof"):
        train_stage2.load_soft_labels(tmp_path / "list.pth", splits)
    torch.save({**good, "v.jpg": [0.1, 0.9], "t.jpg": [0.1, 0.9]}, tmp_path / "held_out.pth")
    with pytest.raises(
        UserError,
        match="contain 2 val/test images \\(e.g. v.jpg\\): they come from another run or split; use the stage 1 "
        "output of this EXP folder$",
    ):
        train_stage2.load_soft_labels(tmp_path / "held_out.pth", splits)
    torch.save({**good, "img7.jpg": "0.5 0.5"}, tmp_path / "text_entry.pth")
    with pytest.raises(UserError, match="the entry of img7.jpg is '0.5 0.5', not \\[prob_spoof, prob_live\\]"):
        train_stage2.load_soft_labels(tmp_path / "text_entry.pth", splits)
    torch.save({**good, "img7.jpg": [0.2, 0.3, 0.5]}, tmp_path / "three.pth")
    with pytest.raises(UserError, match="the entry of img7.jpg"):
        train_stage2.load_soft_labels(tmp_path / "three.pth", splits)
