"""Shared fixtures: one small generated dataset and one tiny run of each stage, reused across tests. Nothing heavy
is imported here: a test module imports what it tests.

Two tiers: `pytest -m "not slow"` runs the unit tests (no training beyond a few steps, no subprocesses, no
notebooks); `pytest` runs them all, as CI does. A test that trains, launches a process or runs a notebook is
marked slow (pytestmark in its module, or @pytest.mark.slow)."""

import csv
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


TINY_STAGE1 = [
    "--model_name",
    "convnext_atto",
    "--no-pretrained",
    "--img_size",
    "64",
    "--num_epochs",
    "1",
    "--batch_size",
    "8",
    "--num_workers",
    "0",
    "--learning_rate",
    "1e-3",
]
TINY_STAGE2 = [
    "--model_name",
    "maxvit_rmlp_pico_rw_256",
    "--no-pretrained",
    "--img_size",
    "64",
    "--num_epochs",
    "1",
    "--batch_size",
    "8",
    "--num_workers",
    "0",
    "--learning_rate",
    "1e-3",
]
# timm's test_convnext (0.2 M parameters) at 64 px: a whole run of a stage in about two seconds, for the fast tier's
# end-to-end contracts (the files and numbers a run writes); the recipe's own small models train in the slow tier.
# Without the face cache, whose JPEG crops differ slightly from the photo's: the tests score the photos themselves
# (tests/test_face_cache.py holds the cache to the photos' scores).
QUICK_STAGE = ["--no-face_cache", "--model_name", "test_convnext", *TINY_STAGE1[2:]]


def pytest_configure(config):
    """Under pytest-xdist (.ci/run: -n 2) each worker, and the processes it starts, computes on one thread: two
    workers of two threads each on two cores would fight for them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(items):
    """A test on a quick end-to-end run is marked end_to_end: in the fast tier, but not among the tests each mutant
    of a mutation run is tried against (pyproject.toml, [tool.mutmut]), where its run would dominate the time."""
    for item in items:
        if {"quick_stage1_run", "quick_stage2_run"} & set(item.fixturenames):
            item.add_marker(pytest.mark.end_to_end)


def require(missing, install):
    """A test's system package or optional extra: where it is missing, the test is skipped with what to install,
    and under CI=true (.ci/run) it fails in that one line, so that CI never passes without running it."""
    if not missing:
        return
    message = f"missing {', '.join(missing)}: {install}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_modules(names, install):
    require([name for name in names if importlib.util.find_spec(name) is None], install)


def require_programs(names, install):
    require([name for name in names if shutil.which(name) is None], install)


def run_script(args, env=None, timeout=600):
    """Run a command from the repository root; returns the CompletedProcess (text, both streams)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def split_paths(exp, name):
    """The paths of one split of EXP/split.csv, in file order."""
    with open(exp / "split.csv") as f:
        return [row["path"] for row in csv.DictReader(f) if row["split"] == name]


def free_port():
    """A TCP port nobody listens on now. Another process may take it before the caller binds it: callers that
    cannot bind port 0 themselves try again on a taken port (launch_two_processes, the SLURM fixture)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_process_command(script, args):
    """Two real gloo processes on CPU (accelerate launch --cpu would silently run one); needs
    ACCELERATE_USE_CPU=1 in the environment."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(REPO / script),
        *args,
    ]


def launch_two_processes(script, args, timeout=600):
    """Two gloo processes of a script. Its rendezvous port is free when chosen and bound by the launcher a moment
    later: where another process took it in between (torch says EADDRINUSE), the launch is tried on a new port."""
    for _ in range(3):
        result = run_script(two_process_command(script, args), env={"ACCELERATE_USE_CPU": "1"}, timeout=timeout)
        if "EADDRINUSE" not in result.stderr:
            break
    return result


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    from tools import make_demo

    root = tmp_path_factory.mktemp("demo") / "WFAS"
    make_demo.make_demo(root, subjects=12, seed=1, unlabelled=6)
    return root


def train_stage1_on(demo_root, exp, flags):
    import train_stage1

    return exp, train_stage1.main(["--data_root", str(demo_root), "--output_dir", str(exp), *flags])


def train_stage2_and_submit(stage1_exp, demo_root, exp, flags, predict_flags=()):
    """A copy of a stage 1 experiment, then stage 2 on it, then its submission from the Dev/Test lists."""
    import train_stage2
    from tools import predict

    shutil.copytree(stage1_exp, exp)
    results = train_stage2.main(["--output_dir", str(exp), *flags])
    lists = [str(demo_root / "Dev" / "Dev.txt"), str(demo_root / "Test" / "Test.txt")]
    submission = ["--output_dir", str(exp), "--num_workers", "0", *predict_flags, "--predict_lists", *lists]
    results.update(predict.main(submission))
    return exp, results


