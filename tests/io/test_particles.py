"""ParticleStack and map I/O against mrcfile/starfile reads of the real files and numpy FFTs."""

import dataclasses
import os
import pickle
import tracemalloc
import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryospin_lab.io.maps import read_map, write_map
from cryospin_lab.io.particles import ParticleBatch, ParticleStack
from cryospin_lab.io.star import read_star

TOY = "particles/cryodrgn_toy/toy_projections.star"
TRPV1 = "particles/trpv1_small/trpv1_small_stack.star"
TRPV1_MAP = {"batch_0_restacked.mrc": "trpv1_small_stack.mrcs"}


def _raw(path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, permissive=True) as mrc:
            return np.array(mrc.data, dtype=np.float32)


@pytest.fixture(scope="module")
def toy(data_dir):
    with pytest.warns(UserWarning) as record:
        stack = ParticleStack(data_dir / TOY, normalize=False)
    messages = [str(w.message) for w in record]
    assert any("lacks the 'MAP ' id" in m for m in messages)  # the toy stack's header lacks the MAP id
    assert any("no pixel size column" in m for m in messages)  # nor does its STAR give a pixel size
    return stack


def test_headerless_toy_stack_reads_like_mrcfile(toy, data_dir):
    raw = _raw(data_dir / "particles/cryodrgn_toy/toy_projections.mrcs")
    assert len(toy) == 1000 and toy.box_size == 30
    batch = toy.get_batch([3, 0, 999, 3])
    assert isinstance(batch, ParticleBatch) and batch.images.dtype == torch.float32
    np.testing.assert_array_equal(batch.images.numpy(), raw[[3, 0, 999, 3]])
    assert batch.indices.tolist() == [3, 0, 999, 3]
    assert batch.rotations is None and batch.shifts_angstrom is None
    assert batch.ctf.phase_shift_deg.tolist() == [90.0] * 4  # the toy STAR's values, in batch order
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.images = None
    with pytest.raises(IndexError):
        toy.get_batch([1000])


def test_stack_is_memory_mapped_not_loaded(data_dir):
    """Constructing and reading a batch allocates far less than the 3.6 MB stack."""
    path = data_dir / TOY
    tracemalloc.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stack = ParticleStack(path, normalize=False)
        stack.get_batch(np.arange(10))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < os.path.getsize(path.parent / "toy_projections.mrcs") / 2
    assert isinstance(stack._stack(stack.metadata.image_paths[0]), np.memmap)


def test_normalisation_as_documented(data_dir):
    """Subtract each image's mean outside the inscribed circle, divide by one std over an even subset."""
    with pytest.warns(UserWarning):
        stack = ParticleStack(data_dir / TOY, n_normalization_images=100)
    raw = _raw(data_dir / "particles/cryodrgn_toy/toy_projections.mrcs").astype(np.float64)
    d = raw.shape[-1]
    yy, xx = np.mgrid[:d, :d] - d // 2
    background = raw[:, np.hypot(yy, xx) >= d // 2].mean(axis=1)
    centred = raw - background[:, None, None]
    subset = np.unique(np.linspace(0, 999, 100).round().astype(int))
    std = centred[subset].std()
    assert stack.normalization_std == pytest.approx(std, rel=1e-9)
    np.testing.assert_allclose(stack.get_batch([5, 500]).images.numpy(), centred[[5, 500]] / std, atol=1e-5)


def test_fourier_downsampling_keeps_low_frequencies(data_dir):
    stack = ParticleStack(data_dir / TRPV1, mrcs_path_map=TRPV1_MAP, box_size=32, normalize=False)
    assert stack.box_size == 32 and stack.pixel_size_angstrom == pytest.approx(4.88 * 48 / 32)
    small = stack.get_batch([0, 7]).images.double().numpy()
    big = _raw(data_dir / "particles/trpv1_small/trpv1_small_stack.mrcs")[[0, 7]].astype(np.float64)

    def spectrum(x):
        return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1))), axes=(-2, -1))

    # The 31 x 31 central block (the new Nyquist row/column is zeroed) of the 48-box spectrum,
    # scaled by (32/48)^2 so that pixel values keep their scale.
    f_small = spectrum(small)[:, 1:, 1:]
    f_big = spectrum(big)[:, 24 - 15 : 24 + 16, 24 - 15 : 24 + 16] * (32 / 48) ** 2
    np.testing.assert_allclose(f_small, f_big, atol=1e-3 * np.abs(f_big).max())
    assert small.mean() == pytest.approx(big.mean(), rel=1e-4)
    with pytest.raises(ValueError, match="box_size 64"):
        ParticleStack(data_dir / TRPV1, mrcs_path_map=TRPV1_MAP, box_size=64)


