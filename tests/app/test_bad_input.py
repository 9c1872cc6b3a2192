"""Bad input, one table: every case names the file (or option), the field and the offending value.

Each case builds its bad file in ``tmp_path`` (mrcfile, starfile, numpy; nothing binary in
the repository), makes one call and expects one exception type whose message matches every
regex of the case. The exception must be raised by cryospin_lab's own code (no IndexError or
struct.error leaking from numpy/torch/mrcfile), and nothing may be left half-written: every
output a case names is either absent or an empty folder afterwards.

CLI cases run ``app.cli.main`` in-process; a non-zero exit becomes :class:`CliError` carrying the
exit status and the stderr text, which must be one ``cryospin-lab...: error: ...`` line.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import re
import struct
import tracemalloc
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryospin_lab.app import cli
from cryospin_lab.engine.config import MAX_HEADS, TrainingConfig
from cryospin_lab.io.cryosparc import read_cs
from cryospin_lab.io.maps import read_map, write_map
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.io.star import read_star
from cryospin_lab.model.encoder import EncoderConfig
from cryospin_lab.simulate.atoms import read_model

PACKAGE_DIR = Path(cli.__file__).parents[1]
ONE_LINE_ERROR = r"^cryospin-lab[a-z ]*: error: [^\n]+\n$"

# ----------------------------------------------------------------------------- builders


def _mrc(path: Path, data: np.ndarray, voxel: float = 2.0) -> Path:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel
    return path


def _images(n: int = 4, d: int = 8) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, d, d)).astype(np.float32)


def _volume(d: int = 8) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(d, d, d)).astype(np.float32)


def _patched(path: Path, source: Path, offset: int, fmt: str, *values) -> Path:
    """A copy of ``source`` with header bytes at ``offset`` overwritten (little-endian ``fmt``)."""
    raw = bytearray(source.read_bytes())
    struct.pack_into(fmt, raw, offset, *values)
    path.write_bytes(bytes(raw))
    return path


# MRC2014 header offsets: nx, ny, nz at 0; mode at 12; nsymbt (extended header bytes) at 92.
NXYZ, MODE, NSYMBT = 0, 12, 92


def _optics(**overrides) -> dict:
    optics = {
        "rlnOpticsGroup": [1],
        "rlnImagePixelSize": [2.0],
        "rlnImageSize": [8],
        "rlnVoltage": [300.0],
        "rlnSphericalAberration": [2.7],
        "rlnAmplitudeContrast": [0.1],
    }
    return {**optics, **{k: v if isinstance(v, list) else [v] for k, v in overrides.items()}}


def _star(path: Path, rows: dict | None = None, optics: dict | None = None, n: int = 2) -> Path:
    """RELION 3.1 STAR over ``stack.mrcs`` (rows ``1..n``) with CTF columns; ``rows`` override, None drops."""
    particles = {
        "rlnImageName": [f"{i:06d}@stack.mrcs" for i in range(1, n + 1)],
        "rlnOpticsGroup": [1] * n,
        "rlnDefocusU": [1.5e4] * n,
        "rlnDefocusV": [1.4e4] * n,
        "rlnDefocusAngle": [10.0] * n,
    }
    particles.update(rows or {})
    particles = {name: values for name, values in particles.items() if values is not None}
    blocks = {
        "optics": pd.DataFrame(_optics() if optics is None else optics),
        "particles": pd.DataFrame(particles),
    }
    starfile.write(blocks, path, overwrite=True)
    return path


def _star_with_stack(tmp: Path, name: str, rows: dict | None = None, optics: dict | None = None) -> Path:
    _mrc(tmp / "stack.mrcs", _images())
    return _star(tmp / name, rows, optics)


_CS_DTYPE = [
    ("blob/path", "S16"),
    ("blob/idx", "<i4"),
    ("blob/shape", "<u4", (2,)),
    ("blob/psize_A", "<f4"),
    ("ctf/df1_A", "<f4"),
    ("ctf/df2_A", "<f4"),
    ("ctf/df_angle_rad", "<f4"),
    ("ctf/accel_kv", "<f4"),
    ("ctf/cs_mm", "<f4"),
    ("ctf/amp_contrast", "<f4"),
]


def _cs(path: Path, **overrides) -> Path:
    """A 2-row cryoSPARC .cs over ``stack.mrcs``; ``overrides`` set fields (``blob_idx=`` for blob/idx)."""
    array = np.zeros(2, dtype=_CS_DTYPE)
    values = {
        "blob/path": b"stack.mrcs",
        "blob/idx": [0, 1],
        "blob/shape": 8,
        "blob/psize_A": 2.0,
        "ctf/df1_A": 1.5e4,
        "ctf/df2_A": 1.4e4,
        "ctf/accel_kv": 300.0,
        "ctf/cs_mm": 2.7,
        "ctf/amp_contrast": 0.1,
    }
    values.update({k.replace("_", "/", 1): v for k, v in overrides.items()})
    for name, value in values.items():
        array[name] = value
    with open(path, "wb") as f:
        np.save(f, array)
    return path


class CliError(Exception):
    """``app.cli.main`` returned a non-zero status; ``str()`` is its stderr."""

    def __init__(self, status: int, stderr: str):
        super().__init__(stderr)
        self.status = status
        self.stderr = stderr


def _cli(argv: list[str]) -> Callable[[], int]:
    def call() -> int:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = cli.main([*argv, "--no-progress"])
        if status != 0:
            raise CliError(status, err.getvalue())
        return status

    return call


def _tiny_star(tmp: Path) -> Path:
    """A valid 16-pixel set (STAR + stack) the CLI accepts as input."""
    _mrc(tmp / "stack.mrcs", np.random.default_rng(2).normal(size=(4, 16, 16)).astype(np.float32))
    return _star(tmp / "ok.star", optics=_optics(rlnImageSize=16))


# ----------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """``build(tmp) -> call``; ``call()`` must raise ``error`` matching every regex in ``patterns``."""

    id: str
    build: Callable[[Path], Callable[[], object]]
    error: type[Exception]
    patterns: tuple[str, ...]
    outputs: tuple[str, ...] = field(default=())  # relative to tmp: absent or empty after the call


def _map_case(id_, make, patterns, **kwargs):
    def build(tmp):
        path = make(tmp)
        return lambda: read_map(path, **kwargs)

    return Case(id_, build, ValueError, patterns)


def _stack_case(id_, make, patterns, error=ValueError, read=False, **kwargs):
    def build(tmp):
        path = make(tmp)
        if read:
            return lambda: ParticleStack(path, normalize=False, **kwargs).get_batch([0, 1, 2, 3])
        return lambda: ParticleStack(path, **kwargs)

    return Case(id_, build, error, patterns)


def _star_case(id_, rows=None, optics=None, patterns=(), stack=False, error=ValueError):
    def build(tmp):
        path = _star_with_stack(tmp, f"{id_}.star", rows, optics)
        return (lambda: ParticleStack(path)) if stack else (lambda: read_star(path))

    return Case(id_, build, error, (rf"{id_}\.star", *patterns))


def _cs_case(id_, patterns, **overrides):
    def build(tmp):
        path = _cs(tmp / f"{id_}.cs", **overrides)
        return lambda: read_cs(path)

    return Case(id_, build, ValueError, (rf"{id_}\.cs", *patterns))


def _file_case(id_, name, content: bytes, reader, patterns, error=ValueError):
    def build(tmp):
        (tmp / name).write_bytes(content)
        return lambda: reader(tmp / name)

    return Case(id_, build, error, (name.replace(".", r"\."), *patterns))


def _config_case(id_, patterns, **kwargs):
    return Case(id_, lambda tmp: lambda: TrainingConfig(**kwargs), ValueError, patterns)


def _cli_case(id_, argv_of, patterns, status):
    return Case(
        id_,
        lambda tmp: _cli(argv_of(tmp)),
        CliError,
        (f"status {status}", *patterns),
        outputs=("out",),
    )


def _good_map(tmp: Path) -> Path:
    return _mrc(tmp / "good.mrc", _volume())


def _nan_map(tmp: Path) -> Path:
    volume = _volume()
    volume[1, 2, 3] = np.nan
    return _mrc(tmp / "nan.mrc", volume)


def _zipped_cs(tmp: Path) -> Callable[[], object]:
    with open(tmp / "zipped.cs", "wb") as f:
        np.savez(f, a=np.zeros(2))
    return lambda: read_cs(tmp / "zipped.cs")


def _pickled_cs(tmp: Path) -> Callable[[], object]:
    with open(tmp / "objects.cs", "wb") as f:
        np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return lambda: read_cs(tmp / "objects.cs")


def _inf_stack(tmp: Path) -> Path:
    images = _images()
    images[2, 0, 5] = np.inf
    return _mrc(tmp / "inf.mrcs", images)


LATIN1_STAR = "data_particles\nloop_\n_rlnImageName #1\n1@caf\xe9.mrcs\n".encode("latin-1")

CASES = [
    # --- MRC maps (read_map)
    _map_case(
        "map_truncated",
        lambda tmp: (
            tmp.joinpath("cut.mrc").write_bytes(_good_map(tmp).read_bytes()[:1500]) and tmp / "cut.mrc"
        ),
        (r"cut\.mrc", r"8 x 8 x 8", r"2048 bytes", r"holds 1500 bytes", "truncated"),
    ),
    _map_case(
        "map_header_declares_absurd_size",
        lambda tmp: _patched(tmp / "huge.mrc", _good_map(tmp), NXYZ, "<3i", 100000, 100000, 100000),
        (r"huge\.mrc", r"100000 x 100000 x 100000", r"holds 3072 bytes"),
    ),
    _map_case(
        "map_negative_size",
        lambda tmp: _patched(tmp / "neg.mrc", _good_map(tmp), NXYZ, "<i", -8),
        (r"neg\.mrc", r"\(nx, ny, nz\) = \(-8, 8, 8\)"),
    ),
    _map_case(
        "map_short_header",
        lambda tmp: (
            tmp.joinpath("short.mrc").write_bytes(_good_map(tmp).read_bytes()[:500]) and tmp / "short.mrc"
        ),
        (r"short\.mrc", r"500 bytes, shorter than the 1024-byte MRC header"),
    ),
    _map_case(
        "map_unknown_mode",
        lambda tmp: _patched(tmp / "mode7.mrc", _good_map(tmp), MODE, "<i", 7),
        (r"mode7\.mrc", r"mode is 7"),
    ),
    _map_case(
        "map_complex_mode",
        lambda tmp: _mrc(tmp / "complex.mrc", _volume().astype(np.complex64)),
        (r"complex\.mrc", r"MRC mode 4 \(complex\)"),
    ),
    _map_case(
        "map_extended_header_past_the_end",
        lambda tmp: _patched(tmp / "ext.mrc", _good_map(tmp), NSYMBT, "<i", 10**9),
        (r"ext\.mrc", r"1000001024 header bytes", "truncated"),
    ),
    _map_case(
        "map_voxel_size_zero",
        lambda tmp: _mrc(tmp / "vox0.mrc", _volume(), voxel=0.0),
        (r"vox0\.mrc", r"voxel size \(cella / mx\) is 0\.0", "voxel_size_angstrom="),
    ),
    _map_case(
        "map_voxel_size_argument_infinite",
        _good_map,
        (r"good\.mrc", r"voxel_size_angstrom=inf"),
        voxel_size_angstrom=float("inf"),
    ),
    _map_case("map_nan_voxels", _nan_map, (r"nan\.mrc", r"1 voxels are NaN or Inf", r"\(1, 2, 3\)")),
    _map_case(
        "map_is_2d",
        lambda tmp: _mrc(tmp / "flat.mrc", _volume()[0]),
        (r"flat\.mrc", r"3-D map", r"\(8, 8\)"),
    ),
    Case(
        "map_missing",
        lambda tmp: lambda: read_map(tmp / "absent.mrc"),
        FileNotFoundError,
        (r"absent\.mrc", "not found"),
    ),
    # --- MRC particle stacks (ParticleStack)
    _stack_case(
        "stack_truncated",
        lambda tmp: (
            tmp.joinpath("cut.mrcs").write_bytes(_mrc(tmp / "s.mrcs", _images()).read_bytes()[:1300])
            and tmp / "cut.mrcs"
        ),
        (r"cut\.mrcs", r"8 x 8 x 4", r"holds 1300 bytes"),
    ),
    _stack_case(
        "stack_header_declares_absurd_count",
        lambda tmp: _patched(tmp / "many.mrcs", _mrc(tmp / "s.mrcs", _images()), NXYZ + 8, "<i", 2**30),
        (r"many\.mrcs", r"8 x 8 x 1073741824", r"holds 2048 bytes"),
    ),
    _stack_case(
        "stack_not_square",
        lambda tmp: _mrc(tmp / "rect.mrcs", np.zeros((2, 8, 10), np.float32)),
        (r"rect\.mrcs", r"images are 10 x 8", "square"),
    ),
    _stack_case(
        "stack_complex_int16_mode",
        lambda tmp: _patched(tmp / "mode3.mrcs", _mrc(tmp / "s.mrcs", _images()), MODE, "<i", 3),
        (r"mode3\.mrcs", r"MRC mode 3 \(complex\)"),
    ),
    _stack_case(
        "stack_empty",
        lambda tmp: _mrc(tmp / "empty.mrcs", np.zeros((0, 8, 8), np.float32)),
        (r"empty\.mrcs", r"0 images", r"nz = 0"),
    ),
    _stack_case(
        "stack_inf_pixels",
        _inf_stack,
        (r"inf\.mrcs", r"particle 2 \(image 3 of the stack\)", "NaN or Inf"),
        read=True,
    ),
    _stack_case(
        "stack_voxel_size_zero",
        lambda tmp: _mrc(tmp / "vox0.mrcs", _images(), voxel=0.0),
        (r"vox0\.mrcs", r"voxel size is 0\.0", "pixel_size_angstrom="),
    ),
    _stack_case(
        "stack_pixel_size_argument_nan",
        lambda tmp: _mrc(tmp / "fine.mrcs", _images()),
        (r"fine\.mrcs", r"pixel_size_angstrom=nan"),
        pixel_size_angstrom=float("nan"),
    ),
    _stack_case(
        "stack_box_size_not_integer",
        lambda tmp: _mrc(tmp / "fine.mrcs", _images()),
        (r"fine\.mrcs", r"box_size 4\.5"),
        box_size=4.5,
    ),
    # --- RELION STAR
    _file_case("star_no_data_block", "comments.star", b"# only a comment\n", read_star, ("no data block",)),
    _file_case(
        "star_not_utf8",
        "latin1.star",
        LATIN1_STAR,
        read_star,
        ("not UTF-8", r"xe9", rf"offset {LATIN1_STAR.index(0xE9)}\b"),
    ),
    _file_case(
        "star_ragged_rows",
        "ragged.star",
        b"data_particles\n\nloop_\n_rlnImageName #1\n_rlnOpticsGroup #2\n1@s.mrcs\n",
        read_star,
        ("cannot parse as a STAR file",),
    ),
    _file_case(
        "star_duplicated_column",
        "twice.star",
        b"data_particles\nloop_\n_rlnImageName #1\n_rlnOriginXAngst #2\n_rlnOriginXAngst #3\n1@s.mrcs 1 2\n",
        read_star,
        (r"column rlnOriginXAngst appears twice in data_particles",),
    ),
    _file_case(
        "star_zero_rows",
        "header_only.star",
        b"data_particles\n\nloop_\n_rlnImageName #1\n",
        read_star,
        ("particles block has 0 rows",),
    ),
    Case(
        "star_without_image_names",
        lambda tmp: lambda: read_star(_star(tmp / "noname.star", {"rlnImageName": None})),
        ValueError,
        (r"noname\.star", "missing required column rlnImageName"),
    ),
    _star_case(
        "star_missing_cs_column",
        optics={k: v for k, v in _optics().items() if k != "rlnSphericalAberration"},
        patterns=("missing required column rlnSphericalAberration",),
    ),
    _star_case(
        "star_duplicated_optics_group",
        optics={k: v * 2 for k, v in _optics().items()},
        patterns=(r"rlnOpticsGroup 1 is defined twice", r"rows 1 and 2"),
    ),
    _star_case(
        "star_conflicting_optics_groups",
        optics={**{k: v * 2 for k, v in _optics().items()}, "rlnVoltage": [300.0, 200.0]},
        patterns=(r"rlnOpticsGroup 1 is defined twice",),
    ),
    _star_case(
        "star_undefined_optics_group",
        rows={"rlnOpticsGroup": [1, 4]},
        patterns=(r"rlnOpticsGroup value 4 has no row",),
    ),
    _star_case(
        "star_optics_group_not_integer",
        rows={"rlnOpticsGroup": ["one", "one"]},
        patterns=(r"rlnOpticsGroup value 'one' in row 1",),
    ),
    _star_case(
        "star_image_index_past_the_end",
        rows={"rlnImageName": ["12@stack.mrcs", "1@stack.mrcs"]},
        patterns=(r"row 1 asks for image 12", r"stack\.mrcs holds 4 images"),
        stack=True,
    ),
    _star_case(
        "star_image_index_absurd",
        rows={"rlnImageName": ["99999999999999999999@stack.mrcs", "1@stack.mrcs"]},
        patterns=(r"rlnImageName '99999999999999999999@stack\.mrcs' in row 1",),
    ),
    _star_case(
        "star_image_name_malformed",
        rows={"rlnImageName": ["1@stack.mrcs", "x@stack.mrcs"]},
        patterns=(r"rlnImageName 'x@stack\.mrcs' in row 2",),
    ),
    _star_case(
        "star_stack_missing",
        rows={"rlnImageName": ["1@moved/stack.mrcs", "2@moved/stack.mrcs"]},
        patterns=(r"moved/stack\.mrcs does not exist", "mrcs_path_map=", "--stack-dir"),
        stack=True,
        error=FileNotFoundError,
    ),
    _star_case(
        "star_box_size_mismatch",
        optics=_optics(rlnImageSize=16),
        patterns=(r"image size 16", r"differs from 8"),
        stack=True,
    ),
    _star_case(
        "star_image_size_not_integer",
        optics=_optics(rlnImageSize=8.5),
        patterns=(r"rlnImageSize value 8\.5",),
    ),
    _star_case("star_pixel_size_zero", optics=_optics(rlnImagePixelSize=0.0), patterns=(r"pixel size 0\.0",)),
    _star_case(
        "star_magnification_zero",
        optics={
            **{k: v for k, v in _optics().items() if k != "rlnImagePixelSize"},
            "rlnDetectorPixelSize": [5.0],
            "rlnMagnification": [0.0],
        },
        patterns=(r"pixel size inf",),
    ),
    _star_case(
        "star_voltage_negative", optics=_optics(rlnVoltage=-300.0), patterns=(r"rlnVoltage value -300",)
    ),
    _star_case(
        "star_voltage_in_volts",
        optics=_optics(rlnVoltage=300000.0),
        patterns=(r"rlnVoltage value 300000", r"\[1, 3000\] kV"),
    ),
    _star_case(
        "star_cs_absurd",
        optics=_optics(rlnSphericalAberration=-2700.0),  # in µm instead of mm, and negative
        patterns=(r"rlnSphericalAberration value -2700",),
    ),
    _star_case(
        "star_amplitude_contrast_above_one",
        optics=_optics(rlnAmplitudeContrast=1.5),
        patterns=(r"rlnAmplitudeContrast value 1\.5", r"\[0, 1\]"),
    ),
    _star_case(
        "star_defocus_absurd",
        rows={"rlnDefocusV": [1.4e4, 3e9]},
        patterns=(r"rlnDefocusV value 3e\+09 in row 2",),
    ),
    _star_case("star_voltage_nan", optics=_optics(rlnVoltage=float("nan")), patterns=(r"rlnVoltage", "nan")),
    _star_case(
        "star_angle_not_numeric",
        rows={"rlnAngleRot": ["10", "ten"], "rlnAngleTilt": [0, 0], "rlnAnglePsi": [0, 0]},
        patterns=(r"rlnAngleRot is not numeric",),
    ),
    # --- cryoSPARC .cs
    _file_case("cs_not_numpy", "text.cs", b"blob/path,blob/idx\n", read_cs, (r"not a numpy", r"b'blob/p'")),
    Case("cs_is_a_zip", _zipped_cs, ValueError, (r"zipped\.cs", r"not a numpy", r"b'PK")),
    Case(
        "cs_truncated",
        lambda tmp: (
            tmp.joinpath("cut.cs").write_bytes(_cs(tmp / "whole.cs").read_bytes()[:-10]),
            lambda: read_cs(tmp / "cut.cs"),
        )[1],
        ValueError,
        (r"cut\.cs", r"declares shape \(2,\)", "truncated"),
    ),
    Case("cs_pickled_objects", _pickled_cs, ValueError, (r"objects\.cs", r"dtype object", "never loaded")),
    _cs_case("cs_voltage_negative", (r"ctf/accel_kv value -300",), ctf_accel_kv=-300.0),
    _cs_case("cs_amplitude_contrast_two", (r"ctf/amp_contrast value 2 ",), ctf_amp_contrast=2.0),
    _cs_case("cs_cs_absurd", (r"ctf/cs_mm value 2700 ",), ctf_cs_mm=2700.0),
    _cs_case("cs_shape_zero", (r"blob/shape value \[0, 0\] in row 1",), blob_shape=0),
    _cs_case("cs_index_negative", (r"blob/idx value -1 in row 2",), blob_idx=[0, -1]),
    _cs_case("cs_path_empty", (r"blob/path is empty in row 0",), blob_path=b""),
    Case(
        "cs_index_past_the_end",
        lambda tmp: (
            _mrc(tmp / "stack.mrcs", _images()),
            lambda: ParticleStack(_cs(tmp / "far.cs", blob_idx=[0, 40])),
        )[1],
        ValueError,
        (r"far\.cs", r"row 2 asks for image 41", r"holds 4 images"),
    ),
    # --- atomic models
    _file_case("cif_no_atoms", "empty.cif", b"data_empty\n_cell.length_a 10.0\n", read_model, ("no atoms",)),
    _file_case(
        "pdb_nan_coordinates",
        "nan.pdb",
        b"ATOM      1  CA  ALA A   1         nan   1.000   2.000  1.00 20.00           C\nEND\n",
        read_model,
        (r"A/ALA 1/CA", r"\[nan, 1\.0, 2\.0\]"),
    ),
    _file_case(
        "pdb_gz_not_gzip",
        "plain.pdb.gz",
        b"ATOM      1  CA  ALA A   1       0.000   1.000   2.000  1.00 20.00           C\n",
        read_model,
        ("not gzip-compressed", r"b'AT'"),
    ),
    _file_case("cif_garbage", "noise.cif", b"\x00\x01 loop_ ;;", read_model, ("cannot read atomic model",)),
    Case(
        "model_missing",
        lambda tmp: lambda: read_model(tmp / "absent.cif"),
        FileNotFoundError,
        (r"absent\.cif",),
    ),
    # --- configs
    _config_case("config_negative_lr", (r"TrainingConfig\.encoder_lr", r"-0\.001"), encoder_lr=-1e-3),
    _config_case("config_infinite_lr", (r"TrainingConfig\.pose_lr", r"inf"), pose_lr=float("inf")),
    _config_case(
        "config_too_many_heads",
        (r"encoder\.n_heads", rf"1 to {MAX_HEADS}", r"1000"),
        encoder=EncoderConfig(n_heads=1000),
    ),
    _config_case("config_zero_heads", (r"encoder\.n_heads", r"got 0"), encoder=EncoderConfig(n_heads=0)),
    _config_case("config_betas", (r"pose_betas", r"1\.5"), pose_betas=(0.9, 1.5)),
    _config_case("config_negative_seed", (r"TrainingConfig\.seed", r"-1"), seed=-1),
    _config_case("config_zero_batch", (r"batch_size", r"0"), batch_size=0),
    # --- command line
    _cli_case(
        "cli_too_many_heads",
        lambda tmp: ["reconstruct", str(_tiny_star(tmp)), "--out", str(tmp / "out"), "--heads", "1000"],
        (r"--heads", r"1 to 64", r"'1000'"),
        status=2,
    ),
    _cli_case(
        "cli_absurd_threads",
        lambda tmp: ["reconstruct", str(_tiny_star(tmp)), "--out", str(tmp / "out"), "--threads", "100000"],
        (r"--threads", r"'100000'"),
        status=2,
    ),
    _cli_case(
        "cli_absurd_box",
        lambda tmp: ["simulate", str(_good_map(tmp)), "--out", str(tmp / "out"), "--box", "99999999"],
        (r"--box", r"4 to 1024", r"'99999999'"),
        status=2,
    ),
    _cli_case(
        "cli_absurd_particle_count",
        lambda tmp: ["simulate", str(_good_map(tmp)), "--out", str(tmp / "out"), "--n", "999999999999"],
        (r"--n", r"'999999999999'"),
        status=2,
    ),
    _cli_case(
        "cli_unknown_device",
        lambda tmp: ["simulate", str(_good_map(tmp)), "--out", str(tmp / "out"), "--device", "banana"],
        (r"--device", r"'banana'"),
        status=2,
    ),
    _cli_case(
        "cli_out_is_a_file",
        lambda tmp: [
            "reconstruct",
            str(_tiny_star(tmp)),
            "--out",
            str(tmp.joinpath("taken").write_text("x") and tmp / "taken"),
        ],
        (r"--out", r"taken is a file"),
        status=1,
    ),
    _cli_case(
        "cli_star_not_utf8",
        lambda tmp: [
            "reconstruct",
            str(
                tmp.joinpath("l1.star").write_bytes(b"data_\nloop_\n_rlnImageName #1\n1@\xff.mrcs\n")
                and tmp / "l1.star"
            ),
            "--out",
            str(tmp / "out"),
        ],
        (r"l1\.star", "not UTF-8", r"xff"),
        status=1,
    ),
    _cli_case(
        "cli_stack_moved",
        lambda tmp: [
            "reconstruct",
            str(_star(tmp / "moved.star", {"rlnImageName": ["1@old/stack.mrcs", "2@old/stack.mrcs"]})),
            "--out",
            str(tmp / "out"),
        ],
        (r"old/stack\.mrcs does not exist", "--stack-dir"),
        status=1,
    ),
    _cli_case(
        "cli_ground_truth_truncated",
        lambda tmp: [
            "reconstruct",
            str(_tiny_star(tmp)),
            "--out",
            str(tmp / "out"),
            "--ground-truth",
            str(
                tmp.joinpath("gt.mrc").write_bytes(_mrc(tmp / "g.mrc", _volume(16)).read_bytes()[:4000])
                and tmp / "gt.mrc"
            ),
        ],
        (r"gt\.mrc", "truncated"),
        status=1,
    ),
    _cli_case(
        "cli_simulate_nan_map",
        lambda tmp: ["simulate", str(_nan_map(tmp)), "--out", str(tmp / "out"), "--n", "2", "--box", "8"],
        (r"nan\.mrc", "NaN or Inf"),
        status=1,
    ),
]


def test_cases_are_many_and_distinct():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, tmp_path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile's and ours: the error is what is checked here
        call = case.build(tmp_path)
        with pytest.raises(case.error) as excinfo:
            call()
    message = str(excinfo.value)
    if isinstance(excinfo.value, CliError):
        assert "Traceback" not in message
        assert re.match(ONE_LINE_ERROR, message), message
        message = f"status {excinfo.value.status} {message}"
    else:
        raised_in = Path(str(excinfo.traceback[-1].path))
        assert PACKAGE_DIR in raised_in.parents, f"raised in {raised_in}, not by cryospin_lab"
    for pattern in case.patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    for name in case.outputs:
        out = tmp_path / name
        assert not out.exists() or (out.is_dir() and not any(out.iterdir())), f"{out} written half-way"


# ----------------------------------------------------------------------------- beyond the table


def test_absurd_header_sizes_allocate_nothing(tmp_path):
    """A 100 kB file whose header declares terabytes is refused before anything is allocated."""
    stack = _mrc(tmp_path / "s.mrcs", np.zeros((400, 8, 8), np.float32))
    huge_stack = _patched(tmp_path / "huge.mrcs", stack, NXYZ, "<3i", 2**20, 2**20, 400)
    huge_map = _patched(tmp_path / "huge.mrc", _good_map(tmp_path), NXYZ, "<3i", 2**14, 2**14, 2**14)
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match=r"huge\.mrcs: MRC header declares 1048576 x 1048576 x 400"):
                ParticleStack(huge_stack)
            with pytest.raises(ValueError, match=r"huge\.mrc: MRC header declares 16384 x 16384 x 16384"):
                read_map(huge_map)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**22, f"peak {peak} bytes"


def test_valid_edge_values_still_read(tmp_path):
    """The physical ranges reject only the impossible: Cs 0 (corrected), contrast 0 and 1, 1 MV, gzip."""
    path = _star_with_stack(
        tmp_path,
        "edge.star",
        optics=_optics(rlnSphericalAberration=0.0, rlnAmplitudeContrast=1.0, rlnVoltage=1000.0),
    )
    ctf = read_star(path).ctf
    assert float(ctf.cs_mm[0]) == 0.0 and float(ctf.amplitude_contrast[0]) == 1.0
    assert float(ctf.voltage_kv[0]) == 1000.0
    pdb = b"ATOM      1  CA  ALA A   1       0.000   1.000   2.000  1.00 20.00           C\nEND\n"
    (tmp_path / "one.pdb.gz").write_bytes(gzip.compress(pdb))
    assert read_model(tmp_path / "one.pdb.gz").n_atoms == 1
    assert TrainingConfig(encoder=EncoderConfig(n_heads=MAX_HEADS)).encoder.n_heads == MAX_HEADS


def test_write_map_leaves_nothing_on_bad_volume(tmp_path):
    out = tmp_path / "map.mrc"
    with pytest.raises(ValueError, match=r"map\.mrc: volume must be 3-D.*\(8, 8\)"):
        write_map(out, np.zeros((8, 8), np.float32), 2.0)
    with pytest.raises(ValueError, match=r"map\.mrc: voxel_size_angstrom=-1"):
        write_map(out, _volume(), -1)
    assert list(tmp_path.iterdir()) == []
