"""The direct stage's map is rebuilt from every image at its pose (engine/rebuild.py).

The reference is the simulated set's own true map: a back-projection of clean-ish images (SNR 10)
at their true poses must come out as that map (up to its Wiener filter), with its sign and
orientation; a wrong contrast, a transposed pose or other images' poses would not.
"""

from __future__ import annotations

import pytest
import torch

from cryospin_lab.analysis import metrics
from cryospin_lab.engine.commands import Command
from cryospin_lab.engine.rebuild import rebuild_due, rebuild_map
from cryospin_lab.engine.trainer import Trainer

from helpers import simulated_1ake, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def set_of_600(data_dir, tmp_path_factory):
    """The tiny set's molecule (1AKE, D=32) with 600 images at SNR 10: enough views for a map."""
    return simulated_1ake(data_dir, tmp_path_factory.mktemp("ake600"), n_particles=600, seed=4)


def direct_trainer(stack, **settings) -> Trainer:
    config = tiny_config(switch="never", radius_start_fraction=1.0, **settings)
    trainer = Trainer(stack, config)
    trainer.apply_command(Command.SWITCH_NOW)
    events = trainer.events()
    next(events), next(events)  # the switch's announcement and phase change
    return trainer


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_the_map_from_the_true_poses_is_the_true_map(set_of_600):
    stack, truth_map = set_of_600
    trainer = direct_trainer(stack)
    branch = trainer.branch()
    branch.pose_table.rotations = trainer.true_rotations.float().clone()

    rebuild_map(trainer.step_context, branch)

    rebuilt = branch.volume_real()
    assert correlation(rebuilt, truth_map) > 0.9  # same sign, same frame, no alignment
    nyquist = 2 * trainer.pixel_size_angstrom
    fsc = metrics.compute_fsc(rebuilt, truth_map, trainer.pixel_size_angstrom)
    assert fsc.resolution_angstrom(0.5) < 1.4 * nyquist
    # other images' poses give a blob: each image is tied to its own pose
    branch.pose_table.rotations = trainer.true_rotations.float().roll(1, 0).clone()
    rebuild_map(trainer.step_context, branch)
    shuffled = metrics.compute_fsc(branch.volume_real(), truth_map, trainer.pixel_size_angstrom)
    assert shuffled.resolution_angstrom(0.5) > 3 * nyquist


def test_rebuilt_after_every_direct_epoch_only(tiny_stack):
    trainer = Trainer(tiny_stack, tiny_config(switch="never"))
    branch, cfg = trainer.branch(), trainer.config
    assert cfg.rebuild_map  # the shipped default
    assert not rebuild_due(branch, cfg)  # amortized: the encoder's poses are not a map's yet
    trainer.apply_command(Command.SWITCH_NOW)
    events = trainer.events()
    next(events), next(events)  # the switch
    assert rebuild_due(branch, cfg)
    assert not rebuild_due(branch, tiny_config(rebuild_map=False))


def test_a_run_ending_in_the_direct_stage_hands_back_the_rebuilt_map(tiny_stack):
    trainer = Trainer(tiny_stack, tiny_config(switch=1, n_epochs=2))
    list(trainer.events())
    handed_back = trainer.volume_real().clone()
    # the map of the images at their final poses (the last re-search moved none: the run ended)
    rebuild_map(trainer.step_context, trainer.branch())
    torch.testing.assert_close(trainer.volume_real(), handed_back)


def test_the_trained_volume_when_turned_off(tiny_stack):
    trainer = Trainer(tiny_stack, tiny_config(switch=1, n_epochs=2, rebuild_map=False))
    list(trainer.events())
    trained = trainer.volume_real().clone()
    rebuild_map(trainer.step_context, trainer.branch())
    assert not torch.allclose(trainer.volume_real(), trained, atol=1e-6)
