"""The trained model at work, for the programs that score faces as they come (tools/serve.py, tools/predict.py
--predict_video): a checkpoint of either stage, or its ONNX export (fp32 or INT8), that turns face crops into
P(live), with the threshold and operating points of its run; an image's faces, found by the detector and cropped
as in training; and the decision over a stream of frames for the face followed across them.
"""

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

import networks
import wfas_data
from errors import UserError


@dataclass
class Face:
    """One face of an image: its box (x1, y1, x2, y2), the detector's score, P(live) and the decision."""

    box: list
    detector_score: float
    p_live: float = float("nan")
    decision: str = ""


@dataclass
class LivenessModel:
    """score(crops) -> P(live) of uint8 face crops [N, 3, S, S], from a checkpoint or an ONNX file; threshold: the
    run's (val EER point); operating_points: {"bpcer=0.01": threshold, ...} fitted on val."""

    name: str
    source: str
    img_size: int
    face_crop_scale: float
    threshold: float
    operating_points: dict = field(default_factory=dict)
    score: object = None

    @classmethod
    def load(cls, output_dir, stage=2, checkpoint=None, onnx_path=None, threads=None):
        if onnx_path:
            return cls.from_onnx(onnx_path, threads)
        return cls.from_checkpoint(output_dir, stage=stage, checkpoint=checkpoint, threads=threads)

    @classmethod
    def from_checkpoint(cls, output_dir, stage, checkpoint, threads):
        net, metadata, path = networks.load_checkpoint(checkpoint, output_dir, stage)
        img_size, mean, std = networks.model_input(net, int(metadata["img_size"]))
        if threads:
            torch.set_num_threads(threads)

        @torch.no_grad()
        def score(crops):
            logits = net(wfas_data.to_model_input(torch.from_numpy(crops), mean, std))
            return logits.softmax(-1)[:, wfas_data.LIVE].numpy()

        threshold = metadata.get("val_metrics", {}).get("threshold")
        points = {}
        results = Path(output_dir) / "final_results.json"
        if checkpoint is None and stage == 2 and results.is_file():  # the run's own threshold and points
            run = json.loads(results.read_text())
            threshold = run["threshold"]
            points = operating_points(run.get("operating_points", []))
        return cls(
            name=metadata["model_name"],
            source=str(path),
            img_size=img_size,
            face_crop_scale=float(metadata.get("face_crop_scale", wfas_data.DEFAULT_FACE_CROP_SCALE)),
            threshold=float(threshold if threshold is not None else 0.5),
            operating_points=points,
            score=score,
        )

    @classmethod
    def from_onnx(cls, onnx_path, threads):
        session, props = onnx_session(onnx_path, threads)

        def score(crops):
            return session.run(None, {"face_crops": crops})[0]

        threshold = json.loads(props.get("threshold", "null"))
        return cls(
            name=props.get("model_name", Path(onnx_path).stem),
            source=str(onnx_path),
            img_size=int(props["img_size"]),
            face_crop_scale=float(props.get("face_crop_scale", wfas_data.DEFAULT_FACE_CROP_SCALE)),
            threshold=float(threshold if threshold is not None else 0.5),
            operating_points=operating_points(json.loads(props.get("operating_points", "[]"))),
            score=score,
        )

    def crops(self, image, faces):
        """uint8 [N, 3, S, S] crops of faces in an RGB image (H x W x 3), as training crops them."""
        height, width = image.shape[:2]
        resize = wfas_data.eval_transform(self.img_size)
        crops = []
        for face in faces:
            left, top, right, bottom = wfas_data.face_crop_box(
                np.array(face.box), width, height, scale=self.face_crop_scale
            )
            crop = image[round(top) : round(bottom), round(left) : round(right)]
            crops.append(resize(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)))
        return torch.stack(crops).numpy()

    def describe(self):
        return {
            "model": self.name,
            "source": self.source,
            "img_size": self.img_size,
            "face_crop_scale": self.face_crop_scale,
            "threshold": self.threshold,
            "operating_points": self.operating_points,
        }


