"""The data module's commands: a dataset summary to read before a multi-day job, and the face-crop cache built
ahead of time (on a CPU node, say), as the training scripts would build it.

    python tools/data.py check --data_root /data/WFAS [--json] [--verify_images]
    python tools/data.py cache --data_root /data/WFAS --output_dir EXP [--img_size 224] [--workers N]
    python tools/data.py detect --data_root DIR [--overwrite] [--min_score 0.9] [--workers N]

check prints images per class and attack type, subjects,
images without a bbox file, malformed bbox files and the Dev/Test lists found; --verify_images also decodes every
image and lists those that fail. detect writes a WFAS bbox file (box, then 5 landmarks: 7 lines of `x y`) next to
every image below DIR that has none, from the offline face detector (tools/face_detector.py; the largest face when there
are several); an image with no face gets no file. It is resumable: a rerun does the images still without one.
"""

import argparse
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
import wfas_data  # noqa: E402
from errors import StorageError, UserError, run_cli  # noqa: E402
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


def check_dataset(data_root, verify_images=False, workers=16):
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
    args = parser.parse_args(argv)
    if args.command == "detect":
        return detect_boxes(args.data_root, overwrite=args.overwrite, min_score=args.min_score, workers=args.workers)
    if args.command == "cache":
        return build_cache(args)
    summary = check_dataset(args.data_root, args.verify_images, args.workers)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return summary


if __name__ == "__main__":
    run_cli(main)
