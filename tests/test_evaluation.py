"""evaluation.py: every number a run reports, checked by another route: a loop over the images written here, a
hand-worked case, or scikit-learn. None of these tests computes its expected value with evaluation's own functions.

Conventions checked here: live = 1, a score is P(live), an image is taken for live when score >= threshold; APCER
is the share of attacks taken for live, BPCER the share of live images rejected, ACER their mean."""

import csv
import math
import shutil

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from sklearn.metrics import roc_auc_score, roc_curve

from conftest import metrics_by_loop
import evaluation
import output_files
import wfas_data
from errors import UserError

# --------------------------------------------------------------------------------------------------- references


def sklearn_error_pairs(scores, labels):
    """Every (APCER, BPCER) a threshold can give, from scikit-learn's ROC (live is the positive class)."""
    fpr, tpr, _ = roc_curve(labels, scores, pos_label=1, drop_intermediate=False)
    return list(zip(fpr, 1 - tpr))


def random_case(seed, n=400, types=("print", "replay", "mask", "paper-cut")):
    """Scores that separate live from spoof only partly, attack types of very different sizes, ties included."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.35).astype(int)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1).round(2)  # rounding makes ties
    weights = np.array([0.6, 0.25, 0.1, 0.05])[: len(types)]
    attack = rng.choice(types, size=n, p=weights / weights.sum())
    attack_types = np.where(labels == 1, "live", attack)
    return scores, labels, attack_types


# ------------------------------------------------------------------------------------------------ hand-worked


def test_metrics_by_hand_where_apcer_and_bpcer_differ():
    # live 0.9 0.8 0.6 0.4: one of 4 rejected at 0.5; spoof print 0.7 0.3, mask 0.55 0.2 0.1 0.05: 2 of 6 taken
    scores = [0.9, 0.8, 0.6, 0.4, 0.7, 0.3, 0.55, 0.2, 0.1, 0.05]
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    attack = ["live"] * 4 + ["print", "print", "mask", "mask", "mask", "mask"]
    m = evaluation.compute_metrics(scores, labels, attack, threshold=0.5)
    assert m["apcer"] == pytest.approx(2 / 6) and m["bpcer"] == pytest.approx(1 / 4)
    assert m["acer"] == pytest.approx((2 / 6 + 1 / 4) / 2)  # their mean: not the larger, not one of them
    assert m["acc"] == pytest.approx(7 / 10)
    assert m["apcer_per_attack"] == {"mask": pytest.approx(1 / 4), "print": pytest.approx(1 / 2)}
    assert m["worst_apcer"] == pytest.approx(1 / 2)
    assert m["threshold"] == 0.5 and m["num_images"] == 10
    # 24 live/spoof pairs: live 0.4 is below print 0.7 and mask 0.55; live 0.6 below print 0.7
    assert m["auc"] == pytest.approx(21 / 24)


def test_a_score_on_the_threshold_is_taken_for_live():
    m = evaluation.compute_metrics([0.5, 0.5, 0.49], [1, 0, 1], ["live", "x", "live"], threshold=0.5)
    assert m["apcer"] == 1.0 and m["bpcer"] == 0.5


def test_auc_counts_a_tie_as_half_a_pair():
    assert evaluation.roc_auc([0.5, 0.5], [1, 0]) == 0.5
    # pairs (live, spoof): (0.7, 0.7) half, (0.7, 0.2) one, (0.1, 0.7) none, (0.1, 0.2) none
    assert evaluation.roc_auc([0.7, 0.1, 0.7, 0.2], [1, 1, 0, 0]) == pytest.approx(1.5 / 4)


def test_the_eer_point_by_hand():
    # live 0.9 0.8 0.4, spoof 0.7 0.3 0.2: between 0.4 and 0.7 one live and one spoof are wrong; halfway, on no score
    scores = [0.9, 0.8, 0.4, 0.7, 0.3, 0.2]
    labels = [1, 1, 1, 0, 0, 0]
    m = evaluation.compute_metrics(scores, labels, ["live"] * 3 + ["print", "print", "mask"])
    assert m["threshold"] == pytest.approx(0.55)
    assert m["eer"] == pytest.approx(1 / 3)


def test_unseen_and_seen_acer_by_hand():
    # live 0.9 0.2 (BPCER 1/2 at 0.5); seen print 0.6 0.1 (1 of 2 taken), unseen mask 0.7 0.8 0.3 (2 of 3)
    scores = [0.9, 0.2, 0.6, 0.1, 0.7, 0.8, 0.3]
    labels = [1, 1, 0, 0, 0, 0, 0]
    attack = ["live", "live", "print", "print", "mask", "mask", "mask"]
    m = evaluation.compute_metrics(scores, labels, attack, threshold=0.5, unseen_attacks=("mask",))
    assert m["seen_apcer"] == pytest.approx(1 / 2) and m["seen_acer"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m["unseen_apcer"] == pytest.approx(2 / 3) and m["unseen_acer"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert "seen_acer" not in evaluation.compute_metrics(scores, labels, attack, threshold=0.5)


def test_nan_scores_are_refused_loudly():
    with pytest.raises(UserError, match="1 of 3 scores are NaN"):
        evaluation.compute_metrics([0.2, float("nan"), 0.9], [0, 1, 1], ["x", "live", "live"])
    with pytest.raises(UserError, match="NaN"):
        evaluation.roc_auc([float("nan"), 0.5], [1, 0])


def test_a_split_without_both_classes_has_no_eer_point_to_fit():
    assert evaluation.eer_threshold([0.2, 0.9], [1, 1]) == 0.5
    assert evaluation.eer_threshold([0.2, 0.9], [0, 0]) == 0.5
    assert np.isnan(evaluation.roc_auc([0.2, 0.9], [1, 1]))


# ------------------------------------------------------------------------------------------ against references


@pytest.mark.parametrize("seed", range(6))
def test_metrics_at_a_threshold_agree_with_a_loop_over_the_images(seed):
    scores, labels, attack_types = random_case(seed)
    for threshold in (0.0, 0.3, 0.45, 0.5, 0.61, 1.0, 1.01):
        expected = metrics_by_loop(scores, labels, attack_types, threshold, unseen=("mask", "paper-cut"))
        m = evaluation.compute_metrics(
            scores, labels, attack_types, threshold=threshold, unseen_attacks=("mask", "paper-cut")
        )
        for key, value in expected.items():
            if key == "apcer_per_attack":
                assert m[key] == pytest.approx(value) and set(m[key]) == set(value)
            else:
                assert m[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("seed", range(6))
def test_auc_agrees_with_scikit_learn_ties_included(seed):
    scores, labels, _ = random_case(seed)
    assert len(np.unique(scores)) < len(scores) / 2  # many ties
    assert evaluation.roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_the_eer_point_is_the_closest_apcer_bpcer_pair_scikit_learn_finds(seed):
    scores, labels, attack_types = random_case(seed)
    pairs = sklearn_error_pairs(scores, labels)
    apcer, bpcer = min(pairs, key=lambda pair: (abs(pair[0] - pair[1]), pair[0] + pair[1]))
    m = evaluation.compute_metrics(scores, labels, attack_types)
    assert m["eer"] == pytest.approx((apcer + bpcer) / 2, abs=1e-12)
    at_threshold = metrics_by_loop(scores, labels, attack_types, m["threshold"])
    assert (at_threshold["apcer"], at_threshold["bpcer"]) == pytest.approx((apcer, bpcer), abs=1e-12)
    assert m["threshold"] not in scores  # between two scores: a rounded file gives the same decisions


def test_the_threshold_lies_between_scores_so_rounded_files_give_the_same_decisions():
    rng = np.random.default_rng(0)
    scores = rng.random(500).astype(np.float32).astype(np.float64)
    labels = (rng.random(500) < scores).astype(int)
    attack_types = ["live" if label else "x" for label in labels]
    threshold = evaluation.eer_threshold(scores, labels)
    assert threshold not in scores
    read_back = np.array([float(output_files.format_score(s)) for s in scores])
    assert np.array_equal(read_back, scores)
    assert evaluation.compute_metrics(
        read_back, labels, attack_types, threshold=threshold
    ) == evaluation.compute_metrics(scores, labels, attack_types, threshold=threshold)


# ------------------------------------------------------------------------------------------- operating points


def test_operating_points_against_a_hand_computation():
    # val: 100 spoof at 0, 0.005, ..., 0.495 and 100 live at 0.3025, 0.3075, ..., 0.7975 (no ties)
    spoof = np.arange(100) / 200
    live = 0.3025 + np.arange(100) / 200
    scores = np.concatenate([spoof, live])
    labels = np.array([0] * 100 + [1] * 100)
    test_scores = np.array([0.1, 0.31, 0.9, 0.2, 0.5])
    test_labels = np.array([0, 0, 0, 1, 1])
    points = {
        p["target"]: p
        for p in evaluation.operating_points(
            val_scores=scores, val_labels=labels, test_scores=test_scores, test_labels=test_labels
        )
    }
    assert list(points) == ["BPCER 1%", "BPCER 0.1%", "APCER 1%", "APCER 0.1%"]

    # BPCER <= 1%: one live image of 100 may fall below; the highest such threshold lies between the 2nd
    # lowest live score (0.3075) and the next score below it (spoof 0.305)
    p = points["BPCER 1%"]
    assert p["threshold"] == pytest.approx((0.305 + 0.3075) / 2)
    assert p["val_bpcer"] == pytest.approx(0.01) and p["resolved"]
    assert p["val_apcer"] == pytest.approx(38 / 100)  # spoof 0.31 ... 0.495
    assert p["test_apcer"] == pytest.approx(2 / 3) and p["test_bpcer"] == pytest.approx(1 / 2)  # 0.31, 0.9; 0.2

    # BPCER <= 0.1% of 100 live images means none: just below the lowest live score, above spoof 0.300
    p = points["BPCER 0.1%"]
    assert p["threshold"] == pytest.approx((0.300 + 0.3025) / 2)
    assert p["val_bpcer"] == 0 and p["val_apcer"] == pytest.approx(39 / 100) and not p["resolved"]

    # APCER <= 1%: one spoof image (0.495) may reach the threshold; the lowest one lies between spoof 0.49
    # and the next score above it (live 0.4925)
    p = points["APCER 1%"]
    assert p["threshold"] == pytest.approx((0.49 + 0.4925) / 2)
    assert p["val_apcer"] == pytest.approx(0.01) and p["resolved"]
    assert p["val_bpcer"] == pytest.approx(38 / 100)  # live 0.3025 ... 0.4875
    assert p["test_apcer"] == pytest.approx(1 / 3) and p["test_bpcer"] == pytest.approx(1 / 2)  # 0.9; 0.2

    p = points["APCER 0.1%"]
    assert p["threshold"] == pytest.approx((0.495 + 0.4975) / 2)
    assert p["val_apcer"] == 0 and p["val_bpcer"] == pytest.approx(39 / 100) and not p["resolved"]


@pytest.mark.parametrize("seed", range(4))
def test_each_operating_point_is_the_best_threshold_within_its_target(seed):
    """For each target, no threshold keeps the error within it with the other error lower (every decision a
    threshold can make, from scikit-learn's ROC); val and test are scored at it one image at a time."""
    val_scores, val_labels, val_types = random_case(seed, n=1000)
    test_scores, test_labels, test_types = random_case(seed + 100, n=300)
    pairs = sklearn_error_pairs(val_scores, val_labels)
    targets = (("bpcer", 0.05), ("bpcer", 0.2), ("apcer", 0.05), ("apcer", 0.3))
    points = evaluation.operating_points(
        val_scores=val_scores, val_labels=val_labels, test_scores=test_scores, test_labels=test_labels, targets=targets
    )
    assert [(p["error"], p["target_rate"]) for p in points] == list(targets)
    for point in points:
        error = point["error"]
        target = point["target_rate"]
        if error == "bpcer":
            best_other = min(apcer for apcer, bpcer in pairs if bpcer <= target + 1e-12)
        else:
            best_other = min(bpcer for apcer, bpcer in pairs if apcer <= target + 1e-12)
        val = metrics_by_loop(val_scores, val_labels, val_types, point["threshold"])
        test = metrics_by_loop(test_scores, test_labels, test_types, point["threshold"])
        other = "apcer" if error == "bpcer" else "bpcer"
        assert val[error] <= target + 1e-12
        assert val[other] == pytest.approx(best_other, abs=1e-12)
        assert (point["val_apcer"], point["val_bpcer"]) == pytest.approx((val["apcer"], val["bpcer"]), abs=1e-12)
        assert (point["test_apcer"], point["test_bpcer"]) == pytest.approx((test["apcer"], test["bpcer"]), abs=1e-12)
        assert point["resolved"] and point["threshold"] not in val_scores


def test_operating_points_need_both_classes_on_val():
    assert (
        evaluation.operating_points(val_scores=[0.2, 0.3], val_labels=[1, 1], test_scores=[0.5], test_labels=[0]) == []
    )


# ------------------------------------------------------------------------------------------------ predictions


def test_the_predictions_csv_holds_each_image_with_its_exact_score(tmp_path):
    paths = np.array(["Train/living/1/a.jpg", "Train/spoof/print/2/b, c.jpg"])
    scores = np.array([0.1 + 0.2, 1e-13])
    predictions = evaluation.Predictions(
        paths=paths, labels=np.array([1, 0]), attack_types=["live", "print"], scores=scores
    )
    evaluation.write_predictions(tmp_path / "p.csv", predictions)
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "label", "attack_type", "score"]
    assert rows[1][:3] == ["Train/living/1/a.jpg", "1", "live"] and float(rows[1][3]) == 0.1 + 0.2
    assert rows[2][:3] == ["Train/spoof/print/2/b, c.jpg", "0", "print"] and float(rows[2][3]) == 1e-13
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------- the log


