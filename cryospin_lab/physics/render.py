"""One ``render()`` and one loss for both stages (docs/method.md §1, §3, §4).

Both the amortized stage (poses from the encoder heads) and the direct stage
(poses from the pose table) call :func:`render_hartley`; only the source of
the rotations and shifts differs.

Everything is compared in Hartley space on the frequencies of a
:class:`~cryospin_lab.physics.projection.FourierDisc`: the CTF is real and even so it
multiplies Hartley values directly, and ``sum H^2 = sum |F|^2`` over a disc
closed under ``k -> -k``, so the Gaussian likelihood of Eq. 3 is a plain sum of
squares of Hartley differences.

Winner-takes-all (Eq. 5) has its own entry point, :func:`winner_losses`: it
renders all heads without autograd and only the winning head with it, which
gives the same loss and gradients at a fraction of the cost of
``image_losses(render_hartley(...)).min(dim=1)``
(docs/decisions.md#throughput-winner-losses).
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor

from cryospin_lab.physics import fourier, slice_kernel
from cryospin_lab.physics.projection import FourierDisc, project_hartley, shift_slices, slice_volume_adjoint

__all__ = [
    "LossKind",
    "backproject_hartley",
    "images_to_hartley",
    "render_hartley",
    "image_losses",
    "pose_losses",
    "winner_losses",
]


class LossKind(str, enum.Enum):
    """Per-image data misfit."""

    L2 = "l2"  # mean squared Hartley difference: Gaussian NLL of Eq. 3 up to 1/(2 sigma^2)
    L1 = "l1"  # mean modulus |F_pred - F_obs| of the complex difference (reference code)


def images_to_hartley(images: Tensor, disc: FourierDisc) -> Tensor:
    """``(B, D, D)`` real images to their ``(B, M)`` Hartley values on the disc.

    Scaled by ``1/D`` (the orthonormal Hartley transform) so that white noise of
    variance ``s^2`` per pixel has variance ``s^2`` per Hartley coefficient:
    losses then read in units of the per-pixel noise variance.
    """
    d = images.shape[-1]
    return disc.gather(fourier.fht_center(images, ndim=2)) / d


def render_hartley(
    volume_ht: Tensor,
    rotations: Tensor,
    disc: FourierDisc,
    *,
    pixel_size_angstrom: float,
    ctf_values: Tensor | None = None,
    shifts_angstrom: Tensor | None = None,
    contrast: float = -1.0,
) -> Tensor:
    """Predicted Hartley values ``(B, H, M)`` (or ``(B, M)``) of images: ``contrast * CTF * shift(slice)``.

    Args:
        volume_ht: ``(D, D, D)`` Hartley volume (the model, unpadded).
        rotations: ``(B, H, 3, 3)`` candidate rotations (or ``(B, 3, 3)``).
        ctf_values: ``(B, M)`` physical CTF on the disc; broadcast over heads.
        shifts_angstrom: ``(B, H, 2)`` or ``(B, 2)`` in-plane shifts.
        contrast: ``-1`` for RELION-convention stacks (protein bright, image =
            ``-CTF * projection``), so that the reconstructed density is
            positive; ``+1`` for stacks with the other sign.
    """
    if ctf_values is not None and rotations.ndim == 4:
        ctf_values = ctf_values[:, None, :]
    slices = project_hartley(
        volume_ht,
        rotations,
        disc,
        pixel_size_angstrom=pixel_size_angstrom,
        shifts_angstrom=shifts_angstrom,
        ctf_values=ctf_values,
    )
    return contrast * slices


def image_losses(predicted_ht: Tensor, observed_ht: Tensor, disc: FourierDisc, kind: LossKind) -> Tensor:
    """Per image (and head) misfit, averaged over the disc: ``(B, H)`` or ``(B,)``.

    ``observed_ht`` is ``(B, M)`` and broadcast over the head dimension.
    """
    if predicted_ht.ndim == observed_ht.ndim + 1:
        observed_ht = observed_ht[:, None, :]
    diff = predicted_ht - observed_ht
    if LossKind(kind) is LossKind.L2:
        return (diff * diff).mean(-1)
    # |F(k)|^2 = (H(k)^2 + H(-k)^2) / 2 for the complex difference of real images.
    diff_minus = diff.index_select(-1, disc.minus_index.to(diff.device))
    return torch.sqrt((diff * diff + diff_minus * diff_minus) / 2 + 1e-12).mean(-1)


def pose_losses(
    volume_ht: Tensor,
    rotations: Tensor,
    disc: FourierDisc,
    observed_ht: Tensor,
    kind: LossKind,
    *,
    pixel_size_angstrom: float,
    ctf_values: Tensor | None = None,
    shifts_angstrom: Tensor | None = None,
    contrast: float = -1.0,
) -> Tensor:
    """``(B,)`` losses of images at ``(B, 3, 3)`` rotations under a fixed volume, differentiable w.r.t.
    the rotations (and shifts): ``image_losses(render_hartley(...))``.

    With the "l2" loss, no shifts, and the CPU slicer's kernel, the loss and its gradient are the
    kernel's (:func:`~cryospin_lab.physics.slice_kernel.plane_l2_losses`: no autograd graph over
    the samples; docs/decisions.md#fused-pose-loss); otherwise the generic path.
    """
    fused = (
        LossKind(kind) is LossKind.L2
        and shifts_angstrom is None
        and not volume_ht.requires_grad
        and rotations.ndim == 3
        and slice_kernel.serves(volume_ht)
    )
    if not fused:
        predicted = render_hartley(
            volume_ht, rotations, disc, pixel_size_angstrom=pixel_size_angstrom, ctf_values=ctf_values,
            shifts_angstrom=shifts_angstrom, contrast=contrast,
        )  # fmt: skip
        return image_losses(predicted, observed_ht, disc, kind)
    weights = torch.full_like(observed_ht, contrast) if ctf_values is None else contrast * ctf_values
    planes = rotations[:, :2, :].reshape(-1, 6)
    return slice_kernel.plane_l2_losses(
        volume_ht, planes, disc.freqs, volume_ht.shape[0] // 2, weights, observed_ht
    )


def winner_losses(
    volume_ht: Tensor,
    rotations: Tensor,
    disc: FourierDisc,
    observed_ht: Tensor,
    kind: LossKind,
    *,
    pixel_size_angstrom: float,
    ctf_values: Tensor | None = None,
    shifts_angstrom: Tensor | None = None,
    contrast: float = -1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Winner-takes-all (Eq. 5): each image's loss under its best head, with gradients.

    Args:
        rotations: ``(B, H, 3, 3)`` candidates; ``shifts_angstrom`` ``(B, H, 2)``
            or None; the other arguments as in :func:`render_hartley` and
            :func:`image_losses`.

    Returns:
        ``(best_losses, best_heads, losses)``: ``(B,)`` the winners' losses,
        differentiable w.r.t. ``volume_ht``, ``rotations`` and ``shifts_angstrom``;
        ``(B,)`` long index of each image's winning head; ``(B, H)`` every
        head's loss (no gradient).

    Same values and gradients as ``image_losses(render_hartley(...)).min(dim=1)``:
    the gradient of a minimum reaches only its argmin, so the ``H - 1`` losing
    renders contribute zeros, while their backward pass through the slicer
    costs more than their forward. Here all heads
    are rendered forward only (no autograd graph kept), then the ``B`` winners
    are rendered again with autograd: ``H`` forwards + 1 forward-backward
    instead of ``H`` forward-backwards.
    """
    if rotations.ndim != 4 or rotations.shape[-2:] != (3, 3):
        raise ValueError(f"winner_losses rotations must be (B, H, 3, 3), got {tuple(rotations.shape)}")
    render_kwargs = dict(pixel_size_angstrom=pixel_size_angstrom, ctf_values=ctf_values, contrast=contrast)
    with torch.no_grad():
        predicted = render_hartley(
            volume_ht.detach(),
            rotations.detach(),
            disc,
            shifts_angstrom=None if shifts_angstrom is None else shifts_angstrom.detach(),
            **render_kwargs,
        )
        losses = image_losses(predicted, observed_ht, disc, kind)  # (B, H)
        del predicted
        best_heads = losses.argmin(dim=1)
    rows = torch.arange(rotations.shape[0], device=rotations.device)
    best_heads_here = best_heads.to(rotations.device)
    predicted = render_hartley(
        volume_ht,
        rotations[rows, best_heads_here],
        disc,
        shifts_angstrom=None if shifts_angstrom is None else shifts_angstrom[rows, best_heads_here],
        **render_kwargs,
    )
    return image_losses(predicted, observed_ht, disc, kind), best_heads, losses


