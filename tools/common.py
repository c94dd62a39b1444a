"""What the tools share: the challenge lists, picking and loading a trained checkpoint, logging, and scoring a
table of unlabelled images."""
import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import wfas_data  # noqa: E402
from tools import models  # noqa: E402
from wfas_data import UserError  # noqa: E402

RESULTS = {1: "stage1_results.json", 2: "final_results.json"}


def find_prediction_lists(root):
    """The unlabelled challenge lists shipped next to Train/: Dev/Dev.txt, Test/Test.txt."""
    return [root / name / f"{name}.txt" for name in ("Dev", "Test") if (root / name / f"{name}.txt").is_file()]


def read_prediction_list(list_file):
    """Read an unlabelled challenge list (Dev.txt / Test.txt): the first token of each line names an image
    in the list's folder or its data/ subfolder. Returns (image folder, names in list order)."""
    list_file = Path(list_file).expanduser()
    if not list_file.is_file():
        raise UserError(f"list file {list_file} does not exist; expected e.g. WFAS/Dev/Dev.txt")
    names = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    if not names:
        raise UserError(f"list file {list_file} is empty")
    # entries may also carry the set folder (dev/000001.jpg), relative to the list's parent
    folders = (list_file.parent / "data", list_file.parent, list_file.parent.parent)
    for folder in folders:
        if (folder / names[0]).is_file():
            return folder, names
    raise UserError(f"cannot find {names[0]} (first entry of {list_file}) in "
                    f"{', '.join(str(f) for f in folders)}")


def checkpoint_parser(description):
    """A tool's parser with the flags that pick a trained checkpoint: --output_dir, --stage, --checkpoint."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="output", help="the experiment folder (default: output)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2, help="whose best checkpoint (default: 2)")
    parser.add_argument("--checkpoint", help="a .safetensors written by either stage (default: EXP/checkpoints/"
                                             "stageN/stageN_best.safetensors)")
    return parser


def setup_logging():
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)], force=True)
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def best_checkpoint(output_dir, stage):
    return Path(output_dir) / "checkpoints" / f"stage{stage}" / f"stage{stage}_best.safetensors"


def load_checkpoint(checkpoint, output_dir, stage=2):
    """The timm model of a checkpoint written by either training script (default: EXP's best of `stage`), on
    the CPU in eval mode, with its metadata (JSON values decoded) and its path."""
    checkpoint = Path(checkpoint or best_checkpoint(output_dir, stage))
    if not checkpoint.is_file():
        raise UserError(f"no checkpoint at {checkpoint}; train stage {stage} first or pass --checkpoint PATH")
    try:
        with safe_open(checkpoint, framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise UserError(f"cannot read {checkpoint}: {str(error).splitlines()[0]}") from None
    if "model_name" not in raw or "img_size" not in raw:
        raise UserError(f"{checkpoint} has no model_name/img_size metadata: it was not written by "
                        "train_stage1.py or train_stage2.py")
    metadata = {}
    for key, value in raw.items():
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:  # plain strings, such as the model name
            metadata[key] = value
    net = models.create_model(metadata["model_name"], int(metadata["img_size"]))
    try:
        net.load_state_dict(load_file(checkpoint))
    except RuntimeError as error:
        raise UserError(f"{checkpoint} does not fit {metadata['model_name']}: {str(error).splitlines()[0]}") from None
    return net.eval(), metadata, checkpoint


def normalisation(net):
    config = timm.data.resolve_data_config({}, model=net)
    return config["mean"], config["std"]


def score_table(model, accelerator, table, img_size, face_crop_scale, batch_size, num_workers, tta, cache=None,
                desc="scoring", log_warning=print):
    """P(live) of every image of an unlabelled table, in table order, each image scored once whatever the
    number of processes; NaN where an image cannot be decoded."""
    dataset = wfas_data.FaceDataset(table, img_size, face_crop_scale=face_crop_scale, cache=cache)
    loader = accelerator.prepare(torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                                             **wfas_data.default_loader_settings(num_workers)))
    mean, std = normalisation(accelerator.unwrap_model(model))
    probs, indices, ok = wfas_data.predict_probs(model, loader, accelerator, mean, std, tta, desc, log_warning)
    scores = np.full(len(table), np.nan)
    scores[indices[ok]] = probs[ok, 1]
    return scores
