"""A generated dataset in the WFAS layout, for the demo and the tests: drawn faces (not real ones), live and
9 attack types, each image with its RetinaFace-style bbox .txt, plus unlabelled Dev/Test lists.

    python tools/make_demo.py demo_data [--subjects 150] [--seed 0]

The attacks leave the cues real ones do (print halftone and colour casts, screen moire and bezels, mask edges),
so a model learns them in a few epochs on a CPU.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# numpy, Pillow and the standard library only: run_all.sh makes the demo data while another core imports torch
from output_files import aside, write_text  # noqa: E402

DEMO_ATTACK_TYPES = (
    "2D-Display-Pad",
    "2D-Display-Phone",
    "2D-Print-Album",
    "2D-Print-Newspaper",
    "2D-Print-Photo",
    "2D-Print-Poster",
    "3D-AdultDoll",
    "3D-GarageKit",
    "3D-Mask",
)
DEMO_SIZE = 128


def _demo_face(rng, identity, size=DEMO_SIZE):
    """A live-looking face: shaded skin ellipse with eyes and mouth on a textured background, sensor noise.
    Returns the float image (H, W, 3) and the 7 RetinaFace-style points."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    background = identity["background"] + 25 * np.sin(x[..., None] / rng.uniform(8, 30) + rng.uniform(0, 6))
    half_w = identity["face_w"] * rng.uniform(0.92, 1.08)
    half_h = half_w * 1.3
    cx = size / 2 + rng.uniform(-12, 12)
    cy = size / 2 + rng.uniform(-10, 10)
    u = (x - cx) / half_w
    v = (y - cy) / half_h
    inside = u**2 + v**2 <= 1
    light = rng.uniform(-0.6, 0.6)  # direction of the light across the face
    shading = np.clip(0.75 + 0.35 * np.sqrt(np.clip(1 - u**2 - v**2, 0, 1)) + 0.15 * light * u, 0.3, 1.3)
    image = np.where(inside[..., None], identity["skin"] * shading[..., None], background)
    eyes = [(cx - 0.4 * half_w, cy - 0.25 * half_h), (cx + 0.4 * half_w, cy - 0.25 * half_h)]
    for ex, ey in eyes:
        image[((x - ex) / (0.16 * half_w)) ** 2 + ((y - ey) / (0.08 * half_h)) ** 2 <= 1] = identity["eye"]
    nose = (cx, cy + 0.1 * half_h)
    mouth = [(cx - 0.3 * half_w, cy + 0.5 * half_h), (cx + 0.3 * half_w, cy + 0.5 * half_h)]
    image[(np.abs(y - mouth[0][1]) < 0.04 * half_h + 1) & (np.abs(x - cx) < 0.3 * half_w)] = identity["lips"]
    image = image + rng.normal(0, rng.uniform(3, 7), image.shape)  # sensor noise: fine natural texture
    box = [(cx - half_w, cy - half_h), (cx + half_w, cy + half_h)]
    return image, np.array(box + eyes + [nose] + mouth), inside


def _demo_identity(rng):
    return {
        "background": rng.uniform(30, 220, 3),
        "face_w": rng.uniform(20, 28),
        "skin": rng.uniform([150, 100, 70], [240, 190, 160]),
        "eye": rng.uniform(10, 70, 3),
        "lips": rng.uniform([120, 30, 30], [200, 90, 90]),
    }


