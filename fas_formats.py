"""The face anti-spoofing datasets beyond WFAS, each read from its own layout, label files and protocols:
CelebA-Spoof's photos with their label and box files, and the videos of the field's cross-domain benchmark
(OULU-NPU, CASIA-FASD, Idiap Replay-Attack, MSU-MFSD) with their face locations and official splits. Plain
parsing into columns: wfas_data makes its tables of them, tools/data.py frames samples the videos' frames.

A source is `DIR` (WFAS, live/ + spoof/ folders, a list file or a frames folder, detected) or `FORMAT:DIR`.
Whatever a dataset's own files say, live = 1 and spoof = 0 in everything this returns. docs/data.md gives each
dataset's layout and where to request it.
"""

import csv
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from errors import StorageError, UserError

LIVE = 1
SPOOF = 0
PHOTO_FORMATS = ("wfas", "folders", "celeba_spoof", "frames")
VIDEO_FORMATS = ("oulu_npu", "casia_fasd", "replay_attack", "msu_mfsd")
FORMATS = PHOTO_FORMATS + VIDEO_FORMATS
VIDEO_EXTENSIONS = (".avi", ".mov", ".mp4")
# tools/data.py frames writes these into its folder: the frames' index, and what they were sampled from.
FRAMES_INDEX = "frames_index.csv"
FRAMES_COLUMNS = ["path", "label", "attack_type", "subject", "video", "membership", "x1", "y1", "x2", "y2"]
# The protocol a source with official splits uses unless --protocol names another.
DEFAULT_PROTOCOL = {"celeba_spoof": "intra_test", "oulu_npu": "1"}
OFFICIAL = "official"  # the membership key of a dataset with one protocol

# CelebA-Spoof's label vector: index 40 the spoof type, index 43 the label with 0 = live (the official code's).
CELEBA_SPOOF_TYPES = (
    "live",
    "photo",
    "poster",
    "a4",
    "face_mask",
    "upper_body_mask",
    "region_mask",
    "pc",
    "pad",
    "phone",
    "3d_mask",
)
CELEBA_BOX_SPACE = 224.0  # its _BB.txt boxes are in the coordinates of the image resized to 224 x 224
OULU_ATTACKS = {"2": "print_1", "3": "print_2", "4": "replay_1", "5": "replay_2"}  # the name's last field; 1: live
CASIA_ATTACKS = {"3": "warped_photo", "4": "warped_photo", "5": "cut_photo", "6": "cut_photo", "7": "replay"}
CASIA_ATTACKS |= {"8": "replay", "HR_2": "warped_photo", "HR_3": "cut_photo", "HR_4": "replay"}
CASIA_LIVE = ("1", "2", "HR_1")
# A face box from two eye centres (OULU-NPU ships eyes): a square of this many eye distances, its centre this many
# eye distances below the eyes' midpoint, about the box RetinaFace gives (the crop then widens it by 1.5).
EYE_BOX_SIDE = 2.2
EYE_BOX_DROP = 0.35


class Source(NamedTuple):
    format: str | None  # None: detected from the folder
    path: Path

    def __str__(self):
        return f"{self.format}:{self.path}" if self.format else str(self.path)


def parse_sources(text):
    """Sources from --data_root: `DIR` or `FORMAT:DIR`, several separated by commas."""
    sources = []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        name, colon, rest = part.partition(":")
        if colon and re.fullmatch(r"[a-z_0-9]+", name) and not Path(part).exists():
            if name not in FORMATS:
                raise UserError(
                    f"--data_root {part}: no format {name!r}; give DIR or FORMAT:DIR with FORMAT one of "
                    f"{', '.join(FORMATS)}"
                )
            sources.append(Source(name, Path(rest).expanduser()))
        else:
            sources.append(Source(None, Path(part).expanduser()))
    if not sources:
        raise UserError("--data_root is empty: give DIR or FORMAT:DIR")
    for source in sources:
        if not source.path.exists():
            raise UserError(f"--data_root {source}: {source.path} does not exist")
    return sources


def detect_format(path):
    """The format of a folder given without one: a frames folder, else WFAS or folders (wfas_data tells them apart);
    a file is a labelled list."""
    if path.is_file():
        return "list"
    if (path / FRAMES_INDEX).is_file():
        return "frames"
    if (path / "metas" / "intra_test").is_dir() and (path / "Data").is_dir():
        return "celeba_spoof"
    if (path / "Protocols").is_dir() and (path / "Train_files").is_dir():
        return "oulu_npu"
    if (path / "train_release").is_dir():
        return "casia_fasd"
    if (path / "devel").is_dir() and (path / "train").is_dir():
        return "replay_attack"
    if (path / "scene01").is_dir():
        return "msu_mfsd"
    if not (path / "Train").is_dir() and path.name != "Train" and (path / "spoof").is_dir():
        return "folders"
    return "wfas"