def test_the_logged_line_gives_each_metric_under_its_name():
    metrics = {"acc": 0.7, "apcer": 1 / 3, "bpcer": 0.25, "acer": 7 / 24, "auc": 0.875, "eer": 0.3, "threshold": 0.5}
    metrics.update(worst_apcer=0.5, apcer_per_attack={"mask": 0.25, "print": 0.5}, num_images=10)
    line = "ACC 0.7000  APCER 0.3333  BPCER 0.2500  ACER 0.2917  AUC 0.8750  EER 0.3000  worst-attack APCER 0.5000"
    assert evaluation.format_metrics(metrics) == line
    assert evaluation.format_metrics(metrics, per_attack=True) == line + "  APCER per type: mask 0.2500, print 0.5000"
    seen = {**metrics, "seen_apcer": 0.1, "seen_acer": 0.2, "unseen_apcer": 0.6, "unseen_acer": 0.7}
    assert evaluation.format_metrics(seen).endswith(
        "seen APCER 0.1000  seen ACER 0.2000  unseen APCER 0.6000  unseen ACER 0.7000"
    )


def test_the_operating_points_table_gives_one_line_per_target():
    points = [
        {
            "target": "BPCER 1%",
            "threshold": 0.25,
            "val_apcer": 0.125,
            "val_bpcer": 0.01,
            "test_apcer": 0.5,
            "test_bpcer": 0.0,
            "resolved": True,
        },
        {
            "target": "APCER 0.1%",
            "threshold": 0.75,
            "val_apcer": 0.0,
            "val_bpcer": 0.375,
            "test_apcer": 0.0,
            "test_bpcer": 0.25,
            "resolved": False,
        },
    ]
    assert evaluation.format_operating_points(points).splitlines() == [
        "operating points (threshold fitted on val; test scored at it):",
        "    BPCER 1%: threshold 0.250000  val APCER 0.1250 BPCER 0.0100  test APCER 0.5000 BPCER 0.0000",
        "  APCER 0.1%: threshold 0.750000  val APCER 0.0000 BPCER 0.3750  test APCER 0.0000 BPCER 0.2500"
        "  (val too small to resolve this target)",
    ]


