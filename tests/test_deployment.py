"""After training: ONNX export and its parity check, scoring a folder of images, operating points and the
compute budget."""

import csv
import json
import shutil
import sys

import numpy as np
import onnx  # requirements-test.txt: the export is optional for users, not for the tests
import onnxruntime
import pytest
import timm
import torch
from conftest import launch_two_processes, run_script
import train_stage2
import wfas_data
from tools import export_onnx, predict
from errors import UserError
import evaluation
import networks


def copy_experiment(exp, destination):
    """The files an export or a prediction reads, without the caches, logs and training states."""
    return shutil.copytree(exp, destination, ignore=shutil.ignore_patterns("face_cache", "logs", "plots", "*_latest"))


def checkpoint_of(exp, stage):
    return exp / "checkpoints" / stage / f"{stage}_best.safetensors"


# ---------------------------------------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_student_exports_with_parity_on_val_images_and_its_metadata(stage2_run, tmp_path):
    exp = copy_experiment(stage2_run[0], tmp_path / "EXP")
    results = export_onnx.main(["--output_dir", str(exp)])
    onnx_path = exp / "stage2_best.onnx"
    assert results["onnx_path"] == str(onnx_path) and onnx_path.is_file()
    assert not list(exp.glob("*.tmp"))
    assert results["max_abs_diff"] <= 1e-4
    num_val = len([r for r in csv.DictReader(open(exp / "split.csv")) if r["split"] == "val"])
    assert results["parity_source"].startswith(f"{num_val} val images")
    assert results["torch_images_per_second"] > 0 and results["onnx_images_per_second"] > 0

    # metadata round trip: what a deployer reads back is what the checkpoint recorded
    model = onnx.load(onnx_path)
    props = {p.key: p.value for p in model.metadata_props}
    _, metadata, _ = networks.load_checkpoint(None, exp)
    assert props["model_name"] == metadata["model_name"] == "maxvit_rmlp_pico_rw_256"
    assert int(props["img_size"]) == metadata["img_size"] == 64
    assert float(props["face_crop_scale"]) == metadata["face_crop_scale"]
    assert json.loads(props["threshold"]) == metadata["val_metrics"]["threshold"]
    assert json.loads(props["val_metrics"]) == metadata["val_metrics"]
    assert json.loads(props["compute"]) == metadata["compute"]
    net = timm.create_model("maxvit_rmlp_pico_rw_256", img_size=64, num_classes=2)
    config = timm.data.resolve_data_config({}, model=net)
    assert json.loads(props["mean"]) == list(config["mean"]) and json.loads(props["std"]) == list(config["std"])
    assert "live = 1" in props["output"] and "uint8" in props["input"]
    assert {k: v for k, v in results.items() if k in props} == props

    # one input of uint8 face crops with a dynamic batch, one output P(live)
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    (graph_input,), (graph_output,) = model.graph.input, model.graph.output
    assert graph_input.name == "face_crops" and graph_output.name == "p_live"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim][1:] == [3, 64, 64]
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    net, _, _ = networks.load_checkpoint(None, exp)
    for batch in (1, 5):
        crops = torch.randint(0, 256, (batch, 3, 64, 64), dtype=torch.uint8)
        with torch.no_grad():
            expected = net(wfas_data.to_model_input(crops, config["mean"], config["std"])).softmax(-1)[:, 1]
        got = session.run(None, {"face_crops": crops.numpy()})[0]
        assert got.shape == (batch,) and np.abs(got - expected.numpy()).max() <= 1e-4