def parse_protocols(values):
    """{format: protocol} from --protocol FORMAT:PROTOCOL values (oulu_npu:1 ... oulu_npu:4.6,
    celeba_spoof:intra_test)."""
    protocols = {}
    for value in values or []:
        name, _, protocol = value.partition(":")
        if name not in FORMATS or not protocol:
            raise UserError(
                f"--protocol {value}: expected FORMAT:PROTOCOL, e.g. oulu_npu:1, oulu_npu:3.2 (protocol 3, phone "
                "2 held out) or celeba_spoof:intra_test"
            )
        protocols[name] = protocol
    return protocols


class Listing(NamedTuple):
    """The columns of a photo source: paths relative to its folder, labels (live = 1), attack types, subjects,
    face boxes (x1, y1, x2, y2; NaN without one), the size the boxes are measured in (NaN: the image's own pixels),
    videos ("" for photos) and each image's split memberships ("protocol=split;...", "" for none)."""

    paths: list
    labels: list
    attack_types: list
    subjects: list
    boxes: np.ndarray
    box_space: np.ndarray
    videos: list
    memberships: list


def _read_text(path):
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path} is missing: is this the dataset's own layout (docs/data.md)?") from None
    except OSError as error:
        raise StorageError(path, error) from None


# -- CelebA-Spoof ----------------------------------------------------------------------------------------------------


def read_celeba_box(bb_path):
    """x1, y1, x2, y2 of a CelebA-Spoof _BB.txt (`x y w h score`, in 224 x 224 coordinates); NaN when it is missing,
    empty or of no area (the dataset has a few such: the whole image is then the face). Other text is a user
    error."""
    try:
        fields = Path(bb_path).read_text().split()
    except FileNotFoundError:
        return np.full(4, np.nan)
    except OSError as error:
        raise StorageError(bb_path, error) from None
    if not fields:
        return np.full(4, np.nan)
    try:
        x, y, w, h = (float(v) for v in fields[:4])
    except ValueError:
        raise UserError(f"{bb_path} does not parse as `x y w h score`: {' '.join(fields)[:80]!r}") from None
    if w <= 0 or h <= 0:
        return np.full(4, np.nan)
    return np.array([x, y, x + w, y + h])


def list_celeba_spoof(root, protocol="intra_test", workers=16):
    """CelebA-Spoof's images by its label files (metas/<protocol>/{train,test}_label.json: {Data/...: 44 labels});
    the subject is the folder under Data/train or Data/test. The label is index 43 (0 = live), the attack type
    index 40."""
    folder = root / "metas" / protocol
    if not folder.is_dir():
        protocols = sorted(p.name for p in (root / "metas").glob("*/")) if (root / "metas").is_dir() else []
        raise UserError(
            f"celeba_spoof:{root}: no protocol folder metas/{protocol} (found: {', '.join(protocols) or 'none'}); "
            "--protocol celeba_spoof:intra_test is the intra-dataset test"
        )
    rows = []
    for split in ("train", "test"):
        label_file = folder / f"{split}_label.json"
        try:
            labels = json.loads(_read_text(label_file))
        except ValueError as error:
            raise UserError(f"{label_file} does not parse as JSON ({error}); download it again") from None
        for path, vector in labels.items():
            parts = path.split("/")
            if len(parts) < 5 or not isinstance(vector, list) or len(vector) != 44:
                raise UserError(
                    f"{label_file}: the entry {path!r} is not `Data/<set>/<subject>/<live|spoof>/<image>: [44 labels]`"
                )
            live = vector[43] == 0
            attack_type = "live" if live else CELEBA_SPOOF_TYPES[vector[40]]
            rows.append((path, LIVE if live else SPOOF, attack_type, f"celeba_spoof/{parts[2]}", split))
    paths = [row[0] for row in rows]
    with ThreadPoolExecutor(workers) as pool:
        boxes = np.array(
            list(pool.map(read_celeba_box, [root / f"{os.path.splitext(p)[0]}_BB.txt" for p in paths], chunksize=256)),
            dtype=np.float32,
        ).reshape(-1, 4)
    return Listing(
        paths=paths,
        labels=[row[1] for row in rows],
        attack_types=[row[2] for row in rows],
        subjects=[row[3] for row in rows],
        boxes=boxes,
        box_space=np.full((len(rows), 2), CELEBA_BOX_SPACE, dtype=np.float32),
        videos=[""] * len(rows),
        memberships=[f"{protocol}={row[4]}" for row in rows],
    )


# -- The video sets ------------------------------------------------------------------------------------------------


class Video(NamedTuple):
    """A video of a video set: its path relative to the dataset's folder, label (live = 1), attack type, subject,
    id (unique in the dataset), split memberships ("protocol=split;...") and the file of its face locations."""

    path: str
    label: int
    attack_type: str
    subject: str
    video: str
    membership: str
    faces: Path | None


