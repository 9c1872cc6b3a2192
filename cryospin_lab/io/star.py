"""RELION STAR (3.0, 3.1, 5) particle reader and RELION 3.1 writer.

``ParticleMetadata`` and the image-path rules live in :mod:`cryospin_lab.io.metadata`,
the cryoSPARC ``.cs`` reader in :mod:`cryospin_lab.io.cryosparc`; both are re-exported
here (``from cryospin_lab.io.star import ParticleMetadata, read_cs`` keeps working).

Conventions (tested in ``tests/io/test_star.py`` against starfile, scipy and cryoDRGN's parsers):

* ``rotations`` are RELION's matrices of (rlnAngleRot, rlnAngleTilt, rlnAnglePsi)
  (``so3.euler_relion_to_matrix``), float64 ``(N, 3, 3)``.
* ``shifts_angstrom`` ``(N, 2)`` = (x, y) displacement of the particle centre from
  the box centre = ``-(rlnOriginXAngst, rlnOriginYAngst)``; RELION 3.0 origins in
  pixels (rlnOriginX/Y) are multiplied by the pixel size.
* ``image_indices`` are 0-based (rlnImageName ``000001@stack.mrcs`` is image 0).
* Image paths are resolved relative to the directory of the STAR file, with an
  optional ``path_map`` (see :mod:`cryospin_lab.io.metadata`).
* Per-row optics (voltage, Cs, amplitude contrast, pixel size, image size) come
  from the particles table (RELION 3.0) or the optics table through
  rlnOpticsGroup (3.1 and later), whichever holds the column.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch
from torch import Tensor

from cryospin_lab.io.atomic import atomic_path
from cryospin_lab.io.cryosparc import read_cs
from cryospin_lab.io.metadata import (
    ParticleMetadata,
    PathMap,
    _as_integers,
    _check_ctf_ranges,
    _path_resolver,
    _single_value,
    peek_stack,
)
from cryospin_lab.physics.ctf import CTFParams
from cryospin_lab.physics.so3 import euler_relion_to_matrix, matrix_to_euler_relion

__all__ = ["ParticleMetadata", "read_star", "read_cs", "write_relion31_star", "PathMap", "peek_stack"]

# ----------------------------------------------------------------------------- STAR

_MAX_IMAGE_INDEX = 2**31 - 1  # MRC's nz is an int32


def _check_utf8(path: Path) -> None:
    """ValueError naming the offset of the first byte that is not UTF-8 (STAR files are text).

    Read in chunks so a large file is never held twice; a character cut by a chunk
    boundary is carried over to the next chunk.
    """
    offset, carry = 0, b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 16)
            buffer, carry = carry + chunk, b""
            try:
                buffer.decode("utf-8")
            except UnicodeDecodeError as err:
                if not (chunk and err.reason == "unexpected end of data"):
                    raise ValueError(
                        f"{path}: not UTF-8 text: byte {buffer[err.start : err.start + 1]!r} at offset "
                        f"{offset + err.start}; a STAR file is text (re-save it as UTF-8 or ASCII)"
                    ) from None
                carry = buffer[err.start :]
            offset += len(buffer) - len(carry)
            if not chunk:
                return


def _read_star_blocks(path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    if not path.is_file():
        raise FileNotFoundError(f"STAR file not found: {path}")
    _check_utf8(path)
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as err:  # starfile raises assorted parser errors
        raise ValueError(f"{path}: cannot parse as a STAR file ({type(err).__name__}: {err})") from err
    if not blocks:
        raise ValueError(f"{path}: no data block (no line starting with 'data_'); not a STAR file")
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame) and block.columns.duplicated().any():
            column = block.columns[block.columns.duplicated()][0]
            raise ValueError(f"{path}: column {column} appears twice in data_{name}")
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
    if optics is not None and not isinstance(optics, pd.DataFrame):
        raise ValueError(f"{path}: data_optics is a key/value block; a loop_ table is expected")
    return particles.reset_index(drop=True), optics


class _Columns:
    """Per-row values of a column from the particles table or, via rlnOpticsGroup, the optics table."""

    def __init__(self, path: Path, particles: pd.DataFrame, optics: pd.DataFrame | None):
        self.path, self.particles, self.optics = path, particles, optics
        if "rlnOpticsGroup" in particles:
            self.groups = _as_integers(path, "rlnOpticsGroup", particles["rlnOpticsGroup"].to_numpy())
        else:
            self.groups = np.ones(len(particles), dtype=np.int64)
        self.optics_rows: dict[int, int] = {}
        if optics is not None and "rlnOpticsGroup" in optics:
            ids = _as_integers(path, "rlnOpticsGroup (optics block)", optics["rlnOpticsGroup"].to_numpy())
            for row, group in enumerate(ids.tolist()):
                if group in self.optics_rows:
                    raise ValueError(
                        f"{path}: rlnOpticsGroup {group} is defined twice in the optics block (rows "
                        f"{self.optics_rows[group] + 1} and {row + 1}); each optics group needs one row"
                    )
                self.optics_rows[group] = row

    def has(self, name: str) -> bool:
        return name in self.particles or (self.optics is not None and name in self.optics)

    def get(self, name: str, required: bool = False) -> np.ndarray | None:
        if name in self.particles:
            values = self.particles[name].to_numpy()
        elif self.optics is not None and name in self.optics:
            if "rlnOpticsGroup" not in self.optics:
                raise ValueError(f"{self.path}: optics block has {name} but no rlnOpticsGroup column")
            missing = sorted(set(self.groups.tolist()) - set(self.optics_rows))
            if missing:
                raise ValueError(
                    f"{self.path}: rlnOpticsGroup value {missing[0]} has no row in the optics block"
                )
            column = self.optics[name].to_numpy()
            values = column[[self.optics_rows[g] for g in self.groups.tolist()]]
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
        if index > _MAX_IMAGE_INDEX:
            raise ValueError(
                f"{path}: rlnImageName {name!r} in row {row + 1} has image number {index}, "
                f"more than the {_MAX_IMAGE_INDEX} an MRC stack can hold"
            )
        raw_paths.append(stack)
        indices[row] = index - 1
    return raw_paths, indices


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
    metadata (``io.particles.ParticleStack`` checks them).
    """
    path = Path(path)
    if pixel_size_angstrom is not None and not 0 < pixel_size_angstrom < math.inf:
        raise ValueError(f"{path}: pixel_size_angstrom={pixel_size_angstrom} must be a positive number")
    if box_size is not None and (int(box_size) != box_size or box_size < 1):
        raise ValueError(f"{path}: box_size={box_size} must be a positive integer")
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
    bad = np.flatnonzero(~((pixel_sizes > 0) & (pixel_sizes < math.inf)))
    if bad.size:
        raise ValueError(f"{path}: pixel size {pixel_sizes[bad[0]]} in row {bad[0] + 1} is not positive")
    apix = _single_value(path, "rlnImagePixelSize", pixel_sizes, "pixel size")

    if box_size is None:
        if cols.has("rlnImageSize"):
            sizes = _as_integers(path, "rlnImageSize", cols.get("rlnImageSize"), low=1)
            box_size = int(_single_value(path, "rlnImageSize", sizes, "box size"))
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
        defocus_v = optional("rlnDefocusV", defocus_u)
        voltage = cols.get("rlnVoltage", required=True)
        cs = cols.get("rlnSphericalAberration", required=True)
        _check_ctf_ranges(
            path,
            [
                ("defocus_angstrom", "rlnDefocusU", defocus_u),
                ("defocus_angstrom", "rlnDefocusV", defocus_v),
                ("voltage_kv", "rlnVoltage", voltage),
                ("cs_mm", "rlnSphericalAberration", cs),
                ("amplitude_contrast", "rlnAmplitudeContrast", amplitude_contrast),
            ],
        )
        ctf = CTFParams(
            defocus_u_angstrom=defocus_u,
            defocus_v_angstrom=defocus_v,
            defocus_angle_deg=optional("rlnDefocusAngle", 0.0),
            voltage_kv=voltage,
            cs_mm=cs,
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

    with atomic_path(path, ".star") as tmp:
        starfile.write(
            {"optics": pd.DataFrame(optics), "particles": pd.DataFrame(particles)},
            tmp,
            overwrite=True,
            float_format="%.6f",
        )
