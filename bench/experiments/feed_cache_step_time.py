"""Training steps with and without the feed's full-disc cache of Hartley values and CTF.

Usage::

    python bench/experiments/feed_cache_step_time.py RUN_DIR DATA_DIR EPOCH [THREADS]

Restores the checkpoint of ``EPOCH`` of a ``cryospin-lab reconstruct`` folder on ``THREADS``
torch threads (default 2) and times 40 training steps of its stage (after 5 warm-up steps), four
rounds alternating the feed's cache (engine/feed.py) off and on, so that both arms see the same
machine (docs/decisions.md#feed-disc-cache).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from _checkpoint import restored_trainer

from cryospin_lab.engine import steps
from cryospin_lab.engine.events import Phase


def step_ms(trainer, step, n: int = 40) -> float:
    branch, ctx = trainer.branch(), trainer.step_context
    batches = trainer.feed.epoch_batches(branch.epoch, branch.subset)
    for _ in range(5):
        step(ctx, branch, next(batches))
    start = time.perf_counter()
    for _ in range(n):
        step(ctx, branch, next(batches))
    return 1000 * (time.perf_counter() - start) / n


def main() -> int:
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    trainer, _ = restored_trainer(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), threads=threads)
    torch.set_num_threads(threads)
    phase = trainer.branch().phase
    step = steps.direct_step if phase is Phase.DIRECT else steps.amortized_step
    disc = trainer.feed.disc(trainer.branch().schedule_epoch)
    print(f"# {' '.join(sys.argv)}; {phase.value} steps, disc radius {disc.radius:g}, {threads} threads")
    cached, times = trainer.feed._cached, {"computed": [], "cached": []}
    for _ in range(4):
        for name, table in (("computed", None), ("cached", cached)):
            trainer.feed._cached = table
            times[name].append(step_ms(trainer, step))
            print(f"{name:>8}: {times[name][-1]:.1f} ms per step", flush=True)
    before, after = (statistics.median(times[name]) for name in ("computed", "cached"))
    print(f"median: {before:.1f} -> {after:.1f} ms per step ({100 * (after / before - 1):+.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