def list_videos(source):
    """The videos of a video set in its own layout, sorted by path."""
    listers = {
        "oulu_npu": _oulu_videos,
        "casia_fasd": _casia_videos,
        "replay_attack": _replay_videos,
        "msu_mfsd": _msu_videos,
    }
    videos = sorted(listers[source.format](source.path), key=lambda video: video.path)
    if not videos:
        raise UserError(f"{source}: no videos found; is this the dataset's own layout (docs/data.md)?")
    return videos


def _oulu_protocol_lists(root):
    """{video name: "protocol=split;..."} from Protocols/Protocol_N/{Train,Dev,Test}[_k].txt (`+1,1_1_01_1` lines);
    protocols 3 and 4 have a fold per phone: 3.1 ... 3.6."""
    protocols = root / "Protocols"
    if (protocols / "Protocols").is_dir():  # some copies unpack the tar into one more folder
        protocols = protocols / "Protocols"
    memberships = {}
    lists = sorted(protocols.glob("Protocol_*/*.txt"))
    if not lists:
        raise UserError(f"oulu_npu:{root}: no protocol files Protocols/Protocol_N/Train.txt ...; unpack Protocols.tar")
    for list_file in lists:
        match = re.fullmatch(r"(Train|Dev|Test)(?:_([1-6]))?", list_file.stem)
        number = list_file.parent.name.removeprefix("Protocol_")
        if not match or not number.isdigit():
            continue
        key = number if match.group(2) is None else f"{number}.{match.group(2)}"
        split = {"Train": "train", "Dev": "val", "Test": "test"}[match.group(1)]
        for line_number, line in enumerate(_read_text(list_file).splitlines(), 1):
            if not line.strip():
                continue
            label, _, name = line.strip().partition(",")
            if not re.fullmatch(r"[+-]?\d+", label.strip()) or not re.fullmatch(r"\d_\d_\d\d_\d", name.strip()):
                raise UserError(f"{list_file}:{line_number}: expected `+1,1_1_01_1`, got {line.strip()!r}")
            memberships.setdefault(name.strip(), []).append(f"{key}={split}")
    return {name: ";".join(keys) for name, keys in memberships.items()}


def _oulu_videos(root):
    memberships = _oulu_protocol_lists(root)
    videos = []
    for folder in ("Train_files", "Dev_files", "Test_files"):
        for path in sorted((root / folder).glob("*.avi")):
            name = path.stem
            fields = name.split("_")
            if len(fields) != 4:
                continue
            live = fields[3] == "1"
            videos.append(
                Video(
                    path=f"{folder}/{path.name}",
                    label=LIVE if live else SPOOF,
                    attack_type="live" if live else OULU_ATTACKS.get(fields[3], "other"),
                    subject=f"oulu_npu/{fields[2]}",
                    video=name,
                    membership=memberships.get(name, ""),
                    faces=path.with_suffix(".txt"),
                )
            )
    return videos


def _casia_videos(root):
    videos = []
    for folder, split, offset in (("train_release", "train", 0), ("test_release", "test", 20)):
        for path in sorted((root / folder).glob("*/*.avi")):
            subject = path.parent.name
            if not subject.isdigit():
                continue
            live = path.stem in CASIA_LIVE
            videos.append(
                Video(
                    path=f"{folder}/{subject}/{path.name}",
                    label=LIVE if live else SPOOF,
                    attack_type="live" if live else CASIA_ATTACKS.get(path.stem, "other"),
                    subject=f"casia_fasd/{int(subject) + offset}",  # test subjects are numbered from 1 again
                    video=f"{folder}/{subject}/{path.stem}",
                    membership=f"{OFFICIAL}={split}",
                    faces=None,  # the dataset ships no face locations: the detector finds them
                )
            )
    return videos


def _replay_videos(root):
    videos = []
    for folder, split in (("train", "train"), ("devel", "val"), ("test", "test")):
        for path in sorted((root / folder).rglob("*.mov")):
            relative = path.relative_to(root)
            name = path.stem
            live = relative.parts[1] == "real"
            client = re.search(r"client(\d+)", name)
            if client is None:
                continue
            attack_type = "live"
            if not live:  # attack_<print|mobile|highdef>_client001_session01_<device>_<photo|video>_<light>
                fields = name.split("_")
                attack_type = f"{fields[1]}_{fields[5]}" if len(fields) >= 6 else "attack"
            videos.append(
                Video(
                    path=relative.as_posix(),
                    label=LIVE if live else SPOOF,
                    attack_type=attack_type,
                    subject=f"replay_attack/{client.group(1)}",
                    video=relative.with_suffix("").as_posix(),
                    membership=f"{OFFICIAL}={split}",
                    faces=root / "face-locations" / relative.with_suffix(".face"),
                )
            )
    return videos


