"""Gold-standard mode: two independent half-set reconstructions and their half-map FSC (0.143).

With ``TrainingConfig.gold_standard`` the :class:`~cryospin_lab.training.Trainer`
runs two branches, ``half1`` and ``half2``, on the two halves of
``ParticleStack.half_split(seed)``, each from its own initialisation (seed and
seed + 1). The halves are independent ab-initio reconstructions, so half 2 may
sit in another frame or hand: it is aligned onto half 1 by a map search
(``metrics.align_maps``) before the FSC, and its poses are moved into half 1's
frame with the same alignment (``R -> F(R) G^T``, the gauge of
``metrics.pose_error``). Hand-written on the engine's metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from cryospin_lab import metrics, so3
from cryospin_lab.events import Event, ResolutionEvent

if TYPE_CHECKING:
    from cryospin_lab.training import Trainer

__all__ = ["GoldStandardResult", "half_map_events", "half_maps", "gold_standard_result"]


@dataclass(frozen=True, eq=False)
class GoldStandardResult:
    """What a gold-standard run delivers (see :meth:`Trainer.gold_standard_result`)."""

    average_map: Tensor  # (D, D, D) mean of half 1 and half 2 aligned onto it
    half1_map: Tensor
    half2_map: Tensor  # aligned onto half 1
    fsc: metrics.FSCCurve  # half 1 vs aligned half 2
    resolution_angstrom: float  # at FSC 0.143
    rotations: Tensor  # (N, 3, 3) every particle's pose from its own half, in half 1's frame
    shifts_angstrom: Tensor | None  # (N, 2) when shifts are estimated
    subset_of_row: np.ndarray  # (N,) 1 or 2: the half each particle belongs to (rlnRandomSubset)


def half_map_events(trainer: Trainer) -> Iterator[Event]:
    """Half-map FSC (0.143) once both halves have finished the same epoch."""
    halves = {b.name: b for b in trainer.branches + trainer.finished if b.name in ("half1", "half2")}
    if len(halves) != 2:
        return
    epoch = halves["half1"].epoch
    if halves["half2"].epoch != epoch or epoch <= trainer._half_map_epoch:
        return  # the other half has not finished this epoch yet (or it was reported)
    trainer._half_map_epoch = epoch
    half_a, half_b, _, curve = trainer.half_maps()
    yield ResolutionEvent.from_curve(
        curve, kind="half_maps", threshold=0.143, **trainer._stamp(halves["half1"])
    )


@torch.no_grad()
def half_maps(trainer: Trainer) -> tuple[Tensor, Tensor, metrics.MapAlignment, metrics.FSCCurve]:
    """Gold standard: half 1's map, half 2's map aligned onto it, that alignment, and their FSC.

    The halves are independent ab-initio reconstructions, so half 2 may sit in
    another frame or hand: it is aligned by a map search (``metrics.align_maps``)
    before the FSC. Raises RuntimeError outside gold-standard mode.
    """
    if not trainer.config.gold_standard:
        raise RuntimeError("half_maps() needs a gold-standard run (TrainingConfig.gold_standard=True)")
    half_a, half_b = trainer.volume_real("half1"), trainer.volume_real("half2")
    alignment = metrics.align_maps(half_b, half_a)
    aligned = metrics.apply_map_alignment(half_b, alignment)
    return half_a, aligned, alignment, metrics.compute_fsc(half_a, aligned, trainer.pixel_size_angstrom)


@torch.no_grad()
def gold_standard_result(trainer: Trainer) -> GoldStandardResult:
    """The gold-standard outputs: both halves in half 1's frame, their mean, every particle's pose.

    Half 2's poses are moved into half 1's frame with the map alignment
    (``R -> F(R) G^T``, the gauge of ``metrics.pose_error``).
    """
    half1, half2_aligned, alignment, curve = trainer.half_maps()
    n = len(trainer.stack)
    rotations = torch.empty(n, 3, 3, dtype=torch.float64)
    shifts = None if not trainer.config.encoder.estimate_shifts else torch.zeros(n, 2, dtype=torch.float64)
    subset_of_row = np.zeros(n, dtype=np.int64)
    for number, name in ((1, "half1"), (2, "half2")):
        branch = trainer.branch(name)
        rows = branch.subset
        r, s = trainer.poses(name)
        r = r.double()[rows]
        if number == 2:
            r = (so3.flip_handedness(r) if alignment.flipped else r) @ alignment.rotation.double().T
        rotations[rows] = r
        if shifts is not None and s is not None:
            shifts[rows] = s.double()[rows]
        subset_of_row[rows.numpy()] = number
    return GoldStandardResult(
        average_map=(half1 + half2_aligned) / 2,
        half1_map=half1,
        half2_map=half2_aligned,
        fsc=curve,
        resolution_angstrom=curve.resolution_angstrom(0.143),
        rotations=rotations,
        shifts_angstrom=shifts,
        subset_of_row=subset_of_row,
    )
