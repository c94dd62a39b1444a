"""EXP/plots/ and EXP/report.md, drawn from an experiment folder's files alone (results, prediction CSVs,
summary.csv, split.csv, configs): each stage writes them when it ends, and tools/report.py redraws them, e.g.
after editing a plot. Plots need matplotlib (in requirements.txt); without it report.md is still written, with
one warning.
"""

import csv
import json
import os
from pathlib import Path

import numpy as np

from evaluation import check_scores, compute_metrics, read_predictions, roc_auc
from output_files import aside
from wfas_data import LIVE, SPLITS, SPOOF

RESULTS = {"stage1": "stage1_results.json", "stage2": "final_results.json"}


def write_all(output_dir, stages=("stage1", "stage2"), log=print, force=True):
    """The plots of each finished stage among `stages` (without force, only those older than their inputs), then
    report.md. Returns report.md's path."""
    for stage in stages:
        if (Path(output_dir) / RESULTS[stage]).is_file() and (force or not plots_up_to_date(output_dir, stage)):
            make_plots(output_dir, stage, log)
    return write_report(output_dir)


def summary_files(output_dir, stage):
    """logs/<stage>/summary.csv, or with --soft_label_folds one summary_fold<k>.csv per fold teacher."""
    logs = Path(output_dir) / "logs" / stage
    return [logs / "summary.csv"] if (logs / "summary.csv").is_file() else sorted(logs.glob("summary_fold*.csv"))


def plots_up_to_date(output_dir, stage):
    """Whether every plot of the stage is there and newer than the files it is drawn from."""
    output_dir = Path(output_dir)
    inputs = [
        output_dir / RESULTS[stage],
        *(summary_files(output_dir, stage) or [output_dir / "summary.csv"]),
        *(output_dir / f"{stage}_{name}_predictions.csv" for name in ("val", "test")),
    ]
    names = ["training_curves", "roc_det", "score_histograms", "apcer_per_attack"]
    if stage == "stage2" and (output_dir / "stage1_test_predictions.csv").is_file():
        names.append("teacher_vs_student")
        inputs.append(output_dir / "stage1_test_predictions.csv")
    plots = [output_dir / "plots" / f"{stage}_{name}.png" for name in names]
    if not all(path.is_file() for path in plots + inputs):
        return False
    return min(path.stat().st_mtime for path in plots) > max(path.stat().st_mtime for path in inputs)


def error_rate_curve(scores, labels):
    """APCER and BPCER at every threshold between the scores, from accepting all to rejecting all."""
    scores = check_scores(scores)
    labels = np.asarray(labels)
    live = np.sort(scores[labels == LIVE])
    spoof = np.sort(scores[labels == SPOOF])
    thresholds = np.concatenate([[-np.inf], np.unique(scores), [np.inf]])
    apcer = 1 - np.searchsorted(spoof, thresholds, side="left") / max(len(spoof), 1)
    bpcer = np.searchsorted(live, thresholds, side="left") / max(len(live), 1)
    return apcer, bpcer


