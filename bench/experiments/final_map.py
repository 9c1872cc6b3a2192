"""Which map should a run hand back: its trained volume, or a back-projection from its final poses?

Usage::

    python bench/experiments/final_map.py RUN_DIR DATA_DIR EPOCH [EPOCH ...] [--floor X]

For each checkpoint of a ``cryospin-lab reconstruct`` folder of a simulated set (e.g. a
``bench/suite.py`` run): the FSC at 0.5 against the true map of

- ``trained``: the run's volume (what ``map.mrc`` held before ``rebuild_map``);
- ``back-projection``: every image back-projected at its pose (and shift), CTF-weighted, over the
  summed CTF weight plus ``HALF_MAP_REGULARISER`` (0.1) of its mean (``engine.rescue.half_maps``'
  estimate on the whole set);
- ``fsc-weighted``: the mean of the two half maps (every other image) with each shell scaled by
  ``sqrt(2 FSC / (1 + FSC))`` of the halves (the usual noise weighting);

each aligned as the run's epoch report does (the poses' global rotation modulo the true map's
near-symmetry) and, in brackets, by a map search alone; and the half maps' own FSC at 0.143
(truth-free). Asks whether the direct stage's volume, which goes on fitting noise once the poses
settle (docs/decisions.md#early-switch), ends coarser than a map made from the same poses.
``--floor X``: the back-projections' Wiener term as that share of the mean weight instead of 0.1.
One thread.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from _checkpoint import restored_trainer

from cryospin_lab.analysis import metrics
from cryospin_lab.engine import rescue
from cryospin_lab.engine.epoch_report import pose_error_event, resolution_event
from cryospin_lab.engine.rescue import half_maps
from cryospin_lab.physics import fourier


def shell_weight(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sqrt(2 FSC / (1 + FSC))`` per shell of two Hartley maps, as a ``(D, D, D)`` weight."""
    shells = fourier.radial_index_3d(a.shape[-1]).flatten()
    n = int(shells.max()) + 1
    total = lambda v: torch.zeros(n, dtype=torch.float64).index_add_(0, shells, v.flatten().double())  # noqa: E731
    fsc = (total(a * b) / (total(a * a) * total(b * b)).sqrt().clamp(min=1e-300)).clamp(min=0)
    return (2 * fsc / (1 + fsc)).sqrt().float()[shells].reshape(a.shape)


def main() -> int:
    args = sys.argv[1:]
    if "--floor" in args:
        at = args.index("--floor")
        rescue.HALF_MAP_REGULARISER = float(args[at + 1])  # read by half_maps at each call
        del args[at : at + 2]
    run_dir, data_dir = Path(args[0]), Path(args[1])
    torch.set_num_threads(1)
    print(f"# {' '.join(sys.argv)}", flush=True)
    for epoch in (int(e) for e in args[2:]):
        trainer, _ = restored_trainer(run_dir, data_dir, epoch, threads=1)
        branch, ctx = trainer.branch(), trainer.step_context
        n = len(branch.pose_table)
        disc = ctx.feed.disc(branch.schedule_epoch)
        halves = half_maps(ctx, branch, disc, [torch.arange(0, n, 2), torch.arange(1, n, 2)])
        whole = half_maps(ctx, branch, disc, [torch.arange(n)])[0]
        real = lambda h: fourier.ifht_center(h, ndim=3).float()  # noqa: E731
        pixel = trainer.pixel_size_angstrom
        halves_res = metrics.compute_fsc(real(halves[0]), real(halves[1]), pixel).resolution_angstrom(0.143)
        weighted = (halves[0] + halves[1]) / 2 * shell_weight(*halves)
        # aligned as the run's report does (the poses' global rotation modulo the true map's
        # near-symmetry, or a map search while their median error is above 30°), and by a map search
        stamp = dict(epoch=epoch, branch=branch.name, phase=branch.phase, step=0, time_s=0.0)
        symmetry = trainer.reporter._truth_symmetry()
        _, pose = pose_error_event(branch, trainer.true_rotations, trainer.true_shifts, stamp, symmetry)
        truth, translate = trainer.ground_truth_map, ctx.config.encoder.estimate_shifts
        line = []
        for name, volume in (
            ("trained", branch.volume_real()),
            ("back-projection", real(whole)),
            ("fsc-weighted", real(weighted)),
        ):
            report = resolution_event(volume, truth, pixel, pose, stamp, translate=translate)
            search = resolution_event(volume, truth, pixel, None, stamp, translate=translate)
            line.append(
                f"{name} {report.resolution_angstrom:.2f} Å ({search.resolution_angstrom:.2f} by map search)"
            )
        print(f"epoch {epoch}: " + ", ".join(line) + f"; half maps {halves_res:.2f} Å at 0.143", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
