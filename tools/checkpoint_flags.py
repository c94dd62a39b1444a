"""The flags with which a tool picks a trained checkpoint (tools/predict.py, tools/export_onnx.py)."""

import argparse


def checkpoint_parser(description):
    """A tool's parser with the flags that pick a trained checkpoint: --output_dir, --stage, --checkpoint."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="output", help="the experiment folder (default: output)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2, help="whose best checkpoint (default: 2)")
    parser.add_argument(
        "--checkpoint",
        help="a .safetensors written by either stage (default: EXP/checkpoints/stageN/stageN_best.safetensors)",
    )
    return parser
