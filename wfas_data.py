"""WFAS data: indexing, subject-disjoint splits, face crops, transforms and the evaluation protocol.

Shared by train_stage1.py and train_stage2.py. Also a small command line:

    python wfas_data.py make_demo DIR [--subjects N] [--seed S]   # a generated dataset in the WFAS layout
    python wfas_data.py check --data_root DIR [--json] [--verify_images]

Conventions used everywhere in the project: live = 1, spoof = 0, and a score is P(live).
"""
import argparse
import csv
import functools
import hashlib
import io
import json
import math
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torchvision.transforms import v2 as T
try:  # tqdm comes with huggingface_hub (timm and accelerate need it); its notebook bars need ipywidgets
    import ipywidgets  # noqa: F401
    from tqdm.auto import tqdm
except ImportError:
    from tqdm import tqdm

LIVE, SPOOF = 1, 0
LIVE_TYPE = "live"  # attack_type of live samples in split.csv and in reports
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# What a file that was read but holds no decodable image raises (PIL reports truncated and unknown data as
# OSError). Reading the file is a separate step, so a storage fault never lands here.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# An epoch in which more images than this cannot be decoded stops: the data, not a few files, is broken.
MAX_UNDECODABLE_SHARE = 0.01

# RetinaFace boxes are tight around the face. 1.5x brings in hair, ears and the surroundings where the
# strongest attack cues live (paper edges, screen bezels, fingers holding a photo), while the face still
# fills most of the input.
DEFAULT_FACE_CROP_SCALE = 1.5


class UserError(Exception):
    """A problem the user can fix (a path, a file, a setting). Scripts print it as one line and exit 2."""


class StorageError(UserError):
    """A file the split lists that cannot be read (missing, no permission, a stale NFS handle, EIO): the
    storage is at fault, not the image, so the run stops instead of training on what remains."""

    def __init__(self, path, error):
        reason = error.strerror or str(error) or type(error).__name__
        super().__init__(f"cannot read {path} ({reason}); the split lists it, so check that --data_root is right "
                         "and that its file system is mounted and readable")


def run_cli(main):
    """Run a script's main(); user errors become one line on stderr and exit code 2, with no traceback."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------
# Indexing
# ----------------------------------------------------------------------------------------------------------

@dataclass
class SampleTable:
    """One row per image, held in numpy arrays rather than per-sample objects so that DataLoader workers
    share the pages instead of slowly copying them (reference counts touch every Python object).

    Strings are UTF-8 bytes (numpy 'S' arrays); ``path`` is relative to ``root``. The face boxes are read
    from the bbox files once, when the table is made, so that loading an image never opens a .txt file."""
    root: Path
    path: np.ndarray
    label: np.ndarray        # int8: LIVE / SPOOF, -1 when unlabelled
    attack_type: np.ndarray  # bytes: LIVE_TYPE or the attack folder name
    subject: np.ndarray      # bytes: the folder that holds the image; a subject is a folder
    has_bbox: np.ndarray     # bool: a bbox file lies next to the image
    box: np.ndarray = None   # float32 [N, 4]: x1, y1, x2, y2 of the face box as in the file; NaN without one
    split: np.ndarray = None  # int8 index into SPLITS, once assigned
    row: np.ndarray = None   # int64: the row in the table this one was selected from (a face cache's index)

    def __post_init__(self):
        if self.box is None:
            self.box = np.full((len(self.path), 4), np.nan, dtype=np.float32)
        if self.row is None:
            self.row = np.arange(len(self.path))

    def __len__(self):
        return len(self.path)

    def select(self, mask):
        return SampleTable(self.root, self.path[mask], self.label[mask], self.attack_type[mask],
                           self.subject[mask], self.has_bbox[mask], self.box[mask],
                           None if self.split is None else self.split[mask], self.row[mask])

    def of_split(self, name):
        return self.select(self.split == SPLITS.index(name))

    def paths(self):
        return [p.decode() for p in self.path]

    def attack_types(self):
        return [a.decode() for a in self.attack_type]


def _as_bytes_array(strings):
    return np.array([s.encode() for s in strings], dtype=bytes) if len(strings) else np.array([], dtype="S1")


def _make_table(root, paths, labels, attack_types, subjects, has_bbox, box=None):
    return SampleTable(root=Path(root), path=_as_bytes_array(paths), label=np.asarray(labels, dtype=np.int8),
                       attack_type=_as_bytes_array(attack_types), subject=_as_bytes_array(subjects),
                       has_bbox=np.asarray(has_bbox, dtype=bool), box=box)


def read_boxes(root, paths, has_bbox=None, workers=16):
    """The face box of every image from its bbox file, read once, in parallel (a network file system answers
    many small reads at once far faster than one after another). Returns float32 [N, 4] (x1, y1, x2, y2 as in
    the file), NaN where the file is missing or malformed. has_bbox, when known from the directory listing,
    spares the opens of files that do not exist."""
    boxes = np.full((len(paths), 4), np.nan, dtype=np.float32)
    wanted = [i for i in range(len(paths)) if has_bbox is None or has_bbox[i]]
    txt_paths = [Path(root, os.path.splitext(paths[i])[0] + ".txt") for i in wanted]
    with ThreadPoolExecutor(workers) as pool:
        points = pool.map(read_bbox, txt_paths, chunksize=256)
        for i, p in zip(wanted, tqdm(points, total=len(wanted), desc="bbox files", leave=False,
                                      disable=len(wanted) < 10_000)):
            if p is not None:
                boxes[i] = p[:2].reshape(-1)
    return boxes


def resolve_data_root(data_root):
    """Return the folder that holds Train/. Accepts that folder or Train/ itself."""
    root = Path(data_root).expanduser()
    if not root.exists():
        raise UserError(f"--data_root {root} does not exist; expected the WFAS folder that holds Train/ "
                        "(Train/living and Train/spoof), or a labelled list file")
    if (root / "Train").is_dir():
        return root
    if root.name == "Train" and ((root / "living").is_dir() or (root / "spoof").is_dir()):
        return root.parent
    raise UserError(f"--data_root {root} is not a WFAS folder: expected Train/living/<subject>/*.jpg and "
                    "Train/spoof/<attack type>/<subject>/*.jpg under it (or pass Train/ itself, or a labelled "
                    "list file)")


def _walk_images(folder, root):
    """Yield (relative path, relative folder, has bbox file) for each image below folder, without opening it."""
    stack = [folder]
    while stack:
        current = stack.pop()
        with os.scandir(current) as entries:
            entries = sorted(entries, key=lambda e: e.name)
        names = {e.name for e in entries}
        relative_dir = os.path.relpath(current, root)
        for entry in entries:
            if entry.is_dir():
                stack.append(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                stem = os.path.splitext(entry.name)[0]
                yield f"{relative_dir}/{entry.name}", relative_dir, f"{stem}.txt" in names


def list_images(folder):
    """The images below folder, at any depth, as sorted paths relative to it."""
    return sorted(path.removeprefix("./") for path, _, _ in _walk_images(Path(folder), Path(folder)))


def index_wfas(data_root):
    """Index Train/ of a WFAS release: Train/living/<subject>/ and Train/spoof/<attack type>/<subject>/."""
    root = resolve_data_root(data_root)
    rows = []
    living = root / "Train" / "living"
    if living.is_dir():
        rows += [(path, LIVE, LIVE_TYPE, subject, bbox) for path, subject, bbox in _walk_images(living, root)]
    spoof = root / "Train" / "spoof"
    if spoof.is_dir():
        for attack_dir in sorted(p for p in spoof.iterdir() if p.is_dir()):
            rows += [(path, SPOOF, attack_dir.name, subject, bbox)
                     for path, subject, bbox in _walk_images(attack_dir, root)]
    if not rows:
        raise UserError(f"no images found under {root / 'Train'}; expected Train/living/<subject>/*.jpg and "
                        "Train/spoof/<attack type>/<subject>/*.jpg")
    paths, labels, attack_types, subjects, has_bbox = zip(*rows)
    return _make_table(root, paths, labels, attack_types, subjects, has_bbox, read_boxes(root, paths, has_bbox))


def index_labelled_list(list_file):
    """Index a labelled list file: one `relative/path.jpg label [attack_type [subject]]` per line, label
    1 = live. Paths are relative to the list file's folder; without a subject column a subject is the folder
    that holds the image."""
    list_file = Path(list_file)
    root = list_file.parent
    paths, labels, attack_types, subjects = [], [], [], []
    for line_number, line in enumerate(list_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if not 2 <= len(fields) <= 4 or fields[1] not in ("0", "1"):
            raise UserError(f"{list_file}:{line_number}: expected `relative/path.jpg label [attack_type [subject]]` "
                            f"with label 1 (live) or 0 (spoof), got {line.strip()!r}")
        label = int(fields[1])
        paths.append(fields[0])
        labels.append(label)
        attack_types.append(LIVE_TYPE if label == LIVE else (fields[2] if len(fields) > 2 else "spoof"))
        subjects.append(fields[3] if len(fields) > 3 else os.path.dirname(fields[0]))
    if not paths:
        raise UserError(f"{list_file} lists no images; expected one `relative/path.jpg label` per line")
    boxes = read_boxes(root, paths)
    has_bbox = [(root / p).with_suffix(".txt").is_file() for p in paths]
    return _make_table(root, paths, labels, attack_types, subjects, has_bbox, boxes)


def index_dataset(data_root):
    """Index a WFAS folder, or a labelled list file."""
    source = Path(data_root).expanduser()
    if source.is_file():
        return index_labelled_list(source)
    return index_wfas(source)


def unlabelled_table(root, paths):
    """A table of images without labels (label -1), such as the challenge's Dev/Test lists."""
    boxes = read_boxes(root, paths)
    return _make_table(root, paths, [-1] * len(paths), [""] * len(paths), [os.path.dirname(p) for p in paths],
                       ~np.isnan(boxes[:, 0]), boxes)


