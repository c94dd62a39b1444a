"""training_run.py: the per-epoch summary.csv. The schedule's length is counted in each stage script
(tests/test_stage1.py)."""

import csv

import training_run


def test_a_resumed_run_leaves_each_epoch_once_in_the_summary(tmp_path):
    path = tmp_path / "summary.csv"
    for epoch in (1, 2, 3, 2, 3):  # killed after epoch 3 was logged, resumed from the state of epoch 1
        training_run.write_summary_row(path, {"epoch": epoch, "train_loss": 1.0 / epoch})
    with open(path) as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]
