"""Do stranded images prefer their true pose under a map that was not trained on them?

Usage::

    python bench/experiments/rescue_halfmap.py RUN_DIR DATA_DIR EPOCH MOLECULE \
        [STEPS] [ROUNDS] [LAMBDA] [TOPK]

The run's own map co-adapts to every image's current pose (the images trained it), so at that
map an image's current pose is favoured over any other, the true one included
(``rescue_refined.py``). Here the set is split into halves (even and odd images); each half's
map is reconstructed from that half's current poses alone by CTF-weighted back-projection
(the adjoint of the renderer: ``sum P^T CTF y / (sum P^T CTF^2 + lambda)``, one pass), and each
image is judged under the *other* half's map: its own pose, its ``TOPK`` (3) best grid rotations in
other basins (coarse disc, HEALPix nside 4) and, as an oracle, its true pose, each refined by
``STEPS`` (10) pose steps on the run's current disc. The image moves to the best candidate
where it beats its own pose (``LAMBDA``, 0.1: the regulariser as a share of the mean
weight). ``ROUNDS`` (3) such rounds, each with maps rebuilt from the moved
poses. Prints, against the truth (modulo the molecule's symmetry), the share more than 20° off
after each round, what each round freed and sent astray, and how often the true pose beats the
stranded one under the other half's map. Two threads.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from _checkpoint import restored_trainer

from cryospin_lab.analysis import metrics
from cryospin_lab.analysis.pose_grid import grid_losses, grid_slices
from cryospin_lab.analysis.pose_posterior import healpix_rotations
from cryospin_lab.engine.rescue import RESCUE_RADIUS_FRACTION, refine_poses
from cryospin_lab.physics import so3
from cryospin_lab.physics.projection import FourierDisc, max_disc_radius
from cryospin_lab.physics.render import backproject_hartley
from cryospin_lab.simulate import molecule

_CHUNK = 512


def backproject(shape, feed, rows, rotations, disc, render, lam):
    """The half map from ``rows`` at ``rotations``: CTF-weighted back-projection, Wiener-regularised."""
    numerator, weights = torch.zeros(shape), torch.zeros(shape)
    for lo in range(0, len(rows), _CHUNK):
        idx = rows[lo : lo + _CHUNK]
        _, observed, ctf = feed.batch(idx, disc)
        data, weight = backproject_hartley(shape, rotations[idx], disc, observed, ctf_values=ctf, **render)
        numerator += data
        weights += weight
    return numerator / (weights + lam * weights[weights > 0].mean())


def main() -> int:
    run, data, epoch, name = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    n_steps = int(sys.argv[5]) if len(sys.argv) > 5 else 10
    rounds = int(sys.argv[6]) if len(sys.argv) > 6 else 3
    lam = float(sys.argv[7]) if len(sys.argv) > 7 else 0.1
    top_k = int(sys.argv[8]) if len(sys.argv) > 8 else 3
    print(f"# {' '.join(sys.argv)}")
    torch.set_num_threads(2)
    symmetry = molecule(name).symmetry_rotations()
    trainer, stack = restored_trainer(run, data, epoch, threads=2)
    config = trainer.config
    branch, feed = trainer.branch(), trainer.feed
    if branch.pose_table.estimate_shifts:
        raise SystemExit("shifts are not handled here")
    truth = trainer.true_rotations
    rotations = branch.pose_table.rotations.clone()
    fit = metrics.pose_error(truth, rotations, symmetry_rotations=symmetry)
    oracle = truth.double() @ fit.global_rotation
    oracle = (so3.flip_handedness(oracle) if fit.flipped else oracle).float()

    def errors(poses):
        return np.asarray(metrics.pose_error(truth, poses, symmetry_rotations=symmetry).errors_deg)

    nside = config.rescue_nside
    grid = healpix_rotations(nside, 6 * nside, dtype=torch.float32).reshape(-1, 3, 3)
    spacing = 2 * 58.6 / nside
    shape = branch.volume.hartley().shape
    render = dict(pixel_size_angstrom=stack.pixel_size_angstrom, contrast=config.contrast)
    coarse = FourierDisc.make(
        feed.box_size, max(2.0, RESCUE_RADIUS_FRACTION * max_disc_radius(feed.box_size))
    )
    fine = feed.disc(branch.schedule_epoch)
    n = len(rotations)
    halves = [torch.arange(0, n, 2), torch.arange(1, n, 2)]
    before = errors(rotations)
    print(
        f"epoch {epoch}: {100 * np.mean(before > 20):.1f} % more than 20° off; lambda {lam}, {n_steps} steps"
    )
    for round_ in range(1, rounds + 1):
        t0 = time.perf_counter()
        stranded = errors(rotations) > 20
        maps = [backproject(shape, feed, h, rotations, fine, render, lam) for h in halves]
        new = rotations.clone()
        truth_wins = np.zeros(n, dtype=bool)
        for half, other_map in ((halves[0], maps[1]), (halves[1], maps[0])):
            slices = grid_slices(other_map, grid, coarse)
            for lo in range(0, len(half), _CHUNK):
                idx = half[lo : lo + _CHUNK]
                _, observed, ctf = feed.batch(idx, coarse)
                losses = grid_losses(slices, observed, coarse, ctf_values=ctf, **render)
                near = so3.geodesic_angle_deg(rotations[idx][:, None], grid[None]) <= spacing
                candidates = []
                for _ in range(top_k):
                    best_at = losses.masked_fill(near, float("inf")).argmin(1)
                    candidates.append(grid[best_at])
                    near |= so3.geodesic_angle_deg(grid[best_at][:, None], grid[None]) <= spacing
                _, observed, ctf = feed.batch(idx, fine)
                starts = torch.cat([rotations[idx], *candidates, oracle[idx]])
                k = len(starts) // len(idx)
                refined, _, final = refine_poses(
                    other_map, starts, fine, observed.repeat(k, 1), ctf_values=ctf.repeat(k, 1),
                    shifts_angstrom=None, steps=n_steps, lr=config.pose_lr, render=render,
                )  # fmt: skip
                final, refined = final.reshape(k, -1), refined.reshape(k, -1, 3, 3)
                truth_wins[idx.numpy()] = (final[-1] < final[0]).numpy()
                best, which = final[1:-1].min(0)
                better = best < final[0]
                winner = refined[1:-1][which, torch.arange(len(idx))]
                new[idx] = torch.where(better[:, None, None], winner, rotations[idx])
        after = errors(new)
        moved = int((so3.geodesic_angle_deg(new, rotations) > 20).sum())
        print(
            f"round {round_}: moved {moved}, > 20° after {100 * np.mean(after > 20):.1f} % (stranded freed "
            f"{100 * np.mean(after[stranded] <= 20):.1f} %, others sent astray "
            f"{100 * np.mean(after[~stranded] > 20):.2f} %); the true pose beats the current one under "
            f"the other half's map for {100 * np.mean(truth_wins[stranded]):.1f} % of the stranded "
            f"({100 * np.mean(truth_wins[~stranded]):.1f} % of the others); {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        rotations = new
    return 0


if __name__ == "__main__":
    sys.exit(main())
