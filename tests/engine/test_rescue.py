"""The direct stage's global re-search brings images out of a wrong basin and leaves correct ones alone.

The tiny 1AKE set (D=32, 64 images, SNR 10) in the direct stage with the true
map as its volume (scaled to the images by least squares) and every image at
its true pose, except a quarter turned by 120° about a random axis: a wrong
basin that local pose steps cannot leave. The reference is the truth itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from cryospin_lab.engine import rescue
from cryospin_lab.engine.commands import Command
from cryospin_lab.engine.config import EncoderConfig, TrainingConfig
from cryospin_lab.engine.rescue import rescue_events, research_poses
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.model.hartley_volume import HartleyVolume
from cryospin_lab.physics import so3
from cryospin_lab.physics.render import render_hartley

from helpers import simulated_1ake, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def direct_branch_with_the_true_map(tiny_stack, tiny_ground_truth, n_epochs=2, **settings):
    config = tiny_config(switch="never", n_epochs=n_epochs, rescue_extra_epochs=10, **settings)
    trainer = Trainer(tiny_stack, config)
    trainer.apply_command(Command.SWITCH_NOW)
    events = trainer.events()
    next(events), next(events)  # the switch's announcement and phase change
    branch = trainer.branch()
    rows = torch.arange(len(tiny_stack))
    disc = trainer.feed.disc(branch.epoch)
    _, observed, ctf = trainer.feed.batch(rows, disc)
    volume = HartleyVolume.from_real(tiny_ground_truth)
    clean = render_hartley(
        volume.hartley().detach(), trainer.true_rotations, disc, ctf_values=ctf,
        pixel_size_angstrom=trainer.pixel_size_angstrom, contrast=trainer.config.contrast,
    )  # fmt: skip
    with torch.no_grad():
        volume.exponent += math.log(float((clean * observed).sum() / (clean * clean).sum()))
    branch.volume.load_state_dict(volume.state_dict())
    return trainer, branch


def a_quarter_turned(truth):
    """A random quarter of the ``(n, 3, 3)`` rotations turned by 120° about random axes (a wrong
    basin local steps cannot leave): the mask of those and the rotations."""
    n = len(truth)
    wrong = torch.zeros(n, dtype=torch.bool)
    wrong[torch.randperm(n, generator=torch.Generator().manual_seed(2))[: n // 4]] = True
    axes = torch.nn.functional.normalize(torch.randn(n, 3, generator=torch.Generator().manual_seed(3)), dim=1)
    return wrong, torch.where(
        wrong[:, None, None], so3.exp_so3(axes * math.radians(120.0)).float() @ truth, truth
    )


def test_wrong_basins_are_left_and_right_poses_kept(tiny_stack, tiny_ground_truth):
    trainer, branch = direct_branch_with_the_true_map(tiny_stack, tiny_ground_truth)
    truth = trainer.true_rotations.float()
    n = len(truth)
    wrong, start = a_quarter_turned(truth)
    branch.pose_table.rotations = start.clone()

    moved, checked = research_poses(trainer.step_context, branch, nside=4)

    assert checked == n
    after = branch.pose_table.rotations
    error = so3.geodesic_angle_deg(after.double(), truth.double())
    # every image in the wrong basin comes back within a grid spacing (15°) of its true pose
    assert float(error[wrong].max()) < 15.0, error[wrong]
    # an image at its true pose is not moved: its own basin holds the best fit
    assert torch.equal(after[~wrong], start[~wrong])
    assert moved == int(wrong.sum())


@pytest.fixture(scope="module")
def set_of_1000(data_dir, tmp_path_factory):
    """The tiny set's molecule with 1,000 images: halves of 500 hold enough views for a map."""
    return simulated_1ake(data_dir, tmp_path_factory.mktemp("ake400"), n_particles=1000, seed=1)


