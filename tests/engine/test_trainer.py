"""The trainer, mechanically: events, the switch, direct pose steps, forks, reports.

Fast CPU checks on the tiny simulated set (1AKE chain A, D=32, 64 images, SNR 10). No
convergence claims: a few epochs only show that the loss moves the right way. Intra-op
threads are pinned to 1 for this module (on two busy cores, two torch threads per process
make each step several times slower).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import starfile
import torch

from cryospin_lab.engine import steps as _steps
from cryospin_lab.engine.commands import Command, CommandError
from cryospin_lab.engine.events import (
    EpochEvent,
    FinishedEvent,
    ForkEvent,
    HeadAssignmentEvent,
    LogEvent,
    Phase,
    PhaseChangeEvent,
    PoseCandidatesEvent,
    PoseErrorEvent,
    ResolutionEvent,
    StepEvent,
    VolumeEvent,
)
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.model.hartley_volume import HartleyVolume
from cryospin_lab.physics import so3
from cryospin_lab.physics.render import render_hartley

from helpers import (
    BATCH,
    BOX,
    N_PARTICLES,
    STEPS_PER_EPOCH,
    assert_orthonormal,
    of_type,
    perturbed,
    switches,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def amortized_run(tiny_stack):
    """3 amortized epochs on the full disc (no radius ramp, so epoch losses are comparable)."""
    config = tiny_config(n_epochs=3, switch="never", decoder_lr=0.05, radius_ramp_epochs=0)
    trainer = Trainer(tiny_stack, config)
    return trainer, list(trainer.events())


def test_amortized_loss_is_finite_and_falls(amortized_run):
    trainer, events = amortized_run
    steps = of_type(events, StepEvent)
    assert len(steps) == 3 * STEPS_PER_EPOCH
    assert all(math.isfinite(e.loss) and e.loss > 0 for e in steps)
    assert all(e.phase is Phase.AMORTIZED for e in steps)
    assert [e.step for e in steps] == list(range(1, len(steps) + 1))  # updates done so far
    epochs = of_type(events, EpochEvent)
    assert [e.epoch for e in epochs] == [1, 2, 3]
    losses = [e.mean_loss for e in epochs]
    assert losses[0] > losses[1] > losses[2], losses
    # The epoch mean is the image-weighted mean of that epoch's step losses.
    for k, epoch in enumerate(epochs):
        chunk = steps[k * STEPS_PER_EPOCH : (k + 1) * STEPS_PER_EPOCH]
        expected = sum(e.loss * e.n_images for e in chunk) / sum(e.n_images for e in chunk)
        assert epoch.mean_loss == pytest.approx(expected, rel=1e-9)
    assert switches(events) == []
    assert trainer.branch().encoder is not None and trainer.branch().pose_table is None
    finished = events[-1]
    assert isinstance(finished, FinishedEvent) and finished.reason == "completed"
    assert finished.phase is Phase.FINISHED


def test_winner_counts_sum_to_images_seen(amortized_run):
    trainer, events = amortized_run
    steps = of_type(events, StepEvent)
    for k, epoch in enumerate(of_type(events, EpochEvent)):
        seen = sum(e.n_images for e in steps[k * STEPS_PER_EPOCH : (k + 1) * STEPS_PER_EPOCH])
        assert seen == epoch.n_images_seen == N_PARTICLES
        assert epoch.head_win_counts.shape == (trainer.config.encoder.n_heads,)
        assert (epoch.head_win_counts >= 0).all()
        assert int(epoch.head_win_counts.sum()) == N_PARTICLES


def test_epoch_diagnostics_are_consistent(amortized_run):
    """The head loss gap is >= 0 (mean over heads >= min); the pose change is a geodesic angle."""
    _, events = amortized_run
    epochs = of_type(events, EpochEvent)
    for epoch in epochs:
        assert np.isfinite(epoch.head_loss_gap) and epoch.head_loss_gap >= 0
        assert 0 <= epoch.median_pose_change_deg <= 180
    # before the first epoch every best pose is the identity: the first change is that of random poses
    assert epochs[0].median_pose_change_deg > 60


def test_amortized_candidates_event(amortized_run):
    trainer, events = amortized_run
    candidates = of_type(events, PoseCandidatesEvent)
    assert len(candidates) == 3  # one per amortized epoch (heavy, but a plain list keeps them all)
    for event in candidates:
        assert event.rotations.shape == (2, 3, 3, 3) and event.losses.shape == (2, 3)
        assert np.isfinite(event.losses).all()
        assert event.true_rotations is not None
        np.testing.assert_array_equal(event.indices, [0, N_PARTICLES - 1])


def test_head_assignment_event(amortized_run):
    """Per image: the head that won it in the last epoch, its true view and its pose error."""
    trainer, events = amortized_run
    assignments = of_type(events, HeadAssignmentEvent)
    epochs = of_type(events, EpochEvent)
    assert [e.epoch for e in assignments] == [e.epoch for e in epochs]
    last = assignments[-1]
    n_heads = trainer.config.encoder.n_heads
    assert last.winning_heads.shape == (N_PARTICLES,)
    assert ((last.winning_heads >= 0) & (last.winning_heads < n_heads)).all()
    # Every image is seen once per epoch, so the per-image winners recount the epoch's wins.
    np.testing.assert_array_equal(
        np.bincount(last.winning_heads, minlength=n_heads), epochs[-1].head_win_counts
    )
    # True views: R^T e_z of the STAR file's poses, computed here from the Euler angles with scipy.
    star = starfile.read(trainer.stack.path)["particles"]
    from scipy.spatial.transform import Rotation

    euler = star[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    matrices = Rotation.from_euler("ZYZ", euler, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(last.true_view_directions, matrices[:, 2, :], atol=1e-5)
    pose = of_type(events, PoseErrorEvent)[-1]
    assert last.errors_deg.shape == (N_PARTICLES,)
    assert float(np.median(last.errors_deg)) == pytest.approx(pose.median_deg, abs=1e-3)
    # The event's alignment carries the true poses into the learned map's frame: there, each one is
    # its image's error away from the trainer's pose (geodesic distance via scipy).
    g = pose.global_rotation
    np.testing.assert_allclose(g @ g.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(g) == pytest.approx(1.0)
    learned = trainer.poses()[0].numpy().astype(np.float64)
    true = trainer.true_rotations.numpy().astype(np.float64)
    in_map = np.stack([pose.true_pose_in_map_frame(r) for r in true])
    distance = Rotation.from_matrix(in_map @ learned.transpose(0, 2, 1)).magnitude()
    np.testing.assert_allclose(np.degrees(distance), last.errors_deg, atol=0.05)


@pytest.fixture(scope="module")
def switched_run(tiny_stack, tiny_ground_truth):
    """switch="1": one amortized epoch then one direct epoch, with the ground-truth map."""
    trainer = Trainer(tiny_stack, tiny_config(switch="1"), ground_truth_map=tiny_ground_truth)
    return trainer, list(trainer.events())


def check_single_switch(
    trainer, events, reason: str, branch: str = "main", amortized_steps: bool = True
) -> None:
    changes = switches(events, branch)
    assert len(changes) == 1, changes
    assert changes[0].previous is Phase.AMORTIZED and changes[0].reason == reason
    position = events.index(changes[0])
    before = of_type(events[:position], StepEvent, branch)
    after = of_type(events[position:], StepEvent, branch)
    assert bool(before) == amortized_steps and after
    assert all(e.phase is Phase.AMORTIZED for e in before)
    assert all(e.phase is Phase.DIRECT for e in after)
    state = trainer.branch(branch)
    assert state.phase is Phase.DIRECT
    assert state.encoder is None and state.encoder_opt is None
    assert state.pose_table is not None and len(state.pose_table) == N_PARTICLES
    assert_orthonormal(state.pose_table.rotations)
    lr_direct = trainer.config.decoder_lr_direct
    assert [g["lr"] for g in state.decoder_opt.param_groups] == [lr_direct] * len(
        state.decoder_opt.param_groups
    )


def test_switch_at_configured_epoch(switched_run):
    trainer, events = switched_run
    check_single_switch(trainer, events, reason="epoch")
    change = switches(events)[0]
    assert change.epoch == 1
    epochs = of_type(events, EpochEvent)
    assert [e.phase for e in epochs] == [Phase.AMORTIZED, Phase.DIRECT]
    assert int(epochs[0].head_win_counts.sum()) == N_PARTICLES
    assert all(math.isfinite(e.loss) for e in of_type(events, StepEvent))
    assert isinstance(events[-1], FinishedEvent) and events[-1].reason == "completed"
    # No encoder, so no candidates after the switch.
    assert [e.phase for e in of_type(events, PoseCandidatesEvent)] == [Phase.AMORTIZED]


def test_switch_now_command_between_steps(tiny_stack):
    trainer = Trainer(tiny_stack, tiny_config(switch="never"))
    events = []
    for event in trainer.events():
        events.append(event)
        if isinstance(event, StepEvent) and event.step == 2:
            assert trainer.apply_command(Command.SWITCH_NOW) == []
        if isinstance(event, PhaseChangeEvent) and event.new is Phase.DIRECT:
            # A second switch is refused with a log message, not a second phase change.
            (log,) = trainer.apply_command(Command.SWITCH_NOW)
            assert isinstance(log, LogEvent) and "already direct" in log.message
    check_single_switch(trainer, events, reason="manual")
    steps = of_type(events, StepEvent)
    assert [e.phase for e in steps[:2]] == [Phase.AMORTIZED] * 2
    assert all(e.phase is Phase.DIRECT for e in steps[2:])
    # The epoch in progress continues in the direct stage: all images are still seen once.
    assert of_type(events, EpochEvent)[0].n_images_seen == N_PARTICLES
    assert int(of_type(events, EpochEvent)[0].head_win_counts.sum()) == 2 * BATCH


def test_direct_pose_steps_lower_the_loss_and_keep_rotations_orthonormal(
    tiny_stack, tiny_ground_truth, monkeypatch
):
    """One ``steps.direct_step`` with the true map as volume and poses 25 deg off the truth.

    The engine's own pose block is observed through ``image_losses``: it is called
    ``n_pose_steps`` times on the fixed volume and once more (after the fold, same
    volume) for the decoder step, so the 6 batch losses must fall monotonically.
    25 deg: far enough that 5 Adam steps of ~0.05 rad per axis do not reach the
    noise floor, where momentum would overshoot (from 15 deg, the 5th step does).
    """
    trainer = Trainer(tiny_stack, tiny_config(switch="never"))
    trainer.apply_command(Command.SWITCH_NOW)  # before the first step: the switch comes first
    events = trainer.events()
    announced, first = next(events), next(events)
    assert isinstance(announced, LogEvent) and announced.message.startswith("switching: ")
    assert isinstance(first, PhaseChangeEvent) and first.new is Phase.DIRECT
    branch = trainer.branch()

    # Fixed volume: the true map, scaled to the normalised images by least squares.
    rows = torch.arange(BATCH)
    disc = trainer.feed.disc(branch.epoch)
    _, observed, ctf = trainer.feed.batch(rows, disc)
    truth = trainer.true_rotations
    volume = HartleyVolume.from_real(tiny_ground_truth)
    clean = render_hartley(
        volume.hartley().detach(),
        truth[rows],
        disc,
        pixel_size_angstrom=trainer.pixel_size_angstrom,
        ctf_values=ctf,
        contrast=trainer.config.contrast,
    )
    scale = float((clean * observed).sum() / (clean * clean).sum())
    assert scale > 0  # contrast conventions of simulator and renderer agree
    with torch.no_grad():
        volume.exponent += math.log(scale)
    branch.volume.load_state_dict(volume.state_dict())

    start = perturbed(truth, 25.0, seed=1).float()
    branch.pose_table.rotations = start.clone()
    recorded: list[float] = []

    def recording(original):
        def record(*args, **kwargs):
            out = original(*args, **kwargs)
            recorded.append(float(out.detach().sum()))
            return out

        return record

    # the pose steps' losses (pose_losses), then the volume step's (image_losses)
    monkeypatch.setattr(_steps, "pose_losses", recording(_steps.pose_losses))
    monkeypatch.setattr(_steps, "image_losses", recording(_steps.image_losses))
    _steps.direct_step(trainer.step_context, branch, rows)
    monkeypatch.undo()

    n_pose_steps = trainer.config.n_pose_steps
    assert len(recorded) == n_pose_steps + 1
    assert all(a > b for a, b in zip(recorded[:-1], recorded[1:], strict=True)), recorded
    table = branch.pose_table
    assert_orthonormal(table.rotations)
    # Only the batch's rows moved, and they moved towards the truth.
    torch.testing.assert_close(table.rotations[BATCH:], start[BATCH:], atol=0, rtol=0)
    error_before = so3.geodesic_angle_deg(truth[rows].double(), start[rows].double())
    error_after = so3.geodesic_angle_deg(truth[rows].double(), table.rotations[rows].double())
    assert float(error_after.mean()) < float(error_before.mean())
    assert (table.rotation_adam.steps[rows] == n_pose_steps).all()
    assert (table.rotation_adam.steps[BATCH:] == 0).all()


def test_switched_run_pose_table_is_orthonormal(switched_run):
    trainer, _ = switched_run
    rotations, shifts = trainer.poses()
    assert rotations.shape == (N_PARTICLES, 3, 3) and shifts is None  # shifts not estimated
    assert_orthonormal(rotations)


def test_fork_makes_two_independent_branches(tiny_stack):
    trainer = Trainer(tiny_stack, tiny_config(switch="never"))
    events = []
    generator = trainer.events()
    for event in generator:
        events.append(event)
        if isinstance(event, StepEvent) and event.step == 2:
            break
    fork_events = trainer.apply_command(Command.FORK)
    assert len(fork_events) == 1 and isinstance(fork_events[0], ForkEvent)
    assert fork_events[0].parent == "main" and fork_events[0].children == ("amortized", "direct")
    events += fork_events
    amortized, direct = trainer.branches
    assert (amortized.name, direct.name) == ("amortized", "direct")
    # Independent objects: parameters, optimiser state and bookkeeping share nothing.
    assert amortized.volume is not direct.volume and amortized.encoder is not direct.encoder
    for a, b in zip(amortized.volume.parameters(), direct.volume.parameters(), strict=True):
        assert a.data_ptr() != b.data_ptr()
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # same state at the fork
    for branch in (amortized, direct):
        assert list(branch.decoder_opt.param_groups[0]["params"]) == list(branch.volume.parameters())
        assert list(branch.encoder_opt.param_groups[0]["params"]) == list(branch.encoder.parameters())
    assert amortized.best_rotations.data_ptr() != direct.best_rotations.data_ptr()
    before = direct.volume.mantissa.detach().clone()
    with torch.no_grad():
        amortized.volume.mantissa += 1.0
    torch.testing.assert_close(direct.volume.mantissa, before, atol=0, rtol=0)
    with torch.no_grad():
        amortized.volume.mantissa -= 1.0

    events += list(generator)
    for name in ("amortized", "direct"):
        assert of_type(events, StepEvent, name), name
        assert len(of_type(events, EpochEvent, name)) == 2
    assert switches(events, "amortized") == []
    # The direct child switches before its first step (its amortized steps were main's).
    check_single_switch(trainer, events, reason="manual", branch="direct", amortized_steps=False)
    assert trainer.branch("amortized").encoder is not None and trainer.branch("amortized").pose_table is None
    # Trained apart after the fork: the maps differ.
    assert not torch.allclose(trainer.volume_real("amortized"), trainer.volume_real("direct"))
    finished = of_type(events, FinishedEvent)
    assert len(finished) == 1 and finished[0] is events[-1]
    summary = finished[0].summary
    assert summary["amortized/epochs"] == 2 and summary["direct/epochs"] == 2


def test_fork_during_the_last_epoch_end(tiny_stack):
    """A fork requested at the last epoch's EpochEvent (a UI click at the wrong moment)."""
    trainer = Trainer(tiny_stack, tiny_config(n_epochs=1, switch="never"))
    events = []
    for event in trainer.events():
        events.append(event)
        if isinstance(event, EpochEvent):
            try:
                events += trainer.apply_command(Command.FORK)
            except CommandError:
                pass  # refusing the fork is fine too
    assert isinstance(events[-1], FinishedEvent) and events[-1].reason == "completed"
    assert all(b.epoch <= trainer.config.n_epochs for b in trainer.finished)


