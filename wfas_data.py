"""The data of both stages and the tools: indexing (WFAS, live/ + spoof/ folders and lists here; the other face
anti-spoofing datasets' own layouts are read in fas_formats.py), several sources in one table, subject-disjoint or
official splits, face crops, the datasets and the loaders (the train transforms are the stage scripts'; the
face-crop cache is face_cache.py).

    python tools/data.py check --data_root DIR [--json] [--verify_images]   # a summary before a long run

Conventions everywhere in the project: live = 1, spoof = 0, and a score is P(live).
"""

import atexit
import csv
import functools
import io
import json
import math
import multiprocessing
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torchvision.transforms import v2 as T

import fas_formats
from errors import StorageError, UserError
from fas_formats import LIVE, SPOOF
from output_files import aside, write_json
from progress import progress_bar

LIVE_TYPE = "live"  # attack_type of live samples in split.csv and in reports
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# What a file that was read but does not decode raises (PIL: OSError for truncated data); reading faults come first.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# An epoch in which more images than this cannot be decoded stops: the data, not a few files, is broken.
MAX_UNDECODABLE_SHARE = 0.01

# RetinaFace boxes are tight. 1.5x brings in the surroundings where the strongest attack cues live (paper edges,
# screen bezels, fingers holding a photo), while the face still fills most of the input.
DEFAULT_FACE_CROP_SCALE = 1.5


# -- Indexing ----------------------------------------------------------------------------------------------------------


@dataclass
class SampleTable:
    """One row per image in numpy arrays, not per-sample objects, so that loader workers share the pages instead
    of copying them (reference counts touch every Python object). Strings are UTF-8 bytes; `path` is relative
    to `root`. The boxes are read once, when the table is made: loading an image never opens a .txt file."""

    root: Path
    path: np.ndarray
    label: np.ndarray  # int8: LIVE / SPOOF, -1 when unlabelled
    attack_type: np.ndarray  # bytes: LIVE_TYPE or the attack folder name
    subject: np.ndarray  # bytes: the folder that holds the image; a subject is a folder
    has_bbox: np.ndarray  # bool: a bbox file lies next to the image
    box: np.ndarray = None  # float32 [N, 4]: x1, y1, x2, y2 of the face box as in the file; NaN without one
    split: np.ndarray = None  # int8 index into SPLITS, once assigned
    row: np.ndarray = None  # int64: the row in the table this one was selected from (a face cache's index)
    unseen_attacks: tuple = ()  # attack types held out of train (--unseen_attacks): metrics report them apart
    box_space: np.ndarray = None  # float32 [N, 2]: the width, height the box is measured in; NaN: the image's own
    source: np.ndarray = None  # bytes: the dataset an image comes from (its format, or the data root's name)
    video: np.ndarray = None  # bytes: the video a frame was sampled from; empty for photos
    membership: np.ndarray = None  # bytes: the official splits that list it, "protocol=split;..."; empty for none

    def __post_init__(self):
        if self.box is None:
            self.box = np.full((len(self.path), 4), np.nan, dtype=np.float32)
        if self.row is None:
            self.row = np.arange(len(self.path))
        if self.box_space is None:
            self.box_space = np.full((len(self.path), 2), np.nan, dtype=np.float32)
        for name in ("source", "video", "membership"):
            if getattr(self, name) is None:
                setattr(self, name, np.full(len(self.path), b"", dtype="S1"))

    def __len__(self):
        return len(self.path)

    def select(self, mask):
        return replace(
            self,
            path=self.path[mask],
            label=self.label[mask],
            attack_type=self.attack_type[mask],
            subject=self.subject[mask],
            has_bbox=self.has_bbox[mask],
            box=self.box[mask],
            split=None if self.split is None else self.split[mask],
            row=self.row[mask],
            box_space=self.box_space[mask],
            source=self.source[mask],
            video=self.video[mask],
            membership=self.membership[mask],
        )

    def of_split(self, name):
        return self.select(self.split == SPLITS.index(name))

    def paths(self):
        return [p.decode() for p in self.path]

    def attack_types(self):
        return [a.decode() for a in self.attack_type]


def _as_bytes(strings):
    return np.array([s.encode() for s in strings], dtype=bytes) if len(strings) else np.array([], dtype="S1")


def _make_table(root, paths, *, labels, attack_types, subjects, has_bbox, box=None, **columns):
    """A SampleTable of columns of strings and numbers; columns: box_space, and source, video and membership as
    strings."""
    for name in ("source", "video", "membership"):
        if name in columns:
            columns[name] = _as_bytes(columns[name])
    return SampleTable(
        root=Path(root),
        path=_as_bytes(paths),
        label=np.asarray(labels, dtype=np.int8),
        attack_type=_as_bytes(attack_types),
        subject=_as_bytes(subjects),
        has_bbox=np.asarray(has_bbox, dtype=bool),
        box=box,
        **columns,
    )


