"""Time and peak memory of indexing, splitting and writing split.csv for a generated WFAS tree, and the time of
indexing a generated CelebA-Spoof tree (its label files and _BB.txt boxes), per image.

    python benchmarks/benchmark_index.py /tmp/wfas_200k --images 200000
    python benchmarks/benchmark_index.py /tmp/celeba_200k --images 200000 --format celeba_spoof

The tree holds tiny copies of one JPEG, each with a bbox file (2 files per image): indexing never opens
images, so their content does not matter. The tree is made once and reused."""

import argparse
import io
import json
import resource
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from PIL import Image  # noqa: E402

import wfas_data  # noqa: E402
from tools import make_demo  # noqa: E402


def make_tree(root, images, per_subject=10):
    data = io.BytesIO()
    Image.new("RGB", (16, 16)).save(data, "JPEG")
    jpeg = data.getvalue()
    bbox = "1 1\n15 15\n5 5\n10 5\n8 8\n6 12\n10 12\n"
    folders = ["living"] + [f"spoof/{t}" for t in make_demo.DEMO_ATTACK_TYPES]
    for i in range(images):
        folder = root / "Train" / folders[i // per_subject % len(folders)] / f"{i // (per_subject * len(folders)):06d}"
        if i % per_subject == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.jpg").write_bytes(jpeg)
        (folder / f"{i:07d}.txt").write_text(bbox)


def make_celeba_tree(root, images, per_subject=20):
    """CelebA-Spoof's layout: Data/train/<subject>/{live,spoof}/<number>.jpg with <number>_BB.txt, and
    metas/intra_test/{train,test}_label.json (the last subjects' images in test)."""
    data = io.BytesIO()
    Image.new("RGB", (16, 16)).save(data, "JPEG")
    jpeg = data.getvalue()
    labels = {"train": {}, "test": {}}
    for i in range(images):
        split = "test" if i >= 0.9 * images else "train"
        kind = "live" if i % 2 else "spoof"
        folder = root / "Data" / split / str(i // per_subject) / kind
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(jpeg)
        (folder / f"{i:06d}_BB.txt").write_text("61 45 61 112 0.99\n")
        vector = [0] * 44
        vector[40] = 0 if kind == "live" else 1
        vector[43] = 0 if kind == "live" else 1
        labels[split][f"Data/{split}/{i // per_subject}/{kind}/{i:06d}.jpg"] = vector
    (root / "metas" / "intra_test").mkdir(parents=True)
    for split in ("train", "test"):
        (root / "metas" / "intra_test" / f"{split}_label.json").write_text(json.dumps(labels[split]))


def time_celeba_spoof(root, images):
    if not (root / "metas").is_dir():
        start = time.time()
        make_celeba_tree(root, images)
        print(f"made {images} images + box files in {time.time() - start:.1f} s")
    start = time.time()
    table = wfas_data.index_dataset(f"celeba_spoof:{root}")
    seconds = time.time() - start
    print(
        f"indexed {len(table)} CelebA-Spoof images ({2 * len(table)} files and the label files) in {seconds:.2f} s: "
        f"{1e6 * seconds / len(table):.0f} us per image"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--format", choices=("wfas", "celeba_spoof"), default="wfas", help="the tree's layout")
    args = parser.parse_args()
    root = Path(args.root)
    if args.format == "celeba_spoof":
        return time_celeba_spoof(root, args.images)
    if not (root / "Train").is_dir():
        start = time.time()
        make_tree(root, args.images)
        print(f"made {args.images} images + bbox files in {time.time() - start:.1f} s")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.time()
    table = wfas_data.index_wfas(root)
    index_seconds = time.time() - start
    start = time.time()
    wfas_data.assign_splits(table, 0.1, 0.1, seed=0)
    split_seconds = time.time() - start
    start = time.time()
    wfas_data.write_split_csv(table, root / "split.csv")
    csv_seconds = time.time() - start
    start = time.time()
    wfas_data.read_split_csv(root / "split.csv", root)
    read_seconds = time.time() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()  # a second pass for memory: tracing slows allocation-heavy code down
    wfas_data.index_wfas(root)
    index_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    arrays = sum(
        a.nbytes for a in (table.path, table.label, table.attack_type, table.subject, table.has_bbox, table.split)
    )
    print(
        f"indexed {len(table)} images ({2 * len(table)} files) in {index_seconds:.2f} s "
        f"({1e6 * index_seconds / len(table):.0f} us per image); "
        f"peak Python allocations while indexing {index_peak / 2**20:.0f} MiB"
    )
    print(
        f"split in {split_seconds:.2f} s, wrote split.csv in {csv_seconds:.2f} s, read it back in {read_seconds:.2f} s"
    )
    print(
        f"index arrays {arrays / 2**20:.1f} MiB; process peak RSS {rss_before:.0f} MiB after imports, "
        f"{rss_after:.0f} MiB after all of the above"
    )


if __name__ == "__main__":
    main()
