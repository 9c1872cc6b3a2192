"""How long one rebuild of the direct stage's map takes (engine/rebuild.py), against the previous
back-projection in the same run.

Usage::

    python bench/experiments/rebuild_cost.py RUN_DIR DATA_DIR EPOCH [THREADS]

Restores the checkpoint of ``EPOCH`` of a ``cryospin-lab reconstruct`` folder (a direct-stage
one) and times ``rebuild_map`` three times on ``THREADS`` torch threads (default 2), alternating
with the same rebuild through the previous back-projection (``render_hartley`` of two empty
volumes and autograd back, kept below as the baseline), with and without the feed's full-disc
cache of Hartley values and CTF, and prints the largest difference between the maps of the first
and the last arm relative to the map's largest value. A run pays one rebuild after each direct epoch
(docs/decisions.md#rebuild-map, #backprojection-adjoint).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from _checkpoint import restored_trainer

from cryospin_lab.engine import rescue
from cryospin_lab.engine.rebuild import rebuild_map
from cryospin_lab.physics.render import render_hartley


def previous_backprojection(shape, rotations, disc, observed_ht, *, pixel_size_angstrom, ctf_values=None,
                            shifts_angstrom=None, contrast=-1.0):  # fmt: skip
    """The back-projection before the adjoint scatter: autograd through two renders."""
    with torch.enable_grad():
        sums = torch.zeros(2, *shape, device=observed_ht.device, requires_grad=True)
        kwargs = dict(pixel_size_angstrom=pixel_size_angstrom, ctf_values=ctf_values, contrast=contrast)
        weights = torch.full_like(observed_ht, contrast) if ctf_values is None else contrast * ctf_values
        data = render_hartley(sums[0], rotations, disc, shifts_angstrom=shifts_angstrom, **kwargs)
        unit = render_hartley(sums[1], rotations, disc, **kwargs)
        ((data * observed_ht).sum() + (unit * weights).sum()).backward()
    return sums.grad[0], sums.grad[1]


def main() -> int:
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    trainer, _ = restored_trainer(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), threads=threads)
    torch.set_num_threads(threads)
    print(f"# {' '.join(sys.argv)}; {len(trainer.stack)} images, {threads} threads", flush=True)
    ctx, branch = trainer.step_context, trainer.branch()
    current, cached = rescue.backproject_hartley, trainer.feed._cached
    arms = (
        ("previous back-projection, batches computed", previous_backprojection, None),
        ("previous back-projection, batches cached", previous_backprojection, cached),
        ("adjoint scatter, batches cached (today)", current, cached),
    )
    maps = {}
    for _ in range(3):
        for name, function, table in arms:
            rescue.backproject_hartley, trainer.feed._cached = function, table
            start = time.perf_counter()
            rebuild_map(ctx, branch)
            print(f"rebuild, {name}: {time.perf_counter() - start:.2f} s", flush=True)
            maps[name] = branch.volume.hartley().detach().clone()
    rescue.backproject_hartley, trainer.feed._cached = current, cached
    first, last = maps[arms[0][0]], maps[arms[-1][0]]
    difference = (first - last).abs().max() / first.abs().max()
    print(f"largest difference between the two maps: {float(difference):.1e} of the map's largest value")
    return 0


if __name__ == "__main__":
    sys.exit(main())
