"""When a branch leaves the amortized stage: the switch rule, decided after each amortized epoch."""

from __future__ import annotations

from torch import Tensor

from cryospin_lab.engine.branch import Branch
from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.physics import so3

__all__ = ["pose_change", "stall_message", "switch_due"]


def pose_change(branch: Branch) -> float:
    """Median geodesic change (degrees) of the branch's images' best poses since the previous epoch."""
    previous: Tensor = branch.rows(branch.previous_best)
    current: Tensor = branch.rows(branch.best_rotations)
    return float(so3.geodesic_angle_deg(previous, current).median())


def switch_due(branch: Branch, cfg: TrainingConfig, pose_change_deg: float) -> str | None:
    """The switch rule after an amortized epoch: the reason, or None to stay amortized.

    ``switch="never"`` never switches; an epoch number switches after that
    epoch. ``"auto"`` (our criterion; the paper leaves one open) switches
    after ``auto_max_epochs`` (10) epochs of the current attempt (counted
    again after a restart of a stuck start), or earlier once the amortized
    poses have locked in: after ``auto_min_epochs`` (3) and the end of the
    disc ramp (the head loss gap, mean minus best head loss, shrinks with
    every added shell), and only while the median change of the images' best
    poses since the previous epoch is below ``auto_stable_deg`` (10°), when
    the gap has risen to ``auto_gap_rise`` (1.12) times its lowest value on
    the full disc (the map gained detail, so the choice of pose matters
    more). With the default 12-epoch ramp the cap comes first. With
    ``auto_loss_plateau > 0`` (default off) it also switches when the mean
    epoch loss improved by less than that fraction while the gap is past its
    minimum. The cap is early because the direct stage re-searches every pose
    after each epoch (engine/rescue.py), so images left in a wrong basin at
    the switch find theirs, and direct epochs refine poses faster than
    amortized ones (docs/decisions.md#early-switch; the earlier late cap:
    #auto-cap).
    """
    rule = branch.switch_rule
    if rule == "never":
        return None
    if isinstance(rule, int):
        return "epoch" if branch.schedule_epoch >= rule else None
    if cfg.auto_max_epochs and branch.schedule_epoch >= cfg.auto_max_epochs:
        return "auto"
    # Not while the disc still grows, and the gap compared with its values on the full disc only:
    # it changes with every added shell, and at the start all heads agree on a blob
    # (docs/decisions.md#auto-gap-full-disc).
    full_disc = branch.gap_history[cfg.radius_ramp_epochs :]
    if branch.schedule_epoch < max(cfg.auto_min_epochs, cfg.radius_ramp_epochs + 1) or not full_disc:
        return None
    gap, lowest = full_disc[-1], min(full_disc)
    if pose_change_deg >= cfg.auto_stable_deg:
        return None
    if gap >= cfg.auto_gap_rise * lowest:
        return "auto"
    losses = branch.loss_history
    if cfg.auto_loss_plateau > 0 and len(losses) >= 2 and gap > lowest:
        if losses[-2] - losses[-1] < cfg.auto_loss_plateau * abs(losses[-2]):
            return "auto"
    return None


def stall_message(losses: list[float], cfg: TrainingConfig) -> str | None:
    """A warning, once, when the amortized stage has stopped learning; else None.

    ``losses`` holds the branch's mean loss per amortized epoch. It fires at
    the first epoch whose loss is less than ``stall_tolerance`` (0.05 %,
    relative) below the loss ``stall_epochs`` (5) epochs earlier, both on the
    full disc (the loss moves with every added shell before), and is None at
    every later epoch, so that a resumed run does not repeat it. Either the
    amortized stage has converged (switch now) or it never broke the
    symmetry: the map is a blob, every pose fits it about equally, and no
    switch rescues the run. The threshold fires on a run stuck on the
    plateau and stays quiet on runs that broke out
    (docs/decisions.md#stall-warning).
    """
    n, tolerance = cfg.stall_epochs, cfg.stall_tolerance
    first = cfg.radius_ramp_epochs + n  # the earliest window that starts on the full disc
    if n == 0 or tolerance == 0 or len(losses) <= first:
        return None

    def stalled(end: int) -> bool:
        return losses[end - n] - losses[end] < tolerance * abs(losses[end - n])

    last = len(losses) - 1
    if not stalled(last) or any(stalled(end) for end in range(first, last)):
        return None
    before, now = losses[last - n], losses[last]
    change = 100 * (before - now) / abs(before)
    return (
        f"stalled: the mean loss changed by {change:.3f} % over the last {n} amortized epochs "
        f"({before:.5g} -> {now:.5g}). If the map is still a featureless blob, the run is stuck "
        "on the low-resolution plateau and no switch rescues it: restart with another seed. If "
        "the map shows detail, the amortized stage is done: switch to direct pose optimisation."
    )
