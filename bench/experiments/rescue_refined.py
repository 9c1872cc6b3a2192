"""Does refining the far candidate before comparing free the images the shipped re-search leaves?

Usage::

    python bench/experiments/rescue_refined.py RUN_DIR DATA_DIR EPOCH MOLECULE [STEPS] [TOPK]

``RUN_DIR`` is a ``cryospin-lab reconstruct`` folder of the simulated set ``DATA_DIR`` with
``checkpoints/epoch_EPOCH.pt`` in the direct stage. On that checkpoint every image is scored on
the re-search's grid (coarse disc, HEALPix nside 4) and its ``TOPK`` (1) best grid rotations more
than two spacings from its pose (each further than two spacings from the ones before) are taken
as candidates. Then (a) the shipped rule: move where the best candidate, unrefined, beats the
image's own pose on the coarse disc; (b) the refined rule: the image's own pose and every
candidate take ``STEPS`` (30) row-wise Adam steps on the run's current disc with the map fixed
(the direct stage's pose steps, fresh moments, the rate decaying to a twentieth; the best pose
along the way kept), and the image moves to the best refined candidate
where it beats its own refined pose there. Prints, against the truth (modulo the molecule's
symmetry), how many each rule moves, the share of the stranded images (> 20° off) it frees and
the share of the others it sends astray, and the refined rule's cost. Two threads.
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
from cryospin_lab.physics.render import LossKind, image_losses, render_hartley
from cryospin_lab.simulate import molecule


def main() -> int:
    run, data, epoch, name = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    n_steps = int(sys.argv[5]) if len(sys.argv) > 5 else 30
    top_k = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    print(f"# {' '.join(sys.argv)}")
    torch.set_num_threads(2)
    symmetry = molecule(name).symmetry_rotations()
    trainer, stack = restored_trainer(run, data, epoch, threads=2)
    config = trainer.config
    branch, feed = trainer.branch(), trainer.feed
    table, truth = branch.pose_table, trainer.true_rotations
    rotations = table.rotations.clone()
    shifts = table.shifts_angstrom.clone() if table.estimate_shifts else None

    def errors(poses):
        return np.asarray(metrics.pose_error(truth, poses, symmetry_rotations=symmetry).errors_deg)

    fit = metrics.pose_error(truth, rotations, symmetry_rotations=symmetry)
    stranded = np.asarray(fit.errors_deg) > 20
    deciles = np.percentile(np.asarray(fit.errors_deg)[stranded], [10, 25, 50, 75, 90]).round(1)
    print("stranded errors (deg) quartiles:", deciles)
    # The truth in the run's frame: R_gt ~ F(R_est) G^T, so R_est = F(R_gt G).
    oracle = truth.double() @ fit.global_rotation
    if fit.flipped:
        oracle = so3.flip_handedness(oracle)
    oracle = oracle.float()
    print(f"epoch {epoch}: {100 * stranded.mean():.1f} % of the images more than 20° off")
    nside = config.rescue_nside
    grid = healpix_rotations(nside, 6 * nside, dtype=torch.float32).reshape(-1, 3, 3)
    spacing = 2 * 58.6 / nside
    volume = branch.volume.hartley().detach()
    render = dict(pixel_size_angstrom=stack.pixel_size_angstrom, contrast=config.contrast)
    coarse_radius = max(2.0, RESCUE_RADIUS_FRACTION * max_disc_radius(feed.box_size))
    coarse = FourierDisc.make(feed.box_size, coarse_radius)
    fine = feed.disc(branch.schedule_epoch)
    print(f"coarse disc radius {coarse.radius:.1f}, refinement disc radius {fine.radius:.1f} px")
    slices = grid_slices(volume, grid, coarse)
    moved_shipped, moved_refined = rotations.clone(), rotations.clone()
    gain_coarse, gain_fine = np.zeros(len(rotations)), np.zeros(len(rotations))
    oracle_gain, oracle_drift = np.zeros(len(rotations)), np.zeros(len(rotations))
    t0 = time.perf_counter()
    for lo in range(0, len(rotations), 512):
        idx = torch.arange(lo, min(lo + 512, len(rotations)))
        own_shifts = shifts[idx] if shifts is not None else None
        _, observed, ctf = feed.batch(idx, coarse)
        losses = grid_losses(slices, observed, coarse, ctf_values=ctf, shifts_angstrom=own_shifts, **render)
        own = image_losses(
            render_hartley(volume, rotations[idx], coarse, ctf_values=ctf, shifts_angstrom=own_shifts,
                           **render), observed, coarse, LossKind.L2,
        )  # fmt: skip
        taken = rotations[idx]
        candidates = []
        for _ in range(top_k):
            cos = ((taken.reshape(-1, 9) @ grid.reshape(-1, 9).T) - 1) / 2
            near = torch.rad2deg(torch.arccos(cos.clamp(-1, 1))) <= spacing
            for earlier in candidates:
                cos = ((earlier.reshape(-1, 9) @ grid.reshape(-1, 9).T) - 1) / 2
                near |= torch.rad2deg(torch.arccos(cos.clamp(-1, 1))) <= spacing
            best, at = losses.masked_fill(near, float("inf")).min(1)
            if not candidates:
                better = best < own
                moved_shipped[idx[better]] = grid[at[better]]
                gain_coarse[idx.numpy()] = (own - best).numpy()
            candidates.append(grid[at])
        _, observed, ctf = feed.batch(idx, fine)
        n = len(idx)
        starts = torch.cat([rotations[idx], *candidates, oracle[idx]])
        repeat = 2 + top_k
        ctf_r = ctf.repeat(repeat, *([1] * (ctf.ndim - 1))) if ctf is not None else None
        sh_r = own_shifts.repeat(repeat, 1) if own_shifts is not None else None
        refined, _, final = refine_poses(
            volume, starts, fine, observed.repeat(repeat, *([1] * (observed.ndim - 1))), ctf_values=ctf_r,
            shifts_angstrom=sh_r, steps=n_steps, lr=config.pose_lr, render=render,
        )  # fmt: skip
        final = final.reshape(repeat, n)
        refined = refined.reshape(repeat, n, 3, 3)
        oracle_gain[idx.numpy()] = (final[0] - final[-1]).numpy()
        oracle_drift[idx.numpy()] = so3.geodesic_angle_deg(refined[-1], oracle[idx]).numpy()
        final, refined = final[:-1], refined[:-1]
        best_c, which = final[1:].min(0)
        better = best_c < final[0]
        winner = refined[1:][which, torch.arange(n)]
        moved_refined[idx] = torch.where(better[:, None, None], winner, refined[0])
        gain_fine[idx.numpy()] = (final[0] - best_c).numpy()
        print(f"  {lo + n} images, {time.perf_counter() - t0:.0f} s", end="\r", flush=True)
    seconds = time.perf_counter() - t0
    print()
    for label, moved in (("shipped (unrefined, coarse disc)", moved_shipped),
                         (f"refined ({n_steps} steps, top {top_k})", moved_refined)):  # fmt: skip
        after = errors(moved)
        n_moved = int((np.asarray(metrics.pose_error(rotations, moved).errors_deg) > 5).sum())
        freed, astray = np.mean(after[stranded] <= 20), np.mean(after[~stranded] > 20)
        print(
            f"{label}: moved (> 5°) {n_moved}, > 20° after {100 * np.mean(after > 20):.1f} % "
            f"(stranded freed {100 * freed:.1f} %, others sent astray {100 * astray:.2f} %), "
            f"median error {np.median(after):.2f}°",
            flush=True,
        )
    print(f"refined rule: {seconds:.0f} s for {len(rotations)} images")
    print(
        f"the true pose moved under refinement: median {np.median(oracle_drift[stranded]):.1f}° "
        f"(stranded), {np.median(oracle_drift[~stranded]):.1f}° (others); > 20°: "
        f"{100 * np.mean(oracle_drift[stranded] > 20):.1f} % (stranded)"
    )
    for label, gain in (("coarse, unrefined", gain_coarse), ("fine, refined", gain_fine),
                        ("oracle: the true pose, refined", oracle_gain)):  # fmt: skip
        print(
            f"loss gain of the best far candidate ({label}): stranded median "
            f"{np.median(gain[stranded]):.3g}, others median {np.median(gain[~stranded]):.3g}; "
            "share > 0: stranded "
            f"{100 * np.mean(gain[stranded] > 0):.1f} %, others {100 * np.mean(gain[~stranded] > 0):.2f} %"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
