"""Does a rebuilt map slow the direct stage's steps? Step times before and after ``rebuild_map``.

Usage::

    python bench/experiments/rebuild_step_time.py RUN_DIR DATA_DIR EPOCH [--flush-denormal]

Restores a direct-stage checkpoint of a ``cryospin-lab reconstruct`` folder on 2 threads, times
40 direct steps (after 5 warm-up steps) with the trained volume, rebuilds the map from the poses
(engine/rebuild.py), and times 40 more. ``--flush-denormal``: ``torch.set_flush_denormal(True)``
first (a step much faster with it multiplies denormal floats: docs/decisions.md#pyramid-denormals).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from _checkpoint import restored_trainer

from cryospin_lab.engine import steps
from cryospin_lab.engine.rebuild import rebuild_map


def step_ms(trainer, n: int = 40) -> float:
    branch, ctx = trainer.branch(), trainer.step_context
    batches = trainer.feed.epoch_batches(branch.epoch, branch.subset)
    for _ in range(5):
        steps.direct_step(ctx, branch, next(batches))
    start = time.perf_counter()
    for _ in range(n):
        steps.direct_step(ctx, branch, next(batches))
    return 1000 * (time.perf_counter() - start) / n


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--flush-denormal"]
    if "--flush-denormal" in sys.argv:
        torch.set_flush_denormal(True)
    trainer, _ = restored_trainer(Path(args[0]), Path(args[1]), int(args[2]), threads=2)
    torch.set_num_threads(2)
    print(f"# {' '.join(sys.argv)}", flush=True)
    print(f"trained volume: {step_ms(trainer):.1f} ms per direct step", flush=True)
    rebuild_map(trainer.step_context, trainer.branch())
    print(f"rebuilt map:    {step_ms(trainer):.1f} ms per direct step", flush=True)
    print(f"trained again:  {step_ms(trainer):.1f} ms per direct step (after 45 more steps)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
