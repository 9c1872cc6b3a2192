"""A run in one checkpoint file: every branch, the settings, the RNG state, the time spent.

:class:`~cryospin_lab.engine.trainer.Trainer` writes :func:`run_payload` at
each epoch end (``epoch_XXXX.pt``) and after a failure (``interrupted.pt``);
:func:`read_run` reads one back with ``weights_only=True`` (tensors and plain
values only, never pickled objects), so that a resumed run continues exactly
as the uninterrupted one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryospin_lab.engine.branch import Branch
from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.io.checkpoint import (
    config_from_dict,
    config_to_dict,
    load_checkpoint,
    rng_state,
    tensor_bytes,
)

__all__ = ["SavedRun", "bytes_needed", "read_run", "run_payload"]

POSE_ROW_BYTES = 4 * 24  # float32 rotation (9), shift (2) and their Adam moments and step counts, rounded up


@dataclass(frozen=True, eq=False)
class SavedRun:
    """A checkpoint's contents (see :func:`run_payload`)."""

    config: TrainingConfig
    branches: list[dict]  # Branch.state_dict() of the running branches
    finished: list[dict]  # ... and of the finished ones
    rng: dict  # cryospin_lab.io.checkpoint.rng_state()
    elapsed_s: float  # wall time of the run so far
    fork_count: int  # forks so far (names the next fork's branches)


def run_payload(
    config: TrainingConfig, branches: list[Branch], finished: list[Branch], elapsed_s: float, fork_count: int
) -> dict:
    """What a checkpoint holds: the settings, every branch's state, the RNG state, the time and forks."""
    return {
        "config": config_to_dict(config),
        "branches": [b.state_dict() for b in branches],
        "finished": [b.state_dict() for b in finished],
        "rng": rng_state(),
        "elapsed_s": elapsed_s,
        "fork_count": fork_count,
    }


def read_run(path: str | os.PathLike) -> SavedRun:
    """The run saved in ``path`` (``weights_only=True``); ValueError naming the file if it is not one."""
    payload = load_checkpoint(path)
    return SavedRun(
        config=config_from_dict(TrainingConfig, payload["config"]),
        branches=payload["branches"],
        finished=payload["finished"],
        rng=payload["rng"],
        elapsed_s=float(payload["elapsed_s"]),
        fork_count=int(payload["fork_count"]),
    )


def bytes_needed(branches: list[Branch], n_particles: int, config: TrainingConfig) -> int:
    """Disk space a run's checkpoints will take, estimated before it starts: one per saved epoch plus
    the one being written (each: the parameters with their two Adam moments, and the pose table after
    the switch), plus the failure checkpoint."""
    per_branch = 3 * sum(tensor_bytes(b.state_dict()) for b in branches)
    per_branch += n_particles * POSE_ROW_BYTES * len(branches)
    every = config.checkpoint_every
    n_saved = config.n_epochs // every if every else 0
    return (n_saved + 2) * per_branch
