"""Per-particle metadata shared by the STAR and cryoSPARC readers, and image-path resolution.

* ``ParticleMetadata``: one row per particle image (conventions in :mod:`cryospin_lab.io.star`:
  RELION rotation matrices, ``shifts_angstrom = -origin``, 0-based image indices).
* Image paths are resolved relative to the directory of the STAR/.cs file. A
  ``path_map`` renames stacks that moved: a dict ``{old: new}`` (old as written in
  the file, normalised, or its basename; new relative to the file's directory or
  absolute), or a directory in which stacks are looked up by basename. A path that
  leaves the file's directory (``..`` or absolute) and is not remapped is warned about.
* ``peek_stack`` reads an MRC header only.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryospin_lab.physics.ctf import CTFParams

__all__ = ["REAL_MRC_MODES", "ParticleMetadata", "PathMap", "peek_stack"]

# MRC modes holding real pixels: int8, int16, float32, uint16, float16. Modes 3 and 4 are complex.
REAL_MRC_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}

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


# Bytes per pixel of the MRC modes (MRC2014): 3 and 4 are complex (int16, float32 pairs).
_MRC_MODE_BYTES = {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 6: 2, 12: 2}
_MRC_HEADER_BYTES = 1024


def peek_stack(path: str) -> tuple[tuple[int, ...], float, int]:
    """``(shape, voxel_size_x, mode)`` from an MRC header without reading the data.

    ``shape`` is ``(nz, ny, nx)``. Lenient about a missing "MAP " id (old or
    third-party writers; a RuntimeWarning as mrcfile gives). Raises ValueError
    naming the file and the header field when the header is short, declares a
    mode that is not an MRC mode, negative sizes, or more data than the file
    holds, so nothing is ever allocated or mapped for a size the file does not back.
    """
    header = _read_mrc_header(path)
    nx, ny, nz, mz = (int(header[name]) for name in ("nx", "ny", "nz", "mz"))
    mode, n_extended, ispg = int(header["mode"]), int(header["nsymbt"]), int(header["ispg"])
    if mode not in _MRC_MODE_BYTES:
        raise ValueError(f"{path}: MRC header mode is {mode}, not one of {sorted(_MRC_MODE_BYTES)}")
    if nx < 1 or ny < 1 or nz < 0:
        raise ValueError(f"{path}: MRC header sizes (nx, ny, nz) = ({nx}, {ny}, {nz}) are not valid")
    if n_extended < 0:
        raise ValueError(f"{path}: MRC header extended header size nsymbt = {n_extended} is negative")
    if 401 <= ispg <= 630 and (mz < 1 or nz % mz):  # a volume stack: nz // mz volumes of mz sections
        raise ValueError(f"{path}: MRC volume stack (ispg {ispg}) has nz = {nz} not a multiple of mz = {mz}")
    # Python ints: no overflow however large the header's sizes are.
    n_data = nx * ny * nz * _MRC_MODE_BYTES[mode]
    n_needed = _MRC_HEADER_BYTES + n_extended + n_data
    n_file = os.path.getsize(path)
    if n_file < n_needed:
        raise ValueError(
            f"{path}: MRC header declares {nx} x {ny} x {nz} (nx x ny x nz) pixels of mode {mode}, "
            f"{n_data} bytes after {_MRC_HEADER_BYTES + n_extended} header bytes, but the file holds "
            f"{n_file} bytes (truncated or corrupt)"
        )
    with np.errstate(all="ignore"):  # mx = 0: an unset voxel size, inf or nan, rejected by the callers
        voxel = np.float32(header["cella"]["x"] / header["mx"])  # what mrcfile's voxel_size gives
    # Shortest decimal of the float32 header value: 4.88, not 4.880000114.
    return (nz, ny, nx), float(str(voxel)), mode


def _read_mrc_header(path: str) -> np.void:
    """The 1024-byte MRC header as a numpy record, in the file's byte order (mrcfile's rules).

    Parsed here rather than by ``mrcfile.open(header_only=True)``, which also reads the
    extended header into a buffer of the header's ``nsymbt`` bytes (up to 2 GB) before
    anything can check it against the file size.
    """
    from mrcfile.constants import MAP_ID
    from mrcfile.dtypes import HEADER_DTYPE
    from mrcfile.utils import byte_order_from_machine_stamp

    with open(path, "rb") as f:
        raw = f.read(HEADER_DTYPE.itemsize)
    if len(raw) < HEADER_DTYPE.itemsize:
        raise ValueError(
            f"{path}: {len(raw)} bytes, shorter than the {HEADER_DTYPE.itemsize}-byte MRC header"
        )
    header = np.frombuffer(raw, dtype=HEADER_DTYPE)[0]
    if bytes(header["map"])[:3] != MAP_ID[:3]:
        warnings.warn(
            f"{path}: Map ID string not found - not an MRC file, or file is corrupt",
            RuntimeWarning,
            stacklevel=3,  # the caller of peek_stack
        )
    try:
        order = byte_order_from_machine_stamp(header["machst"])
    except ValueError:
        order = "<"  # mrcfile's permissive default
    header = np.frombuffer(raw, dtype=HEADER_DTYPE.newbyteorder(order))[0]
    if int(header["mode"]) not in _MRC_MODE_BYTES:
        # Files "in the wild" with a wrong machine stamp: mrcfile tries the other byte order too.
        swapped = np.frombuffer(raw, dtype=HEADER_DTYPE.newbyteorder(">" if order == "<" else "<"))[0]
        if int(swapped["mode"]) in _MRC_MODE_BYTES:
            header = swapped
    return header


def _check_range(path, field: str, values, low: float, high: float, what: str) -> None:
    """ValueError naming ``path``, ``field``, the first value outside ``[low, high]`` and its row."""
    values = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(~((values >= low) & (values <= high)))
    if bad.size:
        raise ValueError(
            f"{path}: {field} value {values[bad[0]]:g} in row {bad[0] + 1} is outside the physical range "
            f"[{low:g}, {high:g}] {what}"
        )


def _as_integers(path, field: str, values, low: int = 0, high: int = 2**31 - 1) -> np.ndarray:
    """int64 ``values`` of an integer column; ValueError naming the first non-integer or out-of-range one."""
    values = np.asarray(values)
    try:
        numbers = values.astype(np.float64)
    except (TypeError, ValueError):
        numbers = np.array([_float_or_nan(v) for v in values.reshape(-1)]).reshape(values.shape)
    numbers = numbers.reshape(len(numbers), -1) if numbers.ndim else numbers.reshape(1, 1)
    ok = np.isfinite(numbers) & (numbers == np.round(numbers)) & (numbers >= low) & (numbers <= high)
    bad = np.flatnonzero(~ok.all(axis=1))
    if bad.size:
        raise ValueError(
            f"{path}: {field} value {_plain(values[bad[0]])!r} in row {bad[0] + 1} is not an integer in "
            f"[{low}, {high}]"
        )
    return numbers.astype(np.int64).reshape(values.shape)


def _plain(value):
    """A numpy scalar or array as a Python value (for messages: 8.5, not np.float64(8.5))."""
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


def _float_or_nan(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# Bounds on CTF parameters, wide enough for every real microscope and set-up; a value outside
# them is a unit mistake (volts for kV, µm for Å) or a corrupt file, and would give a garbage CTF.
_CTF_LIMITS = {
    "voltage_kv": (1.0, 3000.0, "kV"),  # 300000 means volts were written
    "cs_mm": (-20.0, 20.0, "mm"),  # ~0 with a corrector (which can also make it negative); up to ~6 mm
    "amplitude_contrast": (0.0, 1.0, "(a fraction)"),
    "defocus_angstrom": (-1e6, 1e6, "Å (100 µm)"),
}


def _check_ctf_ranges(path, columns: list[tuple[str, str, np.ndarray]]) -> None:
    """Check CTF columns ``(limit key, field name in the file, values)`` against ``_CTF_LIMITS``."""
    for key, field, values in columns:
        low, high, unit = _CTF_LIMITS[key]
        _check_range(path, field, values, low, high, unit)


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
