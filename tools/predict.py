"""Score images with a trained checkpoint of either stage: the challenge submission from the Dev/Test lists, and
any folder of images. Works under `accelerate launch` too, every image counted once.

    python tools/predict.py --output_dir EXP --predict_lists WFAS/Dev/Dev.txt WFAS/Test/Test.txt   # submission
    python tools/predict.py --output_dir EXP --predict_folder photos/ [--threshold 0.3]
    accelerate launch tools/predict.py --output_dir EXP --stage 1 --predict_folder photos/

--predict_lists writes EXP/submission.txt and submission.zip (`dev/<name> <P(live)>` lines, dev before test).
--predict_folder writes EXP/predictions_<folder name>.csv, one row per face: path, face, score, decision, the box
(x1 y1 x2 y2), where it came from and the detector's score. A face is the bbox .txt next to an image when there is
one, else the largest face the offline detector finds (face_detector.py; --all_faces: every face), the crop taken
around it as in training. An image with no face gets the decision no_face and no score: the whole frame, which
the model never saw in training, is never scored; --whole_image scores every image whole, for a folder of face
crops. Live when P(live) >= the threshold (default: the val EER point of the checkpoint's run). --save_overlays
DIR draws each face's box, P(live) and decision on a copy of its image.

    python tools/predict.py --output_dir EXP --predict_video clip.mp4 [--save_video overlay.mp4]
    python tools/predict.py --output_dir EXP --predict_video 0 --max_frames 300     # the local webcam 0

--predict_video reads a video file, or a camera by its index, through OpenCV: each frame's faces are detected,
the largest is followed across frames (liveness.StreamDecision) and scored, its P(live) smoothed over time (an
exponential moving average, --smoothing of the newest frame) and decided once its track is --min_frames long.
It writes EXP/video_<name>.csv (a row per frame: time, box, P(live), the smoothed P(live), the decision) and
gives the clip's decision: the decision of most of its decided frames. --save_video draws them on the frames.
--onnx scores with an export of tools/export_onnx.py (fp32 or INT8) instead of the checkpoint, for
--predict_folder and --predict_video.

    python tools/predict.py --output_dir EXP --evaluate msu_mfsd_frames/ [--all] [--protocol oulu_npu:3.2]

--evaluate scores a labelled dataset the model may never have seen (any --data_root source: DIR or FORMAT:DIR, the
frames of a video set included): its official test split, or all of it with --all. It writes
EXP/cross_dataset/<name>_metrics.json: HTER at EXP's val threshold, APCER, BPCER, EER, AUC, TPR at FPR 1 % and
0.1 % and the APCER of each attack type, per frame and per video (a video's score is the mean of its frames'), and
<name>_predictions.csv beside it; report.md gets a cross-dataset section.
"""

import argparse
import contextlib
import csv
import functools
import json
import sys
import time
import zipfile
from typing import NamedTuple
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluation  # noqa: E402
import liveness  # noqa: E402
import experiment_report  # noqa: E402
import face_cache  # noqa: E402
import face_detector  # noqa: E402
import fas_formats  # noqa: E402
import networks  # noqa: E402
import training_run  # noqa: E402
import wfas_data  # noqa: E402
from tools.checkpoint_flags import checkpoint_parser  # noqa: E402
from errors import StorageError, UserError, run_cli  # noqa: E402
from progress import progress_bar  # noqa: E402
from output_files import format_score, write_json, write_with  # noqa: E402

logger = get_logger("predict")