def find_prediction_lists(root):
    """The unlabelled challenge lists shipped next to Train/: Dev/Dev.txt, Test/Test.txt."""
    return [root / name / f"{name}.txt" for name in ("Dev", "Test") if (root / name / f"{name}.txt").is_file()]


def read_prediction_list(list_file):
    """Read an unlabelled challenge list (Dev.txt / Test.txt): the first token of each line names an image
    in the list's folder or its data/ subfolder. Returns (image folder, names in list order)."""
    list_file = Path(list_file).expanduser()
    if not list_file.is_file():
        raise UserError(f"list file {list_file} does not exist; expected e.g. WFAS/Dev/Dev.txt")
    names = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    if not names:
        raise UserError(f"list file {list_file} is empty")
    # entries may also carry the set folder (dev/000001.jpg), relative to the list's parent
    folders = (list_file.parent / "data", list_file.parent, list_file.parent.parent)
    for folder in folders:
        if (folder / names[0]).is_file():
            return folder, names
    raise UserError(f"cannot find {names[0]} (first entry of {list_file}) in "
                    f"{', '.join(str(f) for f in folders)}")


# ----------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------

def assign_splits(table, val_fraction=0.1, test_fraction=0.1, seed=0):
    """Split by subject, stratified by attack type, deterministic for a seed.

    Within each attack type the subjects are shuffled; each goes to val while val holds fewer images than
    its share, then to test likewise, then to train. So val and test each get at least one subject of every
    type with 3 or more, and the last subject always trains, so that no type is missing from train."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise UserError(f"--val_fraction {val_fraction} and --test_fraction {test_fraction} must be >= 0 "
                        "and leave images for training (sum < 1)")
    rng = np.random.default_rng(seed)
    split = np.zeros(len(table), dtype=np.int8)
    for attack_type in np.unique(table.attack_type):
        in_type = np.flatnonzero(table.attack_type == attack_type)
        subjects, subject_of_row, counts = np.unique(table.subject[in_type], return_inverse=True,
                                                     return_counts=True)
        subject_split = np.zeros(len(subjects), dtype=np.int8)
        targets = np.array([np.inf, val_fraction, test_fraction]) * counts.sum()
        taken = np.zeros(3)
        order = rng.permutation(len(subjects))
        for subject in order[:-1] if len(subjects) >= 3 else []:
            chosen = 1 if taken[1] < targets[1] else 2 if taken[2] < targets[2] else 0
            subject_split[subject] = chosen
            taken[chosen] += counts[subject]
        split[in_type] = subject_split[subject_of_row]
    table.split = split
    return table


SPLIT_COLUMNS = ["path", "label", "attack_type", "subject", "split"]
BOX_COLUMNS = ["x1", "y1", "x2", "y2"]  # the face box, empty without one


def write_split_csv(table, csv_path):
    csv_path = Path(csv_path)
    tmp = aside(csv_path)
    boxes = [["" if np.isnan(v) else f"{v:.7g}" for v in box] for box in table.box.tolist()]
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SPLIT_COLUMNS + BOX_COLUMNS)
        for row in zip(table.paths(), table.label.tolist(), table.attack_types(),
                       (s.decode() for s in table.subject), (SPLITS[s] for s in table.split), boxes):
            writer.writerow(row[:-1] + tuple(row[-1]))
    os.replace(tmp, csv_path)


def read_split_csv(csv_path, root):
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header not in (SPLIT_COLUMNS, SPLIT_COLUMNS + BOX_COLUMNS):
            raise UserError(f"{csv_path} is not a split file: expected the columns "
                            f"{','.join(SPLIT_COLUMNS + BOX_COLUMNS)}")
        columns = list(zip(*reader)) or [()] * len(header)
    paths, labels, attack_types, subjects, splits = columns[:5]
    try:
        if len(header) > len(SPLIT_COLUMNS):
            boxes = np.array([[float(v) if v else np.nan for v in box] for box in zip(*columns[5:])],
                             dtype=np.float32).reshape(-1, 4)
        else:  # written before the boxes were kept in it: read the bbox files once more
            boxes = read_boxes(root, paths)
        table = _make_table(root, paths, np.array(labels).astype(np.int8), attack_types, subjects,
                            ~np.isnan(boxes[:, 0]), boxes)
        split_codes = {name: code for code, name in enumerate(SPLITS)}
        table.split = np.array([split_codes[s] for s in splits], dtype=np.int8)
    except (ValueError, KeyError) as error:
        raise UserError(f"{csv_path} is damaged ({error!r}); delete it to recompute the split") from None
    return table


def check_held_out_splits(table, source):
    """Val and test must each hold live and spoof images: without both, ACER and the threshold are undefined.
    Checked when the split is made, before hours of training find it out."""
    for name in ("val", "test"):
        labels = table.label[table.split == SPLITS.index(name)]
        num_live, num_spoof = int((labels == LIVE).sum()), int((labels == SPOOF).sum())
        if num_live and num_spoof:
            continue
        subjects = {label: len(np.unique(np.char.add(table.attack_type, table.subject)[table.label == label]))
                    for label in (LIVE, SPOOF)}
        raise UserError(f"the {name} split of {source} holds {num_live} live and {num_spoof} spoof images, but "
                        f"needs both; the split is by subject (the folder that holds an image) and there are "
                        f"{subjects[LIVE]} live and {subjects[SPOOF]} spoof subjects: put each person's images in "
                        "a folder of their own, or give the list a subject column (`path label attack_type "
                        "subject`), or raise --val_fraction / --test_fraction")


def check_split_source(table, source, record_path, log=print):
    """Refuse a split.csv made from other data, or whose images are gone: it would train on a stale list."""
    csv_path = record_path.with_name("split.csv")
    data_root = str(source.resolve())
    if not record_path.is_file():  # a split written before the record existed: adopt it
        write_json(record_path, {"data_root": data_root, "num_images": len(table)})
        log(f"Recorded {data_root} as the data of {csv_path}")
    recorded = json.loads(record_path.read_text())
    if recorded["data_root"] != data_root:
        raise UserError(f"{csv_path} was made from {recorded['data_root']}, not {data_root}: use another "
                        f"--output_dir for other data, or, if the same data moved, set data_root in {record_path}")
    if recorded["num_images"] != len(table):
        raise UserError(f"{csv_path} lists {len(table)} images but was written with {recorded['num_images']}: it "
                        f"is damaged; delete it and {record_path.name} to split the data again")
    sample = table.paths()[:: math.ceil(len(table) / 64)]  # 64 stats at most: cheap on any file system
    missing = [p for p in sample if not (table.root / p).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {len(sample)} sampled images of {csv_path} are missing under "
                        f"{table.root} (e.g. {missing[0]}): the data moved or was deleted; fix --data_root, or "
                        f"delete {csv_path.name} and {record_path.name} to split what is there now")


def load_or_create_split(data_root, output_dir, val_fraction=0.1, test_fraction=0.1, seed=0, log=print):
    """Return the table with its split, reusing OUTPUT_DIR/split.csv when it exists so that every run and
    both stages see the same split; OUTPUT_DIR/split_source.json records the data it was made from. Call it
    on the main process first (it writes the files)."""
    source = Path(data_root).expanduser()
    root = source.parent if source.is_file() else resolve_data_root(source)
    csv_path = Path(output_dir) / "split.csv"
    record_path = csv_path.with_name("split_source.json")
    if csv_path.exists():
        table = read_split_csv(csv_path, root)
        check_split_source(table, source, record_path, log)
        log(f"Reusing the split in {csv_path} ({len(table)} images)")
    else:
        table = assign_splits(index_dataset(source), val_fraction, test_fraction, seed)
        check_held_out_splits(table, source)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        # the record first: split.csv appearing is what commits the split, so a kill leaves no unrecorded one
        write_json(record_path, {"data_root": str(source.resolve()), "num_images": len(table)})
        write_split_csv(table, csv_path)
        log(f"Wrote a subject-disjoint split to {csv_path} ({len(table)} images)")
    check_held_out_splits(table, source)
    train_labels = table.label[table.split == SPLITS.index("train")]
    num_live, num_spoof = int((train_labels == LIVE).sum()), int((train_labels == SPOOF).sum())
    if num_live == 0 or num_spoof == 0:
        raise UserError(f"the train split of {source} holds {num_live} live and {num_spoof} spoof images; "
                        "training needs both classes (Train/living and Train/spoof)")
    return table


def describe_split(table):
    """One line per split: images, live, spoof, subjects."""
    lines = []
    for name in SPLITS:
        part = table.of_split(name)
        lines.append(f"{name:>5}: {len(part):>8} images ({int((part.label == LIVE).sum())} live, "
                     f"{int((part.label == SPOOF).sum())} spoof) from {len(np.unique(part.subject))} subjects")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Face crops and transforms
# ----------------------------------------------------------------------------------------------------------

def read_bbox(txt_path):
    """RetinaFace points from a bbox file (7 lines of `x y`: box left-top, box right-bottom, 5 landmarks),
    as a (7, 2) float array, or None when the file is missing or malformed. Any other read error is a
    storage fault and raises StorageError."""
    try:
        lines = Path(txt_path).read_text().split("\n")
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    except OSError as error:
        raise StorageError(txt_path, error) from None
    try:
        points = np.array([[float(v) for v in line.split()] for line in lines if line.strip()], dtype=np.float64)
    except ValueError:
        return None
    if points.shape != (7, 2) or not np.isfinite(points).all():
        return None
    return points


def face_crop_box(box, width, height, scale=DEFAULT_FACE_CROP_SCALE):
    """The square crop around the face box (x1, y1, x2, y2), expanded by scale and kept inside the image.
    Reversed, negative or out-of-image coordinates are normalised; no usable box (None or NaN) means the whole
    image."""
    if box is not None and np.isfinite(box).all():
        x1, x2 = np.clip(sorted((box[0], box[2])), 0, width)
        y1, y2 = np.clip(sorted((box[1], box[3])), 0, height)
        if x2 - x1 >= 2 and y2 - y1 >= 2:
            side = min(max(x2 - x1, y2 - y1) * scale, width, height)
            left = min(max((x1 + x2 - side) / 2, 0), width - side)
            top = min(max((y1 + y2 - side) / 2, 0), height - side)
            return left, top, left + side, top + side
    return 0.0, 0.0, float(width), float(height)


def load_face(image_path, box=None, face_crop_scale=DEFAULT_FACE_CROP_SCALE, min_side=0):
    """Open an image, apply its EXIF orientation, and crop the face around box (from SampleTable.box; None:
    the whole image).

    With min_side, a large JPEG is decoded at 1/2, 1/4 or 1/8 scale when the crop stays at least min_side
    pixels wide: the decoder does that for free and it is several times faster than a full decode.

    A file that cannot be read raises StorageError; one that was read but does not decode raises one of
    DECODE_ERRORS."""
    image_path = Path(image_path)
    try:
        data = image_path.read_bytes()
    except OSError as error:
        raise StorageError(image_path, error) from None
    with Image.open(io.BytesIO(data)) as image:
        rotated = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
        width, height = (image.height, image.width) if rotated else image.size
        crop = face_crop_box(box, width, height, face_crop_scale)
        reduction = int((crop[2] - crop[0]) // min_side) if min_side else 1
        if image.format == "JPEG" and reduction >= 2:
            image.draft("RGB", (math.ceil(image.width / reduction), math.ceil(image.height / reduction)))
        image = ImageOps.exif_transpose(image).convert("RGB")
    sx, sy = image.width / width, image.height / height
    return image.crop((round(crop[0] * sx), round(crop[1] * sy), round(crop[2] * sx), round(crop[3] * sy)))


def build_transform(img_size, train):
    """uint8 tensor in, uint8 tensor out: what a loader worker does per image. Normalisation and colour
    jitter run batched on the device (to_model_input), as timm's prefetcher does; uint8 batches also move 4x
    fewer bytes to the device.

    Attack cues are fine textures (halftone, moire), so augmentation stays mild: a random scale/shift of the
    face crop and a horizontal flip; one resize, no blur. Bilinear with antialiasing: from a cached crop the
    scale changes by 15 % at most, where it looks like bicubic and costs half as much. Evaluation is
    deterministic."""
    if train:
        return T.Compose([T.RandomResizedCrop(img_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
                          T.RandomHorizontalFlip()])
    return T.Resize((img_size, img_size), antialias=True)


@functools.lru_cache(maxsize=8)
def _device_constants(mean, std, device):
    """mean, std and the luma weights as [1, 3, 1, 1] tensors on the device, made once: copying them from the
    host every step would make the CPU wait for the device."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1)
                 for v in (mean, std, (0.299, 0.587, 0.114)))


