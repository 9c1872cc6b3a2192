"""Every setting of a run, once: :class:`TrainingConfig` (saved in every checkpoint) and :data:`SETTINGS`.

Each field is declared with :func:`~cryospin_lab.engine.settings.setting`
(default, one line of help, check); a comment beside it says why the default
is what it is, and the measurements behind the defaults that decide whether a
run converges are in ``docs/decisions.md``. :data:`SETTINGS` adds the four
encoder settings of :class:`~cryospin_lab.model.encoder.EncoderConfig` a user
chooses (heads, preset, shifts); the command line, ``Reconstruction(**settings)``,
the workbench's form and the resume check are built from it
(:func:`apply_settings`, :func:`check_resume`).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryospin_lab.engine.settings import (
    BOOL,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Check,
    Setting,
    int_range,
    one_of,
    setting,
    spec_of,
)
from cryospin_lab.model.encoder_config import EncoderConfig

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_HEADS",
    "SETTINGS",
    "TrainingConfig",
    "apply_settings",
    "check_resume",
    "default_rotation_features",
    "parse_switch_rule",
    "resolve_device",
    "setting_value",
]

# Pose heads: the paper uses 7 (synthetic) and 15 (real data). Every head renders every image, so a
# step costs H renders.
MAX_HEADS = 64
# More threads than cores only slows torch down; tens of thousands exhaust memory
# (docs/decisions.md#cpu-threads).
MAX_THREADS = 4 * (os.cpu_count() or 1)
SWITCH = Check("'auto', 'never' or an epoch number", lambda v: parse_switch_rule(v) is not None)
DEVICE = Check(
    "auto, cpu, cuda or cuda:N",
    lambda v: isinstance(v, str) and (v in ("auto", "cpu", "cuda") or v.removeprefix("cuda:").isdigit()),
    choices=("auto", "cpu", "cuda"),
)
FRACTION = Check("a number in (0, 1]", lambda v: NON_NEGATIVE(v) and 0 < v <= 1, low=0, high=1)
BETAS = Check("two numbers in [0, 1)", lambda v: len(v) == 2 and all(NON_NEGATIVE(b) and b < 1 for b in v))


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that defines a run (saved in every checkpoint).

    Learning rates follow the reference configuration (paper Sec. 5: decoder
    5e-3, 2e-3 after the switch, poses Adam 0.05 with betas (0.9, 0.9), batch
    32) except the encoder's, 1e-3 instead of 1e-4: on a set a fifth of the
    paper's size the amortized poses stay random for longer than a run at 1e-4
    (docs/decisions.md#encoder-lr). The disc of fitted frequencies starts at
    0.42 of its radius and grows over 12 epochs, so that low frequencies settle
    the poses first (docs/decisions.md#radius-start).
    """

    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # architecture (heads, preset, shifts)
    n_epochs: int = setting(
        30, "total epochs, amortized + direct", POSITIVE_INT, flag="--epochs", on_resume="change"
    )
    # "auto": the rule of engine/switch_rule.py, at the latest after auto_max_epochs
    switch: str = setting(
        "auto", "when to switch to direct pose optimisation: auto, never or an epoch", SWITCH
    )
    batch_size: int = setting(32, "images per step (both stages)", POSITIVE_INT)
    # 1e-3, not the paper's 1e-4: breaks the pose symmetry sooner (docs/decisions.md#encoder-lr)
    encoder_lr: float = setting(1e-3, "Adam learning rate of the encoder (amortized stage)", POSITIVE)
    decoder_lr: float = setting(5e-3, "Adam learning rate of the volume, amortized stage", POSITIVE)
    decoder_lr_direct: float = setting(2e-3, "Adam learning rate of the volume after the switch", POSITIVE)
    pose_lr: float = setting(0.05, "row-wise Adam on the axis-angle corrections (radians)", POSITIVE)
    pose_betas: tuple[float, float] = setting((0.9, 0.9), "Adam betas of the pose optimiser", BETAS)
    shift_lr_angstrom: float = setting(0.5, "row-wise Adam on shifts (Å) when they are estimated", POSITIVE)
    n_pose_steps: int = setting(5, "pose steps per volume step in the direct stage", POSITIVE_INT)
    loss: str = setting("l2", "l2 (Gaussian likelihood) or l1 (the reference code's)", one_of("l2", "l1"))
    # RELION stacks have inverted contrast (protein bright), as does the simulator with a CTF
    contrast: float = setting(
        -1.0, "-1: RELION stacks (protein bright); +1: the other sign", one_of(-1.0, 1.0, what="-1 or +1")
    )
    # 0.42, not a quarter: the ribosome set left the plateau (docs/decisions.md#radius-start)
    radius_start_fraction: float = setting(
        0.42, "disc radius at epoch 0, as a fraction of the full", FRACTION
    )
    radius_ramp_epochs: int = setting(
        12, "epochs over which the disc grows to the full radius", NON_NEGATIVE_INT
    )
    # the auto switch (docs/decisions.md#auto-switch-rule)
    auto_min_epochs: int = setting(3, "auto switch: never before this many epochs", NON_NEGATIVE_INT)
    auto_gap_rise: float = setting(1.12, "auto switch: head loss gap this times its lowest", POSITIVE)
    auto_stable_deg: float = setting(10.0, "auto switch: and best poses move less (°/epoch)", POSITIVE)
    # off: it fired too early on the default set (docs/decisions.md#auto-loss-plateau)
    auto_loss_plateau: float = setting(
        0.0, "auto switch: or the loss improved less (relative); 0: off", NON_NEGATIVE
    )
    # 10, not 25: with the direct stage's re-search an early switch ends as well or better on five
    # molecules of six, two seeds each (docs/decisions.md#early-switch)
    auto_max_epochs: int = setting(
        10, "auto switch: at the latest after this epoch; 0: never forced", NON_NEGATIVE_INT
    )
    # calibrated on the stuck ribosome run and 28 that broke out (docs/decisions.md#stall-warning)
    stall_epochs: int = setting(5, "stall warning: over this many full-disc epochs; 0: off", NON_NEGATIVE_INT)
    stall_tolerance: float = setting(
        5e-4, "stall warning: loss improved less than this (relative)", NON_NEGATIVE
    )
    # a stuck start is restarted from a new seed (docs/decisions.md#stuck-start)
    stuck_check_epoch: int = setting(
        4, "restart the amortized stage if stuck after this many epochs; 0: never", NON_NEGATIVE_INT
    )
    stuck_min_gain: float = setting(
        0.04, "stuck: the map explains less than this share more than its spherical average", FRACTION
    )
    # with estimated shifts the gain at the check is 0.4-0.8 % on the stuck ribosome, 1.5 % or more
    # on every other suite start (docs/decisions.md#stuck-start-shifted)
    stuck_min_gain_shifted: float = setting(0.011, "the same threshold when shifts are estimated", FRACTION)
    stuck_restarts: int = setting(2, "at most this many restarts of a stuck start", NON_NEGATIVE_INT)
    # every direct epoch: images left in a wrong basin at the switch find theirs (docs/decisions.md#rescue)
    rescue_every: int = setting(
        1, "direct stage: re-search every pose on a grid after this many epochs; 0: off", NON_NEGATIVE_INT
    )
    rescue_nside: int = setting(4, "HEALPix nside of that grid (6 nside in-plane angles)", int_range(1, 16))
    # a stranded image's shift was fitted to its wrong pose: fewer stranded images on shifted sets
    # (docs/decisions.md#rescue-shift-search)
    rescue_shift_step_px: float = setting(
        2.0,
        "with estimated shifts, the re-search tries each image's shift and the 8 around it this "
        "many pixels away; 0: off",
        NON_NEGATIVE,
    )
    # a re-search that moves almost nothing is followed by few moves (docs/decisions.md#rescue-idle)
    rescue_idle_every: int = setting(
        5,
        "after a re-search moved under 0.5 % of the images, the next after this many epochs; 0: off",
        NON_NEGATIVE_INT,
    )
    # a run cut short while its re-search still moves images finishes instead; idle runs end as
    # before, and sets under 1,000 images never extend (docs/decisions.md#rescue-extend)
    rescue_extra_epochs: int = setting(
        10,
        "direct stage: go on one epoch at a time, at most this many past n_epochs, while the "
        "re-search after the last epoch moves 0.5 % of the images and 50 or more (sets of "
        "1,000 images or more); 0: never",
        NON_NEGATIVE_INT,
    )
    # a start still stuck after its restarts switches with a blob for a map; the direct stage's
    # re-search then finds the structure, slowly (docs/decisions.md#stuck-extra-epochs)
    rescue_extra_epochs_stuck: int = setting(
        40,
        "the same limit after a start judged stuck with no restart left",
        NON_NEGATIVE_INT,
    )
    # under its own map a stranded image's wrong pose fits as well as the true one; under the other
    # half's it does not: fewer stranded images on all six suite molecules (docs/decisions.md#rescue-halfmaps)
    rescue_halfmap_steps: int = setting(
        5,
        "every 5 epochs and after an idle one, the re-search under the map of the other half of "
        "the set (back-projected), own pose and candidate each refined by this many pose steps "
        "(sets of 1,000 images or more); 0: off",
        NON_NEGATIVE_INT,
    )
    # the trained volume lags the poses while they move and fits noise once they settle; a map made
    # from the poses does neither: finer maps, fewer stranded images (docs/decisions.md#rebuild-map)
    rebuild_map: bool = setting(
        True,
        "direct stage: after each epoch the map is rebuilt from every image at its pose "
        "(CTF-weighted back-projection); False: the trained volume throughout",
        BOOL,
    )
    volume_init_mantissa: float = setting(
        0.1, "std of the initial mantissa (exponent: data envelope)", POSITIVE
    )
    n_tracked: int = setting(6, "images whose H candidates are reported every epoch", NON_NEGATIVE_INT)
    volume_interval_s: float = setting(5.0, "at most one map snapshot per this many seconds", NON_NEGATIVE)
    seed: int = setting(0, "random seed: initialisation and data order", NON_NEGATIVE_INT)
    device: str = setting("auto", "torch device; auto: CUDA when available", DEVICE, on_resume="machine")
    # 1 can be faster when other work shares the cores (docs/decisions.md#cpu-threads)
    threads: int = setting(
        0,
        "CPU threads for torch; 0: torch's default",
        NON_NEGATIVE_INT,
        on_resume="machine",
        input_check=int_range(0, MAX_THREADS),
    )
    checkpoint_every: int = setting(1, "epochs between checkpoints; 0: none", NON_NEGATIVE_INT)
    # Either way no update is applied from a non-finite batch.
    nan_guard: int = setting(0, "skip up to this many non-finite batches in a row; 0: stop", NON_NEGATIVE_INT)
    # Two independent half-set reconstructions (branches "half1", "half2"); no fork in this mode.
    gold_standard: bool = setting(False, "two half-set reconstructions; half-map FSC at 0.143", BOOL)

    def __post_init__(self) -> None:
        for item in SETTINGS.values():
            value = setting_value(self, item.path)
            if not item.check(value):
                raise ValueError(f"TrainingConfig.{item.where} must be {item.check.what}, got {value!r}")
        if self.encoder.estimate_shifts and not self.encoder.max_shift_angstrom > 0:
            raise ValueError(
                "TrainingConfig.encoder.estimate_shifts needs encoder.max_shift_angstrom > 0 "
                f"(the range of the shift heads), got {self.encoder.max_shift_angstrom}"
            )


