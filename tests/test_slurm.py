"""slurm/train.sbatch against a real SLURM: slurmctld, slurmd and munged from Debian's slurm-wlm, on localhost,
configured here. The job trains stage 1 of the demo; `scontrol requeue` preempts it in its second epoch; the
requeued job must resume and end with the updates of an uninterrupted run. Skipped where slurm-wlm is not
installed or the test is not root (the daemons need it); run here with -s it prints its figures:

    python -m pytest -s tests/test_slurm.py
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, require, require_programs

pytestmark = pytest.mark.slow

require_programs(["slurmctld", "slurmd", "munged", "sbatch"], "apt-get install slurm-wlm")
# the daemons run as root here, as .ci/run does
require([] if os.geteuid() == 0 else ["root"], "run the SLURM tests as root (they start slurmctld and slurmd)")

SLURM_CONF = """ClusterName=wfastest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge.socket
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MpiDefault=none
NodeName=localhost CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def slurm_command(env, *args):
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=True).stdout


@pytest.fixture()
def slurm():
    """A one-node SLURM on localhost (its own munged, ports and state folder); the environment to reach it."""
    # a short folder: munged's and slurmstepd's Unix sockets live in it, and a socket's path has at most 108 bytes
    # (pytest's tmp_path grows with its run counter: /tmp/pytest-of-root/pytest-1625/popen-gw1/test_... is too long)
    folder = Path(tempfile.mkdtemp(prefix="slurm-"))
    for name in ("state", "spool"):
        (folder / name).mkdir(parents=True)
    conf = folder / "slurm.conf"
    cpus = len(os.sched_getaffinity(0))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    subprocess.run(
        [
            "munged",
            f"--socket={folder}/munge.socket",
            f"--pid-file={folder}/munged.pid",
            f"--log-file={folder}/munged.log",
            f"--seed-file={folder}/munged.seed",
            "--force",
        ],
        check=True,
    )
    # the daemons' ports are free when chosen and bound a moment later: a port taken in between is chosen again
    for _ in range(3):
        conf.write_text(SLURM_CONF.format(dir=folder, ctld_port=free_port(), d_port=free_port(), cpus=cpus))
        subprocess.run(["slurmctld", "-i"], env=env, check=True)
        subprocess.run(["slurmd"], env=env, check=True)
        deadline = time.time() + 60
        while "idle" not in slurm_command(env, "sinfo", "-h", "-o", "%t") and time.time() < deadline:
            time.sleep(1)
        logs = "".join(
            (folder / name).read_text() for name in ("slurmctld.log", "slurmd.log") if (folder / name).is_file()
        )
        if "Address already in use" not in logs:
            break
        stop_daemons(folder, ("slurmd.pid", "slurmctld.pid"))
        for name in ("slurmctld.log", "slurmd.log"):
            (folder / name).unlink(missing_ok=True)
    assert "idle" in slurm_command(env, "sinfo", "-h", "-o", "%t"), (folder / "slurmctld.log").read_text()[-2000:]
    yield env
    # a failed test may leave its job running: end it before the daemons, so that no training outlives the test
    subprocess.run(["scancel", "--partition=debug"], env=env, capture_output=True, timeout=60, check=False)
    stop_daemons(folder, ("slurmd.pid", "slurmctld.pid", "munged.pid"))
    shutil.rmtree(folder, ignore_errors=True)


def stop_daemons(folder, pid_files):
    """SIGTERM to each daemon, then wait until it is gone: they write their state and seed files as they exit."""
    pids = [int((folder / name).read_text().split()[0]) for name in pid_files if (folder / name).is_file()]
    for pid in pids:
        subprocess.run(["kill", str(pid)], check=False)
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.time() < deadline:
        time.sleep(0.2)


def job_state(env, job):
    fields = slurm_command(env, "scontrol", "show", "job", job)
    state = re.search(r"JobState=(\w+)", fields).group(1)
    restarts = int(re.search(r"Restarts=(\d+)", fields).group(1))
    return state, restarts


def wait_for(condition, seconds, what):
    deadline = time.time() + seconds
    while True:
        result = condition()
        if result:
            return result
        assert time.time() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.5)


