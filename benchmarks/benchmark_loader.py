"""Images per second per core of the training data path, side by side on photo-like JPEGs in the WFAS layout:

  plain torchvision   open, read the bbox file, crop bbox x1.5 square, RandomResizedCrop 224, flip, ToTensor,
                      Normalize: the loader a user would write
  no cache            this project's loader reading the original photos (boxes from the index, reduced JPEG
                      decode, RandomResizedCrop and flip, uint8 out)
  cache               this project's loader reading the face-crop cache

plus the cache's build rate and its bytes per image. One process, one thread, no DataLoader workers: the figures
are per core (multiply by the loader workers for a node's ceiling). This project's normalisation and colour
jitter run batched on the training device (wfas_data.to_model_input), not in the loader; their cost on this CPU
is printed apart, since on a GPU they take microseconds per batch.

    python benchmarks/benchmark_loader.py [--n 300] [--img_size 224]
    python benchmarks/benchmark_loader.py --write_tree DIR --images 20000 [--size 1280x720]   # an end-to-end tree
    python benchmarks/benchmark_loader.py --node 8 [--n 2000]    # the cache through the training loader, with the
                                                  # workers this node gives each of 8 processes (sched_getaffinity)
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_stage1  # noqa: E402  (its train_transform)
import wfas_data  # noqa: E402
import face_cache  # noqa: E402

SIZES = (("640x480", 160), ("1280x720", 200), ("1920x1080", 300))  # photo, face box side
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def write_photo(path, width, height, face, seed):
    """A photo-like JPEG (smooth structure plus sensor noise, so that decoding does real work) with a face box
    file at a random place, as RetinaFace writes it."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(128, 50, (height // 16, width // 16, 3)).clip(0, 255).astype(np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels += rng.normal(0, 6, pixels.shape)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    x = rng.integers(0, width - face)
    y = rng.integers(0, height - face)
    points = [(x, y), (x + face, y + face)] + [(x + face / 2, y + face / 2)] * 5
    path.with_suffix(".txt").write_text("".join(f"{px:.2f} {py:.2f}\n" for px, py in points))


def _write_one(job):
    write_photo(*job)


def write_tree(root, images, width, height, face, workers=None):
    """A WFAS tree of generated photos: half live, half spoof (2D-Print-Photo), 4 images per subject."""
    jobs = []
    for i in range(images):
        label_dir = Path("living") if i % 2 == 0 else Path("spoof") / "2D-Print-Photo"
        folder = Path(root) / "Train" / label_dir / f"{i // 8:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i:07d}.jpg", width, height, face, i))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_one, jobs, chunksize=64))