@pytest.mark.slow
def test_teacher_exports_from_the_command_line(stage1_run, tmp_path):
    exp = copy_experiment(stage1_run[0], tmp_path / "EXP")
    result = run_script([sys.executable, "tools/export_onnx.py", "--stage", "1", "--output_dir", str(exp)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (exp / "stage1_best.onnx").is_file()
    log = result.stdout + result.stderr
    assert "Parity on" in log and "val images" in log and "img/s in onnxruntime" in log
    assert "Replaced initializer" not in log  # the exporter's chatter stays out of the log
    props = {p.key: p.value for p in onnx.load(exp / "stage1_best.onnx").metadata_props}
    assert props["stage"] == "stage1" and props["model_name"] == "convnext_atto"
    assert json.loads(props["threshold"]) == json.loads((exp / "stage1_results.json").read_text())["val"]["threshold"]


@pytest.mark.slow
def test_export_without_the_data_checks_on_generated_crops(stage1_run, tmp_path):
    results = export_onnx.main(
        ["--output_dir", str(tmp_path / "elsewhere"), "--checkpoint", str(checkpoint_of(stage1_run[0], "stage1"))]
    )
    assert results["parity_source"].startswith("64 generated crops") and results["max_abs_diff"] <= 1e-4
    assert (tmp_path / "elsewhere" / "stage1_best.onnx").is_file()


@pytest.mark.slow
def test_an_export_that_fails_parity_is_not_written(stage1_run, tmp_path):
    exp = copy_experiment(stage1_run[0], tmp_path / "EXP")
    args = export_onnx.parse_args(["--output_dir", str(exp), "--stage", "1"])
    args.onnx_tolerance = -1.0  # no difference passes
    with pytest.raises(UserError, match="away from PyTorch .* was not written"):
        export_onnx.export_onnx(args)
    assert not list(exp.glob("*.onnx")) and not list(exp.glob("*.tmp"))


@pytest.mark.slow
def test_export_without_onnx_installed_says_what_to_install(stage1_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if it were not installed
    with pytest.raises(UserError, match="pip install onnx onnxscript onnxruntime"):
        export_onnx.main(["--output_dir", str(tmp_path), "--checkpoint", str(checkpoint_of(stage1_run[0], "stage1"))])


@pytest.mark.slow
def test_export_of_a_file_that_is_not_our_checkpoint_is_one_line(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"not a safetensors file")
    result = run_script(
        [
            sys.executable,
            "tools/export_onnx.py",
            "--output_dir",
            str(tmp_path),
            "--checkpoint",
            str(tmp_path / "weights.safetensors"),
        ]
    )
    assert result.returncode == 2 and "cannot read" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Scoring a folder of images
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_folder(demo_root, tmp_path_factory):
    """Dev images with their bbox files, one without (in a subfolder), one that does not decode, a non-image."""
    folder = tmp_path_factory.mktemp("photos") / "my photos"
    (folder / "sub").mkdir(parents=True)
    dev = sorted((demo_root / "Dev" / "data").glob("*.jpg"))[:4]
    for image in dev:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    shutil.copy(dev[0], folder / "sub" / "no_box.JPG")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder, [image.name for image in dev]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_folder_scores_every_image_at_the_val_threshold(stage2_run, photo_folder, tmp_path):
    exp, _ = stage2_run
    folder, names = photo_folder
    out = tmp_path / "OUT"
    results = predict.main(
        [
            "--predict_folder",
            str(folder),
            "--output_dir",
            str(out),
            "--checkpoint",
            str(checkpoint_of(exp, "stage2")),
            "--num_workers",
            "0",
        ]
    )
    csv_path = out / "predictions_my photos.csv"
    assert results["folder_predictions"] == str(csv_path)
    rows = read_rows(csv_path)
    assert [r["path"] for r in rows] == sorted(["broken.jpg", *names, "sub/no_box.JPG"])
    by_path = {r["path"]: r for r in rows}
    assert by_path["broken.jpg"]["score"] == "" and by_path["broken.jpg"]["decision"] == "undecodable"

    _, metadata, _ = networks.load_checkpoint(None, exp)
    threshold = metadata["val_metrics"]["threshold"]
    for row in rows:
        if row["decision"] not in ("undecodable", "no_face"):
            assert row["decision"] == ("live" if float(row["score"]) >= threshold else "spoof")

    # an image with a bbox file is scored on its face crop; one without goes to the face detector, which finds no
    # face in the demo's drawn ones (tests/test_faces.py has real faces), and is then never scored whole, unless
    # --whole_image says the folder holds face crops
    net, _, _ = networks.load_checkpoint(None, exp)
    config = timm.data.resolve_data_config({}, model=net)

    def score(path, box):
        face = wfas_data.load_face(path, box, metadata["face_crop_scale"], min_side=64)
        crop = wfas_data.eval_transform(64)(torch.from_numpy(np.array(face)).permute(2, 0, 1))
        with torch.no_grad():
            return net(wfas_data.to_model_input(crop[None], config["mean"], config["std"])).softmax(-1)[0, 1].item()

    box = wfas_data.read_bbox(folder / names[0].replace(".jpg", ".txt"))[:2].reshape(4).astype(np.float32)
    assert float(by_path[names[0]]["score"]) == pytest.approx(score(folder / names[0], box), abs=1e-5)
    assert by_path["sub/no_box.JPG"]["decision"] == "no_face" and by_path["sub/no_box.JPG"]["score"] == ""
    whole = predict.main(
        [
            "--predict_folder",
            str(folder),
            "--output_dir",
            str(out),
            "--whole_image",
            "--checkpoint",
            str(checkpoint_of(exp, "stage2")),
            "--num_workers",
            "0",
        ]
    )
    whole = {r["path"]: r for r in read_rows(whole["folder_predictions"])}
    assert float(whole["sub/no_box.JPG"]["score"]) == pytest.approx(score(folder / names[0], None), abs=1e-5)
    assert whole["sub/no_box.JPG"]["score"] != by_path[names[0]]["score"]


@pytest.mark.slow
def test_folder_threshold_option_and_warning_count(stage2_run, photo_folder, tmp_path):
    exp, _ = stage2_run
    folder, _ = photo_folder
    command = [
        sys.executable,
        "tools/predict.py",
        "--predict_folder",
        str(folder),
        "--output_dir",
        str(tmp_path),
        "--checkpoint",
        str(checkpoint_of(exp, "stage2")),
        "--num_workers",
        "0",
    ]
    for threshold, decision in (("0", "live"), ("1", "spoof")):
        result = run_script([*command, "--threshold", threshold])
        assert result.returncode == 0, result.stderr[-3000:]
        log = result.stdout + result.stderr
        assert "1 of the 6 images" in log and "could not be decoded" in log
        decisions = {r["decision"] for r in read_rows(tmp_path / "predictions_my photos.csv")}
        assert decisions == {decision, "undecodable", "no_face"}


@pytest.mark.slow
def test_two_processes_score_a_folder_as_one_does(stage2_run, photo_folder, tmp_path):
    """Each image once (no sampler padding), the same scores, one CSV; an export refuses several processes."""
    exp, _ = stage2_run
    folder, _ = photo_folder
    args = [
        "--predict_folder",
        str(folder),
        "--checkpoint",
        str(checkpoint_of(exp, "stage2")),
        "--num_workers",
        "0",
        "--batch_size",
        "4",
    ]
    one = run_script([sys.executable, "tools/predict.py", *args, "--output_dir", str(tmp_path / "one")])
    two = launch_two_processes("tools/predict.py", [*args, "--output_dir", str(tmp_path / "two")])
    assert one.returncode == 0 and two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    rows_one = read_rows(tmp_path / "one" / "predictions_my photos.csv")
    rows_two = read_rows(tmp_path / "two" / "predictions_my photos.csv")
    assert [r["path"] for r in rows_two] == [r["path"] for r in rows_one]
    assert [r["decision"] for r in rows_two] == [r["decision"] for r in rows_one]
    assert np.allclose(
        [float(r["score"] or "nan") for r in rows_two],
        [float(r["score"] or "nan") for r in rows_one],
        atol=1e-6,
        equal_nan=True,
    )

    refused = launch_two_processes(
        "tools/export_onnx.py",
        ["--output_dir", str(tmp_path / "three"), "--checkpoint", str(checkpoint_of(exp, "stage2"))],
    )
    # each process says it in one line (the launcher then reports its failed child in its own way)
    assert refused.returncode != 0 and refused.stderr.count("error: the ONNX export runs in one process") == 2
    assert not list((tmp_path / "three").glob("*.onnx"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "contents, message",
    [
        ({}, "holds no images"),
        ({"readme.txt": "no images here"}, "holds no images"),
        (None, "is not a folder"),
    ],
)
def test_folder_without_images_is_one_clear_line(stage2_run, tmp_path, contents, message):
    folder = tmp_path / "input"
    if contents is not None:
        folder.mkdir()
        for name, text in contents.items():
            (folder / name).write_text(text)
    result = run_script(
        [
            sys.executable,
            "tools/predict.py",
            "--predict_folder",
            str(folder),
            "--output_dir",
            str(tmp_path),
            "--checkpoint",
            str(checkpoint_of(stage2_run[0], "stage2")),
        ]
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("predictions_*.csv"))


def test_threshold_outside_zero_one_is_refused():
    with pytest.raises(UserError, match="not a probability"):
        predict.parse_args(["--predict_folder", ".", "--threshold", "50"])
    with pytest.raises(UserError, match="--predict_folder DIR"):
        predict.parse_args([])


@pytest.mark.slow
def test_training_run_scores_a_folder_at_its_final_threshold(stage1_run, demo_root, photo_folder, tmp_path):
    """Scoring with EXP's own best checkpoint uses the final threshold reported in final_results.json."""
    exp = copy_experiment(stage1_run[0], tmp_path / "EXP")
    folder, _ = photo_folder
    results = train_stage2.main(
        [
            "--output_dir",
            str(exp),
            "--model_name",
            "test_convnext",
            "--no-pretrained",
            "--img_size",
            "32",
            "--num_epochs",
            "1",
            "--batch_size",
            "8",
            "--num_workers",
            "0",
        ]
    )
    scored = predict.main(["--output_dir", str(exp), "--predict_folder", str(folder), "--num_workers", "0"])
    rows = [r for r in read_rows(scored["folder_predictions"]) if r["score"]]
    assert len(rows) == 4  # and one image in which the detector finds no face
    assert all(r["decision"] == ("live" if float(r["score"]) >= results["threshold"] else "spoof") for r in rows)


# ---------------------------------------------------------------------------------------------------------
# Operating points
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_final_results_and_report_carry_the_operating_points(stage2_run):
    exp, _ = stage2_run
    final = json.loads((exp / "final_results.json").read_text())
    rows = {split: read_rows(exp / f"stage2_{split}_predictions.csv") for split in ("val", "test")}

    def column(split, name, kind):
        return np.array([kind(r[name]) for r in rows[split]])

    expected = evaluation.operating_points(
        val_scores=column("val", "score", float),
        val_labels=column("val", "label", int),
        test_scores=column("test", "score", float),
        test_labels=column("test", "label", int),
    )
    assert final["operating_points"] == expected and len(expected) == 4
    text = (exp / "report.md").read_text()
    assert "## Operating points of the student" in text
    for point in expected:
        assert f"| {point['target']} | {point['threshold']:.6f} |" in text


# ---------------------------------------------------------------------------------------------------------
# Compute budget
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_both_stages_record_their_compute_budget(stage1_run, stage2_run):
    for exp, stage, results_file, model_name in (
        (stage1_run[0], "stage1", "stage1_results.json", "convnext_atto"),
        (stage2_run[0], "stage2", "final_results.json", "maxvit_rmlp_pico_rw_256"),
    ):
        compute = json.loads((exp / results_file).read_text())["compute"]
        assert compute["model_name"] == model_name and compute["img_size"] == 64
        assert compute["within_challenge_limit"] == "yes" and 0 < compute["gflops"] < 1
        _, metadata, _ = networks.load_checkpoint(checkpoint_of(exp, stage), exp)
        assert metadata["compute"] == compute
        log = max((exp / "logs" / stage).glob(f"{stage}_training_*.log")).read_text()
        assert f"Compute: {compute['params_m']:.2f} M parameters; {model_name} at 64x64" in log
        assert "within the challenge's single-model limit of 5 GFLOPs" in log
    assert "## Compute budget" in (stage2_run[0] / "report.md").read_text()
