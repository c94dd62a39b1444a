"""The offline face detector (face_detector.py), `tools/data.py detect`, and folder scoring of images without a bbox
file (--split_by image, for data without subjects, is tested in test_wfas_data.py).

The demo's faces are drawn shapes that a real detector need not find, so these tests use a real portrait: the one
matplotlib ships (grace_hopper.jpg, 512x600, one face), pasted at known places and scales into larger frames. The
reference box is the detector's own box on the portrait alone, moved and scaled as the portrait was."""

import csv
import re
import sys

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image

from conftest import REPO, TINY_STAGE1, run_script
import train_stage1
import wfas_data
from tools import data, export_onnx, predict
from errors import UserError
import face_detector
import networks

PORTRAIT = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")


@pytest.fixture(scope="module")
def detector():
    return face_detector.FaceDetector()


@pytest.fixture(scope="module")
def portrait_box(detector):
    found = detector.detect(np.asarray(PORTRAIT))
    assert len(found) == 1 and found[0][0] > 0.9
    return found[0][1][:2].reshape(4)


def iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def pasted(frame_size, at, scale, background=(96, 110, 128), portrait=PORTRAIT):
    """A frame with the portrait scaled and pasted at `at`, and the map from portrait to frame coordinates."""
    frame = Image.new("RGB", frame_size, background)
    size = (round(portrait.width * scale), round(portrait.height * scale))
    frame.paste(portrait.resize(size, Image.BICUBIC), at)
    return frame, lambda box: np.array(
        [
            at[0] + box[0] * size[0] / portrait.width,
            at[1] + box[1] * size[1] / portrait.height,
            at[0] + box[2] * size[0] / portrait.width,
            at[1] + box[3] * size[1] / portrait.height,
        ]
    )


@pytest.mark.parametrize(
    "frame_size, at, scale",
    [
        ((640, 480), (40, 30), 0.6),
        ((640, 480), (400, 250), 0.3),
        ((1920, 1080), (1000, 100), 1.5),
        ((1920, 1080), (100, 700), 0.5),
    ],
)
def test_the_face_is_found_where_the_portrait_was_pasted(detector, portrait_box, frame_size, at, scale):
    frame, to_frame = pasted(frame_size, at, scale)
    found = detector.detect(np.asarray(frame))
    assert len(found) == 1
    points = found[0][1]
    assert iou(points[:2].reshape(4), to_frame(portrait_box)) > 0.85
    x1, y1, x2, y2 = points[:2].reshape(4)
    assert all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in points[2:])  # the 5 landmarks lie in the box
    (left_eye, right_eye), mouth = points[2:4], points[5:7]
    assert left_eye[0] < right_eye[0] and mouth[:, 1].min() > max(left_eye[1], right_eye[1])  # WFAS's order


def test_frames_without_a_face_give_none(detector):
    rng = np.random.default_rng(0)
    assert detector.detect(np.full((480, 640, 3), 120, dtype=np.uint8)) == []
    assert detector.detect(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) == []


