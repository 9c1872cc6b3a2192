"""Centred FFT/Hartley conventions against numpy and analytic results."""

import numpy as np
import pytest
import torch

from cryospin_lab.physics import fourier


@pytest.mark.parametrize("d", [8, 9])
def test_fft_center_puts_dc_at_centre_and_matches_numpy(d):
    x = torch.randn(3, d, d, dtype=torch.float64)
    ours = fourier.fft_center(x).numpy()
    ref = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x.numpy(), axes=(-2, -1))), axes=(-2, -1))
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    assert ours[:, d // 2, d // 2] == pytest.approx(x.sum((-1, -2)).numpy())
    # a delta at the real-space centre has a flat, real spectrum
    delta = torch.zeros(d, d, dtype=torch.float64)
    delta[d // 2, d // 2] = 1
    np.testing.assert_allclose(fourier.fft_center(delta).numpy(), np.ones((d, d)), atol=1e-12)
    assert torch.allclose(fourier.ifft_center(fourier.fft_center(x)).real, x)


@pytest.mark.parametrize("d", [8, 9])
@pytest.mark.parametrize("ndim", [2, 3])
def test_hartley_roundtrip_and_fourier_relation(d, ndim):
    x = torch.randn((2,) + (d,) * ndim, dtype=torch.float64)
    h = fourier.fht_center(x, ndim)
    assert torch.allclose(fourier.ifht_center(h, ndim), x, atol=1e-10)
    f = fourier.fft_center(x, ndim)
    assert torch.allclose(fourier.hartley_to_fourier(h, ndim), f, atol=1e-10)
    # flip_frequencies is k -> -k: Friedel symmetry F(-k) = conj F(k)
    assert torch.allclose(fourier.flip_frequencies(f, ndim), f.conj(), atol=1e-10)


def test_flip_frequencies_index_map():
    for d in (6, 7):
        k = torch.arange(d) - d // 2
        flipped = fourier.flip_frequencies(k.view(1, d).expand(d, d).clone(), ndim=2)[0]
        expected = (-k + d // 2) % d - d // 2 if d % 2 == 0 else -k
        assert torch.equal(flipped, expected)


@pytest.mark.parametrize("d", [16, 17])
def test_phase_shift_moves_content_by_whole_pixels(d):
    x = torch.randn(d, d, dtype=torch.float64)
    shifts = torch.tensor([3.0, -2.0], dtype=torch.float64)  # (x, y) pixels
    moved = fourier.ifft_center(fourier.fft_center(x) * fourier.phase_shift(d, shifts)).real
    expected = torch.roll(x, shifts=(-2, 3), dims=(0, 1))
    assert torch.allclose(moved, expected, atol=1e-10)
    # in Å with a pixel size
    moved_a = fourier.ifft_center(fourier.fft_center(x) * fourier.phase_shift(d, shifts * 2.5, 2.5)).real
    assert torch.allclose(moved_a, expected, atol=1e-10)


def test_shift_hartley_equals_shifted_image_hartley():
    d = 12
    x = torch.randn(d, d, dtype=torch.float64)
    t = torch.tensor([1.3, -0.7], dtype=torch.float64)
    phase = fourier.phase_shift(d, t)
    h = fourier.fht_center(x)
    shifted = fourier.shift_hartley(h, fourier.flip_frequencies(h), phase.real, phase.imag)
    expected = fourier.fourier_to_hartley(fourier.fft_center(x) * phase)
    assert torch.allclose(shifted, expected, atol=1e-10)


def test_fourier_crop_matches_scipy_zoom_of_band_limited_image():
    from scipy import ndimage

    d, d_out = 64, 32
    yy, xx = np.mgrid[:d, :d] - d // 2
    img = np.exp(-((xx - 5) ** 2 + (yy + 3) ** 2) / (2 * 6.0**2))  # smooth: band limited
    small = fourier.fourier_crop(torch.from_numpy(img), d_out).numpy()
    # downsampled pixel i sits at 2*(i - d_out//2) + d//2 in the original grid
    coords = (np.arange(d_out) - d_out // 2) * 2 + d // 2
    ref = ndimage.map_coordinates(img, np.meshgrid(coords, coords, indexing="ij"), order=3)
    np.testing.assert_allclose(small, ref, atol=1e-3)
    const = fourier.fourier_crop(torch.full((d, d), 2.0, dtype=torch.float64), d_out)
    assert torch.allclose(const, torch.full((d_out, d_out), 2.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot upsample"):
        fourier.fourier_crop(torch.zeros(8, 8), 16)


def test_radial_index_and_mask():
    r = fourier.radial_index_2d(9)
    assert r[4, 4] == 0 and r[4, 8] == 4 and r[0, 0] == round(np.hypot(4, 4))
    m = fourier.circular_mask(10, radius=3)
    assert m.sum().item() == sum(1 for x in range(-5, 5) for y in range(-5, 5) if x * x + y * y <= 9)
    r3 = fourier.radial_index_3d(8)
    assert r3[4, 4, 4] == 0 and r3[0, 4, 4] == 4
