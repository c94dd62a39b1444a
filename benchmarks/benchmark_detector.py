"""The offline face detector (face_detector.py) on this machine: images per second at 640x480 and 1920x1080, the
smallest face it finds, and its box against the box a real portrait was pasted at (IoU).

    python benchmarks/benchmark_detector.py [--threads 1 2] [--repeats 20]

The portrait is matplotlib's grace_hopper.jpg (512x600); its reference box is the detector's own box on it alone,
moved and scaled with the portrait. Speed: detect() on one frame holding the portrait (decoding not included),
the median of --repeats calls after two warm-up ones, with onnxruntime limited to --threads threads.
Smallest face: the portrait shrunk step by step into a 640x480 frame until the detector misses it; the face size
is the side of the reference box at that scale.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib import cbook
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import face_detector  # noqa: E402

PORTRAIT = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")


def frame_with_portrait(size, at, scale):
    frame = Image.new("RGB", size, (96, 110, 128))
    width = round(PORTRAIT.width * scale)
    height = round(PORTRAIT.height * scale)
    frame.paste(PORTRAIT.resize((width, height), Image.BICUBIC), at)
    return np.asarray(frame), np.array([scale, scale, scale, scale]), np.array([*at, *at])


def iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="onnxruntime threads to time")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    detector = face_detector.FaceDetector()
    reference = detector.detect(np.asarray(PORTRAIT))[0][1][:2].reshape(4)
    print(
        f"reference box on the portrait alone: {reference.tolist()} "
        f"({reference[2] - reference[0]:.0f} x {reference[3] - reference[1]:.0f} px)\n"
    )

    print("| frame | threads | img/s | ms per image |\n|---|---|---|---|")
    for size, at, scale in (((640, 480), (200, 100), 0.5), ((1920, 1080), (800, 200), 1.0)):
        image = frame_with_portrait(size, at, scale)[0]
        for threads in args.threads:
            timed = face_detector.FaceDetector(threads=threads)
            for _ in range(2):
                timed.detect(image)
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                timed.detect(image)
                seconds.append(time.perf_counter() - start)
            median = statistics.median(seconds)
            print(f"| {size[0]}x{size[1]} | {threads} | {1 / median:.1f} | {1000 * median:.0f} |")

    print("\n| portrait scale | face box (px) | found | score | IoU |\n|---|---|---|---|---|")
    for scale in (1.0, 0.5, 0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.05, 0.04):
        image, scales, offset = frame_with_portrait((640, 480), (100, 80), scale)
        expected = reference * scales + offset
        found = detector.detect(image)
        side = expected[2] - expected[0]
        if found:
            box = found[0][1][:2].reshape(4)
            print(f"| {scale:g} | {side:.0f} | yes | {found[0][0]:.3f} | {iou(box, expected):.3f} |")
        else:
            print(f"| {scale:g} | {side:.0f} | no | | |")

    print("\n| frame | placement | IoU |\n|---|---|---|")
    for size, at, scale in (
        ((640, 480), (40, 30), 0.6),
        ((640, 480), (400, 250), 0.3),
        ((1920, 1080), (1000, 100), 1.5),
        ((1920, 1080), (100, 700), 0.5),
    ):
        image, scales, offset = frame_with_portrait(size, at, scale)
        found = detector.detect(image)
        value = f"{iou(found[0][1][:2].reshape(4), reference * scales + offset):.3f}" if found else "not found"
        print(f"| {size[0]}x{size[1]} | at {at}, scale {scale:g} | {value} |")


if __name__ == "__main__":
    main()