def submit_stage1(env, script, data, exp, out, stage1_flags, *sbatch_flags):
    """The job id of slurm/script, submitted to train stage 1 of the demo on data into exp, its output in out."""
    submitted = slurm_command(
        env,
        "sbatch",
        "--parsable",
        *sbatch_flags,
        "--gpus-per-node=0",  # the test node has no GPU: the demo runs on its CPUs
        f"--cpus-per-task={len(os.sched_getaffinity(0))}",
        f"--output={out}",
        f"--chdir={REPO}",
        str(REPO / "slurm" / script),
        "--data_root",
        str(data),
        "--output_dir",
        str(exp),
        "--config_stage1",
        str(REPO / "configs" / "demo_stage1.json"),
        "--stage1_only",
        "--stage1_args",
        stage1_flags,
    )
    return submitted.strip().split(";")[0]


def test_a_requeued_job_resumes_and_finishes_its_updates(slurm, tmp_path):
    from tools import make_demo

    data = tmp_path / "data"
    make_demo.make_demo(data, subjects=60, seed=3)
    exp = tmp_path / "exp"
    out = tmp_path / "job.out"
    epochs = 4
    batch = 8
    stage1 = f"--num_epochs {epochs} --batch_size {batch} --num_workers 1"
    job = submit_stage1({**slurm, "PYTHON": sys.executable}, "train.sbatch", data, exp, out, stage1)

    # preempt in the second epoch: the first epoch's line is in the log
    def second_epoch_started():
        logs = list((exp / "logs" / "stage1").glob("stage1_training_*.log"))
        return logs and f"epoch 1/{epochs}" in logs[0].read_text()

    wait_for(second_epoch_started, 300, "first epoch")  # then preempted wherever the second epoch stands
    preempted = time.time()
    slurm_command(slurm, "scontrol", "requeue", job)

    def requeued():
        return job_state(slurm, job) == ("PENDING", 1)

    wait_for(requeued, 120, "requeued job")
    stopped = time.time()
    # a requeued job waits for its BeginTime (minutes); a real cluster starts it when its resources are free
    slurm_command(slurm, "scontrol", "update", f"JobId={job}", "StartTime=now")
    wait_for(lambda: job_state(slurm, job)[0] == "RUNNING", 120, "restart")
    restarted = time.time()
    wait_for(lambda: job_state(slurm, job)[0] in ("COMPLETED", "FAILED", "CANCELLED"), 600, "job's end")
    finished = time.time()

    log = out.read_text()
    assert job_state(slurm, job)[0] == "COMPLETED", log[-3000:]
    stopped_at = int(re.search(r"Stopped by SIGTERM at update (\d+)", log).group(1))
    resumed = re.search(r"Resumed from \S+: epoch 1 of \d+ done(?: and (\d+) batches of the next)?, (\d+) updates", log)
    assert resumed, log[-3000:]
    assert int(resumed.group(2)) == stopped_at  # no update lost
    results = json.loads((exp / "stage1_results.json").read_text())
    updates = results["soft_label_folds"]["folds"][0]["updates"]
    train_images = results["num_train_images"]
    assert updates == epochs * (train_images // batch)  # those of an uninterrupted run
    print(
        f"\nSLURM {slurm_command(slurm, 'sinfo', '-V').strip()}: stopped at update {stopped_at} of {updates} "
        f"({int(resumed.group(1) or 0)} batches into epoch 2), 0 updates lost; requeue to pending "
        f"{stopped - preempted:.1f} s; released to running {restarted - stopped:.1f} s; the rest of the run "
        f"{finished - restarted:.1f} s"
    )


def test_the_multinode_script_meets_at_its_rendezvous(slurm, tmp_path):
    """slurm/train_multinode.sbatch on the one node there is: its srun task, the rendezvous at the first node's
    address and its machine rank, with 2 gloo processes on the CPU."""
    from tools import make_demo

    data = tmp_path / "data"
    make_demo.make_demo(data, subjects=12, seed=3)
    exp = tmp_path / "exp"
    out = tmp_path / "job.out"
    env = {**slurm, "PYTHON": sys.executable, "ACCELERATE_USE_CPU": "1", "PROCESSES_PER_NODE": "2"}
    env["MIXED_PRECISION"] = "no"
    flags = "--num_epochs 1 --batch_size 8 --num_workers 0"
    job = submit_stage1(env, "train_multinode.sbatch", data, exp, out, flags, "--nodes=1")

    wait_for(lambda: job_state(slurm, job)[0] in ("COMPLETED", "FAILED", "CANCELLED"), 600, "job's end")

    log = out.read_text()
    assert job_state(slurm, job)[0] == "COMPLETED", log[-3000:]
    assert "1 nodes x 2 processes, rendezvous" in log
    assert "--num_machines 1 --num_processes 2" in log and "--machine_rank 0" in log
    assert "2 process(es) on cpu" in log
    assert (exp / "stage1_results.json").is_file()