def _demo_attack(rng, attack_type, image, inside):
    """Apply an attack's cue at a random strength: weak cues keep the demo from being trivially separable."""
    size = image.shape[0]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    strength = rng.uniform(0.3, 1.0)
    if attack_type.startswith("2D-Print"):
        period = rng.uniform(4.0, 7.0)
        dots = np.cos(2 * np.pi * x / period) * np.cos(2 * np.pi * y / period)  # halftone screen
        image = image * (1 - 0.2 * strength * (1 + dots[..., None]))
        gray = image.mean(axis=2, keepdims=True)
        image = gray + (1 - (0.7 if "Newspaper" in attack_type else 0.4) * strength) * (image - gray)
        edge = int(rng.integers(4, 14))  # the paper's edge, where the photo ends
        side = rng.integers(4)
        paper = np.full(3, rng.uniform(200, 250))
        if side == 0:
            image[:, :edge] = paper
        elif side == 1:
            image[:, -edge:] = paper
        elif side == 2:
            image[:edge] = paper
        else:
            image[-edge:] = paper
    elif attack_type.startswith("2D-Display"):
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(5.0, 10.0)
        moire = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
        image = image * (1 + 0.2 * strength * moire[..., None])
        image = image + strength * np.array([-15.0, 0.0, 25.0])  # a display's blue cast
        bezel = int(rng.integers(2, 8))
        image[:bezel] = 15
        image[-bezel:] = 15
        image[:, :bezel] = 15
        image[:, -bezel:] = 15
    else:  # 3D masks and dolls: flat, smooth shading, no skin texture, a specular highlight
        smooth = image.copy()
        for axis in (0, 1, 0, 1):
            smooth = (np.roll(smooth, 1, axis) + smooth + np.roll(smooth, -1, axis)) / 3
        levels = 24 - 12 * strength
        flat = np.round(smooth / levels) * levels
        blend = 0.5 + 0.5 * strength
        image = np.where(inside[..., None], blend * flat + (1 - blend) * image, image)
        cy, cx = np.argwhere(inside).mean(axis=0)
        highlight = np.exp(-((x - cx + 6) ** 2 + (y - cy + 8) ** 2) / 30)
        image = image + 80 * strength * highlight[..., None] * inside[..., None]
    return image


def _save_demo_image(image, points, path, rng):
    """The image and its bbox .txt, each written aside and renamed: a killed run leaves no half-written file."""
    tmp = aside(path)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(tmp, format="JPEG", quality=95)
    os.replace(tmp, path)
    jitter = points + rng.normal(0, 1.0, points.shape)  # detector noise
    write_text(path.with_suffix(".txt"), "".join(f"{px:.2f} {py:.2f}\n" for px, py in jitter))


def make_demo(out_dir, subjects=150, seed=0, images_per_live=4, images_per_spoof=1, unlabelled=24):
    """Write a small generated dataset in the WFAS release layout. Returns (its root, the train image count)."""
    rng = np.random.default_rng(seed)
    root = Path(out_dir)
    train = root / "Train"
    count = 0
    for s in range(subjects):
        identity = _demo_identity(rng)
        folder = train / "living" / f"{s:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_live):
            image, points, _ = _demo_face(rng, identity)
            _save_demo_image(image, points, path=folder / f"{i:03d}.jpg", rng=rng)
            count += 1
    spoof_subjects = max(3, subjects // 2)
    for attack_type in DEMO_ATTACK_TYPES:
        for s in range(spoof_subjects):  # subject names repeat across attack types, as in WFAS
            identity = _demo_identity(rng)
            folder = train / "spoof" / attack_type / f"{s:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(images_per_spoof):
                image, points, inside = _demo_face(rng, identity)
                attacked = _demo_attack(rng, attack_type, image=image, inside=inside)
                _save_demo_image(attacked, points, path=folder / f"{i:03d}.jpg", rng=rng)
                count += 1
    # WFAS quirks a real release has: a face the detector missed, stray files that are not images
    (train / "living" / "00000" / "000.txt").unlink()
    (train / "living" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (train / "spoof" / "notes.md").write_text("collected 2022\n")
    for name in ("Dev", "Test"):
        data = root / name / "data"
        data.mkdir(parents=True, exist_ok=True)
        names = []
        for i in range(unlabelled):
            image, points, inside = _demo_face(rng, _demo_identity(rng))
            if i % 2:
                image = _demo_attack(rng, DEMO_ATTACK_TYPES[i % len(DEMO_ATTACK_TYPES)], image=image, inside=inside)
            names.append(f"{i:06d}.jpg")
            _save_demo_image(image, points, path=data / names[-1], rng=rng)
        write_text(root / name / f"{name}.txt", "".join(n + "\n" for n in names))
    return root, count


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write (it gets Train/, Dev/ and Test/)")
    parser.add_argument("--subjects", type=int, default=150, help="live subjects; each attack type gets half as many")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything drawn")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.subjects < 3:  # argparse's own one-line error and exit status 2
        parser.error(f"--subjects {args.subjects}: need at least 3 so that train, val and test get one each")
    root, count = make_demo(args.out_dir, subjects=args.subjects, seed=args.seed)
    print(f"Wrote a generated demo dataset (not real faces) with {count} training images to {root}")


if __name__ == "__main__":
    main()
