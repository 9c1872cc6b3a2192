"""MRC maps: read (with header checks), write atomically, and the ground truth on a particle grid."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import torch
from torch import Tensor

from cryospin_lab.io.atomic import atomic_path
from cryospin_lab.io.metadata import REAL_MRC_MODES, peek_stack
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.physics.fourier import fourier_crop

__all__ = ["load_ground_truth", "read_map", "write_map"]

_SHAPE_TOLERANCE = 1e-3  # relative: ground-truth voxel size vs particle pixel size (float32 headers)


def read_map(path: str | os.PathLike, *, voxel_size_angstrom: float | None = None) -> tuple[Tensor, float]:
    """``(volume float32 [z, y, x], voxel size in Å)`` of an MRC map.

    The voxel size comes from the header (cell / sampling). A header voxel size of
    0 (unset) or non-finite raises ValueError unless ``voxel_size_angstrom`` is
    given; an explicit value always wins (with a warning if the header disagrees).
    Axes are reordered to ``[z, y, x]`` when the header's mapc/mapr/maps say so;
    mapc/mapr/maps that are not an order of 1, 2, 3 raise ValueError (all three 0,
    as some writers leave them, is read as the standard order with a warning).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"map file not found: {path}")
    if voxel_size_angstrom is not None and not 0 < voxel_size_angstrom < math.inf:
        raise ValueError(f"{path}: voxel_size_angstrom={voxel_size_angstrom} must be positive")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # The header first: it must back the data it declares before mrcfile allocates and reads it.
        (nz, ny, nx), _, mode = peek_stack(str(path))
        if mode not in REAL_MRC_MODES:
            kind = "complex" if mode in (3, 4) else "unsupported"
            raise ValueError(f"{path}: MRC mode {mode} ({kind}) is not a real-valued map")
        if min(nz, ny, nx) < 1:
            raise ValueError(f"{path}: the map holds no voxels (nx, ny, nz = {nx}, {ny}, {nz})")
        try:
            with mrcfile.open(path, mode="r", permissive=True) as mrc:
                if mrc.data is None:
                    raise ValueError("mrcfile could not read the map data")
                data = np.array(mrc.data, dtype=np.float32)  # a writable copy; the file is closed below
                voxel = mrc.voxel_size
                axes = (int(mrc.header.mapc), int(mrc.header.mapr), int(mrc.header.maps))
        except Exception as err:  # the header was checked; anything else is a corrupt file
            raise ValueError(f"{path}: cannot read the map data ({err})") from err
    for w in caught:
        warnings.warn(f"{path}: {w.message}", stacklevel=2)
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D map, got shape {data.shape}")
    finite = np.isfinite(data)
    if not finite.all():
        where = np.unravel_index(np.flatnonzero(~finite)[0], data.shape)
        raise ValueError(
            f"{path}: {int((~finite).sum())} voxels are NaN or Inf, the first at [z, y, x] = "
            f"{tuple(int(i) for i in where)}"
        )
    if axes == (0, 0, 0):
        warnings.warn(f"{path}: mapc/mapr/maps are unset (0); read as x, y, z (1, 2, 3)", stacklevel=2)
        axes = (1, 2, 3)
    if sorted(axes) != [1, 2, 3]:
        raise ValueError(
            f"{path}: header axis order mapc/mapr/maps = {axes} is not an order of 1, 2, 3 (x, y, z)"
        )
    if axes != (1, 2, 3):
        # Data axes are (section, row, column), holding axes (maps, mapr, mapc) with x=1, y=2, z=3.
        labels = [axes[2], axes[1], axes[0]]
        data = np.ascontiguousarray(np.transpose(data, [labels.index(3), labels.index(2), labels.index(1)]))
    header_sizes = tuple(_float32_to_float(v) for v in (voxel.x, voxel.y, voxel.z))
    if voxel_size_angstrom is not None:
        if header_sizes[0] > 0 and abs(header_sizes[0] - voxel_size_angstrom) > 1e-3 * voxel_size_angstrom:
            warnings.warn(
                f"{path}: header voxel size {header_sizes[0]} Å overridden by {voxel_size_angstrom} Å",
                stacklevel=2,
            )
        return torch.from_numpy(data), float(voxel_size_angstrom)
    if not all(np.isfinite(header_sizes)) or not header_sizes[0] > 0:
        raise ValueError(
            f"{path}: header voxel size (cella / mx) is {header_sizes[0]}, i.e. unset; "
            "pass voxel_size_angstrom= explicitly"
        )
    if max(header_sizes) - min(header_sizes) > 1e-4 * header_sizes[0]:
        raise ValueError(f"{path}: voxel size is anisotropic {header_sizes}; only cubic voxels are supported")
    return torch.from_numpy(data), header_sizes[0]


def _float32_to_float(value) -> float:
    """The shortest decimal that rounds to this float32 (headers store 11.4 as 11.3999996...)."""
    return float(str(np.float32(value)))


def write_map(path: str | os.PathLike, volume, voxel_size_angstrom: float) -> None:
    """Write a ``[z, y, x]`` volume as a float32 MRC map atomically (temp file in the same dir, renamed).

    A volume with NaN or Inf voxels raises ValueError and writes nothing.
    """
    path = Path(path)
    if not voxel_size_angstrom > 0:
        raise ValueError(f"{path}: voxel_size_angstrom={voxel_size_angstrom} must be positive")
    array = volume.detach().cpu().numpy() if isinstance(volume, Tensor) else np.asarray(volume)
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"{path}: volume must be 3-D [z, y, x], got shape {array.shape}")
    bad = ~np.isfinite(array)
    if bad.any():
        raise ValueError(f"{path}: not written: {int(bad.sum())} of {array.size} voxels are NaN or Inf")
    with atomic_path(path, ".mrc") as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(array)
        mrc.voxel_size = float(voxel_size_angstrom)


def load_ground_truth(path: Path, stack: ParticleStack) -> Tensor:
    """The ground-truth map on the particles' grid (Fourier-cropped like the images under ``--box``)."""
    volume, voxel_size = read_map(path)
    box = volume.shape[-1]
    if len(set(volume.shape)) != 1:
        raise ValueError(f"{path}: the ground-truth map must be a cube, got shape {tuple(volume.shape)}")
    if box == stack.original_box_size and stack.box_size < box:
        volume = fourier_crop(volume, stack.box_size, ndim=3)
        voxel_size *= box / stack.box_size
        box = stack.box_size
    if box != stack.box_size or abs(voxel_size - stack.pixel_size_angstrom) > (
        _SHAPE_TOLERANCE * stack.pixel_size_angstrom
    ):
        raise ValueError(
            f"{path}: the ground-truth map is box {box} at {voxel_size:g} Å/voxel but the particles are "
            f"box {stack.box_size} at {stack.pixel_size_angstrom:g} Å/px; give a map on the particles' grid"
        )
    return volume.float()
