"""One optimisation step of a branch: amortized (winner-takes-all) and direct (coordinate descent).

docs/method.md §4 and §5:

* :func:`amortized_step`: the encoder gives H candidate poses per image,
  :func:`~cryospin_lab.physics.render.winner_losses` renders each, the loss is
  the minimum over heads (winner-takes-all), encoder and decoder take one Adam
  step each;
* :func:`direct_step`: ``n_pose_steps`` row-wise Adam steps on the batch's
  axis-angle corrections with the volume fixed, fold, then one decoder step
  with the poses fixed (coordinate descent);
* :func:`encoder_candidates`: the heads' candidates and their losses without
  training (the switch, Eq. 6, and the tracked images' report).

A step reads everything besides its branch from a :class:`StepContext` and
checks its loss and gradients with the run's :class:`NanGuard` before applying
them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryospin_lab.engine.branch import Branch
from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.engine.distributed import Comm
from cryospin_lab.engine.feed import ParticleFeed
from cryospin_lab.physics.projection import FourierDisc
from cryospin_lab.physics.render import LossKind, image_losses, pose_losses, render_hartley, winner_losses

__all__ = [
    "NanGuard",
    "StepContext",
    "amortized_step",
    "best_candidates",
    "direct_step",
    "encoder_candidates",
]


class NanGuard:
    """Skips a batch whose loss or gradients are not finite, up to ``limit`` in a row per branch.

    ``limit`` is ``TrainingConfig.nan_guard`` (default 0: the first such batch
    stops the run), so that a rare bad batch need not end a long run while a
    diverging one still stops. Either way no update is applied from it.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row: dict[str, int] = {}  # consecutive skipped batches per branch
        self.skipped = False  # the last step was skipped (read and cleared by the trainer)

    def check(self, branch: Branch, loss: Tensor, optimizers=()) -> bool:
        """True if ``loss`` (and the gradients ``optimizers`` would apply) are finite. Otherwise the
        gradients are dropped and, within ``limit`` bad batches in a row, False (the caller skips the
        batch); beyond it, FloatingPointError, raised before any update is applied."""
        values = [loss.detach().reshape(1)]
        for opt in optimizers:
            values += [p.grad.detach().abs().sum().reshape(1) for g in opt.param_groups for p in g["params"]
                       if p.grad is not None]  # fmt: skip
        if bool(torch.isfinite(torch.cat(values)).all()):
            return True
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        what = "loss" if not torch.isfinite(loss.detach()).all() else "gradient"
        count = self.in_a_row.get(branch.name, 0) + 1
        if count > self.limit:
            guard = (
                f"nan_guard={self.limit} allows no more in a row"
                if self.limit
                else "set TrainingConfig.nan_guard to skip such batches"
            )
            raise FloatingPointError(
                f"{what} became {float(loss.detach())} at step {branch.step} (epoch {branch.epoch}, "
                f"branch {branch.name!r}); no update was applied from this batch ({guard})"
            )
        self.in_a_row[branch.name] = count
        self.skipped = True
        return False

    def passed(self, branch: Branch) -> None:
        """A step of ``branch`` was applied: its count of bad batches in a row starts again."""
        self.in_a_row[branch.name] = 0


@dataclass(frozen=True, eq=False)
class StepContext:
    """What a step reads besides its branch: the data, the ranks, the settings, the NaN guard."""

    feed: ParticleFeed
    comm: Comm
    config: TrainingConfig
    loss_kind: LossKind
    pixel_size_angstrom: float
    guard: NanGuard

    def batch_mean(self, losses: Tensor, n_batch: int) -> Tensor:
        """This rank's share of the global batch's mean loss: its images' sum over the global batch
        size (summed over ranks, the batch mean; with one rank, the mean itself)."""
        return losses.mean() if not self.comm.active else losses.sum() / n_batch


def amortized_step(ctx: StepContext, branch: Branch, indices: Tensor) -> float:
    """One winner-takes-all step of the encoder and the volume on the images ``indices``; the loss."""
    disc = ctx.feed.disc(branch.schedule_epoch)
    n_batch = len(indices)  # the global batch; this rank trains on the images it owns
    indices = ctx.comm.local(indices)
    images, observed, ctf = ctx.feed.batch(indices, disc)
    branch.encoder.train()
    # Batch-norm running statistics change in the forward pass: kept to undo a non-finite batch's.
    buffers = [b.clone() for b in branch.encoder.buffers()]
    candidates = branch.encoder(images)
    best_losses, best_heads, all_losses = winner_losses(
        branch.volume.hartley(),
        candidates.rotations,
        disc,
        observed,
        ctx.loss_kind,
        pixel_size_angstrom=ctx.pixel_size_angstrom,
        ctf_values=ctf,
        shifts_angstrom=candidates.shifts_angstrom,
        contrast=ctx.config.contrast,
    )
    loss = ctx.batch_mean(best_losses, n_batch)  # winner-takes-all: only the best head gets gradient
    total = ctx.comm.sum_(loss.detach().clone())  # the global batch's mean loss
    branch.encoder_opt.zero_grad(set_to_none=True)
    branch.decoder_opt.zero_grad(set_to_none=True)
    try:
        finite = ctx.guard.check(branch, total)
        if finite:
            loss.backward()
            ctx.comm.sync_grads([*branch.encoder.parameters(), *branch.volume.parameters()])
            finite = ctx.guard.check(branch, total, (branch.encoder_opt, branch.decoder_opt))
    except FloatingPointError:
        _restore_buffers(branch, buffers)
        raise
    if not finite:
        _restore_buffers(branch, buffers)
        return math.nan
    branch.encoder_opt.step()
    branch.decoder_opt.step()
    with torch.no_grad():
        rows = torch.arange(len(indices), device=best_heads.device)
        branch.best_rotations[indices] = candidates.rotations[rows, best_heads].detach().float().cpu()
        branch.best_heads[indices] = best_heads.cpu()
        if candidates.shifts_angstrom is not None:
            branch.best_shifts[indices] = candidates.shifts_angstrom[rows, best_heads].detach().float().cpu()
        branch.head_wins += torch.bincount(best_heads.cpu(), minlength=ctx.config.encoder.n_heads)
        branch.epoch_gap_sum += float((all_losses.mean(dim=1) - all_losses.min(dim=1).values).sum())
    return float(total)


