"""The direct stage's map rebuilt from every image at its current pose.

The direct stage trains its volume by one Adam step per five pose steps. It
lags the poses while they move, and once they settle it goes on fitting the
images' noise, so its map ends coarser than the poses allow. So after every
direct epoch, before the epoch's report and re-search, the branch's volume is
replaced by the CTF-weighted back-projection of its images at their current
poses (and shifts), ``sum A^T y / (sum A^T CTF + HALF_MAP_REGULARISER x its
mean)`` (the half-map re-search's estimate) on the run's disc; the next epoch's
pose steps and this epoch's re-search work against that map, and the last
epoch's is the map the run hands back (``map.mrc``: the re-search after the
last epoch moves nobody unless it extends the run). docs/decisions.md#rebuild-map.
"""

from __future__ import annotations

import torch

from cryospin_lab.engine.branch import Branch
from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.engine.events import Phase
from cryospin_lab.engine.rescue import half_maps
from cryospin_lab.engine.steps import StepContext

__all__ = ["rebuild_due", "rebuild_map"]


def rebuild_due(branch: Branch, config: TrainingConfig) -> bool:
    """With ``rebuild_map`` (on by default): after every direct epoch. Not only while the poses
    move: a trained volume left to itself after a rebuild refines the poses worse than one rebuilt
    each epoch (docs/decisions.md#rebuild-map)."""
    return bool(config.rebuild_map) and branch.phase is Phase.DIRECT


@torch.no_grad()
def rebuild_map(ctx: StepContext, branch: Branch) -> None:
    """Replace the branch's volume by the back-projection of its images at their current poses
    (in place: the optimiser keeps its parameters)."""
    rows = ctx.comm.local(branch.rows(torch.arange(len(branch.pose_table))))
    (hartley,) = half_maps(ctx, branch, ctx.feed.disc(branch.schedule_epoch), [rows])
    branch.volume.set_hartley(hartley)
