"""Events an epoch end reports beside the loss: pose error, FSC against the true map, heads, candidates."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from cryospin_lab.analysis import metrics
from cryospin_lab.analysis.symmetry import NearSymmetry, find_near_symmetry
from cryospin_lab.engine.branch import Branch
from cryospin_lab.engine.events import (
    Event,
    HeadAssignmentEvent,
    Phase,
    PoseCandidatesEvent,
    PoseErrorEvent,
    ResolutionEvent,
    VolumeEvent,
)
from cryospin_lab.engine.steps import StepContext, encoder_candidates
from cryospin_lab.physics import so3

__all__ = [
    "POSE_ALIGNMENT_MAX_MEDIAN_DEG",
    "EpochReporter",
    "assignment_event",
    "candidates_event",
    "pose_error_event",
    "resolution_event",
]

# The near-symmetry of each true map seen by this process, by its bytes (a map search each).
_SYMMETRY_OF_MAP: dict[tuple, NearSymmetry | None] = {}
# Above this median pose error the pose-derived map alignment is unreliable (see resolution_event).
POSE_ALIGNMENT_MAX_MEDIAN_DEG = 30.0


def pose_error_event(
    branch: Branch,
    true_rotations: Tensor,
    true_shifts: Tensor | None,
    stamp: dict,
    symmetry: NearSymmetry | None = None,
) -> tuple[PoseErrorEvent, metrics.PoseError]:
    """The branch's pose error against the true poses (also modulo the true map's ``symmetry``), and
    the mean shift error when shifts are estimated (in the amortized stage each image's best
    candidate's; the map's own translation removed); also the
    :class:`~cryospin_lab.analysis.metrics.PoseError`, modulo the symmetry when there is one (its
    global rotation aligns the map as well: the truth is near-symmetric)."""
    rotations = branch.rows(branch.current_rotations())
    truth = branch.rows(true_rotations)
    pose = metrics.pose_error(truth, rotations)
    modulo = None
    if symmetry is not None:
        modulo = metrics.pose_error(truth, rotations, symmetry_rotations=symmetry.rotations)
    shifts, shift_error = branch.current_shifts(), None
    if true_shifts is not None and shifts is not None:
        shift_error = metrics.shift_error_angstrom(
            branch.rows(true_shifts), branch.rows(shifts), rotations
        ).mean_angstrom
    event = PoseErrorEvent(
        mean_deg=pose.mean_deg,
        median_deg=pose.median_deg,
        flipped=pose.flipped,
        shift_error_angstrom=shift_error,
        global_rotation=pose.global_rotation.numpy(),
        symmetry="" if symmetry is None else symmetry.describe(),
        mean_mod_sym_deg=None if modulo is None else modulo.mean_deg,
        median_mod_sym_deg=None if modulo is None else modulo.median_deg,
        **stamp,
    )
    return event, pose if modulo is None else modulo


def resolution_event(
    volume_real: Tensor,
    truth_map: Tensor,
    pixel_size_angstrom: float,
    pose: metrics.PoseError | None,
    stamp: dict,
    *,
    translate: bool = False,
) -> ResolutionEvent:
    """FSC against the true map, after aligning the map with the pose alignment (or a map search).

    The global rotation fitted to the poses is only meaningful once most
    poses are right; while the median pose error is above
    ``POSE_ALIGNMENT_MAX_MEDIAN_DEG`` (e.g. on the amortized plateau, when
    two pose populations related by a pseudo-symmetry are mixed) the map
    is aligned by a map-to-map search instead, which takes seconds
    (docs/decisions.md#fsc-map-search). With ``translate`` (shifts were
    estimated, so the map may sit off-centre) the pose alignment is followed
    by the translation that best moves the map onto the truth.
    """
    if pose is not None and pose.median_deg <= POSE_ALIGNMENT_MAX_MEDIAN_DEG:
        alignment = metrics.MapAlignment(
            rotation=pose.global_rotation,
            flipped=pose.flipped,
            shift_voxels=torch.zeros(3),
            correlation=math.nan,
        )
        if translate:
            rotated = metrics.apply_map_alignment(volume_real, alignment)
            shift = metrics.find_translation(rotated, truth_map).to(alignment.shift_voxels.dtype)
            alignment = dataclasses.replace(alignment, shift_voxels=shift)
        aligned = metrics.apply_map_alignment(volume_real, alignment)
    else:
        aligned = metrics.apply_map_alignment(volume_real, metrics.align_maps(volume_real, truth_map))
    curve = metrics.compute_fsc(aligned, truth_map, pixel_size_angstrom)
    return ResolutionEvent.from_curve(curve, kind="ground_truth", threshold=0.5, **stamp)


def assignment_event(
    branch: Branch, true_rotations: Tensor | None, pose: metrics.PoseError | None, stamp: dict
) -> HeadAssignmentEvent:
    """Each image's winning head this epoch, with its true view and pose error when known."""
    truth = None if true_rotations is None else branch.rows(true_rotations)
    views = None if truth is None else so3.view_directions(truth).numpy()
    return HeadAssignmentEvent(
        winning_heads=branch.rows(branch.best_heads).numpy(),
        true_view_directions=views,
        errors_deg=None if pose is None else pose.errors_deg,
        **stamp,
    )


