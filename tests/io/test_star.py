"""STAR / .cs metadata against cryoDRGN's parsed ground truth, plain starfile reads and scipy."""

import os
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from scipy.spatial.transform import Rotation

from cryospin_lab.io.star import ParticleMetadata, read_cs, read_star, write_relion31_star
from cryospin_lab.physics.ctf import CTFParams

GROUNDTRUTH = "metadata/cryodrgn_parse_groundtruth"


def _relion_matrices(df: pd.DataFrame) -> np.ndarray:
    """RELION's matrix A from (rot, tilt, psi) via scipy: A = R_ZYZ(rot, tilt, psi)^T (intrinsic ZYZ)."""
    angles = df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    return Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix().transpose(0, 2, 1)


def _cryodrgn_ctf_columns(meta: ParticleMetadata) -> np.ndarray:
    """Our metadata in cryoDRGN's CTF layout [D, apix, dfU, dfV, dfang_deg, kV, Cs_mm, w, phase_deg]."""
    c = meta.ctf
    n = len(meta)
    return np.stack(
        [
            np.full(n, meta.box_size),
            meta.pixel_sizes_angstrom,
            c.defocus_u_angstrom,
            c.defocus_v_angstrom,
            c.defocus_angle_deg,
            c.voltage_kv,
            c.cs_mm,
            c.amplitude_contrast,
            c.phase_shift_deg,
        ],
        axis=1,
    )


def test_relion30_star_matches_cryodrgn(data_dir):
    """RELION 3.0 file (no optics block, rlnOriginX/Y in pixels, pixel size = detector / magnification).

    cryoDRGN was run with D = 300 and amplitude contrast 0.1 (the file has none; we warn and use 0.1).
    """
    with pytest.warns(UserWarning, match="rlnAmplitudeContrast"):
        meta = read_star(
            data_dir / GROUNDTRUTH / "FinalRefinement-OriginalParticles-PfCRT.star", box_size=300
        )
    ref = np.load(data_dir / GROUNDTRUTH / "pose_from_star.npz")
    np.testing.assert_allclose(meta.rotations.numpy(), ref["rotations"], atol=1e-4)
    # cryoDRGN's translation is rlnOrigin (pixels) / D; ours is the particle displacement -origin in Å.
    translations = -meta.shifts_angstrom.numpy() / meta.pixel_size_angstrom / meta.box_size
    np.testing.assert_allclose(translations, ref["shifts_fraction_of_box"], atol=1e-4)
    assert meta.pixel_size_angstrom == pytest.approx(1.035 * 1e4 / 10000.0)
    np.testing.assert_allclose(
        _cryodrgn_ctf_columns(meta),
        np.load(data_dir / GROUNDTRUTH / "ctf_from_star.npy"),
        rtol=1e-6,
        atol=1e-4,
    )


def test_cryosparc_cs_matches_cryodrgn(data_dir):
    """cryoSPARC poses are rotation vectors; cryoDRGN's parse_pose_csparc transposes expmap(pose).

    We checked both orders against its output: exp(pose) itself is off by up to 2.0 (a different
    matrix), its transpose agrees to 5e-7. cryoDRGN's STAR rotations equal RELION's matrix
    (test above), so the transpose is the RELION-convention matrix. Shifts: cryoDRGN divides
    alignments3D/shift by D exactly as it divides rlnOrigin, i.e. the shift is an origin in pixels.
    """
    meta = read_cs(data_dir / GROUNDTRUTH / "cryosparc_P12_J24_001_particles.cs")
    ref = np.load(data_dir / GROUNDTRUTH / "pose_from_cs.npz")
    assert len(meta) == 2019 and meta.box_size == 180
    np.testing.assert_allclose(meta.rotations.numpy(), ref["rotations"], atol=1e-4)
    raw = np.load(data_dir / GROUNDTRUTH / "cryosparc_P12_J24_001_particles.cs", allow_pickle=False)
    scipy_rot = (
        Rotation.from_rotvec(raw["alignments3D/pose"].astype(np.float64)).as_matrix().transpose(0, 2, 1)
    )
    np.testing.assert_allclose(meta.rotations.numpy(), scipy_rot, atol=1e-6)
    translations = -meta.shifts_angstrom.numpy() / meta.pixel_size_angstrom / meta.box_size
    np.testing.assert_allclose(translations, ref["shifts_fraction_of_box"], atol=1e-4)
    np.testing.assert_allclose(
        _cryodrgn_ctf_columns(meta), np.load(data_dir / GROUNDTRUTH / "ctf_from_cs.npy"), rtol=1e-6, atol=1e-4
    )
    assert meta.image_indices[:3].tolist() == raw["blob/idx"][:3].tolist()
    assert meta.image_paths[0].endswith(raw["blob/path"][0].decode())