# ------------------------------------------------------------------------------ scoring a split with a real model


class LeftHalfBrightness(torch.nn.Module):
    """A real two-class network whose P(live) each image's pixels give: logits (0, 8 * (mean of the left half -
    0.5)). Its left half makes a horizontal flip change the score, so that --tta shows."""

    def forward(self, images):
        left = images[..., : images.shape[-1] // 2].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(left), 8 * (left - 0.5)], dim=1)


def p_live_by_hand(crop, tta):
    """P(live) of LeftHalfBrightness on one uint8 crop, as a sigmoid of its logit, by hand."""
    x = crop.double() / 255
    p = [1 / (1 + math.exp(-8 * (half[..., : x.shape[-1] // 2].mean().item() - 0.5))) for half in (x, x.flip(-1))]
    return (p[0] + p[1]) / 2 if tta else p[0]


@pytest.fixture
def scored_table(demo_root, tmp_path):
    """The demo's val split in a copy of the data, with one image made undecodable."""
    data = shutil.copytree(demo_root, tmp_path / "data")
    table = wfas_data.load_or_create_split(
        data, tmp_path / "EXP", val_fraction=0.3, test_fraction=0.2, log=lambda _: None
    ).of_split("val")
    (data / table.paths()[3]).write_bytes(b"not a jpeg")
    return table


@pytest.mark.parametrize("tta", [False, True])
def test_a_split_is_scored_image_by_image_in_its_own_order(scored_table, tta):
    table = scored_table
    accelerator = Accelerator(cpu=True)
    dataset = wfas_data.FaceDataset(table, 32)
    loader = accelerator.prepare(torch.utils.data.DataLoader(dataset, batch_size=4))
    identity = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # the model sees pixels / 255
    metrics, (paths, labels, attack_types, scores) = evaluation.evaluate(
        LeftHalfBrightness(),
        loader,
        accelerator,
        split_table=table,
        mean=identity[0],
        std=identity[1],
        tta=tta,
        log_warning=lambda _: None,
    )

    readable = [i for i in range(len(table)) if i != 3]
    assert list(paths) == [table.paths()[i] for i in readable] and metrics["unreadable"] == 1
    assert labels.tolist() == [int(table.label[i]) for i in readable]
    assert list(attack_types) == [table.attack_types()[i] for i in readable]
    expected = [p_live_by_hand(dataset[i]["image"], tta) for i in readable]
    assert np.allclose(scores, expected, atol=1e-6)
    loss = -np.mean([math.log(p if label == 1 else 1 - p) for p, label in zip(expected, labels)])
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    by_loop = metrics_by_loop(expected, labels, attack_types, metrics["threshold"])
    assert metrics["acer"] == pytest.approx(by_loop["acer"]) and metrics["num_images"] == len(readable)

    # at a given threshold (val's, for test), with the held-out types reported apart
    table.unseen_attacks = (sorted(set(attack_types) - {"live"})[0],)
    at_given, _ = evaluation.evaluate(
        LeftHalfBrightness(),
        loader,
        accelerator,
        split_table=table,
        mean=identity[0],
        std=identity[1],
        threshold=0.6,
        tta=tta,
        log_warning=print,
    )
    by_loop = metrics_by_loop(expected, labels, attack_types, 0.6, unseen=table.unseen_attacks)
    assert at_given["threshold"] == 0.6 and at_given["acer"] == pytest.approx(by_loop["acer"])
    assert at_given["unseen_acer"] == pytest.approx(by_loop["unseen_acer"])

    unlabelled = wfas_data.unlabelled_table(table.root, table.paths())
    model = LeftHalfBrightness()
    model.pretrained_cfg = {"input_size": (3, 32, 32), "mean": identity[0], "std": identity[1]}
    in_table_order = evaluation.score_table(
        model,
        accelerator,
        unlabelled,
        img_size=32,
        face_crop_scale=wfas_data.DEFAULT_FACE_CROP_SCALE,
        batch_size=4,
        num_workers=0,
        tta=tta,
        log_warning=lambda _: None,
    )
    assert np.isnan(in_table_order[3]) and np.allclose(np.delete(in_table_order, 3), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------- edge cases


def test_between_equally_balanced_points_the_eer_takes_the_lower_acer():
    # live 0.0 0.3, spoof 0.2 0.5 0.5 0.5: at 0.25 APCER 3/4 and BPCER 1/2, at 0.4 APCER 3/4 and BPCER 1: both are
    # 1/4 apart, and 0.25 errs less
    m = evaluation.compute_metrics([0.0, 0.3, 0.2, 0.5, 0.5, 0.5], [1, 1, 0, 0, 0, 0], ["live"] * 2 + ["x"] * 4)
    assert m["threshold"] == pytest.approx(0.25)
    assert m["eer"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    # live 0.1 0.1 0.5 0.6, spoof 0.3: at 0.2 APCER 1 and BPCER 1/2, at 0.4 APCER 0 and BPCER 1/2; the higher one
    m = evaluation.compute_metrics([0.1, 0.1, 0.5, 0.6, 0.3], [1, 1, 1, 1, 0], ["live"] * 4 + ["x"])
    assert m["threshold"] == pytest.approx(0.4) and m["eer"] == pytest.approx(1 / 4)


def test_scores_of_exactly_0_and_1_can_all_be_taken_for_live_or_all_refused():
    # a confident model: live at 0 and 1, spoof at 0 and 1; no error within 0% but all live or all spoof
    scores = np.array([0.0, 1.0, 0.0, 1.0])
    labels = np.array([1, 1, 0, 0])
    targets = (("bpcer", 0.0), ("apcer", 0.0))
    bpcer_0, apcer_0 = evaluation.operating_points(
        val_scores=scores, val_labels=labels, test_scores=scores, test_labels=labels, targets=targets
    )
    assert bpcer_0["threshold"] <= 0.0 and (bpcer_0["val_apcer"], bpcer_0["val_bpcer"]) == (1.0, 0.0)
    assert apcer_0["threshold"] > 1.0 and (apcer_0["val_apcer"], apcer_0["val_bpcer"]) == (0.0, 1.0)
    assert metrics_by_loop(scores, labels, ["live", "live", "x", "x"], bpcer_0["threshold"])["bpcer"] == 0.0
    assert metrics_by_loop(scores, labels, ["live", "live", "x", "x"], apcer_0["threshold"])["apcer"] == 0.0


def test_a_model_that_gives_every_image_the_same_score_still_has_an_eer_point():
    m = evaluation.compute_metrics([0.5] * 4, [1, 1, 0, 0], ["live", "live", "x", "x"])
    assert m["eer"] == 0.5 and m["auc"] == 0.5
    assert (m["apcer"], m["bpcer"]) in ((1.0, 0.0), (0.0, 1.0))


def test_the_threshold_lies_between_two_neighbouring_float32_scores():
    low = np.float32(0.5)
    high = np.nextafter(low, np.float32(1))  # no float32 lies between them; halfway does in float64
    scores = np.array([low, high], dtype=np.float32)
    threshold = evaluation.eer_threshold(scores, [0, 1])
    assert float(low) < threshold < float(high)  # compared as float64: numpy compares a float32 with it in float32
    assert metrics_by_loop([float(low), float(high)], [0, 1], ["x", "live"], threshold)["acer"] == 0


def test_a_nan_score_says_what_to_do():
    with pytest.raises(UserError, match="training diverged\\); lower --learning_rate, or use bf16 rather than fp16"):
        evaluation.check_scores([0.1, float("nan")])


def test_rates_of_a_class_that_is_absent_are_nan_and_the_others_stand():
    live_only = evaluation.compute_metrics([0.2, 0.9], [1, 1], ["live", "live"], threshold=0.5)
    assert np.isnan(live_only["apcer"]) and np.isnan(live_only["worst_apcer"]) and np.isnan(live_only["auc"])
    assert live_only["bpcer"] == 0.5 and live_only["acc"] == 0.5 and live_only["apcer_per_attack"] == {}
    spoof_only = evaluation.compute_error_rates([0.2, 0.9], [0, 0], 0.5)
    assert np.isnan(spoof_only["bpcer"]) and spoof_only["apcer"] == 0.5
    empty = evaluation.compute_metrics([], [], [], threshold=0.5)
    assert empty["num_images"] == 0 and np.isnan(empty["acc"]) and np.isnan(empty["acer"])
    # every attack of the unseen types: no seen attack to rate
    unseen = evaluation.compute_metrics([0.9, 0.6], [1, 0], ["live", "mask"], threshold=0.5, unseen_attacks=("mask",))
    assert np.isnan(unseen["seen_apcer"]) and unseen["unseen_apcer"] == 1.0


def test_operating_points_need_both_classes_on_val_whichever_is_missing():
    assert (
        evaluation.operating_points(val_scores=[0.2, 0.3], val_labels=[0, 0], test_scores=[0.5], test_labels=[1]) == []
    )


# --------------------------------------------------------------------------------------------- cross-dataset


@pytest.mark.parametrize("seed", range(4))
def test_tpr_at_fpr_and_hter_agree_with_scikit_learn_and_a_loop(seed):
    scores, labels, attack_types = random_case(seed, n=700)
    fpr, tpr, _ = roc_curve(labels, scores)  # live = 1 positive; a score >= a threshold counts as positive
    for limit in (0.01, 0.05, 0.2):
        expected = max(t for f, t in zip(fpr, tpr) if f <= limit + 1e-12)
        assert evaluation.tpr_at_fpr(scores, labels, limit) == pytest.approx(expected, abs=1e-12)
    m = evaluation.cross_dataset_metrics(scores, labels, attack_types, threshold=0.42)
    by_loop = metrics_by_loop(scores, labels, attack_types, 0.42)
    assert m["hter"] == pytest.approx((by_loop["apcer"] + by_loop["bpcer"]) / 2, abs=1e-12)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m["tpr_at_fpr_1%"] == evaluation.tpr_at_fpr(scores, labels, 0.01)


def test_tpr_at_fpr_by_hand():
    # spoof 0.9 0.7 0.2 0.1, live 0.8 0.6 0.3: accepting no spoof (a threshold above 0.9) accepts no live face;
    # one (0.9: a threshold down to just above 0.7) live 0.8; two (0.9, 0.7: down to just above 0.2) all three
    scores = [0.9, 0.7, 0.2, 0.1, 0.8, 0.6, 0.3]
    labels = [0, 0, 0, 0, 1, 1, 1]
    assert evaluation.tpr_at_fpr(scores, labels, 0.0) == 0
    assert evaluation.tpr_at_fpr(scores, labels, 0.25) == pytest.approx(1 / 3)
    assert evaluation.tpr_at_fpr(scores, labels, 0.5) == 1
    assert math.isnan(evaluation.tpr_at_fpr([0.2], [1], 0.01))


def test_a_videos_score_is_the_mean_of_its_frames():
    scores, labels, types = evaluation.by_video(
        [0.2, 0.4, 0.9, 0.6, 0.3], [1, 1, 0, 0, 1], list("llssl"), videos=list("aabba")
    )
    assert scores.tolist() == pytest.approx([(0.2 + 0.4 + 0.3) / 3, 0.75])
    assert labels.tolist() == [1, 0] and types.tolist() == ["l", "s"]
