"""The whole-set posterior equals the per-particle one; its summaries read known posteriors right.

References: ``view_posterior`` image by image (the per-particle path the
workbench shows), and posteriors built with healpy whose modes, angles and
entropy are known analytically.
"""

from __future__ import annotations

import math

import healpy
import numpy as np
import pytest
import torch

from cryospin_lab.analysis.ambiguity import MODE_MIN_MASS, set_ambiguity, summarise_posteriors
from cryospin_lab.analysis.pose_posterior import render_image, view_posterior
from cryospin_lab.physics import so3
from cryospin_lab.physics.ctf import CTFParams, compute_ctf, frequency_grid_per_angstrom

NSIDE = 4


def bumps(centres_deg, weights, width_deg=6.0, split=False):
    """A log posterior over HEALPix pixels: von Mises bumps at ``(theta, phi)`` centres (and, with
    ``split``, each bump's own share of the discretised probability)."""
    directions = np.stack(healpy.pix2vec(NSIDE, np.arange(healpy.nside2npix(NSIDE))), 1)
    kappa = 1.0 / math.radians(width_deg) ** 2
    parts = [
        weight * np.exp(kappa * (directions @ healpy.ang2vec(math.radians(theta), math.radians(phi)) - 1))
        for (theta, phi), weight in zip(centres_deg, weights, strict=True)
    ]
    total = sum(parts)
    log_p = np.log(total / total.sum())
    return (log_p, [part.sum() / total.sum() for part in parts]) if split else log_p


def test_summaries_of_known_posteriors():
    uniform = np.full(healpy.nside2npix(NSIDE), -math.log(healpy.nside2npix(NSIDE)))
    one = bumps([(50, 30)], [1.0])
    two = bumps([(90, 0), (90, 90)], [0.6, 0.4])  # two modes 90° apart
    tiny_second = bumps([(90, 0), (90, 120)], [1 - MODE_MIN_MASS / 4, MODE_MIN_MASS / 4])
    entropy, n_modes, angle, _ = summarise_posteriors(np.stack([uniform, one, two, tiny_second]), NSIDE)
    assert entropy[0] == pytest.approx(math.log2(healpy.nside2npix(NSIDE)))  # no information
    assert entropy[1] < entropy[2] < entropy[0]
    assert list(n_modes[1:]) == [1, 2, 1]  # a bump under MODE_MIN_MASS is not a mode
    assert math.isnan(angle[1]) and abs(angle[2] - 90.0) < 2 * healpy.nside2resol(NSIDE, arcmin=True) / 60


def test_mate_mass_is_the_probability_near_the_mate():
    two, (_, second) = bumps([(90, 0), (30, 200)], [0.7, 0.3], width_deg=3.0, split=True)
    mates = np.stack([healpy.ang2vec(math.radians(30), math.radians(200))])
    *_, mass = summarise_posteriors(two[None], NSIDE, mates)
    assert mass[0] == pytest.approx(second, rel=0.02)  # the whole second bump, nothing of the first


def test_the_set_path_equals_the_per_particle_posterior(tiny_ground_truth):
    d = tiny_ground_truth.shape[0]
    n, apix = 3, 2.5
    truth = so3.random_rotations(n, generator=torch.Generator().manual_seed(1))
    params = CTFParams(
        defocus_u_angstrom=torch.tensor([9000.0, 15000, 21000]), voltage_kv=torch.full((n,), 300.0),
        defocus_v_angstrom=torch.tensor([8000.0, 15000, 20000]), cs_mm=torch.full((n,), 2.7),
        defocus_angle_deg=torch.tensor([0.0, 40, 80]), amplitude_contrast=torch.full((n,), 0.1),
        phase_shift_deg=torch.zeros(n),
    )  # fmt: skip
    ctfs = compute_ctf(params, frequency_grid_per_angstrom(d, apix)).float()
    generator = torch.Generator().manual_seed(2)
    images = torch.stack([
        torch.as_tensor(render_image(tiny_ground_truth, truth[i], ctf=ctfs[i], pixel_size_angstrom=apix))
        for i in range(n)
    ])  # fmt: skip
    images = images + images.std() * torch.randn(images.shape, generator=generator)
    found = set_ambiguity(
        tiny_ground_truth, images, ctfs=ctfs, pixel_size_angstrom=apix, nside=NSIDE, n_psi=12
    )
    for i in range(n):
        reference = view_posterior(
            tiny_ground_truth, images[i], ctf=ctfs[i], pixel_size_angstrom=apix, nside=NSIDE, n_psi=12
        )
        np.testing.assert_allclose(np.exp(found.log_probabilities[i]), reference.probabilities, atol=1e-4)
        np.testing.assert_allclose(found.best_rotations[i], reference.best_rotation, atol=1e-6)
        assert found.temperatures[i] == pytest.approx(reference.temperature, rel=1e-9)
    assert found.particles_per_s > 0 and found.n_modes.min() >= 1
