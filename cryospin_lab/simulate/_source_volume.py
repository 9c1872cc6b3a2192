"""The volume a simulation projects: an atomic model's density, an MRC map resampled to the output
grid, or an array (see :func:`load_source_volume`; ``simulate`` re-exports it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryospin_lab.physics import fourier
from cryospin_lab.simulate import atoms

__all__ = ["FILL_FRACTION", "MAP_SUFFIXES", "fitting_pixel_size", "load_source_volume"]

MAP_SUFFIXES = (".mrc", ".map", ".ccp4", ".mrc.gz", ".map.gz")
# The molecule's diameter as a fraction of the box: room for shifts and for the CTF's spread of the
# signal beyond the particle, as cryo-EM boxes are usually cut.
FILL_FRACTION = 2 / 3
# A map voxel belongs to the molecule above this fraction of the map's maximum.
_MAP_THRESHOLD = 0.05


def _is_map_path(path: Path) -> bool:
    return path.name.lower().endswith(MAP_SUFFIXES)


def load_source_volume(
    source: str | Path | Tensor | np.ndarray,
    box_size: int,
    pixel_size_angstrom: float,
    *,
    map_pixel_size_angstrom: float | None = None,
    b_factor_angstrom2: float | None = None,
) -> Tensor:
    """``(D, D, D)`` float32 ``[z, y, x]`` volume to simulate from.

    * An atomic model path (PDB/mmCIF, optionally ``.gz``): ``atoms.density_from_model``.
    * An MRC map path (``.mrc``, ``.map``, ``.ccp4``): read with its header voxel size
      (or ``map_pixel_size_angstrom`` when the header has none), the box centre
      ``D_in // 2`` taken as the particle centre, then resampled to the output grid:
      if the output voxel is coarser, first Fourier-cropped (an alias-free low-pass)
      to the nearest box size ``round(D_in * apix_in / apix)``, then trilinearly
      interpolated onto the output grid (exact when the voxel sizes match: a
      plain crop or zero pad). Finer output voxels are interpolated trilinearly.
    * An array ``(D, D, D)``: used as is (its voxel size is ``pixel_size_angstrom``).
    """
    if isinstance(source, (Tensor, np.ndarray)):
        volume = torch.as_tensor(source).to(torch.float32)
        if volume.shape != (box_size,) * 3:
            raise ValueError(
                f"volume array must have shape ({box_size}, {box_size}, {box_size}) to match box_size, "
                f"got {tuple(volume.shape)}"
            )
        if not torch.isfinite(volume).all():
            raise ValueError("volume array contains NaN or Inf values")
        return volume.contiguous()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"model/map file not found: {path}")
    if _is_map_path(path):
        volume, map_apix = _read_map(path, map_pixel_size_angstrom)
        return _resample_volume(volume, map_apix, box_size, pixel_size_angstrom)
    return atoms.density_from_model(
        path, box_size, pixel_size_angstrom, b_factor_angstrom2=b_factor_angstrom2
    )


def _read_map(path: Path, map_pixel_size_angstrom: float | None) -> tuple[Tensor, float]:
    from cryospin_lab.io.maps import read_map

    volume, apix = read_map(path, voxel_size_angstrom=map_pixel_size_angstrom)
    if len(set(volume.shape)) != 1:
        raise ValueError(f"MRC map {path} must be a cubic volume, got shape {tuple(volume.shape)}")
    if not torch.isfinite(volume).all():
        raise ValueError(f"MRC map {path} contains NaN or Inf values")
    return volume, apix


def _resample_volume(volume: Tensor, apix_in: float, box_size: int, apix_out: float) -> Tensor:
    """Resample a centred ``(D_in,)*3`` map at ``apix_in`` to ``(box_size,)*3`` at ``apix_out``."""
    d_in = volume.shape[0]
    if apix_out > apix_in * (1 + 1e-6):
        d_crop = max(2, round(d_in * apix_in / apix_out))
        if d_crop < d_in:
            volume = fourier.fourier_crop(volume.to(torch.float64), d_crop, ndim=3).to(torch.float32)
            apix_in = apix_in * d_in / d_crop
            d_in = d_crop
    if abs(apix_in - apix_out) <= 1e-6 * apix_out:
        return _crop_or_pad(volume, box_size)
    # Output voxel j sits (j - D//2) * apix_out from the centre: source index D_in//2 + that / apix_in.
    offsets = (torch.arange(box_size, dtype=torch.float64) - box_size // 2) * (apix_out / apix_in) + d_in // 2
    normalized = 2 * offsets / (d_in - 1) - 1  # align_corners=True coordinates
    gz, gy, gx = torch.meshgrid(normalized, normalized, normalized, indexing="ij")
    grid = torch.stack([gx, gy, gz], dim=-1)[None]  # grid_sample wants (x, y, z) = (W, H, D)
    out = torch.nn.functional.grid_sample(
        volume[None, None].to(torch.float64), grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return out[0, 0].to(torch.float32).contiguous()


def _crop_or_pad(volume: Tensor, box_size: int) -> Tensor:
    """Real-space crop or zero pad of a cube keeping voxel ``D // 2`` on voxel ``box_size // 2``."""
    d_in = volume.shape[0]
    out = volume.new_zeros((box_size,) * 3)
    lo = max(d_in // 2 - box_size // 2, 0)  # first source voxel kept
    hi = min(d_in, d_in // 2 + (box_size - box_size // 2))
    dst = lo - (d_in // 2 - box_size // 2)
    region = slice(dst, dst + hi - lo)
    out[region, region, region] = volume[lo:hi, lo:hi, lo:hi]
    return out.contiguous()


def fitting_pixel_size(
    source: str | Path,
    box_size: int,
    *,
    fill: float = FILL_FRACTION,
    map_pixel_size_angstrom: float | None = None,
) -> float:
    """The pixel size (Å, 2 decimals) at which the molecule's diameter spans ``fill`` of the box.

    The diameter is twice the largest distance from the centre of mass: of an
    atom centre for a model, of a voxel above 5 % of the maximum for a map
    (voxel size from the header or ``map_pixel_size_angstrom``). Twice that
    radius fits the box in every orientation, so no view is cut.
    """
    if not 0 < fill <= 1:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"model/map file not found: {path}")
    if _is_map_path(path):
        volume, apix = _read_map(path, map_pixel_size_angstrom)
        radius = _map_radius_voxels(volume.to(torch.float64)) * apix
    else:
        radius = atoms.read_model(path).max_radius_angstrom
    if not radius > 0:
        raise ValueError(f"{path}: the molecule has no extent (a single atom or an empty map)")
    return round(2 * radius / (fill * box_size), 2)


def _map_radius_voxels(volume: Tensor) -> float:
    """Largest distance (voxels) of a voxel above the threshold from the density's centre of mass."""
    mask = volume > _MAP_THRESHOLD * volume.max()
    idx = torch.nonzero(mask).to(torch.float64)  # (n, 3) [z, y, x]
    weights = volume[mask]
    com = (idx * weights[:, None]).sum(0) / weights.sum()
    return float(torch.linalg.norm(idx - com, dim=1).max())
