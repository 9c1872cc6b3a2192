"""Every image against every rotation of a grid at once: the training loss as matrix products.

For the Gaussian loss ("l2") of image ``n`` under rotation ``g``, with Hartley
values ``y`` (the image, moved back by its shift), the CTF ``c`` and the
slice ``s_g`` of the volume (docs/method.md §1)::

    L[n, g] = mean_k (y[n, k] - contrast * c[n, k] * s_g[k])^2
            = (sum_k y^2 - 2 contrast (y c) @ s_g + (c^2) @ s_g^2) / M

The slices of the whole grid are rendered once; a batch of images is scored
against all of them with two matrix products instead of one render per pair,
which makes the posterior of every particle, and a global search of every
image's pose, affordable on a CPU. Moving the image by ``-t`` instead of the
slice by ``+t`` is exact (a shift is unitary and the CTF is even); so is the
expansion, up to round-off. Only the "l2" loss expands this way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cryospin_lab.physics.projection import FourierDisc, shift_slices
from cryospin_lab.physics.render import render_hartley

__all__ = ["grid_losses", "grid_slices"]


@torch.no_grad()
def grid_slices(volume_ht: Tensor, rotations: Tensor, disc: FourierDisc, *, chunk: int = 2048) -> Tensor:
    """``(G, M)`` slices of the volume at the ``(G, 3, 3)`` rotations, without CTF, shift or contrast."""
    flat = rotations.reshape(-1, 3, 3).to(volume_ht.dtype)
    parts = [
        render_hartley(volume_ht, flat[lo : lo + chunk][None], disc, pixel_size_angstrom=1.0, contrast=1.0)[0]
        for lo in range(0, flat.shape[0], chunk)
    ]
    return torch.cat(parts)


@torch.no_grad()
def grid_losses(
    slices: Tensor,
    observed_ht: Tensor,
    disc: FourierDisc,
    *,
    ctf_values: Tensor | None = None,
    shifts_angstrom: Tensor | None = None,
    pixel_size_angstrom: float = 1.0,
    contrast: float = -1.0,
    squared_slices: Tensor | None = None,
) -> Tensor:
    """``(N, G)`` "l2" losses of ``N`` images (``(N, M)`` Hartley values on ``disc``) at the ``G`` rotations
    whose slices are ``slices`` (:func:`grid_slices`); ``ctf_values`` ``(N, M)`` and the images' own
    ``shifts_angstrom`` ``(N, 2)`` as in :func:`~cryospin_lab.physics.render.render_hartley`;
    ``squared_slices`` (``slices ** 2``) saves recomputing it when the same grid scores many batches."""
    y = observed_ht
    if shifts_angstrom is not None:
        y = shift_slices(y, disc, -shifts_angstrom, pixel_size_angstrom)  # move each image back to centre
    s = slices.to(y.dtype)
    if ctf_values is None:
        weighted, squared_ctf = y, torch.ones_like(y)
    else:
        weighted, squared_ctf = y * ctf_values, ctf_values * ctf_values
    s2 = s * s if squared_slices is None else squared_slices.to(y.dtype)
    total = (y * y).sum(-1, keepdim=True) - (2 * contrast) * (weighted @ s.T) + squared_ctf @ s2.T
    return total / disc.n_freqs
