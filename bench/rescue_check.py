"""The direct stage with and without the global re-search, from one run's checkpoint at its switch.

Usage::

    python bench/rescue_check.py RUN_DIR DATA_DIR --epoch 25 --molecule 1u6g --rescue-every 0 1 2

``RUN_DIR`` is a ``cryospin-lab reconstruct`` output folder (e.g. one of
``bench/suite.py``'s runs) holding ``checkpoints/epoch_XXXX.pt`` at the epoch
after which the run switched; ``DATA_DIR`` its simulated set. The run is
continued from that checkpoint to its last epoch once per ``--rescue-every``
value (0: the shipped direct stage), one thread each, and each ending is
compared with the truth: the share of images more than 20° off (modulo the
molecule's symmetry), the median pose error and FSC 0.5 against the true map.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cryospin_lab.analysis import metrics
from cryospin_lab.engine import rescue, steps
from cryospin_lab.engine.config import parse_switch_rule
from cryospin_lab.engine.events import LogEvent, ResolutionEvent
from cryospin_lab.engine.run_state import read_run
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.maps import load_ground_truth
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.simulate import molecule


def _true_poses(true_rotations, ctx, branch, rows, n_images, disc):
    """In place of steps.best_candidates: every image's true rotation and a zero shift."""
    device = ctx.feed.device
    return true_rotations.to(device).float().clone(), torch.zeros(n_images, 2, device=device)


def settings_grid(items: list[str], config) -> list[dict]:
    """``FIELD=V1,V2`` items as every combination of replaced settings, each parsed as the field's type."""
    axes = []
    for item in items:
        field, _, values = item.partition("=")
        if not hasattr(config, field) or not values:
            raise SystemExit(f"--set {item}: expected FIELD=VALUE with FIELD a TrainingConfig setting")
        kind = type(getattr(config, field))
        axes.append([(field, kind(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--epoch", type=int, required=True, help="the checkpoint to continue from")
    parser.add_argument("--molecule", default=None, help="bundled molecule (for its symmetry)")
    parser.add_argument("--rescue-every", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--switch", default=None, help="the continued run's switch rule (default: the run's)")
    parser.add_argument(
        "--radius", type=float, default=None, help="the re-search's disc, a fraction of the full radius"
    )
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="FIELD=VALUE",
        help="replace settings of the continued run, e.g. decoder_lr_direct=1e-3; several values of one "
        "field (decoder_lr_direct=2e-3,1e-3) continue once per value",
    )  # fmt: skip
    parser.add_argument(
        "--true-poses", action="store_true",
        help="an oracle: at the switch every image takes its true pose (and a zero shift); with "
        "--set pose_lr=1e-9 --rescue-every 0 only the map is trained, so the ending shows what the "
        "data allow at the true poses",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.radius is not None:
        rescue.RESCUE_RADIUS_FRACTION = args.radius
    print(f"# {' '.join(sys.argv)}; {platform.node()}, torch {torch.__version__}, {args.threads} thread(s)")
    stack = ParticleStack(args.data_dir / "particles.star")
    truth_map = load_ground_truth(args.data_dir / "ground_truth.mrc", stack)
    symmetry = None if args.molecule is None else molecule(args.molecule).symmetry_rotations()
    saved = read_run(args.run_dir / "checkpoints" / f"epoch_{args.epoch:04d}.pt")
    for every, changes in itertools.product(args.rescue_every, settings_grid(args.set, saved.config)):
        torch.manual_seed(0)
        config = dataclasses.replace(
            saved.config, rescue_every=every, device="cpu", threads=args.threads, **changes
        )
        if args.switch is not None:  # e.g. continue from an earlier checkpoint and switch there
            config = dataclasses.replace(config, switch=args.switch)
        trainer = Trainer(stack, config, ground_truth_map=truth_map)
        trainer.restore(saved)
        if args.true_poses:
            steps.best_candidates = functools.partial(_true_poses, trainer.true_rotations)
        if args.switch is not None:  # the branches keep the rule they were saved with; this one replaces it
            for branch in trainer.branches:
                branch.switch_rule = parse_switch_rule(args.switch)
        start, moved, events = time.perf_counter(), [], []
        for event in trainer.events():
            events.append(event)
            if isinstance(event, LogEvent) and event.message.startswith("re-search: "):
                moved.append(int(event.message.split()[1]))
        rotations = trainer.branch().current_rotations()
        pose = metrics.pose_error(trainer.true_rotations, rotations, symmetry_rotations=symmetry)
        raw = metrics.pose_error(trainer.true_rotations, rotations)
        over = float(np.mean(np.asarray(pose.errors_deg) > 20.0))
        truth = [e for e in events if isinstance(e, ResolutionEvent) and e.kind == "ground_truth"]
        fsc = [e.resolution_angstrom for e in truth]
        label = " ".join(f"{k}={v}" for k, v in changes.items())
        print(
            f"rescue_every {every}{' ' + label if label else ''}: over 20° {100 * over:.1f} %, median "
            f"{pose.median_deg:.2f}°, mean {pose.mean_deg:.1f}° (raw: {raw.median_deg:.2f}°, "
            f"{raw.mean_deg:.1f}°), FSC 0.5 {fsc[-1]:.2f} Å (best {min(fsc):.2f}, mean of the last 5 "
            f"{np.mean(fsc[-5:]):.2f}), images moved per re-search {moved}, last epoch "
            f"{trainer.branch().epoch}, "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
