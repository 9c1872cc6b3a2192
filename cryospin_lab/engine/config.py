"""Configuration of a reconstruction run: one frozen dataclass, a comment on every field."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from cryospin_lab.model.encoder import EncoderConfig

__all__ = ["MAX_HEADS", "TrainingConfig", "parse_switch_rule", "resolve_device"]

# Pose heads: the paper uses 7 (synthetic) and 15 (real data). Every head renders every image, so a
# step costs H renders; 64 is the workbench's limit too (widgets/controls.py).
MAX_HEADS = 64


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that defines a run (saved in every checkpoint).

    Learning rates: the reference configuration (paper Sec. 5) is encoder 1e-4,
    decoder 5e-3 then 2e-3 after the switch, poses Adam 0.05 with betas
    (0.9, 0.9), batch 32. We keep these except the encoder's: on the default
    HSP90 set (10,000 images, a fifth of the paper's, so a fifth of the steps
    per epoch) the amortized poses stay random until a symmetry-breaking
    "collapse" of the pose error; with 1e-4 it had not happened after 27
    epochs, with 1e-3 it came at epochs 5-13 (one GPU sweep,
    ``bench/experiments/gpu_sweep.sh``; numbers in the issue note).

    The disc starts at 0.42 of the maximum radius and grows over 12 epochs
    (low frequencies first). It used to start at a quarter: on the 70S
    ribosome set (10,000 images, D=64, 5 Å/px) that start left the amortized
    stage at 60-62 Å for 14 epochs (seed 0) and at 63-84 Å for all 12 epochs
    tried (seed 1); starting at 0.42 it passed 30 Å by epoch 11 and 9 (seeds
    0, 1). On HSP90 (10,000 images) 0.42 reached 12 Å at epoch 4 and 6 against
    epoch 16 and 6 with a quarter. 0.33 and 0.5 were tried on one seed each;
    the per-epoch table and the commands are in
    ``bench/results/cpu_radius_start_sweep_2026-11-26.md``. It does not
    always work: ``bench/peer_cryodrgn.py --molecule ribosome --seed 1``
    stayed at 60-83 Å for all 25 amortized epochs (``bench/results/README.md``).
    """

    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # architecture (heads, preset, shifts)
    n_epochs: int = 30  # total epochs, amortized + direct (the default set switches after epoch 25)
    switch: str = "auto"  # "auto", "never" (fully amortized) or an epoch number like "7"
    batch_size: int = 32  # images per step (both stages)
    encoder_lr: float = (
        1e-3  # Adam, amortized stage (paper 1e-4; 1e-3 breaks the pose symmetry sooner, see below)
    )
    decoder_lr: float = 5e-3  # Adam on mantissa/exponent, amortized stage
    decoder_lr_direct: float = 2e-3  # decoder learning rate after the switch
    pose_lr: float = 0.05  # row-wise Adam on the axis-angle corrections (radians)
    pose_betas: tuple[float, float] = (0.9, 0.9)  # the reference code's betas for the pose optimiser
    shift_lr_angstrom: float = 0.5  # row-wise Adam on shifts (Å) when shifts are estimated
    n_pose_steps: int = 5  # pose steps per volume step in the direct stage (coordinate descent)
    loss: str = "l2"  # "l2" (Gaussian NLL, Eq. 3) or "l1" (the reference code's |F_pred - F_obs|)
    contrast: float = -1.0  # -1: RELION stacks (protein bright); +1: the other sign
    radius_start_fraction: float = 0.42  # disc radius at epoch 0 as a fraction of the maximum (see above)
    radius_ramp_epochs: int = 12  # epochs over which the disc grows linearly to the full radius
    auto_min_epochs: int = 3  # auto switch: never before this many amortized epochs
    auto_gap_rise: float = 1.12  # auto switch: head loss gap at least this times its lowest value so far
    auto_stable_deg: float = 10.0  # auto switch: and median change of best poses per epoch below this
    # auto switch: or mean epoch loss improved by less than this (relative); 0: off (it fired too early
    # on the CPU trajectory of the default set, see _switch_rule.switch_due)
    auto_loss_plateau: float = 0.0
    # auto switch: at the latest after this many epochs (0: never forced); 25, not 20: a late switch
    # is what the ribosome set needs (see _switch_rule.switch_due)
    auto_max_epochs: int = 25
    # stall warning (a LogEvent, once): the mean amortized loss improved by less than stall_tolerance
    # (relative) over stall_epochs epochs on the full disc; 0: off (see _switch_rule.stall_message)
    stall_epochs: int = 5
    stall_tolerance: float = 0.0005
    volume_init_mantissa: float = 0.1  # std of the initial mantissa (exponent starts at the data's envelope)
    n_tracked: int = 6  # images whose H candidates are reported every epoch
    volume_interval_s: float = 5.0  # at most one volume snapshot event per this many seconds
    seed: int = 0  # initialisation and data order
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    threads: int = (
        0  # CPU threads for torch (0: torch's default); 1 can be faster when other work shares the cores
    )
    checkpoint_every: int = 1  # epochs between checkpoints (0: none)
    # NaN guard: a batch whose loss or gradients are not finite is skipped (no update, a LogEvent) up to
    # this many times in a row; 0: the run stops at the first. Either way no update is applied from it.
    nan_guard: int = 0
    # Two independent half-set reconstructions (branches "half1", "half2", each with its own
    # initialisation) and their half-map FSC at 0.143 after every epoch; no fork in this mode.
    gold_standard: bool = False

    def __post_init__(self) -> None:
        parse_switch_rule(self.switch)
        self._check_numbers()
        if self.loss not in ("l2", "l1"):
            raise ValueError(f"TrainingConfig.loss must be 'l2' or 'l1', got {self.loss!r}")
        if self.n_epochs < 1 or self.batch_size < 1 or self.n_pose_steps < 1:
            raise ValueError(
                f"TrainingConfig needs n_epochs, batch_size and n_pose_steps >= 1, got "
                f"{self.n_epochs}, {self.batch_size}, {self.n_pose_steps}"
            )
        if self.contrast not in (-1.0, 1.0):
            raise ValueError(f"TrainingConfig.contrast must be -1 or +1, got {self.contrast}")
        if self.encoder.estimate_shifts and not self.encoder.max_shift_angstrom > 0:
            raise ValueError(
                "TrainingConfig.encoder.estimate_shifts needs encoder.max_shift_angstrom > 0 "
                f"(the range of the shift heads), got {self.encoder.max_shift_angstrom}"
            )
        if self.nan_guard < 0:
            raise ValueError(f"TrainingConfig.nan_guard must be >= 0, got {self.nan_guard}")
        if not 0 < self.radius_start_fraction <= 1:
            raise ValueError(
                f"TrainingConfig.radius_start_fraction must be in (0, 1], got {self.radius_start_fraction}"
            )

    def _check_numbers(self) -> None:
        """ValueError naming the field and the value of a number outside its meaningful range."""

        def check(name: str, value, ok: bool, what: str) -> None:
            if isinstance(value, bool) or not ok:
                raise ValueError(f"TrainingConfig.{name} must be {what}, got {value!r}")

        for name in ("encoder_lr", "decoder_lr", "decoder_lr_direct", "pose_lr", "shift_lr_angstrom"):
            value = getattr(self, name)
            check(name, value, isinstance(value, numbers.Real) and 0 < value < math.inf, "a positive number")
        betas = self.pose_betas
        check(
            "pose_betas",
            betas,
            len(betas) == 2 and all(isinstance(b, numbers.Real) and 0 <= b < 1 for b in betas),
            "two numbers in [0, 1)",
        )
        n_heads = self.encoder.n_heads
        check(
            "encoder.n_heads",
            n_heads,
            isinstance(n_heads, numbers.Integral) and 1 <= n_heads <= MAX_HEADS,
            f"an integer from 1 to {MAX_HEADS}",
        )
        for name in (
            "radius_ramp_epochs",
            "auto_min_epochs",
            "auto_max_epochs",
            "stall_epochs",
            "n_tracked",
            "seed",
            "threads",
            "checkpoint_every",
        ):
            value = getattr(self, name)
            check(name, value, isinstance(value, numbers.Integral) and value >= 0, "an integer >= 0")
        for name in ("auto_gap_rise", "auto_stable_deg", "volume_init_mantissa"):
            value = getattr(self, name)
            check(name, value, isinstance(value, numbers.Real) and 0 < value < math.inf, "a positive number")
        for name in ("auto_loss_plateau", "stall_tolerance", "volume_interval_s"):
            value = getattr(self, name)
            check(name, value, isinstance(value, numbers.Real) and 0 <= value <= math.inf, "a number >= 0")


def parse_switch_rule(rule: str | int) -> str | int:
    """``"auto"``, ``"never"`` or a non-negative epoch number (int)."""
    if isinstance(rule, int) or (isinstance(rule, str) and rule.strip().isdigit()):
        epoch = int(rule)
        if epoch < 0:
            raise ValueError(f"switch epoch must be >= 0, got {epoch}")
        return epoch
    if rule in ("auto", "never"):
        return rule
    raise ValueError(f"switch must be 'auto', 'never' or an epoch number, got {rule!r}")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch.cuda.is_available() is False")
    return torch.device(name)
