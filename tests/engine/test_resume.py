"""Resuming from a checkpoint continues exactly as the uninterrupted run (tiny set, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cryospin_lab.engine.events import (
    CheckpointEvent,
    EpochEvent,
    StepEvent,
)
from cryospin_lab.engine.trainer import Trainer

from helpers import (
    STEPS_PER_EPOCH,
    of_type,
    switches,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_stack, tmp_path_factory):
    """Run A: 3 epochs, switch after epoch 2, a checkpoint every epoch."""
    out_dir = tmp_path_factory.mktemp("run_a")
    trainer = Trainer(tiny_stack, tiny_config(n_epochs=3, switch="2"), out_dir=out_dir)
    return trainer, list(trainer.events()), out_dir


def assert_same_final_state(a: Trainer, b: Trainer) -> None:
    """Exact equality: same ops in the same order on the same CPU (tolerance 0)."""
    branch_a, branch_b = a.branch(), b.branch()
    assert (branch_a.epoch, branch_a.step, branch_a.phase) == (branch_b.epoch, branch_b.step, branch_b.phase)
    state_a, state_b = branch_a.volume.state_dict(), branch_b.volume.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], atol=0, rtol=0, msg=f"volume {name} differs")
    rot_a, shift_a = a.poses()
    rot_b, shift_b = b.poses()
    torch.testing.assert_close(rot_a, rot_b, atol=0, rtol=0)
    assert shift_a is None and shift_b is None
    torch.testing.assert_close(
        branch_a.pose_table.shifts_angstrom, branch_b.pose_table.shifts_angstrom, atol=0, rtol=0
    )
    torch.testing.assert_close(
        branch_a.pose_table.rotation_adam.exp_avg_sq,
        branch_b.pose_table.rotation_adam.exp_avg_sq,
        atol=0,
        rtol=0,
    )


def test_resume_from_epoch_checkpoint_matches_uninterrupted_run(tiny_stack, uninterrupted_run, tmp_path):
    trainer_a, events_a, out_a = uninterrupted_run
    assert [Path(e.path).name for e in of_type(events_a, CheckpointEvent)] == [
        "epoch_0001.pt",
        "epoch_0002.pt",
        "epoch_0003.pt",
    ]
    assert switches(events_a)[0].epoch == 2
    trainer_b = Trainer.resume(tiny_stack, out_a / "checkpoints" / "epoch_0001.pt", out_dir=tmp_path)
    assert trainer_b.branch().epoch == 1 and trainer_b.branch().step == STEPS_PER_EPOCH
    events_b = list(trainer_b.events())
    assert [e.epoch for e in of_type(events_b, EpochEvent)] == [2, 3]
    assert switches(events_b)[0].epoch == 2
    losses_a = [e.loss for e in of_type(events_a, StepEvent)][STEPS_PER_EPOCH:]
    assert [e.loss for e in of_type(events_b, StepEvent)] == losses_a
    assert_same_final_state(trainer_a, trainer_b)
    assert (tmp_path / "checkpoints" / "epoch_0003.pt").exists()


def test_resume_from_the_switch_epoch_checkpoint_switches_too(tiny_stack, uninterrupted_run, tmp_path):
    trainer_a, _, out_a = uninterrupted_run
    trainer_b = Trainer.resume(tiny_stack, out_a / "checkpoints" / "epoch_0002.pt", out_dir=tmp_path)
    events_b = list(trainer_b.events())
    assert len(switches(events_b)) == 1
    assert_same_final_state(trainer_a, trainer_b)


def test_one_saved_state_restored_twice_gives_the_same_run_twice(tiny_stack, uninterrupted_run):
    """Restoring copies the saved tensors: a run restored from a SavedRun does not change it (torch's
    optimizers and the pose table would otherwise share its Adam moments and rows), so a second
    trainer restored from the same object replays the first exactly."""
    from cryospin_lab.engine.run_state import read_run

    trainer_a, _, out_a = uninterrupted_run
    saved = read_run(out_a / "checkpoints" / "epoch_0002.pt")  # direct branch: a pose table with Adam
    runs = []
    for _ in range(2):
        trainer = Trainer(tiny_stack, tiny_config(n_epochs=3, switch="2"))
        trainer.restore(saved)
        runs.append((trainer, [e.loss for e in of_type(list(trainer.events()), StepEvent)]))
    assert runs[0][1] == runs[1][1]
    assert_same_final_state(runs[0][0], runs[1][0])
    assert_same_final_state(trainer_a, runs[1][0])