def to_model_input(images, mean, std, color_jitter=0.0):
    """A uint8 batch [B, 3, H, W] on the device to the model's normalised float input. With color_jitter j,
    each image gets its own brightness, contrast and saturation factors in [1 - j, 1 + j] (torchvision's
    ColorJitter, batched): a few element-wise operations on the device instead of ~1 ms per image on a
    loader's CPU."""
    x = images.float().div_(255)
    mean, std, gray_weights = _device_constants(tuple(mean), tuple(std), x.device)
    if color_jitter:
        factors = torch.empty(3, len(x), 1, 1, 1, device=x.device).uniform_(1 - color_jitter, 1 + color_jitter)
        x = (x * factors[0]).clamp_(0, 1)
        mean_gray = (x * gray_weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = ((x - mean_gray) * factors[1] + mean_gray).clamp_(0, 1)
        gray = (x * gray_weights).sum(1, keepdim=True)
        x = ((x - gray) * factors[2] + gray).clamp_(0, 1)
    return (x - mean) / std


class FaceDataset(torch.utils.data.Dataset):
    """Face crops of the images in a SampleTable, as uint8 tensors [3, img_size, img_size].

    They come from a FaceCache when one is given (a small JPEG per face, read through a memory map), else
    from the original photos (cropped around the table's boxes; no bbox file is opened).

    Each item is a dict: image, label, index, ok, error, error_kind. An image that cannot be decoded gives
    ok=False, a zero image, the reason in error and error_kind "decode", so that a multi-hour run logs it and
    carries on, and batch shapes stay equal across processes. A file that cannot be read at all has
    error_kind "storage": the process that meets it stops the run (check_batch raises); an exception raised
    in a loader worker would reach it as a traceback instead of one line. Strings stay on the CPU, so
    checking them never waits for the device."""

    def __init__(self, table, img_size, train=False, face_crop_scale=DEFAULT_FACE_CROP_SCALE, cache=None):
        self.root, self.path, self.label, self.box, self.row = table.root, table.path, table.label, table.box, table.row
        self.img_size = img_size
        self.face_crop_scale = face_crop_scale
        self.cache = cache
        self.transform = build_transform(img_size, train)

    def __len__(self):
        return len(self.path)

    def load(self, index):
        if self.cache is not None:
            return self.cache.decode(self.row[index])
        face = load_face(self.root / self.path[index].decode(), self.box[index], self.face_crop_scale,
                         min_side=self.img_size)
        return T.functional.pil_to_tensor(face)

    def __getitem__(self, index):
        error, error_kind = "", ""
        try:
            image = self.transform(self.load(index))
        except StorageError as exc:
            error, error_kind = str(exc), "storage"
        except DECODE_ERRORS as exc:
            error, error_kind = f"{self.path[index].decode()}: {type(exc).__name__}: {exc}", "decode"
        if error:
            image = torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8)
        return {"image": image, "label": int(self.label[index]), "index": index, "ok": not error, "error": error,
                "error_kind": error_kind}