def parse_args(argv=None):
    parser = checkpoint_parser(__doc__)
    parser.add_argument(
        "--predict_lists",
        nargs="+",
        metavar="LIST",
        help="the unlabelled challenge lists (Dev.txt Test.txt) to score into EXP/submission.txt",
    )
    parser.add_argument(
        "--predict_folder", metavar="DIR", help="score every image below DIR into EXP/predictions_<DIR name>.csv"
    )
    parser.add_argument("--predict_video", metavar="FILE|INDEX", help="a video file, or a camera index (0, 1...)")
    parser.add_argument(
        "--evaluate", metavar="SOURCE", help="a labelled dataset (DIR or FORMAT:DIR) to score and measure"
    )
    parser.add_argument(
        "--all", action="store_true", help="--evaluate: all of the dataset, not its official test split"
    )
    parser.add_argument(
        "--protocol", nargs="+", default=[], metavar="FORMAT:PROTOCOL", help="--evaluate: as for train_stage1.py"
    )
    parser.add_argument("--onnx", help="an ONNX export (fp32 or INT8) to score with instead of the checkpoint")
    parser.add_argument("--smoothing", type=float, default=0.3, help="--predict_video: weight of the newest frame")
    parser.add_argument(
        "--min_frames", type=int, default=5, help="--predict_video: frames of a face it takes to decide"
    )
    parser.add_argument("--save_video", metavar="FILE.mp4", help="--predict_video: the frames with the decisions")
    parser.add_argument("--max_frames", type=int, help="--predict_video: stop after this many frames (a camera)")
    parser.add_argument(
        "--all_faces", action="store_true", help="--predict_folder: a row for every detected face, not only the largest"
    )
    parser.add_argument(
        "--whole_image",
        action="store_true",
        help="--predict_folder: score each image whole, without detection (a folder of face crops)",
    )
    parser.add_argument(
        "--min_face_score",
        type=float,
        default=face_detector.DEFAULT_MIN_SCORE,
        help=f"the detector's confidence threshold (default: {face_detector.DEFAULT_MIN_SCORE})",
    )
    parser.add_argument(
        "--save_overlays",
        metavar="DIR",
        help="--predict_folder: a copy of each image with its faces' boxes, P(live) and decisions, below DIR",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help="live when P(live) >= this, for --predict_folder (default: the val EER threshold of the checkpoint's run)",
    )
    parser.add_argument("--batch_size", type=int, default=32, help="per process (default: 32)")
    parser.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="loader workers per process (default: the node's cores shared by its processes)",
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average with a horizontal flip (default: as the checkpoint's run was evaluated)",
    )
    parser.add_argument(
        "--face_cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="crop the challenge lists' faces once into a cache, as training does (default: on)",
    )
    parser.add_argument("--face_cache_dir", help="where face caches live (default: EXP/face_cache)")
    args = parser.parse_args(argv)
    if not (args.predict_lists or args.predict_folder or args.predict_video or args.evaluate):
        raise UserError(
            "nothing to score: pass --predict_lists (e.g. WFAS/Dev/Dev.txt WFAS/Test/Test.txt), --predict_folder DIR, "
            "--predict_video FILE or --evaluate DATASET"
        )
    if args.onnx and args.predict_lists:
        raise UserError("--onnx scores --predict_folder and --predict_video; the submission uses the checkpoint")
    if not 0 < args.smoothing <= 1:
        raise UserError(f"--smoothing {args.smoothing}: the newest frame's weight lies in (0, 1]")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise UserError(f"--threshold {args.threshold} is not a probability: P(live) lies in [0, 1]")
    args.face_cache_dir = args.face_cache_dir or str(Path(args.output_dir) / "face_cache")
    config = Path(args.output_dir) / f"stage{args.stage}_config.json"
    if args.tta is None:
        args.tta = bool(args.checkpoint is None and config.is_file() and json.loads(config.read_text()).get("tta"))
    return args


def challenge_set(list_file):
    """'dev' or 'test': the challenge set of a list, from its file name or else its folder's name."""
    path = Path(list_file).expanduser().absolute()
    for name in (path.stem.lower(), path.parent.name.lower()):
        found = [candidate for candidate in ("dev", "test") if candidate in name]
        if len(found) == 1:
            return found[0]
    raise UserError(
        f"cannot tell whether {list_file} is the dev or the test list: its file name or folder must "
        "contain 'dev' or 'test' (as WFAS/Dev/Dev.txt and WFAS/Test/Test.txt do)"
    )


def zip_one(path, member):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(member, arcname=member.name)


