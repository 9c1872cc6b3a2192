"""The direct stage's global re-search: images left in a wrong basin at the switch get a better pose.

Local pose steps cannot leave the basin an image's pose sits in. After a
direct epoch (every ``rescue_every``), each image is scored at every rotation
of a HEALPix grid (``rescue_nside``, ``6 * nside`` in-plane angles) on a coarse
disc (``RESCUE_RADIUS_FRACTION`` of the full radius), all at once as matrix
products (:mod:`cryospin_lab.analysis.pose_grid`); an image whose best grid
rotation fits better there than its own pose, and lies in another basin (more
than two grid spacings away), restarts from that rotation; the next epochs
refine it. Nearer grid points are the image's own basin, which local steps
already explore; so correct images stay put. Once a re-search moves almost
nothing, the next comes ``rescue_idle_every`` epochs later.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cryospin_lab.analysis.pose_grid import grid_losses, grid_slices
from cryospin_lab.analysis.pose_posterior import healpix_rotations
from cryospin_lab.engine.branch import Branch
from cryospin_lab.engine.events import Event, LogEvent, Phase
from cryospin_lab.engine.steps import StepContext
from cryospin_lab.physics import so3
from cryospin_lab.physics.projection import FourierDisc, max_disc_radius
from cryospin_lab.physics.render import LossKind, image_losses, render_hartley

__all__ = ["RESCUE_IDLE_SHARE", "RESCUE_RADIUS_FRACTION", "rescue_events", "research_poses"]

RESCUE_RADIUS_FRACTION = 0.4  # the coarse disc: fine enough to tell basins apart, coarse for the grid
RESCUE_IDLE_SHARE = 0.005  # a re-search moving fewer images finds the poses settled (rescue_idle_every)
_CHUNK = 512  # images scored at once (memory: chunk x grid size floats)
_HEALPIX_SPACING_DEG = 58.6  # mean spacing of HEALPix pixel centres at nside 1 (sqrt(4 pi / 12) rad)


def rescue_events(ctx: StepContext, branch: Branch, stamp: dict) -> Iterator[Event]:
    """After a direct epoch: the re-search and its report, when due.

    Due ``rescue_every`` (1) epochs after the switch or the last re-search; once a re-search
    moved under ``RESCUE_IDLE_SHARE`` (0.5 %) of the images, ``rescue_idle_every`` (5) epochs
    after it instead (0: never slower), since the poses have settled and each re-search costs
    about a second per 10,000 images; never after the last epoch (no epoch left to refine).
    """
    cfg = ctx.config
    if branch.phase is not Phase.DIRECT or not cfg.rescue_every or branch.finished(cfg.n_epochs):
        return
    interval = cfg.rescue_every
    if branch.rescue_idle and cfg.rescue_idle_every:
        interval = max(interval, cfg.rescue_idle_every)
    if branch.epoch - branch.last_rescue_epoch < interval:
        return
    moved, checked = research_poses(ctx, branch, cfg.rescue_nside)
    moved_all, checked_all = ctx.comm.sum_floats(moved, checked)
    branch.last_rescue_epoch = branch.epoch
    branch.rescue_idle = moved_all < RESCUE_IDLE_SHARE * checked_all
    later = ""
    if branch.rescue_idle and cfg.rescue_idle_every > cfg.rescue_every:
        later = f"; the next in {cfg.rescue_idle_every} epochs"
    yield LogEvent(message=f"re-search: {moved} of {checked} images moved to a better pose{later}", **stamp)


@torch.no_grad()
def research_poses(ctx: StepContext, branch: Branch, nside: int) -> tuple[int, int]:
    """Move each of this rank's images whose best grid rotation beats its pose on the coarse disc;
    returns ``(moved, checked)``."""
    table, feed = branch.pose_table, ctx.feed
    radius = max(2.0, RESCUE_RADIUS_FRACTION * max_disc_radius(feed.box_size))
    disc = FourierDisc.make(feed.box_size, radius, device=feed.device)
    grid = healpix_rotations(nside, 6 * nside, dtype=torch.float32).reshape(-1, 3, 3).to(feed.device)
    volume_ht = branch.volume.hartley().detach()
    slices = grid_slices(volume_ht, grid, disc)
    rows = ctx.comm.local(branch.rows(torch.arange(len(table))))
    render = dict(pixel_size_angstrom=ctx.pixel_size_angstrom, contrast=ctx.config.contrast)
    min_jump_deg = 2 * _HEALPIX_SPACING_DEG / nside
    moved = 0
    for start in range(0, len(rows), _CHUNK):
        idx = rows[start : start + _CHUNK]
        _, observed, ctf = feed.batch(idx, disc)
        on_device = idx.to(feed.device)
        shifts = table.shifts_angstrom[on_device] if table.estimate_shifts else None
        best, best_at = grid_losses(
            slices, observed, disc, ctf_values=ctf, shifts_angstrom=shifts, **render
        ).min(1)
        own = render_hartley(
            volume_ht, table.rotations[on_device], disc, ctf_values=ctf, shifts_angstrom=shifts, **render
        )
        jump = so3.geodesic_angle_deg(grid[best_at], table.rotations[on_device])
        better = (best < image_losses(own, observed, disc, LossKind.L2)) & (jump > min_jump_deg)
        table.reset_rows(on_device[better], grid[best_at[better]])
        moved += int(better.sum())
    return moved, len(rows)