def test_under_the_other_half_s_map_wrong_basins_are_left_too(set_of_1000):
    """``rescue_halfmap_steps``: the maps are back-projected from the poses themselves, a quarter of
    them wrong, and still the wrong images come back and no right one leaves (full disc)."""
    stack, truth_map = set_of_1000
    trainer, branch = direct_branch_with_the_true_map(
        stack, truth_map, rescue_halfmap_steps=5, radius_start_fraction=1.0
    )
    truth = trainer.true_rotations.float()
    n = len(truth)
    wrong, start = a_quarter_turned(truth)
    branch.pose_table.rotations = start.clone()

    moved, checked = research_poses(trainer.step_context, branch, nside=4, halfmaps=True)

    assert checked == n
    after = branch.pose_table.rotations
    error = so3.geodesic_angle_deg(after.double(), truth.double())
    # refined after the move: back within a few degrees, not just within a grid spacing
    # one round under maps a quarter wrong: nearly all back in their basin (5 steps refine a grid
    # point part of the way; the next epochs finish), and none of the right ones leaves
    assert float((error[wrong] < 20.0).float().mean()) >= 0.95, error[wrong]
    assert torch.equal(after[~wrong], start[~wrong])
    assert moved == int(wrong.sum())


def test_re_search_slows_down_once_it_moves_almost_nothing(tiny_stack, tiny_ground_truth):
    """Every epoch after the switch; after a re-search that moved nobody, every rescue_idle_every;
    after one that moved a quarter of the images, every epoch again. The set's 64 images are too
    few for the half maps (HALF_MAP_MIN_SET), so every re-search is under the run's map."""
    trainer, branch = direct_branch_with_the_true_map(tiny_stack, tiny_ground_truth, n_epochs=50)
    cfg = trainer.config
    assert (cfg.rescue_every, cfg.rescue_idle_every) == (1, 5)  # the shipped defaults
    assert cfg.rescue_halfmap_steps == 5 and rescue.HALF_MAP_MIN_SET == 1000
    truth = trainer.true_rotations.float()
    branch.pose_table.rotations = truth.clone()

    def searched_after(epoch: int) -> list[str]:
        branch.epoch = epoch
        return [
            event.message for event in rescue_events(trainer.step_context, branch, trainer._stamp(branch))
        ]

    assert branch.last_rescue_epoch == 0  # the switch came before the first epoch
    (message,) = searched_after(1)
    assert message == "re-search: 0 of 64 images moved to a better pose; the next in 5 epochs"
    assert [searched_after(epoch) for epoch in (2, 3, 4, 5)] == [[], [], [], []]
    quarter = torch.arange(len(truth)) % 4 == 0
    turn = so3.exp_so3(torch.tensor([[0.0, 0.0, math.radians(120.0)]])).float()
    branch.pose_table.rotations = torch.where(quarter[:, None, None], turn @ truth, truth)
    (message,) = searched_after(6)
    assert message == "re-search: 16 of 64 images moved to a better pose"
    assert len(searched_after(7)) == 1  # moved many: due again after one epoch