def check_batch(batch, log_warning):
    """Stop on a file that could not be read; log each image that could not be decoded and return their count."""
    for error, kind in zip(batch["error"], batch["error_kind"]):
        if kind == "storage":
            raise UserError(error)
    undecodable = [error for error in batch["error"] if error]
    for error in undecodable:
        log_warning(f"skipping an image that cannot be decoded: {error}")
    return len(undecodable)


def check_undecodable_share(undecodable, seen):
    """Stop when more than MAX_UNDECODABLE_SHARE of the images read so far (and at least 10) do not decode:
    then the data is broken, not a few files, and training on what remains would hide it."""
    if undecodable >= 10 and undecodable > MAX_UNDECODABLE_SHARE * seen:
        raise UserError(f"{undecodable} of the {seen} images read so far cannot be decoded (over "
                        f"{MAX_UNDECODABLE_SHARE:.0%}): the data is damaged; `python wfas_data.py check --data_root "
                        "DIR --verify_images` lists them")


def build_datasets(table, img_size, face_crop_scale=DEFAULT_FACE_CROP_SCALE, cache=None):
    """{'train', 'val', 'test'} datasets of a split table; only train is augmented. cache: a FaceCache of
    this table, or None to read the original photos."""
    return {name: FaceDataset(table.of_split(name), img_size, train=name == "train",
                              face_crop_scale=face_crop_scale, cache=cache) for name in SPLITS}


def default_loader_settings(num_workers=None):
    """DataLoader settings that scale: the machine's cores shared by the processes on this node (at most 12
    workers each), 4 batches prefetched per worker, pinned memory on CUDA."""
    if num_workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        num_workers = min(12, max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))
    settings = dict(num_workers=num_workers, pin_memory=torch.cuda.is_available())
    if num_workers:
        settings["prefetch_factor"] = 4
    return settings


def describe_loader(settings, cache):
    return (f"Loader: {settings['num_workers']} workers per process"
            + (f", {settings['prefetch_factor']} batches prefetched each" if settings.get("prefetch_factor") else "")
            + (", pinned memory" if settings["pin_memory"] else "")
            + (f"; face crops from the cache {cache.folder}" if cache else "; face crops from the original photos"))


# ----------------------------------------------------------------------------------------------------------
# Face-crop cache
# ----------------------------------------------------------------------------------------------------------

FACE_CACHE_VERSION = 1
FACE_CACHE_SHARD_SIZE = 4096  # images per shard file: the unit of a build's work and of its resume
# JPEG at quality 90: about 15-20 KB per 256 px face here, so WFAS train (488k images) fits in ~10 GB of page
# cache, and its loss is far below what RandomResizedCrop's resampling changes.
FACE_CACHE_QUALITY = 90


def face_cache_size(img_size):
    """The side of a cached crop: img_size / 0.875 (256 for 224), so that the random crop keeps its room."""
    return math.ceil(img_size / 0.875)


def face_cache_params(table, img_size, face_crop_scale):
    """What a cache is built from: a cache is only ever read by runs with exactly these."""
    digest = hashlib.sha1(b"\0".join(table.path.tolist()))
    digest.update(np.ascontiguousarray(table.box).tobytes())
    return {"version": FACE_CACHE_VERSION, "data_root": str(Path(table.root).resolve()), "num_images": len(table),
            "paths_and_boxes_sha1": digest.hexdigest(), "face_crop_scale": float(face_crop_scale),
            "stored_size": face_cache_size(img_size), "encoding": f"jpeg quality {FACE_CACHE_QUALITY}"}


class FaceCache:
    """Face crops of a table's images, resized to face_cache_size(img_size) and JPEG-encoded, in a few large
    shard files that any number of processes on any number of nodes read at random through memory maps.

    One folder holds one cache, named by a digest of its parameters (face_cache_params), so that a run with
    other parameters builds its own. manifest.json is written last: a folder without it is a build in progress
    or a killed one, which the next build resumes shard by shard, and is never read."""

    def __init__(self, folder, params):
        self.folder = Path(folder)
        try:
            manifest = json.loads((self.folder / "manifest.json").read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"the face cache {self.folder} is damaged ({error}); delete the folder to rebuild "
                            "it") from None
        if manifest.get("params") != params:
            raise UserError(f"the face cache {self.folder} was built from other data or settings than this run's; "
                            "delete the folder to rebuild it, or pass another --face_cache_dir")
        self.shard_files, offsets = [], []
        for shard in manifest["shards"]:
            path = self.folder / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["offsets"][-1]:
                raise UserError(f"the face cache {self.folder} is damaged ({shard['file']} is missing or has the "
                                "wrong size); delete the folder to rebuild it")
            self.shard_files.append(path)
            offsets.append(np.asarray(shard["offsets"], dtype=np.int64))
        self.shard_of = np.concatenate([np.full(len(o) - 1, k, dtype=np.int32) for k, o in enumerate(offsets)])
        self.start = np.concatenate([o[:-1] for o in offsets])
        self.length = np.concatenate([np.diff(o) for o in offsets])
        self.undecodable = {int(row): reason for row, reason in manifest["undecodable"].items()}
        self.num_bytes = int(sum(o[-1] for o in offsets))
        self.built_now = False  # set by build_face_cache when this call built it
        self._maps = {}  # opened lazily, in each loader worker

    def __len__(self):
        return len(self.start)

    def decode(self, row):
        """The stored crop of a table row as a uint8 tensor [3, S, S]."""
        if self.length[row] == 0:
            raise ValueError(f"it could not be decoded when the face cache was built ({self.undecodable[row]})")
        shard = int(self.shard_of[row])
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.shard_files[shard], dtype=np.uint8, mode="r")
        data = self._maps[shard][self.start[row]:self.start[row] + self.length[row]]
        # Pillow rather than torchvision.io, whose decoders are deprecated since torchvision 0.29
        with Image.open(io.BytesIO(data)) as image:
            return T.functional.pil_to_tensor(image.convert("RGB"))


class _CropEncoder(torch.utils.data.Dataset):
    """(row, JPEG bytes of the stored crop or None, error kind, error) for the rows of one build."""

    def __init__(self, table, rows, size, face_crop_scale):
        self.table, self.rows, self.size, self.face_crop_scale = table, rows, size, face_crop_scale

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = int(self.rows[i])
        try:
            face = load_face(self.table.root / self.table.path[row].decode(), self.table.box[row],
                             self.face_crop_scale, min_side=self.size)
        except StorageError as error:
            return row, None, "storage", str(error)
        except DECODE_ERRORS as error:
            return row, None, "decode", f"{type(error).__name__}: {error}"
        buffer = io.BytesIO()
        face.resize((self.size, self.size), Image.BICUBIC).save(buffer, "JPEG", quality=FACE_CACHE_QUALITY)
        return row, buffer.getvalue(), "", ""


