"""How near the truth are the amortized stage's shifts? Each image's best candidate at kept checkpoints.

Usage::

    python bench/experiments/amortized_shift_error.py RUN_DIR DATA_DIR EPOCH [EPOCH ...]

At each EPOCH's checkpoint of RUN_DIR: every image's best candidate (rotation and shift) from the
encoder on that epoch's disc, and against DATA_DIR's true shifts (pixels): the median distance, the
median of zero shifts' (each true shift's length), the spread of the estimates, and the correlation
of each axis with the truth (0: the heads' shifts say nothing about the particle's position). The
map's own translation is not removed: on the plateau it is not defined. One thread.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _checkpoint import restored_trainer  # noqa: E402

from cryospin_lab.engine.steps import best_candidates  # noqa: E402


def main(run: Path, data: Path, epochs: list[int]) -> None:
    torch.set_num_threads(1)
    for epoch in epochs:
        trainer, stack = restored_trainer(run, data, epoch, threads=1)
        branch, feed = trainer.branch("main"), trainer.feed
        n = len(feed)
        with torch.no_grad():
            _, shifts = best_candidates(
                trainer.step_context, branch, torch.arange(n), n, feed.disc(branch.schedule_epoch)
            )
        apix = trainer.step_context.pixel_size_angstrom
        truth, estimate = stack.metadata.shifts_angstrom.numpy() / apix, shifts.numpy() / apix
        error = np.median(np.linalg.norm(truth - estimate, axis=1))
        zero = np.median(np.linalg.norm(truth, axis=1))
        corr = [np.corrcoef(truth[:, i], estimate[:, i])[0, 1] for i in (0, 1)]
        spread = estimate.std(axis=0)
        print(
            f"{run.name} epoch {epoch}: median error {error:.2f} px (zero shifts {zero:.2f}), "
            f"estimates' spread x {spread[0]:.2f} y {spread[1]:.2f} px, "
            f"correlation with the truth x {corr[0]:.2f} y {corr[1]:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), [int(e) for e in sys.argv[3:]])
