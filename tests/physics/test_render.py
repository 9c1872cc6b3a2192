"""``winner_losses`` and ``pose_losses``: the cheap paths equal their definitions.

``winner_losses``' reference is Eq. 5 written out directly (render every head
with autograd, ``min`` over heads, backpropagate), whose gradient reaches only
each image's best head. ``pose_losses``' kernel path is checked against
autograd through torch's ``grid_sample`` and against finite differences.
"""

from __future__ import annotations

import pytest
import torch

from cryospin_lab.physics import fourier, slice_kernel, so3
from cryospin_lab.physics.projection import FourierDisc
from cryospin_lab.physics.render import (
    LossKind,
    backproject_hartley,
    image_losses,
    pose_losses,
    render_hartley,
    winner_losses,
)


@pytest.mark.parametrize("kind", [LossKind.L2, LossKind.L1])
@pytest.mark.parametrize("with_shifts", [False, True])
def test_winner_losses_equal_min_over_heads_with_gradients(kind, with_shifts):
    d, b, h, apix = 16, 5, 4, 2.0
    disc = FourierDisc.make(d)
    volume = torch.randn(d, d, d, dtype=torch.float64)
    rotations = so3.random_rotations(b * h).reshape(b, h, 3, 3)
    shifts = 3 * torch.randn(b, h, 2, dtype=torch.float64) if with_shifts else None
    ctf = torch.rand(b, disc.n_freqs, dtype=torch.float64) * 2 - 1
    observed = torch.randn(b, disc.n_freqs, dtype=torch.float64)

    def leaves():
        out = [volume.clone().requires_grad_(True), rotations.clone().requires_grad_(True)]
        return out + ([shifts.clone().requires_grad_(True)] if with_shifts else [None])

    kwargs = dict(pixel_size_angstrom=apix, ctf_values=ctf, contrast=-1.0)
    v_ref, r_ref, s_ref = leaves()
    losses_ref = image_losses(
        render_hartley(v_ref, r_ref, disc, shifts_angstrom=s_ref, **kwargs), observed, disc, kind
    )
    best_ref, heads_ref = losses_ref.min(dim=1)
    (best_ref * torch.arange(1.0, b + 1, dtype=torch.float64)).sum().backward()

    v, r, s = leaves()
    best, heads, losses = winner_losses(v, r, disc, observed, kind, shifts_angstrom=s, **kwargs)
    (best * torch.arange(1.0, b + 1, dtype=torch.float64)).sum().backward()

    assert torch.equal(heads, heads_ref)
    assert not losses.requires_grad
    torch.testing.assert_close(losses, losses_ref.detach())
    torch.testing.assert_close(best.detach(), best_ref.detach())
    torch.testing.assert_close(v.grad, v_ref.grad)
    torch.testing.assert_close(r.grad, r_ref.grad)
    losers = torch.ones(b, h, dtype=torch.bool)
    losers[torch.arange(b), heads] = False
    assert torch.all(r.grad[losers] == 0)
    if with_shifts:
        torch.testing.assert_close(s.grad, s_ref.grad)


