"""Events that a reconstruction emits while it runs: frozen dataclasses carrying numpy copies.

The training loop is a generator of these events (``engine/trainer.py``); the runner
(``app/runner.py``) publishes them on an :class:`~cryospin_lab.app.bus.EventBus`, from
which the notebook UI, the CLI and tests read. Rules:

* Every event is stamped with ``step`` (global optimisation step), ``epoch``,
  ``phase``, ``branch`` (``"main"`` until a fork names others) and ``time_s``
  (seconds since the run started). All fields are keyword-only.
* Arrays are copied into read-only numpy arrays when the event is made (a torch
  tensor is detached and moved to the CPU first), so an event never aliases
  training state and can be read from any thread. Events never hold tensors.
* ``heavy`` events (volumes, pose candidates, head maps) are large and only the
  latest per ``(type, branch)`` is kept by the bus; the others are "small" and are
  queued in order.
* Shapes are checked lightly in ``__post_init__``; a bad event raises ValueError
  naming the event, the field and the shape.

Events holding arrays compare by identity (``eq=False``): element-wise array
comparison has no single truth value.

Plain dataclasses and numpy: no torch at import time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import numpy as np

__all__ = [
    "Phase",
    "Event",
    "StepEvent",
    "EpochEvent",
    "PoseErrorEvent",
    "ResolutionEvent",
    "PhaseChangeEvent",
    "ForkEvent",
    "CheckpointEvent",
    "LogEvent",
    "LogLevel",
    "FailureEvent",
    "FinishedEvent",
    "VolumeEvent",
    "PoseCandidatesEvent",
    "HeadAssignmentEvent",
    "SMALL_EVENT_TYPES",
    "HEAVY_EVENT_TYPES",
]


class Phase(enum.Enum):
    """Stage of a cryoSPIN run: encoder (amortized), per-image pose table (direct), done."""

    AMORTIZED = "amortized"
    DIRECT = "direct"
    FINISHED = "finished"


def _array(owner: Event, name: str, value: Any, *, ndim: int | None = None, dtype=None) -> np.ndarray:
    """A read-only numpy copy of ``value`` (numpy, list or torch tensor), optionally checked and cast."""
    if hasattr(value, "detach"):  # a torch tensor: no torch import needed here
        value = value.detach().cpu().numpy()
    out = np.array(value, dtype=dtype, copy=True)
    if ndim is not None and out.ndim != ndim:
        raise ValueError(f"{type(owner).__name__}.{name} must have {ndim} dimensions, got shape {out.shape}")
    out.setflags(write=False)
    object.__setattr__(owner, name, out)
    return out


_J = np.diag([1.0, 1.0, -1.0])  # the mirror z -> -z (handedness flip), as in metrics.PoseError


def _set(owner: Event, name: str, value: Any) -> None:
    object.__setattr__(owner, name, value)


def _check_choice(owner: Event, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{type(owner).__name__}.{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of all events: where in the run it happened."""

    step: int  # global optimisation step (counts every optimizer update of the branch's model)
    epoch: int  # epoch index, 0-based
    phase: Phase  # phase of ``branch`` when the event was made
    branch: str = "main"  # "main" until a fork names its children
    time_s: float  # seconds since the run started

    heavy: ClassVar[bool] = False  # True: the bus keeps only the latest per (type, branch)

    def __post_init__(self) -> None:
        _set(self, "step", int(self.step))
        _set(self, "epoch", int(self.epoch))
        _set(self, "time_s", float(self.time_s))
        if not isinstance(self.phase, Phase):
            try:
                _set(self, "phase", Phase(self.phase))
            except ValueError:
                raise ValueError(f"{type(self).__name__}.phase must be a Phase, got {self.phase!r}") from None
        if not isinstance(self.branch, str) or not self.branch:
            raise ValueError(f"{type(self).__name__}.branch must be a non-empty string, got {self.branch!r}")


# ----------------------------------------------------------------------------- small events


