"""A liveness service over HTTP: POST a photo, get each face's box, P(live) and decision back as JSON; a page at /
to try it from a browser (a photo or a webcam snapshot).

    python tools/serve.py --output_dir EXP                          # the student of EXP (stage 2's best)
    python tools/serve.py --output_dir EXP --onnx EXP/stage2_best.onnx [--port 8000 --host 0.0.0.0]
    curl -F image=@photo.jpg 'http://localhost:8000/v1/liveness?operating_point=bpcer=0.01'

Routes: POST /v1/liveness (multipart field `image`; query `operating_point=bpcer=0.01` or `threshold=0.3`, else
the run's threshold), GET /v1/model (model, threshold, operating points, limits), GET /health, GET / (the page).
Bad input gets a 4xx with {"detail": "..."}: not an image 415, an empty or malformed request 400 or 422, over
--max_bytes or --max_pixels 413 (checked before decoding: a decompression bomb is refused from its header).

Concurrency: requests run in the server's thread pool, where each decodes its image and runs the face detector
(onnxruntime releases the GIL, so several detect at once); their face crops go to one scoring thread, which
scores the crops of every request waiting as one batch (up to --max_batch). At most --max_pending requests are
in the service at once; one more is answered 503 with Retry-After at once, so memory stays bounded. Needs
`pip install -r requirements-serve.txt` and the face detector (requirements-detect.txt).
"""

import argparse
import concurrent.futures
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import face_detector  # noqa: E402
import liveness  # noqa: E402
from errors import UserError, run_cli  # noqa: E402

PAGE = Path(__file__).with_name("serve_page.html")

# How the service answers an upload that cannot be scored.
REFUSAL_STATUS = {liveness.EmptyImage: 400, liveness.ImageTooLarge: 413, liveness.NotAnImage: 415}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="output", help="the experiment folder (default: output)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2, help="whose best checkpoint (default: 2)")
    parser.add_argument("--checkpoint", help="a .safetensors written by either stage (default: EXP's best)")
    parser.add_argument("--onnx", help="an ONNX file from tools/export_onnx.py (fp32 or --int8) instead")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="0: a free port, said on start (default: 8000)")
    parser.add_argument("--max_bytes", type=int, default=20_000_000, help="largest upload (default: 20 MB)")
    parser.add_argument("--max_pixels", type=int, default=40_000_000, help="largest image (default: 40 Mpx)")
    parser.add_argument("--max_pending", type=int, default=32, help="requests in the service at once (default: 32)")
    parser.add_argument("--max_batch", type=int, default=32, help="face crops scored together (default: 32)")
    parser.add_argument(
        "--min_face_score",
        type=float,
        default=face_detector.DEFAULT_MIN_SCORE,
        help=f"the detector's threshold (default: {face_detector.DEFAULT_MIN_SCORE})",
    )
    return parser.parse_args(argv)


class BatchScorer:
    """One thread that scores the face crops of all waiting requests together: submit(crops) -> P(live)."""

    def __init__(self, model, max_batch):
        self.model = model
        self.max_batch = max_batch
        self.waiting = queue.Queue()
        self.batches = 0
        threading.Thread(target=self._run, name="scorer", daemon=True).start()

    def submit(self, crops):
        done = concurrent.futures.Future()
        self.waiting.put((crops, done))
        return done.result()

    def _run(self):
        while True:
            jobs = [self.waiting.get()]
            size = len(jobs[0][0])
            while size < self.max_batch:
                try:
                    jobs.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
                size += len(jobs[-1][0])
            try:
                scores = self.model.score(np.concatenate([crops for crops, _ in jobs]))
            except Exception as error:  # each request answers 500 with it; the thread goes on
                for _, done in jobs:
                    done.set_exception(error)
                continue
            self.batches += 1
            start = 0
            for crops, done in jobs:
                done.set_result(scores[start : start + len(crops)])
                start += len(crops)


