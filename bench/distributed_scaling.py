"""Epoch time of ``cryospin-lab reconstruct`` with 1 process and with N torchrun ranks (gloo on CPU).

Runs the embedded HSP90 set (``--n`` images, D=64) for ``--epochs`` epochs: switch after the
first, so both stages are timed, once per configuration. The one-process run gets all
``--threads`` torch threads; with N ranks each rank gets ``threads / N``, so the runs share the
same cores. Prints one line per run (epoch times from its ``metrics.csv``) and a Markdown table.

    .venv/bin/python bench/distributed_scaling.py --n 2000 --ranks 2 --threads 2

On GPUs (one node, N devices), the same command with ``--device cuda``: each rank uses its own
GPU (``LOCAL_RANK``) and nccl.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cryospin_lab.engine.distributed import free_port
from cryospin_lab.simulate import datasets


def run(star: Path, out: Path, ranks: int, threads: int, epochs: int, device: str) -> list[dict]:
    args = ["reconstruct", str(star), "--out", str(out), "--epochs", str(epochs), "--switch", "1"]
    args += ["--threads", str(threads), "--device", device, "--no-progress"]
    if ranks == 1:
        argv = [sys.executable, "-m", "cryospin_lab", *args]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        argv = [torchrun, "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
        argv += ["-m", "cryospin_lab", *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    started = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    with open(out / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        row["process_wall_s"] = wall
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images of the HSP90 set (D=64)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    star = datasets.hsp90(n_particles=args.n, progress=False).star_path
    results = {}
    with tempfile.TemporaryDirectory(prefix="cryospin-scaling-") as tmp:
        for ranks in (1, args.ranks):
            threads = max(args.threads // ranks, 1)
            rows = run(Path(star), Path(tmp) / f"ranks{ranks}", ranks, threads, args.epochs, args.device)
            results[ranks] = rows
            times = ", ".join(f"{r['phase']} {float(r['epoch_time_s']):.1f} s" for r in rows)
            print(f"{ranks} rank(s) x {threads} thread(s): {times}", flush=True)
    print(f"\n{platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.n} images D=64\n")
    print(
        "| ranks x threads | "
        + " | ".join(f"epoch {i + 1} ({r['phase']}) s" for i, r in enumerate(results[1]))
        + " |"
    )
    print("|---|" + "---|" * len(results[1]))
    for ranks, rows in results.items():
        threads = max(args.threads // ranks, 1)
        cells = " | ".join(f"{float(r['epoch_time_s']):.1f}" for r in rows)
        print(f"| {ranks} x {threads} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
