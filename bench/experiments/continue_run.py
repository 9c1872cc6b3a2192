"""A kept run continued past its end: what more direct epochs would have given.

Usage::

    python bench/experiments/continue_run.py RUN_DIR DATA_DIR EPOCH N_EPOCHS [MOLECULE]

Restores RUN_DIR's checkpoint of EPOCH (with DATA_DIR's particles and ground truth) with the
run's settings but ``n_epochs = N_EPOCHS`` (the run then ends after N_EPOCHS plus its restarts'
epochs plus the extra epochs it already took, unless its re-search adds more), trains on one
thread without writing checkpoints, and prints each epoch's FSC 0.5 against the truth, pose
error mean/median (and modulo the true map's near-symmetry where it has one), shift error and
the re-search's report; at the end the share of images more than 20° off (modulo MOLECULE's
symmetry when a bundled molecule's name is given, as ``bench/suite.py`` counts it). A run stored
with ``rescue_extra_epochs`` 10 that ended stuck shows this way what a larger limit
(``rescue_extra_epochs_stuck``) gives, computation for computation.
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
from cryospin_lab.simulate.molecules import molecule  # noqa: E402


def main(run: Path, data: Path, epoch: int, n_epochs: int, name: str | None = None) -> None:
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
            modulo = ""
            if event.median_mod_sym_deg is not None:
                modulo = f"{event.mean_mod_sym_deg:.1f}° / {event.median_mod_sym_deg:.1f}°"
                modulo = f" ({modulo} modulo {event.symmetry})"
            line.append(f"pose error {event.mean_deg:.1f}° / {event.median_deg:.1f}°{modulo}{shift}")
        elif isinstance(event, LogEvent):
            line.append(event.message)
    print("  ".join(line), flush=True)
    symmetry = None if name is None else molecule(name).symmetry_rotations()
    pose = metrics.pose_error(
        trainer.true_rotations, trainer.branch().current_rotations(), symmetry_rotations=symmetry
    )
    which = "" if symmetry is None else f" modulo {name}'s symmetry"
    share = 100 * np.mean(np.asarray(pose.errors_deg) > 20.0)
    print(f"end: {share:.1f} % of the images more than 20° off{which} (median {pose.median_deg:.1f}°)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:6])
