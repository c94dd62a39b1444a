"""Where timm models stand against the WFAS challenge's single-model limit of 5 GFLOPs, and what an ONNX export
of one costs on this CPU.

    python benchmarks/benchmark_deployment.py budget [MODEL[@SIZE] ...]     # a markdown table
    python benchmarks/benchmark_deployment.py export maxvit_base_tf_224 [--img_size 224] [--onnx_tolerance 1e-4]

budget: parameters, GMACs and GFLOPs (2 x MACs) of one image's forward pass, counted by
challenge.compute_budget (torch's FLOP counter), for the recipe's models and smaller ones of the same families.

export: a randomly initialised checkpoint of the model, written as train_stage2.py writes its best one, goes
through `tools/export_onnx.py` (export, metadata, onnxruntime parity on 64 generated crops, img/s of
both). Random weights change neither the graph nor the speed, but they can make a deep model numerically chaotic:
the floor of any fp32 parity check is printed first, the largest difference between the PyTorch model's own fp32
and fp64 P(live) on 8 generated crops. Parity on trained weights is checked on val images by every real export."""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import wfas_data  # noqa: E402
import challenge  # noqa: E402
import networks  # noqa: E402

DEFAULT_MODELS = [
    "convnext_base",
    "maxvit_base_tf_224",  # the recipe's teacher and student
    "convnext_tiny",
    "convnext_nano",
    "convnext_pico",
    "convnext_femto",
    "convnext_atto",
    "maxvit_tiny_tf_224",
    "maxvit_nano_rw_256",
    "maxvit_rmlp_nano_rw_256",
    "maxvit_pico_rw_256",
    "maxvit_rmlp_pico_rw_256",
    "maxvit_nano_rw_256@224",
    "convnext_tiny@160",
    "convnext_base@112",
]


def budget(specs):
    print("| model | input | params (M) | GMACs | GFLOPs | within 5 GFLOPs |")
    print("|---|---|---|---|---|---|")
    for spec in specs:
        model_name, _, size = spec.partition("@")
        net = networks.create_model(model_name, int(size) if size else None)
        img_size = int(size) if size else net.pretrained_cfg["input_size"][-1]
        b = challenge.compute_budget(net, model_name, img_size)
        print(
            f"| {model_name} | {img_size} | {b['params_m']:.1f} | {b['gmacs']:.2f} | {b['gflops']:.2f} | "
            f"{b['within_challenge_limit']} |",
            flush=True,
        )


def export(model_name, img_size, tolerance):
    torch.manual_seed(0)
    net = networks.create_model(model_name, img_size).eval()
    img_size = img_size or net.pretrained_cfg["input_size"][-1]
    crops = torch.randint(0, 256, (8, 3, img_size, img_size), dtype=torch.uint8)
    config = timm.data.resolve_data_config({}, model=net)
    with torch.no_grad():
        fp32 = net(wfas_data.to_model_input(crops, config["mean"], config["std"])).softmax(-1)[:, 1]
        fp64 = net.double()(wfas_data.to_model_input(crops, config["mean"], config["std"]).double()).softmax(-1)[:, 1]
    net.float()
    print(
        f"{model_name} at {img_size}, random weights: PyTorch fp32 vs fp64 P(live) differ by up to "
        f"{(fp32 - fp64).abs().max().item():.1e}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "stage2_best.safetensors"
        metadata = {
            "model_name": model_name,
            "img_size": str(img_size),
            "face_crop_scale": "1.5",
            "val_metrics": json.dumps({"threshold": 0.5}),
        }
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, checkpoint, metadata=metadata)
        start = time.perf_counter()
        result = subprocess.run(
            [
                sys.executable,
                str(REPO / "tools" / "export_onnx.py"),
                "--checkpoint",
                str(checkpoint),
                "--output_dir",
                tmp,
                "--onnx_tolerance",
                str(tolerance),
            ],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        print(result.stdout + result.stderr)
        onnx_file = Path(tmp) / "stage2_best.onnx"
        if result.returncode == 0:
            print(
                f"{model_name} at {img_size}: export + parity {seconds:.0f} s, "
                f"{onnx_file.stat().st_size / 2**20:.0f} MiB"
            )
        return result.returncode


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("budget")
    p.add_argument("models", nargs="*", default=DEFAULT_MODELS, help="timm names, with @SIZE for another input size")
    p = commands.add_parser("export")
    p.add_argument("model_name")
    p.add_argument("--img_size", type=int, default=None)
    p.add_argument("--onnx_tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    if args.command == "budget":
        budget(args.models)
        return 0
    return export(args.model_name, args.img_size, args.onnx_tolerance)


if __name__ == "__main__":
    sys.exit(main())