def read_boxes(root, paths, has_bbox=None, workers=16):
    """float32 [N, 4] face boxes (x1, y1, x2, y2; NaN without a usable bbox file), read in parallel: a network
    file system answers many small reads at once far faster. has_bbox (from the listing) spares missing files."""
    boxes = np.full((len(paths), 4), np.nan, dtype=np.float32)
    wanted = [i for i in range(len(paths)) if has_bbox is None or has_bbox[i]]
    txt_paths = [Path(root, os.path.splitext(paths[i])[0] + ".txt") for i in wanted]
    with ThreadPoolExecutor(workers) as pool:
        points = pool.map(read_bbox, txt_paths, chunksize=256)
        for i, p in zip(
            wanted,
            progress_bar(points, total=len(wanted), desc="bbox files", leave=False, disable=len(wanted) < 10_000),
        ):
            if p is not None:
                boxes[i] = p[:2].reshape(-1)
    return boxes


def resolve_data_root(data_root):
    """The folder that holds Train/ (that folder or Train/ itself), or one that holds live/ (or living/) and spoof/."""
    root = Path(data_root).expanduser()
    if not root.exists():
        raise UserError(f"--data_root {root} does not exist; give a WFAS folder, live/ + spoof/ folders or a list file")
    if (root / "Train").is_dir():
        return root
    if root.name == "Train" and ((root / "living").is_dir() or (root / "spoof").is_dir()):
        return root.parent
    if (root / "spoof").is_dir() and any((root / name).is_dir() for name in ("live", "living")):
        return root  # a folder per class
    raise UserError(
        f"--data_root {root} is not a WFAS folder: expected Train/living/<subject>/*.jpg and "
        "Train/spoof/<attack type>/<subject>/*.jpg under it (or pass Train/ itself), live/ and spoof/ "
        "folders, or a labelled list file"
    )


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
    """Index Train/ of a WFAS release (Train/living/<subject>/, Train/spoof/<attack type>/<subject>/), or a folder per
    class: live/ (or living/) and spoof/, attack type "spoof"; either way a subject is the folder of an image."""
    root = resolve_data_root(data_root)
    wfas = (root / "Train").is_dir()
    living = root / "Train" / "living" if wfas else root / ("living" if (root / "living").is_dir() else "live")
    attack_dirs = sorted((root / "Train" / "spoof").glob("*/")) if wfas else [root / "spoof"]  # "*/": folders only
    folders = ([(living, LIVE, LIVE_TYPE)] if living.is_dir() else []) + [(d, SPOOF, d.name) for d in attack_dirs]
    rows = [
        (path, label, attack_type, subject, bbox)
        for folder, label, attack_type in folders
        for path, subject, bbox in _walk_images(folder, root)
    ]
    if not rows:
        raise UserError(
            f"no images found under {living.parent}; expected Train/living/<subject>/*.jpg and "
            "Train/spoof/<attack type>/<subject>/*.jpg, or live/*.jpg and spoof/*.jpg"
        )
    paths, labels, attack_types, subjects, has_bbox = zip(*rows)
    return _make_table(
        root,
        paths,
        labels=labels,
        attack_types=attack_types,
        subjects=subjects,
        has_bbox=has_bbox,
        box=read_boxes(root, paths, has_bbox),
    )


