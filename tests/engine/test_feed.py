"""The feed's batches: Hartley values and CTF on each disc, from the full-disc cache or computed
per batch, against numpy's FFT of the stack's own images and the CTF in double precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryospin_lab.engine import feed as feed_module
from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.engine.feed import ParticleFeed
from cryospin_lab.physics.ctf import compute_ctf
from cryospin_lab.physics.projection import FourierDisc


def _numpy_hartley(images: np.ndarray, disc: FourierDisc) -> np.ndarray:
    """Centred Hartley values ``(Re F - Im F) / D`` on the disc, with numpy's FFT."""
    d = images.shape[-1]
    f = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(images, axes=(-2, -1))), axes=(-2, -1))
    return (f.real - f.imag).reshape(len(images), d * d)[:, disc.flat_index.numpy()] / d


def _check(feed: ParticleFeed, stack, rows: torch.Tensor, disc: FourierDisc) -> None:
    images, hartley, ctf = feed.batch(rows, disc)
    raw = stack.get_batch(rows.numpy()).images.double().numpy()
    np.testing.assert_allclose(images.numpy(), raw, rtol=0, atol=0)
    np.testing.assert_allclose(hartley.numpy(), _numpy_hartley(raw, disc), rtol=1e-4, atol=1e-4)
    freqs = disc.freqs_per_angstrom(stack.pixel_size_angstrom)  # float64
    expected = compute_ctf(stack.metadata.ctf[rows.numpy()].to(dtype=torch.float64), freqs)
    np.testing.assert_allclose(ctf.numpy(), expected.numpy(), rtol=0, atol=5e-5)  # float32 phase


@pytest.mark.parametrize("epoch", [0, 5, 100])  # the disc's ramp: its first, a middle and the full radius
def test_the_cached_batches_are_the_images_hartley_values_and_ctf(tiny_stack, epoch):
    feed = ParticleFeed(tiny_stack, TrainingConfig(), torch.device("cpu"))
    assert feed._cached is not None  # 64 images at D=32: well inside the budget
    rows = torch.tensor([5, 0, 63, 17, 5])
    _check(feed, tiny_stack, rows, feed.disc(epoch))


def test_a_set_over_the_budget_computes_each_batch(tiny_stack, monkeypatch):
    monkeypatch.setattr(feed_module, "available_memory_bytes", lambda: 4 * (64 * 32 * 32 * 4 + 1))
    feed = ParticleFeed(tiny_stack, TrainingConfig(), torch.device("cpu"))
    assert feed.images is not None and feed._cached is None  # the images fit, their two tables not
    _check(feed, tiny_stack, torch.tensor([3, 60, 9]), feed.disc(7))


def test_a_shard_caches_its_own_images(tiny_stack):
    feed = ParticleFeed(tiny_stack, TrainingConfig(), torch.device("cpu"), shard=(1, 2))
    assert feed._cached is not None and len(feed._cached[0]) == 32
    _check(feed, tiny_stack, torch.tensor([1, 63, 33]), feed.disc(100))
    _check(feed, tiny_stack, torch.tensor([0, 1, 62]), feed.disc(100))  # another rank's rows too