def test_a_re_search_still_moving_after_the_last_epoch_adds_one(tiny_stack, tiny_ground_truth, monkeypatch):
    """After the last epoch: images in a wrong basin move and the run gets one more epoch; once
    nobody would move (or fewer than the floor, or the extra epochs are spent, or in gold-standard
    mode) the run ends."""
    trainer, branch = direct_branch_with_the_true_map(tiny_stack, tiny_ground_truth, n_epochs=2)
    cfg = trainer.config
    assert TrainingConfig().rescue_extra_epochs == 10
    truth = trainer.true_rotations.float()
    quarter = torch.arange(len(truth)) % 4 == 0
    turn = so3.exp_so3(torch.tensor([[0.0, 0.0, math.radians(120.0)]])).float()
    wrong = torch.where(quarter[:, None, None], turn @ truth, truth)

    def after_epoch(epoch: int, extend: bool = True) -> list[str]:
        branch.epoch = epoch
        events = rescue_events(trainer.step_context, branch, trainer._stamp(branch), extend=extend)
        return [event.message for event in events]

    branch.pose_table.rotations, branch.epoch = wrong.clone(), 2
    assert branch.finished(cfg.n_epochs)
    assert after_epoch(2, extend=False) == []  # gold-standard halves stay in step
    assert torch.equal(branch.pose_table.rotations, wrong)
    assert rescue.RESCUE_EXTEND_MIN_SET == 1000
    assert after_epoch(2) == []  # 64 images: a set too small to be extended
    assert torch.equal(branch.pose_table.rotations, wrong)
    monkeypatch.setattr(rescue, "RESCUE_EXTEND_MIN_SET", 64)
    assert rescue.RESCUE_EXTEND_MIN_IMAGES == 50  # 16 of 64 images are not enough on their own
    (message,) = after_epoch(2)
    assert (
        message
        == "re-search after the last epoch: 16 of 64 images would move (under 0.5 % or 50); the run ends"
    )
    assert torch.equal(branch.pose_table.rotations, wrong) and branch.finished(cfg.n_epochs)
    monkeypatch.setattr(rescue, "RESCUE_EXTEND_MIN_IMAGES", 10)
    branch.rescue_idle = False
    (message,) = after_epoch(2)
    assert message.endswith(
        "; still moving after the last epoch, so the run goes on to epoch 3 (1 of at most 10 extra)"
    )
    assert branch.extra_epochs == 1 and not branch.finished(cfg.n_epochs)
    assert message.startswith("re-search: 16 of 64 images moved")
    changed = (branch.pose_table.rotations != wrong).flatten(1).any(1)
    assert torch.equal(changed, quarter)  # exactly the images in a wrong basin moved

    branch.pose_table.rotations, branch.epoch = truth.clone(), 3
    assert branch.finished(cfg.n_epochs)
    (message,) = after_epoch(3)
    assert (
        message
        == "re-search after the last epoch: 0 of 64 images would move (under 0.5 % or 10); the run ends"
    )
    assert branch.extra_epochs == 1 and branch.finished(cfg.n_epochs)

    branch.pose_table.rotations, branch.rescue_idle = wrong.clone(), False
    branch.extra_epochs = cfg.rescue_extra_epochs
    assert after_epoch(2 + cfg.rescue_extra_epochs) == []  # the extra epochs are spent
    assert torch.equal(branch.pose_table.rotations, wrong)

    # a start that stayed stuck through its restarts may add rescue_extra_epochs_stuck instead
    assert TrainingConfig().rescue_extra_epochs_stuck == 40
    branch.stuck = True
    (message,) = after_epoch(2 + cfg.rescue_extra_epochs)
    assert message.endswith(f"(11 of at most {cfg.rescue_extra_epochs_stuck} extra)"), message
    branch.pose_table.rotations, branch.rescue_idle = wrong.clone(), False
    branch.extra_epochs = cfg.rescue_extra_epochs_stuck
    assert after_epoch(2 + cfg.rescue_extra_epochs_stuck) == []


def test_half_maps_judge_only_the_re_search_after_an_idle_one(tiny_stack, tiny_ground_truth, monkeypatch):
    """With ``rescue_halfmap_steps``: the re-searches run under the run's map while they move
    images; the one after an idle re-search (5 epochs later), and the one after the last epoch
    when the last was idle, under the half maps."""
    trainer, branch = direct_branch_with_the_true_map(
        tiny_stack, tiny_ground_truth, n_epochs=12, rescue_halfmap_steps=2
    )
    branch.pose_table.rotations = trainer.true_rotations.float().clone()
    kinds = []
    real = rescue.better_poses

    def spy(ctx, branch, nside, *, halfmaps=False):
        kinds.append(halfmaps)
        rows, rotations, _ = real(ctx, branch, nside, halfmaps=halfmaps)
        return rows[:0], rotations[:0], None  # nobody moves: every re-search is idle

    monkeypatch.setattr(rescue, "better_poses", spy)
    monkeypatch.setattr(rescue, "RESCUE_EXTEND_MIN_SET", 64)
    monkeypatch.setattr(rescue, "HALF_MAP_MIN_SET", 64)

    def searched_after(epoch: int) -> list[str]:
        branch.epoch = epoch
        return [e.message for e in rescue_events(trainer.step_context, branch, trainer._stamp(branch))]

    (first,) = searched_after(1)
    assert first.startswith("re-search: 0 of 64") and kinds == [False]
    assert [searched_after(epoch) for epoch in (2, 3, 4, 5)] == [[], [], [], []]
    (second,) = searched_after(6)
    assert second.startswith("re-search under the half maps: 0 of 64") and kinds == [False, True]
    assert branch.finished(trainer.config.n_epochs) is False
    branch.epoch = 12
    (last,) = searched_after(12)
    assert last.startswith("re-search under the half maps after the last epoch: 0 of 64")
    assert kinds == [False, True, True]