def index_labelled_list(list_file):
    """A labelled list: `relative/path.jpg label [attack_type [subject]]` per line (1 = live), paths relative to
    the list's folder; without a subject column a subject is the folder that holds the image."""
    list_file = Path(list_file)
    root = list_file.parent
    rows = []
    for line_number, line in enumerate(list_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if not 2 <= len(fields) <= 4 or fields[1] not in ("0", "1"):
            raise UserError(
                f"{list_file}:{line_number}: expected `relative/path.jpg label [attack_type [subject]]` "
                f"with label 1 (live) or 0 (spoof), got {line.strip()!r}"
            )
        label = int(fields[1])
        attack_type = LIVE_TYPE
        if label == SPOOF:
            attack_type = fields[2] if len(fields) > 2 else "spoof"
        subject = fields[3] if len(fields) > 3 else os.path.dirname(fields[0])
        rows.append((fields[0], label, attack_type, subject))
    if not rows:
        raise UserError(f"{list_file} lists no images; expected one `relative/path.jpg label` per line")
    paths, labels, attack_types, subjects = zip(*rows)
    boxes = read_boxes(root, paths)
    has_bbox = [(root / p).with_suffix(".txt").is_file() for p in paths]
    return _make_table(
        root,
        paths,
        labels=labels,
        attack_types=attack_types,
        subjects=subjects,
        has_bbox=has_bbox,
        box=boxes,
    )


def index_source(source):
    """The table of one fas_formats.Source, its source column set: WFAS (or live/ + spoof/ folders), a labelled
    list, CelebA-Spoof or the frames of a video set (tools/data.py frames)."""
    source_format = source.format or fas_formats.detect_format(source.path)
    name = source_format
    if source_format in fas_formats.VIDEO_FORMATS:
        raise UserError(
            f"--data_root {source} holds videos: sample their frames first (python tools/data.py frames "
            f"--data_root {source_format}:{source.path} --out FRAMES --frames_per_video 10), then train on "
            "--data_root FRAMES"
        )
    if source_format == "list":
        table = index_labelled_list(source.path)
    elif source_format in ("wfas", "folders"):
        table = index_wfas(source.path)
    else:
        if source_format == "celeba_spoof":
            listing = fas_formats.list_celeba_spoof(source.path)
        else:
            listing = fas_formats.read_frames_index(source.path)
            name = json.loads((source.path / "frames_source.json").read_text())["format"]
        table = _make_table(
            source.path,
            listing.paths,
            labels=listing.labels,
            attack_types=listing.attack_types,
            subjects=listing.subjects,
            has_bbox=~np.isnan(listing.boxes[:, 0]),
            box=listing.boxes,
            box_space=listing.box_space,
            video=listing.videos,
            membership=listing.memberships,
        )
    table.source = np.full(len(table), name.encode())
    return table


def index_dataset(data_root):
    """The table of --data_root: one source, or several (comma-separated `DIR` or `FORMAT:DIR`) in one table
    whose root is their common folder, each image keeping its source; subjects stay apart across sources."""
    sources = fas_formats.parse_sources(data_root)
    tables = [index_source(source) for source in sources]
    if len(tables) == 1:
        return tables[0]
    names = [t.source[0].decode() for t in tables]
    for k, table in enumerate(tables):  # two sources of one format: their names stay apart
        if names.count(names[k]) > 1:
            table.source = np.full(len(table), f"{names[k]}#{names[: k + 1].count(names[k])}".encode())
    root = Path(os.path.commonpath([str(t.root.resolve()) for t in tables]))
    columns = {}
    for name in ("path", "subject"):
        columns[name] = np.concatenate(
            [
                np.char.add(f"{t.root.resolve().relative_to(root).as_posix()}/".encode(), getattr(t, name))
                for t in tables
            ]
        )
    return SampleTable(
        root=root,
        path=columns["path"],
        label=np.concatenate([t.label for t in tables]),
        attack_type=np.concatenate([t.attack_type for t in tables]),
        subject=columns["subject"],
        has_bbox=np.concatenate([t.has_bbox for t in tables]),
        box=np.concatenate([t.box for t in tables]),
        box_space=np.concatenate([t.box_space for t in tables]),
        source=np.concatenate([t.source for t in tables]),
        video=np.concatenate([t.video for t in tables]),
        membership=np.concatenate([t.membership for t in tables]),
    )


def describe_sources(data_root):
    """--data_root as the split records it: each source's format and resolved folder."""
    return ",".join(
        f"{source.format or fas_formats.detect_format(source.path)}:{source.path.resolve()}"
        for source in fas_formats.parse_sources(data_root)
    )


def unlabelled_table(root, paths):
    """A table of images without labels (label -1), such as the challenge's Dev/Test lists."""
    boxes = read_boxes(root, paths)
    return _make_table(
        root,
        paths,
        labels=[-1] * len(paths),
        attack_types=[""] * len(paths),
        subjects=[os.path.dirname(p) for p in paths],
        has_bbox=~np.isnan(boxes[:, 0]),
        box=boxes,
    )


# -- Splits ------------------------------------------------------------------------------------------------------------


def assign_splits(table, val_fraction=0.1, test_fraction=0.1, seed=0, unseen_attacks=()):
    """Split by subject, stratified by attack type, deterministic for a seed. Within a type the subjects are
    shuffled; each goes to val while val holds fewer images than its share, then to test, then to train. So val
    and test get a subject of every type with 3 or more, and the last subject trains: no type misses in train.
    The types of unseen_attacks never train: their subjects go to val and test in the val:test proportion, as
    WFAS's dev and test hold attack types its train set lacks."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise UserError(
            f"--val_fraction {val_fraction} and --test_fraction {test_fraction} must be >= 0 "
            "and leave images for training (sum < 1)"
        )
    attacks = set(table.attack_types()) - {LIVE_TYPE}
    unseen = set(unseen_attacks)
    if unseen - attacks:
        raise UserError(
            f"--unseen_attacks {','.join(sorted(unseen - attacks))}: not an attack type of this data "
            f"(its types: {', '.join(sorted(attacks))})"
        )
    if unseen and (unseen == attacks or val_fraction + test_fraction == 0):
        raise UserError(
            "--unseen_attacks holds out every attack type, or --val_fraction and --test_fraction are 0: "
            "train needs an attack type and the held-out ones need val and test; hold out fewer"
        )
    rng = np.random.default_rng(seed)
    split = np.zeros(len(table), dtype=np.int8)
    for attack_type in np.unique(table.attack_type):
        in_type = np.flatnonzero(table.attack_type == attack_type)
        subjects, subject_of_row, counts = np.unique(table.subject[in_type], return_inverse=True, return_counts=True)
        subject_split = np.zeros(len(subjects), dtype=np.int8)
        held_out = attack_type.decode() in unseen
        shares = (
            [0, val_fraction, test_fraction] / np.float64(val_fraction + test_fraction)
            if held_out
            else [np.inf, val_fraction, test_fraction]
        )
        targets = np.array(shares) * counts.sum()
        taken = np.zeros(3)
        order = rng.permutation(len(subjects))
        if not held_out:  # the last subject trains, and a type of one or two subjects only trains
            order = order[:-1] if len(subjects) >= 3 else []
        for subject in order:
            if taken[1] < targets[1]:
                chosen = SPLITS.index("val")
            elif taken[2] < targets[2] or held_out:
                chosen = SPLITS.index("test")
            else:
                chosen = SPLITS.index("train")
            subject_split[subject] = chosen
            taken[chosen] += counts[subject]
        split[in_type] = subject_split[subject_of_row]
    table.split = split
    table.unseen_attacks = tuple(sorted(unseen))
    return table


SPLIT_COLUMNS = ["path", "label", "attack_type", "subject", "split"]
BOX_COLUMNS = ["x1", "y1", "x2", "y2"]  # the face box, empty without one
# box_space: WxH the box is measured in (CelebA-Spoof's 224x224), empty for the image's pixels; source: the
# dataset; video: the video a frame comes from, empty for photos
SOURCE_COLUMNS = ["box_space", "source", "video"]


def write_split_csv(table, csv_path):
    csv_path = Path(csv_path)
    tmp = aside(csv_path)
    boxes = [["" if np.isnan(v) else f"{v:.7g}" for v in box] for box in table.box.tolist()]
    box_spaces = ["" if np.isnan(w) else f"{w:g}x{h:g}" for w, h in table.box_space.tolist()]
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SPLIT_COLUMNS + BOX_COLUMNS + SOURCE_COLUMNS)
        for row in zip(
            table.paths(),
            table.label.tolist(),
            table.attack_types(),
            (s.decode() for s in table.subject),
            (SPLITS[s] for s in table.split),
            boxes,
            box_spaces,
            (s.decode() for s in table.source),
            (v.decode() for v in table.video),
        ):
            writer.writerow([*row[:5], *row[5], *row[6:]])
    os.replace(tmp, csv_path)


def read_split_csv(csv_path, root):
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != SPLIT_COLUMNS + BOX_COLUMNS + SOURCE_COLUMNS:
            raise UserError(
                f"{csv_path} is not a split file: expected the columns "
                f"{','.join(SPLIT_COLUMNS + BOX_COLUMNS + SOURCE_COLUMNS)}"
            )
        columns = list(zip(*reader)) or [()] * len(header)
    paths, labels, attack_types, subjects, splits = columns[:5]
    try:
        boxes = np.array(
            [[float(v) if v else np.nan for v in box] for box in zip(*columns[5:9])], dtype=np.float32
        ).reshape(-1, 4)
        box_space = np.array(
            [[float(v) for v in text.split("x")] if text else [np.nan, np.nan] for text in columns[9]],
            dtype=np.float32,
        ).reshape(-1, 2)
        table = _make_table(
            root,
            paths,
            labels=np.array(labels).astype(np.int8),
            attack_types=attack_types,
            subjects=subjects,
            has_bbox=~np.isnan(boxes[:, 0]),
            box=boxes,
            box_space=box_space,
            source=columns[10],
            video=columns[11],
        )
        table.split = np.array([SPLITS.index(s) for s in splits], dtype=np.int8)
    except (ValueError, KeyError) as error:
        raise UserError(f"{csv_path} is damaged ({error!r}); delete it to recompute the split") from None
    return table


def check_held_out_splits(table, source):
    """Val and test each need live and spoof images (else ACER and the threshold are undefined): checked when
    the split is made, before hours of training find it out."""
    for name in ("val", "test"):
        labels = table.label[table.split == SPLITS.index(name)]
        num_live = int((labels == LIVE).sum())
        num_spoof = int((labels == SPOOF).sum())
        if num_live and num_spoof:
            continue
        subjects = {
            label: len(np.unique(np.char.add(table.attack_type, table.subject)[table.label == label]))
            for label in (LIVE, SPOOF)
        }
        raise UserError(
            f"the {name} split of {source} holds {num_live} live and {num_spoof} spoof images, but "
            f"needs both; the split is by subject (an image's folder): {subjects[LIVE]} live and "
            f"{subjects[SPOOF]} spoof subjects. Put each person's images in a folder of their own, or give "
            "the list a subject column (`path label attack_type subject`), or raise --val_fraction / "
            "--test_fraction, or, with no subjects to keep apart, pass --split_by image"
        )


def check_split_source(table, data_root, record_path):
    """Refuse a split.csv made from other data, or whose images are gone: it would train on a stale list."""
    csv_path = record_path.with_name("split.csv")
    data_root = describe_sources(data_root)
    if not record_path.is_file():
        raise UserError(
            f"{csv_path} has no {record_path.name} beside it to say which data it splits: delete {csv_path.name} "
            "to split the data again"
        )
    recorded = json.loads(record_path.read_text())
    try:  # a data_root set by hand may name a folder without its format
        recorded_sources = describe_sources(recorded["data_root"])
    except UserError:  # gone
        recorded_sources = recorded["data_root"]
    if recorded_sources != data_root:
        raise UserError(
            f"{csv_path} was made from {recorded['data_root']}, not {data_root}: use another "
            f"--output_dir for other data, or, if the same data moved, set data_root in {record_path}"
        )
    if recorded["num_images"] != len(table):
        raise UserError(
            f"{csv_path} lists {len(table)} images but was written with {recorded['num_images']}: it "
            f"is damaged; delete it and {record_path.name} to split the data again"
        )
    sample = table.paths()[:: math.ceil(len(table) / 64)]  # 64 stats at most: cheap on any file system
    missing = [p for p in sample if not (table.root / p).is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(sample)} sampled images of {csv_path} are missing under "
            f"{table.root} (e.g. {missing[0]}): the data moved or was deleted; fix --data_root, or "
            f"delete {csv_path.name} and {record_path.name} to split what is there now"
        )


def data_root_folder(data_root):
    """The folder split.csv's paths are relative to: the source's folder, or the common folder of several."""
    roots = []
    for source in fas_formats.parse_sources(data_root):
        source_format = source.format or fas_formats.detect_format(source.path)
        if source_format == "list":
            roots.append(source.path.parent)
        elif source_format in ("wfas", "folders"):
            roots.append(resolve_data_root(source.path))
        else:
            roots.append(source.path)
    if len(roots) == 1:
        return roots[0]
    return Path(os.path.commonpath([str(root.resolve()) for root in roots]))


class OfficialSplits(NamedTuple):
    table: SampleTable  # less the images the sources' protocols leave out
    split: np.ndarray  # int8 per image: the protocol's split, -1 for a source without a protocol
    protocols: dict  # {format: the protocol used}


def apply_protocols(table, protocols, *, val_fraction, seed):
    """The OfficialSplits of a table's sources. protocols: {format: protocol} (fas_formats.parse_protocols); a
    source's default otherwise. A protocol without a dev set gets val from its train, by subject (val_fraction)."""
    split = np.full(len(table), -1, dtype=np.int8)
    used = {}
    keep = np.ones(len(table), dtype=bool)
    for name in np.unique(table.source):
        rows = np.flatnonzero(table.source == name)
        memberships = [m.decode() for m in table.membership[rows]]
        available = fas_formats.protocols_of(memberships)
        if not available:
            continue
        source_format = name.decode().split("#")[0]
        protocol = protocols.get(source_format, fas_formats.DEFAULT_PROTOCOL.get(source_format, fas_formats.OFFICIAL))
        if protocol not in available:
            raise UserError(
                f"--protocol {source_format}:{protocol}: {source_format} has the protocols {', '.join(available)}"
            )
        used[source_format] = protocol
        for row, membership in zip(rows, memberships):
            chosen = fas_formats.split_of(membership, protocol)
            keep[row] = chosen is not None
            if chosen is not None:
                split[row] = SPLITS.index(chosen)
        if not (split[rows] == SPLITS.index("val")).any():  # no dev set: val from train, by subject
            train_rows = rows[split[rows] == SPLITS.index("train")]
            split[train_rows] = carve_val(table.subject[train_rows], val_fraction=val_fraction, seed=seed)
    return OfficialSplits(table=table.select(keep), split=split[keep], protocols=used)


def carve_val(subjects, *, val_fraction, seed):
    """The split (train or val) of each image of a protocol's train set without a dev set: whole subjects, in a
    seeded order, go to val until it holds val_fraction of the images; a subject is a person here, whatever the
    attack type, so no one is in both."""
    names, subject_of_row, counts = np.unique(subjects, return_inverse=True, return_counts=True)
    in_val = np.zeros(len(names), dtype=bool)
    taken = 0
    for subject in np.random.default_rng(seed).permutation(len(names))[:-1]:  # the last one always trains
        if taken >= val_fraction * len(subjects):
            break
        in_val[subject] = True
        taken += counts[subject]
    return np.where(in_val[subject_of_row], SPLITS.index("val"), SPLITS.index("train")).astype(np.int8)


def load_or_create_split(
    data_root,
    output_dir,
    *,
    val_fraction=0.1,
    test_fraction=0.1,
    seed=0,
    log=print,
    unseen_attacks=None,
    split_by=None,
    protocols=None,
):
    """The table with its split, from OUTPUT_DIR/split.csv when it exists (every run and both stages see the
    same split), else made and written with split_source.json, its data's record and its protocol: the held-out
    attack types, subject or image splitting and the official protocols used (None: as the split was made; new:
    none, subject, each source's default). Images of a source with an official protocol take its split; the
    others are split here."""
    root = data_root_folder(data_root)
    csv_path = Path(output_dir) / "split.csv"
    record_path = csv_path.with_name("split_source.json")
    if csv_path.exists():
        table = read_split_csv(csv_path, root)
        check_split_source(table, data_root, record_path)
        log(f"Reusing the split in {csv_path} ({len(table)} images)")
    else:
        official_splits = apply_protocols(
            index_dataset(data_root), protocols or {}, val_fraction=val_fraction, seed=seed
        )
        table = official_splits.table
        official = official_splits.split
        split_by = split_by or "subject"
        if split_by == "image":  # own data without subjects: each image is its own
            table.subject = table.path.copy()
        rest = official < 0
        if unseen_attacks and not rest.all():
            raise UserError(
                "--unseen_attacks holds attack types out of a split made here; a source with an official protocol "
                "keeps its own splits: leave --unseen_attacks out"
            )
        if rest.any():
            part = assign_splits(
                table.select(rest),
                val_fraction=val_fraction,
                test_fraction=test_fraction,
                seed=seed,
                unseen_attacks=unseen_attacks or (),
            )
            official[rest] = part.split
            table.unseen_attacks = part.unseen_attacks
        table.split = official
        check_held_out_splits(table, data_root)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        # the record first: split.csv appearing is what commits the split, so a kill leaves no unrecorded one
        write_json(
            record_path,
            {
                "data_root": describe_sources(data_root),
                "num_images": len(table),
                "split_by": split_by,
                "unseen_attacks": list(table.unseen_attacks),
                "protocols": official_splits.protocols,
                **({"warning": "one person's images may sit in both train and test"} if split_by == "image" else {}),
            },
        )
        write_split_csv(table, csv_path)
        log(f"Wrote a split by {split_by} to {csv_path} ({len(table)} images)")
    recorded = {"split_by": "subject", "unseen_attacks": [], "protocols": {}, **json.loads(record_path.read_text())}
    asked_protocols = None
    if protocols:
        asked_protocols = {**recorded["protocols"], **protocols}
    checks = (  # (the record's key, the flag, what this run asks)
        ("unseen_attacks", "--unseen_attacks", unseen_attacks and sorted(unseen_attacks)),
        ("split_by", "--split_by", split_by),
        ("protocols", "--protocol", asked_protocols),
    )
    for key, flag, asked in checks:
        if asked is not None and asked != recorded[key]:
            raise UserError(
                f"{csv_path} was made with {flag} {recorded[key] or 'none'}, not {asked or 'none'}: pass the same "
                f"{flag}, or use another --output_dir for another protocol"
            )
    if recorded["split_by"] == "image":
        log(
            f"warning: {csv_path} is split by image (--split_by image): one person's images may sit in both train "
            "and test, which flatters the test metrics"
        )
    table.unseen_attacks = tuple(recorded["unseen_attacks"])
    check_held_out_splits(table, data_root)
    train_labels = table.label[table.split == SPLITS.index("train")]
    num_live = int((train_labels == LIVE).sum())
    num_spoof = int((train_labels == SPOOF).sum())
    if num_live == 0 or num_spoof == 0:
        raise UserError(
            f"the train split of {data_root} holds {num_live} live and {num_spoof} spoof images; "
            "training needs both classes (Train/living and Train/spoof)"
        )
    return table


def describe_split(table):
    """One line per split: images, live, spoof, subjects; and the attack types held out of train."""
    lines = [
        f"{name:>5}: {len(part):>8} images ({int((part.label == LIVE).sum())} live, "
        f"{int((part.label == SPOOF).sum())} spoof) from {len(np.unique(part.subject))} subjects"
        for name, part in ((name, table.of_split(name)) for name in SPLITS)
    ]
    if table.unseen_attacks:
        lines.append(f"unseen attack types (in val and test, never in train): {', '.join(table.unseen_attacks)}")
    return "\n".join(lines)


# -- Face crops and transforms -----------------------------------------------------------------------------------------


def read_bbox(txt_path):
    """RetinaFace points of a bbox file (7 lines of `x y`: box left-top, right-bottom, 5 landmarks) as a (7, 2)
    array, or None when it is missing or malformed; any other read error raises StorageError."""
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
    return points if points.shape == (7, 2) and np.isfinite(points).all() else None


def face_crop_box(box, width, height, scale=DEFAULT_FACE_CROP_SCALE):
    """The square around the face box (x1, y1, x2, y2) times scale, kept inside the image; reversed, negative or
    outside coordinates are normalised, and no usable box (None, NaN) means the whole image."""
    if box is not None and np.isfinite(box).all():
        x1, x2 = np.clip(sorted((box[0], box[2])), 0, width)
        y1, y2 = np.clip(sorted((box[1], box[3])), 0, height)
        if x2 - x1 >= 2 and y2 - y1 >= 2:
            side = min(max(x2 - x1, y2 - y1) * scale, width, height)
            left = min(max((x1 + x2 - side) / 2, 0), width - side)
            top = min(max((y1 + y2 - side) / 2, 0), height - side)
            return left, top, left + side, top + side
    return 0.0, 0.0, float(width), float(height)


def load_face(image_path, box=None, face_crop_scale=DEFAULT_FACE_CROP_SCALE, min_side=0, box_space=None):
    """The EXIF-oriented image, cropped around box (None: whole; measured in box_space = (width, height) when given,
    as CelebA-Spoof's 224 x 224, else in the image's pixels); min_side: a large JPEG decodes at 1/2, 1/4 or 1/8
    (free in the decoder) while the crop stays min_side wide. Unreadable: StorageError; undecodable: DECODE_ERRORS."""
    image_path = Path(image_path)
    try:
        data = image_path.read_bytes()
    except OSError as error:
        raise StorageError(image_path, error) from None
    with Image.open(io.BytesIO(data)) as image:
        rotated = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
        width, height = (image.height, image.width) if rotated else image.size
        if box is not None and box_space is not None and np.isfinite(box_space).all():
            box = np.asarray(box, dtype=np.float64) * np.tile([width / box_space[0], height / box_space[1]], 2)
        crop = face_crop_box(box, width, height, scale=face_crop_scale)
        reduction = int((crop[2] - crop[0]) // min_side) if min_side else 1
        if image.format == "JPEG" and reduction >= 2:
            image.draft("RGB", (math.ceil(image.width / reduction), math.ceil(image.height / reduction)))
        image = ImageOps.exif_transpose(image).convert("RGB")
    sx = image.width / width
    sy = image.height / height
    return image.crop((round(crop[0] * sx), round(crop[1] * sy), round(crop[2] * sx), round(crop[3] * sy)))


def eval_transform(img_size):
    """The resize of evaluation and prediction (the train transforms are in the training scripts), uint8 in and
    out. Bilinear, antialiased: from a cached crop the scale changes by 15 % at most, where it matches bicubic."""
    return T.Resize((img_size, img_size), antialias=True)


@functools.lru_cache(maxsize=8)
def _device_constants(mean, std, device):
    """mean, std and the luma weights on the device, made once: a copy from the host every step would sync."""
    return tuple(
        torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1) for v in (mean, std, (0.299, 0.587, 0.114))
    )


def to_model_input(images, mean, std, color_jitter=0.0):
    """A uint8 batch [B, 3, H, W] on the device to the model's normalised input; color_jitter j: brightness, contrast
    and saturation factors in [1 - j, 1 + j] per image (ColorJitter batched on the device, not ~1 ms/image on a CPU)."""
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
    """uint8 face crops [3, img_size, img_size] of a table's images, from a FaceCache or else the photos (around
    their boxes); transform: a worker's per-crop step (default: eval_transform). An undecodable image gives ok=False,
    a zero image and error_kind "decode" (logged; batch shapes stay equal on all processes); an unreadable file
    "storage", and check_batch stops the run in one line, where a worker's exception would be a traceback."""

    def __init__(self, table, img_size, transform=None, *, face_crop_scale=DEFAULT_FACE_CROP_SCALE, cache=None):
        self.root = table.root
        self.path = table.path
        self.label = table.label
        self.box = table.box
        self.box_space = table.box_space
        self.row = table.row
        self.img_size = img_size
        self.face_crop_scale = face_crop_scale
        self.cache = cache
        self.transform = transform or eval_transform(img_size)

    def __len__(self):
        return len(self.path)

    def load(self, index):
        if self.cache is not None:
            return self.cache.decode(self.row[index])
        face = load_face(
            self.root / self.path[index].decode(),
            self.box[index],
            self.face_crop_scale,
            min_side=self.img_size,
            box_space=self.box_space[index],
        )
        return T.functional.pil_to_tensor(face)

    def __getitem__(self, index):
        error = ""
        error_kind = ""
        try:
            image = self.transform(self.load(index))
        except StorageError as exc:
            error = str(exc)
            error_kind = "storage"
        except DECODE_ERRORS as exc:
            error = f"{self.path[index].decode()}: {type(exc).__name__}: {exc}"
            error_kind = "decode"
        if error:
            image = torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8)
        return {
            "image": image,
            "label": int(self.label[index]),
            "index": index,
            "ok": not error,
            "error": error,
            "error_kind": error_kind,
        }


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
    """Stop when over MAX_UNDECODABLE_SHARE of the images read so far (and 10 or more) do not decode: then the
    data is broken, not a few files, and training on what remains would hide it."""
    if undecodable >= 10 and undecodable > MAX_UNDECODABLE_SHARE * seen:
        raise UserError(
            f"{undecodable} of the {seen} images read so far cannot be decoded (over "
            f"{MAX_UNDECODABLE_SHARE:.0%}): the data is damaged; `python tools/data.py check --data_root "
            "DIR --verify_images` lists them"
        )


