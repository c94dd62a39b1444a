"""The evaluation protocol of both stages and the tools: P(live) scores, the threshold fitted on val (its EER
point), APCER / BPCER / ACER / EER / AUC and APCER per attack type, operating points for the error a deployment
can afford, and the loop that scores a split once across all processes.

Conventions: live = 1, spoof = 0, a score is P(live), live when score >= threshold.
"""

import csv
from typing import NamedTuple

import numpy as np
import torch

import networks
from errors import UserError
from output_files import format_score, write_with
from progress import progress_bar
from wfas_data import LIVE, SPOOF, FaceDataset, check_batch, default_loader_settings, to_model_input


class Predictions(NamedTuple):
    """A split's decodable images, one entry each, as stageN_{val,test}_predictions.csv holds them."""

    paths: np.ndarray
    labels: np.ndarray
    attack_types: np.ndarray
    scores: np.ndarray  # P(live)


def check_scores(scores):
    """Scores as float64, refusing NaN: sorted, a NaN would pass for the highest score in AUC and EER."""
    scores = np.asarray(scores, dtype=np.float64)
    if num_nan := int(np.isnan(scores).sum()):
        raise UserError(
            f"{num_nan} of {len(scores)} scores are NaN: the model's outputs are not finite (training "
            "diverged); lower --learning_rate, or use bf16 rather than fp16 mixed precision"
        )
    return scores


def candidate_thresholds(scores, labels):
    """Every distinct decision: thresholds halfway between adjacent distinct scores (and past both ends), never on a
    score (no decision hangs on a file's rounding), ascending, with the spoof accepted and live rejected at each."""
    scores = check_scores(scores)
    labels = np.asarray(labels)
    live = np.sort(scores[labels == LIVE])
    spoof = np.sort(scores[labels == SPOOF])
    distinct = np.unique(scores)
    candidates = np.concatenate(
        [[min(distinct[0], 0.0) - 1e-6], (distinct[:-1] + distinct[1:]) / 2, [max(distinct[-1], 1.0) + 1e-6]]
    )
    spoof_accepted = len(spoof) - np.searchsorted(spoof, candidates, side="left")
    live_rejected = np.searchsorted(live, candidates, side="left")
    return candidates, spoof_accepted, live_rejected


def eer_threshold(scores, labels):
    """The threshold where |APCER - BPCER| is smallest (ties: the smaller ACER). Fit it on val only."""
    labels = np.asarray(labels)
    if not (num_live := int((labels == LIVE).sum())) or not (num_spoof := int((labels == SPOOF).sum())):
        return 0.5
    candidates, spoof_accepted, live_rejected = candidate_thresholds(scores, labels)
    apcer = spoof_accepted / num_spoof
    bpcer = live_rejected / num_live
    best = np.lexsort((apcer + bpcer, np.abs(apcer - bpcer)))[0]
    return float(candidates[best])


def compute_error_rates(scores, labels, threshold):
    """APCER (spoof with score >= threshold, i.e. taken for live) and BPCER (live with score < threshold)."""
    predicted_live = check_scores(scores) >= threshold
    labels = np.asarray(labels)
    spoof = labels == SPOOF
    live = labels == LIVE
    return {
        "apcer": float(predicted_live[spoof].mean()) if spoof.any() else float("nan"),
        "bpcer": float((~predicted_live[live]).mean()) if live.any() else float("nan"),
    }


def roc_auc(scores, labels):
    """Probability that a live image scores above a spoof image (ties count half)."""
    scores = check_scores(scores)
    labels = np.asarray(labels)
    n_live = int((labels == LIVE).sum())
    n_spoof = int((labels == SPOOF).sum())
    if n_live == 0 or n_spoof == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # tied scores share their mean rank
    return float((ranks[labels == LIVE].sum() - n_live * (n_live + 1) / 2) / (n_live * n_spoof))