# The encoder's settings a user chooses; its other fields are architecture (EncoderConfig).
_ENCODER = {
    "n_heads": setting(7, "pose heads H", int_range(1, MAX_HEADS), flag="--heads"),
    "preset": setting("light", "encoder size: light (CPU) or paper (VGG16-like)", one_of("light", "paper")),
    "estimate_shifts": setting(False, "heads also predict 2-D shifts", BOOL),
    # 10% of the box covers typical picking errors
    "max_shift_angstrom": setting(
        0.0, "bound of estimated shifts in Å", NON_NEGATIVE, default_help="10% of the box"
    ),
    "rotation_features": setting(
        "grid",
        "what the rotation heads read: grid (each position) or pooled (averaged over positions)",
        one_of("grid", "pooled"),
        default_help="pooled when estimating shifts, else grid",
    ),
}


def _settings() -> list[Setting]:
    hints = typing.get_type_hints(TrainingConfig)
    encoder_hints = typing.get_type_hints(EncoderConfig)
    found = []
    for f in dataclasses.fields(TrainingConfig):
        if (spec := spec_of(f)) is not None:
            found.append(_setting(f.name, (f.name,), hints[f.name], f.default, spec))
    encoder_defaults = EncoderConfig()
    for name, f in _ENCODER.items():
        default = getattr(encoder_defaults, name)
        found.append(_setting(name, ("encoder", name), encoder_hints[name], default, spec_of(f)))
    return found