def write_submission(args, accelerator, *, score, img_size, face_crop_scale):
    """EXP/submission.txt in list order, dev before test, and a zip of it. An image that cannot be decoded still
    gets its line, with 0.5, and a warning. Scores keep 12 decimals, so that confident ones do not collapse
    into ties at 1 or 0."""
    sets = {list_file: challenge_set(list_file) for list_file in args.predict_lists}
    if len(set(sets.values())) < len(sets):
        raise UserError(
            f"--predict_lists {' '.join(args.predict_lists)}: give one dev and one test list, not "
            f"{', '.join(sets.values())}"
        )
    lines = []
    for list_file in sorted(args.predict_lists, key=lambda p: sets[p] != "dev"):
        folder, names = wfas_data.read_prediction_list(list_file)
        table = wfas_data.unlabelled_table(folder, names)
        workers = wfas_data.default_loader_settings(args.num_workers)["num_workers"]
        cache = None
        if args.face_cache:
            cache = face_cache.build_for_processes(
                table,
                args.face_cache_dir,
                img_size=img_size,
                face_crop_scale=face_crop_scale,
                workers=workers,
                accelerator=accelerator,
                log=logger.info,
            )
        scores = score(table, cache=cache, desc=Path(list_file).name)
        undecodable = np.isnan(scores)
        if undecodable.any():
            logger.warning(f"{int(undecodable.sum())} images of {list_file} could not be decoded; they are scored 0.5")
            scores[undecodable] = 0.5
        prefix = sets[list_file]
        keys = [name if name.startswith(prefix + "/") else f"{prefix}/{name}" for name in names]
        lines += [f"{key} {score:.12f}" for key, score in zip(keys, np.clip(scores, 0, 1))]
    txt = Path(args.output_dir) / "submission.txt"
    archive = Path(args.output_dir) / "submission.zip"
    if accelerator.is_main_process:
        write_with(txt, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
        write_with(archive, lambda tmp: zip_one(tmp, txt))
        logger.info(f"Wrote {len(lines)} scores to {txt} and {archive}")
    return str(txt)


class FaceRow(NamedTuple):
    """A face to score in a folder's image."""

    image: int  # the image's index in the folder's list
    points: np.ndarray | None  # (7, 2): the box's corners and 5 landmarks; None: the whole image, or nothing to score
    source: str  # bbox file, detector, whole image, no face or undecodable
    detector_score: float  # NaN without the detector


def find_faces(args, folder, paths, accelerator):
    """The FaceRows to score, from the bbox files and, for the images without one, the detector, which the main
    process runs and the others receive. An image with no face, or that does not decode, has one row without
    points."""
    table = wfas_data.unlabelled_table(folder, paths)
    if args.whole_image:
        return [FaceRow(image=i, points=None, source="whole image", detector_score=np.nan) for i in range(len(paths))]
    rows = []
    error = None
    found = {}
    if accelerator.is_main_process:
        missing = np.flatnonzero(np.isnan(table.box[:, 0]))
        try:  # a user error (the detector not installed, an unreadable file) reaches every process
            detector = face_detector.FaceDetector(args.min_face_score) if len(missing) else None
            for i in progress_bar(missing, desc="detecting faces", disable=not len(missing)):
                try:
                    found[i] = detector.detect(face_detector.read_rgb(folder / paths[i]))
                except wfas_data.DECODE_ERRORS:
                    found[i] = None
        except UserError as exc:
            error = str(exc) + (
                "" if isinstance(exc, StorageError) else "; or pass --whole_image to score a folder of face crops whole"
            )
        for i in range(len(paths)):
            if i not in found:
                box = table.box[i]
                points = np.array([box[:2], box[2:]])
                rows.append(FaceRow(image=i, points=points, source="bbox file", detector_score=np.nan))
            elif not found[i]:
                source = "no face" if found[i] is not None else "undecodable"
                rows.append(FaceRow(image=i, points=None, source=source, detector_score=np.nan))
            else:
                faces = found[i][: None if args.all_faces else 1]
                rows += [
                    FaceRow(image=i, points=points, source="detector", detector_score=score) for score, points in faces
                ]
    rows, error = broadcast_object_list([rows, error])
    if error:
        raise UserError(error)
    return rows


def decide(source, score, threshold):
    """A face's decision: no_face or undecodable when there was nothing to score, else live or spoof."""
    if source in ("no face", "undecodable"):
        return source.replace(" ", "_")
    if np.isnan(score):
        return "undecodable"
    return liveness.decision(score, threshold)


def score_folder(args, accelerator, *, score, threshold):
    """EXP/predictions_<folder name>.csv, one row per face (see the docstring). An image that cannot be decoded,
    or holds no face, keeps a row, with an empty score and the decision "undecodable" or "no_face"."""
    folder = Path(args.predict_folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"--predict_folder {folder} is not a folder")
    paths = wfas_data.list_images(folder)
    if not paths:
        raise UserError(
            f"--predict_folder {folder} holds no images ({', '.join(sorted(wfas_data.IMAGE_EXTENSIONS))} "
            "files, at any depth)"
        )
    rows = find_faces(args, folder, paths=paths, accelerator=accelerator)
    scored = [k for k, row in enumerate(rows) if row.points is not None or row.source == "whole image"]
    table = wfas_data.unlabelled_table(folder, [paths[rows[k].image] for k in scored])
    table.box = np.array(
        [rows[k].points[:2].reshape(-1) if rows[k].points is not None else [np.nan] * 4 for k in scored],
        dtype=np.float32,
    ).reshape(-1, 4)
    scores = np.full(len(rows), np.nan)
    if scored:
        scores[scored] = score(table, desc=folder.name)
    decisions = np.array([decide(row.source, score, threshold) for row, score in zip(rows, scores)])
    csv_path = Path(args.output_dir) / f"predictions_{folder.resolve().name}.csv"

    def write(tmp):
        face_number = {}
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                ["path", "face", "score", "decision", "x1", "y1", "x2", "y2", "box_source", "detector_score"]
            )
            for (i, points, source, detector_score), score, decision in zip(rows, scores, decisions):
                face_number[i] = face_number.get(i, -1) + 1
                box = [] if points is None else [f"{v:.1f}" for v in points[:2].reshape(-1)]
                writer.writerow(
                    [
                        paths[i],
                        face_number[i],
                        "" if np.isnan(score) else format_score(score),
                        decision,
                        *(box or [""] * 4),
                        "" if source in ("no face", "undecodable") else source,
                        "" if np.isnan(detector_score) else f"{detector_score:.4f}",
                    ]
                )

    if accelerator.is_main_process:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        write_with(csv_path, write)
        if args.save_overlays:
            for i in progress_bar(sorted({row.image for row in rows}), desc="overlays"):
                drawn = [
                    (row.points, score, decision)
                    for row, score, decision in zip(rows, scores, decisions)
                    if row.image == i and row.points is not None
                ]
                with contextlib.suppress(*wfas_data.DECODE_ERRORS):
                    face_detector.draw_overlay(
                        face_detector.read_rgb(folder / paths[i]),
                        drawn,
                        Path(args.save_overlays) / Path(paths[i]).with_suffix(".jpg"),
                    )
    counts = {name: int((decisions == name).sum()) for name in ("live", "spoof", "no_face", "undecodable")}
    if counts["undecodable"]:
        logger.warning(
            f"{counts['undecodable']} of the {len(paths)} images below {folder} could not be decoded: their "
            "rows in the CSV have an empty score"
        )
    logger.info(
        f"Scored {len(paths)} images below {folder}: {len(rows)} rows, {counts['live']} live, "
        f"{counts['spoof']} spoof at threshold {threshold:.6f}, {counts['no_face']} images with no face; "
        f"wrote {csv_path}" + (f" and overlays below {args.save_overlays}" if args.save_overlays else "")
    )
    return str(csv_path)