def compute_metrics(scores, labels, attack_types, *, threshold=None, unseen_attacks=()):
    """WFAS metrics of P(live) scores, live when score >= threshold (default: their EER point; fit it on val only):
    threshold, acc, apcer, bpcer, acer, auc, eer, apcer_per_attack, worst_apcer, and with unseen_attacks
    {seen,unseen}_{apcer,acer}: the attacks of the types train held or lacked, each against all live images."""
    scores = check_scores(scores)
    labels = np.asarray(labels)
    attack_types = np.asarray(attack_types).astype(str)
    eer_point = eer_threshold(scores, labels)
    threshold = eer_point if threshold is None else threshold
    predicted_live = scores >= threshold
    rates = compute_error_rates(scores, labels, threshold)
    eer_rates = compute_error_rates(scores, labels, eer_point)
    apcer = rates["apcer"]
    bpcer = rates["bpcer"]
    per_attack = {
        a: float(predicted_live[attack_types == a].mean()) for a in sorted(set(attack_types[labels == SPOOF]))
    }
    metrics = {
        "threshold": float(threshold),
        "acc": float((predicted_live == (labels == LIVE)).mean()) if len(labels) else float("nan"),
        "apcer": apcer,
        "bpcer": bpcer,
        "acer": (apcer + bpcer) / 2,
        "auc": roc_auc(scores, labels),
        "eer": (eer_rates["apcer"] + eer_rates["bpcer"]) / 2,
        "apcer_per_attack": per_attack,
        "worst_apcer": max(per_attack.values()) if per_attack else float("nan"),
        "num_images": int(len(labels)),
    }
    if not unseen_attacks:
        return metrics
    for name, unseen in (("seen", False), ("unseen", True)):
        attacks = (labels == SPOOF) & (np.isin(attack_types, unseen_attacks) == unseen)
        metrics[f"{name}_apcer"] = float(predicted_live[attacks].mean()) if attacks.any() else float("nan")
        metrics[f"{name}_acer"] = (metrics[f"{name}_apcer"] + bpcer) / 2
    return metrics


# The false positive rates of the field's cross-dataset tables: TPR at FPR = 1 % and 0.1 % (live taken as positive).
TPR_AT_FPR = (0.01, 0.001)


def tpr_at_fpr(scores, labels, fpr):
    """The highest share of live faces accepted (TPR) at a threshold that accepts at most fpr of the spoof faces
    (APCER <= fpr), counted in images; NaN without both classes."""
    labels = np.asarray(labels)
    num_live = int((labels == LIVE).sum())
    num_spoof = int((labels == SPOOF).sum())
    if not num_live or not num_spoof:
        return float("nan")
    _, spoof_accepted, live_rejected = candidate_thresholds(scores, labels)
    allowed = spoof_accepted <= fpr * num_spoof + 1e-9
    return float((num_live - live_rejected[allowed]).max() / num_live)


def cross_dataset_metrics(scores, labels, attack_types, *, threshold):
    """The field's numbers for a dataset the model never trained on: HTER at threshold (fitted on the training
    data's val: the target's labels never choose it) = (APCER + BPCER) / 2, with APCER, BPCER and the APCER of each
    attack type; and EER, AUC and TPR at FPR 1 % and 0.1 %, which need no threshold."""
    metrics = compute_metrics(scores, labels, attack_types, threshold=threshold)
    return {
        "threshold": metrics["threshold"],
        "hter": metrics["acer"],
        "apcer": metrics["apcer"],
        "bpcer": metrics["bpcer"],
        "acer": metrics["acer"],
        "eer": metrics["eer"],
        "auc": metrics["auc"],
        **{f"tpr_at_fpr_{fpr * 100:g}%": tpr_at_fpr(scores, labels, fpr) for fpr in TPR_AT_FPR},
        "apcer_per_attack": metrics["apcer_per_attack"],
        "num_images": metrics["num_images"],
    }


