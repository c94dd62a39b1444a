import io
import json
import os
import re
import shutil
import signal
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script
import train_stage1
import wfas_data
from tools import data, make_demo
from wfas_data import LIVE, SPOOF, UserError

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def write_bbox(path, box=(20, 20, 60, 70)):
    x1, y1, x2, y2 = box
    points = [(x1, y1), (x2, y2), (30, 35), (50, 35), (40, 45), (32, 58), (48, 58)]
    path.write_text("".join(f"{x} {y}\n" for x, y in points))


def make_tree(root, live_subjects=3, spoof_types=("2D-Print-Photo", "3D-Mask"), images=2):
    """A minimal WFAS tree of flat grey images with bbox files."""
    for s in range(live_subjects):
        for i in range(images):
            folder = root / "Train" / "living" / f"s{s}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (80, 90), (120, 100, 90)).save(folder / f"{i}.jpg")
            write_bbox(folder / f"{i}.txt")
    for attack in spoof_types:
        for s in range(live_subjects):
            folder = root / "Train" / "spoof" / attack / f"s{s}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(images):
                Image.new("RGB", (80, 90), (90, 100, 120)).save(folder / f"{i}.jpg")
                write_bbox(folder / f"{i}.txt")
    return root


# ---------------------------------------------------------------------------------------------- bbox and crop


@pytest.mark.parametrize("box", [(60, 70, 20, 20), (-30, -40, 50, 60), (40, 50, 500, 600), (20, 70, 60, 20)])
def test_crop_box_normalises_reversed_negative_and_outside_boxes(box):
    left, top, right, bottom = wfas_data.face_crop_box(np.array(box, dtype=np.float32), 80, 90, scale=1.5)
    assert 0 <= left < right <= 80 and 0 <= top < bottom <= 90
    assert right - left == pytest.approx(bottom - top)  # square


def test_crop_box_expands_by_scale_and_stays_centred():
    assert wfas_data.face_crop_box(np.array([30, 30, 50, 50.0]), 200, 200, scale=1.5) == pytest.approx((25, 25, 55, 55))


def test_crop_box_without_usable_box_is_the_whole_image():
    assert wfas_data.face_crop_box(None, 80, 90) == (0, 0, 80, 90)
    assert wfas_data.face_crop_box(np.full(4, np.nan), 80, 90) == (0, 0, 80, 90)  # no bbox file
    degenerate = np.array([200, 200, 300, 300.0])  # entirely outside
    assert wfas_data.face_crop_box(degenerate, 80, 90) == (0, 0, 80, 90)


@pytest.mark.parametrize("text", ["", "1 2\n3 4\n", "a b\n" * 7, "1 2 3\n" * 7, "nan 1\n" + "1 2\n" * 6])
def test_malformed_bbox_files_read_as_none(tmp_path, text):
    (tmp_path / "x.txt").write_text(text)
    assert wfas_data.read_bbox(tmp_path / "x.txt") is None


def test_missing_bbox_file_reads_as_none_and_valid_one_parses(tmp_path):
    assert wfas_data.read_bbox(tmp_path / "missing.txt") is None
    write_bbox(tmp_path / "ok.txt")
    assert wfas_data.read_bbox(tmp_path / "ok.txt").shape == (7, 2)


# ---------------------------------------------------------------------------------------------- image quirks


def dataset_of(folder, names, img_size=32):
    table = wfas_data.unlabelled_table(folder, names)
    return wfas_data.FaceDataset(table, img_size)