def run_threshold(args, metadata):
    """--threshold, else the final val threshold of EXP's run when the checkpoint is EXP's own best (it is fitted
    as test is scored, with --tta too), else the val EER threshold the checkpoint recorded."""
    if args.threshold is not None:
        return args.threshold
    results = Path(args.output_dir) / experiment_report.RESULTS[f"stage{args.stage}"]
    if args.checkpoint is None and results.is_file():
        return json.loads(results.read_text())["threshold"]
    threshold = metadata.get("val_metrics", {}).get("threshold")
    if threshold is None:
        raise UserError("the checkpoint records no val threshold; pass --threshold T")
    return threshold


def evaluate_dataset(args, accelerator, *, score, threshold):
    """EXP/cross_dataset/<name>_metrics.json and _predictions.csv of --evaluate (see the docstring)."""
    table = wfas_data.index_dataset(args.evaluate)
    protocols = fas_formats.parse_protocols(args.protocol)
    official_splits = wfas_data.apply_protocols(table, protocols, val_fraction=0, seed=0)
    table = official_splits.table
    official = official_splits.split
    chosen = np.ones(len(table), dtype=bool)
    scope = "all"
    if not args.all:
        if (official < 0).all():
            raise UserError(f"--evaluate {args.evaluate} has no official test split: pass --all to score all of it")
        chosen = official == wfas_data.SPLITS.index("test")
        scope = "test"
    table = table.select(chosen)
    scores = score(table, desc="evaluating")
    decoded = ~np.isnan(scores)
    if not decoded.all():
        logger.warning(f"{int((~decoded).sum())} images of {args.evaluate} could not be decoded: left out")
    labels = table.label[decoded]
    attack_types = np.array(table.attack_types())[decoded]
    videos = np.array([v.decode() for v in table.video])[decoded]
    frame_level = evaluation.cross_dataset_metrics(scores[decoded], labels, attack_types, threshold=threshold)
    metrics = {"dataset": str(args.evaluate), "scope": scope, "frame": frame_level}
    if videos.all():  # frames of videos: the video-level numbers too
        video_scores, video_labels, video_types = evaluation.by_video(
            scores[decoded], labels, attack_types, videos=videos
        )
        metrics["video"] = evaluation.cross_dataset_metrics(
            video_scores, video_labels, video_types, threshold=threshold
        )
    sources = sorted({s.decode() for s in table.source})
    name = "+".join(sources) + ("" if scope == "test" else "_all")
    folder = Path(args.output_dir) / "cross_dataset"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["path", "label", "attack_type", "video", "score"])
                for path, label, attack_type, video, score in zip(
                    np.array(table.paths())[decoded], labels.tolist(), attack_types, videos, scores[decoded]
                ):
                    writer.writerow([path, label, attack_type, video, format_score(score)])

        write_with(folder / f"{name}_predictions.csv", write)
        write_json(folder / f"{name}_metrics.json", metrics)
        experiment_report.write_report(Path(args.output_dir))
    levels = [level for level in ("frame", "video") if level in metrics]
    for level in levels:
        m = metrics[level]
        logger.info(
            f"{args.evaluate} ({scope}, {level} level, {m['num_images']} {level}s) at EXP's threshold "
            f"{threshold:.4f}: HTER {m['hter']:.4f}  APCER {m['apcer']:.4f}  BPCER {m['bpcer']:.4f}  "
            f"EER {m['eer']:.4f}  AUC {m['auc']:.4f}  TPR@FPR=1% {m['tpr_at_fpr_1%']:.4f}"
        )
    return {"metrics_path": str(folder / f"{name}_metrics.json"), **metrics}


