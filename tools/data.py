"""The data module's commands: a dataset summary to read before a multi-day job, and the face-crop cache built
ahead of time (on a CPU node, say), as the training scripts would build it.

    python tools/data.py check --data_root /data/WFAS [--json] [--verify_images]
    python tools/data.py cache --data_root /data/WFAS --output_dir EXP [--img_size 224] [--workers N]

`python wfas_data.py check|cache ...` runs the same. check prints images per class and attack type, subjects,
images without a bbox file, malformed bbox files and the Dev/Test lists found; --verify_images also decodes every
image and lists those that fail.
"""
import argparse
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import wfas_data  # noqa: E402
from tools import common  # noqa: E402


def _can_decode(path):
    try:
        data = path.read_bytes()
    except OSError as error:
        raise wfas_data.StorageError(path, error) from None
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
    attack_types = {a.decode(): int(n) for a, n in zip(*np.unique(table.attack_type[table.label == wfas_data.SPOOF],
                                                                   return_counts=True))}
    summary = {
        "data_root": str(root),
        "num_images": len(table),
        "num_live": int((table.label == wfas_data.LIVE).sum()),
        "num_spoof": int((table.label == wfas_data.SPOOF).sum()),
        "num_subjects": int(len(np.unique(np.char.add(table.attack_type, table.subject)))),
        "attack_types": attack_types,
        "missing_bbox": missing,
        "bad_bbox": bad,
        "prediction_lists": {str(p.relative_to(root)): len(common.read_prediction_list(p)[1])
                             for p in common.find_prediction_lists(root)},
    }
    if verify_images:
        with ThreadPoolExecutor(workers) as pool:
            decodable = list(wfas_data.progress_bar(pool.map(_can_decode, image_files, chunksize=64),
                                                    total=len(image_files), desc="decoding images"))
        summary["unreadable"] = [p for p, ok in zip(table.paths(), decodable) if not ok]
    return summary


def format_summary(summary):
    lists = summary["prediction_lists"]
    lines = [f"WFAS data at {summary['data_root']}",
             f"  images     {summary['num_images']:>9}   live {summary['num_live']}, spoof {summary['num_spoof']}",
             f"  subjects   {summary['num_subjects']:>9}", "  attack types:",
             *(f"    {name:<24}{count:>9}" for name, count in summary["attack_types"].items()),
             f"  images without a bbox file   {summary['missing_bbox']} (the whole image is used)",
             f"  malformed bbox files         {summary['bad_bbox']} (the whole image is used)",
             "  lists to predict: " + (", ".join(f"{k} ({v} images)" for k, v in lists.items()) or "none found")]
    if "unreadable" in summary:
        unreadable = summary["unreadable"]
        lines += [f"  unreadable images            {len(unreadable)}", *(f"    {path}" for path in unreadable[:20])]
        if len(unreadable) > 20:
            lines.append(f"    ... and {len(unreadable) - 20} more (see --json)")
    return "\n".join(lines)


def build_cache(args):
    table = wfas_data.load_or_create_split(args.data_root, args.output_dir, args.val_fraction, args.test_fraction,
                                           args.seed)
    start = time.time()
    cache = wfas_data.build_face_cache(table, args.face_cache_dir or Path(args.output_dir) / "face_cache",
                                       args.img_size, args.face_crop_scale, args.workers)
    seconds = time.time() - start
    print(f"Face cache {cache.folder}: {len(cache)} images, {cache.num_bytes / 2**30:.2f} GiB "
          f"({cache.num_bytes / len(cache) / 1024:.1f} KiB per image), {len(cache.undecodable)} undecodable, "
          + (f"built in {seconds:.0f} s ({len(cache) / seconds:.0f} img/s)" if cache.built_now else "already built"))
    return cache


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="summarise a dataset before a long run")
    check.add_argument("--data_root", required=True, help="WFAS folder (holding Train/), Train/ itself, or a "
                                                          "labelled list file")
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
    args = parser.parse_args(argv)
    if args.command == "cache":
        return build_cache(args)
    summary = check_dataset(args.data_root, args.verify_images, args.workers)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return summary


if __name__ == "__main__":
    wfas_data.run_cli(main)
