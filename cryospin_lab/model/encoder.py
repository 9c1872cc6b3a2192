"""Multi-head pose encoder (docs/method.md §4, paper Sec. 4.1).

A fixed Gaussian pyramid turns each image into ``n_scales`` channels (the
reference code's input), a shared VGG-style backbone (3x3 conv + BatchNorm +
ReLU blocks with pooling) maps them to one feature vector, and ``n_heads``
small MLPs each turn it into a 6-D rotation (and optionally a 2-D shift). With
``rotation_features="pooled"`` the rotation heads read the features averaged over
positions and separate heads read the shifts from the positions.

Two presets (``EncoderConfig.preset``):

* ``"paper"``: VGG16-like widths (64, 128, 256, 256, 256, 256), for GPUs at D=128.
* ``"light"``: narrow widths (16, 32, 64, 64), a stride-2 first conv from D=64
  on, a 2-layer head, for a 2-core CPU at D=64.

The light preset's first conv has stride 2 from D=64 on, because the
encoder only has to put poses in the right basin (the direct stage refines
them) and a half-resolution backbone makes a CPU step several times cheaper
(docs/decisions.md#encoder-stride2); ``EncoderConfig(stem_stride=1)``
restores the stride-1 backbone. The settings are in
:mod:`cryospin_lab.model.encoder_config` (no torch needed to read them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cryospin_lab.model.encoder_config import EncoderConfig
from cryospin_lab.physics.so3 import rotations_from_6d

__all__ = ["EncoderConfig", "GaussianPyramid", "MultiHeadEncoder", "PoseCandidates"]


@dataclass(frozen=True)
class PoseCandidates:
    """Encoder output for a batch: ``rotations`` (B, H, 3, 3), ``shifts_angstrom`` (B, H, 2) or None."""

    rotations: Tensor
    shifts_angstrom: Tensor | None


class GaussianPyramid(nn.Module):
    """Fixed (non-trainable) Gaussian blurs at ``n_scales`` widths, each channel normalised per image.

    Channel ``s`` is the image blurred with sigma ``2**s - 1`` pixels (channel 0 is
    the raw image), so coarse channels carry the low-resolution shape that
    survives SNR 0.1 while fine channels keep detail; the same idea as the
    reference code's 11x11 pyramid. Every blur is separable, with the same
    kernel radius ``r = ceil(3 * max sigma)``, kernels normalised to sum 1, and
    mirror-padded edges (``reflect``; ``replicate`` along an axis not longer
    than ``r``).

    Computed as matrix products ``G_y @ image @ G_x^T``: each ``G`` is the
    ``(n, n)`` matrix of one padded 1-D blur (made once per image size by
    blurring the identity), so the result equals padding and two 1-D
    convolutions, and batched matmuls do the work, several times cheaper on a
    CPU than the long depthwise convolutions (docs/decisions.md#cpu-matmul-kernels).
    ``tests/model/test_encoder.py`` checks it against ``scipy.ndimage.gaussian_filter``.
    """

    def __init__(self, n_scales: int = 5):
        super().__init__()
        self.n_scales = n_scales
        self.sigmas = [float(2**s - 1) for s in range(n_scales)]
        kernels = []
        radius = max(1, int(math.ceil(3 * self.sigmas[-1])))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        for sigma in self.sigmas:
            if sigma == 0:
                k = (x == 0).float()
            else:
                k = torch.exp(-(x**2) / (2 * sigma**2))
            kernels.append(k / k.sum())
        self.register_buffer("kernels", torch.stack(kernels)[:, None, :], persistent=False)  # (S, 1, 2r + 1)
        self.radius = radius
        self._matrices: dict[tuple, Tensor] = {}

    def blur_matrices(self, size: int) -> Tensor:
        """``(n_scales - 1, size, size)``: row ``i`` of ``G_s`` holds the weights of output pixel ``i``."""
        key = (size, self.kernels.device, self.kernels.dtype)
        if key not in self._matrices:
            r = self.radius
            eye = torch.eye(size, dtype=torch.float64, device=self.kernels.device)[:, None, :]
            padded = nn.functional.pad(eye, (r, r), mode="reflect" if size > r else "replicate")
            responses = nn.functional.conv1d(padded, self.kernels[1:].double())  # (size j, S - 1, size i)
            # Weights below 1e-12 of the sum (1) change no float32 result, and in float32 the Gaussian's
            # tails are denormal numbers, which make a CPU's matrix product several times slower.
            responses = torch.where(responses < 1e-12, 0.0, responses)
            self._matrices[key] = responses.permute(1, 2, 0).to(self.kernels.dtype).contiguous()
        return self._matrices[key]

    def forward(self, images: Tensor) -> Tensor:
        x = images[:, None]
        if self.n_scales > 1:
            g_y = self.blur_matrices(images.shape[-2])
            g_x = self.blur_matrices(images.shape[-1])
            blurred = g_y @ x @ g_x.transpose(-1, -2)  # (B, S - 1, h, w)
            x = torch.cat([x, blurred], dim=1)
        std, mean = torch.std_mean(x, dim=(-1, -2), keepdim=True)
        return (x - mean) / std.clamp(min=1e-6)


def _conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class MultiHeadEncoder(nn.Module):
    """Images (B, D, D) -> :class:`PoseCandidates` with H rotations per image."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.pyramid = GaussianPyramid(config.n_scales)
        layers: list[nn.Module] = []
        c_in, size = config.n_scales, config.box_size
        stride = config.first_stride()
        for i, width in enumerate(config.conv_widths()):
            layers.append(_conv_block(c_in, width, stride if i == 0 else 1))
            if i == 0:
                size = (size - 1) // stride + 1
            if config.preset == "paper" or i > 0:
                layers.append(_conv_block(width, width))
            layers.append(nn.MaxPool2d(2))
            c_in, size = width, size // 2
            if size < 2:
                raise ValueError(
                    f"box_size {config.box_size} is too small for {len(config.conv_widths())} pooling stages"
                )
        # Average down to 4x4 at most so the feature size doesn't depend on D.
        layers.append(nn.AdaptiveAvgPool2d(min(size, 4)))
        layers.append(nn.Flatten())
        self.backbone = nn.Sequential(*layers)
        self.n_channels = c_in
        n_features = c_in * min(size, 4) ** 2
        self.shift_heads = None
        if config.rotation_features == "pooled":
            self.heads = nn.ModuleList([self._make_head(c_in, 6) for _ in range(config.n_heads)])
            if config.estimate_shifts:
                self.shift_heads = nn.ModuleList(
                    [self._make_head(n_features, 2) for _ in range(config.n_heads)]
                )
        else:
            n_out = 6 + (2 if config.estimate_shifts else 0)
            self.heads = nn.ModuleList([self._make_head(n_features, n_out) for _ in range(config.n_heads)])

    def _make_head(self, n_in: int, n_out: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for width in self.config.head_widths():
            layers += [nn.Linear(n_in, width), nn.BatchNorm1d(width), nn.ReLU()]
            n_in = width
        layers.append(nn.Linear(n_in, n_out))
        return nn.Sequential(*layers)

    def forward(self, images: Tensor) -> PoseCandidates:
        pyramid = self.pyramid(images)
        with torch.autocast(images.device.type, torch.bfloat16, enabled=self.config.autocast == "bf16"):
            features = self.backbone(pyramid)  # (B, C * g * g): the g x g grid of positions
            if self.config.rotation_features == "pooled":
                pooled = features.view(len(features), self.n_channels, -1).mean(dim=-1)
                outputs = torch.stack([head(pooled) for head in self.heads], dim=1)  # (B, H, 6)
                if self.shift_heads is not None:
                    shifts = torch.stack([head(features) for head in self.shift_heads], dim=1)
                    outputs = torch.cat([outputs, shifts], dim=-1)  # (B, H, 8)
            else:
                outputs = torch.stack([head(features) for head in self.heads], dim=1)  # (B, H, 6 or 8)
        outputs = outputs.float()
        rotations = rotations_from_6d(outputs[..., :6])
        shifts = None
        if self.config.estimate_shifts:
            shifts = self.config.max_shift_angstrom * torch.tanh(outputs[..., 6:])
        return PoseCandidates(rotations=rotations, shifts_angstrom=shifts)
