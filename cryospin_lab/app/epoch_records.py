"""One record per branch and finished epoch, gathered from a run's events (a CLI line, a metrics.csv row)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cryospin_lab.engine.events import (
    EpochEvent,
    Event,
    FinishedEvent,
    ForkEvent,
    Phase,
    PhaseChangeEvent,
    PoseErrorEvent,
    ResolutionEvent,
    StepEvent,
    VolumeEvent,
)

__all__ = ["METRICS_COLUMNS", "EpochCollector", "EpochRecord", "FinishedEpoch"]

# metrics.csv columns; the head_<i>_share_pct columns follow mean_loss.
METRICS_COLUMNS = (
    "epoch",
    "phase",
    "branch",
    "mean_loss",
    "structure_gain_pct",
    "pose_error_mean_deg",
    "pose_error_median_deg",
    "pose_error_mean_mod_sym_deg",
    "pose_error_median_mod_sym_deg",
    "resolution_angstrom",
    "half_map_resolution_angstrom",
    "epoch_time_s",
    "wall_time_s",
)


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch of one branch: the one-line summary and the metrics.csv row."""

    epoch: int  # epochs completed by the branch (1 after the first)
    branch: str
    phase: Phase  # phase during the epoch
    mean_loss: float
    head_shares: tuple[float, ...]  # fraction of the epoch's images won by each head (empty: direct)
    pose_error_mean_deg: float | None  # vs the STAR's poses, None if it has none
    pose_error_median_deg: float | None
    resolution_angstrom: float | None  # FSC 0.5 vs the ground-truth map, None without one
    epoch_time_s: float
    wall_time_s: float
    half_map_resolution_angstrom: float | None = None  # gold standard: half-map FSC at 0.143
    symmetry: str = ""  # the true map's near-symmetry, e.g. "its near 2-fold"; "" for none
    pose_error_mean_mod_sym_deg: float | None = None  # modulo that symmetry
    pose_error_median_mod_sym_deg: float | None = None
    structure_gain: float | None = None  # amortized: see engine/stuck.py

    def summary_line(self, n_epochs: int) -> str:
        parts = [f"epoch {self.epoch:>{len(str(n_epochs))}}/{n_epochs}"]
        if self.branch != "main":
            parts.append(f"[{self.branch}]")
        parts += [f"{self.phase.value:<9}", f"loss {self.mean_loss:.4g}"]
        if self.head_shares:
            parts.append("heads " + "/".join(f"{100 * s:.0f}" for s in self.head_shares) + " %")
        if self.structure_gain is not None:
            parts.append(f"structure {100 * self.structure_gain:+.1f} %")
        if self.resolution_angstrom is not None:
            parts.append(f"res {self.resolution_angstrom:.1f} Å")
        if self.half_map_resolution_angstrom is not None:
            parts.append(f"half maps {self.half_map_resolution_angstrom:.1f} Å")
        if self.pose_error_mean_deg is not None:
            raw = f"{self.pose_error_mean_deg:.1f}°/{self.pose_error_median_deg:.1f}°"
            if self.pose_error_mean_mod_sym_deg is None:
                parts.append(f"pose err {raw} (mean/med)")
            else:
                modulo = f"{self.pose_error_mean_mod_sym_deg:.1f}°/{self.pose_error_median_mod_sym_deg:.1f}°"
                parts.append(f"pose err {raw} raw, {modulo} modulo {self.symmetry} (mean/med)")
        parts.append(f"{self.epoch_time_s:.1f} s")
        return "  ".join(parts)

    def csv_row(self, n_heads: int) -> dict[str, str]:
        def fmt(value: float | None) -> str:
            return "" if value is None else f"{value:.6g}"

        row = {
            "epoch": str(self.epoch),
            "phase": self.phase.value,
            "branch": self.branch,
            "mean_loss": fmt(self.mean_loss),
            "structure_gain_pct": fmt(None if self.structure_gain is None else 100 * self.structure_gain),
            "pose_error_mean_deg": fmt(self.pose_error_mean_deg),
            "pose_error_median_deg": fmt(self.pose_error_median_deg),
            "pose_error_mean_mod_sym_deg": fmt(self.pose_error_mean_mod_sym_deg),
            "pose_error_median_mod_sym_deg": fmt(self.pose_error_median_mod_sym_deg),
            "resolution_angstrom": fmt(self.resolution_angstrom),
            "half_map_resolution_angstrom": fmt(self.half_map_resolution_angstrom),
            "epoch_time_s": f"{self.epoch_time_s:.3f}",
            "wall_time_s": f"{self.wall_time_s:.3f}",
        }
        for i in range(n_heads):
            row[f"head_{i}_share_pct"] = fmt(100 * self.head_shares[i]) if self.head_shares else ""
        return row


