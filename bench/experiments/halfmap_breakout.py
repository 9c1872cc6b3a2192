"""A truth-free sign of the break-out: the FSC between half maps of the amortized stage's best poses.

Usage::

    python bench/experiments/halfmap_breakout.py RUN_DIR DATA_DIR [EPOCH ...]

At each kept amortized checkpoint of RUN_DIR (or the EPOCHs given): every image's best candidate
(rotation and shift) from the encoder, the set split into even and odd images, each half
back-projected (CTF-weighted, as the direct stage's half-map re-search does) on the epoch's disc,
each half map's spherical average removed (what any set of random poses gives), and the FSC of
what is left per shell: where the poses agree on a structure, the halves' non-spherical parts
agree; on the plateau they are noise. Printed beside the structure gain and the FSC against the
truth. One thread.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _checkpoint import restored_trainer  # noqa: E402

from cryospin_lab.engine.rescue import HALF_MAP_REGULARISER  # noqa: E402
from cryospin_lab.engine.steps import best_candidates  # noqa: E402
from cryospin_lab.engine.stuck import spherical_average  # noqa: E402
from cryospin_lab.physics.render import backproject_hartley  # noqa: E402

CHUNK = 512


def shell_fsc(a: torch.Tensor, b: torch.Tensor, radius: int) -> torch.Tensor:
    """FSC of two centred Hartley volumes per shell of integer radius 1..radius (Hartley values give
    the same shell sums as the complex ones: the shells are closed under k -> -k)."""
    d = a.shape[-1]
    g = torch.arange(d) - d // 2
    r = (
        (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
        .sqrt()
        .round()
        .long()
        .flatten()
    )
    a, b = a.double().flatten(), b.double().flatten()
    n = radius + 1
    ab = torch.bincount(r, a * b, minlength=n)[:n]
    aa = torch.bincount(r, a * a, minlength=n)[:n]
    bb = torch.bincount(r, b * b, minlength=n)[:n]
    return (ab / (aa * bb).sqrt().clamp(min=1e-30))[1:]


@torch.no_grad()
def half_map_fsc(trainer, branch) -> tuple[torch.Tensor, float]:
    ctx, feed = trainer.step_context, trainer.feed
    disc = feed.disc(branch.schedule_epoch)
    n = len(feed)
    rows = torch.arange(n)
    rotations, shifts = best_candidates(ctx, branch, rows, n, disc)
    use_shifts = trainer.config.encoder.estimate_shifts
    shape = branch.volume.hartley().shape
    maps = []
    for half in (rows[0::2], rows[1::2]):
        sums = torch.zeros(2, *shape)
        for start in range(0, len(half), CHUNK):
            idx = half[start : start + CHUNK]
            _, observed, ctf = feed.batch(idx, disc)
            data, weights = backproject_hartley(
                shape, rotations[idx], disc, observed, ctf_values=ctf,
                shifts_angstrom=shifts[idx] if use_shifts else None,
                pixel_size_angstrom=ctx.pixel_size_angstrom, contrast=trainer.config.contrast,
            )  # fmt: skip
            sums[0] += data
            sums[1] += weights
        numerator, weights = sums
        volume = numerator / (weights + HALF_MAP_REGULARISER * weights[weights > 0].mean())
        maps.append(volume - spherical_average(volume))
    radius = int(disc.radius)
    return shell_fsc(maps[0], maps[1], radius), float(disc.radius)


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    run, data = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    rows = csv.DictReader((run / "metrics.csv").open())
    metrics = {int(r["epoch"]): r for r in rows if r["branch"] == "main"}
    kept = run / "checkpoints"
    epochs = [int(e) for e in sys.argv[3:]] or [
        e
        for e, r in sorted(metrics.items())
        if r["phase"] == "amortized" and (kept / f"epoch_{e:04d}.pt").exists()
    ]
    print(f"# {' '.join(sys.argv)}")
    print("# epoch: structure gain % | FSC vs truth Å | non-spherical half-map FSC: mean over shells")
    print("# 2-8, 2-R | each shell 2..R")
    for epoch in epochs:
        trainer, _ = restored_trainer(run, data, epoch, threads=1)
        branch = trainer.branches[0]
        if branch.pose_table is not None:
            continue
        fsc, radius = half_map_fsc(trainer, branch)
        row = metrics[epoch]
        curve = " ".join(f"{v:.2f}" for v in fsc[1:].tolist())
        print(
            f"{epoch}: {float(row['structure_gain_pct']):.1f} | {float(row['resolution_angstrom']):.0f} | "
            f"{float(fsc[1:8].mean()):.3f} {float(fsc[1:].mean()):.3f} | {curve}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
