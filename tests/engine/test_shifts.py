"""Shift estimation trains and recovers the true shifts: a shifted set reconstructed with ``estimate_shifts``.

The convergence test's set (HSP90, D=32, 6 Å/px, 2000 images, SNR 0.5, CTF) with
every particle moved off-centre uniformly within a 12 Å (2-pixel) disc, and the
shipped defaults plus ``estimate_shifts`` (shift bound: 10 % of the box). The
heads propose shifts in the amortized stage, the pose table refines them in the
direct stage. A reconstruction is free to sit translated in its box, which moves
every image's shift by the in-plane part of ``R_i u``: the comparison with the
true shifts removes the fitted ``u`` first (``metrics.shift_error_angstrom``).
Leaving every shift at zero would be off by 8.5 Å (the median of the true
shifts' lengths); with run seeds 0-2 the engine ends at 1.0-1.8 Å
(docs/decisions.md#shift-test).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_convergence import APIX, BOX, N_IMAGES, SNR

from cryospin_lab.analysis import metrics
from cryospin_lab.engine.config import TrainingConfig, apply_settings
from cryospin_lab.engine.events import Phase, PoseErrorEvent
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.maps import load_ground_truth
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.simulate import datasets
from cryospin_lab.simulate.simulator import simulate_particles

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

MAX_SHIFT_ANGSTROM = 2 * APIX  # 12 Å
SHIFT_MEDIAN_MAX_ANGSTROM = APIX / 2  # half a pixel


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory):
    sim = simulate_particles(
        datasets.default_model_path(),
        out_dir=tmp_path_factory.mktemp("hsp90_d32_shifted"),
        box_size=BOX,
        pixel_size_angstrom=APIX,
        n_particles=N_IMAGES,
        snr=SNR,
        max_shift_angstrom=MAX_SHIFT_ANGSTROM,
        seed=0,
        progress=False,
    )
    stack = ParticleStack(sim.star_path)
    truth = load_ground_truth(sim.ground_truth_path, stack)
    config = apply_settings(
        TrainingConfig(device="cpu"),
        {"estimate_shifts": True},
        box_size=stack.box_size,
        pixel_size_angstrom=stack.pixel_size_angstrom,
    )
    trainer = Trainer(stack, config, ground_truth_map=truth)
    events = list(trainer.events())
    return trainer, events


def test_the_true_shifts_are_recovered(shifted_run):
    trainer, _ = shifted_run
    branch = trainer.branch()
    true_lengths = np.linalg.norm(trainer.true_shifts.numpy(), axis=1)
    assert np.median(true_lengths) > 6.0  # the set is shifted: zero shifts would be far off
    error = metrics.shift_error_angstrom(
        trainer.true_shifts, branch.current_shifts(), branch.current_rotations()
    )
    assert error.median_angstrom < SHIFT_MEDIAN_MAX_ANGSTROM, error.median_angstrom


def test_poses_left_the_plateau_with_shifts(shifted_run):
    """Not the convergence test's thresholds: on this set seed 2 ends at 26° (docs/decisions.md#shift-test),
    so shifted data converges less surely than centred, an open point of issue 19. Random poses: ~90°."""
    trainer, _ = shifted_run
    pose = metrics.pose_error(
        trainer.true_rotations,
        trainer.branch().current_rotations(),
        symmetry_rotations=datasets.hsp90_pseudo_symmetry(),
    )
    assert pose.median_deg < 45.0, pose.median_deg


def test_the_amortized_stage_reports_its_best_candidates_shifts(shifted_run):
    """During the amortized stage each image's shift is its best head's (what an amortized run's
    poses.star writes), reported with every pose error; by the switch a quarter nearer the truth
    than zero shifts scored the same way (measured: about half)."""
    trainer, events = shifted_run
    amortized = [e for e in events if isinstance(e, PoseErrorEvent) and e.phase is Phase.AMORTIZED]
    assert amortized and all(e.shift_error_angstrom is not None for e in amortized)
    zero = metrics.shift_error_angstrom(
        trainer.true_shifts, torch.zeros_like(trainer.true_shifts), trainer.branch().current_rotations()
    ).mean_angstrom  # its best translation removed, as for the reported error
    assert amortized[-1].shift_error_angstrom < 0.75 * zero, (amortized[-1].shift_error_angstrom, zero)
