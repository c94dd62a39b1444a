"""The face-crop cache: build, reuse, resume, parameters, damage, and agreement with the original photos."""

import errno
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_STAGE1, launch_two_processes
import train_stage1
import wfas_data
from errors import UserError
import face_cache
import networks

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@pytest.fixture
def table(demo_root, tmp_path):
    return wfas_data.load_or_create_split(demo_root, tmp_path / "EXP", log=lambda _: None)


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(face_cache, "FACE_CACHE_SHARD_SIZE", 16)


def build(table, cache_dir, **kwargs):
    return face_cache.build_face_cache(table, cache_dir, 64, workers=0, log=lambda _: None, **kwargs)


def test_a_cache_is_built_once_and_reused(table, tmp_path, small_shards):
    cache = build(table, tmp_path / "cache")
    assert cache.built_now and len(cache) == len(table) and len(cache.undecodable) == 0
    assert len(list(cache.folder.glob("shard_*.bin"))) == 7  # 102 images in shards of 16: a few large files
    again = build(table, tmp_path / "cache")
    assert not again.built_now and again.folder == cache.folder
    assert cache.decode(5).shape == (3, face_cache.face_cache_size(64), face_cache.face_cache_size(64))


def test_a_killed_build_resumes_where_it_stopped_and_is_never_read_half_built(
    table, tmp_path, small_shards, monkeypatch
):
    write_shard, written = face_cache._write_shard, []

    def killed_after_three(folder, shard, **contents):
        if len(written) == 3:
            raise KeyboardInterrupt  # the kill
        written.append(shard)
        write_shard(folder, shard, **contents)

    monkeypatch.setattr(face_cache, "_write_shard", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        build(table, tmp_path / "cache")
    folder = next((tmp_path / "cache").iterdir())
    assert not (folder / "manifest.json").exists()
    params = face_cache.face_cache_params(table, 64, wfas_data.DEFAULT_FACE_CROP_SCALE)
    with pytest.raises(UserError, match="damaged"):
        face_cache.FaceCache(folder, params)  # a half-built cache is never read
    written.clear()
    monkeypatch.setattr(
        face_cache,
        "_write_shard",
        lambda folder, shard, **contents: (written.append(shard), write_shard(folder, shard, **contents)),
    )
    cache = build(table, tmp_path / "cache")
    assert written == [3, 4, 5, 6] and cache.folder == folder and len(cache) == len(table)
    reference = build(table, tmp_path / "reference")
    for row in range(len(table)):
        assert torch.equal(cache.decode(row), reference.decode(row))


def test_other_parameters_build_their_own_cache_and_a_mismatched_or_damaged_one_is_refused(table, tmp_path):
    first = build(table, tmp_path / "cache")
    other_scale = face_cache.build_face_cache(
        table, tmp_path / "cache", 64, face_crop_scale=1.3, workers=0, log=lambda _: None
    )
    other_size = build(table.select(np.arange(len(table)) < 50), tmp_path / "cache")
    assert len({first.folder, other_scale.folder, other_size.folder}) == 3
    params = face_cache.face_cache_params(table, 64, wfas_data.DEFAULT_FACE_CROP_SCALE)
    with pytest.raises(UserError, match="other data or settings"):
        face_cache.FaceCache(other_scale.folder, params)
    shard = next(first.folder.glob("shard_*.bin"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match="damaged .*delete the folder to rebuild it"):
        build(table, tmp_path / "cache")


def test_a_full_disk_is_one_clear_line_and_leaves_nothing_trusted(table, tmp_path, monkeypatch):
    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(face_cache, "open", full_disk, raising=False)
    message = "cannot write the face cache in .*cache.*No space left on device.*--face_cache_dir"
    with pytest.raises(UserError, match=message):
        build(table, tmp_path / "cache")
    folder = next((tmp_path / "cache").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["params.json"]  # no shard record, no manifest


def test_cached_crops_equal_direct_crops_within_jpeg_tolerance(table, tmp_path):
    cache = build(table, tmp_path / "cache")
    direct = wfas_data.FaceDataset(table, 64)
    cached = wfas_data.FaceDataset(table, 64, cache=cache)
    differences = [(direct[i]["image"].float() - cached[i]["image"].float()).abs().mean() for i in range(len(table))]
    assert max(differences) < 6  # of 255: JPEG and one more resampling
    assert sum(differences) / len(differences) < 3


def test_an_undecodable_image_is_recorded_once_at_build_time(demo_root, tmp_path):
    root = tmp_path / "WFAS"
    shutil.copytree(demo_root, root)
    table = wfas_data.load_or_create_split(root, tmp_path / "EXP", log=lambda _: None)
    (root / table.paths()[7]).write_bytes(b"broken")
    cache = build(table, tmp_path / "cache")
    assert list(cache.undecodable) == [7]
    item = wfas_data.FaceDataset(table, 64, cache=cache)[7]
    assert not item["ok"] and item["error_kind"] == "decode" and table.paths()[7] in item["error"]


@pytest.mark.slow
def test_predictions_and_training_with_and_without_the_cache_agree(stage1_run, demo_root, tmp_path):
    exp, results = stage1_run
    table = wfas_data.load_or_create_split(demo_root, exp, log=lambda _: None)
    model = networks.create_model("convnext_atto")
    model.load_state_dict(load_file(exp / "checkpoints" / "stage1" / "stage1_best.safetensors"))
    model.eval()
    cache = build(table, exp / "face_cache")
    assert not cache.built_now  # stage 1 built it, in this experiment folder
    scores = {}
    for name, dataset in (
        ("direct", wfas_data.FaceDataset(table, 64)),
        ("cached", wfas_data.FaceDataset(table, 64, cache=cache)),
    ):
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        with torch.no_grad():
            scores[name] = model(wfas_data.to_model_input(images, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
        scores[name] = scores[name].softmax(-1)[:, 1]
    assert (scores["direct"] - scores["cached"]).abs().max() < 0.05
    direct_run = train_stage1.main(
        ["--data_root", str(demo_root), "--output_dir", str(tmp_path / "EXP"), *TINY_STAGE1, "--no-face_cache"]
    )
    assert not (tmp_path / "EXP" / "face_cache").exists()
    assert direct_run["num_soft_labels"] == results["num_soft_labels"]
    assert abs(direct_run["val"]["loss"] - results["val"]["loss"]) < 0.1


PARALLEL_BUILD = """
import sys
sys.path.insert(0, {repo!r})
from accelerate import Accelerator
import face_cache
import wfas_data
face_cache.FACE_CACHE_SHARD_SIZE = 16
accelerator = Accelerator(cpu=True)
table = wfas_data.read_split_csv({split!r}, {root!r})
face_cache.build_face_cache(table, {cache!r}, 64, workers=1, process_index=accelerator.process_index,
                           num_processes=accelerator.num_processes, wait_for_everyone=accelerator.wait_for_everyone)
"""


@pytest.mark.slow
def test_two_processes_share_a_build_and_cover_every_image_exactly_once(table, demo_root, tmp_path, small_shards):
    probe = tmp_path / "probe.py"
    probe.write_text(
        PARALLEL_BUILD.format(
            repo=str(REPO), split=str(tmp_path / "EXP" / "split.csv"), root=str(demo_root), cache=str(tmp_path / "two")
        )
    )
    result = launch_two_processes(str(probe), [])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = next((tmp_path / "two").iterdir())
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("shard_*.json"))]
    assert [r["built_by_process"] for r in records] == [0, 1, 0, 1, 0, 1, 0]
    assert sum(len(r["offsets"]) - 1 for r in records) == len(table)
    two = face_cache.FaceCache(folder, face_cache.face_cache_params(table, 64, wfas_data.DEFAULT_FACE_CROP_SCALE))
    one = build(table, tmp_path / "one")
    for row in range(len(table)):  # each image once, in its place
        assert torch.equal(two.decode(row), one.decode(row))


@pytest.fixture
def txt_opens():
    """Paths of .txt files opened while the list's `active` flag is set (an audit hook sees every open)."""
    state = {"active": False, "opened": []}
    if not hasattr(sys, "_wfas_txt_hook"):

        def hook(event, args):
            if event == "open" and sys._wfas_txt_hook["active"] and str(args[0]).endswith(".txt"):
                sys._wfas_txt_hook["opened"].append(str(args[0]))

        sys._wfas_txt_hook = state
        sys.addaudithook(hook)
    sys._wfas_txt_hook.update(active=False, opened=[])
    yield sys._wfas_txt_hook
    sys._wfas_txt_hook["active"] = False


@pytest.mark.slow
@pytest.mark.parametrize("cache_flag", ["--face_cache", "--no-face_cache"])
def test_no_bbox_file_is_opened_after_indexing(stage1_run, demo_root, tmp_path, txt_opens, cache_flag):
    exp = tmp_path / "EXP"
    exp.mkdir()
    for name in ("split.csv", "split_source.json"):
        shutil.copy(stage1_run[0] / name, exp / name)
    txt_opens["active"] = True
    train_stage1.main(["--data_root", str(demo_root), "--output_dir", str(exp), *TINY_STAGE1, cache_flag])
    txt_opens["active"] = False
    assert txt_opens["opened"] == []
    # the check itself: indexing does read them, once each
    txt_opens["active"] = True
    wfas_data.index_wfas(demo_root)
    txt_opens["active"] = False
    assert len(txt_opens["opened"]) == int(wfas_data.index_wfas(demo_root).has_bbox.sum())