def direct_step(ctx: StepContext, branch: Branch, indices: Tensor) -> float:
    """``n_pose_steps`` pose steps with the volume fixed, then one volume step; the last loss."""
    disc = ctx.feed.disc(branch.schedule_epoch)
    n_batch = len(indices)
    indices = ctx.comm.local(indices)  # this rank's images: its rows of the pose table
    images, observed, ctf = ctx.feed.batch(indices, disc)
    table, rows = branch.pose_table, indices.to(ctx.feed.device)
    render_kwargs = dict(
        pixel_size_angstrom=ctx.pixel_size_angstrom, ctf_values=ctf, contrast=ctx.config.contrast
    )
    volume_fixed = branch.volume.hartley().detach()
    omega, shifts = table.corrections(rows)
    # Shifts that are not estimated are all zero: rendering them would only cost time.
    use_shifts = table.estimate_shifts
    for _ in range(ctx.config.n_pose_steps):
        # Sum, not mean: each image's gradient is then independent of the batch size.
        pose_loss = pose_losses(
            volume_fixed,
            table.compose(rows, omega),
            disc,
            observed,
            ctx.loss_kind,
            shifts_angstrom=shifts if use_shifts else None,
            **render_kwargs,
        ).sum()
        if not ctx.guard.check(branch, ctx.comm.sum_(pose_loss.detach().clone())):
            return math.nan  # before any change to the table: omega is folded in only below
        pose_loss.backward()
        omega, shifts = table.apply_step(rows, omega, shifts)
    table.fold(rows, omega, shifts)
    predicted = render_hartley(
        branch.volume.hartley(),
        table.rotations[rows],
        disc,
        shifts_angstrom=table.shifts_angstrom[rows] if use_shifts else None,
        **render_kwargs,
    )
    loss = ctx.batch_mean(image_losses(predicted, observed, disc, ctx.loss_kind), n_batch)
    total = ctx.comm.sum_(loss.detach().clone())
    branch.decoder_opt.zero_grad(set_to_none=True)
    if not ctx.guard.check(branch, total):
        return math.nan
    loss.backward()
    ctx.comm.sync_grads(branch.volume.parameters())
    if not ctx.guard.check(branch, total, (branch.decoder_opt,)):
        return math.nan
    branch.decoder_opt.step()
    return float(total)


@torch.no_grad()
def _restore_buffers(branch: Branch, saved: list[Tensor]) -> None:
    for buffer, value in zip(branch.encoder.buffers(), saved, strict=True):
        buffer.copy_(value)


@torch.no_grad()
def encoder_candidates(
    ctx: StepContext, branch: Branch, indices: Tensor, disc: FourierDisc
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The heads' candidates (eval mode) and their losses for ``indices``: (B,H,3,3), (B,H,2)|None, (B,H)."""
    images, observed, ctf = ctx.feed.batch(indices, disc)
    branch.encoder.eval()
    cand = branch.encoder(images)
    predicted = render_hartley(
        branch.volume.hartley(),
        cand.rotations,
        disc,
        pixel_size_angstrom=ctx.pixel_size_angstrom,
        ctf_values=ctf,
        shifts_angstrom=cand.shifts_angstrom,
        contrast=ctx.config.contrast,
    )
    return cand.rotations, cand.shifts_angstrom, image_losses(predicted, observed, disc, ctx.loss_kind)


def best_candidates(
    ctx: StepContext, branch: Branch, rows: Tensor, n_images: int, disc: FourierDisc
) -> tuple[Tensor, Tensor]:
    """Eq. 6: each of ``rows``' lowest-loss candidate, as ``(n_images, 3, 3)`` rotations and
    ``(n_images, 2)`` shifts in Å on the device (other rows: identity and zero)."""
    # Rows outside a gold-standard half keep the identity; they are never trained or reported.
    rotations = torch.eye(3, device=ctx.feed.device).repeat(n_images, 1, 1)
    shifts = torch.zeros(n_images, 2, device=ctx.feed.device)
    chunk = max(ctx.config.batch_size, 256)
    for start in range(0, len(rows), chunk):
        idx = rows[start : start + chunk]
        cand_rot, cand_shift, losses = encoder_candidates(ctx, branch, idx, disc)
        best = losses.argmin(dim=1)
        picked = torch.arange(len(idx), device=best.device)
        rotations[idx] = cand_rot[picked, best].float()
        if cand_shift is not None:
            shifts[idx] = cand_shift[picked, best].float()
    return rotations, shifts
