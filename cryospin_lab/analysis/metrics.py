"""Reconstruction metrics: FSC and resolution, map-to-map alignment, pose and shift errors.

FSC (docs/method.md §6)
    ``FSC(r) = sum_shell Re(A B*) / sqrt(sum_shell |A|^2 sum_shell |B|^2)`` over the
    integer shells ``r = round(|k|)``, ``r = 0 .. D//2`` of the centred 3-D transform
    (``fourier.fft_center``, ``fourier.radial_index_3d``); voxels beyond ``D//2``
    (the cube's corners) are left out. Shell ``r`` sits at ``r / (D * apix)`` per Å.
    Not torch-fourier-shell-correlation, which spreads every voxel over the two
    nearest shells with linear ("tent") weights on the rfft half-space, so its
    shells are not these integer shells; the tests compare both where the
    definitions coincide.

Map alignment
    :func:`align_maps` and :func:`apply_map_alignment` (``cryospin_lab.analysis._map_alignment``: the
    transform's convention and the search).

Pose error
    Projections are unchanged when the map is rotated by ``Q`` (``V'(x) = V(Q^T x)``)
    and every pose ``R_i`` becomes ``R_i Q^T``: the global rotation multiplies poses on
    the *right*. :func:`pose_error` therefore aligns the transposes with
    ``so3.align_rotations`` (which fits ``R_ref ~ G F(R_est)``, G on the left), so that
    ``R_gt ~ F(R_est) @ G^T``; ``G`` is then the same rotation that
    :func:`align_maps` returns for the estimated map against the true one.
    In-plane shifts are unchanged by the global rotation and hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryospin_lab.analysis._map_alignment import (
    MapAlignment,
    _as_volume,
    align_maps,
    apply_map_alignment,
    find_translation,
)
from cryospin_lab.physics import fourier, so3

__all__ = [
    "FSCCurve",
    "Resolution",
    "compute_fsc",
    "spherical_mask",
    "MapAlignment",
    "align_maps",
    "apply_map_alignment",
    "find_translation",
    "fsc_vs_ground_truth",
    "PoseError",
    "pose_error",
    "ShiftError",
    "shift_error_angstrom",
]


# --------------------------------------------------------------------------- FSC


@dataclass(frozen=True)
class Resolution:
    """Where an FSC curve first drops below ``threshold``.

    ``limited_by_nyquist`` is True when the curve never drops below the threshold:
    then ``angstrom`` is the resolution of the last shell (``2 * apix``, Nyquist, for
    even boxes) and is a bound, not a measurement.
    """

    threshold: float
    angstrom: float
    frequency_per_angstrom: float
    limited_by_nyquist: bool


@dataclass(frozen=True)
class FSCCurve:
    """Fourier shell correlation per integer shell ``r = 0 .. D//2``.

    Fields are numpy arrays of length ``D//2 + 1``: ``frequencies_per_angstrom``
    (``r / (D * apix)``), ``fsc``, and ``n_voxels`` (voxels in each shell; the FSC of
    two independent noise maps has standard deviation ``1/sqrt(n_voxels)``).
    """

    frequencies_per_angstrom: np.ndarray
    fsc: np.ndarray
    n_voxels: np.ndarray
    pixel_size_angstrom: float

    def resolution(self, threshold: float) -> Resolution:
        """First crossing of ``threshold``, linearly interpolated between shells.

        The search starts at shell 1; shell 0 (DC, a single voxel whose "correlation"
        is only the sign of the two means) counts as 1. If shell ``r`` is the first
        with ``fsc < threshold``, the crossing frequency is
        ``f[r-1] + (fsc[r-1] - t) / (fsc[r-1] - fsc[r]) * (f[r] - f[r-1])``.
        """
        if not -1.0 < threshold < 1.0:
            raise ValueError(f"FSC threshold must lie in (-1, 1), got {threshold}")
        fsc = self.fsc.astype(np.float64).copy()
        fsc[0] = 1.0
        freqs = self.frequencies_per_angstrom
        below = np.nonzero(fsc[1:] < threshold)[0]
        if below.size == 0:
            f = float(freqs[-1])
            return Resolution(threshold, 1.0 / f, f, True)
        r = int(below[0]) + 1
        c0, c1 = fsc[r - 1], fsc[r]
        f = float(freqs[r - 1] + (c0 - threshold) / (c0 - c1) * (freqs[r] - freqs[r - 1]))
        return Resolution(threshold, 1.0 / f if f > 0 else math.inf, f, False)

    def resolution_angstrom(self, threshold: float) -> float:
        """``1 / frequency`` where the FSC first drops below ``threshold`` (see :meth:`resolution`)."""
        return self.resolution(threshold).angstrom

    @property
    def resolution_at_0_5(self) -> float:
        """Resolution (Å) at FSC = 0.5, the criterion against a ground-truth map."""
        return self.resolution_angstrom(0.5)

    @property
    def resolution_at_0_143(self) -> float:
        """Resolution (Å) at FSC = 0.143, the criterion between independent half maps."""
        return self.resolution_angstrom(0.143)


def _check_pixel_size(pixel_size_angstrom: float) -> float:
    if not (pixel_size_angstrom > 0 and math.isfinite(pixel_size_angstrom)):
        raise ValueError(f"pixel_size_angstrom must be a positive number, got {pixel_size_angstrom}")
    return float(pixel_size_angstrom)


def spherical_mask(
    box_size: int, radius_voxels: float | None = None, soft_edge_voxels: float = 0.0
) -> Tensor:
    """Real-space ``(D, D, D)`` float64 mask around ``D // 2``: 1 inside ``radius``.

    With ``soft_edge_voxels > 0`` it falls to 0 over that width with a raised cosine.
    The default radius is ``D/2 - soft_edge_voxels`` (zero at the box faces).
    """
    radius = box_size / 2 - soft_edge_voxels if radius_voxels is None else float(radius_voxels)
    if radius <= 0 or soft_edge_voxels < 0:
        raise ValueError(f"spherical_mask: radius {radius} and soft edge {soft_edge_voxels} must be positive")
    k = torch.arange(box_size, dtype=torch.float64) - box_size // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    r = torch.sqrt(x**2 + y**2 + z**2)
    if soft_edge_voxels == 0:
        return (r <= radius).to(torch.float64)
    s = ((r - radius) / soft_edge_voxels).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * s))


def compute_fsc(volume_a, volume_b, pixel_size_angstrom: float, *, mask: Tensor | None = None) -> FSCCurve:
    """FSC between two ``(D, D, D)`` real maps (torch or numpy) over integer shells.

    ``mask`` (optional, off by default): a real-space ``(D, D, D)`` weight multiplied
    into both maps first, e.g. :func:`spherical_mask` with a soft edge. A sharp mask
    correlates the noise of the two maps and inflates the FSC at high frequency.
    """
    a = _as_volume(volume_a, "volume_a")
    b = _as_volume(volume_b, "volume_b")
    if a.shape != b.shape:
        raise ValueError(f"FSC needs maps of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    apix = _check_pixel_size(pixel_size_angstrom)
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.float64)
        if mask.shape != a.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from the maps' {tuple(a.shape)}")
        a, b = a * mask, b * mask
    d = a.shape[0]
    n_shells = d // 2 + 1
    fa, fb = fourier.fft_center(a, 3), fourier.fft_center(b, 3)
    shells = fourier.radial_index_3d(d).flatten()
    inside = shells < n_shells
    idx = shells[inside]

    def shell_sum(values: Tensor) -> Tensor:
        return torch.zeros(n_shells, dtype=torch.float64).index_add_(0, idx, values.flatten()[inside])

    cross = shell_sum((fa * fb.conj()).real)
    power_a = shell_sum(fa.abs() ** 2)
    power_b = shell_sum(fb.abs() ** 2)
    denom = torch.sqrt(power_a * power_b)
    fsc = torch.where(denom > 0, cross / denom.clamp(min=1e-300), torch.zeros_like(cross))
    n_voxels = torch.bincount(idx, minlength=n_shells)
    freqs = np.arange(n_shells) / (d * apix)
    return FSCCurve(freqs, fsc.numpy(), n_voxels.numpy(), apix)


def fsc_vs_ground_truth(
    volume,
    ground_truth,
    pixel_size_angstrom: float,
    align: bool = True,
    *,
    mask: Tensor | None = None,
    verbose: bool = False,
) -> tuple[FSCCurve, MapAlignment | None]:
    """FSC of ``volume`` against ``ground_truth``, after :func:`align_maps` when ``align``.

    Read the resolution at 0.5 (``curve.resolution_at_0_5``). ``mask`` as in
    :func:`compute_fsc`, applied after alignment.
    """
    _check_pixel_size(pixel_size_angstrom)
    alignment = None
    if align:
        alignment = align_maps(volume, ground_truth, verbose=verbose)
        volume = apply_map_alignment(volume, alignment)
    return compute_fsc(volume, ground_truth, pixel_size_angstrom, mask=mask), alignment


# --------------------------------------------------------------------- pose error


@dataclass(frozen=True)
class PoseError:
    """Geodesic pose errors after the best global rotation and hand.

    ``R_gt ~ F(R_est) @ global_rotation^T`` with ``F(R) = J R J`` if ``flipped``
    (``J = diag(1, 1, -1)``). ``global_rotation`` equals the :class:`MapAlignment`
    rotation that takes the estimated map onto the true one.
    """

    mean_deg: float
    median_deg: float
    errors_deg: np.ndarray
    flipped: bool
    global_rotation: Tensor

    def align(self, rotations_est: Tensor) -> Tensor:
        """Estimated rotations moved into the ground-truth frame."""
        r = torch.as_tensor(rotations_est, dtype=torch.float64)
        if self.flipped:
            r = so3.flip_handedness(r)
        return r @ self.global_rotation.T


def pose_error(rotations_gt, rotations_est, *, symmetry_rotations=None) -> PoseError:
    """Mean/median geodesic error (degrees) of ``(N, 3, 3)`` rotations after global alignment.

    Uses ``so3.align_rotations`` (both hands, Procrustes then refits on the better
    half, so a minority of outlier poses does not bias the global rotation) on the
    transposed matrices, because the global ambiguity multiplies poses on the right
    (see the module docstring).

    ``symmetry_rotations`` ``(K, 3, 3)``: rotations ``Q`` under which the true map
    is (pseudo-)symmetric, ``V(Q x) ~ V(x)``; the poses ``R`` and ``R Q^T`` then
    explain an image equally well, and each image's error is the smallest over
    its symmetric copies (the identity is always included). Without it, a
    pose on the wrong side of a pseudo-symmetry counts as wrong.
    """
    gt = torch.as_tensor(rotations_gt, dtype=torch.float64)
    est = torch.as_tensor(rotations_est, dtype=torch.float64)
    if gt.shape != est.shape or gt.ndim != 3 or gt.shape[-2:] != (3, 3) or gt.shape[0] == 0:
        raise ValueError(
            f"pose_error needs rotations_gt and rotations_est of equal shape (N, 3, 3), "
            f"got {tuple(gt.shape)} and {tuple(est.shape)}"
        )
    result = so3.align_rotations(gt.transpose(-1, -2), est.transpose(-1, -2))
    errors, flipped, rotation = result.errors_deg, bool(result.flipped), result.global_rotation
    if symmetry_rotations is not None:
        sym = torch.as_tensor(symmetry_rotations, dtype=torch.float64).reshape(-1, 3, 3)
        sym = torch.cat([torch.eye(3, dtype=torch.float64)[None], sym])
        errors = _symmetric_errors(gt, est, sym, flipped, rotation)
        fit = _symmetric_alignment(gt, est, sym)
        if fit is not None and fit[0].median() < errors.median():
            errors, flipped, rotation = fit
    errors = errors.numpy()
    return PoseError(float(errors.mean()), float(np.median(errors)), errors, flipped, rotation)


def _symmetric_errors(gt: Tensor, est: Tensor, sym: Tensor, flipped: bool, rotation: Tensor) -> Tensor:
    """Per image: the smallest error over the symmetric copies ``R_gt Q^T`` of the truth."""
    aligned = (so3.flip_handedness(est) if flipped else est) @ rotation.T
    copies = gt[:, None] @ sym.transpose(-1, -2)[None]  # (N, K, 3, 3)
    return so3.geodesic_angle_deg(copies, aligned[:, None]).min(dim=1).values


def _symmetric_alignment(
    gt: Tensor, est: Tensor, sym: Tensor, n_seeds: int = 48, n_score: int = 2000, n_refine: int = 3
) -> tuple[Tensor, bool, Tensor] | None:
    """Global rotation and hand fitted *modulo* the symmetry: ``R_gt Q_k^T ~ F(R_est) G^T``.

    A symmetry-blind Procrustes fit is pulled between the frames of images that
    sit on either side of a pseudo-symmetry. Here every (image, copy, hand)
    of a few seed images proposes ``G`` exactly; each proposal is scored by the
    median over a subset of images of the error to the nearest copy; the best
    is refined by Procrustes on the better half with each image's nearest copy.
    Deterministic (evenly spaced seeds). None for fewer than 3 images.
    """
    n = len(gt)
    if n < 3:
        return None
    seeds = torch.linspace(0, n - 1, min(n, n_seeds)).round().long()
    scored = torch.linspace(0, n - 1, min(n, n_score)).round().long()
    copies = gt[:, None] @ sym.transpose(-1, -2)[None]  # (N, K, 3, 3): R_gt Q^T
    best = None
    for flipped in (False, True):
        est_h = so3.flip_handedness(est) if flipped else est
        # G^T = F(R_est)^T R_gt Q^T for each seed image and copy: (S*K, 3, 3)
        proposals = (est_h[seeds, None].transpose(-1, -2) @ copies[seeds]).reshape(-1, 3, 3).transpose(-1, -2)
        aligned = est_h[scored][None] @ proposals.transpose(-1, -2)[:, None]  # (P, M, 3, 3)
        err = so3.geodesic_angle_deg(copies[scored][None], aligned[:, :, None]).min(dim=-1).values
        pick = err.median(dim=1).values.argmin()
        rotation = proposals[pick]
        for _ in range(n_refine):
            per_copy = so3.geodesic_angle_deg(copies, (est_h @ rotation.T)[:, None])  # (N, K)
            nearest = per_copy.argmin(dim=1)
            target = copies[torch.arange(n), nearest]
            keep = per_copy.min(dim=1).values <= per_copy.min(dim=1).values.median()
            # Procrustes for G in R_gt' ~ F(R_est) G^T, i.e. R_gt'^T ~ G F(R_est)^T.
            rotation = so3._procrustes(target[keep].transpose(-1, -2), est_h[keep].transpose(-1, -2))
        errors = _symmetric_errors(gt, est, sym, flipped, rotation)
        if best is None or errors.median() < best[0].median():
            best = (errors, flipped, rotation)
    return best


@dataclass(frozen=True)
class ShiftError:
    """Per-image in-plane shift error ``|t_gt - t_est|`` in Å, with mean and median; the global 3-D
    translation removed first (Å, ``(x, y, z)``, None when none was fitted)."""

    mean_angstrom: float
    median_angstrom: float
    errors_angstrom: np.ndarray
    translation_angstrom: np.ndarray | None = None


def shift_error_angstrom(shifts_gt, shifts_est, rotations_est=None) -> ShiftError:
    """Euclidean error of ``(N, 2)`` in-plane shifts (Å).

    The global rotation and hand change no in-plane shift, but a reconstruction
    made with estimated shifts may sit translated by ``u`` in its box: every
    image's shift then carries the in-plane part of ``R_i u``. Given the
    estimated rotations ``(N, 3, 3)``, ``u`` is fitted by least squares (refitted
    on the better half of the images, so that wrong poses do not bias it) and
    removed; without them the shifts are compared directly.
    """
    gt = np.asarray(so3.as_numpy(shifts_gt), dtype=np.float64)
    est = np.asarray(so3.as_numpy(shifts_est), dtype=np.float64)
    if gt.shape != est.shape or gt.ndim != 2 or gt.shape[1] != 2 or gt.shape[0] == 0:
        raise ValueError(
            f"shift_error_angstrom needs shifts_gt and shifts_est of equal shape (N, 2), "
            f"got {gt.shape} and {est.shape}"
        )
    translation = None
    if rotations_est is not None:
        rows = np.asarray(so3.as_numpy(rotations_est), dtype=np.float64)[:, :2, :]  # (N, 2, 3)
        if rows.shape[0] != gt.shape[0]:
            raise ValueError(f"rotations_est must be (N, 3, 3) with N = {gt.shape[0]}, got {rows.shape}")
        keep = np.ones(len(gt), dtype=bool)
        for _ in range(3):
            translation = np.linalg.lstsq(
                rows[keep].reshape(-1, 3), (est - gt)[keep].reshape(-1), rcond=None
            )[0]
            errors = np.linalg.norm(gt - (est - rows @ translation), axis=1)
            keep = errors <= np.median(errors)
        est = est - rows @ translation
    errors = np.linalg.norm(gt - est, axis=1)
    return ShiftError(float(errors.mean()), float(np.median(errors)), errors, translation)