def _write_shard(folder, shard, encoded, errors, process_index):
    """One shard file and its record, each written aside and renamed: the record is what marks it done."""
    name = f"shard_{shard:05d}.bin"
    tmp = aside(folder / name)
    try:
        with open(tmp, "wb") as f:
            for data in encoded:
                f.write(data)
        os.replace(tmp, folder / name)
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in encoded])]).tolist()
        write_json(folder / f"shard_{shard:05d}.json", {"file": name, "offsets": offsets, "undecodable": errors,
                                                        "built_by_process": process_index})
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write the face cache in {folder} ({error.strerror or error}): free space there, "
                        "or pass --face_cache_dir DIR on a larger disk, or --no-face_cache") from None


def build_face_cache(table, cache_dir, img_size, face_crop_scale=DEFAULT_FACE_CROP_SCALE, workers=8,
                     process_index=0, num_processes=1, wait_for_everyone=lambda: None, log=print):
    """The FaceCache of table's images under cache_dir: reused when built, else built, or a killed build
    resumed. With several processes every one calls it with its process_index: each builds the shards k with
    k % num_processes == process_index (so 64 processes build it 64 times faster), then the main process
    writes the manifest. Images that cannot be decoded are recorded once, here."""
    params = face_cache_params(table, img_size, face_crop_scale)
    folder = Path(cache_dir) / hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    if not (folder / "manifest.json").is_file():
        num_shards = math.ceil(len(table) / FACE_CACHE_SHARD_SIZE)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create the face cache folder {folder} ({error.strerror or error})") from None
        if process_index == 0:
            write_json(folder / "params.json", params)
        done = {k for k in range(num_shards) if (folder / f"shard_{k:05d}.json").is_file()}
        mine = [k for k in range(num_shards) if k % num_processes == process_index and k not in done]
        if process_index == 0:
            log(f"Building the face cache {folder}: {len(table)} images in {num_shards} shards"
                + (f", {len(done)} done by an earlier build" if done else "")
                + (f", shared by {num_processes} processes" if num_processes > 1 else ""))
        _build_shards(table, folder, mine, params, workers, process_index, log)
        wait_for_everyone()
        if process_index == 0:
            _write_manifest(folder, num_shards, params, log)
        wait_for_everyone()
        cache = FaceCache(folder, params)
        cache.built_now = True
        return cache
    return FaceCache(folder, params)


def _build_shards(table, folder, shards, params, workers, process_index, log):
    rows = np.concatenate([np.arange(k * FACE_CACHE_SHARD_SIZE, min((k + 1) * FACE_CACHE_SHARD_SIZE, len(table)))
                           for k in shards]) if shards else np.array([], dtype=np.int64)
    encoder = _CropEncoder(table, rows, params["stored_size"], params["face_crop_scale"])
    loader = torch.utils.data.DataLoader(encoder, batch_size=None, num_workers=workers,
                                         prefetch_factor=16 if workers else None)
    sizes = [min(FACE_CACHE_SHARD_SIZE, len(table) - k * FACE_CACHE_SHARD_SIZE) for k in shards]
    start, encoded, errors, shard_index = time.time(), [], {}, 0
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules  # no bar frames in log files
    progress = tqdm(loader, total=len(rows), desc="face cache", unit="img", mininterval=2,
                    disable=len(rows) == 0 or process_index != 0 or not interactive)
    for row, data, kind, error in progress:
        if kind == "storage":
            raise UserError(error)
        if kind == "decode":
            errors[str(row)] = error
        encoded.append(data or b"")
        if len(encoded) == sizes[shard_index]:
            _write_shard(folder, shards[shard_index], encoded, errors, process_index)
            shard_index, encoded, errors = shard_index + 1, [], {}
    if len(rows) and process_index == 0:
        log(f"Face cache: built {len(rows)} images in {time.time() - start:.0f} s "
            f"({len(rows) / (time.time() - start):.0f} img/s on this process, {workers} workers)")


def _write_manifest(folder, num_shards, params, log):
    shards, undecodable = [], {}
    for k in range(num_shards):
        record_path = folder / f"shard_{k:05d}.json"
        if not record_path.is_file():
            raise UserError(f"the face cache build in {folder} is missing shard {k}: a process failed; rerun to "
                            "resume the build")
        record = json.loads(record_path.read_text())
        shards.append({"file": record["file"], "offsets": record["offsets"]})
        undecodable.update(record["undecodable"])
    num_bytes = sum(s["offsets"][-1] for s in shards)
    num_images = sum(len(s["offsets"]) - 1 for s in shards)
    write_json(folder / "manifest.json", {"params": params, "shards": shards, "undecodable": undecodable,
                                          "num_bytes": num_bytes})
    log(f"Face cache {folder}: {num_images} images, {num_bytes / 2**20:.1f} MiB "
        f"({num_bytes / max(num_images, 1) / 1024:.1f} KiB per image), {len(undecodable)} undecodable")


# ----------------------------------------------------------------------------------------------------------
# Evaluation protocol
# ----------------------------------------------------------------------------------------------------------

def check_scores(scores):
    """Scores as float64, refusing NaN: sorted, a NaN would pass for the highest score in AUC and EER."""
    scores = np.asarray(scores, dtype=np.float64)
    num_nan = int(np.isnan(scores).sum())
    if num_nan:
        raise UserError(f"{num_nan} of {len(scores)} scores are NaN: the model's outputs are not finite (training "
                        "diverged); lower --learning_rate, or use bf16 rather than fp16 mixed precision")
    return scores


def candidate_thresholds(scores, labels):
    """Every distinct decision on these scores: thresholds halfway between adjacent distinct scores (and
    below the lowest, above the highest), never on a score, so that a decision at a threshold does not hang
    on how a score was rounded in a file. Returns the thresholds, ascending, and the errors at each counted in
    images: spoof images accepted (score >= t) and live images rejected (score < t)."""
    scores, labels = check_scores(scores), np.asarray(labels)
    live, spoof = np.sort(scores[labels == LIVE]), np.sort(scores[labels == SPOOF])
    distinct = np.unique(scores)
    candidates = np.concatenate([[min(distinct[0], 0.0) - 1e-6], (distinct[:-1] + distinct[1:]) / 2,
                                 [max(distinct[-1], 1.0) + 1e-6]])
    spoof_accepted = len(spoof) - np.searchsorted(spoof, candidates, side="left")
    live_rejected = np.searchsorted(live, candidates, side="left")
    return candidates, spoof_accepted, live_rejected


def eer_threshold(scores, labels):
    """The threshold where |APCER - BPCER| is smallest (ties: the smaller ACER). Fit it on val only."""
    labels = np.asarray(labels)
    num_live, num_spoof = int((labels == LIVE).sum()), int((labels == SPOOF).sum())
    if num_live == 0 or num_spoof == 0:
        return 0.5
    candidates, spoof_accepted, live_rejected = candidate_thresholds(scores, labels)
    apcer, bpcer = spoof_accepted / num_spoof, live_rejected / num_live
    best = np.lexsort((apcer + bpcer, np.abs(apcer - bpcer)))[0]
    return float(candidates[best])


# The WFAS challenge accepts a single model of at most this many GFLOPs per image.
CHALLENGE_GFLOPS_LIMIT = 5.0

# The error rates a deployer may afford: a threshold is fitted on val for each, and test is scored at it.
OPERATING_POINT_TARGETS = (("bpcer", 0.01), ("bpcer", 0.001), ("apcer", 0.01), ("apcer", 0.001))


