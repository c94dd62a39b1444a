"""Cross-dataset evaluation (tools/predict.py --evaluate) and the leave-one-out table (tools/protocols.py): a model
trained on one dataset's frames scored on another's, every number recomputed from the predictions CSV by another
route (a loop, scikit-learn)."""

import csv
import json
from collections import defaultdict

import numpy as np
import pytest
from conftest import QUICK_STAGE, REPO, require_modules, run_script
from sklearn.metrics import roc_auc_score, roc_curve

from dataset_layouts import write_dataset
from tools import data, predict


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """The frames of tiny Replay-Attack and MSU-MFSD copies: {name: frames folder}."""
    require_modules(["cv2"], "pip install -r requirements-detect.txt")
    base = tmp_path_factory.mktemp("cross")
    found = {}
    for name in ("replay_attack", "msu_mfsd"):
        write_dataset(name, base / name)
        found[name] = base / f"{name}_frames"
        data.sample_frames(f"{name}:{base / name}", found[name], frames_per_video=2, log=lambda _: None)
    return found


def hter_by_loop(scores, labels, threshold):
    live = [s for s, y in zip(scores, labels) if y == 1]
    spoof = [s for s, y in zip(scores, labels) if y == 0]
    apcer = sum(s >= threshold for s in spoof) / len(spoof)
    bpcer = sum(s < threshold for s in live) / len(live)
    return (apcer + bpcer) / 2


def tpr_at_fpr_by_scikit_learn(scores, labels, fpr_limit):
    fpr, tpr, _ = roc_curve(labels, scores)  # live = 1 is the positive class
    return max(t for f, t in zip(fpr, tpr) if f <= fpr_limit + 1e-12)


def test_a_model_scored_on_a_dataset_it_never_saw_reports_what_its_csv_gives(frames, tmp_path):
    import train_stage1

    exp = tmp_path / "EXP"
    train_stage1.main(["--data_root", str(frames["replay_attack"]), "--output_dir", str(exp), *QUICK_STAGE])
    split = json.loads((exp / "split_source.json").read_text())
    assert split["protocols"] == {"replay_attack": "official"}
    results = predict.main(
        ["--output_dir", str(exp), "--stage", "1", "--num_workers", "0", "--evaluate", f"frames:{frames['msu_mfsd']}"]
    )["cross_dataset"]
    threshold = json.loads((exp / "stage1_results.json").read_text())["threshold"]
    metrics = json.loads((exp / "cross_dataset" / "msu_mfsd_metrics.json").read_text())
    with open(exp / "cross_dataset" / "msu_mfsd_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    test_videos = {r["video"] for r in rows}
    with open(frames["msu_mfsd"] / "frames_index.csv", newline="") as f:
        index = list(csv.DictReader(f))
    assert test_videos == {r["video"] for r in index if r["membership"] == "official=test"}  # the test split only
    frame_scores = [float(r["score"]) for r in rows]
    frame_labels = [int(r["label"]) for r in rows]
    videos = defaultdict(list)
    for r in rows:
        videos[r["video"]].append((float(r["score"]), int(r["label"])))
    video_scores = [np.mean([s for s, _ in v]) for v in videos.values()]
    video_labels = [v[0][1] for v in videos.values()]
    for level, scores, labels in (("frame", frame_scores, frame_labels), ("video", video_scores, video_labels)):
        m = metrics[level]
        assert m["threshold"] == threshold and m["num_images"] == len(scores)
        assert m["hter"] == pytest.approx(hter_by_loop(scores, labels, threshold), abs=1e-12)
        assert m["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        for fpr in (0.01, 0.001):
            key = f"tpr_at_fpr_{fpr * 100:g}%"
            assert m[key] == pytest.approx(tpr_at_fpr_by_scikit_learn(scores, labels, fpr), abs=1e-12)
    assert results["frame"] == metrics["frame"]
    report = (exp / "report.md").read_text()
    assert "## Cross-dataset evaluation" in report and f"frames:{frames['msu_mfsd']}" in report


@pytest.mark.slow
def test_the_leave_one_out_table_runs_end_to_end_and_resumes_per_cell(tmp_path):
    require_modules(["cv2"], "pip install -r requirements-detect.txt")
    roots = {}
    for name in ("oulu_npu", "casia_fasd", "replay_attack", "msu_mfsd"):
        roots[name] = tmp_path / name
        write_dataset(name, roots[name])
    quick = " ".join(QUICK_STAGE)
    command = ["python", "tools/protocols.py", "ocim", "--out", str(tmp_path / "OCIM"), "--seeds", "1"]
    command += ["--frames_per_video", "2", "--workers", "2"]
    command += ["--stage1_args", quick, "--stage2_args", quick]
    command += [arg for name, root in roots.items() for arg in (f"--{name}", str(root))]
    result = run_script(command, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (tmp_path / "OCIM" / "ocim_table.md").read_text()
    for row in ("O&C&I to M", "C&I&M to O", "O&I&M to C", "O&C&M to I"):
        assert f"| {row} |" in table
    results = json.loads((tmp_path / "OCIM" / "ocim_results.json").read_text())
    for target, runs in results.items():
        metrics = json.loads(
            (tmp_path / "OCIM" / target / "seed0" / "cross_dataset" / f"{target}_metrics.json").read_text()
        )
        assert runs == [metrics]
        hter = 100 * metrics["video"]["hter"]
        assert f"{hter:.2f} ± 0.00" in table
    again = run_script(command, timeout=600)  # every cell done: kept, nothing trained again
    assert again.returncode == 0 and "=== " not in again.stdout
    assert (REPO / "tools" / "protocols.py").is_file()