def test_half_split_is_deterministic_disjoint_and_complete(toy):
    a, b = toy.half_split(seed=3)
    assert len(a) == len(b) == 500
    assert len(np.intersect1d(a, b)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(1000))
    a2, b2 = toy.half_split(seed=3)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)
    assert not np.array_equal(a, toy.half_split(seed=4)[0])


def test_star_stacks_with_metadata(data_dir):
    star = data_dir / TRPV1
    with pytest.raises(FileNotFoundError, match="batch_0_restacked.mrc"):
        ParticleStack(star)
    stack = ParticleStack(star, mrcs_path_map=TRPV1_MAP, normalize=False)
    meta = read_star(star, path_map=TRPV1_MAP)
    batch = stack.get_batch(torch.tensor([9, 2]))
    torch.testing.assert_close(batch.rotations, meta.rotations[[9, 2]])
    torch.testing.assert_close(batch.shifts_angstrom, meta.shifts_angstrom[[9, 2]])
    torch.testing.assert_close(batch.ctf.defocus_u_angstrom, meta.ctf.defocus_u_angstrom[[9, 2]])
    raw = _raw(star.parent / "trpv1_small_stack.mrcs")
    np.testing.assert_array_equal(batch.images.numpy(), raw[[9, 2]])
    assert batch.pixel_size_angstrom == 4.88
    restored = pickle.loads(pickle.dumps(stack))
    torch.testing.assert_close(restored.get_batch([9, 2]).images, batch.images)
    assert [len(b) for b in stack.batches(4, shuffle_seed=0)] == [4, 4, 2]

    with pytest.warns(UserWarning, match="'MAP ' id"):
        real = ParticleStack(data_dir / "particles/relion31_real/relion31.star", normalize=False)
    np.testing.assert_array_equal(
        real.get_batch([4]).images.numpy(), _raw(data_dir / "particles/relion31_real/relion31.mrcs")[[4]]
    )


def test_cryosparc_stack_and_its_star_agree(data_dir):
    folder = data_dir / "particles/empiar10076_7"
    from_cs = ParticleStack(folder / "empiar_10076_7.cs", normalize=False)
    from_star = ParticleStack(folder / "empiar_10076_7.star", normalize=False)
    a, b = from_cs.get_batch(range(7)), from_star.get_batch(range(7))
    np.testing.assert_array_equal(a.images.numpy(), _raw(folder / "empiar_10076_7.mrc"))
    torch.testing.assert_close(a.images, b.images)
    df = starfile.read(folder / "empiar_10076_7.star")
    np.testing.assert_allclose(a.ctf.defocus_u_angstrom.numpy(), df["rlnDefocusU"], atol=0.01)
    np.testing.assert_allclose(a.ctf.defocus_angle_deg.numpy(), df["rlnDefocusAngle"], atol=1e-4)
    assert a.pixel_size_angstrom == pytest.approx(b.pixel_size_angstrom, rel=1e-6)