def run_with_commands_after_step(trainer: Trainer, step: int, *commands: Command) -> list:
    """All events of ``trainer``, applying ``commands`` after main's StepEvent number ``step``."""
    events = []
    for event in trainer.events():
        events.append(event)
        if isinstance(event, StepEvent) and event.branch == "main" and event.step == step:
            for command in commands:
                events += trainer.apply_command(command)
    return events


def test_fork_mid_epoch_winner_counts_sum_to_images_seen(tiny_stack):
    trainer = Trainer(tiny_stack, tiny_config(n_epochs=1, switch="never"))
    events = run_with_commands_after_step(trainer, 2, Command.FORK)
    (epoch,) = of_type(events, EpochEvent, "amortized")
    assert int(epoch.head_win_counts.sum()) == epoch.n_images_seen == N_PARTICLES


def test_fork_after_switch_request_keeps_amortized_child_amortized(tiny_stack):
    trainer = Trainer(tiny_stack, tiny_config(n_epochs=1, switch="never"))
    events = run_with_commands_after_step(trainer, 2, Command.SWITCH_NOW, Command.FORK)
    assert of_type(events, ForkEvent)
    assert switches(events, "amortized") == []
    assert len(switches(events, "direct")) == 1


def test_ground_truth_reports(switched_run):
    trainer, events = switched_run
    pose_errors = of_type(events, PoseErrorEvent)
    assert [e.phase for e in pose_errors] == [Phase.AMORTIZED, Phase.DIRECT]
    for event in pose_errors:
        assert 0 <= event.median_deg <= 180 and 0 <= event.mean_deg <= 180
        assert event.shift_error_angstrom is None
    resolutions = of_type(events, ResolutionEvent)
    assert [e.phase for e in resolutions] == [Phase.AMORTIZED, Phase.DIRECT]
    nyquist = 2 * trainer.pixel_size_angstrom
    for event in resolutions:
        assert event.kind == "ground_truth" and event.threshold == 0.5
        assert len(event.fsc) == len(event.frequencies_per_angstrom) > 0
        assert np.isfinite(event.fsc).all() and (np.abs(event.fsc) <= 1 + 1e-6).all()
        assert event.frequencies_per_angstrom.max() <= 1 / nyquist + 1e-9
        assert event.resolution_angstrom >= nyquist - 1e-9
    volumes = of_type(events, VolumeEvent)
    assert all(v.volume.shape == (BOX,) * 3 and np.isfinite(v.volume).all() for v in volumes)
    summary = events[-1].summary
    assert 0 <= summary["pose_error_mean_deg"] <= 180