def operating_points(val_scores, val_labels, test_scores, test_labels, targets=OPERATING_POINT_TARGETS):
    """For each (error, target) of targets, the val threshold that keeps that error at or below the target
    with the other error as low as it goes (BPCER <= 1%: the highest such threshold; APCER <= 1%: the lowest),
    and the val and test APCER/BPCER at it.

    A target below 1/(images of that class on val) cannot be told apart from 0 there: such a point is fitted
    to no error on val at all and flagged resolved=False."""
    val_labels, test_labels = np.asarray(val_labels), np.asarray(test_labels)
    if not (val_labels == LIVE).any() or not (val_labels == SPOOF).any():
        return []
    candidates, spoof_accepted, live_rejected = candidate_thresholds(val_scores, val_labels)
    num_live, num_spoof = int((val_labels == LIVE).sum()), int((val_labels == SPOOF).sum())
    points = []
    for error, target in targets:
        # errors compared in images (as rates, 1 - 99/100 exceeds 1%); 1e-9: 0.29 * 100 is 28.999999999999996
        if error == "bpcer":  # BPCER grows with the threshold: the highest one within the target
            num_class, index = num_live, np.flatnonzero(live_rejected <= target * num_live + 1e-9)[-1]
        else:  # APCER falls as the threshold grows: the lowest one within the target
            num_class, index = num_spoof, np.flatnonzero(spoof_accepted <= target * num_spoof + 1e-9)[0]
        threshold = float(candidates[index])
        test = compute_error_rates(test_scores, test_labels, threshold)
        points.append({"target": f"{error.upper()} {target * 100:g}%", "error": error, "target_rate": target,
                       "threshold": threshold, "val_apcer": float(spoof_accepted[index] / num_spoof),
                       "val_bpcer": float(live_rejected[index] / num_live), "test_apcer": test["apcer"],
                       "test_bpcer": test["bpcer"], "resolved": bool(num_class * target >= 1)})
    return points


def compute_error_rates(scores, labels, threshold):
    """APCER (spoof with score >= threshold, i.e. taken for live) and BPCER (live with score < threshold)."""
    predicted_live, labels = check_scores(scores) >= threshold, np.asarray(labels)
    spoof, live = labels == SPOOF, labels == LIVE
    return {"apcer": float(predicted_live[spoof].mean()) if spoof.any() else float("nan"),
            "bpcer": float((~predicted_live[live]).mean()) if live.any() else float("nan")}


def format_operating_points(points):
    """A table to log: one line per target."""
    lines = ["operating points (threshold fitted on val; test scored at it):"]
    for p in points:
        lines.append(f"  {p['target']:>10}: threshold {p['threshold']:.6f}  val APCER {p['val_apcer']:.4f} BPCER "
                     f"{p['val_bpcer']:.4f}  test APCER {p['test_apcer']:.4f} BPCER {p['test_bpcer']:.4f}"
                     + ("" if p["resolved"] else "  (val too small to resolve this target)"))
    return "\n".join(lines)


def roc_auc(scores, labels):
    """Probability that a live image scores above a spoof image (ties count half)."""
    scores, labels = check_scores(scores), np.asarray(labels)
    n_live, n_spoof = int((labels == LIVE).sum()), int((labels == SPOOF).sum())
    if n_live == 0 or n_spoof == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return float((ranks[labels == LIVE].sum() - n_live * (n_live + 1) / 2) / (n_live * n_spoof))


def compute_metrics(scores, labels, attack_types, threshold=None):
    """WFAS metrics for P(live) scores. A sample is predicted live when score >= threshold; without a
    threshold, the EER point of these scores is used (do that on val, never on test).

    Returns threshold, acc, apcer, bpcer, acer, auc, eer, apcer_per_attack and worst_apcer."""
    scores = check_scores(scores)
    labels = np.asarray(labels)
    attack_types = np.asarray(attack_types).astype(str)
    eer_point = eer_threshold(scores, labels)
    if threshold is None:
        threshold = eer_point
    predicted_live = scores >= threshold
    rates, eer_rates = compute_error_rates(scores, labels, threshold), compute_error_rates(scores, labels, eer_point)
    apcer, bpcer = rates["apcer"], rates["bpcer"]
    per_attack = {a: float(predicted_live[attack_types == a].mean())
                  for a in sorted(set(attack_types[labels == SPOOF]))}
    return {
        "threshold": float(threshold),
        "acc": float((predicted_live == (labels == LIVE)).mean()) if len(labels) else float("nan"),
        "apcer": apcer,
        "bpcer": bpcer,
        "acer": (apcer + bpcer) / 2,
        "auc": roc_auc(scores, labels),
        "eer": (eer_rates["apcer"] + eer_rates["bpcer"]) / 2,
        "apcer_per_attack": per_attack,
        "worst_apcer": max(per_attack.values()) if per_attack else float("nan"),
        "num_images": int(len(labels)),
    }


def format_metrics(metrics):
    return (f"ACC {metrics['acc']:.4f}  APCER {metrics['apcer']:.4f}  BPCER {metrics['bpcer']:.4f}  "
            f"ACER {metrics['acer']:.4f}  AUC {metrics['auc']:.4f}  EER {metrics['eer']:.4f}  "
            f"worst-attack APCER {metrics['worst_apcer']:.4f}")


def aside(path):
    """A temporary name next to path, unique to this process, so that writers on several nodes of a shared
    file system never write into each other's file before the rename."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def write_json(path, data):
    """Write JSON aside and rename it into place, so a kill never leaves a half-written file."""
    path = Path(path)
    tmp = aside(path)
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def format_score(score):
    """The shortest text that reads back as exactly the same float: files reproduce the reported metrics."""
    return repr(float(score))


# ----------------------------------------------------------------------------------------------------------
# Reports: the per-epoch summary.csv, plots and EXP/report.md
# ----------------------------------------------------------------------------------------------------------

def write_summary_row(path, row):
    """Add one epoch's row to a summary.csv (as timm's train.py keeps one), written aside and renamed. Rows of
    this epoch or later from an earlier run that was resumed before them are dropped, so a resume never leaves
    an epoch twice."""
    path = Path(path)
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < int(row["epoch"])]
    rows.append({k: (format_score(v) if isinstance(v, float) else v) for k, v in row.items()})
    columns = list(dict.fromkeys(k for r in rows for k in r))
    tmp = aside(path)
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_predictions_csv(path):
    """(labels, attack types, scores) of a stageN_{val,test}_predictions.csv."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return (np.array([int(r["label"]) for r in rows]), np.array([r["attack_type"] for r in rows]),
            np.array([float(r["score"]) for r in rows]))


def error_rate_curve(scores, labels):
    """APCER and BPCER at every threshold between the scores, from accepting all to rejecting all."""
    scores, labels = check_scores(scores), np.asarray(labels)
    live, spoof = np.sort(scores[labels == LIVE]), np.sort(scores[labels == SPOOF])
    thresholds = np.concatenate([[-np.inf], np.unique(scores), [np.inf]])
    apcer = 1 - np.searchsorted(spoof, thresholds, side="left") / max(len(spoof), 1)
    bpcer = np.searchsorted(live, thresholds, side="left") / max(len(live), 1)
    return apcer, bpcer


