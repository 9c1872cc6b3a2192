"""Particle metadata: RELION STAR (3.0, 3.1, 5) and cryoSPARC ``.cs`` readers, RELION 3.1 writer.

Conventions (tested in ``tests/test_star.py`` against starfile, scipy and cryoDRGN's parsers):

* ``rotations`` are RELION's matrices of (rlnAngleRot, rlnAngleTilt, rlnAnglePsi)
  (``so3.euler_relion_to_matrix``), float64 ``(N, 3, 3)``.
* ``shifts_angstrom`` ``(N, 2)`` = (x, y) displacement of the particle centre from
  the box centre = ``-(rlnOriginXAngst, rlnOriginYAngst)``; RELION 3.0 origins in
  pixels (rlnOriginX/Y) are multiplied by the pixel size.
* ``image_indices`` are 0-based (rlnImageName ``000001@stack.mrcs`` is image 0).
* Image paths are resolved relative to the directory of the STAR/.cs file. A
  ``path_map`` renames stacks that moved: a dict ``{old: new}`` (old as written in
  the file, normalised, or its basename; new relative to the file's directory or
  absolute), or a directory in which stacks are looked up by basename. A path that
  leaves the file's directory (``..`` or absolute) and is not remapped is warned about.
* Per-row optics (voltage, Cs, amplitude contrast, pixel size, image size) come
  from the particles table (RELION 3.0) or the optics table through
  rlnOpticsGroup (3.1 and later), whichever holds the column.

Hand-written on top of ``starfile`` (parsing) and ``numpy`` (``.cs`` files are numpy
structured arrays: loaded with ``allow_pickle=False``, nothing is ever unpickled).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch
from torch import Tensor

from .ctf import CTFParams
from .so3 import euler_relion_to_matrix, exp_so3, matrix_to_euler_relion

__all__ = ["ParticleMetadata", "read_star", "read_cs", "write_relion31_star", "PathMap"]

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


# ----------------------------------------------------------------------------- STAR


def _read_star_blocks(path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    if not path.is_file():
        raise FileNotFoundError(f"STAR file not found: {path}")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as err:  # starfile raises assorted parser errors
        raise ValueError(f"{path}: cannot parse as a STAR file ({err})") from err
    optics = blocks.get("optics")
    particles = blocks.get("particles")
    if particles is None:
        candidates = [
            df
            for name, df in blocks.items()
            if name != "optics" and isinstance(df, pd.DataFrame) and "rlnImageName" in df
        ]
        particles = candidates[0] if candidates else None
    if particles is None or not isinstance(particles, pd.DataFrame) or "rlnImageName" not in particles:
        found = {
            name: list(df.columns) if isinstance(df, pd.DataFrame) else "key/value"
            for name, df in blocks.items()
        }
        raise ValueError(f"{path}: missing required column rlnImageName in every data block (found {found})")
    if len(particles) == 0:
        raise ValueError(f"{path}: the particles block has 0 rows")
    return particles.reset_index(drop=True), optics


class _Columns:
    """Per-row values of a column from the particles table or, via rlnOpticsGroup, the optics table."""

    def __init__(self, path: Path, particles: pd.DataFrame, optics: pd.DataFrame | None):
        self.path, self.particles, self.optics = path, particles, optics
        if "rlnOpticsGroup" in particles:
            self.groups = particles["rlnOpticsGroup"].to_numpy().astype(np.int64)
        else:
            self.groups = np.ones(len(particles), dtype=np.int64)

    def has(self, name: str) -> bool:
        return name in self.particles or (self.optics is not None and name in self.optics)

    def get(self, name: str, required: bool = False) -> np.ndarray | None:
        if name in self.particles:
            values = self.particles[name].to_numpy()
        elif self.optics is not None and name in self.optics:
            if "rlnOpticsGroup" not in self.optics:
                raise ValueError(f"{self.path}: optics block has {name} but no rlnOpticsGroup column")
            table = dict(zip(self.optics["rlnOpticsGroup"].astype(np.int64), self.optics[name], strict=True))
            missing = sorted(set(self.groups.tolist()) - set(table))
            if missing:
                raise ValueError(
                    f"{self.path}: rlnOpticsGroup value {missing[0]} has no row in the optics block"
                )
            values = np.array([table[g] for g in self.groups])
        elif required:
            raise ValueError(
                f"{self.path}: missing required column {name} "
                f"(particles columns: {list(self.particles.columns)})"
            )
        else:
            return None
        return self._numeric(name, values)

    def _numeric(self, name: str, values: np.ndarray) -> np.ndarray:
        try:
            out = values.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{self.path}: column {name} is not numeric (first value {values[0]!r})"
            ) from err
        bad = np.flatnonzero(~np.isfinite(out))
        if bad.size:
            raise ValueError(f"{self.path}: column {name} has value {out[bad[0]]} in row {bad[0] + 1}")
        return out


def _parse_image_names(path: Path, names: np.ndarray) -> tuple[list[str], np.ndarray]:
    raw_paths, indices = [], np.empty(len(names), dtype=np.int64)
    for row, name in enumerate(names):
        name = str(name)
        number, at, stack = name.partition("@")
        if not at:
            number, stack = "1", name  # a single-image file
        try:
            index = int(number)
        except ValueError:
            index = 0
        if index < 1 or not stack:
            raise ValueError(
                f"{path}: rlnImageName {name!r} in row {row + 1} is not 'NNNNNN@stack' (1-based)"
            )
        raw_paths.append(stack)
        indices[row] = index - 1
    return raw_paths, indices


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


def read_star(
    path: str | os.PathLike,
    *,
    path_map: PathMap = None,
    pixel_size_angstrom: float | None = None,
    box_size: int | None = None,
) -> ParticleMetadata:
    """Read a RELION 3.0 / 3.1 / 5 particle STAR file.

    ``pixel_size_angstrom`` and ``box_size`` override the file; otherwise the pixel
    size comes from rlnImagePixelSize, rlnDetectorPixelSize * 1e4 / rlnMagnification
    or the first stack's header (with a warning), and the box size from
    rlnImageSize or the first stack's header. Stacks need not exist to read
    metadata (``data.ParticleStack`` checks them).
    """
    path = Path(path)
    particles, optics = _read_star_blocks(path)
    cols = _Columns(path, particles, optics)
    n = len(particles)
    raw_paths, indices = _parse_image_names(path, particles["rlnImageName"].to_numpy())
    resolve, unused_keys = _path_resolver(path, path_map)
    image_paths = [resolve(p) for p in raw_paths]
    if unused_keys():
        warnings.warn(f"{path}: path_map keys {unused_keys()} match no rlnImageName stack", stacklevel=2)

    # Pixel size, per row.
    if pixel_size_angstrom is not None:
        pixel_sizes = np.full(n, float(pixel_size_angstrom))
    elif cols.has("rlnImagePixelSize"):
        pixel_sizes = cols.get("rlnImagePixelSize")
    elif cols.has("rlnDetectorPixelSize") and cols.has("rlnMagnification"):
        pixel_sizes = cols.get("rlnDetectorPixelSize") * 1e4 / cols.get("rlnMagnification")
    elif cols.has("rlnPixelSize"):
        pixel_sizes = cols.get("rlnPixelSize")
    else:
        header_size = _header_value(image_paths[0], 1)
        if header_size is None or not header_size > 0:
            raise ValueError(
                f"{path}: no pixel size (rlnImagePixelSize, rlnDetectorPixelSize/rlnMagnification) and the "
                f"stack {image_paths[0]} header gives {header_size}; pass pixel_size_angstrom="
            )
        warnings.warn(
            f"{path}: no pixel size column; using {header_size} Å from {image_paths[0]}", stacklevel=2
        )
        pixel_sizes = np.full(n, header_size)
    if np.any(pixel_sizes <= 0):
        raise ValueError(f"{path}: pixel size {pixel_sizes[pixel_sizes <= 0][0]} is not positive")
    apix = _single_value(path, "rlnImagePixelSize", pixel_sizes, "pixel size")

    if box_size is None:
        if cols.has("rlnImageSize"):
            box_size = int(_single_value(path, "rlnImageSize", cols.get("rlnImageSize"), "box size"))
        else:
            box_size = _header_value(image_paths[0], 0)
            if box_size is None:
                raise ValueError(
                    f"{path}: no rlnImageSize column and the stack {image_paths[0]} cannot be read; "
                    "pass box_size="
                )

    angles = [cols.get(name) for name in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
    rotations = None
    if all(a is not None for a in angles):
        rotations = euler_relion_to_matrix(*(torch.from_numpy(a) for a in angles))
    elif any(a is not None for a in angles):
        warnings.warn(
            f"{path}: only some of rlnAngleRot/Tilt/Psi are present; no 3-D poses read", stacklevel=2
        )

    shifts = None
    if cols.has("rlnOriginXAngst") or cols.has("rlnOriginYAngst"):
        origin = np.stack([cols.get("rlnOriginXAngst", True), cols.get("rlnOriginYAngst", True)], axis=1)
        shifts = -torch.from_numpy(origin)
    elif cols.has("rlnOriginX") or cols.has("rlnOriginY"):
        origin_px = np.stack([cols.get("rlnOriginX", True), cols.get("rlnOriginY", True)], axis=1)
        shifts = -torch.from_numpy(origin_px * pixel_sizes[:, None])

    ctf = None
    if cols.has("rlnDefocusU"):
        defocus_u = cols.get("rlnDefocusU")

        def optional(name: str, default) -> np.ndarray:
            value = cols.get(name)
            return np.broadcast_to(default, (n,)).astype(np.float64) if value is None else value

        b_factor = cols.get("rlnCtfBfactor")
        amplitude_contrast = cols.get("rlnAmplitudeContrast")
        if amplitude_contrast is None:
            # cryoDRGN's parser does the same; RELION 3.0 files written by old versions often omit it.
            warnings.warn(f"{path}: no rlnAmplitudeContrast column; using 0.1", stacklevel=2)
            amplitude_contrast = np.full(n, 0.1)
        ctf = CTFParams(
            defocus_u_angstrom=defocus_u,
            defocus_v_angstrom=optional("rlnDefocusV", defocus_u),
            defocus_angle_deg=optional("rlnDefocusAngle", 0.0),
            voltage_kv=cols.get("rlnVoltage", required=True),
            cs_mm=cols.get("rlnSphericalAberration", required=True),
            amplitude_contrast=amplitude_contrast,
            phase_shift_deg=optional("rlnPhaseShift", 0.0),
            b_factor=optional("rlnCtfBFactor", 0.0) if b_factor is None else b_factor,
        )

    return ParticleMetadata(
        image_paths=image_paths,
        image_indices=indices,
        rotations=rotations,
        shifts_angstrom=shifts,
        ctf=ctf,
        pixel_size_angstrom=apix,
        box_size=int(box_size),
        optics_groups=cols.groups,
        pixel_sizes_angstrom=pixel_sizes,
        source_path=str(path),
    )


def _header_value(stack_path: str, which: int):
    """Box size (``which=0``) or voxel size (``which=1``) from a stack header, None if unreadable."""
    if not os.path.isfile(stack_path):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            shape, voxel, _ = peek_stack(stack_path)
        except (ValueError, OSError):
            return None
    return shape[-1] if which == 0 else voxel


# ----------------------------------------------------------------------------- cryoSPARC


def read_cs(
    path: str | os.PathLike,
    *,
    path_map: PathMap = None,
    pixel_size_angstrom: float | None = None,
) -> ParticleMetadata:
    """Read a cryoSPARC particle ``.cs`` file (a numpy structured array).

    Fields: blob/path, blob/idx (0-based), blob/shape, blob/psize_A; optional
    alignments3D/pose (rotation vector), alignments3D/shift (pixels) and the ctf/
    fields. A leading '>' in blob/path (cryoSPARC's "imported" marker) is dropped.

    Poses: ``exp([pose]x)`` is the transpose of RELION's matrix for the same view
    (the two programs store opposite directions of the same rotation); cryoDRGN's
    ``parse_pose_csparc`` transposes it likewise, and its rotations, which for STAR
    input equal RELION's matrix, agree with ours to 1e-4 on a real file (tests). Shifts: cryoSPARC's
    alignments3D/shift plays the role of RELION's rlnOrigin (pixels), as in
    cryoDRGN and pyem's csparc2star, so ``shifts_angstrom = -shift * psize``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cryoSPARC file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path}: not a numpy .cs file without pickled objects ({err})") from err
    names = data.dtype.names or ()
    for field in ("blob/path", "blob/idx"):
        if field not in names:
            raise ValueError(f"{path}: missing required field {field} (fields: {list(names)})")
    n = len(data)
    if n == 0:
        raise ValueError(f"{path}: 0 particles")

    def field(name: str) -> np.ndarray:
        values = data[name].astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(values.reshape(n, -1)).all(axis=1))
        if bad.size:
            raise ValueError(f"{path}: field {name} has value {values[bad[0]]} in row {bad[0]}")
        return values

    resolve, unused_keys = _path_resolver(path, path_map)
    raw = [p.decode() if isinstance(p, bytes) else str(p) for p in data["blob/path"]]
    image_paths = [resolve(p[1:] if p.startswith(">") else p) for p in raw]
    if unused_keys():
        warnings.warn(f"{path}: path_map keys {unused_keys()} match no blob/path", stacklevel=2)

    if pixel_size_angstrom is not None:
        pixel_sizes = np.full(n, float(pixel_size_angstrom))
    elif "blob/psize_A" in names:
        pixel_sizes = field("blob/psize_A")
    else:
        raise ValueError(f"{path}: missing field blob/psize_A (pixel size); pass pixel_size_angstrom=")
    if np.any(pixel_sizes <= 0):
        raise ValueError(f"{path}: blob/psize_A value {pixel_sizes[pixel_sizes <= 0][0]} is not positive")
    apix = _single_value(path, "blob/psize_A", pixel_sizes, "pixel size")

    if "blob/shape" not in names:
        raise ValueError(f"{path}: missing required field blob/shape")
    shapes = np.unique(data["blob/shape"].reshape(n, -1), axis=0)
    if len(shapes) != 1 or shapes[0][0] != shapes[0][-1]:
        raise ValueError(f"{path}: blob/shape must be one square shape, got {shapes.tolist()}")
    box_size = int(shapes[0][0])

    rotations = None
    if "alignments3D/pose" in names:
        rotations = exp_so3(torch.from_numpy(field("alignments3D/pose"))).transpose(-1, -2).contiguous()
    shifts = None
    if "alignments3D/shift" in names:
        shifts = -torch.from_numpy(field("alignments3D/shift") * pixel_sizes[:, None])

    ctf = None
    if "ctf/df1_A" in names:
        required = ("ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast")
        for name in required:
            if name not in names:
                raise ValueError(f"{path}: has ctf/df1_A but misses {name}")
        ctf = CTFParams(
            defocus_u_angstrom=field("ctf/df1_A"),
            defocus_v_angstrom=field("ctf/df2_A"),
            defocus_angle_deg=np.rad2deg(field("ctf/df_angle_rad")),
            voltage_kv=field("ctf/accel_kv"),
            cs_mm=field("ctf/cs_mm"),
            amplitude_contrast=field("ctf/amp_contrast"),
            phase_shift_deg=np.rad2deg(field("ctf/phase_shift_rad"))
            if "ctf/phase_shift_rad" in names
            else np.zeros(n),
            b_factor=field("ctf/bfactor") if "ctf/bfactor" in names else np.zeros(n),
        )
    groups = (
        data["ctf/exp_group_id"].astype(np.int64) if "ctf/exp_group_id" in names else np.zeros(n, np.int64)
    )
    return ParticleMetadata(
        image_paths=image_paths,
        image_indices=data["blob/idx"].astype(np.int64),
        rotations=rotations,
        shifts_angstrom=shifts,
        ctf=ctf,
        pixel_size_angstrom=apix,
        box_size=box_size,
        optics_groups=groups,
        pixel_sizes_angstrom=pixel_sizes,
        source_path=str(path),
    )


