"""Reconstruction metrics: FSC and resolution, map-to-map alignment, pose and shift errors.

FSC (METHOD.md section 6)
    ``FSC(r) = sum_shell Re(A B*) / sqrt(sum_shell |A|^2 sum_shell |B|^2)`` over the
    integer shells ``r = round(|k|)``, ``r = 0 .. D//2`` of the centred 3-D transform
    (``fourier.fft_center``, ``fourier.radial_index_3d``); voxels beyond ``D//2``
    (the cube's corners) are left out. Shell ``r`` sits at ``r / (D * apix)`` per Å.
    Hand-written (a dozen lines of torch): torch-fourier-shell-correlation spreads
    every voxel over the two nearest shells with linear ("tent") weights and works on
    the rfft half-space, so its shells are not the integer shells METHOD.md defines;
    the tests compare both where the definitions coincide.

Map alignment
    A reconstruction is defined only up to a rotation, a translation and its hand.
    :func:`align_maps` finds the transform that takes ``volume`` onto ``reference``;
    :func:`apply_map_alignment` applies it::

        aligned(x) = volume(J^f R^T (x - t))

    with ``x = (x, y, z)`` in voxels relative to the box centre ``D // 2``,
    ``J = diag(1, 1, -1)`` (mirror z about the centre) applied when ``flipped``,
    ``R = rotation`` and ``t = shift_voxels`` ``(x, y, z)``: mirror, then rotate by ``R``,
    then move by ``t``. Poses follow the same transform: if ``volume`` was
    reconstructed with poses ``R_i``, then ``aligned`` explains the same images with
    ``F(R_i) @ R^T`` (``F(R) = J R J`` when flipped; see :class:`PoseError`).
    Resampling is trilinear (``torch.nn.functional.grid_sample``), which damps the
    highest frequencies slightly; being nearly a per-shell factor it barely moves the FSC.

    Search: an exhaustive grid over SO(3) (HEALPix view directions x in-plane angles,
    both hands) on Fourier-cropped maps (``coarse_box_size``, default 16), with the
    translation of each candidate from an FFT cross-correlation; then the best distinct
    candidates of each hand are refined by L-BFGS on the real-space correlation
    (rotation as ``exp_so3`` perturbation, sub-voxel translation, gradients through
    ``grid_sample``) at growing box sizes (24, then 48). About 2 s at D = 64 on two
    CPU cores, plus about 2.5 s once per process: torch.optim's first step imports
    ``torch._dynamo``. For a symmetric map any symmetry-equivalent rotation may come
    back. Hand-written: no listed library aligns maps.

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
import torch.nn.functional as nnf
from torch import Tensor

from cryospin_lab import fourier, so3

__all__ = [
    "FSCCurve",
    "Resolution",
    "compute_fsc",
    "spherical_mask",
    "MapAlignment",
    "align_maps",
    "apply_map_alignment",
    "fsc_vs_ground_truth",
    "PoseError",
    "pose_error",
    "ShiftError",
    "shift_error_angstrom",
]

_J = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


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


def _as_volume(volume, name: str) -> Tensor:
    v = torch.as_tensor(volume)
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise ValueError(f"{name} must be a cubic (D, D, D) volume, got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    return v.to(torch.float64)


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


# ------------------------------------------------------------------ map alignment


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
    # pos[b, m] = S_b (x_m - t_b) by broadcasting: on CPU, matmul with an inner size of 3
    # (bmm, or mm and above all its backward) is many times slower than this.
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

    starts = []
    for f in hands:
        order = torch.argsort(
            torch.where(flags == f, scores, torch.full_like(scores, -math.inf)), descending=True
        )
        chosen: list[int] = []
        for i in order[: int((flags == f).sum())].tolist():
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
    """Per-image in-plane shift error ``|t_gt - t_est|`` in Å, with mean and median."""

    mean_angstrom: float
    median_angstrom: float
    errors_angstrom: np.ndarray


def shift_error_angstrom(shifts_gt, shifts_est) -> ShiftError:
    """Euclidean error of ``(N, 2)`` in-plane shifts (Å), compared directly.

    The global rotation and hand change no in-plane shift, so no alignment is needed.
    (A 3-D translation ``u`` of the whole reconstruction would change each shift by the
    in-plane part of ``R_i u``; reconstructions here are centred in the box.)
    """
    gt = np.asarray(so3.as_numpy(shifts_gt), dtype=np.float64)
    est = np.asarray(so3.as_numpy(shifts_est), dtype=np.float64)
    if gt.shape != est.shape or gt.ndim != 2 or gt.shape[1] != 2 or gt.shape[0] == 0:
        raise ValueError(
            f"shift_error_angstrom needs shifts_gt and shifts_est of equal shape (N, 2), "
            f"got {gt.shape} and {est.shape}"
        )
    errors = np.linalg.norm(gt - est, axis=1)
    return ShiftError(float(errors.mean()), float(np.median(errors)), errors)
