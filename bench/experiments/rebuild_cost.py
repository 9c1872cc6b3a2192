"""How long one rebuild of the direct stage's map takes (engine/rebuild.py).

Usage::

    python bench/experiments/rebuild_cost.py RUN_DIR DATA_DIR EPOCH [THREADS]

Restores the checkpoint of ``EPOCH`` of a ``cryospin-lab reconstruct`` folder (a direct-stage
one) and times ``rebuild_map`` three times on ``THREADS`` torch threads (default 2): the
back-projection of every image at its pose, which a run pays after each direct epoch while its
poses move and after its last (docs/decisions.md#rebuild-map).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from _checkpoint import restored_trainer

from cryospin_lab.engine.rebuild import rebuild_map


def main() -> int:
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    trainer, _ = restored_trainer(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), threads=threads)
    torch.set_num_threads(threads)
    print(f"# {' '.join(sys.argv)}; {len(trainer.stack)} images, {threads} threads", flush=True)
    for _ in range(3):
        start = time.perf_counter()
        rebuild_map(trainer.step_context, trainer.branch())
        print(f"rebuild: {time.perf_counter() - start:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