@dataclass(frozen=True, kw_only=True)
class StepEvent(Event):
    """One optimisation step (or a few, when the trainer throttles): loss and throughput."""

    loss: float  # mean winner-takes-all loss of the batch
    images_per_s: float
    n_images: int  # images in this step's batch
    learning_rates: tuple[float, ...] = ()  # one per optimizer parameter group, in the trainer's order

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "loss", float(self.loss))
        _set(self, "images_per_s", float(self.images_per_s))
        _set(self, "n_images", int(self.n_images))
        _set(self, "learning_rates", tuple(float(x) for x in self.learning_rates))


@dataclass(frozen=True, kw_only=True, eq=False)
class EpochEvent(Event):
    """End of an epoch: mean loss and how often each head won (Eq. 5)."""

    mean_loss: float
    head_win_counts: np.ndarray  # (H,) int64, images won by each head during the epoch
    n_images_seen: int
    epoch_time_s: float
    # Mean over images of (mean head loss - best head loss), in loss units: near 0 while the
    # volume is too featureless for the pose to matter, large once poses are informative.
    head_loss_gap: float = float("nan")
    # Median geodesic change of each image's best pose since the previous epoch (degrees).
    median_pose_change_deg: float = float("nan")
    # Amortized: the share of the loss the map removes beyond its spherical average (engine/stuck.py).
    structure_gain: float = float("nan")

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "head_loss_gap", float(self.head_loss_gap))
        _set(self, "structure_gain", float(self.structure_gain))
        _set(self, "median_pose_change_deg", float(self.median_pose_change_deg))
        _set(self, "mean_loss", float(self.mean_loss))
        _array(self, "head_win_counts", self.head_win_counts, ndim=1, dtype=np.int64)
        _set(self, "n_images_seen", int(self.n_images_seen))
        _set(self, "epoch_time_s", float(self.epoch_time_s))


@dataclass(frozen=True, kw_only=True, eq=False)
class PoseErrorEvent(Event):
    """Pose error against the ground truth (after global alignment, and handedness flip if ``flipped``).

    ``global_rotation`` ``G`` (3, 3), when given, is that alignment (``metrics.PoseError``):
    ``R_true ~ F(R_est) @ G^T`` with ``F(R) = J R J`` if ``flipped`` (``J = diag(1, 1, -1)``),
    so a true pose seen in the learned map's frame is ``F(R_true @ G)``.
    """

    mean_deg: float
    median_deg: float
    flipped: bool  # the best alignment uses the mirror (hand-flipped) map
    shift_error_angstrom: float | None = None  # None when shifts are not estimated or not known
    global_rotation: np.ndarray | None = None  # (3, 3) float64
    # The true map's (near-)symmetry, e.g. "its near 2-fold" ("" for none), and the errors modulo it:
    # a pose and its mate across it explain an image almost alike.
    symmetry: str = ""
    mean_mod_sym_deg: float | None = None
    median_mod_sym_deg: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "mean_deg", float(self.mean_deg))
        _set(self, "median_deg", float(self.median_deg))
        _set(self, "symmetry", str(self.symmetry))
        for name in ("mean_mod_sym_deg", "median_mod_sym_deg"):
            if getattr(self, name) is not None:
                _set(self, name, float(getattr(self, name)))
        _set(self, "flipped", bool(self.flipped))
        if self.shift_error_angstrom is not None:
            _set(self, "shift_error_angstrom", float(self.shift_error_angstrom))
        if self.global_rotation is not None:
            rotation = _array(self, "global_rotation", self.global_rotation, ndim=2, dtype=np.float64)
            if rotation.shape != (3, 3):
                raise ValueError(f"PoseErrorEvent.global_rotation must be (3, 3), got {rotation.shape}")

    def true_pose_in_map_frame(self, true_rotation) -> np.ndarray:
        """``F(R_true @ G)``: where a true pose (3, 3) sits in the learned map's frame."""
        if self.global_rotation is None:
            raise ValueError("this PoseErrorEvent carries no global_rotation")
        rotation = np.asarray(true_rotation, dtype=np.float64) @ self.global_rotation
        return _J @ rotation @ _J if self.flipped else rotation


