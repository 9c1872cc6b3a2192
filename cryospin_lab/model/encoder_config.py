"""The multi-head encoder's architecture: a frozen dataclass that imports no torch.

The command line reads the run's settings (``engine.config``) to build its
options without loading torch, so these live apart from the network
(:mod:`cryospin_lab.model.encoder`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EncoderConfig"]


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of the multi-head encoder."""

    box_size: int = 64  # input image size D (pixels)
    n_heads: int = 7  # H pose heads (paper: 7 synthetic, 15 real)
    preset: str = "light"  # "light" (CPU) or "paper" (VGG16-like)
    n_scales: int = 5  # Gaussian pyramid channels fed to the CNN
    estimate_shifts: bool = False  # each head also returns a 2-D shift
    max_shift_angstrom: float = 0.0  # tanh-bounded shift range when estimating shifts
    widths: tuple[int, ...] = field(default=())  # override the preset's conv widths
    stem_stride: int = 0  # stride of the first conv; 0 = the preset's (light: 2 from D=64 on, paper: 1)
    # "bf16": the CNN runs under torch.autocast in bfloat16 (mixed precision; its outputs, the
    # rotations, the volume and the losses stay float32); "off" (default): float32 throughout
    # (docs/decisions.md#encoder-autocast-off).
    autocast: str = "off"
    # What the rotation heads read: "grid" (default), the last feature map position by position (up
    # to 4x4); or "pooled", its average over positions, which an off-centre particle does not change,
    # with the shifts read from the positions by heads of their own. The run settings choose "pooled"
    # when shifts are estimated: off-centre particles kept "grid" on the low-resolution plateau, and
    # centred ones start more surely with "grid" (docs/decisions.md#pooled-rotations).
    rotation_features: str = "grid"

    def __post_init__(self) -> None:
        if self.autocast not in ("off", "bf16"):
            raise ValueError(f"EncoderConfig.autocast must be 'off' or 'bf16', got {self.autocast!r}")
        if self.rotation_features not in ("grid", "pooled"):
            raise ValueError(
                f"EncoderConfig.rotation_features must be 'grid' or 'pooled', got {self.rotation_features!r}"
            )

    def first_stride(self) -> int:
        """Stride of the first 3x3 conv: ``stem_stride`` if set, else 2 for ``light`` at D >= 64, else 1."""
        if self.stem_stride < 0:
            raise ValueError(f"EncoderConfig.stem_stride must be >= 0, got {self.stem_stride}")
        if self.stem_stride:
            return self.stem_stride
        return 2 if self.preset == "light" and self.box_size >= 64 else 1

    def conv_widths(self) -> tuple[int, ...]:
        if self.widths:
            return self.widths
        if self.preset == "paper":
            return (64, 128, 256, 256, 256, 256)
        if self.preset == "light":
            return (16, 32, 64, 64)
        raise ValueError(f"EncoderConfig.preset must be 'light' or 'paper', got {self.preset!r}")

    def head_widths(self) -> tuple[int, ...]:
        return (512, 256) if self.preset == "paper" else (128,)
