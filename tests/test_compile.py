"""--compile on the CPU (inductor with the system's C compiler): both stages train and evaluate compiled, with
timm's test models of the recipe's families, and what they save is the plain model's weights."""

import re

import pytest
import timm
from safetensors.torch import load_file

from conftest import TINY_STAGE1, TINY_STAGE2

pytestmark = pytest.mark.slow  # compiling takes a minute or more a stage on two cores


def with_model(flags, model_name):
    flags = list(flags)
    flags[flags.index("--model_name") + 1] = model_name
    return flags


def test_both_stages_train_and_evaluate_compiled(demo_root, tmp_path):
    import train_stage1
    import train_stage2

    exp = tmp_path / "EXP"
    stage1_flags = with_model(TINY_STAGE1, "test_convnext")
    stage1_flags += ["--data_root", str(demo_root), "--num_epochs", "2", "--soft_label_folds", "2", "--compile"]

    teacher = train_stage1.main(["--output_dir", str(exp), *stage1_flags])
    student = train_stage2.main(["--output_dir", str(exp), *with_model(TINY_STAGE2, "test_maxvit"), "--compile"])

    assert 0 <= teacher["test"]["acer"] <= 1 and 0 <= student["test_acer"] <= 1
    logs = {stage: next((exp / "logs" / stage).glob("*.log")).read_text() for stage in ("stage1", "stage2")}
    assert "torch.compile:" in logs["stage1"] and "torch.compile:" in logs["stage2"]
    # one teacher's train and eval graphs (2 each: the full batch, then the last one's), which the second fold
    # teacher and the second epoch reuse; recompiling per fold or epoch would give 8 or more
    graphs = int(re.search(r"torch.compile: (\d+) graphs", logs["stage1"]).group(1))
    assert graphs <= 5, logs["stage1"]
    for net, path in [
        (timm.create_model("test_convnext", num_classes=2), exp / "checkpoints" / "stage1" / "stage1_best.safetensors"),
        (
            timm.create_model("test_maxvit", num_classes=2, img_size=64),
            exp / "checkpoints" / "stage2" / "stage2_best.safetensors",
        ),
    ]:
        weights = load_file(path)
        assert not any(key.startswith("_orig_mod.") for key in weights)
        net.load_state_dict(weights)  # strict: every key, and no other
    latest = load_file(exp / "checkpoints" / "stage2" / "stage2_latest" / "model.safetensors")
    assert not any("_orig_mod." in key for key in latest)  # a compiled run resumes without --compile too
