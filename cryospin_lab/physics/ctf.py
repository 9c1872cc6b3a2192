"""Contrast transfer function (CTF) of the weak-phase model, for a batch of images.

Conventions (docs/method.md §2, tested in ``tests/physics/test_ctf.py``):

* ``compute_ctf`` returns the *physical* CTF of docs/method.md §2 (the same
  formula as cryoDRGN's ``ctf.compute_ctf``)::

      lambda = 12.26426 / sqrt(U (1 + 0.978476e-6 U))         (U in volts, lambda in Å)
      df(theta) = (df_u + df_v)/2 + (df_u - df_v)/2 cos(2 (theta - theta_ast))
      gamma = 2 pi (-1/2 df lambda |k|^2 + 1/4 Cs lambda^3 |k|^4) - phi
      CTF = (sqrt(1 - w^2) sin(gamma) - w cos(gamma)) exp(-B |k|^2 / 4)

  ``theta = atan2(ky, kx)`` is the angle of the frequency from the ``+kx`` axis
  (images are indexed ``[y, x]``), so ``defocus_angle_deg`` is the direction,
  counter-clockwise from ``+x`` towards ``+y``, along which the defocus equals
  ``defocus_u_angstrom``. Positive defocus is underfocus.
* Sign: this CTF is ``-1`` times RELION's and torch-ctf's (``-sin(gamma - asin w)``);
  it is ``-w < 0`` at ``k = 0``. Data on disk (RELION convention) are
  ``-CTF * projection + noise``; the minus sign lives in the code that renders
  images, not here.

Not torch-ctf, which is the tests' independent reference: the projector needs
the CTF on arbitrary frequency lists (the disc), in float64, and for
``df_u < df_v`` too (torch-ctf builds its own grid, in float32, and takes the
square root of the astigmatism).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from cryospin_lab.physics.fourier import frequency_grid_2d

__all__ = [
    "CTFParams",
    "compute_ctf",
    "ctf_images",
    "electron_wavelength_angstrom",
    "frequency_grid_per_angstrom",
]

# Relativistic de Broglie wavelength: lambda = h / sqrt(2 m e U (1 + e U / (2 m c^2))).
# The coefficients come from the CODATA 2018 constants, not the rounded 12.2643 and 0.978466e-6 often
# quoted: the rounding moves gamma by ~1e-3 rad at high defocus near Nyquist, visible against torch-ctf.
_PLANCK = 6.62607015e-34  # J s (exact)
_ELEMENTARY_CHARGE = 1.602176634e-19  # C (exact)
_ELECTRON_MASS = 9.1093837015e-31  # kg (CODATA 2018)
_SPEED_OF_LIGHT = 299792458.0  # m/s (exact)
# h / sqrt(2 m e) in Å V^(1/2) (= 12.26426) and e / (2 m c^2) per volt (= 0.978476e-6).
_WAVELENGTH_NUMERATOR = _PLANCK / math.sqrt(2 * _ELECTRON_MASS * _ELEMENTARY_CHARGE) * 1e10
_RELATIVISTIC_CORRECTION_PER_VOLT = _ELEMENTARY_CHARGE / (2 * _ELECTRON_MASS * _SPEED_OF_LIGHT**2)


def electron_wavelength_angstrom(voltage_kv: Tensor | float) -> Tensor:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV (0.01969 Å at 300 kV)."""
    if not isinstance(voltage_kv, Tensor):
        voltage_kv = torch.as_tensor(voltage_kv, dtype=torch.float64)
    volts = voltage_kv * 1e3
    return _WAVELENGTH_NUMERATOR / torch.sqrt(volts * (1.0 + _RELATIVISTIC_CORRECTION_PER_VOLT * volts))


