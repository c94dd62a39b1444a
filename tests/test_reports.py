"""Notebooks, plots, report.md (tools/report.py), the configuration files and run_all.sh --download_only."""

import csv
import json
import os
import shutil
import sys

import nbclient
import nbformat
import pytest
import timm
from PIL import Image
from safetensors.torch import save_file

from conftest import REPO, run_script
import train_stage1
import train_stage2
import experiment_report

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_are_committed_without_outputs():
    assert [p.stem for p in NOTEBOOKS] == ["full_pipeline", "quick_start", "stage1_demo", "stage2_demo"]
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        assert all(not c.get("outputs") and not c.get("execution_count") for c in cells if c["cell_type"] == "code")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_on_the_demo(path, tmp_path, monkeypatch):
    monkeypatch.setenv("WFAS_NOTEBOOK_OUTPUT", str(tmp_path))
    monkeypatch.setenv("WFAS_NOTEBOOK_QUICK", "1")  # every cell, on a smaller demo
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in outputs)  # plots inline


@pytest.mark.slow
def test_each_stage_writes_its_summary_plots_and_the_report(stage2_run):
    exp, results = stage2_run
    for stage, parts in (
        ("stage1", ["train_loss", "val_loss"]),
        ("stage2", ["train_loss", "train_focal", "train_triplet", "train_kd", "val_loss"]),
    ):
        with open(exp / "logs" / stage / "summary.csv") as f:
            rows = list(csv.DictReader(f))
        assert [int(r["epoch"]) for r in rows] == [1]
        assert all(key in rows[0] for key in parts + ["val_acer", "val_auc", "lr", "data_wait_share"])
    expected = {
        f"{stage}_{name}.png"
        for stage in ("stage1", "stage2")
        for name in ("training_curves", "roc_det", "score_histograms", "apcer_per_attack")
    }
    expected.add("stage2_teacher_vs_student.png")
    assert {p.name for p in (exp / "plots").iterdir()} == expected
    for png in (exp / "plots").iterdir():
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300
    report = (exp / "report.md").read_text()
    final = json.loads((exp / "final_results.json").read_text())
    for key in ("test_acc", "test_apcer", "test_bpcer", "test_acer", "test_auc", "test_eer", "threshold"):
        assert f"{final[key]:.4f}" in report, key
    assert all(f"(plots/{name})" in report for name in expected)
    assert "## Data" in report and "## Configuration of stage2" in report and '"kd_weight": 1.0' in report


@pytest.mark.slow
def test_a_missing_matplotlib_is_one_warning_not_a_failure(stage2_run, tmp_path, monkeypatch):
    exp = shutil.copytree(stage2_run[0], tmp_path / "EXP", ignore=shutil.ignore_patterns("face_cache", "*_latest"))
    shutil.rmtree(exp / "plots")
    for module in ("matplotlib", "matplotlib.figure"):  # as if it were not installed
        monkeypatch.setitem(sys.modules, module, None)
    warnings = []
    written = experiment_report.make_plots(exp, "stage2", log=warnings.append)
    assert written == [] and len(warnings) == 1 and "matplotlib is not installed" in warnings[0]
    monkeypatch.undo()
    (exp / "logs" / "stage2" / "summary.csv").unlink()
    written = experiment_report.make_plots(exp, "stage2", log=warnings.append)
    assert len(warnings) == 2 and "results are unaffected" in warnings[1]


@pytest.mark.slow
def test_the_report_tool_redraws_everything_from_the_files_alone(stage2_run, tmp_path):
    exp = shutil.copytree(
        stage2_run[0], tmp_path / "EXP", ignore=shutil.ignore_patterns("face_cache", "*_latest", "checkpoints")
    )
    shutil.rmtree(exp / "plots")
    (exp / "report.md").unlink()
    result = run_script([sys.executable, "tools/report.py", str(exp)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in (exp / "plots").iterdir()} == {p.name for p in (stage2_run[0] / "plots").iterdir()}
    assert (exp / "report.md").read_text() == (stage2_run[0] / "report.md").read_text().replace(
        f"report: {stage2_run[0].name}", f"report: {exp.name}"
    )
    assert "Wrote" in result.stdout and "9 plots" in result.stdout
    assert not list(exp.rglob("*.tmp*"))
    empty = run_script([sys.executable, "tools/report.py", str(tmp_path / "nothing")])
    assert empty.returncode == 2 and "holds no stage1_results.json" in empty.stderr and "Traceback" not in empty.stderr


@pytest.mark.parametrize(
    "script, config",
    [
        (train_stage1, "stage1_recipe.json"),
        (train_stage2, "stage2_recipe.json"),
        (train_stage1, "demo_stage1.json"),
        (train_stage2, "demo_stage2.json"),
        (train_stage1, "challenge_stage1.json"),
        (train_stage2, "challenge_stage2.json"),
    ],
)
def test_the_configuration_files_round_trip_through_config(script, config, tmp_path):
    values = json.loads((REPO / "configs" / config).read_text())
    args = vars(
        script.parse_args(
            ["--config", str(REPO / "configs" / config), "--data_root", "x", "--output_dir", str(tmp_path)]
        )
    )
    assert {k: args[k] for k in values} == values


def test_the_recipe_configs_hold_the_published_settings():
    stage1 = json.loads((REPO / "configs" / "stage1_recipe.json").read_text())
    stage2 = json.loads((REPO / "configs" / "stage2_recipe.json").read_text())
    assert (stage1["model_name"], stage1["num_epochs"], stage1["batch_size"], stage1["learning_rate"]) == (
        "convnext_base",
        50,
        32,
        2e-4,
    ) and stage1["pretrained"]
    assert (stage2["model_name"], stage2["num_epochs"], stage2["batch_size"], stage2["learning_rate"]) == (
        "maxvit_base_tf_224",
        30,
        32,
        1e-4,
    )
    assert (stage2["focal_weight"], stage2["triplet_weight"], stage2["kd_weight"]) == (1.0, 0.5, 1.0)


def run_all(cwd, *args, env=None):
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    return run_script(["bash", str(REPO / "run_all.sh"), *args], env=full_env)


@pytest.mark.slow
def test_run_all_download_only_fills_both_caches_or_says_what_to_do_offline(tmp_path):
    offline = {
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HTTPS_PROXY": "",
        "https_proxy": "",
        "ALL_PROXY": "",
        "all_proxy": "",
    }
    tiny = ["--stage1_args", "--model_name convnext_atto", "--stage2_args", "--model_name maxvit_rmlp_pico_rw_256"]
    result = run_all(tmp_path, "--download_only", "--output_dir", str(tmp_path / "EXP"), *tiny, env=offline)
    assert result.returncode == 2 and "--pretrained_file" in result.stderr and "Traceback" not in result.stderr
    # what a login node leaves behind: the weights in each stage's cache; then it says where they are
    for stage, name in (("stage1", "convnext_atto"), ("stage2", "maxvit_rmlp_pico_rw_256")):
        cache = tmp_path / "EXP" / "model" / stage / name
        cache.mkdir(parents=True)
        save_file(timm.create_model(name).state_dict(), cache / f"{name}.safetensors")
    result = run_all(tmp_path, "--download_only", "--output_dir", str(tmp_path / "EXP"), *tiny, env=offline)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "convnext_atto.safetensors" in result.stdout and "maxvit_rmlp_pico_rw_256.safetensors" in result.stdout
    assert "Weights cached under" in result.stdout