def backproject_hartley(
    shape: torch.Size | tuple[int, int, int],
    rotations: Tensor,
    disc: FourierDisc,
    observed_ht: Tensor,
    *,
    pixel_size_angstrom: float,
    ctf_values: Tensor | None = None,
    shifts_angstrom: Tensor | None = None,
    contrast: float = -1.0,
) -> tuple[Tensor, Tensor]:
    """The adjoint of :func:`render_hartley` applied to images, and to their CTF: ``(sum A^T y,
    sum B^T (c CTF))`` with ``A = c CTF shift(slice)`` and ``B = c CTF slice``, two ``shape``
    volumes.

    ``sum A^T y / sum A^T (c CTF)`` is the CTF-weighted back-projection of the images (the usual
    gridding estimate of the least-squares volume): a map in one pass, without training. Each
    sample's value is ``A``'s per-sample part transposed (``c CTF y``, moved back by the shift
    through autograd), then :func:`~cryospin_lab.physics.projection.slice_volume_adjoint` spreads
    it on the volume: the exact transpose of the renderer, slicer and shifts included, without
    rendering empty volumes (docs/decisions.md#backprojection-adjoint).
    """
    weights = torch.full_like(observed_ht, contrast) if ctf_values is None else contrast * ctf_values
    weights = weights.to(observed_ht.dtype)
    values = weights * observed_ht
    if shifts_angstrom is not None:
        with torch.enable_grad():
            unshifted = torch.zeros_like(observed_ht, requires_grad=True)
            moved = shift_slices(unshifted, disc, shifts_angstrom, pixel_size_angstrom)
            (values,) = torch.autograd.grad(moved, unshifted, grad_outputs=values)
    size, freqs = shape[0], disc.freqs.to(observed_ht.device)
    data = slice_volume_adjoint(size, rotations, freqs, values)
    return data, slice_volume_adjoint(size, rotations, freqs, weights * weights)