def _setting(name, path, hint, default, spec) -> Setting:
    kind = typing.get_origin(hint) or hint
    return Setting(
        name=name,
        path=path,
        type=kind,
        default=default,
        help=spec.help,
        check=spec.check,
        flag=spec.flag or ("--no-" if kind is bool and default else "--") + name.replace("_", "-"),
        on_resume=spec.on_resume,
        input_check=spec.input_check,
        default_help=spec.default_help,
    )


def setting_value(config: TrainingConfig, path: tuple[str, ...]) -> Any:
    """The value at a setting's ``path`` (``Setting.path``, e.g. ``("encoder", "n_heads")``) in ``config``."""
    value: Any = config
    for part in path:
        value = getattr(value, part)
    return value


# Every user setting by name, in declaration order (filled once TrainingConfig exists: its
# __post_init__ checks each stored value against it).
SETTINGS: dict[str, Setting] = {}
SETTINGS.update((s.name, s) for s in _settings())


def default_rotation_features(estimate_shifts: bool) -> str:
    """What the rotation heads read when a run's settings do not say: ``"pooled"`` with estimated
    shifts (an off-centre particle does not move the average over positions), else ``"grid"``
    (docs/decisions.md#pooled-rotations)."""
    return "pooled" if estimate_shifts else "grid"


