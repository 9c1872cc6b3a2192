"""The multi-head encoder's fixed input pyramid and its presets' shapes.

The pyramid is checked against ``scipy.ndimage.gaussian_filter`` (an
independent implementation of the same padded Gaussian blur); the backbone is
checked for its shapes, strides and the 6-D -> SO(3) output only (what it
learns is the training tests' business).
"""

from __future__ import annotations

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
