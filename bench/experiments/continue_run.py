"""A kept run continued past its end: what more direct epochs would have given.

Usage::

    python bench/experiments/continue_run.py RUN_DIR DATA_DIR EPOCH N_EPOCHS

Restores RUN_DIR's checkpoint of EPOCH (with DATA_DIR's particles and ground truth) with the
run's settings but ``n_epochs = N_EPOCHS`` (the run then ends after N_EPOCHS plus its restarts'
epochs plus the extra epochs it already took, unless its re-search adds more), trains on one
thread without writing checkpoints, and prints each epoch's FSC 0.5 against the truth, pose
error mean/median, shift error and the re-search's report; at the end the share of images more
than 20° off. A run stored with ``rescue_extra_epochs`` 10 that ended stuck shows this way what
a larger limit (``rescue_extra_epochs_stuck``) gives, computation for computation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _checkpoint import restored_trainer  # noqa: E402

from cryospin_lab.analysis import metrics  # noqa: E402
from cryospin_lab.engine.events import LogEvent, PoseErrorEvent, ResolutionEvent  # noqa: E402


def main(run: Path, data: Path, epoch: int, n_epochs: int) -> None:
    torch.set_num_threads(1)
    trainer, _ = restored_trainer(run, data, epoch, threads=1, n_epochs=n_epochs, checkpoint_every=0)
    line: list[str] = []  # one line per epoch: its resolution, pose error and the re-search's report
    for event in trainer.events():
        if isinstance(event, ResolutionEvent):
            if line:
                print("  ".join(line), flush=True)
            line = [f"epoch {event.epoch}: {event.resolution_angstrom:.1f} Å"]
        elif isinstance(event, PoseErrorEvent):
            shift = event.shift_error_angstrom
            shift = "" if shift is None else f", shift error {shift:.2f} Å (mean)"
            line.append(f"pose error {event.mean_deg:.1f}° / {event.median_deg:.1f}°{shift}")
        elif isinstance(event, LogEvent):
            line.append(event.message)
    print("  ".join(line), flush=True)
    pose = metrics.pose_error(trainer.true_rotations, trainer.branch().current_rotations())
    print(f"end: {100 * np.mean(np.asarray(pose.errors_deg) > 20.0):.1f} % of the images more than 20° off")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
