"""Gold-standard mode: two independent half-set reconstructions and their half-map FSC (0.143).

With ``TrainingConfig.gold_standard`` the :class:`~cryospin_lab.engine.trainer.Trainer`
runs two branches, ``half1`` and ``half2``, on the two halves of
``ParticleStack.half_split(seed)``, each from its own initialisation (seed and
seed + 1), and holds a :class:`GoldStandard` that reports their FSC. The halves
are independent ab-initio reconstructions, so half 2 may sit in another frame
or hand: it is aligned onto half 1 by a map search (``metrics.align_maps``)
before the FSC, and its poses are moved into half 1's frame with the same
alignment (``R -> F(R) G^T``, the gauge of ``metrics.pose_error``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryospin_lab.analysis import metrics
from cryospin_lab.engine.branch import Branch
from cryospin_lab.engine.events import Event, ResolutionEvent
from cryospin_lab.physics import so3

__all__ = ["HALF_NAMES", "GoldStandard", "GoldStandardResult"]

HALF_NAMES = ("half1", "half2")
HALF_MAP_THRESHOLD = 0.143  # FSC between independent half maps (Rosenthal & Henderson 2003)


@dataclass(frozen=True, eq=False)
class GoldStandardResult:
    """What a gold-standard run delivers (see :meth:`GoldStandard.result`)."""

    average_map: Tensor  # (D, D, D) mean of half 1 and half 2 aligned onto it
    half1_map: Tensor
    half2_map: Tensor  # aligned onto half 1
    fsc: metrics.FSCCurve  # half 1 vs aligned half 2
    resolution_angstrom: float  # at FSC 0.143
    rotations: Tensor  # (N, 3, 3) every particle's pose from its own half, in half 1's frame
    shifts_angstrom: Tensor | None  # (N, 2) when shifts are estimated
    subset_of_row: np.ndarray  # (N,) 1 or 2: the half each particle belongs to (rlnRandomSubset)


class GoldStandard:
    """The half-map report of a gold-standard run, held by its trainer.

    ``reported_epoch`` is the last epoch whose half-map FSC went out (restored
    from the halves' epochs when a run resumes), so that each epoch is
    reported once, when the second half finishes it.
    """

    def __init__(self, pixel_size_angstrom: float, reported_epoch: int = 0):
        self.pixel_size_angstrom = float(pixel_size_angstrom)
        self.reported_epoch = reported_epoch

    def epoch_events(self, half1: Branch, half2: Branch, stamp: dict) -> Iterator[Event]:
        """The half-map FSC once both halves have finished the same epoch, else nothing."""
        epoch = half1.epoch
        if half2.epoch != epoch or epoch <= self.reported_epoch:
            return  # the other half has not finished this epoch yet (or it was reported)
        self.reported_epoch = epoch
        *_, curve = self.half_maps(half1, half2)
        yield ResolutionEvent.from_curve(curve, kind="half_maps", threshold=HALF_MAP_THRESHOLD, **stamp)

    @torch.no_grad()
    def half_maps(
        self, half1: Branch, half2: Branch
    ) -> tuple[Tensor, Tensor, metrics.MapAlignment, metrics.FSCCurve]:
        """Half 1's map, half 2's map aligned onto it by a map search, that alignment, their FSC."""
        half_a, half_b = half1.volume_real(), half2.volume_real()
        alignment = metrics.align_maps(half_b, half_a)
        aligned = metrics.apply_map_alignment(half_b, alignment)
        return half_a, aligned, alignment, metrics.compute_fsc(half_a, aligned, self.pixel_size_angstrom)

    @torch.no_grad()
    def result(
        self, half1: Branch, half2: Branch, n_particles: int, *, estimate_shifts: bool
    ) -> GoldStandardResult:
        """Both halves' maps in half 1's frame, their mean, and every particle's pose from its half
        (shifts, when estimated, are zero for a half still in the amortized stage)."""
        map1, map2_aligned, alignment, curve = self.half_maps(half1, half2)
        rotations = torch.empty(n_particles, 3, 3, dtype=torch.float64)
        shifts = torch.zeros(n_particles, 2, dtype=torch.float64) if estimate_shifts else None
        subset_of_row = np.zeros(n_particles, dtype=np.int64)
        for number, half in ((1, half1), (2, half2)):
            rows = half.subset
            r = half.current_rotations().double()[rows]
            if number == 2:
                r = (so3.flip_handedness(r) if alignment.flipped else r) @ alignment.rotation.double().T
            rotations[rows] = r
            s = half.current_shifts()
            if shifts is not None and s is not None:
                shifts[rows] = s.double()[rows]
            subset_of_row[rows.numpy()] = number
        return GoldStandardResult(
            average_map=(map1 + map2_aligned) / 2,
            half1_map=map1,
            half2_map=map2_aligned,
            fsc=curve,
            resolution_angstrom=curve.resolution_angstrom(HALF_MAP_THRESHOLD),
            rotations=rotations,
            shifts_angstrom=shifts,
            subset_of_row=subset_of_row,
        )
