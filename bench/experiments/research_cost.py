"""The plain re-search's time with and without the shift search, from one kept direct checkpoint.

Usage::

    python bench/experiments/research_cost.py RUN_DIR DATA_DIR EPOCH [STEP_PX ...]

Restores RUN_DIR's checkpoint of EPOCH (a direct-stage one of a run with estimated shifts), then
times ``rescue.better_poses`` (nothing is changed) three times for each ``rescue_shift_step_px``
(default 0 and 2) and prints the median and how many images it would move. One thread.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _checkpoint import restored_trainer  # noqa: E402

from cryospin_lab.engine import rescue  # noqa: E402


def main() -> int:
    if len(sys.argv) < 4:
        print(__doc__)
        return 2
    run, data, epoch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    steps = [float(v) for v in sys.argv[4:]] or [0.0, 2.0]
    torch.set_num_threads(1)
    trainer, _ = restored_trainer(run, data, epoch, threads=1, ground_truth=False)
    branch = trainer.branches[0]
    print(f"# {' '.join(sys.argv)}")
    for step in steps:
        ctx = dataclasses.replace(
            trainer.step_context, config=dataclasses.replace(trainer.config, rescue_shift_step_px=step)
        )
        times, moved = [], 0
        for _ in range(3):
            t0 = time.perf_counter()
            rows, _, _ = rescue.better_poses(ctx, branch, trainer.config.rescue_nside)
            times.append(time.perf_counter() - t0)
            moved = len(rows)
        n = len(branch.pose_table)
        print(f"step {step:g} px: {statistics.median(times):.2f} s for {n} images, would move {moved}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
