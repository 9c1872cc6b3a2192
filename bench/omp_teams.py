"""The encoder's step on a background thread, with and without a second OpenMP team in the process.

Usage::

    python bench/omp_teams.py

Each case runs in its own process: 20 encoder forward + backward + Adam steps
(batch 32, D=64, the shipped encoder) timed on the main thread, then on a
background thread (how a notebook's run trains). In the first case the main
thread has used two torch threads before (so libgomp keeps a second team of
OpenMP threads); in the second it was set to one thread before any torch work
(what ``Reconstruction`` now does: docs/decisions.md#one-omp-team).
"""

from __future__ import annotations

import subprocess
import sys

CASE = r"""
import sys, threading, time, torch
if sys.argv[1] == "main-at-one": torch.set_num_threads(1)
from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.model.encoder import MultiHeadEncoder
enc = MultiHeadEncoder(TrainingConfig().encoder); x = torch.randn(32, 64, 64)
opt = torch.optim.Adam(enc.parameters())
def step():
    enc(x).rotations.sum().backward(); opt.step(); opt.zero_grad()
def bench(label, threads=None):
    if threads: torch.set_num_threads(threads)
    for _ in range(3): step()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(20): step()
    wall = time.perf_counter() - t
    cpu = (time.process_time() - c) / wall
    print(f"  {label}: {1e3 * wall / 20:.1f} ms/step, CPU/wall {cpu:.2f}", flush=True)
bench(f"main thread ({torch.get_num_threads()} torch threads)")
thread = threading.Thread(target=bench, args=("background thread (2 torch threads)", 2))
thread.start(); thread.join()
"""


def main() -> int:
    for case, what in (("main-at-two", "the main thread used 2 torch threads first"),
                       ("main-at-one", "the main thread kept 1 torch thread")):  # fmt: skip
        print(f"{what}:", flush=True)
        subprocess.run([sys.executable, "-c", CASE, case], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
