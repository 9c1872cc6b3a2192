"""Settle every image's side of a near-symmetry by an iterated half-map vote (Z2 synchronisation).

Usage::

    python bench/experiments/mate_sync.py RUN_DIR DATA_DIR EPOCH sync [ROUNDS [POWER]]
    python bench/experiments/mate_sync.py RUN_DIR DATA_DIR EPOCH continue [ROUNDS [POWER]]
    python bench/experiments/mate_sync.py RUN_DIR DATA_DIR EPOCH base
    python bench/experiments/mate_sync.py RUN_DIR DATA_DIR EPOCH sides
    python bench/experiments/mate_sync.py RUN_DIR DATA_DIR EPOCH split

``RUN_DIR`` is a ``cryospin-lab reconstruct`` folder of a simulated set ``DATA_DIR`` (e.g. from
``bench/suite.py``) with ``checkpoints/epoch_EPOCH.pt`` (a direct-stage epoch or the switch).

Each image's pose ``R`` has a mate ``R S^T`` across the map's near-symmetry ``S``
(``analysis.symmetry``), which explains it almost as well. A run that mixed the two sides trains a
map that supports the mix (``docs/decisions.md#hsp90-mates``): scored against that map, an image's
own side wins by its own contribution. Here the map is not the run's: each half of the images
(every other image) is back-projected at its chosen side (``backproject_hartley``, CTF-weighted,
as the half-map re-search does), and each image of one half chooses the side that fits the other
half's map better; half 1 votes with half 2's map, its map is rebuilt, then half 2 votes with the
new map of half 1 (so both halves keep one frame), for ``ROUNDS`` rounds (default 6). No image
votes on a map that holds it, so a mixed state is not self-supporting, and every round makes the
maps more one-sided.

``sync``: the rounds from the checkpoint, each printed with the share of images that moved and,
against the truth, the share more than 20 degrees off (raw). ``continue``: the run continued from
the checkpoint, the rounds applied once after the first direct epoch's re-search (the images that
changed side get their mate pose), then to the run's end; ``base``: the same continuation without
them. ``POWER`` (a sixth argument) > 0: that many power iterations of the linear vote (each image's
vote its margin, not its sign) from random votes before the rounds; -1: the rounds start from the
side the truth says (an oracle); a seventh argument ``fsc``: the votes' maps weighted per shell by
the half maps' FSC (``fsc_weighted``). ``sides``: where the images on their mate sit; ``split``: the two
sides' shares among the images
with a right pose modulo the two-fold (any epoch, amortized too). One thread. An
experiment, not in the engine.
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
from cryospin_lab.engine.events import LogEvent, ResolutionEvent
from cryospin_lab.physics.render import LossKind, backproject_hartley, image_losses, render_hartley
from cryospin_lab.simulate import molecule

CHUNK = 500
REGULARISER = 0.1  # Wiener term, a share of the mean weight (as the half-map re-search)


def _render_kw(trainer) -> dict:
    return dict(pixel_size_angstrom=trainer.pixel_size_angstrom, contrast=trainer.config.contrast)


def half_map(trainer, rows: torch.Tensor, rotations: torch.Tensor, shifts, disc) -> torch.Tensor:
    """The CTF-weighted back-projection of ``rows`` at ``rotations`` (Hartley, D^3)."""
    shape = trainer.branch().volume.hartley().shape
    sums = torch.zeros(2, *shape)
    for start in range(0, len(rows), CHUNK):
        idx = rows[start : start + CHUNK]
        _, observed, ctf = trainer.feed.batch(idx, disc)
        data, weights = backproject_hartley(
            shape,
            rotations[idx],
            disc,
            observed,
            ctf_values=ctf,
            shifts_angstrom=None if shifts is None else shifts[idx],
            **_render_kw(trainer),
        )
        sums[0] += data
        sums[1] += weights
    floor = REGULARISER * sums[1][sums[1] > 0].mean()
    return sums[0] / (sums[1] + floor)


@torch.no_grad()
def side_margins(trainer, volume, rows, rotations, mates, shifts, disc) -> torch.Tensor:
    """Loss at the mate minus loss at the pose, per image of ``rows`` (> 0: the pose fits better)."""
    out = []
    for start in range(0, len(rows), CHUNK):
        idx = rows[start : start + CHUNK]
        _, observed, ctf = trainer.feed.batch(idx, disc)
        shift = None if shifts is None else shifts[idx]
        kw = dict(ctf_values=ctf, shifts_angstrom=shift, **_render_kw(trainer))
        own = image_losses(render_hartley(volume, rotations[idx], disc, **kw), observed, disc, LossKind.L2)
        mate = image_losses(render_hartley(volume, mates[idx], disc, **kw), observed, disc, LossKind.L2)
        out.append(mate - own)
    return torch.cat(out)


def half_map_signed(trainer, rows, rot, mate, weights, shifts, disc) -> torch.Tensor:
    """``sum_i w_i (A_i^T y_i at R_i - at R_i S^T)`` over ``rows``, over the symmetrised CTF weight:
    the part of a map that tells a pose from its mate, with each image's vote ``w_i`` (linear in it)."""
    shape = trainer.branch().volume.hartley().shape
    sums = torch.zeros(2, *shape)
    for start in range(0, len(rows), CHUNK):
        idx = rows[start : start + CHUNK]
        _, observed, ctf = trainer.feed.batch(idx, disc)
        shift = None if shifts is None else shifts[idx]
        for sign, poses in ((1.0, rot), (-1.0, mate)):
            data, wts = backproject_hartley(
                shape, poses[idx], disc, sign * weights[idx, None] * observed, ctf_values=ctf,
                shifts_angstrom=shift, **_render_kw(trainer),
            )  # fmt: skip
            sums[0] += data
            sums[1] += wts / 2
    floor = REGULARISER * sums[1][sums[1] > 0].mean()
    return sums[0] / (sums[1] + floor)