def _assert_same_metadata(a: ParticleMetadata, b: ParticleMetadata):
    assert a.image_paths == b.image_paths
    np.testing.assert_array_equal(a.image_indices, b.image_indices)
    torch.testing.assert_close(a.rotations, b.rotations)
    torch.testing.assert_close(a.shifts_angstrom, b.shifts_angstrom)
    for name in CTFParams.__dataclass_fields__:
        torch.testing.assert_close(getattr(a.ctf, name), getattr(b.ctf, name))
    assert (a.pixel_size_angstrom, a.box_size) == (b.pixel_size_angstrom, b.box_size)


def test_relion31_variants_agree_with_starfile(data_dir):
    folder = data_dir / "particles/relion31_real"
    meta = read_star(folder / "relion31.star")
    _assert_same_metadata(
        meta, read_star(folder / "relion31.v2.star")
    )  # same data, blocks in the other order
    blocks = starfile.read(folder / "relion31.star")
    df, optics = blocks["particles"], blocks["optics"]
    np.testing.assert_allclose(meta.rotations.numpy(), _relion_matrices(df), atol=1e-12)
    np.testing.assert_allclose(
        meta.shifts_angstrom.numpy(), -df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    )
    np.testing.assert_allclose(meta.ctf.defocus_u_angstrom.numpy(), df["rlnDefocusU"])
    np.testing.assert_allclose(meta.ctf.defocus_angle_deg.numpy(), df["rlnDefocusAngle"])
    np.testing.assert_allclose(meta.ctf.cs_mm.numpy(), optics["rlnSphericalAberration"][0])
    assert meta.pixel_size_angstrom == 2.806 and meta.box_size == 256
    assert meta.image_indices.tolist() == [0, 1, 2, 3, 4]  # "000001@" is the first image
    assert meta.image_paths[0] == os.path.abspath(folder / "relion31.mrcs")


