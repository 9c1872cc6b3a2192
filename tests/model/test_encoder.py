"""The multi-head encoder's fixed input pyramid and its presets' shapes.

The pyramid is checked against ``scipy.ndimage.gaussian_filter`` (an
independent implementation of the same padded Gaussian blur); the backbone is
checked for its shapes, strides and the 6-D -> SO(3) output only (what it
learns is the training tests' business).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.ndimage
import torch

from cryospin_lab.model.encoder import EncoderConfig, GaussianPyramid, MultiHeadEncoder


@pytest.mark.parametrize(("size", "scipy_mode"), [(64, "mirror"), (24, "nearest")])
def test_pyramid_matches_scipy_gaussian_filter(size, scipy_mode):
    # torch "reflect" padding (d c b | a b c d) is scipy's "mirror"; boxes not larger
    # than the kernel radius (45 px) use "replicate", scipy's "nearest".
    pyramid = GaussianPyramid(5)
    images = torch.randn(3, size, size, dtype=torch.float64)
    ours = pyramid(images.float()).double()
    for s, sigma in enumerate(pyramid.sigmas):
        for b in range(images.shape[0]):
            image = images[b].numpy()
            if sigma == 0:
                blurred = image
            else:
                blurred = scipy.ndimage.gaussian_filter(image, sigma, mode=scipy_mode, radius=pyramid.radius)
            expected = (blurred - blurred.mean()) / blurred.std(ddof=1)
            np.testing.assert_allclose(ours[b, s].numpy(), expected, atol=2e-4)


def test_pyramid_handles_rectangular_images():
    pyramid = GaussianPyramid(3)  # radius 9
    image = torch.randn(1, 20, 32, dtype=torch.float64)
    blurred = scipy.ndimage.gaussian_filter(image[0].numpy(), 3.0, mode="mirror", radius=pyramid.radius)
    expected = (blurred - blurred.mean()) / blurred.std(ddof=1)
    np.testing.assert_allclose(pyramid(image.float())[0, 2].double().numpy(), expected, atol=2e-4)


@pytest.mark.parametrize(
    ("preset", "box_size", "stride", "n_features"),
    [
        ("light", 32, 1, 64 * 2 * 2),
        ("light", 64, 2, 64 * 2 * 2),
        ("light", 128, 2, 64 * 4 * 4),
        ("paper", 128, 1, 256 * 2 * 2),
    ],
)
def test_presets_shapes_and_rotations(preset, box_size, stride, n_features):
    config = EncoderConfig(box_size=box_size, n_heads=3, preset=preset)
    assert config.first_stride() == stride
    encoder = MultiHeadEncoder(config).eval()
    images = torch.randn(2, box_size, box_size)
    assert encoder.backbone(encoder.pyramid(images)).shape == (2, n_features)
    rotations = encoder(images).rotations
    assert rotations.shape == (2, 3, 3, 3)
    eye = torch.eye(3).expand_as(rotations)
    torch.testing.assert_close(rotations @ rotations.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotations), torch.ones(2, 3), atol=1e-5, rtol=0)


def test_stem_stride_override_and_validation():
    assert EncoderConfig(box_size=64, stem_stride=1).first_stride() == 1
    assert EncoderConfig(box_size=128, preset="paper", stem_stride=2).first_stride() == 2
    with pytest.raises(ValueError, match="stem_stride"):
        EncoderConfig(stem_stride=-1).first_stride()
    with pytest.raises(ValueError, match="too small"):
        MultiHeadEncoder(EncoderConfig(box_size=16))


def test_pooled_rotation_heads_read_only_the_position_average():
    """With rotation_features="pooled" the rotations depend on the features averaged over the grid's
    positions (which an off-centre particle moves across); the shift heads read the positions, and
    with "grid" (the default) the rotations read them too."""
    torch.manual_seed(0)
    config = EncoderConfig(box_size=64, n_heads=3, estimate_shifts=True, max_shift_angstrom=20.0)
    encoder = MultiHeadEncoder(dataclasses.replace(config, rotation_features="pooled")).eval()
    grid = encoder.backbone(encoder.pyramid(torch.randn(2, 64, 64)))  # (2, C * 2 * 2)
    moved = grid.view(2, encoder.n_channels, 4).roll(1, dims=-1).reshape(2, -1)  # positions permuted

    def outputs(features):
        encoder.backbone.forward = lambda _: features
        try:
            return encoder(torch.zeros(2, 64, 64))
        finally:
            del encoder.backbone.forward

    before, after = outputs(grid), outputs(moved)
    torch.testing.assert_close(after.rotations, before.rotations)
    assert (after.shifts_angstrom - before.shifts_angstrom).abs().max() > 1e-3
    grid_head = MultiHeadEncoder(config).eval().heads[0]  # the default, "grid"
    assert (grid_head(grid)[:, :6] - grid_head(moved)[:, :6]).abs().max() > 1e-3


def test_rotation_features_is_checked():
    with pytest.raises(ValueError, match="rotation_features"):
        EncoderConfig(rotation_features="mean")