def make_plots(plot_dir, stage, summary_csv, val, test, threshold, test_metrics, teacher_test=None, log=print):
    """The PNGs of a stage: training curves, ROC and DET on val and test with the val operating point, test
    score histograms, APCER per attack type and, for stage 2, teacher vs student. val, test, teacher_test:
    (labels, attack types, scores). Never fails the run: a missing matplotlib or a failing plot is one warning."""
    try:  # Figure without pyplot: no backend to choose, nothing global changed (a notebook keeps its own)
        from matplotlib.figure import Figure
        from statistics import NormalDist
    except ImportError:
        log(f"warning: no plots for {stage}: matplotlib is not installed (pip install matplotlib)")
        return []
    plot_dir = Path(plot_dir)
    written = []

    def save(fig, name):
        path = plot_dir / f"{stage}_{name}.png"
        fig.tight_layout()
        tmp = aside(path).with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
        written.append(path)

    try:
        plot_dir.mkdir(parents=True, exist_ok=True)
        with open(summary_csv, newline="") as f:
            summary = list(csv.DictReader(f))
        epochs = [int(r["epoch"]) for r in summary]
        fig = Figure(figsize=(13, 3.6))
        axes = fig.subplots(1, 3)
        for key in [k for k in summary[0] if k.startswith("train_") and k != "train_images_per_second"] + ["val_loss"]:
            if key in summary[0] and summary[0][key] != "":
                axes[0].plot(epochs, [float(r[key]) for r in summary], marker="o", label=key)
        axes[0].set(title="loss", xlabel="epoch")
        axes[0].legend(fontsize=8)
        for key in ("val_acer", "val_auc"):
            axes[1].plot(epochs, [float(r[key]) for r in summary], marker="o", label=key.replace("val_", "val "))
        axes[1].set(title="validation", xlabel="epoch", ylim=(0, 1))
        axes[1].legend(fontsize=8)
        axes[2].plot(epochs, [float(r["lr"]) for r in summary], marker="o")
        axes[2].set(title="learning rate (end of epoch)", xlabel="epoch", yscale="log")
        save(fig, "training_curves")

        fig = Figure(figsize=(10, 4.2))
        roc, det = fig.subplots(1, 2)
        deviate = NormalDist().inv_cdf
        ticks = [0.001, 0.01, 0.05, 0.2, 0.5]
        for name, (labels, _, scores) in (("val", val), ("test", test)):
            apcer, bpcer = error_rate_curve(scores, labels)
            roc.plot(apcer, 1 - bpcer, label=f"{name} (AUC {roc_auc(scores, labels):.3f})")
            keep = (apcer > 0) & (apcer < 1) & (bpcer > 0) & (bpcer < 1)
            det.plot([deviate(a) for a in apcer[keep]], [deviate(b) for b in bpcer[keep]], label=name)
            point = compute_metrics(scores, labels, np.full(len(labels), "x"), threshold)
            roc.plot(point["apcer"], 1 - point["bpcer"], "o", color=roc.lines[-1].get_color())
            if 0 < point["apcer"] < 1 and 0 < point["bpcer"] < 1:
                det.plot(deviate(point["apcer"]), deviate(point["bpcer"]), "o", color=det.lines[-1].get_color())
        roc.set(title=f"ROC (dots: the val threshold {threshold:.3f})", xlabel="APCER (spoof accepted)",
                ylabel="1 - BPCER (live accepted)")
        det.set(title="DET (normal deviate axes)", xlabel="APCER", ylabel="BPCER")
        det.set(xlim=(deviate(0.0005), deviate(0.6)), ylim=(deviate(0.0005), deviate(0.6)))
        det.set_xticks([deviate(t) for t in ticks], [f"{t:g}" for t in ticks])
        det.set_yticks([deviate(t) for t in ticks], [f"{t:g}" for t in ticks])
        roc.legend(fontsize=8)
        det.legend(fontsize=8)
        save(fig, "roc_det")

        labels, _, scores = test
        fig = Figure(figsize=(6, 3.6))
        axis = fig.subplots()
        bins = np.linspace(0, 1, 41)
        axis.hist(scores[labels == LIVE], bins, alpha=0.6, label="live")
        axis.hist(scores[labels == SPOOF], bins, alpha=0.6, label="spoof")
        axis.axvline(threshold, color="k", linestyle="--", label=f"val threshold {threshold:.3f}")
        axis.set(title="test scores P(live)", xlabel="score", ylabel="images")
        axis.legend(fontsize=8)
        save(fig, "score_histograms")

        per_attack = test_metrics["apcer_per_attack"]
        fig = Figure(figsize=(7, 0.35 * len(per_attack) + 1.5))
        axis = fig.subplots()
        axis.barh(list(per_attack), list(per_attack.values()))
        axis.set(title="test APCER per attack type at the val threshold", xlabel="APCER", xlim=(0, 1))
        save(fig, "apcer_per_attack")

        if teacher_test is not None:
            fig = Figure(figsize=(10, 4))
            roc, bars = fig.subplots(1, 2)
            for name, (labels, types, scores) in (("teacher (stage 1)", teacher_test), ("student (stage 2)", test)):
                apcer, bpcer = error_rate_curve(scores, labels)
                roc.plot(apcer, 1 - bpcer, label=f"{name}, AUC {roc_auc(scores, labels):.3f}")
            roc.set(title="test ROC", xlabel="APCER", ylabel="1 - BPCER")
            roc.legend(fontsize=8)
            teacher_metrics = compute_metrics(teacher_test[2], teacher_test[0], teacher_test[1], threshold=None)
            names = ["acer", "apcer", "bpcer", "eer"]
            x = np.arange(len(names))
            bars.bar(x - 0.2, [teacher_metrics[n] for n in names], 0.4, label="teacher (its own EER point)")
            bars.bar(x + 0.2, [test_metrics[n] for n in names], 0.4, label="student (val threshold)")
            bars.set_xticks(x, [n.upper() for n in names])
            bars.set(title="test error rates")
            bars.legend(fontsize=8)
            save(fig, "teacher_vs_student")
    except Exception as error:  # plots are a convenience: never the reason a multi-day run fails
        log(f"warning: plotting {stage} stopped ({type(error).__name__}: {error}); the results are unaffected")
    return written


def write_report(output_dir):
    """EXP/report.md: the key metrics of both stages, their plots, the configuration and the data, at a glance.
    Built from the files in EXP, so either stage can (re)write it."""
    output_dir = Path(output_dir)

    def load(name):
        path = output_dir / name
        return json.loads(path.read_text()) if path.is_file() else None

    stage1, final = load("stage1_results.json"), load("final_results.json")
    lines = [f"# WFAS experiment report: {output_dir.name}", ""]
    rows = []
    if stage1:
        t = stage1["test"]
        rows.append(("teacher (stage 1)", t["acc"], t["apcer"], t["bpcer"], t["acer"], t["auc"], t["eer"],
                     stage1["threshold"]))
    if final:
        rows.append(("student (stage 2)", final["test_acc"], final["test_apcer"], final["test_bpcer"],
                     final["test_acer"], final["test_auc"], final["test_eer"], final["threshold"]))
    lines += ["## Test metrics (at the val EER threshold)", "",
              "| model | ACC | APCER | BPCER | ACER | AUC | EER | threshold |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | " + " | ".join(f"{v:.4f}" for v in r[1:]) + " |" for r in rows]
    if final:
        lines += ["", f"Student: test ACER {final['test_acer']:.4f}, ACC {final['test_acc']:.4f}, worst-attack APCER "
                      f"{final['test_worst_apcer']:.4f}, on {final['num_test_images']} test images; best epoch "
                      f"{final['best_epoch']}."]
    if final and final.get("operating_points"):
        lines += ["", "## Operating points of the student", "",
                  "Thresholds fitted on val for the error a deployment can afford; test is scored at each. "
                  "`resolved: no` means val has too few images of that class to tell the target from 0.", "",
                  "| target | threshold | val APCER | val BPCER | test APCER | test BPCER | resolved |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {p['target']} | {p['threshold']:.6f} | {p['val_apcer']:.4f} | {p['val_bpcer']:.4f} | "
                  f"{p['test_apcer']:.4f} | {p['test_bpcer']:.4f} | {'yes' if p['resolved'] else 'no'} |"
                  for p in final["operating_points"]]
    compute = [(name, results["compute"]) for name, results in (("teacher (stage 1)", stage1),
                                                                  ("student (stage 2)", final))
               if results and results.get("compute")]
    if compute:
        lines += ["", "## Compute budget", "", "| model | network | input | params (M) | GMACs | GFLOPs |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {c['model_name']} | {c['img_size']} | {c['params_m']:.2f} | {c['gmacs']:.3f} | "
                  f"{c['gflops']:.3f} |" for name, c in compute]
        lines += ["", "GFLOPs = 2 x GMACs. " + " ".join(c["challenge_limit"] for _, c in compute)]
    plots = sorted((output_dir / "plots").glob("*.png")) if (output_dir / "plots").is_dir() else []
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    csv_path = output_dir / "split.csv"
    if csv_path.is_file():
        with open(csv_path, newline="") as f:
            split_rows = list(csv.DictReader(f))
        lines += ["", "## Data", "", "| split | images | live | spoof | subjects | attack types |",
                  "|---|---|---|---|---|---|"]
        for name in SPLITS:
            part = [r for r in split_rows if r["split"] == name]
            lines.append(f"| {name} | {len(part)} | {sum(r['label'] == str(LIVE) for r in part)} | "
                         f"{sum(r['label'] == str(SPOOF) for r in part)} | "
                         f"{len({(r['attack_type'], r['subject']) for r in part})} | "
                         f"{len({r['attack_type'] for r in part if r['label'] == str(SPOOF)})} |")
    for stage in ("stage1", "stage2"):
        config = load(f"{stage}_config.json")
        if config:
            lines += ["", f"## Configuration of {stage}", "", "```json", json.dumps(config, indent=1), "```"]
    path = output_dir / "report.md"
    tmp = aside(path)
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# check: a dataset summary to read before a multi-day job
# ----------------------------------------------------------------------------------------------------------

