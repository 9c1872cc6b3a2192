"""The convergence test's run (tests/engine/test_convergence.py), for any seed, intact or broken on purpose.

Usage::

    python bench/convergence_check.py                          # run seeds 0 1 2, intact
    python bench/convergence_check.py --seeds 0 --break random_head random_switch
    python bench/convergence_check.py --seeds 1 --verbose      # pose error after every epoch
    python bench/convergence_check.py --max-shift-angstrom 12 --estimate-shifts  # test_shifts.py

The embedded HSP90 model simulated at D=32, 6 Å/px, 2000 images, SNR 0.5 with
CTF, reconstructed with the shipped defaults on one thread (as in the test).
``--break random_head``: winner-takes-all trains a random head per image
instead of the best; ``--break random_switch``: the switch keeps a random
candidate per image instead of the lowest-loss one (Eq. 6). Prints one line
per run: the median pose error and the share of images within 20° (both
modulo HSP90's near two-fold), FSC 0.5 against the true map, the switch epoch;
with ``--estimate-shifts`` also the median shift error after removing the
map's own translation.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cryospin_lab.analysis import metrics
from cryospin_lab.engine import steps
from cryospin_lab.engine.config import TrainingConfig, apply_settings
from cryospin_lab.engine.events import EpochEvent, PhaseChangeEvent, ResolutionEvent
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.maps import load_ground_truth
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.simulate import datasets
from cryospin_lab.simulate.simulator import simulate_particles

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))
from test_convergence import APIX, BOX, N_IMAGES, SNR  # noqa: E402  (the test's own set)


def broken(which: str, generator: torch.Generator):
    """Replace one piece of the method by a random choice; returns a function that restores it."""
    if which == "random_head":
        original = steps.winner_losses

        def random_winner(volume_ht, rotations, disc, observed_ht, kind, **kwargs):
            b, h = rotations.shape[:2]
            pick, rows = torch.randint(h, (b,), generator=generator), torch.arange(b)
            shifts = kwargs.pop("shifts_angstrom", None)
            one = None if shifts is None else shifts[rows, pick][:, None]
            best, _, losses = original(
                volume_ht,
                rotations[rows, pick][:, None],
                disc,
                observed_ht,
                kind,
                shifts_angstrom=one,
                **kwargs,
            )
            full = torch.full((b, h), float("inf"))
            full[rows, pick] = losses[:, 0]
            return best, pick, full

        steps.winner_losses = random_winner
        return lambda: setattr(steps, "winner_losses", original)
    if which == "random_switch":
        original_candidates = steps.encoder_candidates

        def scrambled(ctx, branch, indices, disc):
            rotations, shifts, losses = original_candidates(ctx, branch, indices, disc)
            return rotations, shifts, torch.rand(losses.shape, generator=generator)

        steps.encoder_candidates = scrambled
        return lambda: setattr(steps, "encoder_candidates", original_candidates)
    raise ValueError(f"unknown --break {which!r}")


def run(stack, truth, seed: int, verbose: bool, estimate_shifts: bool) -> str:
    torch.manual_seed(0)
    config = apply_settings(
        TrainingConfig(device="cpu", seed=seed),
        {"estimate_shifts": estimate_shifts},
        box_size=stack.box_size,
        pixel_size_angstrom=stack.pixel_size_angstrom,
    )
    trainer = Trainer(stack, config, ground_truth_map=truth)
    symmetry = datasets.hsp90_pseudo_symmetry()
    start, events = time.perf_counter(), []
    for event in trainer.events():
        events.append(event)
        if verbose and isinstance(event, EpochEvent):
            rotations = trainer.branch(event.branch).current_rotations()
            pose = metrics.pose_error(trainer.true_rotations, rotations, symmetry_rotations=symmetry)
            print(f"  epoch {event.epoch} {event.phase.value}: median {pose.median_deg:.1f}°", flush=True)
    pose = metrics.pose_error(
        trainer.true_rotations, trainer.branch().current_rotations(), symmetry_rotations=symmetry
    )
    within = float(np.mean(np.asarray(pose.errors_deg) < 20.0))
    fsc = [e for e in events if isinstance(e, ResolutionEvent) and e.kind == "ground_truth"][-1]
    switch = [e.epoch for e in events if isinstance(e, PhaseChangeEvent) and e.new.value == "direct"]
    shifts = ""
    branch = trainer.branch()
    if branch.current_shifts() is not None:
        error = metrics.shift_error_angstrom(
            trainer.true_shifts, branch.current_shifts(), branch.current_rotations()
        )
        moved = error.translation_angstrom.round(1)
        shifts = f", shift error median {error.median_angstrom:.2f} Å (map moved by {moved} Å)"
    return (
        f"median {pose.median_deg:.1f}°, within 20° {within:.2f}, FSC 0.5 {fsc.resolution_angstrom:.1f} Å, "
        f"switch after {switch[0] if switch else 'never'}{shifts}, {time.perf_counter() - start:.0f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--break", dest="breaks", nargs="*", default=[], choices=["random_head", "random_switch"]
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-shift-angstrom", type=float, default=0.0, help="simulate shifts in this disc")
    parser.add_argument("--estimate-shifts", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {' '.join(sys.argv)}; {platform.node()}, torch {torch.__version__}, {args.threads} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        sim = simulate_particles(
            datasets.default_model_path(), out_dir=tmp, box_size=BOX, pixel_size_angstrom=APIX,
            n_particles=N_IMAGES, snr=SNR, seed=0, progress=False, max_shift_angstrom=args.max_shift_angstrom,
        )  # fmt: skip
        stack = ParticleStack(sim.star_path)
        truth = load_ground_truth(sim.ground_truth_path, stack)
        for which in args.breaks or ["intact"]:
            restore = None if which == "intact" else broken(which, torch.Generator().manual_seed(0))
            try:
                for seed in args.seeds:
                    line = run(stack, truth, seed, args.verbose, args.estimate_shifts)
                    print(f"{which}, seed {seed}: {line}", flush=True)
            finally:
                if restore is not None:
                    restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
