"""The share of stranded images at each kept checkpoint of a run, with the run's re-search reports.

Usage::

    python bench/experiments/stranded_by_epoch.py RUN_DIR DATA_DIR MOLECULE

For each ``RUN_DIR/checkpoints/epoch_*.pt`` whose branch has a pose table (the direct stage):
the pose error of every image against the truth in ``DATA_DIR/particles.star``, modulo the
molecule's symmetry (its near-symmetries included where the suite lists them, as
``bench/suite.py`` does), and the share more than 20° off; with the images that became wrong
and those that became right since the previous checkpoint, and the re-search lines of
``events.jsonl`` logged at that epoch; with estimated shifts, the median shift error (the map's
translation removed) of the stranded images and of the others. Shows how a run's stranded
images are rescued (or sent astray) epoch by epoch, which the suite's end-of-run figure hides.
One thread.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from cryospin_lab.analysis import metrics
from cryospin_lab.engine.run_state import read_run
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.simulate import molecule

STRANDED_DEG = 20.0  # an image this far from its true pose (modulo symmetry) is stranded


def research_messages(events: Path) -> dict[int, list[str]]:
    """The re-search log lines of a run's ``events.jsonl``, by epoch."""
    by_epoch: dict[int, list[str]] = {}
    for line in events.read_text().splitlines():
        fields = json.loads(line).get("fields", {})
        message = str(fields.get("message", ""))
        if "re-search" in message:
            by_epoch.setdefault(int(fields.get("epoch", -1)), []).append(message.split(";")[0])
    return by_epoch


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__)
        return 2
    run, data, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    print(f"# {' '.join(sys.argv)}")
    torch.set_num_threads(1)
    metadata = ParticleStack(data / "particles.star").metadata
    truth = torch.as_tensor(metadata.rotations, dtype=torch.float64)
    true_shifts = torch.as_tensor(metadata.shifts_angstrom, dtype=torch.float64)
    symmetry = molecule(name).symmetry_rotations()
    messages = research_messages(run / "events.jsonl")
    previous = None
    for path in sorted((run / "checkpoints").glob("epoch_*.pt")):
        saved = read_run(path)
        state = saved.branches[0] if saved.branches else saved.finished[0]
        if state["pose_table"] is None:
            continue  # amortized: no per-image poses kept
        epoch = int(path.stem.split("_")[1])
        rotations = state["pose_table"]["rotations"].double()
        errors = np.asarray(metrics.pose_error(truth, rotations, symmetry_rotations=symmetry).errors_deg)
        stranded = errors > STRANDED_DEG
        change = ""
        if previous is not None:
            worse, better = int((stranded & ~previous).sum()), int((~stranded & previous).sum())
            change = f"; newly stranded {worse}, rescued {better}"
        shifts = state["pose_table"]["shifts_angstrom"].double()
        if bool(shifts.abs().max() > 0):  # estimated: their error (the map's translation removed)
            off = np.asarray(metrics.shift_error_angstrom(true_shifts, shifts, rotations).errors_angstrom)
            change += (
                f"; shift error median {np.median(off[stranded]):.2f} Å stranded, "
                f"{np.median(off[~stranded]):.2f} Å others"
            )
        said = " | ".join(messages.get(epoch, []))
        print(
            f"epoch {epoch}: {100 * stranded.mean():.1f} % > {STRANDED_DEG:.0f}°{change}"
            + (f" | {said}" if said else "")
        )
        previous = stranded
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