@dataclass(frozen=True, kw_only=True, eq=False)
class ResolutionEvent(Event):
    """A Fourier shell correlation curve and the resolution where it crosses ``threshold``."""

    kind: str  # "ground_truth" (vs the true map, threshold 0.5) or "half_maps" (gold standard, 0.143)
    frequencies_per_angstrom: np.ndarray  # (S,) shell frequencies
    fsc: np.ndarray  # (S,)
    resolution_angstrom: float
    threshold: float

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice(self, "kind", self.kind, ("ground_truth", "half_maps"))
        freqs = _array(
            self, "frequencies_per_angstrom", self.frequencies_per_angstrom, ndim=1, dtype=np.float64
        )
        fsc = _array(self, "fsc", self.fsc, ndim=1, dtype=np.float64)
        if freqs.shape != fsc.shape:
            raise ValueError(
                f"ResolutionEvent.fsc has shape {fsc.shape}, frequencies_per_angstrom has {freqs.shape}"
            )
        _set(self, "resolution_angstrom", float(self.resolution_angstrom))
        _set(self, "threshold", float(self.threshold))

    @classmethod
    def from_curve(cls, curve: Any, *, kind: str, threshold: float, **stamp: Any) -> ResolutionEvent:
        """From a ``metrics.FSCCurve`` (frequencies, fsc, ``resolution_angstrom(threshold)``)."""
        return cls(
            kind=kind,
            frequencies_per_angstrom=np.asarray(curve.frequencies_per_angstrom),
            fsc=np.asarray(curve.fsc),
            resolution_angstrom=curve.resolution_angstrom(threshold),
            threshold=threshold,
            **stamp,
        )


@dataclass(frozen=True, kw_only=True)
class PhaseChangeEvent(Event):
    """The one phase transition of a branch (amortized -> direct) or its end (-> finished)."""

    previous: Phase
    new: Phase
    # "manual" (switch_now), "epoch" (fixed epoch), "auto" (criterion), "finished"; "restart": a stuck
    # amortized start began again (amortized -> amortized, engine/stuck.py)
    reason: str
    detail: str = ""  # e.g. the criterion's value

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "previous", Phase(self.previous))
        _set(self, "new", Phase(self.new))
        _check_choice(self, "reason", self.reason, ("manual", "epoch", "auto", "finished", "restart"))


@dataclass(frozen=True, kw_only=True)
class ForkEvent(Event):
    """Branch ``parent`` was split into ``children`` (e.g. one continues amortized, one switches)."""

    parent: str
    children: tuple[str, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "children", tuple(str(c) for c in self.children))
        if not self.children:
            raise ValueError("ForkEvent.children must name at least one branch")


@dataclass(frozen=True, kw_only=True)
class CheckpointEvent(Event):
    """A checkpoint was written to ``path``."""

    path: str

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "path", str(self.path))


LogLevel = Literal["info", "warning"]


@dataclass(frozen=True, kw_only=True)
class LogEvent(Event):
    """A human-readable message (paused, resumed, a rejected command, a warning).

    ``level`` is ``"info"`` or ``"warning"``: something the user should act on
    (the workbench keeps warnings in view until the run ends; the CLI prefixes them).
    """

    message: str
    level: LogLevel = "info"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.level not in get_args(LogLevel):
            raise ValueError(f"LogEvent.level must be one of {get_args(LogLevel)}, got {self.level!r}")


@dataclass(frozen=True, kw_only=True)
class FailureEvent(Event):
    """The run raised; it is stopped. ``traceback`` is the formatted text."""

    exception_type: str
    message: str
    traceback: str
    checkpoint_path: str | None = None  # where the last state was saved, None if not saved


@dataclass(frozen=True, kw_only=True)
class FinishedEvent(Event):
    """The run is over; the last event of a run. ``summary`` is a copy (e.g. final loss, resolution)."""

    reason: str  # "completed", "stopped" (stop command) or "failed" (after a FailureEvent)
    summary: dict[str, float]

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice(self, "reason", self.reason, ("completed", "stopped", "failed"))
        _set(self, "summary", {str(k): float(v) for k, v in dict(self.summary).items()})


# ----------------------------------------------------------------------------- heavy events


