"""liveness.py and the service's choices, at the function level: the decision at a threshold, the refusals of an
upload (400 / 413 / 415, the pixel limit read from the header), the threshold a request asks for, and the stream
rule of video scoring."""

import io
import struct
import zlib

import numpy as np
import pytest
from fastapi import HTTPException
from PIL import Image

import liveness
from tools import serve


def test_live_when_p_live_reaches_the_threshold():
    assert liveness.decision(0.5, 0.5) == "live"
    assert liveness.decision(np.nextafter(0.5, 0), 0.5) == "spoof"
    assert liveness.decision(0.0, 0.0) == "live" and liveness.decision(1.0, 1.0) == "live"
    assert liveness.decision(0.99, 0.995) == "spoof" and liveness.decision(0.2, 0.1) == "live"


def encoded(image, format):
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def png_header_only(width, height):
    """A PNG whose header claims width x height and whose pixel data is missing: only the header can be read."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data, status, message",
    [
        (b"", 400, "empty"),
        (b"this is not an image", 415, "not an image"),
        (encoded(Image.new("RGB", (64, 64)), "JPEG")[:200], 415, "not an image"),  # a truncated JPEG
        (png_header_only(5000, 4000), 413, "5000x4000 = 20000000 pixels, over the limit of 10000000"),
        (png_header_only(40000, 40000), 413, "over the limit"),  # past Pillow's own bomb limit too
    ],
)
def test_an_upload_that_cannot_be_scored_is_refused_and_the_service_answers_its_status(data, status, message):
    with pytest.raises(liveness.ImageRefused, match=message) as refused:
        liveness.decode_image(data, max_pixels=10_000_000)
    assert serve.REFUSAL_STATUS[type(refused.value)] == status


def test_the_pixel_limit_is_inclusive_and_an_image_decodes_upright_in_rgb():
    gray = encoded(Image.new("L", (100, 50), 7), "PNG")
    assert liveness.decode_image(gray, max_pixels=5000).shape == (50, 100, 3)
    with pytest.raises(liveness.ImageRefused):
        liveness.decode_image(gray, max_pixels=4999)
    rotated = Image.new("RGB", (100, 50), (200, 10, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to show upright
    buffer = io.BytesIO()
    rotated.save(buffer, format="JPEG", exif=exif)
    assert liveness.decode_image(buffer.getvalue(), max_pixels=5000).shape == (100, 50, 3)


class RecordedModel:
    threshold = 0.37
    operating_points = {"bpcer=0.01": 0.12, "apcer=0.01": 0.81}


@pytest.mark.parametrize(
    "operating_point, threshold, expected",
    [(None, None, 0.37), ("bpcer=0.01", None, 0.12), ("apcer=0.01", None, 0.81), (None, 0.6, 0.6), (None, 0.0, 0.0)],
)
def test_a_request_gets_the_threshold_it_names(operating_point, threshold, expected):
    assert serve.threshold_for(RecordedModel(), operating_point, threshold) == expected


@pytest.mark.parametrize(
    "operating_point, threshold, message",
    [
        ("bpcer=0.5", None, "no operating point 'bpcer=0.5'; known: bpcer=0.01, apcer=0.01"),
        ("bpcer=0.01", 0.5, "not both"),
    ],
)
def test_a_request_for_an_unknown_or_a_second_threshold_is_a_400(operating_point, threshold, message):
    with pytest.raises(HTTPException) as refused:
        serve.threshold_for(RecordedModel(), operating_point, threshold)
    assert refused.value.status_code == 400 and message in refused.value.detail


def test_operating_points_are_named_by_error_and_rate():
    points = [
        {"error": "bpcer", "target_rate": 0.01, "threshold": 0.2},
        {"error": "apcer", "target_rate": 0.001, "threshold": 0.9},
    ]
    assert liveness.operating_points(points) == {"bpcer=0.01": 0.2, "apcer=0.001": 0.9}


def face(x1, width=50):
    return liveness.Face(box=[x1, 10, x1 + width, 10 + width], detector_score=0.99)


def test_the_stream_rule():
    stream = liveness.StreamDecision(threshold=0.5, alpha=0.5, min_frames=2, max_gap=1)

    assert stream.follow([face(0)]).box[0] == 0
    assert stream.update(0.9) == (0.9, "undecided")
    assert stream.follow([face(200, 80), face(5)]).box[0] == 5  # the face it follows, not the larger one
    assert stream.update(0.1) == (pytest.approx(0.5), "live")
    assert stream.update(0.1) == (pytest.approx(0.3), "spoof")
    assert stream.missed_frame() == "no_face"
    assert stream.follow([face(5)]).box[0] == 5 and stream.tracks == 1  # a gap of one frame: the same track
    assert stream.missed_frame() == "no_face" and stream.missed_frame() == "no_face"
    assert stream.follow([face(5)]) and stream.tracks == 2  # lost for longer: a new track, a new average
    assert stream.update(0.8) == (0.8, "undecided")
