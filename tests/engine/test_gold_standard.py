"""Gold-standard mode: two independent half-set reconstructions and their half-map FSC at 0.143.

Checks on the tiny 1AKE set of ``test_trainer.py``: each half trains only on its
rows and starts from its own initialisation; the half-map FSC is reported once
per epoch; the alignment of half 2 onto half 1 recovers a known rotation (checked
with scipy's ``ndimage.affine_transform`` as the independent resampler); fork is
refused; a checkpoint keeps the halves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from cryospin_lab.engine.commands import Command, CommandError
from cryospin_lab.engine.events import EpochEvent, FinishedEvent, LogEvent, Phase, ResolutionEvent, StepEvent
from cryospin_lab.engine.trainer import Trainer

from helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gold_run(tiny_stack, tmp_path_factory):
    out = tmp_path_factory.mktemp("gold")
    config = tiny_config(gold_standard=True, switch="1")  # the shipped disc schedule
    trainer = Trainer(tiny_stack, config, out_dir=out)
    seen: dict[str, set[int]] = {"half1": set(), "half2": set()}
    original = trainer._step

    def spy(branch, indices):  # the images of every amortized step
        if branch.phase is Phase.AMORTIZED:
            seen[branch.name].update(int(i) for i in indices)
        return original(branch, indices)

    trainer._step = spy
    events = list(trainer.events())
    return trainer, events, seen


def test_halves_train_on_disjoint_rows(gold_run, tiny_stack):
    trainer, events, seen = gold_run
    half_a, half_b = tiny_stack.half_split(trainer.config.seed)
    assert seen["half1"] == set(half_a.tolist()) and seen["half2"] == set(half_b.tolist())
    assert not seen["half1"] & seen["half2"]
    for name, rows in (("half1", half_a), ("half2", half_b)):
        epochs = [e for e in events if isinstance(e, EpochEvent) and e.branch == name]
        assert [e.n_images_seen for e in epochs] == [len(rows)] * 2
    assert {e.branch for e in events if isinstance(e, StepEvent)} == {"half1", "half2"}
    assert isinstance(events[-1], FinishedEvent)


def test_halves_start_from_different_initialisations(tiny_stack):
    trainer = Trainer(tiny_stack, tiny_config(gold_standard=True))
    a, b = trainer.branch("half1"), trainer.branch("half2")
    assert not torch.equal(a.volume.mantissa, b.volume.mantissa)
    first_a = next(iter(a.encoder.parameters()))
    first_b = next(iter(b.encoder.parameters()))
    assert not torch.equal(first_a, first_b)


def test_half_map_fsc_once_per_epoch(gold_run):
    trainer, events, _ = gold_run
    half = [e for e in events if isinstance(e, ResolutionEvent) and e.kind == "half_maps"]
    assert [e.epoch for e in half] == [1, 2]
    for event in half:
        assert event.threshold == 0.143 and event.branch == "half1"
        assert np.isfinite(event.fsc).all()
        nyquist = 2 * trainer.pixel_size_angstrom
        assert event.resolution_angstrom >= nyquist - 1e-6
    # The independent halves agree on the lowest frequencies once trained, more with each epoch
    # (shell 0 is the DC voxel alone, unconstrained by background-subtracted images: skipped). With
    # the shipped disc, which starts wide, 32 images per half agree at 0.42 after one epoch here.
    assert half[-1].fsc[1] > 0.5 and half[-1].fsc[1] > half[0].fsc[1]


def test_alignment_of_half_two_recovers_a_known_rotation(tiny_stack, tiny_simulation):
    import mrcfile

    with mrcfile.open(tiny_simulation.ground_truth_path, permissive=True) as mrc:
        truth = np.array(mrc.data, dtype=np.float64)
    rotation = Rotation.from_euler("zyz", [40, 70, -20], degrees=True).as_matrix()
    centre = np.array(truth.shape) // 2
    rotated = ndimage.affine_transform(truth, rotation, offset=centre - rotation @ centre, order=3)
    trainer = Trainer(tiny_stack, tiny_config(gold_standard=True))
    from cryospin_lab.model.hartley_volume import HartleyVolume

    for name, volume in (("half1", truth), ("half2", rotated)):
        replacement = HartleyVolume.from_real(torch.from_numpy(volume).float())
        trainer.branch(name).volume.load_state_dict(replacement.state_dict())
    half_a, aligned, alignment, curve = trainer.half_maps()
    corr = np.corrcoef(half_a.numpy().ravel(), aligned.numpy().ravel())[0, 1]
    assert corr > 0.95, corr
    assert curve.resolution_angstrom(0.143) < 3 * trainer.pixel_size_angstrom


def test_fork_is_refused_and_a_checkpoint_keeps_the_halves(gold_run, tiny_stack):
    trainer, _, _ = gold_run
    with pytest.raises(CommandError, match="gold-standard"):
        trainer.apply_command(Command.FORK)
    checkpoint = trainer.out_dir / "checkpoints" / "epoch_0002.pt"
    resumed = Trainer.resume(tiny_stack, checkpoint, n_epochs=3)
    for name in ("half1", "half2"):
        torch.testing.assert_close(resumed.branch(name).subset, trainer.branch(name).subset)
    events = list(resumed.events())
    assert [e.epoch for e in events if isinstance(e, ResolutionEvent) and e.kind == "half_maps"] == [3]
    assert not [e for e in events if isinstance(e, LogEvent)]


def test_half_two_poses_are_moved_into_half_one_frame(tiny_stack, tiny_simulation):
    """Half 2 = the true map in another frame, seen at the true poses in that frame: combined = truth.

    With V'(x) = V(Q x), the image of V at pose R is that of V' at R Q:
    sum_z V'((R Q)^T x) = sum_z V(Q Q^T R^T x).
    """
    import mrcfile

    from cryospin_lab.model.hartley_volume import HartleyVolume
    from cryospin_lab.physics import so3

    with mrcfile.open(tiny_simulation.ground_truth_path, permissive=True) as mrc:
        truth = np.array(mrc.data, dtype=np.float64)
    m_zyx = Rotation.from_euler("zyz", [-35, 50, 80], degrees=True).as_matrix()
    centre = np.array(truth.shape) // 2
    # scipy: out[o] = in[M o + c - M c] on [z, y, x] indices, i.e. V'(x) = V(Q x) with Q = P M P on (x, y, z).
    rotated = ndimage.affine_transform(truth, m_zyx, offset=centre - m_zyx @ centre, order=3)
    p = np.eye(3)[::-1]
    q = torch.from_numpy(p @ m_zyx @ p).float()
    trainer = Trainer(tiny_stack, tiny_config(gold_standard=True))
    true_rotations = trainer.true_rotations.float()
    for name, volume, poses in (("half1", truth, true_rotations), ("half2", rotated, true_rotations @ q)):
        replacement = HartleyVolume.from_real(torch.from_numpy(volume).float())
        branch = trainer.branch(name)
        branch.volume.load_state_dict(replacement.state_dict())
        branch.best_rotations = poses.clone()
    result = trainer.gold_standard_result()
    errors = so3.geodesic_angle_deg(result.rotations, true_rotations.double())
    assert float(errors.max()) < 3.0, errors
    half_a, half_b = tiny_stack.half_split(trainer.config.seed)
    np.testing.assert_array_equal(result.subset_of_row[half_a], 1)
    np.testing.assert_array_equal(result.subset_of_row[half_b], 2)
    torch.testing.assert_close(result.average_map, (result.half1_map + result.half2_map) / 2)
