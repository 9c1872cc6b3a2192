"""Reconstruction quality on the default HSP90 set: semi-amortized (auto switch) vs fully amortized.

Simulates (or loads from the cache) the default dataset -- HSP90 (2CG9), D=64,
3 Å/px, 10,000 images, SNR 0.1, CTF from EMPIAR-10028 -- and runs one
reconstruction. When the auto switch rule fires, the run is forked: one branch
switches to direct optimisation, the other stays amortized, so both are
compared at equal epochs from the same state (paper Fig. 4).

Prints per branch: mean/median pose error (degrees, after global alignment
with hand), FSC-vs-truth resolution at 0.5 (Å and as a multiple of Nyquist),
and the wall time and peak memory of the whole run.

    .venv/bin/python bench/quality.py                 # the full benchmark
    .venv/bin/python bench/quality.py --n 2000 --epochs 6   # a quick look
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from cryospin_lab.analysis import metrics
from cryospin_lab.engine.commands import Command
from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.engine.events import (
    EpochEvent,
    ForkEvent,
    PhaseChangeEvent,
    PoseErrorEvent,
    ResolutionEvent,
)
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.maps import read_map
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.model.encoder import EncoderConfig
from cryospin_lab.simulate import datasets


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10000, help="images (a prefix of the default set)")
    parser.add_argument(
        "--epochs", type=int, default=TrainingConfig.n_epochs, help="default: TrainingConfig's"
    )
    parser.add_argument("--heads", type=int, default=7)
    parser.add_argument("--switch", default="auto", help="auto or an epoch number (the fork happens there)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fork", action="store_true", help="only the semi-amortized run")
    args = parser.parse_args()

    data = datasets.hsp90(progress=True)
    stack = ParticleStack(data.star_path)
    if args.n < len(stack):
        stack.metadata = stack.metadata.subset(range(args.n))
    truth_map, apix = read_map(data.ground_truth_path)
    config = TrainingConfig(
        encoder=EncoderConfig(box_size=stack.box_size, n_heads=args.heads),
        n_epochs=args.epochs,
        switch=args.switch,
        seed=args.seed,
        checkpoint_every=0,
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(f"data: {len(stack)} images, D={stack.box_size}, {apix} Å/px, SNR {data.snr}; config: {config}")
    trainer = Trainer(stack, config, ground_truth_map=truth_map)
    start = time.perf_counter()
    forked = args.no_fork
    for event in trainer.events():
        if isinstance(event, EpochEvent):
            print(
                f"[{event.branch}] epoch {event.epoch} ({event.phase.value}) loss {event.mean_loss:.4f} "
                f"wins {event.head_win_counts.tolist()} {event.epoch_time_s:.0f} s",
                flush=True,
            )
            main_branch = next((b for b in trainer.branches if b.name == "main"), None)
            if not forked and main_branch is not None and main_branch.pending_switch is not None:
                trainer.apply_command(Command.FORK)
                forked = True
        elif isinstance(event, PoseErrorEvent):
            print(
                f"    pose error {event.mean_deg:.2f} / {event.median_deg:.2f} deg (mean/median)", flush=True
            )
        elif isinstance(event, ResolutionEvent):
            print(f"    FSC=0.5 at {event.resolution_angstrom:.2f} Å", flush=True)
        elif isinstance(event, (PhaseChangeEvent, ForkEvent)):
            print(f"  {event}", flush=True)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    nyquist = 2 * apix
    two_fold = datasets.hsp90_pseudo_symmetry()
    print(
        "\n| branch | epochs | pose error mean / median (deg) | same, modulo the 2CG9 pseudo-two-fold "
        "| FSC 0.5 (Å) | x Nyquist |"
    )
    print("|---|---|---|---|---|---|")
    for branch in trainer.finished:
        rotations, _ = trainer.poses(branch.name)
        pose = metrics.pose_error(stack.metadata.rotations, rotations)
        sym = metrics.pose_error(stack.metadata.rotations, rotations, symmetry_rotations=two_fold)
        curve, _ = metrics.fsc_vs_ground_truth(trainer.volume_real(branch.name), truth_map, apix)
        res = curve.resolution_angstrom(0.5)
        print(
            f"| {branch.name} | {branch.epoch} | {pose.mean_deg:.2f} / {pose.median_deg:.2f} | "
            f"{sym.mean_deg:.2f} / {sym.median_deg:.2f} | "
            f"{res:.2f} | {res / nyquist:.2f} |"
        )
    print(f"\nwall time {wall:.0f} s, peak RSS {peak_mb:.0f} MiB")


if __name__ == "__main__":
    main()
