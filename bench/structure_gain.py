"""The stuck-start signal of finished runs: structure gain after each epoch, from their checkpoints.

Usage::

    python bench/structure_gain.py RUN_DIR DATA_DIR [RUN_DIR DATA_DIR ...] --epochs 1 2 3 4 5 6 8 12

Each ``RUN_DIR`` is a ``cryospin-lab reconstruct`` output folder with
``checkpoints/epoch_XXXX.pt`` (e.g. one of ``bench/suite.py``'s runs) and
``DATA_DIR`` its particle set (``particles.star``). For each listed epoch the
run's amortized state is restored and
:func:`cryospin_lab.engine.stuck.structure_gain` measured exactly as the
trainer does after that epoch (the same 512 probe images, one thread). The
ground truth is not used: compare with the run's FSC against the truth
(``metrics.csv``) to see which runs were stuck.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from pathlib import Path

import torch

from cryospin_lab.engine.run_state import read_run
from cryospin_lab.engine.stuck import structure_gain
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.particles import ParticleStack


def gains(run_dir: Path, data_dir: Path, epochs: list[int]) -> list[float | None]:
    stack = ParticleStack(data_dir / "particles.star")
    trainer, out = None, []
    for epoch in epochs:
        path = run_dir / "checkpoints" / f"epoch_{epoch:04d}.pt"
        if not path.is_file():
            out.append(None)
            continue
        saved = read_run(path)
        if trainer is None:
            trainer = Trainer(stack, dataclasses.replace(saved.config, device="cpu", threads=1))
        trainer.restore(saved)
        branch = trainer.branch()
        out.append(structure_gain(trainer.step_context, branch) if branch.encoder is not None else None)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pairs", nargs="+", type=Path, help="RUN_DIR DATA_DIR pairs")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8, 12])
    args = parser.parse_args()
    if len(args.pairs) % 2:
        parser.error("give RUN_DIR DATA_DIR pairs")
    torch.set_num_threads(1)
    print(f"# {' '.join(sys.argv)}; {platform.node()}, torch {torch.__version__}, 1 thread")
    print("| run | " + " | ".join(f"epoch {e}" for e in args.epochs) + " |")
    print("|---|" + "---|" * len(args.epochs))
    for run_dir, data_dir in zip(args.pairs[::2], args.pairs[1::2], strict=True):
        values = gains(run_dir, data_dir, args.epochs)
        cells = ["" if v is None else f"{100 * v:.2f} %" for v in values]
        print(f"| {run_dir.name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
