"""Which re-search criterion frees stranded images? The shipped one against a grid-to-grid one.

Usage::

    python bench/experiments/rescue_criteria.py RUN_DIR DATA_DIR EPOCH MOLECULE [FRACTIONS] [NSIDE]

``RUN_DIR`` is a ``cryospin-lab reconstruct`` folder (e.g. from ``bench/suite.py``) of the
simulated set ``DATA_DIR`` with ``checkpoints/epoch_EPOCH.pt`` in the direct stage. On that
checkpoint, once per coarse-disc fraction (``0.25,0.4``) and HEALPix ``NSIDE`` (4): every image
is scored on the re-search's grid, and moved (a) as the engine does, when the best grid rotation
more than two spacings away beats the image's own, refined, pose, or (b) when it beats the best
grid rotation within two spacings (both unrefined, so the comparison is even). Prints how many
move, and, against the truth (modulo the molecule's symmetry), the share of the stranded
images (> 20° off) each frees and the share of the others each sends astray. Two threads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from _checkpoint import restored_trainer

from cryospin_lab.analysis import metrics
from cryospin_lab.analysis.pose_grid import grid_losses, grid_slices
from cryospin_lab.analysis.pose_posterior import healpix_rotations
from cryospin_lab.physics.projection import FourierDisc, max_disc_radius
from cryospin_lab.physics.render import LossKind, image_losses, render_hartley
from cryospin_lab.simulate import molecule


def main() -> int:
    run, data, epoch, name = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    fractions = [float(x) for x in sys.argv[5].split(",")] if len(sys.argv) > 5 else [0.25, 0.4]
    nside = int(sys.argv[6]) if len(sys.argv) > 6 else 4
    print(f"# {' '.join(sys.argv)}")
    torch.set_num_threads(2)
    symmetry = molecule(name).symmetry_rotations()
    trainer, stack = restored_trainer(run, data, epoch, threads=2)
    config = trainer.config
    branch, feed = trainer.branch(), trainer.feed
    table, truth = branch.pose_table, trainer.true_rotations
    rotations, shifts = table.rotations.clone(), table.shifts_angstrom.clone()

    def errors(poses):
        return np.asarray(metrics.pose_error(truth, poses, symmetry_rotations=symmetry).errors_deg)

    stranded = errors(rotations) > 20
    print(f"epoch {epoch}: {100 * stranded.mean():.1f} % of the images more than 20° off")
    grid = healpix_rotations(nside, 6 * nside, dtype=torch.float32).reshape(-1, 3, 3)
    spacing = 2 * 58.6 / nside  # the engine's jump: two mean HEALPix spacings
    volume = branch.volume.hartley().detach()
    render = dict(pixel_size_angstrom=stack.pixel_size_angstrom, contrast=config.contrast)
    for fraction in fractions:
        disc = FourierDisc.make(feed.box_size, max(2.0, fraction * max_disc_radius(feed.box_size)))
        slices = grid_slices(volume, grid, disc)
        squared = slices * slices
        moved_shipped, moved_even = rotations.clone(), rotations.clone()
        for lo in range(0, len(rotations), 512):
            idx = torch.arange(lo, min(lo + 512, len(rotations)))
            _, observed, ctf = feed.batch(idx, disc)
            own_shifts = shifts[idx] if table.estimate_shifts else None
            losses = grid_losses(slices, observed, disc, ctf_values=ctf, shifts_angstrom=own_shifts,
                                 squared_slices=squared, **render)  # fmt: skip
            cos = ((rotations[idx].reshape(-1, 9) @ grid.reshape(-1, 9).T) - 1) / 2
            near = torch.rad2deg(torch.arccos(cos.clamp(-1, 1))) <= spacing
            far_best, far_at = losses.masked_fill(near, float("inf")).min(1)
            near_best = losses.masked_fill(~near, float("inf")).min(1).values
            own = image_losses(
                render_hartley(volume, rotations[idx], disc, ctf_values=ctf, shifts_angstrom=own_shifts,
                               **render), observed, disc, LossKind.L2,
            )  # fmt: skip
            for moved, better in ((moved_shipped, far_best < own), (moved_even, far_best < near_best)):
                moved[idx[better]] = grid[far_at[better]]
        for label, moved in (("own pose vs grid (shipped)", moved_shipped), ("grid vs grid", moved_even)):
            after = errors(moved)
            n_moved = int((moved != rotations).flatten(1).any(1).sum())
            freed, astray = np.mean(after[stranded] <= 20), np.mean(after[~stranded] > 20)
            print(
                f"disc {fraction} nside {nside} {label}: moved {n_moved}, > 20° after "
                f"{100 * np.mean(after > 20):.1f} % (stranded freed {100 * freed:.1f} %, "
                f"others sent astray {100 * astray:.2f} %)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
