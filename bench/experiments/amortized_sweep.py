"""Sweep of amortized-stage settings on the HSP90 set or any STAR + true map; one JSON line per epoch.

Run several in parallel on one GPU, e.g.
    python bench/experiments/amortized_sweep.py --name lr1e-3 --encoder-lr 1e-3 --budget-s 200
Another set: ``--star particles.star --truth map.mrc`` (e.g. the ribosome set that
``bench/peer_cryodrgn.py --molecule ribosome`` simulates and caches under its ``--out``).

Switch-time experiments from one amortized run: ``--resume RUN/checkpoints/epoch_0020.pt
--at-resume fork --epochs 40`` continues that run's state as two branches, one amortized and
one switched to direct pose optimisation at once (the engine's fork, paper Fig. 4);
``--at-resume switch`` continues the switched branch only.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cryospin_lab.analysis import metrics
from cryospin_lab.engine.commands import Command
from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.engine.events import EpochEvent, PhaseChangeEvent, PoseErrorEvent, ResolutionEvent
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.maps import read_map
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.model.encoder import EncoderConfig
from cryospin_lab.simulate import datasets

# Options that override a TrainingConfig field when given (argparse dest -> field).
OVERRIDES = {
    "encoder_lr": "encoder_lr",
    "decoder_lr": "decoder_lr",
    "radius_start": "radius_start_fraction",
    "radius_ramp": "radius_ramp_epochs",
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--switch", default="never")
    p.add_argument("--encoder-lr", type=float, default=None)
    p.add_argument("--decoder-lr", type=float, default=None)
    p.add_argument("--radius-start", type=float, default=None)
    p.add_argument("--radius-ramp", type=int, default=None)
    p.add_argument("--heads", type=int, default=7)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--budget-s", type=float, default=1e9)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache", default=None)
    p.add_argument("--star", default=None, help="particles (default: the HSP90 set)")
    p.add_argument("--truth", default=None, help="true map of --star (needed with --star)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    p.add_argument("--out", default=None, help="write checkpoints every epoch under OUT/checkpoints")
    p.add_argument(
        "--resume", default=None, help="continue from this checkpoint (its settings, --epochs total)"
    )
    p.add_argument(
        "--at-resume",
        choices=["continue", "fork", "switch"],
        default="continue",
        help="with --resume: go on as saved, fork into amortized + direct, or switch to direct now",
    )
    p.add_argument(
        "--modulo-two-fold",
        action="store_true",
        help="also log the pose error modulo HSP90's pseudo two-fold (mean2/median2)",
    )
    a = p.parse_args()
    if a.at_resume != "continue" and a.resume is None:
        p.error(f"--at-resume {a.at_resume} needs --resume CHECKPOINT")
    if a.star is None:
        data = datasets.hsp90(cache_dir=a.cache, progress=False)
        star, truth_path = data.star_path, data.ground_truth_path
    elif a.truth is None:
        p.error("--star needs --truth (the sweep scores every epoch against the true map)")
    else:
        star, truth_path = a.star, a.truth
    stack = ParticleStack(star)
    if a.n < len(stack):
        stack.metadata = stack.metadata.subset(range(a.n))
    truth, _ = read_map(truth_path)
    if a.resume is not None:
        trainer = _resumed(a, stack, truth)
    else:
        trainer = _new(a, stack, truth)
    _record(a, trainer)


def _resumed(a: argparse.Namespace, stack: ParticleStack, truth: torch.Tensor) -> Trainer:
    """The trainer of ``--resume``, forked or switched as ``--at-resume`` asks.

    The checkpoint's config applies (heads, switch rule, seed, batch, ...): only ``--epochs``
    changes. The override options (``OVERRIDES``) are refused; ``--heads``, ``--switch``,
    ``--seed`` and ``--batch`` have defaults, so they cannot be told apart and are ignored.
    """
    changed = [f"--{name.replace('_', '-')}" for name in OVERRIDES if getattr(a, name) is not None]
    if changed:
        raise SystemExit(f"--resume {a.resume}: the checkpoint's settings apply; drop {' '.join(changed)}")
    trainer = Trainer.resume(stack, a.resume, ground_truth_map=truth, out_dir=a.out, n_epochs=a.epochs)
    if a.at_resume == "fork":
        trainer.apply_command(Command.FORK)
    elif a.at_resume == "switch":
        trainer.apply_command(Command.SWITCH_NOW)
    return trainer


def _new(a: argparse.Namespace, stack: ParticleStack, truth: torch.Tensor) -> Trainer:
    # Only the options given override TrainingConfig's defaults.
    given = {field: getattr(a, name) for name, field in OVERRIDES.items()}
    cfg = TrainingConfig(
        **{k: v for k, v in given.items() if v is not None},
        encoder=EncoderConfig(box_size=64, n_heads=a.heads),
        n_epochs=a.epochs,
        switch=a.switch,
        batch_size=a.batch,
        device=a.device,
        threads=a.threads,
        seed=a.seed,
        checkpoint_every=1 if a.out else 0,
        n_tracked=0,
        volume_interval_s=1e9,
    )
    return Trainer(stack, cfg, ground_truth_map=truth, out_dir=a.out)


def _record(a: argparse.Namespace, trainer: Trainer) -> None:
    """One JSON line per branch and epoch (loss, head wins, gap, pose change and error, resolution)."""
    two_fold = datasets.hsp90_pseudo_symmetry() if a.modulo_two_fold else None
    t0 = time.perf_counter()
    rows: dict[str, dict] = {}  # per branch: a fork interleaves the branches' epochs
    for ev in trainer.events():
        if isinstance(ev, EpochEvent):
            rows[ev.branch] = {
                "name": a.name,
                "branch": ev.branch,
                "epoch": ev.epoch,
                "phase": ev.phase.value,
                "loss": round(ev.mean_loss, 4),
                "wins": ev.head_win_counts.tolist(),
                "gap": round(ev.head_loss_gap, 5),
                "change": round(ev.median_pose_change_deg, 2),
            }
        elif isinstance(ev, PoseErrorEvent):
            row = rows[ev.branch]
            row.update(mean=round(ev.mean_deg, 2), median=round(ev.median_deg, 2))
            if two_fold is not None:
                err = metrics.pose_error(
                    trainer.true_rotations, trainer.poses(ev.branch)[0], symmetry_rotations=two_fold
                )
                row.update(mean2=round(err.mean_deg, 2), median2=round(err.median_deg, 2))
        elif isinstance(ev, ResolutionEvent):
            row = rows[ev.branch]
            row.update(res=round(ev.resolution_angstrom, 2), wall=round(time.perf_counter() - t0, 1))
            print(json.dumps(row), flush=True)
            if time.perf_counter() - t0 > a.budget_s:
                break
        elif isinstance(ev, PhaseChangeEvent):
            print(
                json.dumps(
                    {
                        "name": a.name,
                        "branch": ev.branch,
                        "phase_change": ev.new.value,
                        "reason": ev.reason,
                        "epoch": ev.epoch,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    main()
