"""``winner_losses``: the cheap winner-takes-all equals the plain minimum over rendered heads.

The reference is the definition of Eq. 5 written out directly (render every
head with autograd, ``min`` over heads, backpropagate), whose gradient reaches
only each image's best head.
"""

from __future__ import annotations

import pytest
import torch

from cryospin_lab.physics import so3
from cryospin_lab.physics.projection import FourierDisc
from cryospin_lab.physics.render import LossKind, image_losses, render_hartley, winner_losses


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
