"""cryoSPARC particle ``.cs`` reader (``read_cs``), returning :class:`metadata.ParticleMetadata`.

Same conventions as :mod:`cryospin_lab.io.star` (rotations as RELION matrices,
``shifts_angstrom = -origin``, 0-based image indices) and :mod:`cryospin_lab.io.metadata`
(paths resolved relative to the file with an optional ``path_map``). Tested in
``tests/io/test_star.py`` against cryoDRGN's parsed poses of a real cryoSPARC job.

``.cs`` files are numpy structured arrays, loaded with ``allow_pickle=False``
so nothing is ever unpickled.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from cryospin_lab.io.metadata import (
    ParticleMetadata,
    PathMap,
    _as_integers,
    _check_ctf_ranges,
    _path_resolver,
    _single_value,
)
from cryospin_lab.physics.ctf import CTFParams
from cryospin_lab.physics.so3 import exp_so3

__all__ = ["read_cs"]

_NPY_MAGIC = b"\x93NUMPY"


def _check_npy_header(path: Path) -> None:
    """Check the .npy header before ``np.load`` reads (and allocates) what it declares.

    numpy allocates the declared array before reading, so a corrupt shape would
    ask for any amount of memory; np.load would also open a zip (.npz) file.
    """
    from numpy.lib import format as npy_format

    with open(path, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
        if magic != _NPY_MAGIC:
            raise ValueError(
                f"{path}: not a numpy .npy/.cs file (starts with {magic!r}, expected {_NPY_MAGIC!r})"
            )
        f.seek(0)
        try:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(f)
            else:
                shape, _, dtype = npy_format.read_array_header_2_0(f)
        except Exception as err:  # ValueError, EOFError... from a corrupt header
            raise ValueError(f"{path}: corrupt .npy header ({err})") from None
        header_bytes = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: dtype {dtype} holds pickled Python objects; they are never loaded")
    n_needed = header_bytes + math.prod(shape) * dtype.itemsize
    n_file = os.path.getsize(path)
    if n_file < n_needed:
        raise ValueError(
            f"{path}: .npy header declares shape {shape} of {dtype.itemsize}-byte rows "
            f"({n_needed} bytes) but the file holds {n_file} bytes (truncated or corrupt)"
        )


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
    if pixel_size_angstrom is not None and not 0 < pixel_size_angstrom < math.inf:
        raise ValueError(f"{path}: pixel_size_angstrom={pixel_size_angstrom} must be a positive number")
    _check_npy_header(path)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # numpy raises ValueError, EOFError, OSError... on a corrupt header
        raise ValueError(f"{path}: not a numpy .cs file without pickled objects ({err})") from err
    names = data.dtype.names or ()
    if not names or data.ndim != 1:
        raise ValueError(
            f"{path}: a .cs file is a 1-D structured array; this one has shape {data.shape} and "
            f"dtype {data.dtype}"
        )
    for field in ("blob/path", "blob/idx"):
        if field not in names:
            raise ValueError(f"{path}: missing required field {field} (fields: {list(names)})")
    n = len(data)
    if n == 0:
        raise ValueError(f"{path}: 0 particles")

    def field(name: str) -> np.ndarray:
        try:
            values = data[name].astype(np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{path}: field {name} of dtype {data.dtype[name]} is not numeric ({err})"
            ) from None
        bad = np.flatnonzero(~np.isfinite(values.reshape(n, -1)).all(axis=1))
        if bad.size:
            raise ValueError(f"{path}: field {name} has value {values[bad[0]]} in row {bad[0]}")
        return values

    resolve, unused_keys = _path_resolver(path, path_map)
    raw = []
    for row, p in enumerate(data["blob/path"]):
        try:
            raw.append(p.decode() if isinstance(p, bytes) else str(p))
        except UnicodeDecodeError:
            raise ValueError(f"{path}: field blob/path value {p!r} in row {row} is not UTF-8 text") from None
        if raw[-1] in ("", ">"):
            raise ValueError(f"{path}: field blob/path is empty in row {row}")
    image_indices = _as_integers(path, "blob/idx", data["blob/idx"])
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
    shapes = np.unique(_as_integers(path, "blob/shape", data["blob/shape"], low=1).reshape(n, -1), axis=0)
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
        checked = {name: field(name) for name in ("ctf/df1_A",) + required}
        _check_ctf_ranges(
            path,
            [
                ("defocus_angstrom", "ctf/df1_A", checked["ctf/df1_A"]),
                ("defocus_angstrom", "ctf/df2_A", checked["ctf/df2_A"]),
                ("voltage_kv", "ctf/accel_kv", checked["ctf/accel_kv"]),
                ("cs_mm", "ctf/cs_mm", checked["ctf/cs_mm"]),
                ("amplitude_contrast", "ctf/amp_contrast", checked["ctf/amp_contrast"]),
            ],
        )
        ctf = CTFParams(
            defocus_u_angstrom=checked["ctf/df1_A"],
            defocus_v_angstrom=checked["ctf/df2_A"],
            defocus_angle_deg=np.rad2deg(checked["ctf/df_angle_rad"]),
            voltage_kv=checked["ctf/accel_kv"],
            cs_mm=checked["ctf/cs_mm"],
            amplitude_contrast=checked["ctf/amp_contrast"],
            phase_shift_deg=np.rad2deg(field("ctf/phase_shift_rad"))
            if "ctf/phase_shift_rad" in names
            else np.zeros(n),
            b_factor=field("ctf/bfactor") if "ctf/bfactor" in names else np.zeros(n),
        )
    groups = (
        _as_integers(path, "ctf/exp_group_id", data["ctf/exp_group_id"])
        if "ctf/exp_group_id" in names
        else np.zeros(n, np.int64)
    )
    return ParticleMetadata(
        image_paths=image_paths,
        image_indices=image_indices,
        rotations=rotations,
        shifts_angstrom=shifts,
        ctf=ctf,
        pixel_size_angstrom=apix,
        box_size=box_size,
        optics_groups=groups,
        pixel_sizes_angstrom=pixel_sizes,
        source_path=str(path),
    )
