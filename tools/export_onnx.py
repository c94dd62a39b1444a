"""Export a trained checkpoint of either stage to ONNX, checked against PyTorch with onnxruntime: the file is
written only when their P(live) agree within --onnx_tolerance on up to 64 val face crops of EXP's split.

    python tools/export_onnx.py --output_dir EXP                 # the student: EXP/stage2_best.onnx
    python tools/export_onnx.py --output_dir EXP --stage 1       # the teacher: EXP/stage1_best.onnx
    python tools/export_onnx.py --output_dir OUT --checkpoint some/stage2_best.safetensors   # OUT/<name>.onnx
    python tools/export_onnx.py --output_dir EXP --int8          # also EXP/stage2_best_int8.onnx (8-bit)

--int8 also writes an 8-bit model: onnxruntime's static quantization (QDQ, weights per channel), calibrated on
--calibration_images val face crops of EXP's split. It reports the val and test ACER of both models at the run's
threshold, the largest |P(live) difference| and their speed, side by side, and refuses (writes nothing) when
either ACER moves by more than --int8_acer_tolerance.

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
import challenge  # noqa: E402
import evaluation  # noqa: E402
import networks  # noqa: E402
import training_run  # noqa: E402
import wfas_data  # noqa: E402
from tools.checkpoint_flags import checkpoint_parser  # noqa: E402
from errors import UserError, run_cli  # noqa: E402
from output_files import aside  # noqa: E402
from wfas_data import LIVE  # noqa: E402

logger = logging.getLogger("export_onnx")


def parse_args(argv=None):
    parser = checkpoint_parser(__doc__)
    parser.add_argument(
        "--onnx_tolerance",
        type=float,
        default=1e-4,
        help="largest difference in P(live) between onnxruntime and PyTorch (fp32) that is accepted (default: 1e-4)",
    )
    parser.add_argument("--data_root", help="the data of the parity check (default: the one stage 1 recorded in EXP)")
    parser.add_argument("--int8", action="store_true", help="also write an INT8 model (<name>_int8.onnx)")
    parser.add_argument(
        "--calibration_images", type=int, default=256, help="val face crops that calibrate --int8 (default: 256)"
    )
    parser.add_argument(
        "--int8_eval_images",
        type=int,
        default=2000,
        help="val and test images each on which --int8 is compared with fp32 (default: 2000, evenly spaced)",
    )
    parser.add_argument(
        "--int8_acer_tolerance",
        type=float,
        default=0.01,
        help="the largest change of val or test ACER that --int8 accepts (default: 0.01)",
    )
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


def split_crops(output_dir, data_root, split, img_size, face_crop_scale, count):
    """Up to count face crops of one split of EXP (evenly spaced), as the loader makes them, with their labels.
    Returns (uint8 [N, 3, H, W], labels [N])."""
    table = wfas_data.load_or_create_split(data_root, output_dir, log=lambda message: None).of_split(split)
    sample = table.select(np.unique(np.linspace(0, len(table) - 1, min(count, len(table))).round().astype(int)))
    dataset = wfas_data.FaceDataset(sample, img_size, face_crop_scale=face_crop_scale)
    items = [item for item in map(dataset.__getitem__, range(len(dataset))) if item["ok"]]
    if not items:
        raise UserError(f"none of the sampled {split} images of {data_root} could be read")
    return torch.stack([item["image"] for item in items]), np.array([int(item["label"]) for item in items])


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
            images, _ = split_crops(
                output_dir, data_root, "val", img_size=img_size, face_crop_scale=face_crop_scale, count=count
            )
            return images, f"{len(images)} val images of {data_root}"
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
    compute = metadata.get("compute") or challenge.compute_budget(net, metadata["model_name"], img_size)
    crops, source = parity_crops(
        args.output_dir,
        args.data_root or recorded_data_root(args.output_dir),
        img_size=img_size,
        face_crop_scale=face_crop_scale,
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
        "operating_points": json.dumps(run_operating_points(args)),
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
    int8 = {}
    if args.int8:
        data_root = args.data_root or recorded_data_root(args.output_dir)
        int8 = export_int8(
            args,
            onnx_path,
            fp32_session=session,
            data_root=data_root,
            img_size=img_size,
            face_crop_scale=face_crop_scale,
            threshold=threshold,
            batch_size=batch_size,
        )
    return {
        **int8,
        "onnx_path": str(onnx_path),
        "max_abs_diff": largest,
        "parity_images": len(crops),
        "parity_source": source,
        "torch_images_per_second": torch_speed,
        "onnx_images_per_second": onnx_speed,
        **deployment,
    }


def export_int8(args, onnx_path, fp32_session, data_root, img_size, face_crop_scale, threshold, batch_size):
    """<name>_int8.onnx: onnxruntime's static quantization of the fp32 export, calibrated on val face crops; kept
    only when its val and test ACER at the run's threshold stay within --int8_acer_tolerance of fp32's."""
    import onnx
    import onnxruntime
    from onnxruntime import quantization

    if not data_root or not (Path(args.output_dir) / "split.csv").is_file():
        raise UserError("--int8 calibrates on the experiment's val images: it needs EXP/split.csv and its data root")
    calibration, _ = split_crops(
        args.output_dir,
        data_root,
        "val",
        img_size=img_size,
        face_crop_scale=face_crop_scale,
        count=args.calibration_images,
    )

    class Calibration(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration.split(batch_size))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"face_crops": batch.numpy()}

    int8_path = onnx_path.with_name(f"{onnx_path.stem}_int8.onnx")
    tmp = aside(int8_path)
    prepared = aside(onnx_path.with_name(f"{onnx_path.stem}_prepared.onnx"))
    logger.info(f"Quantizing {onnx_path} to INT8, calibrated on {len(calibration)} val face crops")
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantizer warns once per LayerNorm weight that it keeps per tensor
    try:
        quantization.quant_pre_process(str(onnx_path), str(prepared))
        quantization.quantize_static(
            str(prepared),
            str(tmp),
            Calibration(),
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=True,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
        )
    finally:
        quiet.setLevel(level)
        prepared.unlink(missing_ok=True)
    model = onnx.load(tmp)
    props = {prop.key: prop.value for prop in onnx.load(onnx_path).metadata_props}
    props["quantization"] = (
        f"INT8, onnxruntime {onnxruntime.__version__} static quantization (QDQ, per-channel int8 weights, uint8 "
        f"activations), calibrated on {len(calibration)} val face crops"
    )
    onnx.helper.set_model_props(model, props)
    onnx.save(model, tmp)
    int8_session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])

    rows = {}
    for split in ("val", "test"):
        crops, labels = split_crops(
            args.output_dir,
            data_root,
            split,
            img_size=img_size,
            face_crop_scale=face_crop_scale,
            count=args.int8_eval_images,
        )
        for name, session in (("fp32", fp32_session), ("int8", int8_session)):
            batches = list(crops.split(batch_size))
            session.run(None, {"face_crops": batches[0].numpy()})  # warm-up
            start = time.perf_counter()
            scores = np.concatenate([session.run(None, {"face_crops": batch.numpy()})[0] for batch in batches])
            seconds = time.perf_counter() - start
            errors = evaluation.compute_error_rates(scores, labels, threshold)
            acer = (errors["apcer"] + errors["bpcer"]) / 2
            rows.setdefault(name, {})[split] = {"scores": scores, "acer": acer, "seconds": seconds}
    images = sum(len(rows["fp32"][split]["scores"]) for split in ("val", "test"))
    largest = max(
        float(np.abs(rows["int8"][split]["scores"] - rows["fp32"][split]["scores"]).max()) for split in ("val", "test")
    )
    speed = {name: images / sum(rows[name][split]["seconds"] for split in ("val", "test")) for name in rows}
    logger.info(
        f"INT8 against fp32 at threshold {threshold:.4f}, on {len(rows['fp32']['val']['scores'])} val and "
        f"{len(rows['fp32']['test']['scores'])} test images:\n"
        f"       val ACER  test ACER  img/s on this CPU ({torch.get_num_threads()} threads, batches of {batch_size})\n"
        + "\n".join(
            f"  {name:<5}  {rows[name]['val']['acer']:8.4f}  {rows[name]['test']['acer']:9.4f}  {speed[name]:8.0f}"
            for name in ("fp32", "int8")
        )
        + f"\n  largest |P(live) difference| {largest:.4f}; INT8 {speed['int8'] / speed['fp32']:.2f}x fp32's speed"
    )
    moved = max(abs(rows["int8"][split]["acer"] - rows["fp32"][split]["acer"]) for split in ("val", "test"))
    if not moved <= args.int8_acer_tolerance:
        tmp.unlink()
        raise UserError(
            f"the INT8 model moves the ACER by {moved:.4f}, over --int8_acer_tolerance {args.int8_acer_tolerance:g}; "
            f"{int8_path} was not written (calibrate on more images with --calibration_images, or accept more)"
        )
    os.replace(tmp, int8_path)
    logger.info(f"Wrote {int8_path}")
    return {
        "int8_path": str(int8_path),
        "int8_max_abs_diff": largest,
        "int8_acer": {name: {split: rows[name][split]["acer"] for split in ("val", "test")} for name in rows},
        "int8_images_per_second": speed["int8"],
        "fp32_images_per_second": speed["fp32"],
    }


def run_operating_points(args):
    """The operating points of EXP's run (thresholds fitted on val for BPCER and APCER targets) when the export is
    of EXP's own best student, else none: tools/serve.py offers them by name."""
    results = Path(args.output_dir) / "final_results.json"
    if args.checkpoint is not None or args.stage != 2 or not results.is_file():
        return []
    return json.loads(results.read_text()).get("operating_points", [])


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
