"""Tiny datasets in the real on-disk layouts of CelebA-Spoof, OULU-NPU, CASIA-FASD, Idiap Replay-Attack and
MSU-MFSD (fas_formats.py's docstring and docs/data.md say where each layout comes from): drawn faces, videos
written with OpenCV, each dataset's own label, box, face-location and protocol files. Each writer returns what a
reader must find, worked out here from what it wrote."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tools.make_demo import _demo_attack, _demo_face, _demo_identity

SIZE = 96  # frames of 96 x 96: a video of 6 frames is a few KB


def drawn_frame(rng, identity, attack=None):
    """A drawn face (BGR uint8, as OpenCV writes) and its box (x1, y1, x2, y2) and eyes."""
    image, points, inside = _demo_face(rng, identity, size=SIZE)
    if attack:
        image = _demo_attack(rng, attack, image, inside)
    frame = np.clip(image, 0, 255).astype(np.uint8)[:, :, ::-1].copy()
    return frame, points[:2].reshape(-1), points[2:4]


def write_video(path, rng, identity, attack=None, frames=6):
    """A video of drawn frames; returns each frame's box and eyes."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "MJPG" if path.suffix == ".avi" else "mp4v"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), 10, (SIZE, SIZE))
    boxes = []
    eyes = []
    for _ in range(frames):
        frame, box, eye_points = drawn_frame(rng, identity, attack)
        writer.write(frame)
        boxes.append(box)
        eyes.append(eye_points)
    writer.release()
    return np.array(boxes), np.array(eyes)


def write_celeba_spoof(root, seed=0):
    """CelebA-Spoof: Data/{train,test}/<subject>/{live,spoof}/<6-digit>.{jpg,png} with <stem>_BB.txt (`x y w h
    score` in 224 x 224 coordinates), metas/intra_test/{train,test}_label.json (44 labels: 40 the spoof type, 43
    the label, 0 = live). Returns {path: (label 1 = live, attack type, subject, split, box in pixels or None)}."""
    rng = np.random.default_rng(seed)
    expected = {}
    labels = {"train": {}, "test": {}}
    number = 0
    for split, subjects, extension in (("train", (10, 11, 12, 13, 14, 15), "jpg"), ("test", (20, 21, 22), "png")):
        for subject in subjects:
            identity = _demo_identity(rng)
            for kind, spoof_type in (("live", 0), ("live", 0), ("spoof", 1), ("spoof", 9)):
                width = int(rng.integers(90, 140))
                height = int(rng.integers(100, 150))
                image, points, inside = _demo_face(rng, identity, size=SIZE)
                if spoof_type:
                    image = _demo_attack(
                        rng, "2D-Print-Photo" if spoof_type == 1 else "2D-Display-Phone", image, inside
                    )
                picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).resize((width, height))
                path = f"Data/{split}/{subject}/{kind}/{number:06d}.{extension}"
                number += 1
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                picture.save(root / path)
                box = points[:2].reshape(-1) * np.tile([width / SIZE, height / SIZE], 2)  # in the picture's pixels
                in_224 = box * np.tile([224 / width, 224 / height], 2)
                x, y, w, h = in_224[0], in_224[1], in_224[2] - in_224[0], in_224[3] - in_224[1]
                bb_text = f"{x:.0f} {y:.0f} {w:.0f} {h:.0f} 0.99\n"
                expected_box = np.array([round(x), round(y), round(x) + round(w), round(y) + round(h)], dtype=float)
                if number == 3:  # the dataset has empty box files: the whole image is then used
                    bb_text = ""
                    expected_box = None
                (root / path.replace(f".{extension}", "_BB.txt")).write_text(bb_text)
                vector = [0] * 44
                vector[40] = spoof_type
                vector[43] = 0 if kind == "live" else 1
                labels[split][path] = vector
                attack_type = "live" if kind == "live" else ("photo" if spoof_type == 1 else "phone")
                expected[path] = (
                    1 if kind == "live" else 0,
                    attack_type,
                    f"celeba_spoof/{subject}",
                    split,
                    expected_box,
                )
    (root / "metas" / "intra_test").mkdir(parents=True)
    for split in ("train", "test"):
        (root / "metas" / "intra_test" / f"{split}_label.json").write_text(json.dumps(labels[split]))
    return expected