def apply_settings(
    config: TrainingConfig,
    values: dict[str, Any],
    *,
    box_size: int | None = None,
    pixel_size_angstrom: float | None = None,
    prefix: str = "",
) -> TrainingConfig:
    """``config`` with the settings ``values`` (keyed by :data:`SETTINGS` names) applied.

    Each value is checked as a user's input (ValueError naming it, with
    ``prefix``); ``box_size`` sets the encoder's input size. Estimating shifts
    with a bound of 0 (the default) takes 10% of the box
    (``box_size * pixel_size_angstrom``), which covers typical picking errors;
    turning it on here without ``rotation_features`` also makes the rotation
    heads read the features averaged over positions (``"pooled"``), which an
    off-centre particle does not move (a ``config`` passed in keeps its own).
    """
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise ValueError(f"{prefix}unknown setting(s) {unknown}; known: {sorted(SETTINGS)}")
    top: dict[str, Any] = {}
    encoder: dict[str, Any] = {} if box_size is None else {"box_size": int(box_size)}
    for name, value in values.items():
        item = SETTINGS[name]
        (encoder if item.path[0] == "encoder" else top)[item.path[-1]] = item.validate(value, prefix)
    estimate = encoder.get("estimate_shifts", config.encoder.estimate_shifts)
    bound = encoder.get("max_shift_angstrom", config.encoder.max_shift_angstrom)
    if estimate and bound == 0 and box_size is not None and pixel_size_angstrom:
        encoder["max_shift_angstrom"] = 0.1 * box_size * pixel_size_angstrom
    if encoder.get("estimate_shifts") and "rotation_features" not in values:
        encoder["rotation_features"] = default_rotation_features(estimate_shifts=True)
    return dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, **encoder), **top)


def check_resume(
    stored: TrainingConfig, given: dict[str, Any], checkpoint: os.PathLike | str
) -> TrainingConfig:
    """The config a resumed run continues with: the checkpoint's, with the length and machine settings
    ``given``; a setting that a resumed run keeps must equal the checkpoint's value if given again
    (ValueError naming the flag, the values and the checkpoint)."""
    may_change = [s.flag for s in SETTINGS.values() if s.on_resume != "keep"]
    changes = {}
    for name, value in given.items():
        item = SETTINGS[name]
        value = item.validate(value)
        if item.on_resume != "keep":
            changes[name] = value
        elif value != (kept := setting_value(stored, item.path)):
            raise ValueError(
                f"{checkpoint}: {item.flag} {value} differs from the checkpoint's {kept}; "
                f"a resumed run keeps its settings (only {', '.join(may_change)} may change)"
            )
    for item in SETTINGS.values():  # a machine setting not given now takes its default, not the stored one
        if item.on_resume == "machine" and item.name not in changes:
            changes[item.name] = item.default
    return apply_settings(stored, changes)


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
    import torch  # here: reading the settings (the command line's options) needs no torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch.cuda.is_available() is False")
    return torch.device(name)
