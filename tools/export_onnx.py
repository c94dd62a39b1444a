"""Export a trained checkpoint of either stage to ONNX, checked against PyTorch with onnxruntime: the file is
written only when their P(live) agree within --onnx_tolerance on up to 64 val face crops of EXP's split.

    python tools/export_onnx.py --output_dir EXP                 # the student: EXP/stage2_best.onnx
    python tools/export_onnx.py --output_dir EXP --stage 1       # the teacher: EXP/stage1_best.onnx
    python tools/export_onnx.py --output_dir OUT --checkpoint some/stage2_best.safetensors   # OUT/<name>.onnx

Input face_crops: uint8 [batch, 3, H, W] RGB; output p_live: float32 [batch]. Normalisation is in the graph, and
the crop recipe, threshold and compute budget are in its metadata (docs/deployment.md). Needs
`pip install onnx onnxscript onnxruntime`; the checkpoint's metadata names the model.
"""

import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import networks  # noqa: E402
import training_run  # noqa: E402
import wfas_data  # noqa: E402
from errors import UserError, run_cli  # noqa: E402
from output_files import aside  # noqa: E402
from wfas_data import LIVE  # noqa: E402

logger = logging.getLogger("export_onnx")


def parse_args(argv=None):
    parser = networks.checkpoint_parser(__doc__)
    parser.add_argument(
        "--onnx_tolerance",
        type=float,
        default=1e-4,
        help="largest difference in P(live) between onnxruntime and PyTorch (fp32) that is accepted (default: 1e-4)",
    )
    parser.add_argument("--data_root", help="the data of the parity check (default: the one stage 1 recorded in EXP)")
    return parser.parse_args(argv)


