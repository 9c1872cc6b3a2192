"""Centred Fourier and Hartley transforms, frequency grids, masks and shifts.

Conventions (tested in ``tests/physics/test_fourier.py``):

* Real-space arrays are centred at index ``D // 2`` along every axis; images are
  indexed ``[y, x]`` and volumes ``[z, y, x]``.
* Centred transforms put DC at index ``D // 2`` too:
  ``fft_center(x) = fftshift(fftn(ifftshift(x)))``. For even ``D`` the first
  row/column is the Nyquist frequency ``-D/2``.
* Hartley: ``H = Re F - Im F``. For a real signal
  ``F(k) = (H(k) + H(-k))/2 - i (H(k) - H(-k))/2``. The centred Hartley
  transform is its own inverse up to ``1/N`` (``N`` = number of samples).
* Frequencies are in cycles per pixel times ``D`` (integer "index" units,
  ``k = index - D//2``) unless a name says ``_per_angstrom``:
  ``k_per_angstrom = k / (D * apix)``.
* A shift of the content by ``t`` (pixels or Å, x then y) multiplies the
  Fourier transform by ``exp(-2 pi i k.t)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "fft_center",
    "ifft_center",
    "fht_center",
    "ifht_center",
    "hartley_to_fourier",
    "fourier_to_hartley",
    "flip_frequencies",
    "frequency_grid_2d",
    "radial_index_2d",
    "radial_index_3d",
    "circular_mask",
    "fourier_crop",
    "fourier_crop_images",
    "phase_shift",
    "shift_hartley",
]


def _dims(x: Tensor, ndim: int) -> tuple[int, ...]:
    return tuple(range(x.ndim - ndim, x.ndim))


def fft_center(x: Tensor, ndim: int = 2) -> Tensor:
    """Centred FFT over the last ``ndim`` axes (DC at ``D // 2``)."""
    dims = _dims(x, ndim)
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def ifft_center(x: Tensor, ndim: int = 2) -> Tensor:
    """Inverse of :func:`fft_center`."""
    dims = _dims(x, ndim)
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def fht_center(x: Tensor, ndim: int = 2) -> Tensor:
    """Centred Hartley transform ``Re F - Im F`` of a real array over the last ``ndim`` axes."""
    f = fft_center(x, ndim)
    return f.real - f.imag


def ifht_center(h: Tensor, ndim: int = 2) -> Tensor:
    """Inverse centred Hartley transform: ``fht_center(h) / N``."""
    n = math.prod(h.shape[-ndim:])
    return fht_center(h, ndim) / n


def flip_frequencies(x: Tensor, ndim: int = 2) -> Tensor:
    """``x(-k)`` on a centred grid over the last ``ndim`` axes.

    Index ``i`` (``k = i - D//2``) goes to ``2 (D//2) - i``; for even ``D`` the
    Nyquist index 0 maps to itself (``-D/2`` and ``+D/2`` alias), so the flip is
    followed by a roll of one sample.
    """
    dims = _dims(x, ndim)
    out = torch.flip(x, dims)
    shifts = tuple(1 if x.shape[d] % 2 == 0 else 0 for d in dims)
    if any(shifts):
        out = torch.roll(out, shifts, dims)
    return out


def hartley_to_fourier(h: Tensor, ndim: int = 2) -> Tensor:
    """Complex centred Fourier transform from a centred Hartley array (real signal)."""
    h_neg = flip_frequencies(h, ndim)
    return torch.complex((h + h_neg) / 2, -(h - h_neg) / 2)


def fourier_to_hartley(f: Tensor) -> Tensor:
    """``Re F - Im F``."""
    return f.real - f.imag


def frequency_grid_2d(d: int, device=None, dtype=torch.float32) -> Tensor:
    """``(D, D, 2)`` integer frequencies ``(kx, ky)`` of a centred ``[y, x]`` grid."""
    k = torch.arange(d, device=device, dtype=dtype) - d // 2
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    return torch.stack([kx, ky], dim=-1)


def radial_index_2d(d: int, device=None) -> Tensor:
    """``(D, D)`` integer shell index ``round(|k|)`` of a centred grid."""
    return torch.round(frequency_grid_2d(d, device, torch.float64).norm(dim=-1)).long()


def radial_index_3d(d: int, device=None) -> Tensor:
    """``(D, D, D)`` integer shell index ``round(|k|)`` of a centred ``[z, y, x]`` grid."""
    k = torch.arange(d, device=device, dtype=torch.float64) - d // 2
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    return torch.round(torch.sqrt(kx**2 + ky**2 + kz**2)).long()


def circular_mask(d: int, radius: float | None = None, device=None) -> Tensor:
    """Boolean ``(D, D)`` disc ``|k| <= radius`` (default ``D // 2``) around ``D // 2``."""
    radius = d // 2 if radius is None else radius
    return frequency_grid_2d(d, device, torch.float64).norm(dim=-1) <= radius


def fourier_crop(x: Tensor, d_out: int, ndim: int = 2) -> Tensor:
    """Downsample by cropping the centred spectrum of the last ``ndim`` axes to ``d_out``.

    Real input, real output; the mean value is kept (the result is scaled by
    ``(d_out/D)^ndim`` so pixel values keep their units per voxel sum ratio,
    i.e. a constant image stays the same constant).
    """
    d_in = x.shape[-1]
    if d_out > d_in:
        raise ValueError(f"fourier_crop cannot upsample: box {d_in} -> {d_out}")
    if d_out == d_in:
        return x
    f = fft_center(x.to(torch.float64) if x.dtype == torch.float64 else x.float(), ndim)
    start = d_in // 2 - d_out // 2
    sl = (slice(None),) * (x.ndim - ndim) + (slice(start, start + d_out),) * ndim
    f = f[sl]
    if d_out % 2 == 0:
        # The new Nyquist row/column holds one of a +/- pair; keep the transform
        # Hermitian (real output) by zeroing it.
        for dim in _dims(f, ndim):
            idx = [slice(None)] * f.ndim
            idx[dim] = 0
            f[tuple(idx)] = 0
    out = ifft_center(f, ndim).real * (d_out / d_in) ** ndim
    return out.to(x.dtype)


def fourier_crop_images(images: Tensor, d_out: int) -> Tensor:
    """:func:`fourier_crop` of a ``(..., D, D)`` image stack."""
    return fourier_crop(images, d_out, ndim=2)


def phase_shift(d: int, shifts: Tensor, pixel_size: float = 1.0) -> Tensor:
    """``exp(-2 pi i k.t)`` for ``(..., 2)`` shifts ``t = (x, y)``: ``(..., D, D)`` complex.

    ``shifts`` are in the units of ``pixel_size`` (pixels by default, Å with the
    pixel size in Å). Multiplying a centred FFT by this moves the content by ``+t``.
    """
    k = frequency_grid_2d(d, shifts.device, shifts.dtype) / (d * pixel_size)
    arg = -2 * math.pi * (shifts[..., None, None, 0] * k[..., 0] + shifts[..., None, None, 1] * k[..., 1])
    return torch.polar(torch.ones_like(arg), arg)


def shift_hartley(h: Tensor, h_flipped: Tensor, cos_phase: Tensor, sin_phase: Tensor) -> Tensor:
    """Hartley transform of a shifted real image from ``H(k)``, ``H(-k)``.

    With ``F'(k) = F(k) e^{i phi}`` (``phi = -2 pi k.t``):
    ``H'(k) = cos(phi) H(k) - sin(phi) H(-k)``. Works on any broadcastable
    layout (full grids or lists of masked frequencies).
    """
    return cos_phase * h - sin_phase * h_flipped
