"""Images per second of each stage's real training loop beside a bare timm loop on the same model, batch and
uint8 input, and their ratio (target: the project at most 1.05x the bare loop's time per image).

  project    train_stage1.py / train_stage2.py themselves (main(), in this process), read from the per-epoch
             images_per_second of their summary.csv: the loader (face cache, workers, the script's
             train_transform), to_model_input with colour jitter, the loss (stage 2: focal + triplet + KD from
             the soft labels), accumulation, clipping, the scheduler, the progress and signal bookkeeping
  bare       the loop one writes from timm's docs: the same DataLoader over the same dataset, normalisation,
             cross-entropy, backward, AdamW step, on the device the project trains on (a GPU, else the CPU)

Both sides run the same epochs, interleaved, and the first epoch of each run (worker start, allocator warm-up) is
left out; the figure is the median over the rest.

With --recipe it times instead the recipe's own models (convnext_base, maxvit_base_tf_224 at 224) on this device
(a GPU, else the CPU): the bare step on device-resident uint8 batches in fp32 (no TF32) and bf16, NCHW and
channels_last, batch 32 and the largest power of two that fits, eager and torch.compile; img/s, the MFU against
the device's peak for that precision (FLOPs counted, 3 x forward), the first step's time and the peak memory.
benchmarks/gpu_check.sh runs it first.

With --timm_train PATH (train.py of a clone of github.com/huggingface/pytorch-image-models; timm's wheel does not
ship it) stage 1 is also timed against timm's own training script: the same split's face crops, byte-identical
(the JPEGs of the face cache, written out as an ImageFolder), the same augmentation (crop scale 0.8-1, ratio
0.9-1.1, flip, colour jitter 0.1: timm's in the loader, the project's on the device), cross-entropy, AdamW and
clipping; its img/s is the batch size over the mean update time of each epoch's last log line.

    python benchmarks/benchmark_train.py [--runs 3] [--epochs 4] [--subjects 150] [--batch_size 32]
        [--timm_train pytorch-image-models/train.py]
"""

import argparse
import csv
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_stage1  # noqa: E402
import train_stage2  # noqa: E402
import wfas_data  # noqa: E402
from tools import make_demo  # noqa: E402
import face_cache  # noqa: E402
import challenge  # noqa: E402
import networks  # noqa: E402

STAGES = {1: ("convnext_atto", train_stage1), 2: ("maxvit_rmlp_pico_rw_256", train_stage2)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs of each side")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is left out)")
    parser.add_argument("--subjects", type=int, default=150, help="demo data size (tools/make_demo.py)")
    parser.add_argument("--img_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--recipe", action="store_true", help="only the recipe models' table on this device (benchmarks/gpu_check.sh)"
    )
    parser.add_argument("--recipe_models", nargs="+", default=["convnext_base", "maxvit_base_tf_224"])
    parser.add_argument("--recipe_max_batch", type=int, default=512, help="the largest batch the table tries")
    parser.add_argument("--recipe_steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--timm_train", help="timm's train.py (a pytorch-image-models clone): stage 1 against it too")
    return parser.parse_args(argv)


def script_speed(stage, args, root, exp):
    model_name, script = STAGES[stage]
    flags = [
        "--output_dir",
        str(exp),
        "--model_name",
        model_name,
        "--no-pretrained",
        "--img_size",
        str(args.img_size),
        "--num_epochs",
        str(args.epochs),
        "--batch_size",
        str(args.batch_size),
        "--num_workers",
        str(args.num_workers),
        "--learning_rate",
        "1e-3",
    ]
    script.main((["--data_root", str(root)] if stage == 1 else []) + flags)
    with open(exp / "logs" / f"stage{stage}" / "summary.csv") as f:
        return statistics.median(float(r["images_per_second"]) for r in list(csv.DictReader(f))[1:])


