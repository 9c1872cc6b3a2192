"""The explicit Hartley volume: a ``D^3`` grid of Hartley values stored as mantissa and exponent.

docs/method.md §3 (cryoSPIN Eq. 8, from cryoAI): the decoder is a real
``(D, D, D)`` array ``H`` on the centred frequency grid (``[z, y, x]``, DC at
``D // 2``, ``H = Re F - Im F``, see :mod:`cryospin_lab.physics.fourier`), stored as
two parameter arrays

    H = mantissa * exp(exponent)        (natural exponential)

so that Adam's roughly fixed-size parameter steps change ``H`` by a relative
amount whatever its magnitude (Hartley values span many decades from DC to
Nyquist).

Grid size: ``D^3``, not the ``(D+1)^3`` of the reference code. Slices are read
only inside the disc ``|k| <= (D - 1)//2`` (:class:`cryospin_lab.physics.projection.FourierDisc`),
so the ``+D/2`` plane an even box lacks is never needed. Any real ``H`` is the
Hartley transform of a real volume, so no symmetry constraint is imposed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cryospin_lab.physics import fourier

__all__ = ["HartleyVolume", "DEFAULT_INIT_STD"]

# Standard deviation of the Hartley values of a fresh (ab-initio) volume. The
# scale of H is arbitrary (image normalisation and the CTF fix it during
# training); small values keep the first projections near zero.
DEFAULT_INIT_STD = 1e-2


class HartleyVolume(torch.nn.Module):
    """A ``(D, D, D)`` centred Hartley volume ``H = mantissa * exp(exponent)``.

    Args:
        box_size: ``D``.
        init_std: scale of the ab-initio initialisation: ``mantissa ~ N(0, 1)``
            and ``exponent = log(init_std)`` everywhere, so ``H ~ N(0, init_std^2)``
            and, like a volume made by :meth:`from_real`, the magnitude lives in
            the exponent and the mantissa is of order one.
        generator: random generator for the mantissa (reproducible inits).
        dtype, device: of the parameters (float32 by default).
    """

    def __init__(
        self,
        box_size: int,
        *,
        init_std: float = DEFAULT_INIT_STD,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        if box_size < 2:
            raise ValueError(f"HartleyVolume box_size must be >= 2, got {box_size}")
        if not init_std > 0:
            raise ValueError(f"HartleyVolume init_std must be > 0, got {init_std}")
        shape = (box_size, box_size, box_size)
        mantissa = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        exponent = torch.full(shape, math.log(init_std), dtype=dtype, device=device)
        self.mantissa = torch.nn.Parameter(mantissa)
        self.exponent = torch.nn.Parameter(exponent)

    @property
    def box_size(self) -> int:
        """``D``."""
        return self.mantissa.shape[-1]

    def hartley(self) -> Tensor:
        """The ``(D, D, D)`` Hartley values ``mantissa * exp(exponent)`` (differentiable)."""
        return self.mantissa * torch.exp(self.exponent)

    def forward(self) -> Tensor:
        """Same as :meth:`hartley`."""
        return self.hartley()

    @torch.no_grad()
    def set_hartley(self, h: Tensor, *, eps: float | None = None) -> None:
        """Make :meth:`hartley` equal ``h`` ``(D, D, D)``, in place (an optimiser holding the
        parameters keeps them), split as in :meth:`from_real`: ``exponent = log(|h| + eps)``."""
        if h.shape != self.mantissa.shape:
            raise ValueError(f"set_hartley: expected {tuple(self.mantissa.shape)}, got {tuple(h.shape)}")
        if not torch.isfinite(h).all():
            raise ValueError("set_hartley: h contains NaN or Inf values")
        h = h.to(self.mantissa)
        if eps is None:
            eps = max(1e-6 * float(h.abs().max()), 1e-30)
        exponent = torch.log(h.abs() + eps)
        self.mantissa.copy_(h / torch.exp(exponent))
        self.exponent.copy_(exponent)

    def to_real(self) -> Tensor:
        """The real-space ``(D, D, D)`` density: ``ifht_center(H)`` (centre at ``D // 2``)."""
        return fourier.ifht_center(self.hartley(), ndim=3)

    @classmethod
    def from_real(cls, volume_real: Tensor, *, eps: float | None = None) -> HartleyVolume:
        """A volume whose :meth:`to_real` is ``volume_real`` (a real ``(D, D, D)`` density).

        With ``H = fht_center(volume_real)``: ``exponent = log(|H| + eps)`` and
        ``mantissa = H / exp(exponent)`` (so ``|mantissa| < 1`` and
        ``mantissa * exp(exponent) == H`` up to rounding). ``eps`` keeps zeros
        finite; default ``1e-6 * max |H|`` (or 1e-30 for an all-zero volume).
        Float64 input gives float64 parameters, anything else float32.
        """
        volume_real = torch.as_tensor(volume_real)
        if volume_real.ndim != 3 or len(set(volume_real.shape)) != 1:
            raise ValueError(
                f"HartleyVolume.from_real expects a cubic (D, D, D) volume, got {tuple(volume_real.shape)}"
            )
        dtype = torch.float64 if volume_real.dtype == torch.float64 else torch.float32
        if not torch.isfinite(volume_real).all():
            raise ValueError("HartleyVolume.from_real: volume_real contains NaN or Inf values")
        h = fourier.fht_center(volume_real.to(dtype), ndim=3)
        volume = cls(h.shape[-1], dtype=dtype, device=h.device)
        volume.set_hartley(h, eps=eps)
        return volume
