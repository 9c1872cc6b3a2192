"""Per-particle metadata shared by the STAR and cryoSPARC readers, and image-path resolution.

* ``ParticleMetadata``: one row per particle image (conventions in :mod:`cryospin_lab.star`:
  RELION rotation matrices, ``shifts_angstrom = -origin``, 0-based image indices).
* Image paths are resolved relative to the directory of the STAR/.cs file. A
  ``path_map`` renames stacks that moved: a dict ``{old: new}`` (old as written in
  the file, normalised, or its basename; new relative to the file's directory or
  absolute), or a directory in which stacks are looked up by basename. A path that
  leaves the file's directory (``..`` or absolute) and is not remapped is warned about.
* ``peek_stack`` reads an MRC header only.

Hand-written bookkeeping (mrcfile reads headers).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .ctf import CTFParams

__all__ = ["ParticleMetadata", "PathMap", "peek_stack"]

PathMap = Mapping[str, str] | str | os.PathLike | None


@dataclass(frozen=True)
class ParticleMetadata:
    """Metadata of ``N`` particle images (one row each).

    ``pixel_size_angstrom`` is the pixel size of the images (the most common one
    when optics groups differ, with a warning; ``pixel_sizes_angstrom`` keeps the
    per-row values). ``box_size`` is the image side in pixels. ``rotations``,
    ``shifts_angstrom`` and ``ctf`` are None when the file has no such columns.
    """

    image_paths: list[str]
    image_indices: np.ndarray
    rotations: Tensor | None
    shifts_angstrom: Tensor | None
    ctf: CTFParams | None
    pixel_size_angstrom: float
    box_size: int
    optics_groups: np.ndarray
    pixel_sizes_angstrom: np.ndarray | None = None
    source_path: str | None = None

    def __post_init__(self) -> None:
        n = len(self.image_paths)
        object.__setattr__(self, "image_indices", np.asarray(self.image_indices, dtype=np.int64))
        object.__setattr__(self, "optics_groups", np.asarray(self.optics_groups, dtype=np.int64))
        if self.pixel_sizes_angstrom is None:
            object.__setattr__(self, "pixel_sizes_angstrom", np.full(n, float(self.pixel_size_angstrom)))
        for name in (
            "image_indices",
            "optics_groups",
            "pixel_sizes_angstrom",
            "rotations",
            "shifts_angstrom",
            "ctf",
        ):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"ParticleMetadata.{name} has {len(value)} rows, image_paths has {n}")

    def __len__(self) -> int:
        return len(self.image_paths)

    def subset(self, indices) -> ParticleMetadata:
        """Rows ``indices`` (integer array, in that order)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        tidx = torch.as_tensor(idx)
        return ParticleMetadata(
            image_paths=[self.image_paths[i] for i in idx],
            image_indices=self.image_indices[idx],
            rotations=None if self.rotations is None else self.rotations[tidx],
            shifts_angstrom=None if self.shifts_angstrom is None else self.shifts_angstrom[tidx],
            ctf=None if self.ctf is None else self.ctf[tidx],
            pixel_size_angstrom=self.pixel_size_angstrom,
            box_size=self.box_size,
            optics_groups=self.optics_groups[idx],
            pixel_sizes_angstrom=self.pixel_sizes_angstrom[idx],
            source_path=self.source_path,
        )


# ----------------------------------------------------------------------------- paths and headers


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def _path_resolver(source: Path, path_map: PathMap):
    """Return ``resolve(raw) -> absolute path`` for image paths written in ``source``."""
    base = os.path.abspath(source.parent)
    mapping: dict[str, str] = {}
    map_dir = None
    if isinstance(path_map, Mapping):
        mapping = {str(k): str(v) for k, v in path_map.items()}
    elif path_map is not None:
        map_dir = os.path.abspath(os.fspath(path_map))
        if not os.path.isdir(map_dir):
            raise FileNotFoundError(f"{source}: path_map directory {map_dir!r} does not exist")
    used: set[str] = set()
    cache: dict[str, str] = {}
    warned: set[str] = set()

    def resolve(raw: str) -> str:
        if raw in cache:
            return cache[raw]
        for key in (raw, os.path.normpath(raw), os.path.basename(raw)):
            if key in mapping:
                used.add(key)
                result = os.path.normpath(os.path.join(base, mapping[key]))
                break
        else:
            result = os.path.normpath(os.path.join(base, raw))
            if map_dir is not None and os.path.exists(os.path.join(map_dir, os.path.basename(raw))):
                result = os.path.join(map_dir, os.path.basename(raw))
            elif not _inside(result, base) and raw not in warned:
                warned.add(raw)
                warnings.warn(
                    f"{source}: image path {raw!r} points outside the file's directory ({result})",
                    stacklevel=3,
                )
        cache[raw] = result
        return result

    def unused_keys() -> list[str]:
        return sorted(set(mapping) - used)

    return resolve, unused_keys


def peek_stack(path: str) -> tuple[tuple[int, ...], float, int]:
    """``(shape, voxel_size_x, mode)`` from an MRC header without reading the data.

    ``shape`` is ``(nz, ny, nx)``. Lenient about a missing "MAP " id (old or
    third-party writers); mrcfile's warnings are left to the caller.
    """
    import mrcfile

    with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
        h = mrc.header
        shape = (int(h.nz), int(h.ny), int(h.nx))
        # Shortest decimal of the float32 header value: 4.88, not 4.880000114.
        return shape, float(str(np.float32(mrc.voxel_size.x))), int(h.mode)


def _single_value(path: Path, field: str, values: np.ndarray, kind: str) -> float:
    unique, counts = np.unique(values, return_counts=True)
    chosen = float(unique[np.argmax(counts)])
    if kind == "pixel size" and np.any(np.abs(unique - chosen) > 1e-4 * chosen):
        warnings.warn(
            f"{path}: {field} differs between optics groups ({sorted(unique.tolist())}); using {chosen} "
            "(per-row values are in ParticleMetadata.pixel_sizes_angstrom)",
            stacklevel=3,
        )
    elif kind == "box size" and len(unique) > 1:
        raise ValueError(
            f"{path}: {field} differs between rows ({sorted(unique.tolist())}); one box size is needed"
        )
    return chosen
