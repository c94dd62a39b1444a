"""Time and peak memory of indexing, splitting and writing split.csv for a generated WFAS tree.

    python benchmarks/benchmark_index.py /tmp/wfas_200k --images 200000

The tree holds tiny copies of one JPEG, each with a bbox file (2 files per image): indexing never opens
images, so their content does not matter. The tree is made once and reused."""

import argparse
import io
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--images", type=int, default=200_000)
    args = parser.parse_args()
    root = Path(args.root)
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
        f"indexed {len(table)} images ({2 * len(table)} files) in {index_seconds:.2f} s; "
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