def make_plots(output_dir, stage, log=print):
    """EXP/plots/<stage>_*.png, from EXP's files alone: training curves (logs/<stage>/summary.csv), ROC and DET
    on val and test with the val operating point, test score histograms, APCER per attack type (the prediction
    CSVs) and, for stage 2, teacher vs student. Never fails the run: a missing matplotlib or a failing plot is
    one warning. Returns the files written."""
    try:  # Figure without pyplot: no backend to choose, nothing global changed (a notebook keeps its own)
        from matplotlib.figure import Figure
        from statistics import NormalDist
    except ImportError:
        log(f"warning: no plots for {stage}: matplotlib is not installed (pip install matplotlib)")
        return []
    output_dir = Path(output_dir)
    plot_dir = output_dir / "plots"
    written = []

    def save(fig, name):
        path = plot_dir / f"{stage}_{name}.png"
        fig.tight_layout()
        tmp = aside(path).with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
        written.append(path)

    try:
        results = json.loads((output_dir / RESULTS[stage]).read_text())
        threshold = results["threshold"]
        val = read_predictions(output_dir / f"{stage}_val_predictions.csv")
        test = read_predictions(output_dir / f"{stage}_test_predictions.csv")
        test_metrics = compute_metrics(test.scores, test.labels, test.attack_types, threshold=threshold)
        teacher_csv = output_dir / "stage1_test_predictions.csv"
        teacher_test = None
        if stage == "stage2" and teacher_csv.is_file():
            teacher_test = read_predictions(teacher_csv)
        plot_dir.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(13, 3.6))
        axes = fig.subplots(1, 3)
        files = summary_files(output_dir, stage)
        if not files:
            raise FileNotFoundError(f"no summary.csv in {output_dir / 'logs' / stage}")
        for path in files:  # one per fold teacher with --soft_label_folds
            with open(path, newline="") as f:
                summary = list(csv.DictReader(f))
            epochs = [int(r["epoch"]) for r in summary]
            fold = path.stem.removeprefix("summary").replace("_", " ")
            for key in [k for k in summary[0] if k.startswith("train_") and k != "train_images_per_second"] + [
                "val_loss"
            ]:
                if key in summary[0] and summary[0][key] != "":
                    axes[0].plot(epochs, [float(r[key]) for r in summary], marker="o", label=key + fold)
            for key in ("val_acer", "val_auc"):
                axes[1].plot(
                    epochs, [float(r[key]) for r in summary], marker="o", label=key.replace("val_", "val ") + fold
                )
            axes[2].plot(epochs, [float(r["lr"]) for r in summary], marker="o", label=fold.strip() or None)
        axes[0].set(title="loss", xlabel="epoch")
        axes[0].legend(fontsize=8)
        axes[1].set(title="validation", xlabel="epoch", ylim=(0, 1))
        axes[1].legend(fontsize=8)
        axes[2].set(title="learning rate (end of epoch)", xlabel="epoch", yscale="log")
        save(fig, "training_curves")

        fig = Figure(figsize=(10, 4.2))
        roc, det = fig.subplots(1, 2)
        deviate = NormalDist().inv_cdf
        ticks = [0.001, 0.01, 0.05, 0.2, 0.5]
        for name, predictions in (("val", val), ("test", test)):
            scores = predictions.scores
            labels = predictions.labels
            apcer, bpcer = error_rate_curve(scores, labels)
            roc.plot(apcer, 1 - bpcer, label=f"{name} (AUC {roc_auc(scores, labels):.3f})")
            keep = (apcer > 0) & (apcer < 1) & (bpcer > 0) & (bpcer < 1)
            det.plot([deviate(a) for a in apcer[keep]], [deviate(b) for b in bpcer[keep]], label=name)
            point = compute_metrics(scores, labels, np.full(len(labels), "x"), threshold=threshold)
            roc.plot(point["apcer"], 1 - point["bpcer"], "o", color=roc.lines[-1].get_color())
            if 0 < point["apcer"] < 1 and 0 < point["bpcer"] < 1:
                det.plot(deviate(point["apcer"]), deviate(point["bpcer"]), "o", color=det.lines[-1].get_color())
        roc.set(
            title=f"ROC (dots: the val threshold {threshold:.3f})",
            xlabel="APCER (spoof accepted)",
            ylabel="1 - BPCER (live accepted)",
        )
        det.set(title="DET (normal deviate axes)", xlabel="APCER", ylabel="BPCER")
        det.set(xlim=(deviate(0.0005), deviate(0.6)), ylim=(deviate(0.0005), deviate(0.6)))
        det.set_xticks([deviate(t) for t in ticks], [f"{t:g}" for t in ticks])
        det.set_yticks([deviate(t) for t in ticks], [f"{t:g}" for t in ticks])
        roc.legend(fontsize=8)
        det.legend(fontsize=8)
        save(fig, "roc_det")

        labels = test.labels
        scores = test.scores
        fig = Figure(figsize=(6, 3.6))
        axis = fig.subplots()
        bins = np.linspace(0, 1, 41)
        axis.hist(scores[labels == LIVE], bins, alpha=0.6, label="live")
        axis.hist(scores[labels == SPOOF], bins, alpha=0.6, label="spoof")
        axis.axvline(threshold, color="k", linestyle="--", label=f"val threshold {threshold:.3f}")
        axis.set(title="test scores P(live)", xlabel="score", ylabel="images")
        axis.legend(fontsize=8)
        save(fig, "score_histograms")

        per_attack = test_metrics["apcer_per_attack"]
        fig = Figure(figsize=(7, 0.35 * len(per_attack) + 1.5))
        axis = fig.subplots()
        axis.barh(list(per_attack), list(per_attack.values()))
        axis.set(title="test APCER per attack type at the val threshold", xlabel="APCER", xlim=(0, 1))
        save(fig, "apcer_per_attack")

        if teacher_test is not None:
            fig = Figure(figsize=(10, 4))
            roc, bars = fig.subplots(1, 2)
            for name, predictions in (("teacher (stage 1)", teacher_test), ("student (stage 2)", test)):
                apcer, bpcer = error_rate_curve(predictions.scores, predictions.labels)
                auc = roc_auc(predictions.scores, predictions.labels)
                roc.plot(apcer, 1 - bpcer, label=f"{name}, AUC {auc:.3f}")
            roc.set(title="test ROC", xlabel="APCER", ylabel="1 - BPCER")
            roc.legend(fontsize=8)
            teacher_metrics = compute_metrics(teacher_test.scores, teacher_test.labels, teacher_test.attack_types)
            names = ["acer", "apcer", "bpcer", "eer"]
            x = np.arange(len(names))
            bars.bar(x - 0.2, [teacher_metrics[n] for n in names], 0.4, label="teacher (its own EER point)")
            bars.bar(x + 0.2, [test_metrics[n] for n in names], 0.4, label="student (val threshold)")
            bars.set_xticks(x, [n.upper() for n in names])
            bars.set(title="test error rates")
            bars.legend(fontsize=8)
            save(fig, "teacher_vs_student")
    except Exception as error:  # plots are a convenience: never the reason a multi-day run fails
        log(f"warning: plotting {stage} stopped ({type(error).__name__}: {error}); the results are unaffected")
    return written