@torch.no_grad()
def side_votes(trainer, volume, rows, rot, mate, shifts, disc) -> torch.Tensor:
    """``<render(W, R_i) - render(W, R_i S^T), y_i>`` per image of ``rows`` (linear in ``W``)."""
    out = []
    for start in range(0, len(rows), CHUNK):
        idx = rows[start : start + CHUNK]
        _, observed, ctf = trainer.feed.batch(idx, disc)
        shift = None if shifts is None else shifts[idx]
        kw = dict(ctf_values=ctf, shifts_angstrom=shift, **_render_kw(trainer))
        diff = render_hartley(volume, rot[idx], disc, **kw) - render_hartley(volume, mate[idx], disc, **kw)
        out.append((diff * observed).sum(-1))
    return torch.cat(out)


def spectral_sides(trainer, rot, mate, shifts, disc, halves, iters: int, log) -> torch.Tensor:
    """Each image's side as the sign of the leading singular vector of the half-to-half vote matrix
    (power iteration from random votes): ``True`` where the mate is chosen."""
    n = len(rot)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=g)
    truth = trainer.true_rotations
    for it in range(iters):
        t0 = time.perf_counter()
        previous = torch.sign(w)
        for h in (0, 1):
            other = halves[1 - h]
            volume = half_map_signed(trainer, other, rot, mate, w, shifts, disc)
            w[halves[h]] = side_votes(trainer, volume, halves[h], rot, mate, shifts, disc)
            w[halves[h]] /= w[halves[h]].std()
        flip = w < 0
        if int(flip.sum()) > n // 2:
            flip = ~flip
        now = torch.where(flip[:, None, None], mate, rot)
        changed = int((torch.sign(w) != previous).sum())
        log(f"power {it + 1}: {changed} signs changed ({time.perf_counter() - t0:.1f} s); {_off(truth, now)}")
    flip = w < 0
    return ~flip if int(flip.sum()) > n // 2 else flip


