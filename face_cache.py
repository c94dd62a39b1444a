"""The face-crop cache: a table's face crops, cropped and resized once and stored as JPEGs in a few large shard
files, which any number of processes on any number of nodes read through memory maps. A build is shared by the
processes of a run, resumable after a kill, and never read before its manifest is written.

    python tools/data.py cache --data_root WFAS --output_dir EXP      # build it ahead of a run
"""

import hashlib
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from errors import StorageError, UserError
from output_files import aside, write_json
from progress import progress_bar
from wfas_data import DECODE_ERRORS, DEFAULT_FACE_CROP_SCALE, load_face

FACE_CACHE_VERSION = 1
FACE_CACHE_SHARD_SIZE = 4096  # images per shard file: the unit of a build's work and of its resume
# JPEG quality 90: 15-20 KB per 256 px face (WFAS train's 488k in ~10 GB of page cache), a loss below resampling's.
FACE_CACHE_QUALITY = 90


def face_cache_size(img_size):  # the side of a cached crop (256 for 224): room for the random crop
    return math.ceil(img_size / 0.875)


def face_cache_params(table, img_size, face_crop_scale):
    """What a cache is built from: a cache is only ever read by runs with exactly these."""
    digest = hashlib.sha1(b"\0".join(table.path.tolist()))
    digest.update(np.ascontiguousarray(table.box).tobytes())
    if np.isfinite(table.box_space).any():  # boxes measured in another size (CelebA-Spoof's 224 x 224)
        digest.update(np.ascontiguousarray(table.box_space).tobytes())
    return {
        "version": FACE_CACHE_VERSION,
        "data_root": str(Path(table.root).resolve()),
        "num_images": len(table),
        "paths_and_boxes_sha1": digest.hexdigest(),
        "face_crop_scale": float(face_crop_scale),
        "stored_size": face_cache_size(img_size),
        "encoding": f"jpeg quality {FACE_CACHE_QUALITY}",
    }


class FaceCache:
    """A table's face crops at face_cache_size(img_size), JPEG-encoded in a few large shard files that any number of
    processes on any number of nodes read at random through memory maps; a folder per parameter digest. Its
    manifest.json is written last: a folder without one (a build in progress or killed: resumed next) is never read."""

    def __init__(self, folder, params):
        self.folder = Path(folder)
        try:
            manifest = json.loads((self.folder / "manifest.json").read_text())
        except (OSError, ValueError) as error:
            raise UserError(
                f"the face cache {self.folder} is damaged ({error}); delete the folder to rebuild it"
            ) from None
        if manifest.get("params") != params:
            raise UserError(
                f"the face cache {self.folder} was built from other data or settings than this run's; "
                "delete the folder to rebuild it, or pass another --face_cache_dir"
            )
        self.shard_files = []
        offsets = []
        for shard in manifest["shards"]:
            path = self.folder / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["offsets"][-1]:
                raise UserError(
                    f"the face cache {self.folder} is damaged ({shard['file']} is missing or has the "
                    "wrong size); delete the folder to rebuild it"
                )
            self.shard_files.append(path)
            offsets.append(np.asarray(shard["offsets"], dtype=np.int64))
        self.shard_of = np.concatenate([np.full(len(o) - 1, k, dtype=np.int32) for k, o in enumerate(offsets)])
        self.start = np.concatenate([o[:-1] for o in offsets])
        self.length = np.concatenate([np.diff(o) for o in offsets])
        self.undecodable = {int(row): reason for row, reason in manifest["undecodable"].items()}
        self.num_bytes = int(sum(o[-1] for o in offsets))
        self.built_now = False  # built_now: set by build_face_cache; maps: opened in each worker
        self._maps = {}

    def __len__(self):
        return len(self.start)

    def decode(self, row):
        """The stored crop of a table row as a uint8 tensor [3, S, S]."""
        if self.length[row] == 0:
            raise ValueError(f"it could not be decoded when the face cache was built ({self.undecodable[row]})")
        shard = int(self.shard_of[row])
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.shard_files[shard], dtype=np.uint8, mode="r")
        data = self._maps[shard][self.start[row] : self.start[row] + self.length[row]]
        # Pillow rather than torchvision.io, whose decoders are deprecated since torchvision 0.29
        with Image.open(io.BytesIO(data)) as image:
            return T.functional.pil_to_tensor(image.convert("RGB"))


class _CropEncoder(torch.utils.data.Dataset):
    """(row, JPEG bytes of the stored crop or None, error kind, error) for the rows of one build."""

    def __init__(self, table, rows, *, size, face_crop_scale):
        self.table = table
        self.rows = rows
        self.size = size
        self.face_crop_scale = face_crop_scale

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = int(self.rows[i])
        try:
            face = load_face(
                self.table.root / self.table.path[row].decode(),
                self.table.box[row],
                self.face_crop_scale,
                min_side=self.size,
                box_space=self.table.box_space[row],
            )
        except StorageError as error:
            return row, None, "storage", str(error)
        except DECODE_ERRORS as error:
            return row, None, "decode", f"{type(error).__name__}: {error}"
        buffer = io.BytesIO()
        face.resize((self.size, self.size), Image.BICUBIC).save(buffer, "JPEG", quality=FACE_CACHE_QUALITY)
        return row, buffer.getvalue(), "", ""


