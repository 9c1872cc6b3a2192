"""Property-based fuzzing (hypothesis) of the STAR and MRC readers.

The contract: whatever the bytes, ``read_star``, ``read_map`` and ``ParticleStack`` (which
reads stacks through memory maps) either return or raise ``ValueError`` (the content is
bad) or an ``OSError`` such as ``FileNotFoundError`` (the file system is), with a message
that names the file. They never hang (hypothesis' deadline per example) and never
allocate much more than the file holds: each example's peak traced allocation (numpy and
Python) stays below ``MAX_PEAK_BYTES``, so a header that declares terabytes is refused
before anything is allocated.

Inputs are valid files mutated (header fields overwritten with extreme or random values,
bytes flipped, truncated, junk appended, STAR tokens replaced) and plain random bytes.
``derandomize=True`` makes every run (and CI) try the same examples.
"""

from __future__ import annotations

import struct
import tracemalloc
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryospin_lab.io.maps import read_map
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.io.star import read_star

MAX_PEAK_BYTES = 16 * 2**20  # the files are a few kB; a reader that honours a corrupt size would blow this
FUZZ = settings(
    max_examples=250,
    deadline=5000,  # ms per example (generous for a loaded CI machine); the slowest valid read takes ~50 ms
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# ----------------------------------------------------------------------------- valid seeds


def _mrc_bytes(data: np.ndarray, voxel: float, tmp: Path) -> bytes:
    path = tmp / "seed.mrc"
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel
    return path.read_bytes()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("seeds")
    rng = np.random.default_rng(0)
    star = tmp / "seed.star"
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1, 2],
            "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
            "rlnImagePixelSize": [2.0, 2.0],
            "rlnImageSize": [8, 8],
            "rlnVoltage": [300.0, 200.0],
            "rlnSphericalAberration": [2.7, 2.0],
            "rlnAmplitudeContrast": [0.1, 0.07],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i:06d}@stack.mrcs" for i in range(1, 5)],
            "rlnAngleRot": [10.0, 20.0, 30.0, 40.0],
            "rlnAngleTilt": [5.0, 50.0, 90.0, 170.0],
            "rlnAnglePsi": [0.0, -90.0, 45.0, 180.0],
            "rlnOriginXAngst": [0.5, -1.0, 0.0, 2.0],
            "rlnOriginYAngst": [0.0, 1.0, -2.0, 0.25],
            "rlnDefocusU": [15000.0, 16000.0, 17000.0, 18000.0],
            "rlnDefocusV": [14000.0, 15500.0, 16900.0, 17000.0],
            "rlnDefocusAngle": [10.0, 20.0, 30.0, 40.0],
            "rlnOpticsGroup": [1, 1, 2, 2],
        }
    )
    starfile.write({"optics": optics, "particles": particles}, star, overwrite=True)
    return {
        "map": _mrc_bytes(rng.normal(size=(6, 6, 6)).astype(np.float32), 2.0, tmp),
        "stack": _mrc_bytes(rng.normal(size=(4, 8, 8)).astype(np.float32), 2.0, tmp),
        "int16_stack": _mrc_bytes(rng.integers(-50, 50, size=(4, 8, 8)).astype(np.int16), 2.0, tmp),
        "star": star.read_bytes(),
    }


# ----------------------------------------------------------------------------- mutations

# Interesting header values: zero, signs, int32 limits, sizes that overflow int32 products.
_EXTREME_INT32 = st.sampled_from(
    [0, 1, -1, 2, 3, 4, 8, 12, 101, 2**15, 2**16 + 3, 2**30, 2**31 - 1, -(2**31)]
)
# MRC2014 int32 fields: nx ny nz mode, nxstart.., mx my mz, (cella: floats), mapc mapr maps, ..., ispg nsymbt.
_HEADER_INT_OFFSETS = st.sampled_from([0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 64, 68, 72, 88, 92, 104])
_HEADER_FLOAT_OFFSETS = st.sampled_from([40, 44, 48, 52, 56, 60, 76, 80, 84])
_EXTREME_FLOAT = st.sampled_from([0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), -float("inf")])


@st.composite
def _mutated(draw, seed_key: str, header: bool):
    """``(seed_key, operations)``; applied by :func:`_apply` to the seed's bytes."""
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        kinds = ["flip", "truncate", "append", "int", "float"] if header else ["flip", "truncate", "append"]
        kind = draw(st.sampled_from(kinds))
        if kind == "flip":
            ops.append(("flip", draw(st.integers(0, 4096)), draw(st.integers(0, 255))))
        elif kind == "truncate":
            ops.append(("truncate", draw(st.integers(0, 4096))))
        elif kind == "append":
            ops.append(("append", draw(st.binary(max_size=64))))
        elif kind == "int":
            value = draw(_EXTREME_INT32 | st.integers(-(2**31), 2**31 - 1))
            ops.append(("int", draw(_HEADER_INT_OFFSETS), value))
        else:
            value = draw(_EXTREME_FLOAT | st.floats(width=32))
            ops.append(("float", draw(_HEADER_FLOAT_OFFSETS), value))
    return seed_key, ops


def _apply(raw: bytes, ops) -> bytes:
    data = bytearray(raw)
    for op in ops:
        if op[0] == "flip" and data:
            data[op[1] % len(data)] = op[2]
        elif op[0] == "truncate":
            del data[op[1] % (len(data) + 1) :]
        elif op[0] == "append":
            data += op[1]
        elif op[0] in ("int", "float") and len(data) >= op[1] + 4:
            struct.pack_into("<i" if op[0] == "int" else "<f", data, op[1], op[2])
    return bytes(data)