def plain_torchvision(img_size):
    augment = transforms.Compose(
        [
            transforms.RandomResizedCrop(img_size, scale=(0.8, 1.0), ratio=(0.9, 1.1)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )

    def load(path):
        image = Image.open(path).convert("RGB")
        points = [[float(v) for v in line.split()] for line in path.with_suffix(".txt").read_text().splitlines()]
        (x1, y1), (x2, y2) = points[:2]
        side = max(x2 - x1, y2 - y1) * 1.5
        cx = (x1 + x2) / 2
        cy = (y1 + y2) / 2
        return augment(
            image.crop((round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2)))
        )

    return load


def rate(load_batch, paths, batch_size=32):
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        load_batch(paths[i : i + batch_size])
    return len(paths) / (time.perf_counter() - start)


def node_rate(n, img_size, processes, epochs=3):
    """The face cache read through the stages' DataLoader (wfas_data.Loaders: its workers, prefetch and pinned
    memory) with the workers one of `processes` processes gets on this node; the first epoch is left out."""
    os.environ["LOCAL_WORLD_SIZE"] = str(processes)
    loaders = wfas_data.Loaders(batch_size=32)
    workers = loaders.settings["num_workers"]
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        names = []
        for i in range(n):
            names.append(f"{i:05d}.jpg")
            write_photo(folder / names[-1], width=1280, height=720, face=240, seed=i)
        table = wfas_data.unlabelled_table(folder, names)
        cache = face_cache.build_face_cache(table, folder / "cache", img_size, workers=workers, log=lambda _: None)
        dataset = wfas_data.FaceDataset(table, img_size, train_stage1.train_transform(img_size), cache=cache)
        loader = loaders.make(dataset, shuffle=True, persistent=True)
        rates = []
        for _ in range(epochs):
            start = time.perf_counter()
            images = sum(len(batch["image"]) for batch in loader)
            rates.append(images / (time.perf_counter() - start))
        wfas_data.Loaders.shut_down(loader)
    per_process = statistics.median(rates[1:])
    print(
        f"training loader from the face cache, {img_size}px: {cores} cores given to {processes} process(es), "
        f"{workers} workers each: {per_process:.0f} img/s per process, {per_process * processes:.0f} img/s for "
        f"the node (median of epochs 2-{epochs}, {n} images)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="images per size and pipeline")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--write_tree", help="only write a generated WFAS tree of --images photos there")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--size", default="1280x720", help="photo size of --write_tree")
    parser.add_argument(
        "--node", type=int, metavar="PROCESSES", help="only the training loader's rate from the face cache, per process"
    )
    args = parser.parse_args()
    if args.node:
        node_rate(args.n, args.img_size, args.node)
        return
    if args.write_tree:
        width, height = map(int, args.size.split("x"))
        start = time.time()
        write_tree(args.write_tree, args.images, width=width, height=height, face=min(width, height) // 3)
        print(f"Wrote {args.images} {args.size} photos to {args.write_tree} in {time.time() - start:.0f} s")
        return

    torch.set_num_threads(1)
    print(f"images/s per core (one process, one thread), {args.n} images each, train augmentation to {args.img_size}px")
    print(
        f"{'photo':>10} {'face':>5} | {'plain':>7} {'no cache':>9} {'cache':>7} | {'cache/plain':>11} | "
        f"{'build img/s':>11} {'KiB/image':>9}"
    )
    for size, face in SIZES:
        width, height = map(int, size.split("x"))
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            paths = []
            for i in range(args.n):
                paths.append(folder / f"{i:05d}.jpg")
                write_photo(paths[-1], width=width, height=height, face=face, seed=i)
            plain = plain_torchvision(args.img_size)
            plain_rate = rate(lambda batch: torch.stack([plain(p) for p in batch]), paths)

            table = wfas_data.unlabelled_table(folder, [p.name for p in paths])
            augment = train_stage1.train_transform(args.img_size)

            def project(dataset):
                def load_batch(batch_paths):
                    first = paths.index(batch_paths[0])
                    return torch.stack([dataset[i]["image"] for i in range(first, first + len(batch_paths))])

                return load_batch

            direct_rate = rate(project(wfas_data.FaceDataset(table, args.img_size, augment)), paths)
            start = time.perf_counter()
            cache = face_cache.build_face_cache(table, folder / "cache", args.img_size, workers=0, log=lambda _: None)
            build_rate = len(paths) / (time.perf_counter() - start)
            cache_rate = rate(project(wfas_data.FaceDataset(table, args.img_size, augment, cache=cache)), paths)
            print(
                f"{size:>10} {face:>5} | {plain_rate:7.0f} {direct_rate:9.0f} {cache_rate:7.0f} | "
                f"{cache_rate / plain_rate:10.1f}x | {build_rate:11.0f} {cache.num_bytes / len(cache) / 1024:9.1f}"
            )
    batch = torch.randint(0, 256, (32, 3, args.img_size, args.img_size), dtype=torch.uint8)
    start = time.perf_counter()
    for _ in range(5):
        wfas_data.to_model_input(batch, MEAN, STD, color_jitter=0.1)
    print(
        f"batched normalise + colour jitter (the device's part) on this CPU: "
        f"{(time.perf_counter() - start) / 5 / 32 * 1000:.2f} ms per image"
    )


if __name__ == "__main__":
    main()