class FrameRow(NamedTuple):
    """A video frame's line of video_<name>.csv."""

    index: int
    time_s: float
    face: liveness.Face | None  # the face followed, None where there is none
    p_live: float  # NaN without a face
    smoothed: float  # P(live) smoothed over the track's frames
    decision: str
    track: int


def score_video(args, model, threshold):
    """EXP/video_<name>.csv, a row per frame, and the clip's decision (see the docstring)."""
    import cv2

    source = int(args.predict_video) if args.predict_video.isdigit() else args.predict_video
    if isinstance(source, str) and not Path(source).is_file():
        raise UserError(f"--predict_video {source}: no such file (a camera is given by its index: 0, 1...)")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise UserError(f"--predict_video {args.predict_video}: OpenCV cannot open it as a video or a camera")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    frames_in_file = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if isinstance(source, str) else 0
    detector = face_detector.FaceDetector(args.min_face_score)
    stream = liveness.StreamDecision(threshold, args.smoothing, args.min_frames)
    writer = None
    rows = []
    started = time.perf_counter()
    progress = progress_bar(total=args.max_frames or frames_in_file or None, desc="video", unit="frame")
    while args.max_frames is None or len(rows) < args.max_frames:
        ok, frame = capture.read()
        if not ok:
            break
        rgb = np.ascontiguousarray(frame[:, :, ::-1])
        face = stream.follow(liveness.detect_faces(detector, rgb))
        p_live = np.nan
        smoothed = np.nan
        if face is None:
            decision = stream.missed_frame()
        else:
            p_live = float(model.score(model.crops(rgb, [face]))[0])
            smoothed, decision = stream.update(p_live)
        row = FrameRow(
            index=len(rows),
            time_s=len(rows) / fps,
            face=face,
            p_live=p_live,
            smoothed=smoothed,
            decision=decision,
            track=stream.tracks,
        )
        rows.append(row)
        if args.save_video:
            if writer is None:
                Path(args.save_video).parent.mkdir(parents=True, exist_ok=True)
                size = (frame.shape[1], frame.shape[0])
                writer = cv2.VideoWriter(args.save_video, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
            writer.write(draw_frame(frame, face, smoothed=smoothed, decision=decision))
        progress.update(1)
    progress.close()
    seconds = time.perf_counter() - started
    capture.release()
    if writer is not None:
        writer.release()
    if not rows:
        raise UserError(f"--predict_video {args.predict_video}: no frame could be read")

    name = "camera" + str(source) if isinstance(source, int) else Path(source).stem
    csv_path = Path(args.output_dir) / f"video_{name}.csv"

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                ["frame", "time_s", "track", "x1", "y1", "x2", "y2", "detector_score", "p_live", "p_live_smoothed"]
                + ["decision"]
            )
            for index, time_s, face, p_live, smoothed, decision, track in rows:
                box = [f"{v:.1f}" for v in face.box] if face else [""] * 4
                detector_score = f"{face.detector_score:.4f}" if face else ""
                scores = ["" if np.isnan(v) else format_score(v) for v in (p_live, smoothed)]
                writer.writerow(
                    [index, f"{time_s:.3f}", track if face else "", *box, detector_score, *scores, decision]
                )

    csv_path.parent.mkdir(parents=True, exist_ok=True)
    write_with(csv_path, write)
    decided = [row.decision for row in rows if row.decision in ("live", "spoof")]
    clip = "no_face"
    if decided:
        clip = max(("live", "spoof"), key=decided.count)
    elif any(row.face for row in rows):
        clip = "undecided"
    logger.info(
        f"Scored {len(rows)} frames of {args.predict_video} at {len(rows) / seconds:.1f} frames/s: clip decision "
        f"{clip} ({decided.count('live')} live, {decided.count('spoof')} spoof, "
        f"{sum(row.decision == 'no_face' for row in rows)} without a face, threshold {threshold:.4f}); wrote {csv_path}"
        + (f" and {args.save_video}" if args.save_video else "")
    )
    return {"video_predictions": str(csv_path), "clip_decision": clip, "frames": len(rows), "fps": len(rows) / seconds}


