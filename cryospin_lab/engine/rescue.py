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
nothing, the next comes ``rescue_idle_every`` epochs later. A run whose
re-search still moves images after its last epoch has not settled: it goes on
one epoch at a time (``rescue_extra_epochs``; ``rescue_extra_epochs_stuck`` after a start
that stayed stuck through its restarts).

With ``rescue_halfmap_steps`` > 0 (5 by default), on sets of ``HALF_MAP_MIN_SET``
(1,000) images or more, every ``HALF_MAP_EVERY`` (5) epochs and after an idle
re-search, the re-search judges each image under the map of the
other half of the set (even against odd images, each half's map one
back-projection of its current poses): the run's own map has co-adapted to
every image's current pose, so under it a wrong pose fits about as well as the
true one; under a map the image did not train, the true one wins. The image's
own pose and its best grid rotation in another basin are each refined by that
many pose steps there (with their shifts, when shifts are estimated: a stranded
image's shift was fitted to its wrong pose), and the better is kept. Not at every re-search: where
the halves cannot tell a pose from its mate, a few per cent of the images move
at every one, so the run would never settle (docs/decisions.md#rescue-variants).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from cryospin_lab.analysis.pose_grid import grid_losses, grid_slices
from cryospin_lab.analysis.pose_posterior import healpix_rotations
from cryospin_lab.engine.branch import Branch
from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.engine.events import Event, LogEvent, Phase
from cryospin_lab.engine.steps import StepContext
from cryospin_lab.model.pose_table import PoseTable, RowAdam
from cryospin_lab.physics import so3
from cryospin_lab.physics.projection import FourierDisc, max_disc_radius
from cryospin_lab.physics.render import (
    LossKind,
    backproject_hartley,
    image_losses,
    pose_losses,
    render_hartley,
)

__all__ = [
    "RESCUE_EXTEND_MIN_IMAGES",
    "RESCUE_EXTEND_MIN_SET",
    "RESCUE_IDLE_SHARE",
    "RESCUE_RADIUS_FRACTION",
    "HALF_MAP_EVERY",
    "HALF_MAP_MIN_SET",
    "HALF_MAP_REGULARISER",
    "better_poses",
    "half_maps",
    "refine_poses",
    "rescue_events",
    "research_poses",
]

RESCUE_RADIUS_FRACTION = 0.4  # the coarse disc: fine enough to tell basins apart, coarse for the grid
RESCUE_IDLE_SHARE = 0.005  # a re-search moving fewer images finds the poses settled (rescue_idle_every)
RESCUE_EXTEND_MIN_IMAGES = 50  # and fewer than this does not extend a run (a small set's noise moves some)
RESCUE_EXTEND_MIN_SET = 1000  # smaller sets are demos and tests: their runs keep the length asked for
HALF_MAP_REGULARISER = 0.1  # Wiener term of a half map, a share of its mean weight
HALF_MAP_EVERY = 5  # epochs between re-searches under the half maps (each costs about two direct epochs)
HALF_MAP_MIN_SET = 1000  # smaller sets never: halves of a few hundred images back-project too noisy a map
_CHUNK = 512  # images scored at once (memory: chunk x grid size floats)
_HEALPIX_SPACING_DEG = 58.6  # mean spacing of HEALPix pixel centres at nside 1 (sqrt(4 pi / 12) rad)


def extra_epochs_allowed(branch: Branch, config: TrainingConfig) -> int:
    """How many epochs past ``n_epochs`` a still-moving re-search may add: ``rescue_extra_epochs``
    (10), or ``rescue_extra_epochs_stuck`` (40) when the branch's last attempt was judged stuck with
    no restart left, whose direct stage starts from a blob and finds the structure over tens of
    epochs."""
    return config.rescue_extra_epochs_stuck if branch.stuck else config.rescue_extra_epochs


def rescue_events(ctx: StepContext, branch: Branch, stamp: dict, *, extend: bool = True) -> Iterator[Event]:
    """After a direct epoch: the re-search and its report, when due.

    Due ``rescue_every`` (1) epochs after the switch or the last re-search; once a re-search
    moved under ``RESCUE_IDLE_SHARE`` (0.5 %) of the images, ``rescue_idle_every`` (5) epochs
    after it instead (0: never slower), since the poses have settled and each re-search costs
    about a second per 10,000 images. After the last epoch only while the last re-search was
    not idle, ``extend`` is true, the set holds ``RESCUE_EXTEND_MIN_SET`` (1,000) images or more
    and fewer than ``rescue_extra_epochs`` (10; 0: off) epochs were added: if it would move 0.5 %
    of the images and ``RESCUE_EXTEND_MIN_IMAGES`` (50) or more, they move and the run gets one
    more epoch to refine them, else nobody moves (an unrefined grid pose would end in the
    results). Gold-standard halves pass ``extend=False``: their epochs must stay in step.
    """
    cfg = ctx.config
    if branch.phase is not Phase.DIRECT or not cfg.rescue_every:
        return
    last = branch.finished(cfg.n_epochs)
    since_halfmaps = branch.epoch - branch.last_halfmap_epoch
    halfmaps = (
        bool(cfg.rescue_halfmap_steps)
        and len(branch.pose_table) >= HALF_MAP_MIN_SET
        and (branch.rescue_idle or since_halfmaps >= HALF_MAP_EVERY)
    )
    if last:
        spent = branch.extra_epochs >= extra_epochs_allowed(branch, cfg)
        settled = branch.rescue_idle and not halfmaps
        if not extend or settled or spent or len(branch.pose_table) < RESCUE_EXTEND_MIN_SET:
            return
    else:
        interval = cfg.rescue_every
        if branch.rescue_idle and cfg.rescue_idle_every:
            interval = max(interval, cfg.rescue_idle_every)
        if branch.epoch - branch.last_rescue_epoch < interval:
            return
    rows, rotations, shifts = better_poses(ctx, branch, cfg.rescue_nside, halfmaps=halfmaps)
    checked = len(_checked_rows(ctx, branch))
    kind = "re-search under the half maps" if halfmaps else "re-search"
    moved_all, checked_all = ctx.comm.sum_floats(len(rows), checked)
    branch.last_rescue_epoch = branch.epoch
    if halfmaps:
        branch.last_halfmap_epoch = branch.epoch
    branch.rescue_idle = moved_all < RESCUE_IDLE_SHARE * checked_all
    if last and (branch.rescue_idle or moved_all < RESCUE_EXTEND_MIN_IMAGES):
        message = (
            f"{kind} after the last epoch: {len(rows)} of {checked} images would move (under "
            f"{100 * RESCUE_IDLE_SHARE:.1f} % or {RESCUE_EXTEND_MIN_IMAGES}); the run ends"
        )
        yield LogEvent(message=message, **stamp)
        return
    branch.pose_table.reset_rows(rows, rotations, shifts)
    later = ""
    if last:
        branch.extra_epochs += 1
        end = branch.last_epoch(cfg.n_epochs)
        later = (
            f"; still moving after the last epoch, so the run goes on to epoch {end} "
            f"({branch.extra_epochs} of at most {extra_epochs_allowed(branch, cfg)} extra)"
        )
    elif branch.rescue_idle and cfg.rescue_idle_every > cfg.rescue_every:
        later = f"; the next in {cfg.rescue_idle_every} epochs"
    message = f"{kind}: {len(rows)} of {checked} images moved to a better pose{later}"
    yield LogEvent(message=message, **stamp)


def research_poses(
    ctx: StepContext, branch: Branch, nside: int, *, halfmaps: bool = False
) -> tuple[int, int]:
    """Move each of this rank's images whose best grid rotation beats its pose on the coarse disc
    (under the other half's map with ``halfmaps``); returns ``(moved, checked)``."""
    rows, rotations, shifts = better_poses(ctx, branch, nside, halfmaps=halfmaps)
    branch.pose_table.reset_rows(rows, rotations, shifts)
    return len(rows), len(_checked_rows(ctx, branch))


def _checked_rows(ctx: StepContext, branch: Branch) -> Tensor:
    """The pose-table rows a re-search checks: the branch's images (a gold-standard half's) on this rank."""
    return ctx.comm.local(branch.rows(torch.arange(len(branch.pose_table))))


@torch.no_grad()
def better_poses(
    ctx: StepContext, branch: Branch, nside: int, *, halfmaps: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The rows (on the device) of this rank's images whose best grid rotation beats their pose on the
    coarse disc and lies in another basin, those rotations ``(n, 3, 3)`` and None (their shifts
    stay); nothing is changed. With estimated shifts and ``rescue_shift_step_px`` > 0 (2 px), the
    grid is scored at each image's shift and the 8 around it, and the moved images' best shifts
    ``(n, 2)`` come too: a stranded image's shift was fitted to its wrong pose. With
    ``halfmaps``, judged under the other half's map instead (:func:`_cross_checked`), with their
    refined shifts ``(n, 2)`` when shifts are estimated."""
    table, feed = branch.pose_table, ctx.feed
    radius = max(2.0, RESCUE_RADIUS_FRACTION * max_disc_radius(feed.box_size))
    disc = FourierDisc.make(feed.box_size, radius, device=feed.device)
    grid = healpix_rotations(nside, 6 * nside, dtype=torch.float32).reshape(-1, 3, 3).to(feed.device)
    if halfmaps:
        return _cross_checked(ctx, branch, grid, disc)
    volume_ht = branch.volume.hartley().detach()
    slices = grid_slices(volume_ht, grid, disc)
    rows = ctx.comm.local(branch.rows(torch.arange(len(table))))
    render = dict(pixel_size_angstrom=ctx.pixel_size_angstrom, contrast=ctx.config.contrast)
    min_jump_deg = 2 * _HEALPIX_SPACING_DEG / nside
    offsets = _shift_offsets(ctx, table)
    found_rows, found_rotations, found_shifts = [], [], []
    for start in range(0, len(rows), _CHUNK):
        idx = rows[start : start + _CHUNK]
        _, observed, ctf = feed.batch(idx, disc)
        on_device = idx.to(feed.device)
        shifts = table.shifts_angstrom[on_device] if table.estimate_shifts else None
        own_loss = image_losses(
            render_hartley(
                volume_ht, table.rotations[on_device], disc, ctf_values=ctf, shifts_angstrom=shifts, **render
            ),
            observed, disc, LossKind.L2,
        )  # fmt: skip
        if offsets is None:
            best, best_at = grid_losses(
                slices, observed, disc, ctf_values=ctf, shifts_angstrom=shifts, **render
            ).min(1)
            new_shifts = shifts
        else:  # the best rotation at each of the 9 shifts, then the best of those
            bound = ctx.config.encoder.max_shift_angstrom
            tried = (shifts[:, None, :] + offsets).clamp(-bound, bound)  # (B, 9, 2)
            scored = [
                grid_losses(
                    slices, observed, disc, ctf_values=ctf, shifts_angstrom=tried[:, k], **render
                ).min(1)
                for k in range(len(offsets))
            ]
            losses, at = torch.stack([v for v, _ in scored], 1), torch.stack([i for _, i in scored], 1)
            pick, n = losses.argmin(1), torch.arange(len(idx), device=losses.device)
            best, best_at, new_shifts = losses[n, pick], at[n, pick], tried[n, pick]
        jump = so3.geodesic_angle_deg(grid[best_at], table.rotations[on_device])
        better = (best < own_loss) & (jump > min_jump_deg)
        found_rows.append(on_device[better])
        found_rotations.append(grid[best_at[better]])
        if offsets is not None:
            found_shifts.append(new_shifts[better])
    if not found_rows:
        return torch.zeros(0, dtype=torch.long, device=feed.device), grid[:0], None
    shifts_out = torch.cat(found_shifts) if offsets is not None else None
    return torch.cat(found_rows), torch.cat(found_rotations), shifts_out


def _shift_offsets(ctx: StepContext, table: PoseTable) -> Tensor | None:
    """``(9, 2)`` shift offsets (Å) the plain re-search tries around each image's shift: 0 and
    ``rescue_shift_step_px`` pixels in x and y; None without shift estimation or with a step of 0."""
    step = ctx.config.rescue_shift_step_px
    if not table.estimate_shifts or step <= 0:
        return None
    g = torch.tensor([-step, 0.0, step]) * ctx.pixel_size_angstrom
    return torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2).to(table.shifts_angstrom)


def _halves(ctx: StepContext, branch: Branch) -> list[Tensor]:
    """This rank's rows of the branch's two halves: every other image of the branch."""
    rows = branch.rows(torch.arange(len(branch.pose_table)))
    half = torch.arange(len(rows)) % 2
    return [ctx.comm.local(rows[half == h]) for h in (0, 1)]


def half_maps(ctx: StepContext, branch: Branch, disc: FourierDisc, halves: list[Tensor]) -> list[Tensor]:
    """Each half's Hartley map from its images at their current poses: the CTF-weighted
    back-projection ``sum A^T y / (sum A^T CTF + HALF_MAP_REGULARISER x its mean)``, summed over
    ranks; ``halves`` are this rank's rows of each half (:func:`_halves`)."""
    table, feed = branch.pose_table, ctx.feed
    shape = branch.volume.hartley().shape
    render = dict(pixel_size_angstrom=ctx.pixel_size_angstrom, contrast=ctx.config.contrast)
    maps = []
    for rows in halves:
        sums = torch.zeros(2, *shape, device=feed.device)
        for start in range(0, len(rows), _CHUNK):
            idx = rows[start : start + _CHUNK]
            _, observed, ctf = feed.batch(idx, disc)
            on_device = idx.to(feed.device)
            shifts = table.shifts_angstrom[on_device] if table.estimate_shifts else None
            data, weights = backproject_hartley(
                shape, table.rotations[on_device], disc, observed, ctf_values=ctf, shifts_angstrom=shifts,
                **render,
            )  # fmt: skip
            sums[0] += data
            sums[1] += weights
        ctx.comm.sum_(sums)
        numerator, weights = sums
        floor = HALF_MAP_REGULARISER * weights[weights > 0].mean() if bool((weights > 0).any()) else 1.0
        maps.append(numerator / (weights + floor))
    return maps


def _cross_checked(
    ctx: StepContext, branch: Branch, grid: Tensor, coarse: FourierDisc
) -> tuple[Tensor, Tensor]:
    """:func:`better_poses` under the other half's map: the best grid rotation in another basin
    (coarse disc) and the image's own pose, each refined by ``rescue_halfmap_steps`` pose steps on
    the run's current disc (with its shift when shifts are estimated); the rows whose refined
    candidate fits better, those rotations, and their shifts (None when not estimated)."""
    table, feed, cfg = branch.pose_table, ctx.feed, ctx.config
    fine = feed.disc(branch.schedule_epoch)
    halves = _halves(ctx, branch)
    maps = half_maps(ctx, branch, fine, halves)
    render = dict(pixel_size_angstrom=ctx.pixel_size_angstrom, contrast=cfg.contrast)
    min_jump = math.cos(math.radians(2 * _HEALPIX_SPACING_DEG / cfg.rescue_nside))
    shift_lr = cfg.shift_lr_angstrom if table.estimate_shifts else None
    found_rows, found_rotations, found_shifts = [], [], []
    for rows, other in zip(halves, reversed(maps), strict=True):
        slices = grid_slices(other, grid, coarse)
        for start in range(0, len(rows), _CHUNK):
            idx = rows[start : start + _CHUNK]
            on_device = idx.to(feed.device)
            own = table.rotations[on_device]
            shifts = table.shifts_angstrom[on_device] if table.estimate_shifts else None
            _, observed, ctf = feed.batch(idx, coarse)
            losses = grid_losses(slices, observed, coarse, ctf_values=ctf, shifts_angstrom=shifts, **render)
            cos = ((own.reshape(-1, 9) @ grid.reshape(-1, 9).T) - 1) / 2  # cos of the angle to each
            candidate = grid[losses.masked_fill(cos >= min_jump, math.inf).argmin(1)]
            _, observed, ctf = feed.batch(idx, fine)
            pair = lambda x: None if x is None else torch.cat([x, x])  # noqa: E731
            refined, refined_shifts, final = refine_poses(
                other, torch.cat([own, candidate]), fine, pair(observed), ctf_values=pair(ctf),
                shifts_angstrom=pair(shifts), steps=cfg.rescue_halfmap_steps, lr=cfg.pose_lr, render=render,
                shift_lr=shift_lr,
            )  # fmt: skip
            n = len(idx)
            better = final[n:] < final[:n]
            found_rows.append(on_device[better])
            found_rotations.append(refined[n:][better])
            if refined_shifts is not None:
                found_shifts.append(refined_shifts[n:][better])
    shifts = torch.cat(found_shifts) if found_shifts else None
    return torch.cat(found_rows), torch.cat(found_rotations), shifts


def refine_poses(
    volume: Tensor,
    rotations: Tensor,
    disc: FourierDisc,
    observed: Tensor,
    *,
    ctf_values: Tensor | None,
    shifts_angstrom: Tensor | None,
    steps: int,
    lr: float,
    render: dict,
    shift_lr: float | None = None,
    betas: tuple[float, float] = (0.9, 0.9),
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Each pose's best along ``steps`` row-wise Adam steps under ``volume`` (the rates decaying
    geometrically to a twentieth, so the last steps settle): its rotation, its shift (refined too
    at ``shift_lr`` Å when given with ``shifts_angstrom``, else None) and its L2 loss; ``render``
    holds ``pixel_size_angstrom`` and ``contrast``."""
    n = len(rotations)
    device = rotations.device
    rows = torch.arange(n, device=device)
    adam = RowAdam(n, 3, lr, betas, device=device)
    omega = torch.zeros(n, 3, device=device)
    best_loss = torch.full((n,), math.inf, device=device)
    best_omega = torch.zeros_like(omega)
    move_shifts = shift_lr is not None and shifts_angstrom is not None
    shift = shifts_angstrom.detach().clone() if move_shifts else shifts_angstrom
    best_shift = shift.clone() if move_shifts else None
    shift_adam = RowAdam(n, 2, shift_lr, betas, device=device) if move_shifts else None
    decay = (1 / 20) ** (1 / max(1, steps - 1))
    for step in range(steps + 1):
        with torch.enable_grad():
            omega.requires_grad_(True)
            if move_shifts:
                shift.requires_grad_(True)
            posed = so3.exp_so3(omega) @ rotations
            losses = pose_losses(
                volume, posed, disc, observed, LossKind.L2, ctf_values=ctf_values,
                shifts_angstrom=shift, **render,
            )  # fmt: skip
            if step < steps:
                losses.sum().backward()
        improved = losses.detach() < best_loss
        best_loss = torch.where(improved, losses.detach(), best_loss)
        best_omega[improved] = omega.detach()[improved]
        if move_shifts:
            best_shift[improved] = shift.detach()[improved]
        if step < steps:
            adam.lr = lr * decay**step
            omega = adam.step(rows, omega.detach(), omega.grad)
            if move_shifts:
                shift_adam.lr = shift_lr * decay**step
                shift = shift_adam.step(rows, shift.detach(), shift.grad)
    u, _, vt = torch.linalg.svd(so3.exp_so3(best_omega) @ rotations)
    return u @ vt, best_shift, best_loss