def unseen_attack_section(split_source, stage1, final):
    """report.md's lines on the attack types held out of train (--unseen_attacks): test APCER and ACER of the seen
    and the unseen types (ACER with the BPCER of all live images), and APCER per type; none without them."""
    unseen = split_source.get("unseen_attacks") or []
    tests = [
        (name, metrics)
        for name, metrics in (
            ("teacher (stage 1)", stage1 and stage1["test"]),
            ("student (stage 2)", final and {k.removeprefix("test_"): v for k, v in final.items()}),
        )
        if metrics
    ]
    if not unseen or not tests:
        return []
    lines = [
        "",
        "## Attack types never seen in training (test)",
        "",
        f"Held out of train: {', '.join(unseen)}.",
        "",
        "| model | ACER (all) | seen APCER | seen ACER | unseen APCER | unseen ACER |",
        "|---" * 6 + "|",
    ]
    lines += [
        f"| {name} | "
        + " | ".join(f"{m[k]:.4f}" for k in ("acer", "seen_apcer", "seen_acer", "unseen_apcer", "unseen_acer"))
        + " |"
        for name, m in tests
    ]
    types = sorted(set().union(*(m["apcer_per_attack"] for _, m in tests)))
    lines += [
        "",
        "| attack type | " + " | ".join(f"{name}: APCER" for name, _ in tests) + " |",
        "|---|" + "---|" * len(tests),
    ]
    lines += [
        f"| {t}{' (unseen)' if t in unseen else ''} | "
        + " | ".join(f"{m['apcer_per_attack'].get(t, float('nan')):.4f}" for _, m in tests)
        + " |"
        for t in types
    ]
    return lines


