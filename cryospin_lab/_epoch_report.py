"""Events an epoch end reports beside the loss: FSC against the true map, each image's winning head."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cryospin_lab import metrics, so3
from cryospin_lab.branch import Branch
from cryospin_lab.events import HeadAssignmentEvent, ResolutionEvent

__all__ = ["POSE_ALIGNMENT_MAX_MEDIAN_DEG", "assignment_event", "resolution_event"]

# Above this median pose error the pose-derived map alignment is unreliable (see resolution_event).
POSE_ALIGNMENT_MAX_MEDIAN_DEG = 30.0


def resolution_event(
    volume_real: Tensor,
    truth_map: Tensor,
    pixel_size_angstrom: float,
    pose: metrics.PoseError | None,
    stamp: dict,
) -> ResolutionEvent:
    """FSC against the true map, after aligning the map with the pose alignment (or a map search).

    The global rotation fitted to the poses is only meaningful once most
    poses are right; while the median pose error is above
    ``POSE_ALIGNMENT_MAX_MEDIAN_DEG`` (e.g. on the amortized plateau, when
    two pose populations related by a pseudo-symmetry are mixed) the map
    is aligned by a map-to-map search instead (~2 s at D=64).
    """
    if pose is not None and pose.median_deg <= POSE_ALIGNMENT_MAX_MEDIAN_DEG:
        alignment = metrics.MapAlignment(
            rotation=pose.global_rotation,
            flipped=pose.flipped,
            shift_voxels=torch.zeros(3),
            correlation=math.nan,
        )
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
