"""One optimisation step of a branch: amortized (winner-takes-all) and direct (coordinate descent).

METHOD.md sections 4 and 5:

* amortized: the encoder gives H candidate poses per image, :func:`render_hartley`
  renders each, the loss is the minimum over heads (winner-takes-all, Eq. 5),
  encoder and decoder take one Adam step each;
* direct: ``n_pose_steps`` row-wise Adam steps on the batch's axis-angle
  corrections with the volume fixed, fold, then one decoder step with the
  poses fixed (coordinate descent).

Every step checks its loss and gradients before applying them (the NaN guard,
:meth:`StepsMixin._finite`). The mixin is :class:`~cryospin_lab.training.Trainer`'s:
it uses the trainer's feed, communicator, config and loss kind.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cryospin_lab.branch import Branch
from cryospin_lab.projection import FourierDisc
from cryospin_lab.render import image_losses, render_hartley, winner_losses

__all__ = ["StepsMixin"]


class StepsMixin:
    """The per-step math of :class:`~cryospin_lab.training.Trainer` (see the module docstring)."""

    def _amortized_step(self, branch: Branch, indices: Tensor) -> float:
        disc = self._disc(branch.epoch)
        n_batch = len(indices)  # the global batch; this rank trains on the images it owns
        indices = self.comm.local(indices)
        images, observed, ctf = self._batch(indices, disc)
        branch.encoder.train()
        # Batch-norm running statistics change in the forward pass: kept to undo a non-finite batch's.
        buffers = [b.clone() for b in branch.encoder.buffers()]
        candidates = branch.encoder(images)
        best_losses, best_heads, all_losses = winner_losses(
            branch.volume.hartley(),
            candidates.rotations,
            disc,
            observed,
            self.loss_kind,
            pixel_size_angstrom=self.pixel_size_angstrom,
            ctf_values=ctf,
            shifts_angstrom=candidates.shifts_angstrom,
            contrast=self.config.contrast,
        )
        loss = self._batch_mean(best_losses, n_batch)  # winner-takes-all: only the best head gets gradient
        total = self.comm.sum_(loss.detach().clone())  # the global batch's mean loss
        branch.encoder_opt.zero_grad(set_to_none=True)
        branch.decoder_opt.zero_grad(set_to_none=True)
        try:
            finite = self._finite(branch, total)
            if finite:
                loss.backward()
                self.comm.sync_grads([*branch.encoder.parameters(), *branch.volume.parameters()])
                finite = self._finite(branch, total, (branch.encoder_opt, branch.decoder_opt))
        except FloatingPointError:
            self._restore_buffers(branch, buffers)
            raise
        if not finite:
            self._restore_buffers(branch, buffers)
            return math.nan
        branch.encoder_opt.step()
        branch.decoder_opt.step()
        with torch.no_grad():
            rows = torch.arange(len(indices), device=best_heads.device)
            branch.best_rotations[indices] = candidates.rotations[rows, best_heads].detach().float().cpu()
            branch.best_heads[indices] = best_heads.cpu()
            branch.head_wins += torch.bincount(best_heads.cpu(), minlength=self.config.encoder.n_heads)
            branch.epoch_gap_sum += float((all_losses.mean(dim=1) - all_losses.min(dim=1).values).sum())
        return float(total)

    def _direct_step(self, branch: Branch, indices: Tensor) -> float:
        disc = self._disc(branch.epoch)
        n_batch = len(indices)
        indices = self.comm.local(indices)  # this rank's images: its rows of the pose table
        images, observed, ctf = self._batch(indices, disc)
        table, rows = branch.pose_table, indices.to(self.device)
        render_kwargs = dict(
            pixel_size_angstrom=self.pixel_size_angstrom, ctf_values=ctf, contrast=self.config.contrast
        )
        volume_fixed = branch.volume.hartley().detach()
        omega, shifts = table.corrections(rows)
        # Shifts that are not estimated are all zero (see _switch): rendering them costs ~10%.
        use_shifts = table.estimate_shifts
        for _ in range(self.config.n_pose_steps):
            predicted = render_hartley(
                volume_fixed,
                table.compose(rows, omega),
                disc,
                shifts_angstrom=shifts if use_shifts else None,
                **render_kwargs,
            )
            # Sum, not mean: each image's gradient is then independent of the batch size.
            pose_loss = image_losses(predicted, observed, disc, self.loss_kind).sum()
            if not self._finite(branch, self.comm.sum_(pose_loss.detach().clone())):
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
        loss = self._batch_mean(image_losses(predicted, observed, disc, self.loss_kind), n_batch)
        total = self.comm.sum_(loss.detach().clone())
        branch.decoder_opt.zero_grad(set_to_none=True)
        if not self._finite(branch, total):
            return math.nan
        loss.backward()
        self.comm.sync_grads(branch.volume.parameters())
        if not self._finite(branch, total, (branch.decoder_opt,)):
            return math.nan
        branch.decoder_opt.step()
        return float(total)

    def _batch_mean(self, losses: Tensor, n_batch: int) -> Tensor:
        """This rank's share of the global batch's mean loss: its images' sum over the global batch size
        (summed over ranks, the batch mean; with one rank, the mean itself)."""
        return losses.mean() if not self.comm.active else losses.sum() / n_batch

    @staticmethod
    @torch.no_grad()
    def _restore_buffers(branch: Branch, saved: list[Tensor]) -> None:
        for buffer, value in zip(branch.encoder.buffers(), saved, strict=True):
            buffer.copy_(value)

    def _finite(self, branch: Branch, loss: Tensor, optimizers=()) -> bool:
        """True if ``loss`` (and the gradients ``optimizers`` would apply) are finite. Otherwise the
        gradients are dropped and, within ``config.nan_guard`` bad batches in a row, False (the caller
        skips the batch); beyond it, FloatingPointError, raised before any update is applied."""
        values = [loss.detach().reshape(1)]
        for opt in optimizers:
            values += [p.grad.detach().abs().sum().reshape(1) for g in opt.param_groups for p in g["params"]
                       if p.grad is not None]  # fmt: skip
        if bool(torch.isfinite(torch.cat(values)).all()):
            return True
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        what = "loss" if not torch.isfinite(loss.detach()).all() else "gradient"
        count = self._bad_in_a_row.get(branch.name, 0) + 1
        if count > self.config.nan_guard:
            guard = (
                f"nan_guard={self.config.nan_guard} allows no more in a row"
                if self.config.nan_guard
                else "set TrainingConfig.nan_guard to skip such batches"
            )
            raise FloatingPointError(
                f"{what} became {float(loss.detach())} at step {branch.step} (epoch {branch.epoch}, "
                f"branch {branch.name!r}); no update was applied from this batch ({guard})"
            )
        self._bad_in_a_row[branch.name] = count
        self._skipped_batch = True
        return False

    @torch.no_grad()
    def _candidates(self, branch: Branch, indices: Tensor, disc: FourierDisc):
        """Encoder candidates (eval mode) and their losses for ``indices``: (B,H,3,3), (B,H,2)|None, (B,H)."""
        images, observed, ctf = self._batch(indices, disc)
        branch.encoder.eval()
        cand = branch.encoder(images)
        predicted = render_hartley(
            branch.volume.hartley(),
            cand.rotations,
            disc,
            pixel_size_angstrom=self.pixel_size_angstrom,
            ctf_values=ctf,
            shifts_angstrom=cand.shifts_angstrom,
            contrast=self.config.contrast,
        )
        return cand.rotations, cand.shifts_angstrom, image_losses(predicted, observed, disc, self.loss_kind)