@dataclass(frozen=True, kw_only=True, eq=False)
class VolumeEvent(Event):
    """A snapshot of the current map, real space, ``[z, y, x]``, centre at ``D // 2``."""

    heavy: ClassVar[bool] = True

    volume: np.ndarray  # (D, D, D) float32
    voxel_size_angstrom: float

    def __post_init__(self) -> None:
        super().__post_init__()
        vol = _array(self, "volume", self.volume, ndim=3, dtype=np.float32)
        if len(set(vol.shape)) != 1:
            raise ValueError(f"VolumeEvent.volume must be a cube (D, D, D), got shape {vol.shape}")
        _set(self, "voxel_size_angstrom", float(self.voxel_size_angstrom))


@dataclass(frozen=True, kw_only=True, eq=False)
class PoseCandidatesEvent(Event):
    """Every head's rotation and loss for a few tracked images (rows = images, in ``indices`` order)."""

    heavy: ClassVar[bool] = True

    indices: np.ndarray  # (n,) int64 particle indices
    rotations: np.ndarray  # (n, H, 3, 3) float32, the heads' candidate rotations
    losses: np.ndarray  # (n, H) float32
    true_rotations: np.ndarray | None = None  # (n, 3, 3) when the ground truth is known

    def __post_init__(self) -> None:
        super().__post_init__()
        idx = _array(self, "indices", self.indices, ndim=1, dtype=np.int64)
        rot = _array(self, "rotations", self.rotations, ndim=4, dtype=np.float32)
        loss = _array(self, "losses", self.losses, ndim=2, dtype=np.float32)
        n = len(idx)
        if rot.shape[0] != n or rot.shape[2:] != (3, 3):
            raise ValueError(f"PoseCandidatesEvent.rotations must have shape ({n}, H, 3, 3), got {rot.shape}")
        if loss.shape != rot.shape[:2]:
            raise ValueError(f"PoseCandidatesEvent.losses must have shape {rot.shape[:2]}, got {loss.shape}")
        if self.true_rotations is not None:
            true = _array(self, "true_rotations", self.true_rotations, ndim=3, dtype=np.float32)
            if true.shape != (n, 3, 3):
                raise ValueError(
                    f"PoseCandidatesEvent.true_rotations must have shape ({n}, 3, 3), got {true.shape}"
                )


@dataclass(frozen=True, kw_only=True, eq=False)
class HeadAssignmentEvent(Event):
    """Which head wins each image, for head-specialisation maps over the viewing sphere."""

    heavy: ClassVar[bool] = True

    true_view_directions: np.ndarray | None = None  # (N, 3) float32 unit viewing directions, None if unknown
    winning_heads: np.ndarray  # (N,) int64
    errors_deg: np.ndarray | None = None  # (N,) float32 pose error of the winning head, None if unknown

    def __post_init__(self) -> None:
        super().__post_init__()
        heads = _array(self, "winning_heads", self.winning_heads, ndim=1, dtype=np.int64)
        n = len(heads)
        if self.true_view_directions is not None:
            dirs = _array(self, "true_view_directions", self.true_view_directions, ndim=2, dtype=np.float32)
            if dirs.shape != (n, 3):
                raise ValueError(
                    f"HeadAssignmentEvent.true_view_directions must have shape ({n}, 3), got {dirs.shape}"
                )
        if self.errors_deg is not None:
            errors = _array(self, "errors_deg", self.errors_deg, ndim=1, dtype=np.float32)
            if errors.shape != (n,):
                raise ValueError(f"HeadAssignmentEvent.errors_deg must have shape ({n},), got {errors.shape}")


SMALL_EVENT_TYPES: tuple[type[Event], ...] = (
    StepEvent,
    EpochEvent,
    PoseErrorEvent,
    ResolutionEvent,
    PhaseChangeEvent,
    ForkEvent,
    CheckpointEvent,
    LogEvent,
    FailureEvent,
    FinishedEvent,
)
HEAVY_EVENT_TYPES: tuple[type[Event], ...] = (VolumeEvent, PoseCandidatesEvent, HeadAssignmentEvent)