def draw_frame(frame, face, smoothed, decision):
    """A BGR frame with the followed face's box, its smoothed P(live) and the decision."""
    import cv2

    colour = {"live": (60, 200, 40), "spoof": (40, 40, 230)}.get(decision, (0, 200, 240))
    drawn = frame.copy()
    label = decision
    if face is not None:
        x1, y1, x2, y2 = (round(v) for v in face.box)
        cv2.rectangle(drawn, (x1, y1), (x2, y2), colour, max(2, frame.shape[1] // 300))
        label = f"{decision} P(live) {smoothed:.3f}"
    cv2.putText(drawn, label, (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, colour, 2)
    return drawn


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator()
    training_run.setup_logging()
    results = {}
    if args.predict_video:
        model = liveness.LivenessModel.load(
            args.output_dir, stage=args.stage, checkpoint=args.checkpoint, onnx_path=args.onnx
        )
        threshold = model.threshold
        if args.threshold is not None:
            threshold = args.threshold
        logger.info(
            f"Scoring with {model.source} ({model.name}, image size {model.img_size}), threshold {threshold:.4f}"
        )
        results.update(score_video(args, model, threshold))
        if not (args.predict_folder or args.predict_lists):
            return results
    if args.onnx:
        if accelerator.num_processes > 1:
            raise UserError(f"--onnx scores in one process: python tools/predict.py --onnx {args.onnx} ...")
        net = liveness.OnnxNetwork(args.onnx)
        metadata = net.metadata
        checkpoint = Path(args.onnx)
    else:
        net, metadata, checkpoint = networks.load_checkpoint(args.checkpoint, args.output_dir, args.stage)
    img_size = int(metadata["img_size"])
    face_crop_scale = float(metadata.get("face_crop_scale", 1.5))
    logger.info(
        f"Scoring with {checkpoint} ({metadata['model_name']}, image size {img_size}) on "
        f"{accelerator.num_processes} process(es)"
    )
    # P(live) of a table's images (NaN where one does not decode), as every job below scores them
    score = functools.partial(
        evaluation.score_table,
        accelerator.prepare(net),
        accelerator,
        img_size=img_size,
        face_crop_scale=face_crop_scale,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        tta=args.tta,
        log_warning=logger.warning,
    )
    if args.predict_lists:
        results["submission_path"] = write_submission(
            args, accelerator, score=score, img_size=img_size, face_crop_scale=face_crop_scale
        )
    if args.evaluate:
        results["cross_dataset"] = evaluate_dataset(
            args, accelerator, score=score, threshold=run_threshold(args, metadata)
        )
    if args.predict_folder:
        results["folder_predictions"] = score_folder(
            args, accelerator, score=score, threshold=run_threshold(args, metadata)
        )
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    run_cli(main)
