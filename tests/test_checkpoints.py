"""checkpoints.py: where a resumed run stands. The runs that save, kill and resume are in tests/test_stage1.py."""

import json

import pytest

import checkpoints
from errors import UserError


def position(state, batch_size, processes, accumulation, updates_per_epoch):
    return checkpoints.Checkpoints.position(
        state,
        batch_size=batch_size,
        num_processes=processes,
        gradient_accumulation_steps=accumulation,
        updates_per_epoch=updates_per_epoch,
    )


def test_a_mid_epoch_resume_counts_images_across_world_sizes():
    state = checkpoints.RunState(epoch=2, images_done=96, batch_size=8, num_processes=4)
    # 96 images = 3 batches of 8 on 4 processes, or 6 batches on 2, or 12 on 1; updates_per_epoch 10, no accumulation
    assert position(state, 8, 4, 1, 10) == (3, 33)
    assert position(state, 8, 2, 1, 20) == (6, 66)
    assert position(state, 8, 1, 2, 20) == (12, 66)
    with pytest.raises(UserError, match="not a whole number of batches of 8 x 5 .* saved with \\(8 x 4\\)"):
        position(state, 8, 5, 1, 10)


@pytest.mark.parametrize(
    "epoch, images_done, batch_size, processes, accumulation, updates_per_epoch, expected",
    [
        (-1, 0, 8, 1, 1, 5, (0, 0)),  # nothing trained yet
        (0, 0, 8, 1, 1, 5, (0, 5)),  # the first epoch done
        (1, 24, 8, 1, 1, 5, (3, 13)),  # 3 batches into the third epoch
        (1, 48, 8, 2, 2, 5, (3, 11)),  # 3 batches of 16, every 2 of them an update: 1 update in
        (1, 40, 4, 2, 4, 3, (5, 7)),  # 5 batches of 8, 4 to an update: 1 update in
    ],
)
def test_the_position_of_a_resume_by_hand(
    epoch, images_done, batch_size, processes, accumulation, updates_per_epoch, expected
):
    state = checkpoints.RunState(epoch=epoch, images_done=images_done, batch_size=batch_size, num_processes=processes)
    found = position(state, batch_size, processes, accumulation, updates_per_epoch)
    assert found == expected and all(isinstance(n, int) for n in found)  # batches to skip: a count


def saved_state(folder, epoch):
    """A state folder as save_latest leaves it complete: training_state.json is its last file."""
    folder.mkdir(parents=True)
    (folder / "training_state.json").write_text(json.dumps({"epoch": epoch}))
    return folder


def test_a_kill_between_the_renames_resumes_from_the_newest_complete_state(tmp_path):
    folder = tmp_path / "checkpoints" / "stage1"
    older = saved_state(folder / "stage1_latest.old-1700000000000000000", 1)
    newer = saved_state(folder / "stage1_latest.old-1700000000500000000", 2)
    tmp = saved_state(folder / "stage1_latest.tmp", 3)
    found = checkpoints.Checkpoints(None, tmp_path, "stage1")
    assert found.resolve("latest") == tmp  # killed after .tmp was complete, before its rename
    (tmp / "training_state.json").unlink()  # killed while writing .tmp: the newest of the moved-aside ones
    assert found.resolve("latest") == newer
    (newer / "training_state.json").unlink()
    assert found.resolve("latest") == older
    latest = saved_state(folder / "stage1_latest", 4)
    assert found.resolve("latest") == latest  # a complete latest wins over every leftover


def test_latest_without_a_state_is_a_first_start_and_a_named_folder_must_hold_one(tmp_path):
    found = checkpoints.Checkpoints(None, tmp_path, "stage2")
    assert found.resolve("latest") is None
    assert found.resolve(str(saved_state(tmp_path / "mine", 0))) == tmp_path / "mine"
    with pytest.raises(UserError, match="--resume_from_checkpoint .*nowhere: no saved state .*stage2_latest folder"):
        found.resolve(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no saved state"):
        found.resolve(str(tmp_path / "empty"))


def test_a_state_file_reads_back_whole_and_one_this_code_did_not_write_is_refused_in_one_line(tmp_path):
    # the keys a stage 1 state has held since mid-epoch resume; stage 2's states lack soft_label_folds
    written = {
        "epoch": 3,
        "images_done": 48,
        "global_step": 40,
        "best_epoch": 2,
        "best_val_acer": float("inf"),
        "batch_size": 8,
        "num_processes": 2,
        "soft_label_folds": 3,
    }
    path = tmp_path / "training_state.json"
    path.write_text(json.dumps(written))
    assert checkpoints.RunState.read(path) == checkpoints.RunState(**written)
    del written["soft_label_folds"]
    path.write_text(json.dumps(written))
    assert checkpoints.RunState.read(path).soft_label_folds is None
    path.write_text(json.dumps({**written, "step": 5}))
    with pytest.raises(UserError, match="not a state this code can resume \\(unknown keys: step; missing: none\\)"):
        checkpoints.RunState.read(path)
    path.write_text(json.dumps({"epoch": 1}))
    with pytest.raises(UserError, match="missing: batch_size, best_epoch, .*start a new --output_dir"):
        checkpoints.RunState.read(path)