def test_winner_losses_needs_heads():
    disc = FourierDisc.make(8)
    with pytest.raises(ValueError, match=r"\(B, H, 3, 3\)"):
        winner_losses(
            torch.zeros(8, 8, 8),
            torch.eye(3).expand(2, 3, 3),
            disc,
            torch.zeros(2, disc.n_freqs),
            LossKind.L2,
            pixel_size_angstrom=1.0,
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_ctf", [True, False])
def test_pose_losses_kernel_path_equals_grid_sample_autograd(monkeypatch, dtype, with_ctf):
    """The pose steps' fused loss (C kernel, hand-written backward) against autograd through torch's
    ``grid_sample`` slicer: the same losses and rotation gradients, through the exponential map."""
    d, b, apix = 16, 6, 2.0
    generator = torch.Generator().manual_seed(3)
    disc = FourierDisc.make(d)
    volume = torch.randn(d, d, d, dtype=dtype, generator=generator)
    base = so3.random_rotations(b, generator=generator).to(dtype)
    omega0 = 0.1 * torch.randn(b, 3, dtype=dtype, generator=generator)
    ctf = (torch.rand(b, disc.n_freqs, dtype=dtype, generator=generator) * 2 - 1) if with_ctf else None
    observed = torch.randn(b, disc.n_freqs, dtype=dtype, generator=generator)
    kwargs = dict(pixel_size_angstrom=apix, ctf_values=ctf, contrast=-1.0)
    weights = torch.arange(1.0, b + 1, dtype=dtype)

    def losses_and_grad(kernel: bool):
        if not kernel:
            monkeypatch.setattr(slice_kernel, "available", lambda: False)
        omega = omega0.clone().requires_grad_(True)
        losses = pose_losses(volume, so3.exp_so3(omega) @ base, disc, observed, LossKind.L2, **kwargs)
        (losses * weights).sum().backward()
        monkeypatch.undo()
        return losses.detach(), omega.grad

    assert slice_kernel.available()
    losses, grad = losses_and_grad(kernel=True)
    losses_ref, grad_ref = losses_and_grad(kernel=False)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(losses, losses_ref, **tol)
    torch.testing.assert_close(grad, grad_ref, **tol)


def test_pose_losses_kernel_gradcheck():
    """Finite differences of the hand-written backward, float64, off-lattice frequencies."""
    generator = torch.Generator().manual_seed(4)
    volume = torch.randn(8, 8, 8, dtype=torch.float64, generator=generator)
    planes = so3.random_rotations(3, generator=generator)[:, :2, :].reshape(3, 6).requires_grad_(True)
    freqs = torch.rand(20, 2, dtype=torch.float64, generator=generator) * 5.0 - 2.5
    weights = torch.randn(3, 20, dtype=torch.float64, generator=generator)
    observed = torch.randn(3, 20, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(
        lambda p: slice_kernel.plane_l2_losses(volume, p, freqs, 4, weights, observed), (planes,)
    )
    with pytest.raises(ValueError, match="detached"):
        slice_kernel.plane_l2_losses(volume.requires_grad_(True), planes, freqs, 4, weights, observed)


@pytest.mark.parametrize("path", ["c_kernel", "grid_sample"])
def test_back_projection_is_the_renderer_s_adjoint(path, monkeypatch):
    """<A v, y> = <v, A^T y> for random v and y, with CTF and shifts (A: render_hartley), on
    each slicer path (the back-projection scatters without rendering)."""
    if path == "grid_sample":
        monkeypatch.setattr(slice_kernel, "available", lambda: False)
    d, b = 12, 5
    generator = torch.Generator().manual_seed(4)
    disc = FourierDisc.make(d)
    rotations = so3.random_rotations(b, generator=generator)
    ctf = torch.rand(b, disc.n_freqs, generator=generator) * 2 - 1
    shifts = torch.randn(b, 2, generator=generator)
    volume = torch.randn(d, d, d, generator=generator, dtype=torch.float32)
    images = torch.randn(b, disc.n_freqs, generator=generator)
    kwargs = dict(pixel_size_angstrom=1.5, ctf_values=ctf, contrast=-1.0)
    rendered = render_hartley(volume, rotations, disc, shifts_angstrom=shifts, **kwargs)
    data, weights = backproject_hartley(
        volume.shape, rotations, disc, images, shifts_angstrom=shifts, **kwargs
    )
    torch.testing.assert_close((rendered * images).sum(), (volume * data).sum(), rtol=1e-4, atol=1e-4)
    # the weights are the adjoint applied to each image's own CTF, without its shift
    unshifted = render_hartley(volume, rotations, disc, **kwargs)
    torch.testing.assert_close((unshifted * -ctf).sum(), (volume * weights).sum(), rtol=1e-4, atol=1e-4)


def test_back_projection_of_many_views_recovers_a_smooth_volume():
    """Noiseless views of a smooth volume from many directions: the CTF-weighted back-projection
    ``sum A^T y / sum A^T CTF`` matches the volume's Hartley values on the sampled frequencies."""
    d, b = 16, 3000
    generator = torch.Generator().manual_seed(5)
    x = torch.arange(d, dtype=torch.float32) - d // 2
    r2 = x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2
    volume = fourier.fht_center(
        torch.exp(-r2 / 8.0) + 0.5 * torch.exp(-((x[:, None, None] - 3) ** 2 + r2) / 4)
    )
    disc = FourierDisc.make(d, d // 2 - 2)
    rotations = so3.random_rotations(b, generator=generator)
    ctf = 0.5 + 0.5 * torch.rand(b, disc.n_freqs, generator=generator)
    kwargs = dict(pixel_size_angstrom=1.0, ctf_values=ctf, contrast=-1.0)
    images = render_hartley(volume, rotations, disc, **kwargs)
    data, weights = backproject_hartley(volume.shape, rotations, disc, images, **kwargs)
    inside = weights > 0.05 * weights.max()
    estimate = data[inside] / weights[inside]
    correlation = torch.corrcoef(torch.stack([estimate, volume[inside]]))[0, 1]
    assert float(correlation) > 0.98
