"""HSP90's near two-fold at D=64: can the images tell a pose from its mate, and does a mate check help?

Usage::

    python bench/experiments/hsp90_mates.py RUN_DIR DATA_DIR EPOCH separability
    python bench/experiments/hsp90_mates.py RUN_DIR DATA_DIR EPOCH continue

``RUN_DIR`` is a ``cryospin-lab reconstruct`` folder of the HSP90 set ``DATA_DIR`` (e.g. from
``bench/suite.py``) with ``checkpoints/epoch_EPOCH.pt``. ``separability``: on every image, the
loss of the true map (scaled to the images) at the true pose against its mate ``R Q^T`` (``Q``
the model's chain A -> B two-fold), and of the run's map at its poses against their mates under
the map's own near-symmetry (``analysis.symmetry``), on the coarse (0.4) and the full disc.
``continue``: the run continued from checkpoint ``EPOCH`` (its switch) with, after each direct
epoch, every image moved to its mate when that fits better on the full disc (an experiment, not
in the engine). One thread.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from _checkpoint import restored_trainer

from cryospin_lab.analysis import metrics
from cryospin_lab.analysis.symmetry import find_near_symmetry
from cryospin_lab.engine.events import LogEvent
from cryospin_lab.io.maps import load_ground_truth
from cryospin_lab.model.hartley_volume import HartleyVolume
from cryospin_lab.physics.projection import FourierDisc, max_disc_radius
from cryospin_lab.physics.render import LossKind, image_losses, render_hartley
from cryospin_lab.simulate import molecule


def losses(trainer, volume_ht, rotations, disc, rows) -> torch.Tensor:
    _, observed, ctf = trainer.feed.batch(rows, disc)
    kw = dict(
        pixel_size_angstrom=trainer.pixel_size_angstrom, ctf_values=ctf, contrast=trainer.config.contrast
    )
    return image_losses(render_hartley(volume_ht, rotations, disc, **kw), observed, disc, LossKind.L2)


def disc_of(trainer, fraction: float) -> FourierDisc:
    return FourierDisc.make(trainer.box_size, max(2.0, fraction * max_disc_radius(trainer.box_size)))


@torch.no_grad()
def separability(trainer, truth_map: torch.Tensor) -> None:
    rows = torch.arange(len(trainer.stack))
    q = molecule("hsp90").symmetry_rotations().float()[0]
    true_rot = trainer.true_rotations.float()
    branch = trainer.branch()
    found = find_near_symmetry(branch.volume_real())
    for fraction in (0.4, 1.0):
        disc = disc_of(trainer, fraction)
        truth_ht = HartleyVolume.from_real(truth_map).hartley().detach()
        _, observed, ctf = trainer.feed.batch(rows, disc)
        kw = dict(pixel_size_angstrom=trainer.pixel_size_angstrom, ctf_values=ctf, contrast=-1.0)
        clean = render_hartley(truth_ht, true_rot, disc, **kw)
        truth_ht = truth_ht * float((clean * observed).sum() / (clean * clean).sum())
        own = losses(trainer, truth_ht, true_rot, disc, rows)
        mate = losses(trainer, truth_ht, true_rot @ q.T, disc, rows)
        print(f"disc {fraction}: true map: the true pose fits better than its mate for "
              f"{100 * float((own < mate).double().mean()):.1f} % of the images")  # fmt: skip
        if found is None:
            print(f"disc {fraction}: the run's map has no near-symmetry")
            continue
        rot = branch.current_rotations().float()
        volume = branch.volume.hartley().detach()
        own = losses(trainer, volume, rot, disc, rows)
        mate = losses(trainer, volume, rot @ found.rotations[0].float().T, disc, rows)
        print(f"disc {fraction}: the run's map ({found.describe()}, correlation {found.correlation:.3f}): "
              f"the mate fits better for {100 * float((mate < own).double().mean()):.1f} %")  # fmt: skip


@torch.no_grad()
def move_to_mates(trainer) -> str:
    branch, start = trainer.branch(), time.perf_counter()
    found = find_near_symmetry(branch.volume_real())
    if found is None:
        return "no near-symmetry"
    table, disc, volume = branch.pose_table, disc_of(trainer, 1.0), branch.volume.hartley().detach()
    moved = 0
    for s in range(0, len(trainer.stack), 1000):
        rows = torch.arange(s, min(s + 1000, len(trainer.stack)))
        rot = table.rotations[rows]
        cands = torch.stack([rot] + [rot @ q.float().T for q in found.rotations], 1)
        fits = torch.stack(
            [losses(trainer, volume, cands[:, k], disc, rows) for k in range(cands.shape[1])], 1
        )
        best = fits.argmin(1)
        table.reset_rows(rows[best > 0], cands[torch.arange(len(rows)), best][best > 0])
        moved += int((best > 0).sum())
    seconds = time.perf_counter() - start
    return f"{found.describe()} (correlation {found.correlation:.3f}): {moved} moved, {seconds:.1f} s"


def main() -> int:
    run_dir, data_dir, epoch, mode = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    print(f"# {' '.join(sys.argv)}")
    trainer, stack = restored_trainer(run_dir, data_dir, epoch, threads=1, ground_truth=False)
    truth_map = load_ground_truth(data_dir / "ground_truth.mrc", stack)
    if mode == "separability":
        separability(trainer, truth_map)
        return 0
    for event in trainer.events():
        if isinstance(event, LogEvent) and event.message.startswith("re-search"):
            print(
                f"after epoch {event.epoch}: {event.message}; mate check: {move_to_mates(trainer)}",
                flush=True,
            )
    rot = trainer.branch().current_rotations()
    raw = metrics.pose_error(trainer.true_rotations, rot)
    modulo = metrics.pose_error(
        trainer.true_rotations, rot, symmetry_rotations=molecule("hsp90").symmetry_rotations()
    )
    print(f"raw median {raw.median_deg:.2f}°, mean {raw.mean_deg:.1f}°, "
          f"{100 * np.mean(np.asarray(raw.errors_deg) > 20):.1f} % over 20°; modulo the two-fold median "
          f"{modulo.median_deg:.2f}°")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