def test_grayscale_cmyk_and_png_named_jpg_decode_to_rgb(tmp_path):
    Image.new("L", (64, 64), 128).save(tmp_path / "gray.jpg")
    Image.new("CMYK", (64, 64), (0, 50, 100, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("RGBA", (64, 64), (10, 20, 30, 255)).save(tmp_path / "png.jpg", format="PNG")
    dataset = dataset_of(tmp_path, ["gray.jpg", "cmyk.jpg", "png.jpg"])
    for item in dataset:
        assert item["ok"], item["error"]
        assert item["image"].shape == (3, 32, 32)


def test_exif_rotation_is_applied_before_the_bbox_crop(tmp_path):
    # Stored 100x60 landscape with orientation 6 (rotate 90 clockwise): the upright image is 60x100.
    # The bbox is in upright coordinates around a red square at the top of the upright image.
    upright = Image.new("RGB", (60, 100), (0, 0, 255))
    upright.paste((255, 0, 0), (20, 5, 40, 25))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # undo of orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    (tmp_path / "rotated.txt").write_text("20 5\n40 25\n" + "30 15\n" * 5)
    box = wfas_data.unlabelled_table(tmp_path, ["rotated.jpg"]).box[0]
    face = wfas_data.load_face(tmp_path / "rotated.jpg", box, face_crop_scale=1.0)
    r, g, b = np.asarray(face).reshape(-1, 3).mean(axis=0)
    assert face.size == (20, 20) and r > 200 and b < 60


def test_large_jpeg_is_decoded_reduced_but_crops_the_same_region(tmp_path):
    image = Image.new("RGB", (800, 800), (0, 0, 255))
    image.paste((255, 0, 0), (200, 200, 600, 600))
    image.save(tmp_path / "big.jpg", quality=95)
    face = wfas_data.load_face(tmp_path / "big.jpg", np.array([200, 200, 600, 600.0]), face_crop_scale=1.0, min_side=64)
    assert 64 <= face.size[0] < 400  # decoded at a reduced scale, still at least min_side
    r, g, b = np.asarray(face).reshape(-1, 3).mean(axis=0)
    assert r > 200 and b < 60


def test_truncated_and_empty_images_are_reported_not_raised(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "good.jpg")
    data = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    good, truncated, empty = dataset_of(tmp_path, ["good.jpg", "truncated.jpg", "empty.jpg"])
    assert good["ok"]
    for item, name in ((truncated, "truncated.jpg"), (empty, "empty.jpg")):
        assert not item["ok"] and name in item["error"]
        assert torch.equal(item["image"], torch.zeros(3, 32, 32, dtype=torch.uint8))


def test_index_ignores_non_images_and_counts_missing_bbox(tmp_path):
    root = make_tree(tmp_path / "WFAS")
    (root / "Train" / "living" / ".DS_Store").write_bytes(b"\0\0")
    (root / "Train" / "living" / "s0" / "notes.md").write_text("hi")
    (root / "Train" / "living" / "s0" / "0.txt").unlink()
    table = wfas_data.index_wfas(root)
    assert len(table) == 18
    assert not any(p.endswith((".md", ".DS_Store", ".txt")) for p in table.paths())
    assert int((~table.has_bbox).sum()) == 1
    assert set(np.unique(table.attack_type)) == {b"live", b"2D-Print-Photo", b"3D-Mask"}
    # the same subject folder name under two attack types is two subjects
    assert len(np.unique(np.char.add(table.attack_type, table.subject))) == 9


def test_data_root_may_be_train_itself(tmp_path):
    root = make_tree(tmp_path / "WFAS")
    assert wfas_data.resolve_data_root(root / "Train") == root
    assert len(wfas_data.index_wfas(root / "Train")) == len(wfas_data.index_wfas(root))


def test_labelled_list_file(tmp_path):
    root = make_tree(tmp_path / "WFAS")
    lines = ["Train/living/s0/0.jpg 1", "Train/spoof/3D-Mask/s1/0.jpg 0 3D-Mask", "# comment", ""]
    (root / "list.txt").write_text("\n".join(lines))
    table = wfas_data.index_dataset(root / "list.txt")
    assert table.paths() == ["Train/living/s0/0.jpg", "Train/spoof/3D-Mask/s1/0.jpg"]
    assert table.label.tolist() == [LIVE, SPOOF]
    assert table.attack_types() == ["live", "3D-Mask"]
    (root / "bad.txt").write_text("Train/living/s0/0.jpg live\n")
    with pytest.raises(UserError, match="bad.txt:1"):
        wfas_data.index_dataset(root / "bad.txt")


# ---------------------------------------------------------------------------------------------- splits


def test_split_is_subject_disjoint_stratified_and_deterministic(demo_root):
    table = wfas_data.assign_splits(wfas_data.index_wfas(demo_root), 0.2, 0.2, seed=3)
    again = wfas_data.assign_splits(wfas_data.index_wfas(demo_root), 0.2, 0.2, seed=3)
    other = wfas_data.assign_splits(wfas_data.index_wfas(demo_root), 0.2, 0.2, seed=4)
    assert np.array_equal(table.split, again.split)
    assert not np.array_equal(table.split, other.split)
    subjects = np.char.add(table.attack_type, table.subject)
    for subject in np.unique(subjects):
        assert len(np.unique(table.split[subjects == subject])) == 1
    for attack_type in np.unique(table.attack_type):  # every type is in train and in the held-out splits
        splits = set(table.split[table.attack_type == attack_type].tolist())
        assert 0 in splits and splits & {1, 2}
    val_share = (table.split == 1).mean()
    assert 0.1 < val_share < 0.35


def test_split_csv_is_written_once_and_reused(demo_root, tmp_path):
    table = wfas_data.load_or_create_split(
        demo_root, tmp_path, val_fraction=0.1, test_fraction=0.1, seed=0, log=lambda _: None
    )
    text = (tmp_path / "split.csv").read_text()
    assert text.splitlines()[0] == "path,label,attack_type,subject,split,x1,y1,x2,y2,box_space,source,video"
    reused = wfas_data.load_or_create_split(
        demo_root, tmp_path, val_fraction=0.5, test_fraction=0.3, seed=9, log=lambda _: None
    )
    assert (tmp_path / "split.csv").read_text() == text
    assert reused.paths() == table.paths() and np.array_equal(reused.split, table.split)
    # the boxes read once at indexing travel in split.csv: the demo's one image without a bbox file has none
    assert np.array_equal(reused.box, table.box, equal_nan=True)
    assert int(np.isnan(reused.box[:, 0]).sum()) == 1 and not np.isnan(table.box[:, 0][table.has_bbox]).any()
    assert all((demo_root / p).is_file() for p in reused.paths())


def test_datasets_of_a_split_give_uint8_crops_normalised_on_the_device(demo_root, tmp_path):
    table = wfas_data.load_or_create_split(demo_root, tmp_path, log=lambda _: None)
    datasets = wfas_data.build_datasets(table, 48, train_stage1.train_transform(48))
    assert sum(len(d) for d in datasets.values()) == len(table)
    item = datasets["train"][0]
    assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.uint8
    assert item["ok"] and item["label"] in (0, 1)
    assert datasets["train"].transform is not datasets["val"].transform  # only train is augmented
    first, second = datasets["val"][0]["image"], datasets["val"][0]["image"]
    assert torch.equal(first, second)  # evaluation is deterministic
    batch = torch.stack([datasets["val"][i]["image"] for i in range(4)])
    normalised = wfas_data.to_model_input(batch, MEAN, STD)
    assert normalised.dtype == torch.float32 and torch.allclose(normalised, batch / 127.5 - 1, atol=1e-6)
    torch.manual_seed(0)
    jittered = wfas_data.to_model_input(batch, MEAN, STD, color_jitter=0.1)
    assert jittered.shape == batch.shape and not torch.allclose(jittered, normalised)
    assert (jittered - normalised).abs().max() < 0.5 and jittered.min() >= -1 and jittered.max() <= 1


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.slow
def test_missing_data_root_is_one_line_exit_2(tmp_path):
    result = run_script([sys.executable, "tools/data.py", "check", "--data_root", str(tmp_path / "nope")])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_empty_or_wrong_folder_is_one_line_exit_2(tmp_path):
    result = run_script([sys.executable, "tools/data.py", "check", "--data_root", str(tmp_path)])
    assert result.returncode == 2 and "Train/living" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "Train" / "living").mkdir(parents=True)
    result = run_script([sys.executable, "tools/data.py", "check", "--data_root", str(tmp_path)])
    assert result.returncode == 2 and "no images found" in result.stderr and "Traceback" not in result.stderr


def test_one_class_only_is_refused_for_training(tmp_path):
    root = make_tree(tmp_path / "WFAS", spoof_types=())
    with pytest.raises(UserError, match="0 spoof"):
        wfas_data.load_or_create_split(root, tmp_path / "exp", log=lambda _: None)


# ---------------------------------------------------------------------------------------------- check, make_demo


@pytest.mark.slow
def test_check_json_summary_and_verify_images(demo_root, tmp_path):
    result = run_script([sys.executable, "tools/data.py", "check", "--data_root", str(demo_root), "--json"])
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    table = wfas_data.index_wfas(demo_root)
    assert summary["num_images"] == len(table) == summary["num_live"] + summary["num_spoof"]
    assert summary["missing_bbox"] == 1 and summary["bad_bbox"] == 0
    assert set(summary["attack_types"]) == set(make_demo.DEMO_ATTACK_TYPES)
    assert summary["num_subjects"] == 12 + 6 * 9
    assert summary["prediction_lists"] == {"Dev/Dev.txt": 6, "Test/Test.txt": 6}
    assert "unreadable" not in summary

    root = make_tree(tmp_path / "WFAS")
    (root / "Train" / "living" / "s1" / "1.jpg").write_bytes(b"not a jpeg")
    (root / "Train" / "living" / "s2" / "0.txt").write_text("garbage\n")
    summary = data.check_dataset(root, verify_images=True)
    assert summary["unreadable"] == ["Train/living/s1/1.jpg"]
    assert summary["bad_bbox"] == 1 and summary["missing_bbox"] == 0
    text = run_script([sys.executable, "tools/data.py", "check", "--data_root", str(root)]).stdout
    assert "malformed bbox files         1" in text and "3D-Mask" in text


@pytest.mark.slow
def test_make_demo_writes_the_wfas_layout(tmp_path):
    result = run_script([sys.executable, "tools/make_demo.py", str(tmp_path / "demo"), "--subjects", "6"])
    assert result.returncode == 0, result.stderr
    assert "Wrote a generated demo dataset" in result.stdout
    root = tmp_path / "demo"
    assert sorted(p.name for p in (root / "Train" / "spoof").iterdir() if p.is_dir()) == sorted(
        make_demo.DEMO_ATTACK_TYPES
    )
    assert not list(root.rglob("*.tmp"))  # every file written aside and renamed
    again = run_script([sys.executable, "tools/make_demo.py", str(tmp_path / "same"), "--subjects", "6"])
    assert again.returncode == 0
    assert all(
        (tmp_path / "same" / p.relative_to(root)).read_bytes() == p.read_bytes() for p in root.rglob("*") if p.is_file()
    )  # a seed gives the same dataset
    refused = run_script([sys.executable, "tools/make_demo.py", str(tmp_path / "small"), "--subjects", "2"])
    assert refused.returncode == 2 and "at least 3" in refused.stderr and "Traceback" not in refused.stderr
    names = (root / "Dev" / "Dev.txt").read_text().split()
    assert all(
        (root / "Dev" / "data" / n).is_file() and (root / "Dev" / "data" / n).with_suffix(".txt").is_file()
        for n in names
    )
    folder, listed = wfas_data.read_prediction_list(root / "Test" / "Test.txt")
    assert folder == root / "Test" / "data" and len(listed) == 24


# ---------------------------------------------------------------------------------------------- prediction lists


def test_prediction_list_entries_may_carry_the_set_folder(tmp_path):
    (tmp_path / "dev").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "dev" / "000001.jpg")
    (tmp_path / "dev" / "dev.txt").write_text("dev/000001.jpg\n")
    folder, names = wfas_data.read_prediction_list(tmp_path / "dev" / "dev.txt")
    assert folder == tmp_path and names == ["dev/000001.jpg"]
    with pytest.raises(UserError, match="cannot find"):
        (tmp_path / "dev" / "other.txt").write_text("missing.jpg\n")
        wfas_data.read_prediction_list(tmp_path / "dev" / "other.txt")