def onnx_session(onnx_path, threads=None):
    """(onnxruntime session, the export's metadata) of an ONNX file written by tools/export_onnx.py."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("an ONNX model needs onnxruntime: pip install onnxruntime") from None
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # a missing or damaged file: onnxruntime's own error types
        raise UserError(f"cannot load {onnx_path}: {str(error).splitlines()[0]}") from None
    props = session.get_modelmeta().custom_metadata_map
    if "img_size" not in props:
        raise UserError(f"{onnx_path} has no img_size metadata: export it with tools/export_onnx.py")
    return session, props


class OnnxNetwork(torch.nn.Module):
    """An ONNX export seen as the checkpoint's network by the batch scorers (evaluation.score_table): normalised
    crops in, two logits out. The export takes uint8 crops and gives P(live), so the input is turned back to the
    uint8 it was made from (exactly, up to rounding) and P(live) into logits whose softmax gives it back."""

    def __init__(self, onnx_path):
        super().__init__()
        self.session, props = onnx_session(onnx_path)
        self.metadata = {
            "model_name": props.get("model_name", Path(onnx_path).stem),
            "img_size": props["img_size"],
            "face_crop_scale": props.get("face_crop_scale", str(wfas_data.DEFAULT_FACE_CROP_SCALE)),
            "val_metrics": {"threshold": json.loads(props.get("threshold", "null"))},
        }
        mean = json.loads(props["mean"])
        std = json.loads(props["std"])
        self.pretrained_cfg = {"mean": tuple(mean), "std": tuple(std), "input_size": (3, int(props["img_size"]))}
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images):
        crops = ((images * self.std + self.mean) * 255).round().clamp(0, 255).to(torch.uint8)
        p_live = torch.from_numpy(self.session.run(None, {"face_crops": crops.cpu().numpy()})[0]).to(images.device)
        p_live = p_live.clamp(1e-7, 1 - 1e-7)
        return torch.stack([torch.log1p(-p_live), torch.log(p_live)], dim=1)  # [spoof, live], as wfas_data's


def decision(p_live, threshold):
    """live when P(live) reaches the threshold (a score on it is live, as in evaluation), else spoof."""
    if p_live >= threshold:
        return "live"
    return "spoof"


def operating_points(points):
    """{"bpcer=0.01": threshold, ...} from a run's operating points (evaluation.operating_points)."""
    return {f"{point['error']}={point['target_rate']:g}": point["threshold"] for point in points}


class ImageRefused(UserError):
    """An upload that cannot be scored."""


class EmptyImage(ImageRefused):
    pass


class ImageTooLarge(ImageRefused):
    pass


class NotAnImage(ImageRefused):
    pass


def decode_image(data, max_pixels):
    """An uploaded image as EXIF-oriented RGB (H x W x 3 uint8); EmptyImage, ImageTooLarge over max_pixels (read
    from the header before the pixels are decoded: a decompression bomb stays small) or NotAnImage."""
    if not data:
        raise EmptyImage("the upload is empty: send a JPEG or PNG photo")
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise ImageTooLarge(
                    f"the image is {image.width}x{image.height} = {pixels} pixels, over the limit of {max_pixels}; "
                    "send a smaller one"
                )
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except Image.DecompressionBombError:  # Pillow's own limit, met at the header too
        raise ImageTooLarge(f"the image is over the limit of {max_pixels} pixels (a decompression bomb?)") from None
    except (OSError, ValueError, SyntaxError) as error:
        message = f"the upload is not an image that can be decoded ({type(error).__name__})"
        raise NotAnImage(message) from None


def detect_faces(detector, image):
    """The faces the detector finds in an RGB image, largest first."""
    return [
        Face(box=[round(float(v), 1) for v in points[:2].reshape(-1)], detector_score=round(score, 4))
        for score, points in detector.detect(image)
    ]


def overlap(box, other):
    """Intersection over union of two boxes (x1, y1, x2, y2)."""
    width = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
    height = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
    inter = width * height
    union = (box[2] - box[0]) * (box[3] - box[1]) + (other[2] - other[0]) * (other[3] - other[1]) - inter
    return inter / union if union > 0 else 0.0


class StreamDecision:
    """One face followed across a stream's frames, and its decision over time. The face is the one that overlaps
    the last frame's box most (IoU at least MIN_OVERLAP), else the largest, which starts a new track, as does a
    face lost for more than max_gap frames. P(live) is smoothed by an exponential moving average (weight alpha
    on the newest frame); a track is "undecided" until it has min_frames frames, then live when the
    average is at or over the threshold."""

    MIN_OVERLAP = 0.3

    def __init__(self, threshold, alpha=0.3, min_frames=5, max_gap=15):
        self.threshold = threshold
        self.alpha = alpha
        self.min_frames = min_frames
        self.max_gap = max_gap
        self.box = None
        self.average = None
        self.frames = 0
        self.missed = 0
        self.tracks = 0

    def follow(self, faces):
        """The face of this frame to score, or None (then call missed())."""
        if not faces:
            return None
        if self.box is not None:
            best = max(faces, key=lambda face: overlap(face.box, self.box))
            if overlap(best.box, self.box) >= self.MIN_OVERLAP:
                self.box = best.box
                return best
        self.box = faces[0].box  # the largest: a new face, a new track
        self.average = None
        self.frames = 0
        self.tracks += 1
        return faces[0]

    def update(self, p_live):
        """(smoothed P(live), decision) after this frame's P(live) of the followed face."""
        self.missed = 0
        self.frames += 1
        if self.average is None:
            self.average = float(p_live)
        else:
            self.average = self.alpha * float(p_live) + (1 - self.alpha) * self.average
        if self.frames < self.min_frames:
            return self.average, "undecided"
        return self.average, decision(self.average, self.threshold)

    def missed_frame(self):
        """A frame without the face: the track ends after max_gap of them in a row."""
        self.missed += 1
        if self.missed > self.max_gap:
            self.box = None
        return "no_face"
