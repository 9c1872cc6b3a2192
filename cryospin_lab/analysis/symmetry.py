"""A map's own (near-)symmetry, found by aligning the map onto itself away from the identity.

A pose and its mate across a near-symmetry ``Q`` of the map (``V(Q x) ~ V(x)``)
explain an image almost equally, so a pose error against the truth means
little without it (HSP90's near two-fold: docs/method.md §6). Reports state
both the raw error and the error modulo the detected symmetry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryospin_lab.analysis._map_alignment import MapAlignment, _as_volume, align_maps, apply_map_alignment
from cryospin_lab.physics import so3

__all__ = ["NearSymmetry", "find_near_symmetry"]

MIN_CORRELATION = 0.9  # a map this close to its rotated copy is treated as (near-)symmetric
_EXCLUDE_DEG = 45.0  # searches start this far from the identity (its basin holds the trivial answer)


@dataclass(frozen=True, eq=False)
class NearSymmetry:
    """A cyclic (near-)symmetry: ``rotations`` ``(n - 1, 3, 3)`` are ``Q, Q^2, ..., Q^(n-1)``."""

    order: int
    rotations: Tensor
    axis: Tensor  # (3,) unit, (x, y, z) on the map's axes
    correlation: float  # of the map with its copy under Q

    def describe(self) -> str:
        exact = self.correlation > 0.995
        return f"its {'' if exact else 'near '}{self.order}-fold"


def find_near_symmetry(volume, *, min_correlation: float = MIN_CORRELATION) -> NearSymmetry | None:
    """The map's best non-trivial self-alignment, as a cyclic symmetry, or None.

    The map is aligned onto itself (``align_maps``, same hand, starts at least
    45° from the identity). If its copy under the rotation ``Q`` found
    correlates above ``min_correlation`` (0.9) and ``Q``'s angle is close to
    ``360° / n`` for an order ``n`` from 2 to 8, the symmetry is ``Q``'s powers;
    else None. Takes a few seconds (a map search).
    """
    vol = _as_volume(volume, "volume")
    alignment = align_maps(vol, vol, try_flip=False, exclude_within_deg=_EXCLUDE_DEG)
    if alignment.correlation < min_correlation:
        return None
    # aligned(x) = V(R^T (x - t)) ~ V(x): Q = R^T, about the box centre (t ~ 0 for a centred map)
    q = alignment.rotation.T.contiguous()
    omega = so3.log_so3(q[None])[0]
    angle = float(omega.norm())
    if angle < math.radians(_EXCLUDE_DEG / 2):
        return None  # slid back to the identity
    order = round(2 * math.pi / angle)
    if not 2 <= order <= 8 or abs(order * angle - 2 * math.pi) > math.radians(15):
        return None
    axis = omega / angle
    # The search may land on Q^2 of a 4-fold (both fit equally): try the finer turns about the axis.
    refined = True
    while refined and order <= 4:
        refined = False
        for m in (2, 3):
            if order * m <= 8 and _self_correlation(vol, so3.exp_so3(axis * (2 * math.pi / (order * m)))) >= (
                min_correlation
            ):
                order, refined = order * m, True
                break
    exact = so3.exp_so3(axis * (2 * math.pi / order))
    powers = [torch.linalg.matrix_power(exact, k) for k in range(1, order)]
    return NearSymmetry(order, torch.stack(powers), axis, alignment.correlation)


def _self_correlation(volume: Tensor, q: Tensor) -> float:
    """Pearson correlation of ``V(Q x)`` with ``V(x)`` (about the box centre)."""
    copy = apply_map_alignment(
        volume, MapAlignment(q.T.contiguous(), False, torch.zeros(3, dtype=q.dtype), 0.0)
    )
    a, b = copy.flatten().double(), volume.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-30))