def test_six_optics_groups_and_relion5(data_dir):
    folder = data_dir / "particles/relion31_real"
    with pytest.warns(UserWarning, match="differs between optics groups"):
        meta = read_star(folder / "relion31.6opticsgroups.star")
    blocks = starfile.read(folder / "relion31.6opticsgroups.star")
    merged = blocks["particles"].merge(blocks["optics"], on="rlnOpticsGroup", how="left")
    assert sorted(set(meta.optics_groups.tolist())) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(meta.optics_groups, merged["rlnOpticsGroup"])
    np.testing.assert_allclose(meta.ctf.cs_mm.numpy(), merged["rlnSphericalAberration"])
    np.testing.assert_allclose(meta.ctf.voltage_kv.numpy(), merged["rlnVoltage"])
    np.testing.assert_allclose(meta.pixel_sizes_angstrom, merged["rlnImagePixelSize"])
    np.testing.assert_allclose(meta.rotations.numpy(), _relion_matrices(merged), atol=1e-12)
    counts = merged["rlnImagePixelSize"].value_counts()
    assert meta.pixel_size_angstrom == counts.idxmax()

    meta5 = read_star(folder / "relion5.star")
    df5 = starfile.read(folder / "relion5.star")["particles"]
    assert len(meta5) == len(df5) == 17 and meta5.box_size == 448 and meta5.pixel_size_angstrom == 0.89
    np.testing.assert_allclose(meta5.rotations.numpy(), _relion_matrices(df5), atol=1e-12)
    np.testing.assert_allclose(
        meta5.shifts_angstrom.numpy(), -df5[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    )
    assert meta5.image_indices[:3].tolist() == [0, 1, 2]
    assert os.path.basename(meta5.image_paths[1]) == "toy_images_b.mrcs"


def test_origin_in_pixels_with_optics_block(data_dir):
    """rln_proj_64_shifted: RELION 3.1 optics block but origins in pixels (rlnOriginX/Y)."""
    meta = read_star(data_dir / "particles/aspire_relion_projections/rln_proj_64_shifted.star")
    df = starfile.read(data_dir / "particles/aspire_relion_projections/rln_proj_64_shifted.star")["particles"]
    np.testing.assert_allclose(
        meta.shifts_angstrom.numpy(), -df[["rlnOriginX", "rlnOriginY"]].to_numpy() * 1.0
    )
    assert meta.ctf is None  # no defocus column


def test_path_map_dict_and_directory(data_dir, tmp_path):
    star = data_dir / "particles/trpv1_small/trpv1_small_stack.star"
    plain = read_star(star)
    assert plain.image_paths[0] == os.path.abspath(star.parent / "batch_0_restacked.mrc")
    mapped = read_star(star, path_map={"batch_0_restacked.mrc": "trpv1_small_stack.mrcs"})
    assert set(mapped.image_paths) == {os.path.abspath(star.parent / "trpv1_small_stack.mrcs")}
    assert mapped.image_indices.tolist() == list(range(10))
    # A directory: stacks are looked up there by basename.
    shutil.copy(star.parent / "trpv1_small_stack.mrcs", tmp_path / "batch_0_restacked.mrc")
    in_dir = read_star(star, path_map=tmp_path)
    assert set(in_dir.image_paths) == {str(tmp_path / "batch_0_restacked.mrc")}
    with pytest.warns(UserWarning, match="match no"):
        read_star(star, path_map={"nothing_like_this.mrcs": "x.mrcs"})


def _write_star(path, rows: dict, optics: dict | None = None):
    data = {"particles": pd.DataFrame(rows)}
    if optics is not None:
        data = {"optics": pd.DataFrame(optics), **data}
    starfile.write(data, path, overwrite=True)


def test_paths_outside_the_star_directory_warn(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    optics = {"rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0], "rlnImageSize": [8]}
    _write_star(
        sub / "a.star",
        {"rlnImageName": ["1@../stack.mrcs", "2@../stack.mrcs"], "rlnOpticsGroup": [1, 1]},
        optics,
    )
    with pytest.warns(UserWarning, match=r"\.\./stack\.mrcs.*outside"):
        meta = read_star(sub / "a.star")
    assert meta.image_paths[0] == str(tmp_path / "stack.mrcs")
    _write_star(sub / "b.star", {"rlnImageName": ["1@/elsewhere/s.mrcs"], "rlnOpticsGroup": [1]}, optics)
    with pytest.warns(UserWarning, match="/elsewhere/s.mrcs"):
        read_star(sub / "b.star")
    _write_star(sub / "c.star", {"rlnImageName": ["1@inside/s.mrcs"], "rlnOpticsGroup": [1]}, optics)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_star(sub / "c.star").image_paths == [str(sub / "inside/s.mrcs")]


def _example_metadata(data_dir) -> ParticleMetadata:
    """Real TRPV1 metadata with per-row B-factors and phase shifts and two optics groups."""
    meta = read_star(data_dir / "particles/trpv1_small/trpv1_small_stack.star")
    n = len(meta)
    ctf = CTFParams(
        **{
            **meta.ctf.__dict__,
            "b_factor": torch.linspace(0, 90, n, dtype=torch.float64),
            "phase_shift_deg": torch.linspace(0, 45, n, dtype=torch.float64),
            "voltage_kv": torch.tensor([300.0] * 5 + [200.0] * 5, dtype=torch.float64),
        }
    )
    return ParticleMetadata(
        **{**meta.__dict__, "ctf": ctf, "optics_groups": np.array([7] * 5 + [9] * 5)},
    )


def test_write_relion31_round_trip_through_plain_starfile(data_dir, tmp_path):
    meta = _example_metadata(data_dir)
    out = tmp_path / "particles.star"
    write_relion31_star(out, meta, "particles.mrcs")
    blocks = starfile.read(out)
    optics, df = blocks["optics"], blocks["particles"]
    assert optics["rlnOpticsGroup"].tolist() == [1, 2]
    assert optics["rlnVoltage"].tolist() == [300.0, 200.0]
    assert optics["rlnSphericalAberration"].tolist() == [2.0, 2.0]
    assert optics["rlnAmplitudeContrast"].tolist() == [0.1, 0.1]
    assert optics["rlnImagePixelSize"].tolist() == [4.88, 4.88]
    assert optics["rlnImageSize"].tolist() == [48, 48]
    assert optics["rlnImageDimensionality"].tolist() == [2, 2]
    assert list(optics["rlnOpticsGroupName"]) == ["opticsGroup1", "opticsGroup2"]
    assert df["rlnImageName"].tolist() == [f"{i:06d}@particles.mrcs" for i in range(1, 11)]
    np.testing.assert_allclose(_relion_matrices(df), meta.rotations.numpy(), atol=1e-6)
    np.testing.assert_allclose(
        df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(), -meta.shifts_angstrom.numpy(), atol=1e-6
    )
    for column, field in [
        ("rlnDefocusU", "defocus_u_angstrom"),
        ("rlnDefocusV", "defocus_v_angstrom"),
        ("rlnDefocusAngle", "defocus_angle_deg"),
        ("rlnPhaseShift", "phase_shift_deg"),
        ("rlnCtfBfactor", "b_factor"),
    ]:
        np.testing.assert_allclose(df[column].to_numpy(), getattr(meta.ctf, field).numpy(), atol=1e-6)
    assert df["rlnOpticsGroup"].tolist() == [1] * 5 + [2] * 5
    # And our reader gives the metadata back.
    back = read_star(out)
    assert back.image_paths == [str(tmp_path / "particles.mrcs")] * 10
    torch.testing.assert_close(back.rotations, meta.rotations, atol=1e-6, rtol=0)
    torch.testing.assert_close(back.ctf.b_factor, meta.ctf.b_factor)
    assert not [p for p in os.listdir(tmp_path) if p != "particles.star"]  # no temporary file left


def test_write_without_poses_or_ctf_and_inconsistent_groups(data_dir, tmp_path):
    meta = read_star(data_dir / "particles/trpv1_small/trpv1_small_stack.star")
    bare = ParticleMetadata(**{**meta.__dict__, "rotations": None, "shifts_angstrom": None, "ctf": None})
    write_relion31_star(tmp_path / "bare.star", bare, "s.mrcs")
    df = starfile.read(tmp_path / "bare.star")["particles"]
    assert list(df.columns) == ["rlnImageName", "rlnOpticsGroup"]
    mixed = _example_metadata(data_dir)
    mixed = ParticleMetadata(**{**mixed.__dict__, "optics_groups": np.ones(10, dtype=np.int64)})
    with pytest.raises(ValueError, match="rlnVoltage varies within optics group 1"):
        write_relion31_star(tmp_path / "mixed.star", mixed, "s.mrcs")
    assert not (tmp_path / "mixed.star").exists()


def test_bad_star_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.star"):
        read_star(tmp_path / "missing.star")
    optics = {"rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0], "rlnImageSize": [8]}
    _write_star(tmp_path / "noname.star", {"rlnAngleRot": [1.0], "rlnOpticsGroup": [1]}, optics)
    with pytest.raises(ValueError, match=r"noname\.star.*rlnImageName"):
        read_star(tmp_path / "noname.star")
    _write_star(tmp_path / "zero.star", {"rlnImageName": ["000000@s.mrcs"], "rlnOpticsGroup": [1]}, optics)
    with pytest.raises(ValueError, match=r"zero\.star.*rlnImageName '000000@s\.mrcs'"):
        read_star(tmp_path / "zero.star")
    rows = {
        "rlnImageName": ["1@s.mrcs"],
        "rlnOpticsGroup": [1],
        "rlnDefocusU": [1e4],
        "rlnAmplitudeContrast": [0.1],
    }
    _write_star(tmp_path / "novolt.star", rows, optics)
    with pytest.raises(ValueError, match=r"novolt\.star.*rlnVoltage"):
        read_star(tmp_path / "novolt.star")
    _write_star(tmp_path / "nan.star", {**rows, "rlnVoltage": [np.nan]}, optics)
    with pytest.raises(ValueError, match=r"nan\.star.*rlnVoltage.*nan"):
        read_star(tmp_path / "nan.star")
    _write_star(tmp_path / "group.star", {"rlnImageName": ["1@s.mrcs"], "rlnOpticsGroup": [3]}, optics)
    with pytest.raises(ValueError, match=r"group\.star.*rlnOpticsGroup value 3"):
        read_star(tmp_path / "group.star")
    _write_star(tmp_path / "nopix.star", {"rlnImageName": ["1@s.mrcs"]})
    with pytest.raises(ValueError, match=r"nopix\.star.*pixel size"):
        read_star(tmp_path / "nopix.star")
    # Poses are optional: a file without them reads with rotations None.
    meta = read_star(tmp_path / "nopix.star", pixel_size_angstrom=1.5, box_size=8)
    assert meta.rotations is None and meta.shifts_angstrom is None and meta.ctf is None


def test_bad_cs_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.cs"):
        read_cs(tmp_path / "gone.cs")
    arr = np.zeros(3, dtype=[("blob/idx", "<u4"), ("blob/psize_A", "<f4")])
    with open(tmp_path / "nopath.cs", "wb") as f:
        np.save(f, arr)
    with pytest.raises(ValueError, match=r"nopath\.cs.*blob/path"):
        read_cs(tmp_path / "nopath.cs")
    pickled = np.array([{"a": 1}], dtype=object)
    with open(tmp_path / "pickled.cs", "wb") as f:
        np.save(f, pickled, allow_pickle=True)
    with pytest.raises(ValueError, match=r"pickled\.cs"):
        read_cs(tmp_path / "pickled.cs")
