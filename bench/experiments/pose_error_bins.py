"""Where a kept run's poses sit: the share of images in bands of pose error at chosen checkpoints.

Usage::

    python bench/experiments/pose_error_bins.py RUN_DIR DATA_DIR EPOCH [EPOCH ...]

At each EPOCH's checkpoint of RUN_DIR: each image's current pose (best candidate before the switch,
the pose table after) against DATA_DIR's true poses, after the best global rotation and hand
(``metrics.pose_error``), as shares of the images within 20°, 20-60°, 60-120°, 120-160° and
160-180°. Stranded images near 180° sit on a mate across a pseudo-two-fold; spread ones were never
placed. Two threads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _checkpoint import restored_trainer  # noqa: E402

from cryospin_lab.analysis import metrics  # noqa: E402

EDGES = [0, 20, 60, 120, 160, 180.1]


def main(run: Path, data: Path, epochs: list[int]) -> None:
    print("epoch  " + "  ".join(f"{a:g}-{min(b, 180):g}°" for a, b in zip(EDGES, EDGES[1:], strict=False)))
    for epoch in epochs:
        trainer, _ = restored_trainer(run, data, epoch, threads=2)
        pose = metrics.pose_error(trainer.true_rotations, trainer.branch().current_rotations())
        counts, _ = np.histogram(np.asarray(pose.errors_deg), bins=EDGES)
        print(f"{epoch:5d}  " + "  ".join(f"{100 * c / counts.sum():6.1f} %" for c in counts), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), [int(e) for e in sys.argv[3:]])