def bare_speed(stage, args, root, exp):
    """The same dataset and DataLoader as the script's, and the textbook step."""
    model_name, script = STAGES[stage]
    table = wfas_data.load_or_create_split(root, exp, log=lambda _: None)
    cache = face_cache.build_face_cache(table, exp / "face_cache", args.img_size, workers=0, log=lambda _: None)
    dataset = wfas_data.build_datasets(table, args.img_size, script.train_transform(args.img_size), cache=cache)
    loader = torch.utils.data.DataLoader(
        dataset["train"],
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
        persistent_workers=args.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    model = (
        timm.create_model(model_name, num_classes=2, img_size=args.img_size)
        if stage == 2
        else timm.create_model(model_name, num_classes=2)
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the project trains too
    model.to(device)
    config = timm.data.resolve_data_config({}, model=model)
    mean = torch.tensor(config["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(config["std"], device=device).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    speeds = []
    for _ in range(args.epochs):
        start = time.time()
        images = 0
        for batch in loader:
            uint8_images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            x = (uint8_images.float() / 255 - mean) / std
            loss = F.cross_entropy(model(x), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            images += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        speeds.append(images / (time.time() - start))
    return statistics.median(speeds[1:])


# timm's train.py synchronises CUDA after every validation batch, whatever the device: off CUDA that is a no-op
TIMM_TRAIN_OFF_CUDA = """import runpy, sys, torch
if not torch.cuda.is_available():
    torch.cuda.synchronize = lambda *args, **kwargs: None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")"""


def timm_train_speed(args, root, exp):
    """timm's own train.py on the byte-identical face crops of the project's split and cache, as an ImageFolder."""
    table = wfas_data.load_or_create_split(root, exp, log=lambda _: None)
    cache = face_cache.build_face_cache(table, exp / "face_cache", args.img_size, workers=0, log=lambda _: None)
    folder = exp / "image_folder"
    shards = [np.memmap(f, dtype=np.uint8, mode="r") for f in cache.shard_files]
    for row in range(len(table)):
        split = {"train": "train", "val": "validation"}.get(wfas_data.SPLITS[table.split[row]])
        if split:
            jpeg = shards[cache.shard_of[row]][cache.start[row] : cache.start[row] + cache.length[row]]
            target = folder / split / ("live" if table.label[row] == wfas_data.LIVE else "spoof") / f"{row}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(jpeg.tobytes())
    (exp / "device.yaml").write_text(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}\n")
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            TIMM_TRAIN_OFF_CUDA,
            args.timm_train,
            "--config",
            str(exp / "device.yaml"),
            "--data-dir",
            str(folder),
            "--model",
            STAGES[1][0],
            "--num-classes",
            "2",
            "--img-size",
            str(args.img_size),
            "-b",
            str(args.batch_size),
            "--workers",
            str(args.num_workers),
            "--epochs",
            str(args.epochs),
            "--opt",
            "adamw",
            "--lr",
            "1e-3",
            "--weight-decay",
            "0.05",
            "--clip-grad",
            "5",
            "--sched",
            "cosine",
            "--warmup-epochs",
            "0",
            "--smoothing",
            "0",
            "--scale",
            "0.8",
            "1.0",
            "--ratio",
            "0.9",
            "1.1",
            "--hflip",
            "0.5",
            "--color-jitter",
            "0.1",
            "--train-interpolation",
            "bilinear",
            "--log-interval",
            "1",
            "--output",
            str(exp / "timm_output"),
        ],
        capture_output=True,
        text=True,
    )
    if run.returncode:
        sys.exit(f"timm's train.py failed:\n{run.stderr[-3000:]}")
    last_line_of_epoch = {}
    for epoch, mean_update in re.findall(r"Train: (\d+) \[.*?\((\d+\.\d+)s,", run.stdout + run.stderr):
        last_line_of_epoch[int(epoch)] = float(mean_update)
    speeds = [args.batch_size / last_line_of_epoch[epoch] for epoch in sorted(last_line_of_epoch)]
    return statistics.median(speeds[1:])


# Dense peaks of an H100 / H200 SXM (TFLOP/s), for the MFU: bf16 on the tensor cores, fp32 without TF32.
PEAK_TFLOPS = {"bf16": 989.0, "fp32": 67.0}


def timed_steps(model, batch, labels, precision, channels_last, steps):
    """(img/s, seconds of the first step: with torch.compile, the compile) of forward, backward and a fused AdamW
    step on device-resident uint8 batches normalised on the device, as the stages feed the model."""
    device = batch.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        x = batch.float() / 255
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()
    synchronize()
    first_step = time.perf_counter() - start
    for _ in range(3):
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return steps * len(batch) / (time.perf_counter() - start), first_step


def recipe_table(args):
    """The recipe's models at their input size on one device, in the step the stages run: fp32 and bf16, NCHW
    and channels_last, batch 32 and the largest power of two that fits, eager and torch.compile. For each: img/s,
    the MFU against the device's peak for that precision (FLOPs counted: 3 x forward), the first step's time
    (the compile) and the peak memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are fp32, not TF32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"Recipe models on {name} ({device}), torch {torch.__version__}, timm {timm.__version__}")
    print("| model | precision | layout | batch | compile | img/s | MFU | first step s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")

    for model_name in args.recipe_models:
        net = timm.create_model(model_name, num_classes=2)
        img_size = networks.model_input(net)[0]
        flops_per_image = 3 * challenge.compute_budget(net, model_name, img_size)["gflops"] * 1e9
        del net

        def run(precision, channels_last, batch_size, compiled):
            torch.manual_seed(0)
            model = timm.create_model(model_name, num_classes=2).to(device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            shape = (batch_size, 3, img_size, img_size)
            batch = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
            labels = torch.randint(0, 2, (batch_size,), device=device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step_model = torch.compile(model) if compiled else model
            rate, first_step = timed_steps(
                step_model,
                batch,
                labels,
                precision=precision,
                channels_last=channels_last,
                steps=args.recipe_steps,
            )
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            mfu = rate * flops_per_image / (PEAK_TFLOPS[precision] * 1e12)
            layout = "channels_last" if channels_last else "NCHW"
            print(
                f"| {model_name} | {precision} | {layout} | {batch_size} | {'yes' if compiled else 'no'} | "
                f"{rate:.0f} | {mfu:.1%} | {first_step:.1f} | {peak:.1f} |",
                flush=True,
            )
            del model, step_model, batch
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return rate

        # the largest power of two that fits, from the top down: each size tried costs a first step of cuDNN's
        # autotuning (15-25 s on an H200), so the search tries as few as it can
        eager = {}
        largest = args.recipe_max_batch
        while (False, largest) not in eager:
            try:
                eager[False, largest] = run("bf16", channels_last=False, batch_size=largest, compiled=False)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if largest <= 32:
                    raise
                largest //= 2
        run("fp32", channels_last=False, batch_size=32, compiled=False)
        for channels_last in (False, True):
            for batch_size in sorted({32, largest}):
                if (channels_last, batch_size) not in eager:
                    eager[channels_last, batch_size] = run(
                        "bf16", channels_last=channels_last, batch_size=batch_size, compiled=False
                    )
        best_layout = max((False, True), key=lambda layout: eager[layout, largest])
        run(
            "bf16", channels_last=best_layout, batch_size=largest, compiled=True
        )  # a compile takes minutes: the fastest eager setting only


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.recipe:
        recipe_table(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "WFAS"
        make_demo.make_demo(root, subjects=args.subjects, seed=0)
        for stage in args.stages:
            model_name, _ = STAGES[stage]
            project = []
            bare = []
            timm_script = []
            for run in range(args.runs):
                exp = Path(tmp) / f"stage1_for_soft_labels_{run}"
                if stage == 2:  # the student needs a split and soft labels: a short stage 1 first
                    train_stage1.main(
                        [
                            "--data_root",
                            str(root),
                            "--output_dir",
                            str(exp),
                            "--model_name",
                            "test_convnext",
                            "--no-pretrained",
                            "--img_size",
                            str(args.img_size),
                            "--num_epochs",
                            "1",
                            "--num_workers",
                            "0",
                        ]
                    )
                else:
                    exp = Path(tmp) / f"stage1_{run}"
                project.append(script_speed(stage, args, root=root, exp=exp))
                bare.append(bare_speed(stage, args, root=root, exp=Path(tmp) / f"bare{stage}_{run}"))
                if stage == 1 and args.timm_train:
                    timm_script.append(timm_train_speed(args, root, exp))
            print(
                f"stage {stage} ({model_name} at {args.img_size} px, batch {args.batch_size}, "
                f"{args.num_workers} loader worker(s), {torch.get_num_threads()} threads): project "
                f"{statistics.median(project):.0f} img/s {[round(p) for p in project]}, bare timm loop "
                f"{statistics.median(bare):.0f} img/s {[round(b) for b in bare]}; time per image "
                f"{statistics.median(bare) / statistics.median(project):.3f}x the bare loop's"
            )
            if timm_script:
                print(
                    f"stage 1 against timm's train.py on the same face crops: project "
                    f"{statistics.median(project):.0f} img/s, timm train.py {statistics.median(timm_script):.0f} "
                    f"img/s {[round(t) for t in timm_script]}: the project at "
                    f"{statistics.median(project) / statistics.median(timm_script):.3f}x timm's speed"
                )


if __name__ == "__main__":
    main()
