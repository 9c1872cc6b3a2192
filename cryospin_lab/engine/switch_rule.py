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

    ``auto`` (our criterion; the paper leaves one open): switch once the
    amortized poses have locked in, and at the latest after
    ``auto_max_epochs``. After ``auto_min_epochs`` and the end of the disc
    ramp (the head loss gap, mean minus best head loss, shrinks with every
    shell added), and only while the median change of each image's best
    pose since the previous epoch is below ``auto_stable_deg``, it
    switches when the gap has risen to ``auto_gap_rise`` times its lowest
    value (the map gained detail: the choice of pose matters more), or,
    if ``auto_loss_plateau > 0``, when the mean epoch loss improved by
    less than that fraction while the gap is past its minimum.

    Measured on the default HSP90 set (seed 0, 30 epochs; commands and
    logs in ``bench/results/gpu_h200_2026-11-26`` and the issue note):

    * GPU (H200), one run per rule: fixed switch at epoch 8, 12, 20, 24
      ended at 1.87, 1.92, 1.85, 1.90 degrees median pose error modulo
      the pseudo two-fold (mean 2.94, 2.42, 2.18, 2.13; FSC 6.8-7.0 Å);
      never switching 6.3 degrees, 7.7 Å. The gap rose only x1.09 by
      epoch 30 there, so the gap arm never fired: the cap (then 20) made
      ``auto`` the fixed-20 run, the best of those tried.
    * CPU (this machine's trajectory differs): the gap fell to 0.0752 at
      epoch 13 and rose x1.13 at epoch 19, when the amortized poses
      finished breaking the symmetry; switched after epoch 20, 2.9
      degrees median at epoch 26, 7.9 Å. The loss-plateau arm fired
      after epoch 14 there (loss 0.9368 -> 0.9361) and the direct stage
      froze the remaining wrong poses: 5.9 degrees median, 17.9 mean,
      11.4 Å at epoch 22; so it is off by default.
    * One GPU run per rule stuck on the pseudo-symmetry (23-30 Å) whatever
      the switch epoch: no switch rule rescues an amortized stage that
      has not broken the symmetry.
    * Tried and dropped, a hold on the cap (wait while the best poses
      still move 20 degrees or more per epoch): on the 70S ribosome set
      (``bench/peer_cryodrgn.py --molecule ribosome --n 10000 --epochs 26``,
      CPU) the cap fires with the poses moving 27 degrees per epoch; held,
      the run never switched and ended at 25.3 Å and 34.9 degrees median
      pose error, against 23.1 Å and 44.5 degrees with the switch at 20:
      better poses, a worse map.
    * The cap is 25 (it was 20), because a late switch is what the
      ribosome set needs and HSP90 does not mind (the paper: "it is
      better to switch late than early"). Measured by switching runs at
      other epochs from the checkpoints of one amortized run
      (``bench/experiments/amortized_sweep.py --resume ... --at-resume
      switch``; ``bench/results/cpu_switch_time_2026-11-26.md``), CPU,
      10,000 images, seed 0. Ribosome, 40 epochs: switched after epoch
      20, 26, 30, 35 it ended at 22.1, 15.8, 15.4, 16.1 Å and 22.7, 1.6,
      1.3, 1.7 degrees median pose error (never: 21.8 Å, 10.8 degrees);
      the switch at 20 left about half the poses outside the direct
      stage's reach, and the pose change (~20 degrees per epoch at both
      20 and 26) and the gap (x1.15, x1.21 its lowest after the ramp)
      barely tell the two apart. HSP90, 30 epochs: switched after 20 or
      24, 6.8 or 6.7 Å, 1.7 degrees median modulo the two-fold either
      way. The direct stage needs about 4 epochs to converge on both
      sets, so the default 30 epochs leave it 5.
    """
    rule = branch.switch_rule
    if rule == "never":
        return None
    if isinstance(rule, int):
        return "epoch" if branch.epoch >= rule else None
    if cfg.auto_max_epochs and branch.epoch >= cfg.auto_max_epochs:
        return "auto"
    # Not while the disc still grows: the gap shrinks with every added shell then.
    if branch.epoch < max(cfg.auto_min_epochs, cfg.radius_ramp_epochs + 1) or not branch.gap_history:
        return None
    gap = branch.gap_history[-1]
    if pose_change_deg >= cfg.auto_stable_deg:
        return None
    if gap >= cfg.auto_gap_rise * min(branch.gap_history):
        return "auto"
    losses = branch.loss_history
    if cfg.auto_loss_plateau > 0 and len(losses) >= 2 and gap > min(branch.gap_history):
        if losses[-2] - losses[-1] < cfg.auto_loss_plateau * abs(losses[-2]):
            return "auto"
    return None


def stall_message(losses: list[float], cfg: TrainingConfig) -> str | None:
    """A warning, once, when the amortized stage has stopped learning; else None.

    ``losses`` holds the branch's mean loss per amortized epoch. It fires at
    the first epoch whose loss is less than ``stall_tolerance`` (relative)
    below the loss ``stall_epochs`` epochs earlier, both on the full disc
    (after the ramp: the loss moves with every added shell before), and is
    None at every later epoch, so that a resumed run does not repeat it.

    Either the amortized stage has converged (switch now) or it never broke
    the symmetry: the map is a blob, every pose fits it about equally and
    no switch rescues the run. The 70S ribosome set with run seed 1
    (``bench/peer_cryodrgn.py --molecule ribosome --n 10000 --epochs 30
    --seed 1``, CPU) stayed at 60-83 Å with random poses; its loss moved
    0.015 % from epoch 13 to 18, where this fires. On the bench's other
    H = 7 runs kept on this machine (HSP90 with 1,000-10,000 images and
    the ribosome with seeds 0 and 2; 28 runs, some sharing their first
    epochs) the loss fell by at least 0.09 % per 5 epochs up to epoch 25
    (0.13 % on HSP90 with 10,000 images), so 0.05 % stays quiet there; it
    fires at epoch 39 of a 40-epoch fully amortized HSP90 run (1,000
    images) and at epoch 18-23 of the four one-head runs (cryoAI-like; at
    10,000 images they ended at 30-46 Å on HSP90 and 112 Å on the
    ribosome).
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