def candidates_event(
    ctx: StepContext, branch: Branch, tracked: Tensor, true_rotations: Tensor | None, stamp: dict
) -> PoseCandidatesEvent:
    """Every head's candidate and its loss for the ``tracked`` images (amortized stage)."""
    rotations, _, losses = encoder_candidates(ctx, branch, tracked, ctx.feed.disc(branch.schedule_epoch))
    return PoseCandidatesEvent(
        indices=tracked.numpy(),
        rotations=rotations.cpu().numpy(),
        losses=losses.cpu().numpy(),
        true_rotations=None if true_rotations is None else true_rotations[tracked].numpy(),
        **stamp,
    )


class EpochReporter:
    """What a branch reports after each epoch, against the truth where it is known.

    Args:
        ctx: the run's step context (the heads' candidates need the data).
        true_rotations, true_shifts: from the particle file (simulated data), else None.
        ground_truth_map: ``(D, D, D)`` for FSC against the truth, else None.
        tracked: the images whose candidates are reported (None: none).
    """

    def __init__(
        self,
        ctx: StepContext,
        *,
        true_rotations: Tensor | None,
        true_shifts: Tensor | None,
        ground_truth_map: Tensor | None,
        tracked: Tensor | None,
    ):
        self.ctx = ctx
        self.true_rotations, self.true_shifts = true_rotations, true_shifts
        self.ground_truth_map = ground_truth_map
        self.tracked = tracked

    def events(self, branch: Branch, stamp: dict) -> Iterator[Event]:
        """Pose error, FSC vs the true map, the tracked images' candidates and each image's head
        (amortized stage), then the map: on rank 0 only (the FSC alignment takes seconds)."""
        if not self.ctx.comm.is_main:
            return
        pose = None
        if self.true_rotations is not None:
            event, pose = pose_error_event(
                branch, self.true_rotations, self.true_shifts, stamp, self._truth_symmetry()
            )
            yield event
        volume_real = branch.volume_real()
        if self.ground_truth_map is not None:
            translate = self.ctx.config.encoder.estimate_shifts
            pixel_size = self.ctx.pixel_size_angstrom
            yield resolution_event(
                volume_real, self.ground_truth_map, pixel_size, pose, stamp, translate=translate
            )
        if self.tracked is not None and branch.encoder is not None:
            yield candidates_event(self.ctx, branch, self.tracked, self.true_rotations, stamp)
        if branch.phase is Phase.AMORTIZED:
            yield assignment_event(branch, self.true_rotations, pose, stamp)
        yield VolumeEvent(
            volume=volume_real.numpy(), voxel_size_angstrom=self.ctx.pixel_size_angstrom, **stamp
        )

    def _truth_symmetry(self) -> NearSymmetry | None:
        """The true map's near-symmetry (once per map: a map search of a few seconds), or None."""
        if self.ground_truth_map is None:
            return None
        key = (tuple(self.ground_truth_map.shape), hash(self.ground_truth_map.numpy().tobytes()))
        if key not in _SYMMETRY_OF_MAP:
            _SYMMETRY_OF_MAP[key] = find_near_symmetry(self.ground_truth_map)
        return _SYMMETRY_OF_MAP[key]

    def summary(self, branches: list[Branch]) -> dict[str, float]:
        """Epochs done and, with true poses, the pose error of each branch (keys prefixed with
        ``branch/`` but for ``main``)."""
        out: dict[str, float] = {}
        for branch in branches:
            prefix = "" if branch.name == "main" else f"{branch.name}/"
            out[f"{prefix}epochs"] = float(branch.epoch)
            if self.true_rotations is not None:
                truth, estimate = branch.rows(self.true_rotations), branch.rows(branch.current_rotations())
                pose = metrics.pose_error(truth, estimate)
                out[f"{prefix}pose_error_mean_deg"] = pose.mean_deg
                out[f"{prefix}pose_error_median_deg"] = pose.median_deg
        return out
