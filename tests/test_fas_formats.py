"""fas_formats.py and the data of several sources: each dataset read exactly from a tiny copy of its own layout
(tests/dataset_layouts.py), the official splits, the frames of the video sets (tools/data.py frames), and the
refusals of bad input."""

import csv
import json

import numpy as np
import pytest
from conftest import require_modules

import fas_formats
import wfas_data
from dataset_layouts import write_dataset
from errors import UserError
from tools import data


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Every dataset written once: {name: (root, what a reader must find)}."""
    require_modules(["cv2"], "pip install -r requirements-detect.txt")
    base = tmp_path_factory.mktemp("layouts")
    return {
        name: (base / name, write_dataset(name, base / name)) for name in fas_formats.VIDEO_FORMATS + ("celeba_spoof",)
    }


def videos_by_path(name, root):
    return {video.path: video for video in fas_formats.list_videos(fas_formats.Source(name, root))}


# ------------------------------------------------------------------------------------------------------ sources


def test_a_source_is_a_folder_or_format_and_folder_and_a_wrong_format_is_one_line(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sources = fas_formats.parse_sources(f"{tmp_path / 'a'}, celeba_spoof:{tmp_path / 'b'}")
    assert sources == [fas_formats.Source(None, tmp_path / "a"), fas_formats.Source("celeba_spoof", tmp_path / "b")]
    with pytest.raises(UserError, match="no format 'oulu'; give DIR or FORMAT:DIR with FORMAT one of wfas, folders"):
        fas_formats.parse_sources(f"oulu:{tmp_path / 'a'}")
    with pytest.raises(UserError, match="msu_mfsd:.*nowhere does not exist"):
        fas_formats.parse_sources(f"msu_mfsd:{tmp_path / 'nowhere'}")
    with pytest.raises(UserError, match="--protocol oulu_npu: expected FORMAT:PROTOCOL"):
        fas_formats.parse_protocols(["oulu_npu"])


# ------------------------------------------------------------------------------------------------ CelebA-Spoof


def test_celeba_spoof_is_read_from_its_label_and_box_files(layouts):
    root, expected = layouts["celeba_spoof"]
    table = wfas_data.index_dataset(f"celeba_spoof:{root}")
    assert sorted(table.paths()) == sorted(expected)
    for i, path in enumerate(table.paths()):
        label, attack_type, subject, split, box = expected[path]
        assert table.label[i] == label and table.attack_types()[i] == attack_type
        assert table.subject[i].decode() == subject and table.membership[i].decode() == f"intra_test={split}"
        if box is None:
            assert np.isnan(table.box[i]).all()
        else:
            assert np.array_equal(table.box[i], box)
        assert table.box_space[i].tolist() == [224, 224] and table.source[i] == b"celeba_spoof"


def test_a_celeba_spoof_box_is_scaled_from_224_to_the_images_pixels_when_the_face_is_cropped(layouts):
    root, expected = layouts["celeba_spoof"]
    path = next(p for p, e in expected.items() if e[4] is not None)
    width, height = wfas_data.Image.open(root / path).size
    box_224 = expected[path][4]
    by_hand = box_224 * [width / 224, height / 224, width / 224, height / 224]
    left, top, right, bottom = wfas_data.face_crop_box(by_hand, width, height, scale=1.5)
    face = wfas_data.load_face(root / path, box_224, 1.5, box_space=np.array([224.0, 224.0]))
    assert face.size == (round(right) - round(left), round(bottom) - round(top))


def test_celeba_spoof_keeps_its_intra_test_split_and_carves_val_from_train_by_subject(layouts, tmp_path):
    root, expected = layouts["celeba_spoof"]
    table = wfas_data.load_or_create_split(f"celeba_spoof:{root}", tmp_path, val_fraction=0.3, log=lambda _: None)
    split = {path: wfas_data.SPLITS[s] for path, s in zip(table.paths(), table.split)}
    assert {p for p, s in split.items() if s == "test"} == {p for p, e in expected.items() if e[3] == "test"}
    train_subjects = {expected[p][2] for p, s in split.items() if s == "train"}
    val_subjects = {expected[p][2] for p, s in split.items() if s == "val"}
    assert val_subjects and not val_subjects & train_subjects
    assert all(expected[p][3] == "train" for p, s in split.items() if s == "val")
    recorded = json.loads((tmp_path / "split_source.json").read_text())
    assert recorded["protocols"] == {"celeba_spoof": "intra_test"}
    with open(tmp_path / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["source"] for r in rows} == {"celeba_spoof"} and {r["box_space"] for r in rows} == {"224x224"}
    back = wfas_data.read_split_csv(tmp_path / "split.csv", root)
    assert np.array_equal(back.box_space, table.box_space) and np.array_equal(back.box, table.box, equal_nan=True)


# --------------------------------------------------------------------------------------------------- video sets


def test_oulu_npu_videos_subjects_attacks_eyes_and_every_protocol(layouts):
    root, expected = layouts["oulu_npu"]
    videos = videos_by_path("oulu_npu", root)
    assert sorted(videos) == sorted(f"{e['folder']}/{name}.avi" for name, e in expected.items())
    for name, e in expected.items():
        video = videos[f"{e['folder']}/{name}.avi"]
        assert (video.label, video.attack_type, video.subject, video.video) == (
            e["label"],
            e["attack_type"],
            e["subject"],
            name,
        )
        memberships = dict(entry.split("=") for entry in video.membership.split(";"))
        p1 = e["split"] if (e["session"] == "3") == (e["split"] == "test") else None
        assert memberships.get("1") == p1 and memberships["2"] == e["split"]
        for phone in ("1", "2"):
            held_out = (e["phone"] == phone) == (e["split"] == "test")
            assert memberships.get(f"3.{phone}") == (e["split"] if held_out else None)
        located = fas_formats.read_face_locations("oulu_npu", video.faces)
        assert sorted(located) == [k for k in range(len(e["eyes"])) if k != 1]  # frame 1: no face
        (x1, y1), (x2, y2) = e["eyes"][0]
        distance = np.hypot(x2 - x1, y2 - y1)
        centre = ((x1 + x2) / 2, (y1 + y2) / 2 + 0.35 * distance)
        half = 2.2 * distance / 2
        assert np.allclose(located[0], (centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half))


def test_casia_replay_attack_and_msu_mfsd_videos_are_read_exactly(layouts):
    root, expected = layouts["casia_fasd"]
    videos = videos_by_path("casia_fasd", root)
    assert sorted(videos) == sorted(expected)
    for path, (label, attack_type, subject, split) in expected.items():
        video = videos[path]
        assert (video.label, video.attack_type, video.subject, video.membership) == (
            label,
            attack_type,
            subject,
            f"official={split}",
        )
    for name in ("replay_attack", "msu_mfsd"):
        root, expected = layouts[name]
        videos = videos_by_path(name, root)
        assert sorted(videos) == sorted(expected)
        for path, (label, attack_type, subject, split, boxes) in expected.items():
            video = videos[path]
            assert (video.label, video.attack_type, video.subject, video.membership) == (
                label,
                attack_type,
                subject,
                f"official={split}",
            )
            located = fas_formats.read_face_locations(name, video.faces)
            assert [located[k] for k in range(len(boxes))] == [tuple(float(v) for v in b) for b in boxes]


# ------------------------------------------------------------------------------------------------------ frames


def test_frames_are_sampled_evenly_with_the_datasets_boxes_and_resume_after_a_kill(layouts, tmp_path):
    root, expected = layouts["msu_mfsd"]
    out = tmp_path / "frames"
    summary = data.sample_frames(f"msu_mfsd:{root}", out, frames_per_video=3, workers=1, log=lambda _: None)
    assert summary["videos"] == len(expected) and summary["frames"] == 3 * len(expected)
    listing = fas_formats.read_frames_index(out)
    for i, path in enumerate(listing.paths):
        video = next(p for p in expected if p.removesuffix(".mp4").removesuffix(".mov") == listing.videos[i])
        label, attack_type, subject, split, boxes = expected[video]
        frame = int(path.rsplit("/", 1)[1].removesuffix(".jpg"))
        assert frame in (0, 2, 5)  # 6 frames, 3 of them evenly: 0, 2.5 rounded to even, 5
        assert (listing.labels[i], listing.attack_types[i], listing.subjects[i]) == (label, attack_type, subject)
        assert listing.memberships[i] == f"official={split}"
        assert np.allclose(listing.boxes[i], boxes[frame], atol=0.05)
        assert (out / path).is_file()
    records = sorted((out / "videos").rglob("*.json"))
    records[0].unlink()  # killed before this video's record was written
    (out / fas_formats.FRAMES_INDEX).unlink()
    again = data.sample_frames(f"msu_mfsd:{root}", out, frames_per_video=3, workers=2, log=lambda _: None)
    assert again["sampled_now"] == 1 and again["frames"] == summary["frames"]
    resumed = fas_formats.read_frames_index(out)
    assert resumed.paths == listing.paths and np.array_equal(resumed.boxes, listing.boxes, equal_nan=True)
    with pytest.raises(UserError, match="holds the frames of .*frames_per_video.*: give another --out"):
        data.sample_frames(f"msu_mfsd:{root}", out, frames_per_video=4, log=lambda _: None)


def test_the_frames_of_oulu_npu_keep_every_protocol_and_train_with_the_chosen_one(layouts, tmp_path):
    root, expected = layouts["oulu_npu"]
    out = tmp_path / "frames"
    data.sample_frames(f"oulu_npu:{root}", out, frames_per_video=2, workers=2, log=lambda _: None)
    table = wfas_data.load_or_create_split(
        str(out), tmp_path / "EXP", log=lambda _: None, protocols={"oulu_npu": "3.2"}
    )
    for name, s in zip(table.video, table.split):
        e = expected[name.decode()]
        assert wfas_data.SPLITS[s] == e["split"] and (e["phone"] == "2") == (e["split"] == "test")
    assert json.loads((tmp_path / "EXP" / "split_source.json").read_text())["protocols"] == {"oulu_npu": "3.2"}
    with pytest.raises(UserError, match="--protocol oulu_npu:3: oulu_npu has the protocols 1, 2, 3.1, 3.2"):
        wfas_data.load_or_create_split(str(out), tmp_path / "other", log=lambda _: None, protocols={"oulu_npu": "3"})
    with pytest.raises(UserError, match="was made with --protocol"):
        wfas_data.load_or_create_split(str(out), tmp_path / "EXP", log=lambda _: None, protocols={"oulu_npu": "1"})


def test_several_sources_train_together_each_image_keeping_its_source_and_subject(layouts, demo_root, tmp_path):
    frames = tmp_path / "replay_frames"
    data.sample_frames(f"replay_attack:{layouts['replay_attack'][0]}", frames, frames_per_video=2, log=lambda _: None)
    table = wfas_data.index_dataset(f"{demo_root},{frames}")
    wfas = wfas_data.index_dataset(str(demo_root))
    replay = wfas_data.index_dataset(str(frames))
    assert len(table) == len(wfas) + len(replay)
    assert sorted(set(table.source.tolist())) == [b"replay_attack", b"wfas"]
    root = table.root
    assert sorted(str(root / p) for p in table.paths()) == sorted(
        [str(wfas.root.resolve() / p) for p in wfas.paths()] + [str(replay.root.resolve() / p) for p in replay.paths()]
    )
    assert len(set(table.subject.tolist())) == len(set(wfas.subject.tolist())) + len(set(replay.subject.tolist()))
    split = wfas_data.load_or_create_split(f"{demo_root},{frames}", tmp_path / "EXP", log=lambda _: None)
    replay_rows = split.source == b"replay_attack"
    official = {"train": 0, "val": 1, "test": 2}
    by_video = {v: official[m.decode().split("=")[1]] for v, m in zip(replay.video, replay.membership)}
    assert all(s == by_video[v] for v, s in zip(split.video[replay_rows], split.split[replay_rows]))


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line(layouts, tmp_path):
    oulu = tmp_path / "oulu"
    (oulu / "Train_files").mkdir(parents=True)
    (oulu / "Protocols").mkdir()
    with pytest.raises(UserError, match="no protocol files Protocols/Protocol_N/Train.txt"):
        fas_formats.list_videos(fas_formats.Source("oulu_npu", oulu))
    msu = tmp_path / "msu"
    (msu / "scene01" / "real").mkdir(parents=True)
    with pytest.raises(UserError, match="train_sub_list.txt is missing"):
        fas_formats.list_videos(fas_formats.Source("msu_mfsd", msu))
    face = tmp_path / "bad.face"
    face.write_text("0 10 10 40\n")
    with pytest.raises(UserError, match="bad.face:1: a face-location line of replay_attack has 5 numbers"):
        fas_formats.read_face_locations("replay_attack", face)
    casia = tmp_path / "casia"
    (casia / "train_release" / "1").mkdir(parents=True)
    (casia / "train_release" / "1" / "1.avi").write_bytes(b"not a video")
    with pytest.raises(UserError, match="1.avi: OpenCV cannot decode this video"):
        data.sample_frames(f"casia_fasd:{casia}", tmp_path / "frames", frames_per_video=2, log=lambda _: None)
    with pytest.raises(UserError, match="holds videos: sample their frames first"):
        wfas_data.index_dataset(f"msu_mfsd:{layouts['msu_mfsd'][0]}")
    (tmp_path / "celeba" / "Data").mkdir(parents=True)
    with pytest.raises(UserError, match="no protocol folder metas/intra_test"):
        wfas_data.index_dataset(f"celeba_spoof:{tmp_path / 'celeba'}")
    box_file = tmp_path / "000001_BB.txt"
    box_file.write_text("61 45 sixty 112 0.99\n")
    with pytest.raises(UserError, match="000001_BB.txt does not parse as `x y w h score`: '61 45 sixty 112 0.99'"):
        fas_formats.read_celeba_box(box_file)


def test_check_summarises_every_format_with_the_same_keys(layouts, demo_root):
    wfas_keys = set(data.check_dataset(str(demo_root)))
    for name, (root, expected) in layouts.items():
        summary = data.check_dataset(f"{name}:{root}")
        assert wfas_keys <= set(summary), name
        labels = [e["label"] if isinstance(e, dict) else e[0] for e in expected.values()]
        assert summary["num_images"] == len(expected) and summary["num_live"] == labels.count(1), name
        assert summary["num_spoof"] == labels.count(0), name
    oulu = data.check_dataset(f"oulu_npu:{layouts['oulu_npu'][0]}")
    assert oulu["official_splits"]["2"] == {"train": 24, "val": 12, "test": 24}  # 2, 1, 2 users x 12 videos
    assert (
        oulu["missing_bbox"] == 0 and data.check_dataset(f"casia_fasd:{layouts['casia_fasd'][0]}")["missing_bbox"] == 25
    )