@dataclass(frozen=True)
class FinishedEpoch:
    """An :class:`EpochRecord` with the epoch-end map and FSC curve of its branch."""

    record: EpochRecord
    volume: VolumeEvent | None
    resolution: ResolutionEvent | None  # vs the ground truth
    half_maps: ResolutionEvent | None = None  # gold standard


@dataclass
class _PendingEpoch:
    epoch: EpochEvent
    pose: PoseErrorEvent | None = None
    fsc: ResolutionEvent | None = None
    half_maps: ResolutionEvent | None = None
    volume: VolumeEvent | None = None


class EpochCollector:
    """Gathers the events of an epoch end (epoch, pose error, FSC, map) into :class:`FinishedEpoch`.

    The trainer yields an :class:`EpochEvent` and then, stamped with the same
    branch and epoch, the optional pose-error, resolution and volume events. A
    branch's epoch is complete at its next step, phase change, fork or finish
    event (or :meth:`flush` at the end), so the order of the epoch-end events
    does not matter.
    """

    _ENDS = (StepEvent, PhaseChangeEvent, ForkEvent, FinishedEvent)

    def __init__(self) -> None:
        self._pending: dict[str, _PendingEpoch] = {}  # by branch

    def feed(self, event: Event) -> list[FinishedEpoch]:
        """The epochs that ``event`` completes (usually none)."""
        done = []
        if isinstance(event, FinishedEvent):
            done = self.flush()
        elif isinstance(event, self._ENDS) and not (
            # A branch's finish waits for the run's end: in gold-standard mode the half-map FSC
            # of half 1's last epoch comes after half 1 has finished, when half 2 does.
            isinstance(event, PhaseChangeEvent) and event.new is Phase.FINISHED
        ):
            done = self._close(event.branch)
        if isinstance(event, EpochEvent):
            done += self._close(event.branch)
            self._pending[event.branch] = _PendingEpoch(event)
        pending = self._pending.get(event.branch)
        if pending is not None and event.epoch == pending.epoch.epoch:
            if isinstance(event, PoseErrorEvent):
                pending.pose = event
            elif isinstance(event, ResolutionEvent) and event.kind == "half_maps":
                pending.half_maps = event
            elif isinstance(event, ResolutionEvent):
                pending.fsc = event
            elif isinstance(event, VolumeEvent):
                pending.volume = event
        return done

    def flush(self) -> list[FinishedEpoch]:
        """Every epoch still open (at the end of a run or on Ctrl-C)."""
        return [item for name in list(self._pending) for item in self._close(name)]

    def _close(self, branch: str) -> list[FinishedEpoch]:
        pending = self._pending.pop(branch, None)
        if pending is None:
            return []
        epoch, pose, fsc = pending.epoch, pending.pose, pending.fsc
        wins = np.asarray(epoch.head_win_counts, dtype=np.float64)
        shares = tuple(float(x) for x in wins / wins.sum()) if wins.sum() > 0 else ()
        record = EpochRecord(
            epoch=epoch.epoch,
            branch=branch,
            phase=epoch.phase,
            mean_loss=epoch.mean_loss,
            head_shares=shares,
            structure_gain=None if math.isnan(epoch.structure_gain) else epoch.structure_gain,
            pose_error_mean_deg=None if pose is None else pose.mean_deg,
            pose_error_median_deg=None if pose is None else pose.median_deg,
            symmetry="" if pose is None else pose.symmetry,
            pose_error_mean_mod_sym_deg=None if pose is None else pose.mean_mod_sym_deg,
            pose_error_median_mod_sym_deg=None if pose is None else pose.median_mod_sym_deg,
            resolution_angstrom=None if fsc is None else fsc.resolution_angstrom,
            epoch_time_s=epoch.epoch_time_s,
            wall_time_s=epoch.time_s,
            half_map_resolution_angstrom=None
            if pending.half_maps is None
            else pending.half_maps.resolution_angstrom,
        )
        return [FinishedEpoch(record, pending.volume, fsc, pending.half_maps)]


# ----------------------------------------------------------------------------- files