_STAR_TOKENS = [
    b"nan",
    b"inf",
    b"-1",
    b"0",
    b"1e309",
    b"-300",
    b"2.5",
    b"@",
    b"99999999999999999999@stack.mrcs",
    b"0@stack.mrcs",
    b"1@/nonexistent/s.mrcs",
    b"data_",
    b"data_optics",
    b"loop_",
    b"_rlnImageName",
    b"_rlnOpticsGroup",
    b"_rlnVoltage",
    b"\n",
    b"",
    b"#",
    b'"',
    b"'",
    b"\xff",  # not UTF-8
    "é".encode(),
]


@st.composite
def _mutated_star(draw):
    """STAR text with tokens replaced, lines dropped or duplicated, then byte-level mutations."""
    ops = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["token", "drop_line", "dup_line", "bytes"]))
        if kind == "token":
            ops.append(("token", draw(st.integers(0, 10**6)), draw(st.sampled_from(_STAR_TOKENS))))
        elif kind in ("drop_line", "dup_line"):
            ops.append((kind, draw(st.integers(0, 10**6))))
        else:
            ops.append(("bytes", draw(_mutated("star", header=False))[1]))
    return ops


def _apply_star(raw: bytes, ops) -> bytes:
    for op in ops:
        if op[0] == "token":
            tokens = raw.split(b" ")
            tokens[op[1] % len(tokens)] = op[2]
            raw = b" ".join(tokens)
        elif op[0] in ("drop_line", "dup_line"):
            lines = raw.split(b"\n")
            i = op[1] % len(lines)
            if op[0] == "drop_line":
                del lines[i]
            else:
                lines.insert(i, lines[i])
            raw = b"\n".join(lines)
        else:
            raw = _apply(raw, op[1])
    return raw


# ----------------------------------------------------------------------------- the contract


def _check_reader(path: Path, read) -> None:
    """``read()`` returns, or raises ValueError/OSError naming ``path``; bounded allocation."""
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                read()
            except (ValueError, OSError) as err:
                assert path.name in str(err), f"{type(err).__name__} does not name {path.name}: {err}"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MAX_PEAK_BYTES, f"peak allocation {peak} bytes reading a {path.stat().st_size}-byte file"


def _read_stack(path: Path):
    def read():
        stack = ParticleStack(path, normalize=True)
        stack.get_batch(np.arange(len(stack)))

    return read


def _read_map(path: Path):
    def read():
        volume, voxel = read_map(path)
        assert volume.ndim == 3 and np.isfinite(volume.numpy()).all() and voxel > 0

    return read


@FUZZ
@given(case=_mutated("map", header=True))
def test_read_map_survives_mutated_maps(case, seeds, tmp_path):
    key, ops = case
    path = tmp_path / "fuzz.mrc"
    path.write_bytes(_apply(seeds[key], ops))
    _check_reader(path, _read_map(path))


@FUZZ
@given(case=st.one_of(_mutated("stack", header=True), _mutated("int16_stack", header=True)))
def test_particle_stack_survives_mutated_stacks(case, seeds, tmp_path):
    key, ops = case
    path = tmp_path / "fuzz.mrcs"
    path.write_bytes(_apply(seeds[key], ops))
    _check_reader(path, _read_stack(path))


@FUZZ
@given(ops=_mutated_star())
def test_read_star_survives_mutated_star_files(ops, seeds, tmp_path):
    path = tmp_path / "fuzz.star"
    path.write_bytes(_apply_star(seeds["star"], ops))
    _check_reader(path, lambda: read_star(path))


@FUZZ
@given(
    ops=_mutated_star(), stack_ops=st.one_of(st.just([]), _mutated("stack", header=True).map(lambda c: c[1]))
)
def test_star_with_its_stack_survives_mutations(ops, stack_ops, seeds, tmp_path):
    """The STAR and the stack it names, both mutated: indices, sizes and paths meet the headers."""
    (tmp_path / "stack.mrcs").write_bytes(_apply(seeds["stack"], stack_ops))
    path = tmp_path / "fuzz.star"
    path.write_bytes(_apply_star(seeds["star"], ops))

    def read():
        try:
            _read_stack(path)()
        except (ValueError, OSError) as err:
            # An error in the stack names the stack, one in the STAR names the STAR.
            assert "stack.mrcs" in str(err) or path.name in str(err), str(err)
            raise ValueError(f"{path.name}: {err}") from err

    _check_reader(path, read)


@FUZZ
@given(raw=st.binary(max_size=3000), suffix=st.sampled_from([".mrc", ".mrcs", ".star"]))
def test_readers_survive_random_bytes(raw, suffix, tmp_path):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(raw)
    read = {".mrc": _read_map, ".mrcs": _read_stack}.get(suffix, lambda p: lambda: read_star(p))(path)
    _check_reader(path, read)


@FUZZ
@given(header=st.binary(min_size=1024, max_size=1024), body=st.binary(max_size=2048))
def test_readers_survive_random_headers_with_the_map_id(header, body, tmp_path):
    """Random 1024-byte headers that carry the 'MAP ' id and a valid byte-order stamp get past mrcfile's
    first checks, so the size and mode checks are what stands between them and an allocation."""
    raw = bytearray(header)
    raw[208:212] = b"MAP "
    raw[212:216] = b"\x44\x44\x00\x00"  # little-endian machine stamp
    for suffix, reader in ((".mrc", _read_map), (".mrcs", _read_stack)):
        path = tmp_path / f"header{suffix}"
        path.write_bytes(bytes(raw) + body)
        _check_reader(path, reader(path))
