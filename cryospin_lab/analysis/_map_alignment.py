"""Map-to-map alignment: a rotation, a translation and a hand that take a map onto a reference.

A reconstruction is defined only up to a rotation, a translation and its hand.
:func:`align_maps` finds the transform that takes ``volume`` onto ``reference``;
:func:`apply_map_alignment` applies it::

    aligned(x) = volume(J^f R^T (x - t))

with ``x = (x, y, z)`` in voxels relative to the box centre ``D // 2``,
``J = diag(1, 1, -1)`` (mirror z about the centre) applied when ``flipped``,
``R = rotation`` and ``t = shift_voxels`` ``(x, y, z)``: mirror, then rotate by ``R``,
then move by ``t``. Poses follow the same transform: if ``volume`` was
reconstructed with poses ``R_i``, then ``aligned`` explains the same images with
``F(R_i) @ R^T`` (``F(R) = J R J`` when flipped; see :class:`cryospin_lab.analysis.metrics.PoseError`).
Resampling is trilinear (``torch.nn.functional.grid_sample``), which damps the
highest frequencies slightly; being nearly a per-shell factor it barely moves the FSC.

Search: an exhaustive grid over SO(3) (HEALPix view directions x in-plane angles,
both hands) on Fourier-cropped maps (``coarse_box_size``, default 16), with the
translation of each candidate from an FFT cross-correlation; then the best distinct
candidates of each hand are refined by L-BFGS on the real-space correlation
(rotation as ``exp_so3`` perturbation, sub-voxel translation, gradients through
``grid_sample``) at growing box sizes (24, then 48); seconds on a CPU
(docs/decisions.md#fsc-map-search). For a symmetric map any
symmetry-equivalent rotation may come back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor

from cryospin_lab.physics import fourier, so3

__all__ = ["MapAlignment", "align_maps", "apply_map_alignment", "find_translation"]

_J = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


def _as_volume(volume, name: str) -> Tensor:
    v = torch.as_tensor(volume)
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise ValueError(f"{name} must be a cubic (D, D, D) volume, got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    return v.to(torch.float64)


@dataclass(frozen=True)
class MapAlignment:
    """Transform taking a map onto a reference: ``aligned(x) = volume(J^f R^T (x - t))``.

    ``rotation`` ``R`` (3, 3) float64; ``flipped``: mirror z about the box centre first;
    ``shift_voxels`` ``t`` (3,) as ``(x, y, z)`` in voxels of the aligned maps' box;
    ``correlation``: real-space Pearson correlation of the aligned map with the reference
    over the whole box.
    """

    rotation: Tensor
    flipped: bool
    shift_voxels: Tensor
    correlation: float

    def sampling_matrix(self) -> Tensor:
        """``J^f R^T``: the matrix that maps output positions to positions in the input map."""
        rt = self.rotation.to(torch.float64).T
        return _J @ rt if self.flipped else rt


def _centred_coords(d: int, dtype: torch.dtype, radius: float | None = None) -> tuple[Tensor, Tensor]:
    """Voxel positions ``(x, y, z)`` relative to ``D // 2`` (``[z, y, x]`` raster order).

    Returns ``(coords (M, 3), flat_index (M,))``: all ``D^3`` voxels, or only those with
    ``|x| <= radius`` (the sphere that holds a particle: fewer samples to interpolate).
    """
    k = torch.arange(d, dtype=dtype) - d // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    coords = torch.stack([x, y, z], dim=-1).reshape(-1, 3)
    index = torch.arange(d**3)
    if radius is not None:
        keep = coords.norm(dim=-1) <= radius
        coords, index = coords[keep], index[keep]
    return coords, index


def _resample(volume: Tensor, sampling_matrices: Tensor, shifts: Tensor, coords: Tensor) -> Tensor:
    """Trilinear ``volume(S (x - t))`` at ``coords`` (M, 3) for a batch ``S`` (B, 3, 3), ``t`` (B, 3).

    Returns ``(B, M)``. All candidates share one ``grid_sample`` call (candidates along
    the grid's depth axis), so the input is not copied per candidate.
    ``align_corners=True`` puts voxel ``i`` at ``-1 + 2 i / (D - 1)``; the centre
    ``D // 2`` is not 0 for even D, hence the explicit offset. Outside the box: 0.
    """
    d = volume.shape[-1]
    b, m = sampling_matrices.shape[0], coords.shape[0]
    # pos[b, m] = S_b (x_m - t_b) by broadcasting: on CPU, matmul with an inner size of 3 is slow
    # (docs/decisions.md#cpu-matmul-kernels).
    # Component by component, so no (B, M, 3, 3) temporary is built.
    offsets = (sampling_matrices * shifts[:, None, :]).sum(-1)  # (B, 3): S_b t_b
    x, y, z = coords[:, 0], coords[:, 1], coords[:, 2]
    pos = torch.stack(
        [
            x * sampling_matrices[:, i, 0, None]
            + y * sampling_matrices[:, i, 1, None]
            + z * sampling_matrices[:, i, 2, None]
            - offsets[:, i, None]
            for i in range(3)
        ],
        dim=-1,
    )  # (B, M, 3)
    grid = ((pos + d // 2) * (2.0 / (d - 1)) - 1.0).to(volume.dtype)
    out = nnf.grid_sample(
        volume[None, None],
        grid.reshape(1, b, m, 1, 3),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )
    return out.reshape(b, m)


def apply_map_alignment(volume, alignment: MapAlignment) -> Tensor:
    """``volume(J^f R^T (x - t))`` by trilinear interpolation (zeros outside the box); float64."""
    v = _as_volume(volume, "volume")
    d = v.shape[0]
    s = alignment.sampling_matrix()[None]
    t = alignment.shift_voxels.to(torch.float64).reshape(1, 3)
    coords, _ = _centred_coords(d, torch.float64)
    return _resample(v, s, t, coords).reshape(d, d, d)


_EYE = torch.eye(3, dtype=torch.float64)


def _normalise(x: Tensor) -> Tensor:
    """Zero mean, unit norm along the last axis."""
    x = x - x.mean(dim=-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-30)


def _grid_rotations(nside: int, n_psi: int) -> Tensor:
    """HEALPix pixel centres (view directions) x ``n_psi`` in-plane angles, RELION Euler."""
    import healpy  # heavy; only this function needs it

    theta, phi = healpy.pix2ang(nside, np.arange(12 * nside * nside))
    psi = np.arange(n_psi) * 360.0 / n_psi
    rot = torch.from_numpy(np.degrees(phi))[:, None]
    tilt = torch.from_numpy(np.degrees(theta))[:, None]
    return so3.euler_relion_to_matrix(rot, tilt, torch.from_numpy(psi)[None, :]).reshape(-1, 3, 3)


def _coarse_search(
    volume: Tensor, reference: Tensor, sampling_matrices: Tensor, max_shift: int, batch_size: int, progress
) -> tuple[Tensor, Tensor]:
    """Best correlation and translation ``(x, y, z)`` for every candidate (FFT cross-correlation).

    Only the voxels inside the inscribed sphere are resampled (the rest stay 0).
    """
    d = volume.shape[-1]
    coords, index = _centred_coords(d, torch.float32, radius=d / 2)
    ref = reference.float().flatten()
    ref = torch.zeros(d**3).index_copy_(0, index, _normalise(ref[index])).reshape(d, d, d)
    ref_ft = torch.fft.rfftn(ref)
    k = torch.fft.fftfreq(d, 1.0 / d)
    allowed = k.abs() <= max_shift
    window = (allowed[:, None, None] & allowed[None, :, None] & allowed[None, None, :]).flatten()
    scores, shifts = [], []
    for start in range(0, sampling_matrices.shape[0], batch_size):
        s = sampling_matrices[start : start + batch_size].float()
        b = s.shape[0]
        samples = _normalise(_resample(volume.float(), s, torch.zeros(b, 3), coords))
        moved = torch.zeros(b, d**3).index_copy_(1, index, samples).reshape(b, d, d, d)
        # cc[u] = sum_x ref(x + u) moved(x): the moved map displaced by +u matches best.
        cc = torch.fft.irfftn(ref_ft * torch.fft.rfftn(moved, dim=(-3, -2, -1)).conj(), s=(d, d, d))
        best, arg = cc.flatten(1)[:, window].max(dim=1)
        arg = torch.nonzero(window)[:, 0][arg]
        iz, iy, ix = arg // (d * d), (arg // d) % d, arg % d
        scores.append(best)
        shifts.append(torch.stack([k[ix], k[iy], k[iz]], dim=-1))
        progress.update(b)
    return torch.cat(scores).double(), torch.cat(shifts).double()


def _refine(
    volume: Tensor, reference: Tensor, s0: Tensor, t0: Tensor, max_iter: int
) -> tuple[Tensor, Tensor, float]:
    """L-BFGS on ``-corr(volume(S0 exp([w]x) (x - t)), reference)`` over ``w`` and ``t``.

    The correlation runs over the sphere inscribed in the box.
    """
    d = volume.shape[-1]
    coords, index = _centred_coords(d, torch.float64, radius=d / 2)
    ref = _normalise(reference.flatten()[index])
    omega = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    shift = t0.clone().to(torch.float64).requires_grad_(True)
    # The loss is -correlation in [-1, 1]: changes below 1e-7 no longer move the pose.
    optimizer = torch.optim.LBFGS(
        [omega, shift], lr=1.0, max_iter=max_iter, tolerance_change=1e-7, line_search_fn="strong_wolfe"
    )

    def loss_fn() -> Tensor:
        s = s0 @ so3.exp_so3(omega)
        return -(_normalise(_resample(volume, s[None], shift[None], coords)[0]) * ref).sum()

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        corr = -float(loss_fn())
        return (s0 @ so3.exp_so3(omega)).detach(), shift.detach(), corr


def _crop(volume: Tensor, d: int) -> Tensor:
    return fourier.fourier_crop(volume, d, ndim=3)


def align_maps(
    volume,
    reference,
    *,
    try_flip: bool = True,
    coarse_box_size: int = 16,
    healpix_nside: int = 2,
    n_inplane: int = 16,
    refine_box_sizes: tuple[int, ...] = (24, 48),
    n_starts_per_hand: int = 3,
    max_shift_fraction: float = 0.25,
    refine_iterations: int = 25,
    batch_size: int = 256,
    exclude_within_deg: float = 0.0,
    verbose: bool = False,
) -> MapAlignment:
    """Rotation, hand and translation that best take ``volume`` onto ``reference``.

    Both maps are ``(D, D, D)`` (torch or numpy) on the same voxel grid.

    1. Coarse exhaustive search on Fourier-cropped maps (``coarse_box_size``) over
       ``12 nside^2 x n_inplane`` rotations per hand (default 48 x 16, spacing about
       25 degrees), each with its best translation from an FFT cross-correlation
       (``|t| <= max_shift_fraction`` of the box).
    2. The ``n_starts_per_hand`` best candidates of each hand that lie at least 30
       degrees apart are refined by L-BFGS at ``refine_box_sizes[0]``.
    3. The best of them is refined further at each following size (capped at D).

    Returns shifts in voxels of the full box; ``correlation`` is the Pearson
    correlation over the whole box of :func:`apply_map_alignment` with ``reference``.
    ``exclude_within_deg``: no start within this angle of the identity (same
    hand), for a map's alignment onto itself other than the trivial one.
    """
    from tqdm.auto import tqdm

    vol = _as_volume(volume, "volume")
    ref = _as_volume(reference, "reference")
    if vol.shape != ref.shape:
        raise ValueError(
            f"align_maps needs maps of the same shape, got {tuple(vol.shape)} and {tuple(ref.shape)}"
        )
    d = vol.shape[0]
    dc = min(coarse_box_size, d)
    rotations = _grid_rotations(healpix_nside, n_inplane)
    hands = (False, True) if try_flip else (False,)
    # sampling matrix S = J^f R^T of each candidate (rows: all rotations of one hand, then the other)
    rt = rotations.transpose(-1, -2)
    matrices = torch.cat([_J @ rt if f else rt for f in hands])
    flags = torch.cat([torch.full((rotations.shape[0],), f, dtype=torch.bool) for f in hands])
    max_shift = max(0, int(max_shift_fraction * dc))
    with tqdm(total=matrices.shape[0], desc="align maps: coarse search", disable=not verbose) as bar:
        scores, shifts = _coarse_search(_crop(vol, dc), _crop(ref, dc), matrices, max_shift, batch_size, bar)
    shifts = shifts * (d / dc)

    near_identity = so3.geodesic_angle_deg(matrices.double(), _EYE) < exclude_within_deg
    starts = []
    for f in hands:
        order = torch.argsort(
            torch.where(flags == f, scores, torch.full_like(scores, -math.inf)), descending=True
        )
        chosen: list[int] = []
        for i in order[: int((flags == f).sum())].tolist():
            if not f and bool(near_identity[i]):
                continue
            if all(so3.geodesic_angle_deg(matrices[i], matrices[j]) > 30.0 for j in chosen):
                chosen.append(i)
            if len(chosen) == n_starts_per_hand:
                break
        starts += [(matrices[i], shifts[i], bool(f)) for i in chosen]

    sizes = sorted({min(s, d) for s in refine_box_sizes})
    with tqdm(total=len(starts) + len(sizes) - 1, desc="align maps: refine", disable=not verbose) as bar:
        first = sizes[0]
        vol_s, ref_s = _crop(vol, first), _crop(ref, first)
        results = []
        for s0, t0, f in starts:
            s, t, corr = _refine(vol_s, ref_s, s0, t0 * (first / d), refine_iterations)
            results.append((corr, s, t * (d / first), f))
            bar.update(1)
        corr, s, t, f = max(results, key=lambda r: r[0])
        for size in sizes[1:]:
            s, t_s, corr = _refine(_crop(vol, size), _crop(ref, size), s, t * (size / d), refine_iterations)
            t = t_s * (d / size)
            bar.update(1)
    j = _J if f else torch.eye(3, dtype=torch.float64)
    rotation = (j @ s).T  # S = J^f R^T  =>  R = (J^f S)^T
    u, _, vt = torch.linalg.svd(rotation)  # re-orthonormalise (round-off of the exp_so3 products)
    rotation = u @ vt
    alignment = MapAlignment(rotation, f, t, 0.0)
    aligned = apply_map_alignment(vol, alignment).flatten()
    final_corr = float((_normalise(aligned) * _normalise(ref.flatten())).sum())
    return MapAlignment(rotation, f, t, final_corr)


def find_translation(volume, reference, *, max_shift_fraction: float = 0.25) -> Tensor:
    """The translation ``t`` (voxels, ``(x, y, z)``) that best moves ``volume`` onto ``reference``.

    For maps already in the same orientation (the rotation found from the poses):
    the peak of their FFT cross-correlation within ``max_shift_fraction`` of the
    box, refined to a fraction of a voxel by a parabola through the peak and its
    two neighbours on each axis. ``MapAlignment(shift_voxels=t)`` applies it.
    """
    vol = _as_volume(volume, "volume")
    ref = _as_volume(reference, "reference")
    d = vol.shape[0]
    cc = torch.fft.irfftn(torch.fft.rfftn(ref) * torch.fft.rfftn(vol).conj(), s=(d, d, d))
    k = torch.fft.fftfreq(d, 1.0 / d)  # the displacement of each cc index
    outside = k.abs() > max(1, int(max_shift_fraction * d))
    masked = cc.clone()
    masked[outside] = -math.inf
    masked[:, outside] = -math.inf
    masked[:, :, outside] = -math.inf
    iz, iy, ix = (int(i) for i in torch.unravel_index(masked.argmax(), masked.shape))
    peak = [iz, iy, ix]
    offsets = []
    for axis in range(3):
        before, after = list(peak), list(peak)
        before[axis], after[axis] = (peak[axis] - 1) % d, (peak[axis] + 1) % d
        y0, y1, y2 = float(cc[tuple(before)]), float(cc[tuple(peak)]), float(cc[tuple(after)])
        curvature = y0 - 2 * y1 + y2
        offsets.append(0.5 * (y0 - y2) / curvature if curvature < 0 else 0.0)
    return torch.tensor(
        [float(k[ix]) + offsets[2], float(k[iy]) + offsets[1], float(k[iz]) + offsets[0]], dtype=torch.float64
    )
