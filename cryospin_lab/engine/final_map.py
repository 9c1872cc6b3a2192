"""The run's last step: the map rebuilt from every image at its final pose.

The direct stage trains its volume by one Adam step per five pose steps; once
the poses settle it goes on fitting the images' noise, and the map ends coarser
than the poses allow. So when a branch in the direct stage has done its last
epoch (after the re-search's last word on extra epochs), its volume is replaced
by the CTF-weighted back-projection of its images at their final poses (and
shifts), ``sum A^T y / (sum A^T CTF + HALF_MAP_REGULARISER x its mean)``, the
same estimate as the half-map re-search's maps, on the run's disc. That map is
what ``map.mrc`` and the last epoch's report then show
(docs/decisions.md#final-backprojection).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cryospin_lab.engine.branch import Branch
from cryospin_lab.engine.epoch_report import EpochReporter
from cryospin_lab.engine.events import Event, LogEvent, Phase
from cryospin_lab.engine.rescue import half_maps
from cryospin_lab.engine.steps import StepContext

__all__ = ["final_map_events", "rebuild_map"]


@torch.no_grad()
def rebuild_map(ctx: StepContext, branch: Branch) -> None:
    """Replace the branch's volume by the back-projection of its images at their current poses
    (in place: the optimiser keeps its parameters)."""
    rows = ctx.comm.local(branch.rows(torch.arange(len(branch.pose_table))))
    (hartley,) = half_maps(ctx, branch, ctx.feed.disc(branch.schedule_epoch), [rows])
    branch.volume.set_hartley(hartley)


def final_map_events(
    ctx: StepContext, branch: Branch, reporter: EpochReporter, stamp: dict
) -> Iterator[Event]:
    """After a direct-stage branch's last epoch, with ``final_backprojection`` (on by default): the
    map rebuilt (:func:`rebuild_map`), a line saying so, and the new map's FSC against the truth
    (when known) and snapshot for the same epoch (``EpochReporter.map_events``)."""
    cfg = ctx.config
    if not cfg.final_backprojection or branch.phase is not Phase.DIRECT or not branch.finished(cfg.n_epochs):
        return
    rebuild_map(ctx, branch)
    if ctx.comm.is_main:
        message = "final map: rebuilt from every image at its final pose (CTF-weighted back-projection)"
        yield LogEvent(message=message, **stamp)
    yield from reporter.map_events(branch, stamp)