def test_half_maps_judge_every_fifth_re_search_while_images_still_move(
    tiny_stack, tiny_ground_truth, monkeypatch
):
    """A run whose re-search never goes idle still gets the half maps every HALF_MAP_EVERY epochs."""
    trainer, branch = direct_branch_with_the_true_map(
        tiny_stack, tiny_ground_truth, n_epochs=20, rescue_halfmap_steps=2
    )
    kinds = []

    def spy(ctx, branch, nside, *, halfmaps=False):
        kinds.append(halfmaps)
        rows = torch.arange(20)  # a third of the images "move" (to where they are): never idle
        return rows, branch.pose_table.rotations[rows].clone(), None

    monkeypatch.setattr(rescue, "better_poses", spy)
    monkeypatch.setattr(rescue, "HALF_MAP_MIN_SET", 64)
    assert rescue.HALF_MAP_EVERY == 5
    for epoch in range(1, 12):
        branch.epoch = epoch
        list(rescue_events(trainer.step_context, branch, trainer._stamp(branch)))
    assert kinds == [False] * 4 + [True] + [False] * 4 + [True] + [False]


def test_refined_poses_bring_a_wrong_shift_back_to_the_true_one(tiny_stack, tiny_ground_truth):
    """``refine_poses`` with ``shift_lr`` (the half-map re-search when shifts are estimated): images
    at their true rotations (the set is centred: true shifts zero) with shifts set 1.5 pixels off
    in random directions come back towards zero; without ``shift_lr`` the shifts are held."""
    trainer, branch = direct_branch_with_the_true_map(tiny_stack, tiny_ground_truth)
    rows = torch.arange(len(tiny_stack))
    disc = trainer.feed.disc(branch.epoch)
    _, observed, ctf = trainer.feed.batch(rows, disc)
    apix = trainer.pixel_size_angstrom
    angle = torch.rand(len(rows), generator=torch.Generator().manual_seed(4)) * 2 * math.pi
    start = 1.5 * apix * torch.stack([angle.cos(), angle.sin()], dim=1)
    render = dict(pixel_size_angstrom=apix, contrast=trainer.config.contrast)
    common = dict(ctf_values=ctf, shifts_angstrom=start, steps=20, lr=0.01, render=render)
    volume = branch.volume.hartley().detach()
    truth = trainer.true_rotations.float()

    rotations, shifts, _ = rescue.refine_poses(volume, truth, disc, observed, shift_lr=0.5, **common)
    _, held, _ = rescue.refine_poses(volume, truth, disc, observed, **common)

    assert held is None
    error = shifts.norm(dim=1) / apix  # pixels from the true (zero) shift
    assert float(error.median()) < 0.5, error
    # the rotations stay in their basin (within a grid spacing at nside 4, 15°) while the shifts move
    angles = so3.geodesic_angle_deg(rotations.double(), truth.double())
    assert float(angles.max()) < 15.0 and float(angles.median()) < 5.0, angles


@pytest.mark.parametrize("step_px", [2.0, 0.0])
def test_the_re_search_finds_a_shift_two_pixels_off(tiny_stack, tiny_ground_truth, step_px):
    """With estimated shifts the plain re-search scores the grid at each image's shift and the 8 around
    it ``rescue_shift_step_px`` away: images in a wrong basin *and* 2 pixels off along x or y (the set
    is centred: true shifts zero) come back to their true basin with a zero shift; with a step of 0
    their shifts are kept."""
    encoder = EncoderConfig(
        box_size=tiny_stack.box_size, n_heads=3, estimate_shifts=True, max_shift_angstrom=8.0
    )
    trainer, branch = direct_branch_with_the_true_map(
        tiny_stack, tiny_ground_truth, encoder=encoder, rescue_shift_step_px=step_px
    )
    truth = trainer.true_rotations.float()
    n = len(truth)
    wrong, start = a_quarter_turned(truth)
    apix = trainer.pixel_size_angstrom
    steps = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]]) * apix
    off = torch.where(wrong[:, None], steps[torch.arange(n) % 4], torch.zeros(2))
    branch.pose_table.rotations = start.clone()
    branch.pose_table.shifts_angstrom = off.clone()

    research_poses(trainer.step_context, branch, nside=4)

    after, shifts = branch.pose_table.rotations, branch.pose_table.shifts_angstrom
    error = so3.geodesic_angle_deg(after.double(), truth.double())
    assert torch.equal(after[~wrong], start[~wrong]) and torch.equal(shifts[~wrong], off[~wrong])
    if step_px:
        assert float(error[wrong].max()) < 15.0, error[wrong]  # within a grid spacing of the truth
        assert float(shifts[wrong].abs().max()) < 1e-4 * apix, shifts[wrong]
    else:
        assert torch.equal(shifts, off)  # the grid was scored at the wrong shifts, which stay