# ---------------------------------------------------------------------------------------------- hardening


def test_a_missing_or_unreadable_file_is_a_storage_error_not_a_skipped_image(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "good.jpg")
    (tmp_path / "folder.jpg").mkdir()  # reading it fails in the OS (EISDIR), as EIO or a stale handle would
    good, missing, unreadable = dataset_of(tmp_path, ["good.jpg", "gone.jpg", "folder.jpg"])
    assert good["ok"] and good["error_kind"] == ""
    for item, name in ((missing, "gone.jpg"), (unreadable, "folder.jpg")):
        assert not item["ok"] and item["error_kind"] == "storage" and name in item["error"]
    batch = torch.utils.data.default_collate([good, missing])
    with pytest.raises(UserError, match="gone.jpg .*check that --data_root is right"):
        wfas_data.check_batch(batch, log_warning=print)


def test_too_many_undecodable_images_stop_the_run():
    wfas_data.check_undecodable_share(2, 117)  # a few broken files in a small set: logged and skipped
    wfas_data.check_undecodable_share(9, 10)
    wfas_data.check_undecodable_share(100, 100_000)
    with pytest.raises(UserError, match="cannot be decoded"):
        wfas_data.check_undecodable_share(10, 10)
    with pytest.raises(UserError, match="over 1%"):
        wfas_data.check_undecodable_share(1001, 100_000)