# ----------------------------------------------------------------------------- writer


def write_relion31_star(path: str | os.PathLike, metadata: ParticleMetadata, image_name_stack: str) -> None:
    """Write a RELION 3.1 STAR (optics + particles blocks) for the stack ``image_name_stack``.

    Row ``i`` is written as image ``i + 1`` of ``image_name_stack`` (a path relative
    to the STAR file, written as given). Optics groups are renumbered 1..G in
    increasing order of ``metadata.optics_groups``; voltage, Cs, amplitude contrast
    and pixel size must be constant within a group. Poses, shifts and CTF columns
    are written when present. Written to a temporary file, then renamed.
    """
    path = Path(path)
    n = len(metadata)
    group_ids, group_of_row = np.unique(metadata.optics_groups, return_inverse=True)
    ctf = metadata.ctf

    def per_group(name: str, values: np.ndarray) -> list[float]:
        out = []
        for g in range(len(group_ids)):
            v = values[group_of_row == g]
            if np.ptp(v) > 1e-6 * max(1.0, abs(float(v[0]))):
                raise ValueError(
                    f"{path}: {name} varies within optics group {group_ids[g]} ({v.min()} to {v.max()}); "
                    "give rows with different optics their own optics group"
                )
            out.append(float(v[0]))
        return out

    optics = {
        "rlnOpticsGroup": np.arange(1, len(group_ids) + 1),
        "rlnOpticsGroupName": [f"opticsGroup{g + 1}" for g in range(len(group_ids))],
    }
    if ctf is not None:
        optics["rlnVoltage"] = per_group("rlnVoltage", ctf.voltage_kv.detach().cpu().numpy())
        optics["rlnSphericalAberration"] = per_group(
            "rlnSphericalAberration", ctf.cs_mm.detach().cpu().numpy()
        )
        optics["rlnAmplitudeContrast"] = per_group(
            "rlnAmplitudeContrast", ctf.amplitude_contrast.detach().cpu().numpy()
        )
    optics["rlnImagePixelSize"] = per_group("rlnImagePixelSize", np.asarray(metadata.pixel_sizes_angstrom))
    optics["rlnImageSize"] = [metadata.box_size] * len(group_ids)
    optics["rlnImageDimensionality"] = [2] * len(group_ids)

    particles: dict[str, object] = {"rlnImageName": [f"{i + 1:06d}@{image_name_stack}" for i in range(n)]}
    if metadata.rotations is not None:
        rot, tilt, psi = matrix_to_euler_relion(metadata.rotations.detach().cpu())
        particles.update(rlnAngleRot=rot.numpy(), rlnAngleTilt=tilt.numpy(), rlnAnglePsi=psi.numpy())
    if metadata.shifts_angstrom is not None:
        origin = -metadata.shifts_angstrom.detach().cpu().double().numpy()
        particles.update(rlnOriginXAngst=origin[:, 0], rlnOriginYAngst=origin[:, 1])
    if ctf is not None:

        def col(t: Tensor) -> np.ndarray:
            return t.detach().cpu().double().numpy()

        particles.update(
            rlnDefocusU=col(ctf.defocus_u_angstrom),
            rlnDefocusV=col(ctf.defocus_v_angstrom),
            rlnDefocusAngle=col(ctf.defocus_angle_deg),
            rlnPhaseShift=col(ctf.phase_shift_deg),
            rlnCtfBfactor=col(ctf.b_factor),
        )
    particles["rlnOpticsGroup"] = group_of_row + 1

    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".star")
    os.close(fd)
    try:
        starfile.write(
            {"optics": pd.DataFrame(optics), "particles": pd.DataFrame(particles)},
            tmp,
            overwrite=True,
            float_format="%.6f",
        )
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