def by_video(scores, labels, attack_types, *, videos):
    """(scores, labels, attack types) per video: the mean of its frames' scores, as the field's video-level
    numbers take it."""
    videos = np.asarray(videos)
    names, first, inverse = np.unique(videos, return_index=True, return_inverse=True)
    sums = np.bincount(inverse, weights=np.asarray(scores, dtype=np.float64), minlength=len(names))
    counts = np.bincount(inverse, minlength=len(names))
    return sums / counts, np.asarray(labels)[first], np.asarray(attack_types)[first]


METRIC_LABELS = {
    "acc": "ACC",
    "apcer": "APCER",
    "bpcer": "BPCER",
    "acer": "ACER",
    "auc": "AUC",
    "eer": "EER",
    "worst_apcer": "worst-attack APCER",
    "seen_apcer": "seen APCER",
    "seen_acer": "seen ACER",
    "unseen_apcer": "unseen APCER",
    "unseen_acer": "unseen ACER",
}


def format_metrics(metrics, per_attack=False):  # per_attack: the APCER of each attack type too
    text = "  ".join(f"{label} {metrics[key]:.4f}" for key, label in METRIC_LABELS.items() if key in metrics)
    return text + (
        "  APCER per type: " + ", ".join(f"{t} {v:.4f}" for t, v in metrics["apcer_per_attack"].items())
        if per_attack
        else ""
    )


@torch.no_grad()
def predict_probs(model, loader, accelerator, *, mean, std, tta=False, desc="predicting", log_warning=print):
    """(probs [N, 2], dataset indices [N], decoded-ok mask [N]) of every image of loader, each once across the
    processes, on every process. A model that returns a tuple (the stage 2 student) gives its logits first."""
    model.eval()

    def probabilities(images):
        outputs = model(images)
        return (outputs[0] if isinstance(outputs, tuple) else outputs).float().softmax(-1)

    probs = []
    indices = []
    oks = []
    for batch in progress_bar(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        check_batch(batch, log_warning)
        images = to_model_input(batch["image"], mean, std)
        batch_probs = probabilities(images)
        if tta:
            batch_probs = (batch_probs + probabilities(images.flip(-1))) / 2
        # inside the loop: only here does gather_for_metrics drop the sampler's padding duplicates
        batch_probs, batch_indices, batch_ok = accelerator.gather_for_metrics(
            (batch_probs, batch["index"], batch["ok"].to(torch.uint8))
        )
        probs.append(batch_probs.cpu())
        indices.append(batch_indices.cpu())
        oks.append(batch_ok.cpu())
    return torch.cat(probs).numpy(), torch.cat(indices).numpy(), torch.cat(oks).numpy().astype(bool)


def evaluate(
    model, loader, accelerator, *, split_table, mean, std, threshold=None, tta=False, desc="val", log_warning=print
):
    """(loss and metrics of a split at threshold, or its EER point; the Predictions of its decodable images in
    dataset order)."""
    probs, indices, ok = predict_probs(
        model, loader, accelerator, mean=mean, std=std, tta=tta, desc=desc, log_warning=log_warning
    )
    order = np.argsort(indices[ok], kind="stable")
    probs = probs[ok][order]
    indices = indices[ok][order]
    labels = split_table.label[indices]
    attack_types = np.array(split_table.attack_types())[indices]
    metrics = compute_metrics(
        probs[:, 1], labels, attack_types, threshold=threshold, unseen_attacks=split_table.unseen_attacks
    )
    metrics.update(
        loss=float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean()),
        unreadable=int((~ok).sum()),
    )
    predictions = Predictions(
        paths=np.array(split_table.paths())[indices], labels=labels, attack_types=attack_types, scores=probs[:, 1]
    )
    return metrics, predictions


def write_predictions(path, predictions):
    """path,label,attack_type,score, the scores exact: the file reproduces the reported metrics."""

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "attack_type", "score"])
            writer.writerows(
                zip(
                    predictions.paths,
                    predictions.labels.tolist(),
                    predictions.attack_types,
                    map(format_score, predictions.scores),
                )
            )

    write_with(path, write)