def _can_decode(path):
    try:
        data = path.read_bytes()
    except OSError as error:
        raise StorageError(path, error) from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except DECODE_ERRORS:
        return False


def check_dataset(data_root, verify_images=False, workers=16):
    table = index_dataset(data_root)
    root = table.root
    image_files = [root / p for p in table.paths()]
    missing = int((~table.has_bbox).sum())  # counted by the one pass over the bbox files that indexing makes
    bad = int((table.has_bbox & np.isnan(table.box[:, 0])).sum())
    attack_types = {a.decode(): int(n) for a, n in zip(*np.unique(table.attack_type[table.label == SPOOF],
                                                                   return_counts=True))}
    summary = {
        "data_root": str(root),
        "num_images": len(table),
        "num_live": int((table.label == LIVE).sum()),
        "num_spoof": int((table.label == SPOOF).sum()),
        "num_subjects": int(len(np.unique(np.char.add(table.attack_type, table.subject)))),
        "attack_types": attack_types,
        "missing_bbox": missing,
        "bad_bbox": bad,
        "prediction_lists": {str(p.relative_to(root)): len(read_prediction_list(p)[1])
                             for p in find_prediction_lists(root)},
    }
    if verify_images:
        with ThreadPoolExecutor(workers) as pool:
            decodable = list(tqdm(pool.map(_can_decode, image_files, chunksize=64), total=len(image_files),
                                  desc="decoding images"))
        summary["unreadable"] = [p for p, ok in zip(table.paths(), decodable) if not ok]
    return summary


def print_summary(summary):
    print(f"WFAS data at {summary['data_root']}")
    print(f"  images     {summary['num_images']:>9}   live {summary['num_live']}, spoof {summary['num_spoof']}")
    print(f"  subjects   {summary['num_subjects']:>9}")
    print("  attack types:")
    for name, count in summary["attack_types"].items():
        print(f"    {name:<24}{count:>9}")
    print(f"  images without a bbox file   {summary['missing_bbox']} (the whole image is used)")
    print(f"  malformed bbox files         {summary['bad_bbox']} (the whole image is used)")
    lists = summary["prediction_lists"]
    print("  lists to predict: " + (", ".join(f"{k} ({v} images)" for k, v in lists.items()) or "none found"))
    if "unreadable" in summary:
        print(f"  unreadable images            {len(summary['unreadable'])}")
        for path in summary["unreadable"][:20]:
            print(f"    {path}")
        if len(summary["unreadable"]) > 20:
            print(f"    ... and {len(summary['unreadable']) - 20} more (see --json)")


# ----------------------------------------------------------------------------------------------------------
# make_demo: a generated dataset in the WFAS layout
# ----------------------------------------------------------------------------------------------------------

DEMO_ATTACK_TYPES = ("2D-Display-Pad", "2D-Display-Phone", "2D-Print-Album", "2D-Print-Newspaper",
                     "2D-Print-Photo", "2D-Print-Poster", "3D-AdultDoll", "3D-GarageKit", "3D-Mask")
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
    u, v = (x - cx) / half_w, (y - cy) / half_h
    inside = u ** 2 + v ** 2 <= 1
    light = rng.uniform(-0.6, 0.6)  # direction of the light across the face
    shading = np.clip(0.75 + 0.35 * np.sqrt(np.clip(1 - u ** 2 - v ** 2, 0, 1)) + 0.15 * light * u, 0.3, 1.3)
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
    return {"background": rng.uniform(30, 220, 3), "face_w": rng.uniform(20, 28),
            "skin": rng.uniform([150, 100, 70], [240, 190, 160]), "eye": rng.uniform(10, 70, 3),
            "lips": rng.uniform([120, 30, 30], [200, 90, 90])}


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
        image[:bezel], image[-bezel:], image[:, :bezel], image[:, -bezel:] = 15, 15, 15, 15
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
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=95)
    jitter = points + rng.normal(0, 1.0, points.shape)  # detector noise
    path.with_suffix(".txt").write_text("".join(f"{px:.2f} {py:.2f}\n" for px, py in jitter))


def make_demo(out_dir, subjects=150, seed=0, images_per_live=4, images_per_spoof=1, unlabelled=24):
    """Write a small generated dataset in the WFAS release layout. Returns its root."""
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
            _save_demo_image(image, points, folder / f"{i:03d}.jpg", rng)
            count += 1
    spoof_subjects = max(3, subjects // 2)
    for attack_type in DEMO_ATTACK_TYPES:
        for s in range(spoof_subjects):  # subject names repeat across attack types, as in WFAS
            identity = _demo_identity(rng)
            folder = train / "spoof" / attack_type / f"{s:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(images_per_spoof):
                image, points, inside = _demo_face(rng, identity)
                _save_demo_image(_demo_attack(rng, attack_type, image, inside), points, folder / f"{i:03d}.jpg", rng)
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
                image = _demo_attack(rng, DEMO_ATTACK_TYPES[i % len(DEMO_ATTACK_TYPES)], image, inside)
            names.append(f"{i:06d}.jpg")
            _save_demo_image(image, points, data / names[-1], rng)
        (root / name / f"{name}.txt").write_text("".join(n + "\n" for n in names))
    return root, count


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("make_demo", help="write a generated dataset in the WFAS layout")
    demo.add_argument("out_dir", help="folder to write (it gets Train/, Dev/ and Test/)")
    demo.add_argument("--subjects", type=int, default=150, help="live subjects; each attack type gets half as many")
    demo.add_argument("--seed", type=int, default=0)
    check = commands.add_parser("check", help="summarise a dataset before a long run")
    check.add_argument("--data_root", required=True, help="WFAS folder (holding Train/), Train/ itself, or a "
                                                          "labelled list file")
    check.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    check.add_argument("--verify_images", action="store_true", help="also decode every image")
    check.add_argument("--workers", type=int, default=16, help="threads for reading files")
    cache = commands.add_parser("cache", help="build the face-crop cache of an experiment's split ahead of time "
                                              "(e.g. on a CPU node), as the training scripts would")
    cache.add_argument("--data_root", required=True, help="as for train_stage1.py")
    cache.add_argument("--output_dir", required=True, help="the experiment folder (its split.csv is made if missing)")
    cache.add_argument("--img_size", type=int, default=224, help="the model input size the cache is for")
    cache.add_argument("--face_crop_scale", type=float, default=DEFAULT_FACE_CROP_SCALE)
    cache.add_argument("--face_cache_dir", help="default: OUTPUT_DIR/face_cache")
    cache.add_argument("--val_fraction", type=float, default=0.1)
    cache.add_argument("--test_fraction", type=float, default=0.1)
    cache.add_argument("--seed", type=int, default=42, help="the split's seed (train_stage1.py's default)")
    cache.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes decoding and encoding")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "make_demo":
        if args.subjects < 3:
            raise UserError(f"--subjects {args.subjects}: need at least 3 so that train, val and test get one each")
        root, count = make_demo(args.out_dir, subjects=args.subjects, seed=args.seed)
        print(f"Wrote a generated demo dataset (not real faces) with {count} training images to {root}")
    elif args.command == "cache":
        table = load_or_create_split(args.data_root, args.output_dir, args.val_fraction, args.test_fraction,
                                     args.seed)
        start = time.time()
        cache = build_face_cache(table, args.face_cache_dir or Path(args.output_dir) / "face_cache", args.img_size,
                                 args.face_crop_scale, args.workers)
        seconds = time.time() - start
        print(f"Face cache {cache.folder}: {len(cache)} images, {cache.num_bytes / 2**30:.2f} GiB "
              f"({cache.num_bytes / len(cache) / 1024:.1f} KiB per image), {len(cache.undecodable)} undecodable, "
              + (f"built in {seconds:.0f} s ({len(cache) / seconds:.0f} img/s)" if cache.built_now
                 else "already built"))
    else:
        summary = check_dataset(args.data_root, args.verify_images, args.workers)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print_summary(summary)


if __name__ == "__main__":
    run_cli(main)
