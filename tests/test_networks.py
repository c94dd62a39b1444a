"""networks.py: building a model from timm with local or cached weights."""

import shutil

import timm
import torch
from safetensors.torch import save_file

import networks
import train_stage1


def test_pretrained_weights_load_from_a_local_file_and_from_the_cache(tmp_path):
    source = timm.create_model("convnext_atto", pretrained=False)  # an "ImageNet" model, 1000 classes
    save_file(source.state_dict(), tmp_path / "weights.safetensors")
    args = train_stage1.parse_args(
        [
            "--data_root",
            "x",
            "--model_name",
            "convnext_atto",
            "--pretrained_file",
            str(tmp_path / "weights.safetensors"),
            "--output_dir",
            str(tmp_path),
        ]
    )
    model = networks.create_model(args.model_name, pretrained=True, pretrained_file=args.pretrained_file)
    assert torch.equal(model.stem[0].weight, source.stem[0].weight)
    assert model.get_classifier().out_features == 2

    # a fetched copy in the cache is reused without any network
    cache = tmp_path / "EXP" / "model" / "stage1" / "convnext_atto"
    cache.mkdir(parents=True)
    shutil.copy(tmp_path / "weights.safetensors", cache / "convnext_atto.safetensors")
    args = train_stage1.parse_args(
        ["--data_root", "x", "--model_name", "convnext_atto", "--output_dir", str(tmp_path / "EXP")]
    )
    assert args.model_cache_dir == str(cache)
    model = networks.create_model(args.model_name, pretrained=True, cache_dir=args.model_cache_dir)
    assert torch.equal(model.stem[0].weight, source.stem[0].weight)