@pytest.fixture(scope="session")
def stage1_run(demo_root, tmp_path_factory):
    return train_stage1_on(demo_root, tmp_path_factory.mktemp("exp") / "EXP", TINY_STAGE1)


@pytest.fixture(scope="session")
def stage2_run(stage1_run, demo_root, tmp_path_factory):
    return train_stage2_and_submit(stage1_run[0], demo_root, tmp_path_factory.mktemp("exp2") / "EXP", TINY_STAGE2)


@pytest.fixture(scope="session")
def quick_stage1_run(demo_root, tmp_path_factory):
    """Stage 1 with timm's test_convnext: the fast tier's end-to-end run. Read it, never write into it."""
    return train_stage1_on(demo_root, tmp_path_factory.mktemp("quick1") / "EXP", QUICK_STAGE)


@pytest.fixture(scope="session")
def quick_stage2_run(quick_stage1_run, demo_root, tmp_path_factory):
    """Stage 2 with test_convnext on a copy of quick_stage1_run, then its submission of the Dev and Test lists."""
    exp = tmp_path_factory.mktemp("quick2") / "EXP"
    return train_stage2_and_submit(quick_stage1_run[0], demo_root, exp, QUICK_STAGE, ["--no-face_cache"])


def saved_model_probabilities(checkpoint, table):
    """[P(spoof), P(live)] of each image of a table by a saved best checkpoint, computed here: the plain timm model
    from its file, each eval crop normalised by hand, one image at a time, in float64."""
    import timm
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    import wfas_data

    with safe_open(checkpoint, framework="pt") as f:
        metadata = f.metadata()
    net = timm.create_model(metadata["model_name"], num_classes=2)
    net.load_state_dict(load_file(checkpoint))
    net = net.double().eval()
    mean = torch.tensor(net.pretrained_cfg["mean"], dtype=torch.float64)[:, None, None]
    std = torch.tensor(net.pretrained_cfg["std"], dtype=torch.float64)[:, None, None]
    dataset = wfas_data.FaceDataset(
        table, int(metadata["img_size"]), face_crop_scale=float(metadata["face_crop_scale"])
    )
    probabilities = []
    with torch.no_grad():
        for i in range(len(dataset)):
            image = (dataset[i]["image"].double() / 255 - mean) / std
            probabilities.append(torch.softmax(net(image[None])[0], dim=0))
    return torch.stack(probabilities).numpy()


def metrics_by_loop(scores, labels, attack_types, threshold, unseen=()):
    """APCER, BPCER, ACER, ACC and the APCER of each attack type at a threshold, one image at a time (live = 1,
    taken for live when score >= threshold): the tests' reference for every reported metric."""
    spoof_seen = {}
    spoof_accepted = {}
    live = 0
    live_rejected = 0
    right = 0
    for score, label, attack in zip(scores, labels, attack_types):
        taken_for_live = score >= threshold
        right += int(taken_for_live == (label == 1))
        if label == 1:
            live += 1
            live_rejected += int(not taken_for_live)
        else:
            spoof_seen[attack] = spoof_seen.get(attack, 0) + 1
            spoof_accepted[attack] = spoof_accepted.get(attack, 0) + int(taken_for_live)
    apcer = sum(spoof_accepted.values()) / sum(spoof_seen.values())
    bpcer = live_rejected / live
    per_attack = {attack: spoof_accepted[attack] / spoof_seen[attack] for attack in spoof_seen}
    result = {
        "acc": right / len(labels),
        "apcer": apcer,
        "bpcer": bpcer,
        "acer": (apcer + bpcer) / 2,
        "apcer_per_attack": per_attack,
        "worst_apcer": max(per_attack.values()),
    }
    for name, wanted in (("seen", False), ("unseen", True)):
        attacks = [a for a in spoof_seen if (a in unseen) == wanted]
        if unseen and attacks:
            rate = sum(spoof_accepted[a] for a in attacks) / sum(spoof_seen[a] for a in attacks)
            result[f"{name}_apcer"] = rate
            result[f"{name}_acer"] = (rate + bpcer) / 2
    return result


def eer_pair_by_scikit_learn(scores, labels):
    """The (APCER, BPCER) of the EER point: of every pair a threshold can give (scikit-learn's ROC, live the
    positive class), the one with the smallest |APCER - BPCER|, then the smallest sum."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores, pos_label=1, drop_intermediate=False)
    return min(zip(fpr, 1 - tpr), key=lambda pair: (abs(pair[0] - pair[1]), pair[0] + pair[1]))
