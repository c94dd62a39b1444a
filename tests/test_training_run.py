"""training_run.py: the schedule's length and the per-epoch summary.csv."""

import argparse
import csv

import pytest

import training_run


def test_a_resumed_run_leaves_each_epoch_once_in_the_summary(tmp_path):
    path = tmp_path / "summary.csv"
    for epoch in (1, 2, 3, 2, 3):  # killed after epoch 3 was logged, resumed from the state of epoch 1
        training_run.write_summary_row(path, {"epoch": epoch, "train_loss": 1.0 / epoch})
    with open(path) as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


@pytest.mark.parametrize(
    "batches, accumulation, epochs, max_steps, expected",
    [
        (10, 1, 3, 0, (10, 30)),
        (10, 3, 3, 0, (4, 12)),  # a last, shorter accumulation still makes an update
        (10, 1, 3, 25, (10, 25)),  # --max_train_steps cuts the run
        (7, 2, 2, 100, (4, 8)),
    ],
)
def test_the_updates_a_schedule_is_laid_out_over_by_hand(batches, accumulation, epochs, max_steps, expected):
    args = argparse.Namespace(gradient_accumulation_steps=accumulation, num_epochs=epochs, max_train_steps=max_steps)
    assert training_run.count_updates(args, batches) == expected
