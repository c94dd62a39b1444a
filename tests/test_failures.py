"""A failure on one of several processes ends every process quickly, each with the same line: 2 gloo processes,
the last one failing at each point where a run can fail (tests/inject_failure.py)."""

import re

import pytest

from conftest import REPO, TINY_STAGE1, launch_two_processes

pytestmark = pytest.mark.slow  # each test launches two processes


@pytest.mark.parametrize(
    ("point", "line"),
    [
        ("face_cache", "error: cannot read Train/living/000007/0001.jpg (Input/output error); the split lists it"),
        ("batch_check", "error: cannot read Train/living/000007/0001.jpg (Input/output error); the split lists it"),
        ("training", "error: process 1 failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    ],
)
def test_one_failing_process_ends_them_all(demo_root, tmp_path, point, line):
    face_cache = ["--face_cache"] if point == "face_cache" else ["--no-face_cache"]
    flags = ["--data_root", str(demo_root), "--output_dir", str(tmp_path / "exp"), *TINY_STAGE1, *face_cache]
    # a process left waiting for the failed one would hang to the timeout, which fails the test
    result = launch_two_processes("tests/inject_failure.py", [point, str(REPO / "train_stage1.py"), *flags], 300)

    assert result.returncode != 0
    lines = [text for text in result.stderr.splitlines() if text.startswith("error:")]
    assert len(lines) == 2, result.stdout[-2000:] + result.stderr[-4000:]  # one per process
    assert lines[0] == lines[1]
    assert lines[0].startswith(line)
    # a user error: no traceback from our code (the launcher prints its own for any failed process); a crash
    # keeps its traceback, once, on the process that met it: one frame in main() per traceback
    tracebacks = result.stderr.count(f'File "{REPO}/train_stage1.py", line ')
    in_main = len(re.findall(rf'File "{re.escape(str(REPO))}/train_stage1.py", line \d+, in main', result.stderr))
    if point == "training":
        assert in_main == 1 and tracebacks >= 1
    else:
        assert tracebacks == 0


def test_a_finished_run_ends_cleanly_on_every_process():
    # without run_cli stopping the watcher, the abort comes on about 2 runs in 5: 6 runs catch it 19 times in 20
    for _ in range(6):
        result = launch_two_processes("tests/end_cleanly.py", [])

        assert result.returncode == 0, result.stderr[-3000:]
        assert "terminate called" not in result.stderr