def test_a_split_is_not_reused_for_other_data_or_once_its_files_are_gone(demo_root, tmp_path):
    exp = tmp_path / "EXP"
    table = wfas_data.load_or_create_split(demo_root, exp, log=lambda _: None)
    record = json.loads((exp / "split_source.json").read_text())
    assert record == {
        "data_root": f"wfas:{demo_root.resolve()}",
        "num_images": len(table),
        "unseen_attacks": [],
        "split_by": "subject",
        "protocols": {},
    }
    other = make_tree(tmp_path / "OTHER", live_subjects=4)
    with pytest.raises(UserError, match="was made from .* not .*OTHER"):
        wfas_data.load_or_create_split(other, exp, log=lambda _: None)
    moved = tmp_path / "MOVED"
    shutil.copytree(demo_root, moved)
    for path in table.paths()[::2]:
        (moved / path).unlink()
    record["data_root"] = str(moved)  # what the user does for data that moved: then its files are checked
    (exp / "split_source.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="images of .*split.csv are missing"):
        wfas_data.load_or_create_split(moved, exp, log=lambda _: None)


def write_live_and_spoof_folders(root):
    """The common live/*.jpg + spoof/*.jpg layout and its labelled list: one "subject" per class."""
    for label, folder in ((1, "live"), (0, "spoof")):
        (root / folder).mkdir()
        for i in range(20):
            Image.new("RGB", (32, 32), (label * 200, 50, 50)).save(root / folder / f"{i}.jpg")
    lines = [f"{folder}/{i}.jpg {label}" for label, folder in ((1, "live"), (0, "spoof")) for i in range(20)]
    (root / "list.txt").write_text("\n".join(lines) + "\n")


def test_held_out_splits_without_both_classes_are_refused_before_training(tmp_path):
    write_live_and_spoof_folders(tmp_path)  # nothing to hold out
    with pytest.raises(UserError, match="val split .* holds 0 live and 0 spoof images.*subject column"):
        wfas_data.load_or_create_split(tmp_path / "list.txt", tmp_path / "EXP", log=lambda _: None)
    assert not (tmp_path / "EXP" / "split.csv").exists()
    # the optional subject column splits it properly: one person per 2 images
    lines = [
        f"{folder}/{i}.jpg {label} {folder} person{label}_{i // 2}"
        for label, folder in ((1, "live"), (0, "spoof"))
        for i in range(20)
    ]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    table = wfas_data.load_or_create_split(
        tmp_path / "list.txt", tmp_path / "EXP", val_fraction=0.2, test_fraction=0.2, log=lambda _: None
    )
    for name in ("val", "test"):
        assert set(table.of_split(name).label.tolist()) == {LIVE, SPOOF}
    assert len(np.unique(table.subject)) == 20


def test_data_without_subjects_splits_by_image_with_a_warning(tmp_path):
    write_live_and_spoof_folders(tmp_path)
    with pytest.raises(UserError, match="pass --split_by image"):
        wfas_data.load_or_create_split(tmp_path / "list.txt", tmp_path / "EXP", log=lambda _: None)
    logged = []
    table = wfas_data.load_or_create_split(
        tmp_path / "list.txt",
        tmp_path / "EXP",
        val_fraction=0.2,
        test_fraction=0.2,
        log=logged.append,
        split_by="image",
    )
    for name in ("val", "test"):
        assert set(table.of_split(name).label.tolist()) == {0, 1}
    record = json.loads((tmp_path / "EXP" / "split_source.json").read_text())
    assert record["split_by"] == "image" and "both train and test" in record["warning"]
    assert any(line.startswith("warning:") and "split by image" in line for line in logged)
    with pytest.raises(UserError, match="made with --split_by image, not subject"):
        wfas_data.load_or_create_split(tmp_path / "list.txt", tmp_path / "EXP", split_by="subject")
    assert wfas_data.load_or_create_split(tmp_path / "list.txt", tmp_path / "EXP", log=logged.append) is not None


class WorkerPid(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return os.getpid()


def test_loader_workers_persist_across_epochs_ignore_stop_signals_and_shut_down():
    loader = wfas_data.Loaders(batch_size=2, num_workers=1).make(WorkerPid(), persistent=True)
    first = {int(pid) for batch in loader for pid in batch}
    assert len(first) == 1 and first != {os.getpid()}
    worker = first.pop()
    os.kill(worker, signal.SIGTERM)  # a scheduler signals every process of the job, workers too
    assert {int(pid) for batch in loader for pid in batch} == {worker}  # the next epoch: the same worker, alive
    wfas_data.Loaders.shut_down(loader)
    assert loader._iterator is None
    with pytest.raises(ProcessLookupError):
        for _ in range(100):  # shut down: the process is gone (joined)
            os.kill(worker, 0)
            time.sleep(0.05)


def test_a_loader_with_fewer_images_than_a_batch_is_a_clear_error():
    with pytest.raises(UserError, match="fewer than one batch of 8; lower --batch_size"):
        wfas_data.Loaders(batch_size=8, num_workers=0).make(WorkerPid(), shuffle=True)


# ---------------------------------------------------------------------------------------------- the split rule


def listed_table(tmp_path, subjects_per_type, seed=0):
    """A labelled list of subjects of uneven sizes (1 to 6 images), no image files needed to split it."""
    rng = np.random.default_rng(seed)
    lines = []
    for attack_type, num_subjects in subjects_per_type.items():
        label = 1 if attack_type == "live" else 0
        for s in range(num_subjects):
            for i in range(int(rng.integers(1, 7))):
                lines.append(f"{attack_type}/{s}/{i}.jpg {label} {attack_type} {attack_type}{s}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return wfas_data.index_labelled_list(tmp_path / "list.txt")


SUBJECTS = {"live": 12, "print": 10, "replay": 8, "mask": 3, "cut": 2, "glasses": 1}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("val_fraction, test_fraction", [(0.15, 0.3), (0.3, 0.1), (0.0, 0.25), (0.2, 0.0)])
def test_the_split_fills_val_then_test_to_their_shares_subject_by_subject(tmp_path, seed, val_fraction, test_fraction):
    """Within a type, whole subjects go to val until it holds its share, then to test, the rest to train, the last
    subject always training; a type of 1 or 2 subjects only trains; held-out types never train and share val and
    test in the val:test proportion."""
    held_out = ("replay",) if val_fraction and test_fraction else ()
    table = wfas_data.assign_splits(listed_table(tmp_path, SUBJECTS, seed), val_fraction, test_fraction, seed, held_out)
    types = table.attack_types()
    for attack_type in SUBJECTS:
        sizes = {}
        split_of = {}
        for i in [i for i, t in enumerate(types) if t == attack_type]:
            subject = table.subject[i]
            sizes[subject] = sizes.get(subject, 0) + 1
            assert split_of.setdefault(subject, int(table.split[i])) == table.split[i]  # one split per subject
        images = {
            name: sum(n for s, n in sizes.items() if split_of[s] == k)
            for k, name in enumerate(["train", "val", "test"])
        }
        subjects = {name: [s for s in sizes if split_of[s] == k] for k, name in enumerate(["train", "val", "test"])}
        total = sum(sizes.values())
        if attack_type in held_out:
            shares = {"val": val_fraction / (val_fraction + test_fraction)}
            assert images["train"] == 0 and images["val"] + images["test"] == total
        elif len(sizes) <= 2:
            assert images["train"] == total
            continue
        else:
            shares = {"val": val_fraction, "test": test_fraction}
            assert len(subjects["train"]) >= 1
        for name, share in shares.items():
            target = share * total
            largest = max((sizes[s] for s in subjects[name]), default=0)
            assert images[name] - largest < target or images[name] == 0 == target  # no subject past its share
            if name == "val" or len(subjects["train"]) > 1:  # filled, unless the subjects ran out before it
                assert images[name] >= target
    assert table.unseen_attacks == held_out


@pytest.mark.parametrize(
    "val_fraction, test_fraction",
    [(-0.1, 0.2), (0.2, -0.1), (0.5, 0.5), (0.9, 0.6), (1.0, 0.0), (0.0, 1.0)],
)
def test_fractions_that_leave_nothing_to_train_on_are_one_line(tmp_path, val_fraction, test_fraction):
    table = listed_table(tmp_path, SUBJECTS)
    with pytest.raises(
        UserError,
        match=f"--val_fraction {val_fraction} and --test_fraction {test_fraction} must be >= 0 and leave images "
        "for training \\(sum < 1\\)$",
    ):
        wfas_data.assign_splits(table, val_fraction, test_fraction)


def test_held_out_types_must_exist_and_leave_a_type_to_train_and_splits_to_hold_them(tmp_path):
    table = listed_table(tmp_path, SUBJECTS)
    with pytest.raises(
        UserError,
        match="--unseen_attacks bogus,fake: not an attack type of this data "
        "\\(its types: cut, glasses, mask, print, replay\\)",
    ):
        wfas_data.assign_splits(table, 0.2, 0.2, unseen_attacks=("fake", "bogus", "print"))
    message = (
        "--unseen_attacks holds out every attack type, or --val_fraction and --test_fraction are 0: train needs an "
        "attack type and the held-out ones need val and test; hold out fewer"
    )
    with pytest.raises(UserError, match=re.escape(message)):
        wfas_data.assign_splits(table, 0.2, 0.2, unseen_attacks=("cut", "glasses", "mask", "print", "replay"))
    with pytest.raises(UserError, match=re.escape(message)):
        wfas_data.assign_splits(table, 0.0, 0.0, unseen_attacks=("print",))


def test_a_held_out_split_without_both_classes_is_refused_naming_what_it_holds(tmp_path):
    table = wfas_data.assign_splits(listed_table(tmp_path, SUBJECTS), 0.2, 0.2)
    wfas_data.check_held_out_splits(table, "DATA")  # both classes in val and test
    table.label[(table.split == 2) & (table.label == 0)] = 1  # test left with live images only
    with pytest.raises(
        UserError,
        match="the test split of DATA holds \\d+ live and 0 spoof images, but needs both; .*\\d+ live and \\d+ spoof "
        "subjects.*subject column \\(`path label attack_type subject`\\), or raise --val_fraction / --test_fraction, "
        "or, with no subjects to keep apart, pass --split_by image$",
    ):
        wfas_data.check_held_out_splits(table, "DATA")
    table.label[table.split == 1] = 0  # val: spoof only, found first
    with pytest.raises(UserError, match="the val split of DATA holds 0 live"):
        wfas_data.check_held_out_splits(table, "DATA")


def test_split_csv_round_trips_every_column_and_refuses_what_is_not_one(tmp_path):
    table = wfas_data.assign_splits(listed_table(tmp_path, SUBJECTS), 0.2, 0.2)
    table.box[::3] = np.nan  # images without a face box
    table.box[1::3] = [10.5, 20.25, 130.125, 170.0625]
    wfas_data.write_split_csv(table, tmp_path / "split.csv")
    back = wfas_data.read_split_csv(tmp_path / "split.csv", tmp_path)
    assert back.paths() == table.paths() and back.attack_types() == table.attack_types()
    assert back.label.dtype == np.int8 and np.array_equal(back.label, table.label)
    assert back.split.dtype == np.int8 and np.array_equal(back.split, table.split)
    assert np.array_equal(back.subject, table.subject)
    assert np.array_equal(back.box, table.box, equal_nan=True)
    assert np.array_equal(back.has_bbox, ~np.isnan(table.box[:, 0]))
    assert "\r" not in (tmp_path / "split.csv").read_bytes().decode().replace("\r\n", "")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(
        UserError,
        match="empty.csv is not a split file: expected the columns path,label,attack_type,subject,split,x1,y1,x2,y2,"
        "box_space,source,video$",
    ):
        wfas_data.read_split_csv(tmp_path / "empty.csv", tmp_path)
    header = ",".join(wfas_data.SPLIT_COLUMNS + wfas_data.BOX_COLUMNS + wfas_data.SOURCE_COLUMNS)
    (tmp_path / "header.csv").write_text(header + "\n")
    assert len(wfas_data.read_split_csv(tmp_path / "header.csv", tmp_path)) == 0
    (tmp_path / "damaged.csv").write_text(f"{header}\na.jpg,1,live,s,far,,,,,,wfas,\n")
    with pytest.raises(UserError, match="damaged.csv is damaged \\(.*\\); delete it to recompute the split$"):
        wfas_data.read_split_csv(tmp_path / "damaged.csv", tmp_path)


def test_a_split_csv_without_its_box_columns_or_its_record_is_refused(tmp_path, demo_root):
    exp = tmp_path / "EXP"
    wfas_data.load_or_create_split(demo_root, exp, log=lambda _: None)
    lines = (exp / "split.csv").read_text().splitlines()
    (tmp_path / "five.csv").write_text("\n".join(",".join(line.split(",")[:5]) for line in lines) + "\n")
    with pytest.raises(UserError, match="five.csv is not a split file: expected the columns"):
        wfas_data.read_split_csv(tmp_path / "five.csv", demo_root)
    (exp / "split_source.json").unlink()
    with pytest.raises(
        UserError, match="split.csv has no split_source.json beside it to say which data it splits: delete split.csv"
    ):
        wfas_data.load_or_create_split(demo_root, exp, log=lambda _: None)
