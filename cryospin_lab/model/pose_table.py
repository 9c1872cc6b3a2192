"""Per-image pose parameters of the direct stage (docs/method.md §5, paper Eq. 9).

Each image owns a base rotation ``R_i`` and a tangent correction ``w_i``
(axis-angle, radians): ``R = exp([w_i]x) R_i``. A pose block runs a few Adam
steps on the ``w`` (and shifts) of one batch, then folds ``w`` into the base
and resets it to zero, so every update starts at ``w = 0`` where the Taylor
branch of :func:`~cryospin_lab.physics.so3.exp_so3` keeps the gradient exact.

Adam is applied row by row (:class:`RowAdam`): only the rows of the current
batch are updated and their moments advanced. ``torch.optim.Adam`` on the whole
``(N, 3)`` table would keep moving rows that are not in the batch (their
momentum is non-zero while their gradient is zero) and would cost O(N) per
step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cryospin_lab.physics.so3 import exp_so3

__all__ = ["RowAdam", "PoseTable"]


class RowAdam:
    """Adam with one moment pair and one step count per table row.

    ``step(rows, params, grads)`` returns the updated ``params`` of ``rows``.
    The moments are tensors in :meth:`state_dict` (checkpointable with
    ``weights_only=True``).
    """

    def __init__(
        self, n_rows: int, n_cols: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, device=None
    ):
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.exp_avg = torch.zeros(n_rows, n_cols, device=device)
        self.exp_avg_sq = torch.zeros(n_rows, n_cols, device=device)
        self.steps = torch.zeros(n_rows, device=device)

    def step(self, rows: Tensor, params: Tensor, grads: Tensor) -> Tensor:
        b1, b2 = self.betas
        m = self.exp_avg[rows] * b1 + grads * (1 - b1)
        v = self.exp_avg_sq[rows] * b2 + grads * grads * (1 - b2)
        t = self.steps[rows] + 1
        self.exp_avg[rows], self.exp_avg_sq[rows], self.steps[rows] = m, v, t
        m_hat = m / (1 - b1**t)[:, None]
        v_hat = v / (1 - b2**t)[:, None]
        return params - self.lr * m_hat / (v_hat.sqrt() + self.eps)

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps, "lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        self.exp_avg = state["exp_avg"].to(self.exp_avg.device)
        self.exp_avg_sq = state["exp_avg_sq"].to(self.exp_avg.device)
        self.steps = state["steps"].to(self.exp_avg.device)
        self.lr = float(state["lr"])


class PoseTable:
    """Base rotations ``(N, 3, 3)`` and shifts ``(N, 2)`` (Å) of every image, with row-wise Adam."""

    def __init__(
        self,
        rotations: Tensor,
        shifts_angstrom: Tensor | None,
        *,
        lr: float = 0.05,
        betas=(0.9, 0.9),
        shift_lr_angstrom: float = 0.5,
        estimate_shifts: bool = False,
    ):
        self.rotations = rotations.detach().clone().float()
        n = self.rotations.shape[0]
        device = self.rotations.device
        self.shifts_angstrom = (
            torch.zeros(n, 2, device=device)
            if shifts_angstrom is None
            else shifts_angstrom.detach().clone().float()
        )
        self.estimate_shifts = estimate_shifts
        self.rotation_adam = RowAdam(n, 3, lr, betas, device=device)
        self.shift_adam = RowAdam(n, 2, shift_lr_angstrom, betas, device=device)

    def __len__(self) -> int:
        return self.rotations.shape[0]

    def corrections(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Fresh leaf tensors ``w`` (B, 3) = 0 and shifts (B, 2) to optimise for ``rows``."""
        omega = torch.zeros(len(rows), 3, device=self.rotations.device, requires_grad=True)
        shifts = self.shifts_angstrom[rows].clone().requires_grad_(self.estimate_shifts)
        return omega, shifts

    def compose(self, rows: Tensor, omega: Tensor) -> Tensor:
        """``exp([w]x) R_base`` for ``rows`` (differentiable in ``omega``)."""
        return exp_so3(omega) @ self.rotations[rows]

    def apply_step(self, rows: Tensor, omega: Tensor, shifts: Tensor) -> tuple[Tensor, Tensor]:
        """One Adam step on the batch's corrections; returns new leaf tensors."""
        with torch.no_grad():
            new_omega = self.rotation_adam.step(rows, omega, omega.grad)
            new_shifts = shifts
            if self.estimate_shifts and shifts.grad is not None:
                new_shifts = self.shift_adam.step(rows, shifts, shifts.grad)
        return new_omega.requires_grad_(True), new_shifts.detach().requires_grad_(self.estimate_shifts)

    def fold(self, rows: Tensor, omega: Tensor, shifts: Tensor) -> None:
        """Fold ``w`` into the base rotations (and store shifts); ``w`` restarts at 0 next block."""
        with torch.no_grad():
            rot = exp_so3(omega.detach()) @ self.rotations[rows]
            # Re-orthonormalise (SVD) so float32 round-off doesn't accumulate over thousands of folds.
            u, _, vt = torch.linalg.svd(rot)
            self.rotations[rows] = u @ vt
            self.shifts_angstrom[rows] = shifts.detach()

    def reset_rows(self, rows: Tensor, rotations: Tensor, shifts_angstrom: Tensor | None = None) -> None:
        """New base rotations (and shifts, if given) for ``rows`` (a pose found elsewhere), their
        moments restarted."""
        with torch.no_grad():
            self.rotations[rows] = rotations.to(self.rotations)
            adams = [self.rotation_adam]
            if shifts_angstrom is not None:
                self.shifts_angstrom[rows] = shifts_angstrom.to(self.shifts_angstrom)
                adams.append(self.shift_adam)
            for adam in adams:
                adam.exp_avg[rows], adam.exp_avg_sq[rows], adam.steps[rows] = 0.0, 0.0, 0.0

    def state_dict(self) -> dict:
        return {
            "rotations": self.rotations,
            "shifts_angstrom": self.shifts_angstrom,
            "rotation_adam": self.rotation_adam.state_dict(),
            "shift_adam": self.shift_adam.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.rotations = state["rotations"].to(self.rotations.device)
        self.shifts_angstrom = state["shifts_angstrom"].to(self.rotations.device)
        self.rotation_adam.load_state_dict(state["rotation_adam"])
        self.shift_adam.load_state_dict(state["shift_adam"])