def test_trainer_without_truth_reports_no_pose_error(tiny_simulation, tmp_path):
    """A stack without poses in its STAR file: no PoseErrorEvent, and ResolutionEvent needs a map."""
    star = starfile.read(tiny_simulation.star_path, always_dict=True)
    particles = star["particles"].drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    path = tmp_path / "no_poses.star"
    (tmp_path / "particles.mrcs").symlink_to(tiny_simulation.particles_path)
    starfile.write({"optics": star["optics"], "particles": particles}, path)
    stack = ParticleStack(path)
    assert stack.metadata.rotations is None
    trainer = Trainer(stack, tiny_config(n_epochs=1, switch="never"))
    events = list(trainer.events())
    assert of_type(events, PoseErrorEvent) == [] and of_type(events, ResolutionEvent) == []
    assert "pose_error_mean_deg" not in events[-1].summary


def test_switch_keeps_each_images_lowest_loss_candidate(tiny_stack):
    """Eq. 6, head by head: every image's pose-table row is the candidate that renders closest to
    it. The convergence test no longer catches a switch that keeps a random candidate (the direct
    stage's re-search repairs it, docs/decisions.md#early-switch), so this checks the choice itself."""
    trainer = Trainer(tiny_stack, tiny_config(switch="never", n_epochs=1))
    list(trainer.events())
    branch = trainer.branch()
    disc = trainer.feed.disc(branch.schedule_epoch)
    indices = torch.arange(N_PARTICLES)
    images, observed, ctf = trainer.feed.batch(indices, disc)
    with torch.no_grad():
        branch.encoder.eval()
        candidates = branch.encoder(images).rotations  # (N, H, 3, 3)
        losses = []
        for head in range(candidates.shape[1]):  # one head at a time, the plain mean squared misfit
            predicted = render_hartley(
                branch.volume.hartley(), candidates[:, head], disc,
                pixel_size_angstrom=trainer.pixel_size_angstrom, ctf_values=ctf,
                contrast=trainer.config.contrast,
            )  # fmt: skip
            losses.append(((predicted - observed) ** 2).mean(-1))
        expected = candidates[indices, torch.stack(losses, 1).argmin(1)]
    list(trainer._switch(branch, "manual"))
    torch.testing.assert_close(branch.pose_table.rotations.float(), expected.float(), atol=1e-5, rtol=0)
