"""The mantissa/exponent Hartley volume, against numpy's FFT and the analytic derivatives."""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pytest
import torch

from cryospin_lab.model.hartley_volume import DEFAULT_INIT_STD, HartleyVolume
from cryospin_lab.physics import so3
from cryospin_lab.physics.fourier import ifht_center
from cryospin_lab.physics.projection import FourierDisc, project_hartley, project_real


def numpy_hartley_3d(volume: np.ndarray) -> np.ndarray:
    """Centred Hartley transform ``Re F - Im F`` with numpy (DC at ``D // 2``)."""
    f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(volume)))
    return f.real - f.imag


def test_hartley_is_mantissa_times_natural_exp():
    volume = HartleyVolume(6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        volume.exponent.uniform_(-3.0, 3.0)
    expected = volume.mantissa.detach().numpy() * np.exp(volume.exponent.detach().numpy())
    np.testing.assert_allclose(volume.hartley().detach().numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(volume().detach().numpy(), expected, rtol=1e-6)
    # Not base 10: exp(1) = e.
    with torch.no_grad():
        volume.mantissa.fill_(1.0)
        volume.exponent.fill_(1.0)
    assert float(volume.hartley().detach()[0, 0, 0]) == pytest.approx(math.e)


def test_gradients_of_the_parameterisation():
    """dH/dm = exp(e), dH/de = H (analytic), and gradcheck in float64."""
    volume = HartleyVolume(4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(4, 4, 4, dtype=torch.float64)
    (volume.hartley() * weights).sum().backward()
    h = volume.hartley().detach()
    torch.testing.assert_close(volume.mantissa.grad, weights * torch.exp(volume.exponent.detach()))
    torch.testing.assert_close(volume.exponent.grad, weights * h)
    m = volume.mantissa.detach().clone().requires_grad_(True)
    e = volume.exponent.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m, e: m * torch.exp(e), (m, e))


@pytest.mark.parametrize("box_size", [8, 9])
def test_from_real_round_trip_and_numpy_reference(box_size):
    rng = np.random.default_rng(2)
    volume_real = rng.standard_normal((box_size,) * 3)
    volume = HartleyVolume.from_real(torch.from_numpy(volume_real))
    assert volume.mantissa.dtype == torch.float64 and volume.box_size == box_size
    np.testing.assert_allclose(volume.hartley().detach().numpy(), numpy_hartley_3d(volume_real), atol=1e-10)
    np.testing.assert_allclose(volume.to_real().detach().numpy(), volume_real, atol=1e-12)
    # The documented split: exponent = log(|H| + eps), |mantissa| < 1.
    assert volume.mantissa.abs().max() < 1.0
    h = np.abs(numpy_hartley_3d(volume_real))
    eps = 1e-6 * h.max()
    np.testing.assert_allclose(volume.exponent.detach().numpy(), np.log(h + eps), rtol=1e-12)


def test_from_real_float32_map_file(data_dir):
    volume_real = torch.from_numpy(mrcfile.read(data_dir / "maps/trpv1_volume_48.mrc").copy())
    volume = HartleyVolume.from_real(volume_real)
    assert volume.mantissa.dtype == torch.float32
    back = volume.to_real().detach()
    assert float((back - volume_real).abs().max()) < 1e-5 * float(volume_real.abs().max())


def test_ab_initio_init_is_documented_gaussian():
    volume = HartleyVolume(32, generator=torch.Generator().manual_seed(3))
    assert {name for name, _ in volume.named_parameters()} == {"mantissa", "exponent"}
    assert volume.mantissa.dtype == torch.float32
    assert float(volume.mantissa.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(volume.mantissa.std()) == pytest.approx(1.0, rel=0.01)
    torch.testing.assert_close(volume.exponent.detach(), torch.full((32,) * 3, math.log(DEFAULT_INIT_STD)))
    assert float(volume.hartley().std()) == pytest.approx(DEFAULT_INIT_STD, rel=0.01)
    again = HartleyVolume(32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again.mantissa, volume.mantissa)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="cubic"):
        HartleyVolume.from_real(torch.zeros(4, 4, 5))
    with pytest.raises(ValueError, match="NaN"):
        HartleyVolume.from_real(torch.full((4, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="init_std"):
        HartleyVolume(4, init_std=0.0)


def test_sliced_volume_projects_like_the_map():
    """A volume made from a map renders the map's projections (raw operator, same grid)."""
    rng = np.random.default_rng(4)
    k = np.arange(16) - 8
    z, y, x = np.meshgrid(k, k, k, indexing="ij")
    volume_real = torch.from_numpy(
        np.exp(-((x - 2) ** 2 + y**2 + (z + 1) ** 2) / 8.0) + 0.01 * rng.random((16,) * 3)
    )
    rotations = so3.random_rotations(3)
    disc = FourierDisc.make(16)
    slices = project_hartley(HartleyVolume.from_real(volume_real).hartley(), rotations, disc)
    images = ifht_center(disc.scatter(slices))
    expected = project_real(
        volume_real, rotations, pixel_size_angstrom=1.0, padding_factor=1, gridding_correction=False
    )
    torch.testing.assert_close(images.detach(), expected, rtol=1e-9, atol=1e-9)