def _msu_videos(root):
    subjects = {}
    for split in ("train", "test"):
        for line in _read_text(root / f"{split}_sub_list.txt").split():
            subjects[int(line)] = split
    videos = []
    for path in sorted((root / "scene01").glob("*/*")):
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            continue
        client = re.search(r"client(\d+)", path.stem)
        if client is None:
            continue
        live = path.parent.name == "real"
        attack_type = "live"
        if not live:
            attack_type = next((a for a in ("printed_photo", "iphone_video", "ipad_video") if a in path.stem), "attack")
        split = subjects.get(int(client.group(1)))
        videos.append(
            Video(
                path=path.relative_to(root).as_posix(),
                label=LIVE if live else SPOOF,
                attack_type=attack_type,
                subject=f"msu_mfsd/{int(client.group(1)):03d}",
                video=path.relative_to(root).with_suffix("").as_posix(),
                membership=f"{OFFICIAL}={split}" if split else "",
                faces=path.with_suffix(".face"),
            )
        )
    return videos


def read_face_locations(source_format, faces_file):
    """{frame index: (x1, y1, x2, y2)} from a video's face-location file (none: {}). OULU-NPU gives the eyes
    (`frame,x1,y1,x2,y2`), Replay-Attack `frame x y width height`, MSU-MFSD `frame, left, top, right, bottom,
    eyes`; all-zero lines are frames without a face. A line that does not parse is a user error."""
    if faces_file is None or not Path(faces_file).is_file():
        return {}
    boxes = {}
    for line_number, line in enumerate(_read_text(faces_file).splitlines(), 1):
        if not line.strip():
            continue
        try:
            values = [float(v) for v in re.split(r"[,\s]+", line.strip())]
        except ValueError:
            values = []
        expected = {"oulu_npu": 5, "replay_attack": 5, "msu_mfsd": 9}[source_format]
        if len(values) < expected:
            raise UserError(
                f"{faces_file}:{line_number}: a face-location line of {source_format} has {expected} numbers, got "
                f"{line.strip()!r}"
            )
        frame = int(values[0])
        coordinates = values[1:5]
        if not any(coordinates):
            continue
        if source_format == "oulu_npu":
            boxes[frame] = eye_box(*coordinates)
        elif source_format == "replay_attack":
            x, y, w, h = coordinates
            boxes[frame] = (x, y, x + w, y + h)
        else:
            boxes[frame] = tuple(coordinates)
    return boxes


def eye_box(x1, y1, x2, y2):
    """A square face box from two eye centres (EYE_BOX_SIDE, EYE_BOX_DROP)."""
    distance = float(np.hypot(x2 - x1, y2 - y1))
    centre_x = (x1 + x2) / 2
    centre_y = (y1 + y2) / 2 + EYE_BOX_DROP * distance
    half = EYE_BOX_SIDE * distance / 2
    return (centre_x - half, centre_y - half, centre_x + half, centre_y + half)


# -- Frames (written by tools/data.py frames) ------------------------------------------------------------------


def read_frames_index(root):
    """The Listing of a frames folder, from its frames_index.csv."""
    index = root / FRAMES_INDEX
    with open(index, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != FRAMES_COLUMNS:
            raise UserError(f"{index} is not a frames index: expected the columns {','.join(FRAMES_COLUMNS)}")
        rows = list(reader)
    if not rows:
        raise UserError(f"{index} lists no frames; run tools/data.py frames again")
    try:
        boxes = np.array(
            [[float(r[k]) if r[k] else np.nan for k in ("x1", "y1", "x2", "y2")] for r in rows], dtype=np.float32
        )
        labels = [int(r["label"]) for r in rows]
    except ValueError as error:
        raise UserError(f"{index} is damaged ({error}); delete it and run tools/data.py frames again") from None
    return Listing(
        paths=[r["path"] for r in rows],
        labels=labels,
        attack_types=[r["attack_type"] for r in rows],
        subjects=[r["subject"] for r in rows],
        boxes=boxes.reshape(-1, 4),
        box_space=np.full((len(rows), 2), np.nan, dtype=np.float32),
        videos=[r["video"] for r in rows],
        memberships=[r["membership"] for r in rows],
    )


def split_of(membership, protocol):
    """An image's split under protocol (train, val or test), or None when the protocol does not list it."""
    for entry in filter(None, membership.split(";")):
        key, _, split = entry.partition("=")
        if key == protocol:
            return split
    return None


def protocols_of(memberships):
    """The protocols a source's memberships name, in order."""
    keys = {entry.partition("=")[0] for membership in memberships for entry in membership.split(";") if entry}
    return sorted(keys, key=lambda key: [int(p) if p.isdigit() else p for p in key.split(".")])
