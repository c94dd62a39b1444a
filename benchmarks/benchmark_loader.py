"""Images per second of the training data pipeline (decode, face crop, augment) on large JPEGs, with and
without the reduced-size JPEG decode that wfas_data.load_face uses when the face crop allows it.

    python benchmarks/benchmark_loader.py [--size 1280x960] [--face 320] [--img_size 224] [--n 200]

One process, no DataLoader workers: multiply by --num_workers for a rough loader ceiling."""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from PIL import Image  # noqa: E402

import wfas_data  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1280x960", help="WxH of the generated photos")
    parser.add_argument("--face", type=int, default=320, help="side of the face box in pixels")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--n", type=int, default=200, help="images to time")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        names = []
        for i in range(16):  # photo-like content, so that JPEG decoding does real work
            pixels = rng.normal(128, 40, (height // 8, width // 8, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).resize((width, height), Image.BICUBIC).save(folder / f"{i}.jpg", quality=90)
            x, y = (width - args.face) // 2, (height - args.face) // 2
            (folder / f"{i}.txt").write_text(f"{x} {y}\n{x + args.face} {y + args.face}\n" + "0 0\n" * 5)
            names.append(f"{i}.jpg")
        transform = wfas_data.build_transform(args.img_size, (0.5,) * 3, (0.5,) * 3, train=True)
        for label, min_side in (("full decode", 0), ("reduced decode", args.img_size)):
            start = time.time()
            for i in range(args.n):
                transform(wfas_data.load_face(folder / names[i % len(names)], min_side=min_side))
            print(f"{label:>15}: {args.n / (time.time() - start):6.0f} images/s  ({args.size} JPEG, "
                  f"{args.face}px face, crop x{wfas_data.DEFAULT_FACE_CROP_SCALE} -> {args.img_size}px, train "
                  "transform)")


if __name__ == "__main__":
    main()
