"""The direct stage's pose table: row-wise Adam against torch's Adam, steps and folds per row."""

from __future__ import annotations

import pytest
import torch

from cryospin_lab.model.pose_table import PoseTable, RowAdam
from cryospin_lab.physics import so3

from helpers import (
    assert_orthonormal,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_row_adam_matches_torch_adam_per_row():
    """Each row steps like its own ``torch.optim.Adam`` that is stepped only when the row is in a batch."""
    n_rows, n_cols, lr, betas = 6, 3, 0.05, (0.9, 0.9)
    gen = torch.Generator().manual_seed(3)
    initial = torch.randn(n_rows, n_cols, generator=gen)
    row_adam = RowAdam(n_rows, n_cols, lr, betas)
    params = initial.clone()
    reference = [torch.nn.Parameter(initial[i].clone()) for i in range(n_rows)]
    optimizers = [torch.optim.Adam([p], lr=lr, betas=betas, eps=1e-8) for p in reference]
    batches = [[0, 2, 3], [2, 4], [0, 2, 3], [5], [3, 0], [2]]
    for batch in batches:
        rows = torch.tensor(batch)
        grads = torch.randn(len(batch), n_cols, generator=gen)
        untouched = [i for i in range(n_rows) if i not in batch]
        moments = (row_adam.exp_avg[untouched].clone(), row_adam.exp_avg_sq[untouched].clone())
        params[rows] = row_adam.step(rows, params[rows], grads)
        for k, i in enumerate(batch):
            reference[i].grad = grads[k].clone()
            optimizers[i].step()
        expected = torch.stack([p.detach() for p in reference])
        torch.testing.assert_close(params, expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(row_adam.exp_avg[untouched], moments[0], atol=0, rtol=0)
        torch.testing.assert_close(row_adam.exp_avg_sq[untouched], moments[1], atol=0, rtol=0)
    counts = torch.tensor([sum(i in b for b in batches) for i in range(n_rows)], dtype=torch.float32)
    torch.testing.assert_close(row_adam.steps, counts)
    assert row_adam.steps[1] == 0
    torch.testing.assert_close(params[1], initial[1], atol=0, rtol=0)  # never in a batch: never moved


def test_pose_table_step_and_fold_leave_other_rows_alone():
    """``apply_step`` + ``fold`` on a batch: other rows' rotations and Adam moments stay bit-identical."""
    n = 8
    base = so3.random_rotations(n, generator=torch.Generator().manual_seed(5)).float()
    table = PoseTable(base, None, lr=0.05, betas=(0.9, 0.9))
    rows = torch.tensor([1, 4, 6])
    others = torch.tensor([0, 2, 3, 5, 7])
    omega, shifts = table.corrections(rows)
    target = so3.random_rotations(3, generator=torch.Generator().manual_seed(6)).float()
    for _ in range(5):
        loss = ((table.compose(rows, omega) - target) ** 2).sum()
        loss.backward()
        omega, shifts = table.apply_step(rows, omega, shifts)
    table.fold(rows, omega, shifts)
    torch.testing.assert_close(table.rotations[others], base[others], atol=0, rtol=0)
    assert (table.rotation_adam.exp_avg[others] == 0).all() and (table.rotation_adam.steps[others] == 0).all()
    assert not torch.allclose(table.rotations[rows], base[rows])
    assert_orthonormal(table.rotations)