def fsc_weighted(maps: list) -> torch.Tensor:
    """The other half's map for a vote, each shell scaled by ``sqrt(2 FSC / (1 + FSC))`` of the two
    half maps (0 where the FSC is not positive): the noise-dominated shells stop deciding votes.
    Hartley coefficients give the Fourier FSC (sums over shells symmetric under k -> -k)."""
    from cryospin_lab.physics import fourier

    a, b = maps
    shells = fourier.radial_index_3d(a.shape[-1]).flatten()
    n = int(shells.max()) + 1
    total = lambda v: torch.zeros(n, dtype=torch.float64).index_add_(0, shells, v.flatten().double())  # noqa: E731
    fsc = total(a * b) / (total(a * a) * total(b * b)).sqrt().clamp(min=1e-300)
    weight = (2 * fsc.clamp(min=0) / (1 + fsc.clamp(min=0))).sqrt().float()
    return weight[shells].reshape(a.shape)


def synchronise(
    trainer, rounds: int, log=print, power: int = 0, weighted: bool = False
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rounds on the branch's current poses (after ``power`` power iterations when > 0): the
    images to move and their mate rotations (None when the map has no near-symmetry)."""
    branch = trainer.branch()
    found = find_near_symmetry(branch.volume_real())
    if found is None:
        log("no near-symmetry")
        return None
    q = found.rotations[0].float()
    table = branch.pose_table
    rot = table.rotations.clone()
    mate = rot @ q.T
    shifts = table.shifts_angstrom if table.estimate_shifts else None
    disc = trainer.feed.disc(branch.schedule_epoch)
    n = len(rot)
    halves = [torch.arange(h, n, 2) for h in (0, 1)]
    truth = trainer.true_rotations
    log(f"{found.describe()} (correlation {found.correlation:.3f}); start: {_off(truth, rot)}")
    flip = torch.zeros(n, dtype=torch.bool)
    if power > 0:
        flip = spectral_sides(trainer, rot, mate, shifts, disc, halves, power, log)
    elif power < 0:  # oracle: the side the truth says
        flip = torch.as_tensor(np.asarray(metrics.pose_error(truth, rot).errors_deg) > 90)
        log(f"oracle sides: {_off(truth, torch.where(flip[:, None, None], mate, rot))}")
    maps = [None, None]
    with torch.no_grad():
        for h in (0, 1):
            maps[h] = half_map(trainer, halves[h], torch.where(flip[:, None, None], mate, rot), shifts, disc)
    for r in range(rounds):
        t0 = time.perf_counter()
        moved = 0
        for h in (0, 1):
            rows = halves[h]
            current = torch.where(flip[:, None, None], mate, rot)
            other = torch.where(flip[:, None, None], rot, mate)
            vote_map = maps[1 - h] * fsc_weighted(maps) if weighted else maps[1 - h]
            margin = side_margins(trainer, vote_map, rows, current, other, shifts, disc)
            change = rows[margin < 0]
            flip[change] = ~flip[change]
            moved += len(change)
            with torch.no_grad():
                maps[h] = half_map(trainer, rows, torch.where(flip[:, None, None], mate, rot), shifts, disc)
        now = torch.where(flip[:, None, None], mate, rot)
        log(f"round {r + 1}: {moved} changed side ({time.perf_counter() - t0:.1f} s); {_off(truth, now)}")
        if moved == 0:
            break
    if int(flip.sum()) > n // 2:  # the other frame is as good: move the fewer images
        flip = ~flip
    rows = torch.nonzero(flip).flatten()
    return rows, mate[rows]


def _off(truth, rotations) -> str:
    if truth is None:
        return "no truth"
    err = np.asarray(metrics.pose_error(truth, rotations).errors_deg)
    return f"raw {100 * np.mean(err > 20):.1f} % over 20°, median {np.median(err):.2f}°"


def report(trainer, name: str) -> None:
    rot = trainer.branch().current_rotations()
    raw = metrics.pose_error(trainer.true_rotations, rot)
    sym = molecule(name).symmetry_rotations() if name in ("hsp90", "1bxn", "trpv1") else None
    mod = metrics.pose_error(trainer.true_rotations, rot, symmetry_rotations=sym)
    over = lambda e: 100 * np.mean(np.asarray(e.errors_deg) > 20)  # noqa: E731
    print(
        f"end: raw median {raw.median_deg:.2f}°, mean {raw.mean_deg:.1f}°, "
        f"{over(raw):.1f} % over 20°; modulo the molecule's "
        f"symmetry median {mod.median_deg:.2f}°, {over(mod):.1f} % over 20°",
        flush=True,
    )


def sides(trainer) -> None:
    """Where the images on their mate sit: their share per true view (HEALPix nside 2) and how
    pure cells of the estimated poses are (view nside x in-plane bins)."""
    import healpy as hp

    from cryospin_lab.physics import so3

    rot, truth = trainer.branch().current_rotations(), trainer.true_rotations
    mate = np.asarray(metrics.pose_error(truth, rot).errors_deg) > 90
    print(f"on the mate side (raw > 90°): {100 * mate.mean():.1f} %")
    v = so3.view_directions(truth.float()).numpy()
    pix = hp.vec2pix(2, v[:, 0], v[:, 1], v[:, 2])
    shares = sorted(mate[pix == p].mean() for p in range(48) if (pix == p).sum() > 20)
    print("share on the mate per true view (nside 2, sorted):", " ".join(f"{x:.2f}" for x in shares))
    v = so3.view_directions(rot.float()).numpy()
    angle = np.arctan2(rot[:, 0, 1].numpy(), rot[:, 0, 0].numpy())
    for nside, n_in in ((1, 1), (2, 1), (2, 4), (2, 8), (4, 4)):
        cell = hp.vec2pix(nside, v[:, 0], v[:, 1], v[:, 2]) * n_in
        cell += ((angle + np.pi) / (2 * np.pi) * n_in).astype(int) % n_in
        pure = sum(max(mate[cell == c].sum(), (~mate[cell == c]).sum()) for c in np.unique(cell))
        print(f"estimated-pose cells nside {nside} x {n_in} in-plane: purity {pure / len(mate):.3f}")


def split(trainer) -> None:
    """The two sides' shares among the images within 20° of their true pose modulo the two-fold:
    each such image's ``R_est^T R_true`` is the global rotation or its product with the two-fold,
    180° apart, so the side is the angle to the first such image's (under or over 90°)."""
    from cryospin_lab.physics import so3

    rot, truth = trainer.branch().current_rotations().double(), trainer.true_rotations.double()
    q = molecule("hsp90").symmetry_rotations()
    ok = torch.as_tensor(np.asarray(metrics.pose_error(truth, rot, symmetry_rotations=q).errors_deg) < 20)
    d = (rot.transpose(1, 2) @ truth)[ok]
    near = so3.geodesic_angle_deg(d, d[:1].expand_as(d)).numpy() < 90
    print(
        f"epoch {trainer.branch().epoch}: {100 * ok.float().mean():.1f} % within 20° modulo the two-fold; "
        f"their sides {100 * near.mean():.1f} / {100 * (1 - near.mean()):.1f} %",
        flush=True,
    )


def main() -> int:
    run_dir, data_dir, epoch, mode = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 6
    power = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    weighted = len(sys.argv) > 7 and sys.argv[7] == "fsc"
    torch.set_num_threads(1)
    print(f"# {' '.join(sys.argv)}", flush=True)
    trainer, _ = restored_trainer(run_dir, data_dir, epoch, threads=1)
    name = data_dir.name.split("_")[0]
    log = lambda m: print(m, flush=True)  # noqa: E731
    if mode == "split":
        split(trainer)
        return 0
    if mode == "sides":
        sides(trainer)
        return 0
    if mode == "sync":
        synchronise(trainer, rounds, log, power, weighted)
        return 0
    done = mode == "base"
    resolution = None
    for event in trainer.events():
        if isinstance(event, ResolutionEvent) and event.kind == "ground_truth":
            resolution = event
            print(f"epoch {event.epoch}: {event.resolution_angstrom:.1f} Å", flush=True)
        if isinstance(event, LogEvent) and event.message.startswith("re-search"):
            print(f"after epoch {event.epoch}: {event.message}", flush=True)
            if not done:
                done = True
                found = synchronise(trainer, rounds, log, power, weighted)
                if found is not None:
                    trainer.branch().pose_table.reset_rows(*found)
                    log(f"moved {len(found[0])} images to their mate")
    report(trainer, name)
    if resolution is not None:
        print(f"final resolution {resolution.resolution_angstrom:.1f} Å", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