def test_a_grayscale_and_an_exif_rotated_face_are_found_upright(detector, portrait_box, tmp_path):
    frame, to_frame = pasted((640, 480), (300, 120), 0.5)
    frame.convert("L").save(tmp_path / "gray.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the pixels are stored turned the other way
    frame.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    for name in ("gray.jpg", "rotated.jpg"):
        image = face_detector.read_rgb(tmp_path / name)
        assert image.shape == (480, 640, 3), name  # as training sees it: RGB, EXIF-oriented
        found = detector.detect(image)
        assert len(found) == 1 and iou(found[0][1][:2].reshape(4), to_frame(portrait_box)) > 0.85, name


def write_frames(folder):
    """one.jpg (a face), sub/two.jpg (a large and a small face), empty.jpg (none), broken.jpg (not an image)."""
    (folder / "sub").mkdir(parents=True)
    one, to_one = pasted((640, 480), (200, 100), 0.5)
    one.save(folder / "one.jpg", quality=95)
    two, to_two = pasted((960, 540), (40, 40), 0.7)
    two.paste(PORTRAIT.resize((154, 180)), (700, 300))
    two.save(folder / "sub" / "two.jpg", quality=95)
    Image.new("RGB", (640, 480), (30, 140, 60)).save(folder / "empty.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return to_one, to_two


@pytest.mark.slow
def test_detect_writes_resumes_overwrites_and_counts(portrait_box, tmp_path):
    to_one, to_two = write_frames(tmp_path / "photos")
    summary = data.detect_boxes(tmp_path / "photos", workers=2, log=lambda _: None)
    assert summary == {
        **summary,
        "images": 4,
        "already_boxed": 0,
        "boxed_now": 2,
        "no_face": 1,
        "several_faces": 1,
        "undecodable": 1,
    }
    one = wfas_data.read_bbox(tmp_path / "photos" / "one.txt")  # the WFAS format: 7 lines of `x y`
    assert one.shape == (7, 2) and iou(one[:2].reshape(4), to_one(portrait_box)) > 0.85
    two = wfas_data.read_bbox(tmp_path / "photos" / "sub" / "two.txt")  # the larger of two faces
    assert iou(two[:2].reshape(4), to_two(portrait_box)) > 0.85
    assert not (tmp_path / "photos" / "empty.txt").exists() and not list(tmp_path.rglob("*.tmp"))
    (tmp_path / "photos" / "one.txt").write_text("10 10\n50 50\n20 20\n40 20\n30 30\n22 40\n38 40\n")  # kept
    again = data.detect_boxes(tmp_path / "photos", workers=1, log=lambda _: None)
    assert (again["already_boxed"], again["boxed_now"], again["no_face"]) == (2, 0, 1)
    assert wfas_data.read_bbox(tmp_path / "photos" / "one.txt")[0].tolist() == [10, 10]
    redone = data.detect_boxes(tmp_path / "photos", overwrite=True, workers=1, log=lambda _: None)
    assert (redone["already_boxed"], redone["boxed_now"]) == (0, 2)
    assert iou(wfas_data.read_bbox(tmp_path / "photos" / "one.txt")[:2].reshape(4), to_one(portrait_box)) > 0.85


@pytest.mark.slow
def test_the_detect_command_and_a_missing_detector_are_one_line(tmp_path, monkeypatch):
    write_frames(tmp_path / "photos")
    result = run_script(
        [sys.executable, "tools/data.py", "detect", "--data_root", str(tmp_path / "photos"), "--workers", "1"]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 bbox files written" in result.stdout and "1 images with no face" in result.stdout
    missing = run_script([sys.executable, "tools/data.py", "detect", "--data_root", str(tmp_path / "nothing")])
    assert missing.returncode == 2 and "is not a folder" in missing.stderr and "Traceback" not in missing.stderr
    monkeypatch.setitem(sys.modules, "retinaface", None)  # as if it were not installed
    with pytest.raises(UserError, match=re.escape(face_detector.INSTALL)):
        face_detector.FaceDetector()


@pytest.mark.slow
def test_own_photos_in_class_folders_are_detected_then_trained_on_split_by_image(tmp_path):
    """live/ and spoof/ folders of photos without box files, the common layout of one's own data."""
    own, rng = tmp_path / "own", np.random.default_rng(0)
    for folder, background in (("live", (96, 110, 128)), ("spoof", (170, 120, 60))):
        (own / folder).mkdir(parents=True)
        for i in range(12):
            frame, _ = pasted((320, 240), (int(rng.integers(0, 180)), int(rng.integers(0, 80))), 0.25, background)
            frame.save(own / folder / f"{i}.jpg")
    assert data.detect_boxes(own, workers=1, log=lambda _: None)["boxed_now"] == 24
    table = wfas_data.index_dataset(own)  # the folder itself: live/ is live, spoof/ the attack type "spoof"
    assert (
        sorted(set(zip(table.label.tolist(), table.attack_types(), table.subject.tolist())))
        == [(0, "spoof", b"spoof"), (1, "live", b"live")]
        and table.has_bbox.all()
    )
    flags = [
        "--data_root",
        str(own),
        "--output_dir",
        str(tmp_path / "EXP"),
        *TINY_STAGE1,
        "--batch_size",
        "4",
        "--val_fraction",
        "0.25",
        "--test_fraction",
        "0.25",
    ]
    with pytest.raises(UserError, match="pass --split_by image"):  # two folders: no subject to hold out
        train_stage1.main(flags)
    results = train_stage1.main([*flags, "--split_by", "image"])
    assert results["num_train_images"] == 12 and results["num_soft_labels"] == 12
    with open(tmp_path / "EXP" / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    detected = {r["path"]: wfas_data.read_bbox(own / r["path"].replace(".jpg", ".txt"))[:2].reshape(4) for r in rows}
    assert all(
        np.allclose([float(r[k]) for k in ("x1", "y1", "x2", "y2")], detected[r["path"]], atol=0.01) for r in rows
    )


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_folder_scoring_detects_faces_where_there_is_no_bbox_file(stage2_run, portrait_box, tmp_path):
    exp, _ = stage2_run
    folder = tmp_path / "photos"
    to_one, _ = write_frames(folder)
    boxed = pasted((640, 480), (60, 60), 0.4)[0]
    boxed.save(folder / "boxed.jpg", quality=95)
    (folder / "boxed.txt").write_text("100 100\n200 220\n130 150\n170 150\n150 180\n135 200\n165 200\n")
    args = [
        "--output_dir",
        str(tmp_path / "OUT"),
        "--checkpoint",
        str(networks.best_checkpoint(exp, 2)),
        "--predict_folder",
        str(folder),
        "--num_workers",
        "0",
    ]
    rows = read_rows(predict.main([*args, "--save_overlays", str(tmp_path / "overlays")])["folder_predictions"])
    by_path = {}
    for row in rows:
        by_path.setdefault(row["path"], []).append(row)
    assert sorted(by_path) == ["boxed.jpg", "broken.jpg", "empty.jpg", "one.jpg", "sub/two.jpg"]
    assert all(len(r) == 1 for r in by_path.values())  # the largest face only
    (boxed_row,), (one,), (empty,) = by_path["boxed.jpg"], by_path["one.jpg"], by_path["empty.jpg"]
    assert boxed_row["box_source"] == "bbox file" and [boxed_row[k] for k in ("x1", "y1", "x2", "y2")] == [
        "100.0",
        "100.0",
        "200.0",
        "220.0",
    ]
    assert one["box_source"] == "detector" and float(one["detector_score"]) > 0.9
    assert iou([float(one[k]) for k in ("x1", "y1", "x2", "y2")], to_one(portrait_box)) > 0.85
    assert empty["decision"] == "no_face" and empty["score"] == "" and empty["x1"] == ""  # never the whole frame
    assert by_path["broken.jpg"][0]["decision"] == "undecodable"
    # the detected face is scored on the crop around its box, as training crops around a WFAS box
    net, metadata, _ = networks.load_checkpoint(str(networks.best_checkpoint(exp, 2)), exp)
    box = np.array([float(one[k]) for k in ("x1", "y1", "x2", "y2")], dtype=np.float32)
    face = wfas_data.load_face(folder / "one.jpg", box, float(metadata["face_crop_scale"]), min_side=64)
    crop = wfas_data.eval_transform(64)(torch.from_numpy(np.array(face)).permute(2, 0, 1))
    with torch.no_grad():
        expected = net(wfas_data.to_model_input(crop[None], *networks.model_input(net)[1:])).softmax(-1)[0, 1].item()
    assert float(one["score"]) == pytest.approx(expected, abs=1e-5)
    overlays = sorted(p.relative_to(tmp_path / "overlays").as_posix() for p in (tmp_path / "overlays").rglob("*.jpg"))
    assert overlays == ["boxed.jpg", "empty.jpg", "one.jpg", "sub/two.jpg"]
    assert Image.open(tmp_path / "overlays" / "one.jpg").size == (640, 480)
    assert not np.array_equal(
        np.asarray(Image.open(tmp_path / "overlays" / "one.jpg")), np.asarray(Image.open(folder / "one.jpg"))
    )  # the box is drawn

    every = read_rows(predict.main([*args, "--all_faces"])["folder_predictions"])
    assert [r["face"] for r in every if r["path"] == "sub/two.jpg"] == ["0", "1"]
    whole = read_rows(predict.main([*args, "--whole_image"])["folder_predictions"])
    assert len(whole) == 5 and {r["box_source"] for r in whole if r["score"]} == {"whole image"}
    assert {r["decision"] for r in whole} <= {"live", "spoof", "undecodable"}


@pytest.mark.slow
def test_the_docs_deployment_snippet_detects_crops_and_scores(stage2_run, portrait_box, tmp_path):
    exp, _ = stage2_run
    onnx_path = tmp_path / "stage2_best.onnx"
    export_onnx.main(["--output_dir", str(tmp_path), "--checkpoint", str(networks.best_checkpoint(exp, 2))])
    pasted((640, 480), (200, 100), 0.5)[0].save(tmp_path / "photo.jpg", quality=95)
    readme = (REPO / "docs" / "deployment.md").read_text()
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "FaceDetector" in block)
    snippet = snippet.replace("EXP/stage2_best.onnx", str(onnx_path)).replace('"photo.jpg"', f'"{tmp_path}/photo.jpg"')
    result = run_script([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r})\n{snippet}"])
    assert result.returncode == 0, result.stderr[-3000:]
    p_live, decision = result.stdout.split()[-2:]
    scored = read_rows(
        predict.main(
            [
                "--output_dir",
                str(tmp_path / "OUT"),
                "--checkpoint",
                str(networks.best_checkpoint(exp, 2)),
                "--predict_folder",
                str(tmp_path),
                "--num_workers",
                "0",
            ]
        )["folder_predictions"]
    )
    row = next(r for r in scored if r["path"] == "photo.jpg")
    assert float(p_live) == pytest.approx(float(row["score"]), abs=1e-4) and decision == row["decision"]
