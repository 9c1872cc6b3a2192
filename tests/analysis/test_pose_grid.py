"""Grid scoring by matrix products equals the trainer's render-and-compare, pair by pair.

The reference is the training path itself, one render per (image, rotation):
``image_losses(render_hartley(volume, R, disc, ctf, shift, contrast), y)``;
and, through ``view_posterior``, the per-particle posterior's losses.
"""

from __future__ import annotations

import numpy as np
import torch

from cryospin_lab.analysis.pose_grid import grid_losses, grid_slices
from cryospin_lab.analysis.pose_posterior import healpix_rotations, view_posterior
from cryospin_lab.physics import fourier, so3
from cryospin_lab.physics.ctf import CTFParams, compute_ctf, frequency_grid_per_angstrom
from cryospin_lab.physics.projection import FourierDisc
from cryospin_lab.physics.render import LossKind, image_losses, images_to_hartley, render_hartley

APIX = 2.5


def ctf_on_disc(disc: FourierDisc, n: int, d: int) -> torch.Tensor:
    params = CTFParams(
        defocus_u_angstrom=torch.linspace(9000, 25000, n, dtype=torch.float64),
        defocus_v_angstrom=torch.linspace(8000, 24000, n, dtype=torch.float64),
        defocus_angle_deg=torch.linspace(0, 170, n, dtype=torch.float64),
        voltage_kv=torch.full((n,), 300.0, dtype=torch.float64),
        cs_mm=torch.full((n,), 2.7, dtype=torch.float64),
        amplitude_contrast=torch.full((n,), 0.1, dtype=torch.float64),
        phase_shift_deg=torch.zeros(n, dtype=torch.float64),
    )
    freqs = frequency_grid_per_angstrom(d, APIX, dtype=torch.float64)
    return disc.gather(compute_ctf(params, freqs))


def test_grid_losses_equal_one_render_per_pair(tiny_ground_truth):
    d = tiny_ground_truth.shape[0]
    volume_ht = fourier.fht_center(tiny_ground_truth.double(), ndim=3)
    disc = FourierDisc.make(d, device="cpu")
    n, g = 5, 40
    rotations = so3.random_rotations(g, generator=torch.Generator().manual_seed(3)).double()
    images = torch.randn(n, d, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    observed = images_to_hartley(images, disc)
    ctf = ctf_on_disc(disc, n, d)
    shifts = torch.randn(n, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 4
    found = grid_losses(
        grid_slices(volume_ht, rotations, disc), observed, disc, ctf_values=ctf, shifts_angstrom=shifts,
        pixel_size_angstrom=APIX, contrast=-1.0,
    )  # fmt: skip
    predicted = render_hartley(
        volume_ht, rotations[None].expand(n, g, 3, 3), disc, pixel_size_angstrom=APIX, ctf_values=ctf,
        shifts_angstrom=shifts[:, None].expand(n, g, 2), contrast=-1.0,
    )  # fmt: skip
    expected = image_losses(predicted, observed, disc, LossKind.L2)
    torch.testing.assert_close(found, expected, rtol=1e-9, atol=1e-9)


def test_grid_losses_reproduce_the_per_particle_posterior(tiny_ground_truth):
    """The per-particle path (``view_posterior``, float32, chunked renders) as the reference."""
    d = tiny_ground_truth.shape[0]
    volume = tiny_ground_truth.numpy()
    image = torch.randn(d, d, generator=torch.Generator().manual_seed(6)).numpy()
    posterior = view_posterior(volume, image, ctf=None, pixel_size_angstrom=APIX, nside=2, n_psi=8)
    disc = FourierDisc.make(d, device="cpu")
    volume_ht = fourier.fht_center(torch.from_numpy(volume).double(), ndim=3)
    slices = grid_slices(volume_ht, healpix_rotations(2, 8), disc)
    observed = images_to_hartley(torch.from_numpy(image).double()[None], disc)
    found = grid_losses(slices, observed, disc).reshape(posterior.losses.shape)
    np.testing.assert_allclose(found.numpy(), posterior.losses, rtol=1e-4)
