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

from cryospin_lab.engine.commands import Command
from cryospin_lab.engine.rescue import research_poses
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.model.hartley_volume import HartleyVolume
from cryospin_lab.physics import so3
from cryospin_lab.physics.render import render_hartley

from helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def direct_branch_with_the_true_map(tiny_stack, tiny_ground_truth):
    trainer = Trainer(tiny_stack, tiny_config(switch="never"))
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


def test_wrong_basins_are_left_and_right_poses_kept(tiny_stack, tiny_ground_truth):
    trainer, branch = direct_branch_with_the_true_map(tiny_stack, tiny_ground_truth)
    truth = trainer.true_rotations.float()
    n = len(truth)
    wrong = torch.zeros(n, dtype=torch.bool)
    wrong[torch.randperm(n, generator=torch.Generator().manual_seed(2))[: n // 4]] = True
    axes = torch.nn.functional.normalize(torch.randn(n, 3, generator=torch.Generator().manual_seed(3)), dim=1)
    turn = so3.exp_so3(axes * math.radians(120.0)).float()
    start = torch.where(wrong[:, None, None], turn @ truth, truth)
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