def create_app(model, detector, args):
    from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse

    app = FastAPI(title="WFAS liveness", version="1")
    scorer = BatchScorer(model, args.max_batch)
    slots = threading.BoundedSemaphore(args.max_pending)
    counts = {"requests": 0, "rejected_busy": 0}

    @app.middleware("http")
    async def refuse_large_uploads(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > args.max_bytes + 10_000:  # the multipart framing
            return JSONResponse(
                {"detail": f"the upload is {int(length)} bytes, over the limit of {args.max_bytes}"}, 413
            )
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/model")
    def model_info():
        limits = {"max_bytes": args.max_bytes, "max_pixels": args.max_pixels, "max_pending": args.max_pending}
        return {**model.describe(), "limits": limits, "scored_batches": scorer.batches, **counts}

    @app.post("/v1/liveness")
    def score(
        image: UploadFile = File(..., description="a JPEG or PNG photo"),
        operating_point: str | None = Query(None, description="e.g. bpcer=0.01 (see /v1/model)"),
        threshold: float | None = Query(None, ge=0, le=1),
    ):
        threshold_used = threshold_for(model, operating_point, threshold)
        if not slots.acquire(blocking=False):
            counts["rejected_busy"] += 1
            raise HTTPException(503, "the service is busy: try again shortly", headers={"Retry-After": "1"})
        try:
            counts["requests"] += 1
            started = time.perf_counter()
            data = image.file.read(args.max_bytes + 1)
            if len(data) > args.max_bytes:
                raise HTTPException(413, f"the upload is over the limit of {args.max_bytes} bytes")
            try:
                rgb = liveness.decode_image(data, args.max_pixels)
            except liveness.ImageRefused as error:
                raise HTTPException(REFUSAL_STATUS[type(error)], str(error)) from None
            faces = liveness.detect_faces(detector, rgb)
            if faces:
                scores = scorer.submit(model.crops(rgb, faces))
                for face, p_live in zip(faces, scores):
                    face.p_live = round(float(p_live), 6)
                    face.decision = liveness.decision(p_live, threshold_used)
            decision = faces[0].decision if faces else "no_face"
            return {
                "decision": decision,
                "faces": [vars(face) for face in faces],
                "threshold": threshold_used,
                "operating_point": operating_point or ("threshold" if threshold is not None else "run threshold"),
                "image_size": [int(rgb.shape[1]), int(rgb.shape[0])],
                "milliseconds": round((time.perf_counter() - started) * 1000, 1),
            }
        finally:
            slots.release()

    return app


def threshold_for(model, operating_point, threshold):
    from fastapi import HTTPException

    if threshold is not None and operating_point:
        raise HTTPException(400, "give threshold or operating_point, not both")
    if threshold is not None:
        return threshold
    if operating_point is None:
        return model.threshold
    if operating_point not in model.operating_points:
        known = ", ".join(model.operating_points) or "none: this model records no operating points"
        raise HTTPException(400, f"no operating point {operating_point!r}; known: {known}")
    return model.operating_points[operating_point]


def main(argv=None):
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as error:
        raise UserError(f"the service needs {error.name}: pip install -r requirements-serve.txt") from None
    model = liveness.LivenessModel.load(
        args.output_dir, stage=args.stage, checkpoint=args.checkpoint, onnx_path=args.onnx, threads=os.cpu_count()
    )
    detector = face_detector.FaceDetector(args.min_face_score)
    app = create_app(model, detector, args)
    # bound here, so that the line below gives the port the service has (a free one for --port 0)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((args.host, args.port))
    except OSError as error:
        raise UserError(f"cannot serve on {args.host}:{args.port} ({error.strerror}): pick another --port") from None
    port = listening.getsockname()[1]
    print(
        f"Serving {model.name} ({model.source}), threshold {model.threshold:.4f}, on http://{args.host}:{port}/ "
        f"(POST /v1/liveness, GET /v1/model)",
        flush=True,
    )
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listening])


if __name__ == "__main__":
    run_cli(main)