class DeployedModel(torch.nn.Module):
    """What the ONNX file computes: uint8 RGB face crops [N, 3, H, W] in, P(live) [N] out. It normalises as
    wfas_data.to_model_input does, so that a deployer only crops and resizes."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, face_crops):
        return self.net((face_crops.float() / 255 - self.mean) / self.std).softmax(-1)[:, LIVE]


def parity_crops(output_dir, data_root, img_size, face_crop_scale, count=64):
    """Up to count val face crops of EXP's split, made as the loader makes them, to compare an export with
    PyTorch on; generated crops when the split or its images are not at hand.
    Returns (uint8 [N, 3, H, W], what they are)."""
    if not (Path(output_dir) / "split.csv").is_file():
        reason = f"no split.csv in {output_dir}"
    elif not data_root:
        reason = f"{output_dir} names no data root; pass --data_root"
    else:
        try:
            val = wfas_data.load_or_create_split(data_root, output_dir, log=lambda message: None).of_split("val")
            sample = val.select(np.unique(np.linspace(0, len(val) - 1, min(count, len(val))).round().astype(int)))
            dataset = wfas_data.FaceDataset(sample, img_size, face_crop_scale=face_crop_scale)
            images = [item["image"] for item in map(dataset.__getitem__, range(len(dataset))) if item["ok"]]
            if images:
                return torch.stack(images), f"{len(images)} val images of {data_root}"
            reason = f"none of the sampled val images of {data_root} could be read"
        except UserError as error:
            reason = str(error)
    generator = torch.Generator().manual_seed(0)
    crops = torch.randint(0, 256, (count, 3, img_size, img_size), dtype=torch.uint8, generator=generator)
    return crops, f"{count} generated crops ({reason})"


def export_onnx(args, batch_size=32):
    """EXP/<checkpoint name>.onnx from the stage's best checkpoint (or --checkpoint), with the preprocessing a
    deployer must reproduce in its metadata. It is written only when onnxruntime gives the checkpoint's
    P(live) within --onnx_tolerance (fp32) on val images."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter runs on it)
    except ImportError as error:
        raise UserError(
            f"the ONNX export needs onnx, onnxscript and onnxruntime ({error}): pip install onnx onnxscript onnxruntime"
        ) from None
    if "external_data" not in inspect.signature(torch.onnx.export).parameters:
        raise UserError(
            f"the ONNX export needs torch's torch.export-based ONNX exporter (torch 2.6 or later); this is "
            f"torch {torch.__version__}"
        )
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError(
            f"the ONNX export runs in one process: python tools/export_onnx.py --output_dir {args.output_dir}"
        )
    net, metadata, checkpoint = networks.load_checkpoint(args.checkpoint, args.output_dir, args.stage)
    img_size = int(metadata["img_size"])
    face_crop_scale = float(metadata.get("face_crop_scale", wfas_data.DEFAULT_FACE_CROP_SCALE))
    _, mean, std = networks.model_input(net)
    threshold = metadata.get("val_metrics", {}).get("threshold")
    compute = metadata.get("compute") or networks.compute_budget(net, metadata["model_name"], img_size)
    crops, source = parity_crops(
        args.output_dir, args.data_root or recorded_data_root(args.output_dir), img_size, face_crop_scale
    )
    batches = list(crops.split(batch_size))

    def timed(predict):
        predict(batches[0])  # warm-up: the first call allocates and picks kernels
        start = time.perf_counter()
        scores = np.concatenate([predict(batch) for batch in batches])
        return scores, len(crops) / (time.perf_counter() - start)

    @torch.no_grad()
    def reference(batch):  # what training and prediction compute
        return net(wfas_data.to_model_input(batch, mean, std)).softmax(-1)[:, LIVE].numpy()

    expected, torch_speed = timed(reference)

    # torch.export cannot decompose timm's fused attention with MaxViT's relative position bias; the plain
    # softmax(QK^T)V path exports (the parity check compares it with the fused one)
    for module in net.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    onnx_path = Path(args.output_dir) / f"{checkpoint.stem}.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = aside(onnx_path)
    logger.info(f"Exporting {checkpoint} ({metadata['model_name']}, image size {img_size}) to ONNX")
    for chatty in ("onnxscript", "onnx_ir"):  # their graph optimiser logs every rewrite at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        torch.onnx.export(
            DeployedModel(net, mean, std).eval(),
            (crops[:2],),
            tmp,
            input_names=["face_crops"],
            output_names=["p_live"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            opset_version=18,
            external_data=False,
            verbose=False,
        )  # 18: runtimes of 2023 on
    except Exception as error:  # the exporter's errors are long reports; their first line says what failed
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"torch.onnx.export cannot export {metadata['model_name']}: {str(error).splitlines()[0]}"
        ) from None
    deployment = {
        "stage": f"stage{args.stage}",
        "model_name": metadata["model_name"],
        "source_checkpoint": str(checkpoint.resolve()),
        "input": f"face_crops: uint8 [batch, 3, {img_size}, {img_size}], RGB",
        "output": "p_live: float32 [batch], the probability that the face is live (label convention: live = 1, "
        "spoof = 0)",
        "img_size": str(img_size),
        "face_crop_scale": str(face_crop_scale),
        "face_crop": f"the square around the face box, its longer side times face_crop_scale, centred on the box and "
        f"shifted (then shrunk) to stay inside the image, resized to {img_size}x{img_size} bilinear "
        "with antialiasing; the whole image when there is no box (wfas_data.face_crop_box)",
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        "normalisation": "inside the model: (face_crops / 255 - mean) / std",
        "threshold": json.dumps(threshold),
        "decision": "live when p_live >= threshold (the val EER point)",
        "val_metrics": json.dumps(metadata.get("val_metrics")),
        "compute": json.dumps(compute),
        "exported_with": f"torch {torch.__version__}, timm {timm.__version__}",
    }
    model = onnx.load(tmp)
    onnx.helper.set_model_props(model, deployment)
    onnx.checker.check_model(model)
    onnx.save(model, tmp)

    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    exported, onnx_speed = timed(lambda batch: session.run(None, {"face_crops": batch.numpy()})[0])
    largest = float(np.abs(exported - expected).max())
    tolerance = args.onnx_tolerance
    if not largest <= tolerance:  # NaN fails too
        tmp.unlink()
        raise UserError(
            f"the ONNX export of {checkpoint} gives P(live) up to {largest:.2e} away from PyTorch on "
            f"{source} (tolerance {tolerance:g}); {onnx_path} was not written (--onnx_tolerance sets the "
            "limit)"
        )
    os.replace(tmp, onnx_path)
    logger.info(
        f"Parity on {source}: largest |P(live) difference| {largest:.1e} (tolerance {tolerance:g}); "
        f"{torch_speed:.0f} img/s in PyTorch, {onnx_speed:.0f} img/s in onnxruntime on this CPU "
        f"({torch.get_num_threads()} threads, batches of {batch_size})"
    )
    logger.info(
        f"Wrote {onnx_path}: input {deployment['input']}, output p_live [batch]; live when p_live >= "
        f"{threshold}. {compute['challenge_limit']}"
    )
    return {
        "onnx_path": str(onnx_path),
        "max_abs_diff": largest,
        "parity_images": len(crops),
        "parity_source": source,
        "torch_images_per_second": torch_speed,
        "onnx_images_per_second": onnx_speed,
        **deployment,
    }


def recorded_data_root(output_dir):
    """The data root stage 1 recorded in EXP/stage1_config.json, or None."""
    config = Path(output_dir) / "stage1_config.json"
    return json.loads(config.read_text()).get("data_root") if config.is_file() else None


def main(argv=None):
    args = parse_args(argv)
    training_run.setup_logging()
    return export_onnx(args)


if __name__ == "__main__":
    run_cli(main)
