"""The experiments' shared start: a kept run's trainer restored at one of its checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cryospin_lab.engine.run_state import read_run
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.maps import load_ground_truth
from cryospin_lab.io.particles import ParticleStack


def restored_trainer(
    run_dir: Path, data_dir: Path, epoch: int, *, threads: int, ground_truth: bool = True, **settings
) -> tuple[Trainer, ParticleStack]:
    """The trainer of ``run_dir`` at its checkpoint of ``epoch`` on the CPU with ``threads``
    threads (with the set's ``ground_truth.mrc`` as its truth, unless ``ground_truth`` is false)
    and any other ``TrainingConfig`` field in ``settings`` changed, and the particle stack of
    ``data_dir``."""
    stack = ParticleStack(data_dir / "particles.star")
    truth = load_ground_truth(data_dir / "ground_truth.mrc", stack) if ground_truth else None
    saved = read_run(run_dir / "checkpoints" / f"epoch_{epoch:04d}.pt")
    config = dataclasses.replace(saved.config, device="cpu", threads=threads, **settings)
    trainer = Trainer(stack, config, ground_truth_map=truth)
    trainer.restore(saved)
    return trainer, stack