def test_bare_stacks(data_dir):
    bare = ParticleStack(data_dir / "particles/trpv1_small/trpv1_small_stack.mrcs", normalize=False)
    assert len(bare) == 10 and bare.pixel_size_angstrom == 4.88 and bare.metadata.ctf is None
    proj = data_dir / "particles/aspire_relion_projections/rln_proj_65.mrcs"
    with pytest.raises(ValueError, match=r"rln_proj_65\.mrcs.*voxel size is 0"):
        ParticleStack(proj)
    assert ParticleStack(proj, pixel_size_angstrom=5.0).pixel_size_angstrom == 5.0
    with pytest.raises(ValueError, match="unknown particle file type"):
        ParticleStack(data_dir / "maps/EMD-3197.map")


# ----------------------------------------------------------------------------- bad input


def _make_stack(path, data) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 2.0


def _make_star(path, stack_name: str, n_rows: int, image_size: int = 8) -> None:
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0], "rlnImageSize": [image_size]})
    rows = pd.DataFrame(
        {"rlnImageName": [f"{i:06d}@{stack_name}" for i in range(1, n_rows + 1)], "rlnOpticsGroup": 1}
    )
    starfile.write({"optics": optics, "particles": rows}, path, overwrite=True)


def test_bad_stacks(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(FileNotFoundError, match="nothing.star"):
        ParticleStack(tmp_path / "nothing.star")

    _make_stack(tmp_path / "three.mrcs", rng.normal(size=(3, 8, 8)).astype(np.float32))
    _make_star(tmp_path / "long.star", "three.mrcs", 5)
    with pytest.raises(ValueError, match=r"long\.star: row 5 asks for image 5.*three\.mrcs holds 3 images"):
        ParticleStack(tmp_path / "long.star")

    _make_star(tmp_path / "gone.star", "gone.mrcs", 2)
    with pytest.raises(FileNotFoundError, match=r"gone\.star: image stack .*gone\.mrcs does not exist"):
        ParticleStack(tmp_path / "gone.star")

    _make_star(tmp_path / "size.star", "three.mrcs", 3, image_size=16)
    with pytest.raises(ValueError, match=r"size\.star: image size 16.*differs from 8"):
        ParticleStack(tmp_path / "size.star")

    _make_stack(tmp_path / "rect.mrcs", rng.normal(size=(2, 8, 10)).astype(np.float32))
    _make_star(tmp_path / "rect.star", "rect.mrcs", 2)
    with pytest.raises(ValueError, match=r"rect\.mrcs: images are 10 x 8"):
        ParticleStack(tmp_path / "rect.star")

    _make_stack(tmp_path / "complex.mrcs", (rng.normal(size=(2, 8, 8)) * 1j).astype(np.complex64))
    _make_star(tmp_path / "complex.star", "complex.mrcs", 2)
    with pytest.raises(ValueError, match=r"complex\.mrcs: MRC mode 4 \(complex\)"):
        ParticleStack(tmp_path / "complex.star")

    _make_stack(tmp_path / "int16.mrcs", rng.integers(-100, 100, size=(2, 8, 8)).astype(np.int16))
    _make_star(tmp_path / "int16.star", "int16.mrcs", 2)
    assert (
        ParticleStack(tmp_path / "int16.star", normalize=False).get_batch([1]).images.dtype == torch.float32
    )


@pytest.mark.filterwarnings("ignore:Data array contains NaN:RuntimeWarning")
def test_nan_pixels_named_on_batch_read_and_validate(tmp_path):
    data = np.random.default_rng(1).normal(size=(6, 8, 8)).astype(np.float32)
    data[4, 3, 2] = np.nan
    _make_stack(tmp_path / "nan.mrcs", data)
    _make_star(tmp_path / "nan.star", "nan.mrcs", 6)
    stack = ParticleStack(tmp_path / "nan.star", normalize=False)
    stack.get_batch([0, 1, 5])
    with pytest.raises(ValueError, match=r"nan\.mrcs: particle 4 \(image 5 of the stack\) has NaN or Inf"):
        stack.get_batch([5, 4])
    with pytest.raises(ValueError, match=r"nan\.mrcs: particle 4"):
        stack.validate(chunk_size=2, progress=False)
    with pytest.raises(ValueError, match=r"nan\.mrcs: particle 4"):
        ParticleStack(tmp_path / "nan.star")  # the normalisation estimate reads it too


# ----------------------------------------------------------------------------- maps


def test_read_map_voxel_sizes(data_dir):
    volume, voxel = read_map(data_dir / "maps/EMD-3197.map")
    assert voxel == 11.4 and volume.shape == (20, 20, 20) and volume.dtype == torch.float32
    np.testing.assert_array_equal(volume.numpy(), _raw(data_dir / "maps/EMD-3197.map"))
    ribosome = data_dir / "maps/clean70SRibosome_vol_65p.mrc"
    with pytest.raises(ValueError, match=r"clean70SRibosome_vol_65p\.mrc: header voxel size .* is 0\.0"):
        read_map(ribosome)
    volume, voxel = read_map(ribosome, voxel_size_angstrom=5.0)
    assert voxel == 5.0 and volume.shape == (65, 65, 65)
    with pytest.raises(FileNotFoundError, match="no_such.mrc"):
        read_map(data_dir / "maps/no_such.mrc")


def test_read_map_reorders_axes_from_header(tmp_path):
    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # [z, y, x]
    with mrcfile.new(tmp_path / "xyz_swapped.mrc") as mrc:
        mrc.set_data(np.ascontiguousarray(volume.transpose(2, 1, 0)))  # sections = x, columns = z
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = 3, 2, 1
        mrc.voxel_size = 1.5
    got, voxel = read_map(tmp_path / "xyz_swapped.mrc")
    np.testing.assert_array_equal(got.numpy(), volume)
    assert voxel == 1.5


@pytest.mark.parametrize("axes", [(1, 1, 3), (0, 2, 3), (1, 2, 4)])
def test_read_map_rejects_an_axis_order_that_is_not_a_permutation(tmp_path, axes):
    path = tmp_path / "bad_axes.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((4, 4, 4), np.float32))
        mrc.voxel_size = 2.0
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = axes
    with pytest.raises(ValueError, match=r"bad_axes\.mrc.*mapc/mapr/maps"):
        read_map(path)


def test_read_map_reads_unset_axis_order_as_xyz_with_a_warning(tmp_path):
    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    path = tmp_path / "unset_axes.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = 2.0
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = 0, 0, 0
    with pytest.warns(UserWarning, match=r"unset_axes\.mrc.*unset"):
        got, _ = read_map(path)
    np.testing.assert_array_equal(got.numpy(), volume)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_write_map_refuses_non_finite_voxels_and_keeps_the_old_file(tmp_path, bad):
    out = tmp_path / "map.mrc"
    write_map(out, np.ones((4, 4, 4), np.float32), 2.0)
    volume = np.zeros((4, 4, 4), np.float32)
    volume[1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"map\.mrc: not written: 1 of 64 voxels are NaN or Inf"):
        write_map(out, volume, 2.0)
    assert os.listdir(tmp_path) == ["map.mrc"]
    with mrcfile.open(out) as mrc:  # the earlier map is intact
        np.testing.assert_array_equal(mrc.data, np.ones((4, 4, 4), np.float32))


def test_write_map_atomic_round_trip(tmp_path, monkeypatch):
    volume = torch.randn(6, 7, 8)
    out = tmp_path / "map.mrc"
    write_map(out, volume, 2.5)
    with mrcfile.open(out) as mrc:  # strict read: a valid header
        np.testing.assert_array_equal(mrc.data, volume.numpy())
        assert float(mrc.voxel_size.x) == pytest.approx(2.5)
    assert os.listdir(tmp_path) == ["map.mrc"]
    with pytest.raises(ValueError, match="voxel_size_angstrom=0"):
        write_map(out, volume, 0)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mrcfile, "new", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_map(out, torch.zeros(6, 7, 8), 2.5)
    assert os.listdir(tmp_path) == ["map.mrc"]  # old file intact, no temporary left
    monkeypatch.undo()
    np.testing.assert_array_equal(read_map(out)[0].numpy(), volume.numpy())
