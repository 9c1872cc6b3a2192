"""Wall time of the engine's amortized and direct steps on the default set, for a quick A/B.

Usage::

    python bench/step_time.py                       # 40 steps each at the full disc
    python bench/step_time.py --epoch 0 --flush-denormal

Times ``--steps`` amortized steps of the default HSP90 set (10,000 images,
D=64, the shipped settings) at the disc of ``--epoch`` (12: the full disc),
then switches and times as many direct steps, after 5 warm-up steps each.
``--flush-denormal`` sets ``torch.set_flush_denormal(True)`` first: a step
much faster with it is multiplying denormal floats somewhere
(docs/decisions.md#pyramid-denormals). To compare two commits, run it from a
checkout of each, alternately (the machine's speed drifts).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time

import torch

from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.simulate import datasets


def timed(trainer: Trainer, branch, batches: list, warm_up: int) -> float:
    """Mean wall seconds per step over ``batches[warm_up:]``."""
    for indices in batches[:warm_up]:
        list(trainer._step(branch, indices))
    start = time.perf_counter()
    for indices in batches[warm_up:]:
        list(trainer._step(branch, indices))
    return (time.perf_counter() - start) / (len(batches) - warm_up)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--epoch", type=int, default=12, help="the disc of this epoch (12: full)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flush-denormal", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    stack = ParticleStack(datasets.hsp90(progress=False).star_path)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(stack, TrainingConfig(device="cpu"), out_dir=out)
        branch = trainer.branches[0]
        branch.epoch = args.epoch
        batches = trainer.feed.epoch_batches(branch.epoch, branch.subset)
        chosen = [next(batches) for _ in range(args.steps + 5)]
        amortized = timed(trainer, branch, chosen, 5)
        list(trainer._switch(branch, "manual"))
        direct = timed(trainer, branch, chosen, 5)
    print(
        f"{platform.node()}, torch {torch.__version__}, {args.threads} threads, epoch {args.epoch}, "
        f"flush_denormal {args.flush_denormal}: amortized {1e3 * amortized:.1f} ms/step, "
        f"direct {1e3 * direct:.1f} ms/step"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