def read_predictions(path):
    """The Predictions of a stageN_{val,test}_predictions.csv."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return Predictions(
        paths=np.array([r["path"] for r in rows]),
        labels=np.array([int(r["label"]) for r in rows]),
        attack_types=np.array([r["attack_type"] for r in rows]),
        scores=np.array([float(r["score"]) for r in rows]),
    )


# The error rates a deployer may afford: a threshold is fitted on val for each, and test is scored at it.
OPERATING_POINT_TARGETS = (("bpcer", 0.01), ("bpcer", 0.001), ("apcer", 0.01), ("apcer", 0.001))


def operating_points(*, val_scores, val_labels, test_scores, test_labels, targets=OPERATING_POINT_TARGETS):
    """For each (error, target), the val threshold that keeps that error within the target with the other as low
    as it goes, and the val and test APCER/BPCER at it. A target below one image of its class on val cannot be
    told from 0 there: that point is fitted to no error on val and flagged resolved=False."""
    val_labels = np.asarray(val_labels)
    test_labels = np.asarray(test_labels)
    if not (val_labels == LIVE).any() or not (val_labels == SPOOF).any():
        return []
    candidates, spoof_accepted, live_rejected = candidate_thresholds(val_scores, val_labels)
    num_live = int((val_labels == LIVE).sum())
    num_spoof = int((val_labels == SPOOF).sum())
    points = []
    for error, target in targets:
        # errors compared in images (as rates, 1 - 99/100 exceeds 1%); 1e-9: 0.29 * 100 is 28.999999999999996
        if error == "bpcer":  # BPCER grows with the threshold: the highest one within the target
            num_class = num_live
            index = np.flatnonzero(live_rejected <= target * num_live + 1e-9)[-1]
        else:  # APCER falls as the threshold grows: the lowest one within the target
            num_class = num_spoof
            index = np.flatnonzero(spoof_accepted <= target * num_spoof + 1e-9)[0]
        threshold = float(candidates[index])
        test = compute_error_rates(test_scores, test_labels, threshold)
        points.append(
            {
                "target": f"{error.upper()} {target * 100:g}%",
                "error": error,
                "target_rate": target,
                "threshold": threshold,
                "val_apcer": float(spoof_accepted[index] / num_spoof),
                "val_bpcer": float(live_rejected[index] / num_live),
                "test_apcer": test["apcer"],
                "test_bpcer": test["bpcer"],
                "resolved": bool(num_class * target >= 1),
            }
        )
    return points


def format_operating_points(points):
    """A table to log: one line per target."""
    lines = ["operating points (threshold fitted on val; test scored at it):"]
    for p in points:
        lines.append(
            f"  {p['target']:>10}: threshold {p['threshold']:.6f}  val APCER {p['val_apcer']:.4f} BPCER "
            f"{p['val_bpcer']:.4f}  test APCER {p['test_apcer']:.4f} BPCER {p['test_bpcer']:.4f}"
            + ("" if p["resolved"] else "  (val too small to resolve this target)")
        )
    return "\n".join(lines)


def score_table(
    model,
    accelerator,
    table,
    *,
    img_size,
    face_crop_scale,
    batch_size,
    num_workers,
    tta,
    cache=None,
    desc="scoring",
    log_warning=print,
):
    """P(live) of every image of an unlabelled table, in table order, each image scored once whatever the
    number of processes; NaN where an image cannot be decoded."""
    dataset = FaceDataset(table, img_size, face_crop_scale=face_crop_scale, cache=cache)
    loader = accelerator.prepare(
        torch.utils.data.DataLoader(dataset, batch_size=batch_size, **default_loader_settings(num_workers))
    )
    _, mean, std = networks.model_input(accelerator.unwrap_model(model))
    probs, indices, ok = predict_probs(
        model, loader, accelerator, mean=mean, std=std, tta=tta, desc=desc, log_warning=log_warning
    )
    scores = np.full(len(table), np.nan)
    scores[indices[ok]] = probs[ok, 1]
    return scores