def write_oulu_npu(root, seed=0):
    """OULU-NPU: {Train,Dev,Test}_files/<phone>_<session>_<user>_<file>.avi with a <name>.txt of eye positions
    (`frame,x1,y1,x2,y2`, 0s for no face), Protocols/Protocol_{1,2}/{Train,Dev,Test}.txt and Protocol_{3,4}/
    {Train,Dev,Test}_<phone>.txt (`+1,1_1_01_1`). Two phones, two sessions; users 01-02 train, 21 dev, 36-37
    test. Returns {name: (label, attack type, subject, folder, {protocol: split}, eyes per frame)}."""
    rng = np.random.default_rng(seed)
    expected = {}
    attacks = {"1": None, "2": "2D-Print-Photo", "4": "2D-Display-Phone"}
    for folder, users in (("Train_files", ("01", "02")), ("Dev_files", ("21",)), ("Test_files", ("36", "37"))):
        for user in users:
            identity = _demo_identity(rng)
            for phone in ("1", "2"):
                for session in ("1", "3"):
                    for file, attack in attacks.items():
                        name = f"{phone}_{session}_{user}_{file}"
                        _, eyes = write_video(root / folder / f"{name}.avi", rng, identity, attack)
                        lines = [
                            f"{k},{e[0, 0]:.0f},{e[0, 1]:.0f},{e[1, 0]:.0f},{e[1, 1]:.0f}" for k, e in enumerate(eyes)
                        ]
                        lines[1] = "1,0,0,0,0"  # a frame without a face
                        (root / folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
                        live = file == "1"
                        expected[name] = {
                            "label": 1 if live else 0,
                            "attack_type": "live" if live else {"2": "print_1", "4": "replay_1"}[file],
                            "subject": f"oulu_npu/{user}",
                            "folder": folder,
                            "eyes": np.round(eyes),
                            "split": {"Train_files": "train", "Dev_files": "val", "Test_files": "test"}[folder],
                            "phone": phone,
                            "session": session,
                        }
    protocols = root / "Protocols"

    def write_list(path, names):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{'+1' if expected[n]['label'] else '-1'},{n}\n" for n in names))

    for key, part in (("Train", "train"), ("Dev", "val"), ("Test", "test")):
        names = [n for n, v in expected.items() if v["split"] == part]
        # protocol 1: sessions 1, 2 train and dev, session 3 test; protocol 2: every session (this fixture has
        # attack files 2 and 4 only: both train, both test)
        session_ok = (lambda v: v["session"] == "3") if part == "test" else (lambda v: v["session"] != "3")
        write_list(protocols / "Protocol_1" / f"{key}.txt", [n for n in names if session_ok(expected[n])])
        write_list(protocols / "Protocol_2" / f"{key}.txt", names)
        for phone in ("1", "2"):
            held_out = (lambda v: v["phone"] == phone) if part == "test" else (lambda v: v["phone"] != phone)
            write_list(protocols / "Protocol_3" / f"{key}_{phone}.txt", [n for n in names if held_out(expected[n])])
    return expected


def write_casia_fasd(root, seed=0):
    """CASIA-FASD: train_release/<s>/ and test_release/<s>/ with 1.avi ... 8.avi and HR_1.avi ... HR_4.avi (a few
    of them here); no face locations. Returns {relative path: (label, attack type, subject, split)}."""
    rng = np.random.default_rng(seed)
    expected = {}
    stems = {"1": None, "HR_1": None, "3": "2D-Print-Photo", "5": "2D-Print-Poster", "7": "2D-Display-Pad"}
    types = {"1": "live", "HR_1": "live", "3": "warped_photo", "5": "cut_photo", "7": "replay"}
    for folder, subjects, offset in (("train_release", (1, 2, 3), 0), ("test_release", (1, 2), 20)):
        for subject in subjects:
            identity = _demo_identity(rng)
            for stem, attack in stems.items():
                path = f"{folder}/{subject}/{stem}.avi"
                write_video(root / path, rng, identity, attack, frames=5)
                split = "train" if folder == "train_release" else "test"
                label = 1 if attack is None else 0
                expected[path] = (label, types[stem], f"casia_fasd/{subject + offset}", split)
    return expected


def write_replay_attack(root, seed=0):
    """Idiap Replay-Attack: {train,devel,test}/real/clientNNN_session01_webcam_authenticate_<light>_<n>.mov and
    attack/{fixed,hand}/attack_<device>_clientNNN_session01_<device>_<photo|video>_<light>.mov, with face-locations/
    <same path>.face (`frame x y width height`). Returns {relative path: (label, attack type, subject, split,
    boxes per frame)}."""
    rng = np.random.default_rng(seed)
    expected = {}
    for folder, split, clients in (
        ("train", "train", ("001", "002")),
        ("devel", "val", ("003",)),
        ("test", "test", ("009", "011")),
    ):
        for client in clients:
            identity = _demo_identity(rng)
            videos = [
                (f"{folder}/real/client{client}_session01_webcam_authenticate_adverse_1.mov", None, "live"),
                (f"{folder}/real/client{client}_session01_webcam_authenticate_controlled_2.mov", None, "live"),
                (
                    f"{folder}/attack/fixed/attack_print_client{client}_session01_highdef_photo_adverse.mov",
                    "2D-Print-Photo",
                    "print_photo",
                ),
                (
                    f"{folder}/attack/hand/attack_mobile_client{client}_session01_mobile_video_controlled.mov",
                    "2D-Display-Phone",
                    "mobile_video",
                ),
            ]
            for path, attack, attack_type in videos:
                boxes, _ = write_video(root / path, rng, identity, attack)
                face = (root / "face-locations" / path).with_suffix(".face")
                face.parent.mkdir(parents=True, exist_ok=True)
                lines = [f"{k} {b[0]:.0f} {b[1]:.0f} {b[2] - b[0]:.0f} {b[3] - b[1]:.0f}" for k, b in enumerate(boxes)]
                face.write_text("\n".join(lines) + "\n")
                boxes = [
                    (round(b[0]), round(b[1]), round(b[0]) + round(b[2] - b[0]), round(b[1]) + round(b[3] - b[1]))
                    for b in boxes
                ]
                expected[path] = (0 if attack else 1, attack_type, f"replay_attack/{client}", split, boxes)
    return expected


def write_msu_mfsd(root, seed=0):
    """MSU-MFSD: scene01/{real,attack}/<name>.{mp4,mov} with <name>.face beside each (`frame, left, top, right,
    bottom, eyes`), train_sub_list.txt and test_sub_list.txt (two-digit client numbers, CRLF). Returns
    {relative path: (label, attack type, subject, split, boxes per frame)}."""
    rng = np.random.default_rng(seed)
    expected = {}
    clients = {"02": "train", "03": "train", "05": "train", "01": "test", "13": "test"}
    for client, split in clients.items():
        identity = _demo_identity(rng)
        videos = [
            (f"scene01/real/real_client0{client}_android_SD_scene01.mp4", None, "live"),
            (f"scene01/real/real_client0{client}_laptop_SD_scene01.mov", None, "live"),
            (
                f"scene01/attack/attack_client0{client}_android_SD_printed_photo_scene01.mp4",
                "2D-Print-Photo",
                "printed_photo",
            ),
            (f"scene01/attack/attack_client0{client}_laptop_SD_ipad_video_scene01.mov", "2D-Display-Pad", "ipad_video"),
        ]
        for path, attack, attack_type in videos:
            boxes, eyes = write_video(root / path, rng, identity, attack)
            lines = [
                ", ".join(f"{v:.0f}" for v in (k, *b, *e.reshape(-1))) for k, (b, e) in enumerate(zip(boxes, eyes))
            ]
            (root / path).with_suffix(".face").write_text("\n".join(lines) + "\n")
            expected[path] = (0 if attack else 1, attack_type, f"msu_mfsd/0{client}", split, np.round(boxes))
    for split in ("train", "test"):
        names = [c for c, s in clients.items() if s == split]
        (root / f"{split}_sub_list.txt").write_bytes("\r\n".join(names).encode())
    return expected


WRITERS = {
    "celeba_spoof": write_celeba_spoof,
    "oulu_npu": write_oulu_npu,
    "casia_fasd": write_casia_fasd,
    "replay_attack": write_replay_attack,
    "msu_mfsd": write_msu_mfsd,
}


def write_dataset(name, root, seed=0):
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return WRITERS[name](root, seed)