def _write_shard(folder, shard, *, encoded, errors, process_index):
    """One shard file and its record, each written aside and renamed: the record is what marks it done."""
    name = f"shard_{shard:05d}.bin"
    tmp = aside(folder / name)
    try:
        with open(tmp, "wb") as f:
            for data in encoded:
                f.write(data)
        os.replace(tmp, folder / name)
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in encoded])]).tolist()
        write_json(
            folder / f"shard_{shard:05d}.json",
            {"file": name, "offsets": offsets, "undecodable": errors, "built_by_process": process_index},
        )
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"cannot write the face cache in {folder} ({error.strerror or error}): free space there, "
            "or pass --face_cache_dir DIR on a larger disk, or --no-face_cache"
        ) from None


def build_face_cache(
    table,
    cache_dir,
    img_size,
    *,
    face_crop_scale=DEFAULT_FACE_CROP_SCALE,
    workers=8,
    process_index=0,
    num_processes=1,
    wait_for_everyone=lambda: None,
    log=print,
):
    """The FaceCache of a table under cache_dir: reused, built, or a killed build resumed. Every process calls it
    and builds the shards k with k % num_processes == process_index (64 processes build it 64 times faster);
    then the main process writes the manifest. Undecodable images are recorded once, here."""
    params = face_cache_params(table, img_size, face_crop_scale)
    folder = Path(cache_dir) / hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    if not (folder / "manifest.json").is_file():
        num_shards = math.ceil(len(table) / FACE_CACHE_SHARD_SIZE)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create the face cache folder {folder} ({error.strerror or error})") from None
        done = {k for k in range(num_shards) if (folder / f"shard_{k:05d}.json").is_file()}
        mine = [k for k in range(num_shards) if k % num_processes == process_index and k not in done]
        if process_index == 0:
            write_json(folder / "params.json", params)
            log(
                f"Building the face cache {folder}: {len(table)} images in {num_shards} shards"
                + (f", {len(done)} done by an earlier build" if done else "")
                + (f", shared by {num_processes} processes" if num_processes > 1 else "")
            )
        _build_shards(table, folder, shards=mine, params=params, workers=workers, process_index=process_index, log=log)
        wait_for_everyone()
        if process_index == 0:
            _write_manifest(folder, num_shards=num_shards, params=params, log=log)
        wait_for_everyone()
        cache = FaceCache(folder, params)
        cache.built_now = True
        return cache
    return FaceCache(folder, params)


def build_for_processes(table, cache_dir, *, img_size, face_crop_scale, workers, accelerator, log=print):
    """build_face_cache shared by the processes of a run: each builds its own shards."""
    return build_face_cache(
        table,
        cache_dir,
        img_size,
        face_crop_scale=face_crop_scale,
        workers=workers,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        wait_for_everyone=accelerator.wait_for_everyone,
        log=log,
    )


def _build_shards(table, folder, *, shards, params, workers, process_index, log):
    rows = (
        np.concatenate(
            [np.arange(k * FACE_CACHE_SHARD_SIZE, min((k + 1) * FACE_CACHE_SHARD_SIZE, len(table))) for k in shards]
        )
        if shards
        else np.array([], dtype=np.int64)
    )
    encoder = _CropEncoder(table, rows, size=params["stored_size"], face_crop_scale=params["face_crop_scale"])
    loader = torch.utils.data.DataLoader(
        encoder, batch_size=None, num_workers=workers, prefetch_factor=16 if workers else None
    )
    sizes = [min(FACE_CACHE_SHARD_SIZE, len(table) - k * FACE_CACHE_SHARD_SIZE) for k in shards]
    start = time.time()
    encoded = []
    errors = {}
    shard_index = 0
    progress = progress_bar(
        loader,
        total=len(rows),
        desc="face cache",
        unit="img",
        mininterval=2,
        disable=len(rows) == 0 or process_index != 0,
    )
    for row, data, kind, error in progress:
        if kind == "storage":
            raise UserError(error)
        if kind == "decode":
            errors[str(row)] = error
        encoded.append(data or b"")
        if len(encoded) == sizes[shard_index]:
            _write_shard(folder, shards[shard_index], encoded=encoded, errors=errors, process_index=process_index)
            shard_index = shard_index + 1
            encoded = []
            errors = {}
    if len(rows) and process_index == 0:
        log(
            f"Face cache: built {len(rows)} images in {time.time() - start:.0f} s "
            f"({len(rows) / (time.time() - start):.0f} img/s on this process, {workers} workers)"
        )


def _write_manifest(folder, *, num_shards, params, log):
    shards = []
    undecodable = {}
    for k in range(num_shards):
        record_path = folder / f"shard_{k:05d}.json"
        if not record_path.is_file():
            raise UserError(
                f"the face cache build in {folder} is missing shard {k}: a process failed; rerun to resume the build"
            )
        record = json.loads(record_path.read_text())
        shards.append({"file": record["file"], "offsets": record["offsets"]})
        undecodable.update(record["undecodable"])
    num_bytes = sum(s["offsets"][-1] for s in shards)
    num_images = sum(len(s["offsets"]) - 1 for s in shards)
    write_json(
        folder / "manifest.json",
        {"params": params, "shards": shards, "undecodable": undecodable, "num_bytes": num_bytes},
    )
    log(
        f"Face cache {folder}: {num_images} images, {num_bytes / 2**20:.1f} MiB "
        f"({num_bytes / max(num_images, 1) / 1024:.1f} KiB per image), {len(undecodable)} undecodable"
    )