@dataclass(frozen=True)
class CTFParams:
    """CTF parameters of ``N`` images; every field is a float tensor of shape ``(N,)``.

    Construct with tensors, numpy arrays or lists (converted to float64 tensors;
    float tensors keep their dtype), or with :meth:`constant`. ``b_factor`` (Å^2,
    envelope ``exp(-B |k|^2 / 4)``) defaults to zeros.
    """

    defocus_u_angstrom: Tensor
    defocus_v_angstrom: Tensor
    defocus_angle_deg: Tensor
    voltage_kv: Tensor
    cs_mm: Tensor
    amplitude_contrast: Tensor
    phase_shift_deg: Tensor
    b_factor: Tensor | None = None

    def __post_init__(self) -> None:
        n = None
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                value = torch.zeros_like(self.defocus_u_angstrom)
            if not (isinstance(value, Tensor) and value.is_floating_point()):
                value = torch.as_tensor(value, dtype=torch.float64)
            if value.ndim != 1:
                raise ValueError(f"CTFParams.{f.name} must have shape (N,), got {tuple(value.shape)}")
            if n is None:
                n = value.shape[0]
            elif value.shape[0] != n:
                raise ValueError(
                    f"CTFParams.{f.name} has {value.shape[0]} entries, defocus_u_angstrom has {n}"
                )
            object.__setattr__(self, f.name, value)

    @classmethod
    def constant(
        cls,
        n: int,
        *,
        defocus_u_angstrom: float,
        defocus_v_angstrom: float | None = None,
        defocus_angle_deg: float = 0.0,
        voltage_kv: float = 300.0,
        cs_mm: float = 2.7,
        amplitude_contrast: float = 0.1,
        phase_shift_deg: float = 0.0,
        b_factor: float = 0.0,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> CTFParams:
        """``n`` images with the same parameters (``defocus_v`` defaults to ``defocus_u``)."""
        if defocus_v_angstrom is None:
            defocus_v_angstrom = defocus_u_angstrom
        values = dict(
            defocus_u_angstrom=defocus_u_angstrom,
            defocus_v_angstrom=defocus_v_angstrom,
            defocus_angle_deg=defocus_angle_deg,
            voltage_kv=voltage_kv,
            cs_mm=cs_mm,
            amplitude_contrast=amplitude_contrast,
            phase_shift_deg=phase_shift_deg,
            b_factor=b_factor,
        )
        return cls(**{k: torch.full((n,), float(v), dtype=dtype, device=device) for k, v in values.items()})

    def __len__(self) -> int:
        return self.defocus_u_angstrom.shape[0]

    def __getitem__(self, index) -> CTFParams:
        """Subset by a slice, integer array/tensor or boolean mask (an int gives a length-1 set)."""
        if isinstance(index, Tensor) and index.ndim == 0:
            index = int(index)
        if isinstance(index, (int, np.integer)):
            index = int(index)
            index = slice(index, index + 1 if index != -1 else None)
        if not isinstance(index, slice):
            index = torch.as_tensor(index, device=self.defocus_u_angstrom.device)
            if index.dtype != torch.bool:
                index = index.long()
        return CTFParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device=None, dtype: torch.dtype | None = None) -> CTFParams:
        """Move (and optionally cast) every field."""
        return CTFParams(
            **{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)}
        )

    @staticmethod
    def cat(params: list[CTFParams]) -> CTFParams:
        """Concatenate along the image axis."""
        return CTFParams(
            **{f.name: torch.cat([getattr(p, f.name) for p in params]) for f in fields(CTFParams)}
        )


def compute_ctf(params: CTFParams, freqs_per_angstrom: Tensor) -> Tensor:
    """Physical CTF (docs/method.md §2) of ``N`` images at frequencies ``(..., 2)`` = ``(kx, ky)`` in 1/Å.

    Returns ``(N, ...)``; the dtype is the promotion of the parameters' and the
    frequencies' dtypes. Differentiable with respect to every parameter.
    """
    if freqs_per_angstrom.shape[-1] != 2:
        raise ValueError(
            f"freqs_per_angstrom must end in (kx, ky), got shape {tuple(freqs_per_angstrom.shape)}"
        )
    dtype = torch.promote_types(params.defocus_u_angstrom.dtype, freqs_per_angstrom.dtype)
    device = freqs_per_angstrom.device
    p = params.to(device=device, dtype=dtype)
    freqs = freqs_per_angstrom.to(dtype)
    n_freq_dims = freqs.ndim - 1

    def per_image(x: Tensor) -> Tensor:
        return x.reshape(x.shape + (1,) * n_freq_dims)

    kx, ky = freqs[..., 0], freqs[..., 1]
    k2 = kx * kx + ky * ky
    theta = torch.atan2(ky, kx)
    wavelength = per_image(electron_wavelength_angstrom(p.voltage_kv))
    df_u, df_v = per_image(p.defocus_u_angstrom), per_image(p.defocus_v_angstrom)
    angle = per_image(torch.deg2rad(p.defocus_angle_deg))
    defocus = 0.5 * (df_u + df_v) + 0.5 * (df_u - df_v) * torch.cos(2.0 * (theta - angle))
    cs_angstrom = per_image(p.cs_mm) * 1e7
    gamma = 2.0 * math.pi * (
        -0.5 * defocus * wavelength * k2 + 0.25 * cs_angstrom * wavelength**3 * k2 * k2
    ) - per_image(torch.deg2rad(p.phase_shift_deg))
    w = per_image(p.amplitude_contrast)
    ctf = torch.sqrt(1.0 - w * w) * torch.sin(gamma) - w * torch.cos(gamma)
    return ctf * torch.exp(-per_image(p.b_factor) * k2 / 4.0)


def frequency_grid_per_angstrom(
    box_size: int, pixel_size_angstrom: float, device=None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """``(D, D, 2)`` frequencies ``(kx, ky)`` in 1/Å of the centred ``[y, x]`` grid (DC at ``D // 2``)."""
    return frequency_grid_2d(box_size, device=device, dtype=dtype) / (box_size * pixel_size_angstrom)


def ctf_images(params: CTFParams, box_size: int, pixel_size_angstrom: float) -> Tensor:
    """``(N, D, D)`` CTF on the centred frequency grid of ``fourier.fft_center`` (DC at ``D // 2``)."""
    freqs = frequency_grid_per_angstrom(
        box_size,
        pixel_size_angstrom,
        device=params.defocus_u_angstrom.device,
        dtype=params.defocus_u_angstrom.dtype,
    )
    return compute_ctf(params, freqs)
