"""How much better does a moved image fit under the other half's map: rescues against coin tosses.

Usage::

    python bench/experiments/halfmap_margins.py RUN_DIR DATA_DIR EPOCH MOLECULE

Restores the run at its checkpoint of ``EPOCH`` (a direct-stage epoch) and makes the engine's
re-search under the half maps (``rescue.better_poses(..., halfmaps=True)``, the run's own
settings), recording each image's refined loss at its own pose and at its candidate under the
other half's map. For the images that would move, against the truth modulo the molecule's
symmetry (near-symmetries included where the suite lists them): *rescued* (more than 20° off
before, within 20° after), *astray* (the reverse), *within* (within 20° before and after: a move
across a symmetry the truth does not tell apart, or inside the basin) and *still wrong*. Prints
each group's count and the quantiles of its relative gain ``(own - candidate) / own``: a margin
on that gain could keep the coin tosses from moving while the rescues still move. Two threads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from _checkpoint import restored_trainer

from cryospin_lab.analysis import metrics
from cryospin_lab.engine import rescue
from cryospin_lab.simulate import molecule


def main() -> int:
    run, data, epoch, name = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    print(f"# {' '.join(sys.argv)}")
    torch.set_num_threads(2)
    symmetry = molecule(name).symmetry_rotations()
    trainer, _ = restored_trainer(run, data, epoch, threads=2)
    branch, ctx = trainer.branch(), trainer.step_context
    truth = trainer.true_rotations
    current = branch.pose_table.rotations.clone()
    calls = []
    real = rescue.refine_poses

    def recording(*args, **kwargs):
        refined, shifts, final = real(*args, **kwargs)
        calls.append((refined, final))
        return refined, shifts, final

    rescue.refine_poses = recording
    rescue.better_poses(ctx, branch, trainer.config.rescue_nside, halfmaps=True)
    rows = torch.cat([chunk for half in rescue._halves(ctx, branch) for chunk in half.split(rescue._CHUNK)])
    own = torch.cat([final[: len(final) // 2] for _, final in calls])
    candidate = torch.cat([final[len(final) // 2 :] for _, final in calls])
    moved_to = torch.cat([refined[len(refined) // 2 :] for refined, _ in calls])
    gain = np.asarray((own - candidate) / own)
    moved = gain > 0
    after = current.clone()
    after[rows[torch.as_tensor(moved)]] = moved_to[torch.as_tensor(moved)]

    def errors(poses):
        return np.asarray(metrics.pose_error(truth, poses, symmetry_rotations=symmetry).errors_deg)

    before_err, after_err = errors(current)[rows.numpy()], errors(after)[rows.numpy()]
    share = 100 * np.mean(before_err > 20)
    print(f"epoch {epoch}: {share:.1f} % more than 20° off; {int(moved.sum())} would move")
    groups = {
        "rescued": (before_err > 20) & (after_err <= 20),
        "astray": (before_err <= 20) & (after_err > 20),
        "within": (before_err <= 20) & (after_err <= 20),
        "still wrong": (before_err > 20) & (after_err > 20),
    }
    for label, members in groups.items():
        g = gain[moved & members]
        quantiles = (
            "" if len(g) == 0 else " ".join(f"{q:.2e}" for q in np.quantile(g, [0.1, 0.25, 0.5, 0.75, 0.9]))
        )
        print(f"{label:>11}: {len(g):5d} moved; relative gain 10/25/50/75/90 %: {quantiles}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