def build_datasets(table, img_size, train_transform, *, face_crop_scale=DEFAULT_FACE_CROP_SCALE, cache=None):
    """{'train', 'val', 'test'} datasets of a split table, train augmented by train_transform; cache: a
    FaceCache of this table, or None for the photos."""
    transforms = {"train": train_transform, "val": None, "test": None}
    return {
        name: FaceDataset(
            table.of_split(name), img_size, transforms[name], face_crop_scale=face_crop_scale, cache=cache
        )
        for name in SPLITS
    }


def default_loader_settings(num_workers=None):
    """The node's cores shared by its processes (at most 12 workers each), 4 batches prefetched per worker,
    pinned memory on CUDA."""
    if num_workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        num_workers = min(12, max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))
    prefetch = {"prefetch_factor": 4} if num_workers else {}
    return dict(num_workers=num_workers, pin_memory=torch.cuda.is_available(), **prefetch)


class Loaders:
    """The training scripts' DataLoaders: default_loader_settings, workers that persist across epochs (as timm's) and
    ignore SIGTERM and SIGUSR1 (a job's signal reaches them too; dead, they would break the step before the save).
    shut_down() ends them; at exit those left are killed (multiprocessing's SIGTERM, ignored, would hang it)."""

    exit_hook = False

    def __init__(self, batch_size, num_workers=None):
        self.batch_size = batch_size
        self.settings = default_loader_settings(num_workers)

    def make(self, dataset, shuffle=False, batch_sampler=None, persistent=False):
        """Shuffled batches drop the last incomplete one; a batch_sampler gives the batches itself. persistent: for
        the loaders read every epoch (their owner shuts them down); one-shot ones end their workers themselves."""
        if not Loaders.exit_hook:  # registered after multiprocessing's exit hook, so it runs before it
            atexit.register(Loaders.end_workers)
            Loaders.exit_hook = True
        batching = (
            dict(batch_sampler=batch_sampler)
            if batch_sampler
            else dict(batch_size=self.batch_size, shuffle=shuffle, drop_last=shuffle)
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            worker_init_fn=Loaders.ignore_stop_signals,
            persistent_workers=persistent and self.settings["num_workers"] > 0,
            **batching,
            **self.settings,
        )
        if len(loader) == 0:
            raise UserError(f"{len(dataset)} images are fewer than one batch of {self.batch_size}; lower --batch_size")
        return loader

    def describe(self, cache):
        return (
            f"Loader: {self.settings['num_workers']} workers per process"
            + (f", {self.settings['prefetch_factor']} batches prefetched each" if self.settings["num_workers"] else "")
            + (", pinned memory" if self.settings["pin_memory"] else "")
            + (f"; face crops from the cache {cache.folder}" if cache else "; face crops from the original photos")
        )

    @staticmethod
    def ignore_stop_signals(worker_id):
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_IGN)

    @staticmethod
    def shut_down(*loaders):
        """Shut the persistent workers of (prepared) loaders down, as torch does when an iterator goes."""
        for loader in loaders:
            loader = getattr(loader, "base_dataloader", loader)  # accelerate's wrapper
            if getattr(loader, "_iterator", None) is not None:
                loader._iterator._shutdown_workers()
                loader._iterator = None

    @staticmethod
    def end_workers():
        """At exit: kill the workers left (without torch's SIGCHLD handler, which would report each one)."""
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()


# -- The challenge's unlabelled lists ----------------------------------------------------------------------------------


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
    raise UserError(f"cannot find {names[0]} (first entry of {list_file}) in {', '.join(str(f) for f in folders)}")
