"""What a rule that leaves alone the half-map re-search's moves to a pose's mate would see, epoch by epoch.

Usage::

    python bench/experiments/mate_skip_guard.py RUN_DIR DATA_DIR EPOCH [EPOCH ...]

For each direct-stage checkpoint of a ``cryospin-lab reconstruct`` folder (e.g. a
``bench/suite.py`` run) and its simulated set: the FSC at 0.143 between the two half maps the
re-search back-projects (``engine.rescue.half_maps``, every other image, on the run's disc), as a
multiple of Nyquist, and the run's map's best self-alignment away from the identity
(``analysis.symmetry``: its correlation, and the cyclic order when it passes 0.8). A rule that
skips moves across the map's near-symmetry only while the half maps are sharp must see HSP90's
near two-fold late in its runs and nothing on a blob (a stuck start, 1S3X leaving its plateau
through the re-search: docs/decisions.md#rescue-halfmaps). One thread.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from _checkpoint import restored_trainer

from cryospin_lab.analysis import metrics
from cryospin_lab.analysis._map_alignment import align_maps
from cryospin_lab.analysis.symmetry import find_near_symmetry
from cryospin_lab.engine.rescue import _halves, half_maps
from cryospin_lab.physics import fourier


def main() -> int:
    run_dir, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    print(f"# {' '.join(sys.argv)}", flush=True)
    for epoch in (int(e) for e in sys.argv[3:]):
        trainer, _ = restored_trainer(run_dir, data_dir, epoch, threads=1, ground_truth=False)
        branch, ctx = trainer.branch(), trainer.step_context
        maps = half_maps(ctx, branch, ctx.feed.disc(branch.schedule_epoch), _halves(ctx, branch))
        real = [fourier.ifht_center(m, ndim=3) for m in maps]
        pixel = trainer.pixel_size_angstrom
        res = metrics.compute_fsc(real[0], real[1], pixel).resolution_angstrom(0.143)
        volume = branch.volume_real()
        best = align_maps(volume, volume, try_flip=False, exclude_within_deg=45.0).correlation
        near = find_near_symmetry(volume, min_correlation=0.8)
        found = "none" if near is None else f"{near.order}-fold ({near.correlation:.3f})"
        print(
            f"epoch {epoch} ({branch.phase.value}): half maps {res:.1f} Å = "
            f"{res / (2 * pixel):.2f}x Nyquist; "
            f"self-alignment {best:.3f}, at 0.8: {found}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