def cross_dataset_section(output_dir):
    """The report's lines for the datasets tools/predict.py --evaluate scored (EXP/cross_dataset/*_metrics.json)."""
    files = sorted((output_dir / "cross_dataset").glob("*_metrics.json"))
    if not files:
        return []
    lines = [
        "",
        "## Cross-dataset evaluation",
        "",
        "Datasets scored by `tools/predict.py --evaluate`, at the threshold fitted on this experiment's val.",
        "",
        "| dataset | scope | level | count | HTER | APCER | BPCER | EER | AUC | TPR@FPR=1% | TPR@FPR=0.1% |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in files:
        metrics = json.loads(path.read_text())
        for level in ("frame", "video"):
            if level not in metrics:
                continue
            m = metrics[level]
            lines.append(
                f"| {metrics['dataset']} | {metrics['scope']} | {level} | {m['num_images']} | {m['hter']:.4f} | "
                f"{m['apcer']:.4f} | {m['bpcer']:.4f} | {m['eer']:.4f} | {m['auc']:.4f} | {m['tpr_at_fpr_1%']:.4f} | "
                f"{m['tpr_at_fpr_0.1%']:.4f} |"
            )
    return lines


def write_report(output_dir):
    """EXP/report.md: the key metrics of both stages, their plots, the configuration and the data, at a glance.
    Built from the files in EXP, so either stage (or this tool) can (re)write it. Returns its path."""
    output_dir = Path(output_dir)

    def load(name):
        path = output_dir / name
        return json.loads(path.read_text()) if path.is_file() else None

    stage1 = load("stage1_results.json")
    final = load("final_results.json")
    lines = [f"# WFAS experiment report: {output_dir.name}", ""]
    rows = []
    if stage1:
        t = stage1["test"]
        rows.append(
            ("teacher (stage 1)", t["acc"], t["apcer"], t["bpcer"], t["acer"], t["auc"], t["eer"], stage1["threshold"])
        )
    if final:
        rows.append(
            (
                "student (stage 2)",
                final["test_acc"],
                final["test_apcer"],
                final["test_bpcer"],
                final["test_acer"],
                final["test_auc"],
                final["test_eer"],
                final["threshold"],
            )
        )
    lines += [
        "## Test metrics (at the val EER threshold)",
        "",
        "| model | ACC | APCER | BPCER | ACER | AUC | EER | threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r[0]} | " + " | ".join(f"{v:.4f}" for v in r[1:]) + " |" for r in rows]
    if final:
        lines += [
            "",
            f"Student: test ACER {final['test_acer']:.4f}, ACC {final['test_acc']:.4f}, worst-attack APCER "
            f"{final['test_worst_apcer']:.4f}, on {final['num_test_images']} test images; best epoch "
            f"{final['best_epoch']}.",
        ]
    lines += unseen_attack_section(load("split_source.json") or {}, stage1, final)
    if final and final.get("operating_points"):
        lines += [
            "",
            "## Operating points of the student",
            "",
            "Thresholds fitted on val for the error a deployment can afford; test is scored at each. "
            "`resolved: no` means val has too few images of that class to tell the target from 0.",
            "",
            "| target | threshold | val APCER | val BPCER | test APCER | test BPCER | resolved |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {p['target']} | {p['threshold']:.6f} | {p['val_apcer']:.4f} | {p['val_bpcer']:.4f} | "
            f"{p['test_apcer']:.4f} | {p['test_bpcer']:.4f} | {'yes' if p['resolved'] else 'no'} |"
            for p in final["operating_points"]
        ]
    lines += cross_dataset_section(output_dir)
    compute = [
        (name, results["compute"])
        for name, results in (("teacher (stage 1)", stage1), ("student (stage 2)", final))
        if results and results.get("compute")
    ]
    if compute:
        lines += [
            "",
            "## Compute budget",
            "",
            "| model | network | input | params (M) | GMACs | GFLOPs |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {c['model_name']} | {c['img_size']} | {c['params_m']:.2f} | {c['gmacs']:.3f} | "
            f"{c['gflops']:.3f} |"
            for name, c in compute
        ]
        lines += ["", "GFLOPs = 2 x GMACs. " + " ".join(c["challenge_limit"] for _, c in compute)]
    plots = sorted((output_dir / "plots").glob("*.png")) if (output_dir / "plots").is_dir() else []
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    csv_path = output_dir / "split.csv"
    if csv_path.is_file():
        with open(csv_path, newline="") as f:
            split_rows = list(csv.DictReader(f))
        lines += [
            "",
            "## Data",
            "",
            "| split | images | live | spoof | subjects | attack types |",
            "|---|---|---|---|---|---|",
        ]
        for name in SPLITS:
            part = [r for r in split_rows if r["split"] == name]
            lines.append(
                f"| {name} | {len(part)} | {sum(r['label'] == str(LIVE) for r in part)} | "
                f"{sum(r['label'] == str(SPOOF) for r in part)} | "
                f"{len({(r['attack_type'], r['subject']) for r in part})} | "
                f"{len({r['attack_type'] for r in part if r['label'] == str(SPOOF)})} |"
            )
    for stage in ("stage1", "stage2"):
        config = load(f"{stage}_config.json")
        if config:
            lines += ["", f"## Configuration of {stage}", "", "```json", json.dumps(config, indent=1), "```"]
    path = output_dir / "report.md"
    tmp = aside(path)
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
