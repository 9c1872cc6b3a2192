"""A particle stack larger than the process's memory streams from its memory-mapped file.

Writes a stack of random images (``--stack-mb``, box ``--box``), then reads it the way training
does (``ParticleStack`` + ``ParticleFeed``, one epoch of batches with their Hartley values and
CTF-free transforms) in a child process confined to a memory cgroup of ``--limit-mb`` (cgroup v1
or v2, created under this process's own memory cgroup; needs the right to create one, e.g. root
in a container). Prints the stack size, the limit, whether the feed preloaded the images, the
child's peak RSS (``ru_maxrss``), the cgroup's peak usage and the read rate, as JSON on the last
line. Exit status 2 when no memory cgroup can be created here (nothing measured).

    .venv/bin/python bench/stream_memory.py --limit-mb 600 --stack-mb 1000

Not a pass/fail benchmark; ``tests/app/test_memory.py`` runs it small.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np

CHILD = """
import json, resource, sys, time
import numpy as np, torch
from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.model.encoder import EncoderConfig
from cryospin_lab.engine.feed import ParticleFeed, available_memory_bytes

torch.set_num_threads(1)
stack = ParticleStack(sys.argv[1], pixel_size_angstrom=3.0)
config = TrainingConfig(encoder=EncoderConfig(box_size=stack.box_size), device="cpu", batch_size=256)
t0 = time.perf_counter()
feed = ParticleFeed(stack, config, torch.device("cpu"))
disc = feed.disc(10**6)
n = 0
checksum = 0.0
for indices in feed.epoch_batches(0):
    images, observed, _ = feed.batch(indices, disc)
    n += len(indices)
    checksum += float(observed.sum())
seconds = time.perf_counter() - t0
print(json.dumps({
    "n_images": n, "preloaded": feed.images is not None, "seconds": seconds,
    "available_mb_at_start": available_memory_bytes() / 2**20,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def memory_cgroup() -> tuple[Path, str] | None:
    """This process's memory cgroup folder and its version ("v1" or "v2"), if one can be found."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, group = line.split(":", 2)
        if controllers == "":
            base = Path("/sys/fs/cgroup" + group)
            if (base / "cgroup.controllers").exists():
                return base, "v2"
        elif "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory" + group), "v1"
    return None


def make_cgroup(limit_bytes: int) -> tuple[Path, str]:
    found = memory_cgroup()
    if found is None:
        raise OSError("no memory cgroup found in /proc/self/cgroup")
    parent, version = found
    group = parent / f"cryospin-stream-{os.getpid()}"
    group.mkdir()
    try:
        if version == "v1":
            (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        else:
            (group / "memory.max").write_text(str(limit_bytes))
            (group / "memory.swap.max").write_text("0")
    except OSError:
        group.rmdir()
        raise
    return group, version


def write_stack(path: Path, box: int, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with mrcfile.new_mmap(path, shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
        mrc.voxel_size = 3.0
        for start in range(0, n, 1024):
            stop = min(start + 1024, n)
            mrc.data[start:stop] = rng.standard_normal((stop - start, box, box), dtype=np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-mb", type=int, default=600, help="memory cgroup limit of the reader")
    parser.add_argument("--stack-mb", type=int, default=1000, help="size of the image stack")
    parser.add_argument("--box", type=int, default=128)
    args = parser.parse_args()
    n = args.stack_mb * 2**20 // (args.box * args.box * 4)
    try:
        group, version = make_cgroup(args.limit_mb * 2**20)
    except OSError as err:
        print(f"cannot create a memory cgroup here ({err}); nothing measured", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="cryospin-stream-") as tmp:
            stack = Path(tmp) / "big.mrcs"
            t0 = time.perf_counter()
            write_stack(stack, args.box, n)
            print(f"wrote {n} images of {args.box}^2 ({stack.stat().st_size / 2**20:.0f} MB) in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
            procs = group / "cgroup.procs"

            def enter_group() -> None:
                procs.write_text(str(os.getpid()))

            child = subprocess.run(
                [sys.executable, "-c", CHILD, str(stack)],
                capture_output=True,
                text=True,
                preexec_fn=enter_group,
                timeout=1800,
            )
            peak_file = group / ("memory.max_usage_in_bytes" if version == "v1" else "memory.peak")
            peak = int(peak_file.read_text()) if peak_file.exists() else None
    finally:
        group.rmdir()
    if child.returncode != 0:
        killed = " (killed: out of memory?)" if child.returncode < 0 else ""
        print(
            f"reader failed with status {child.returncode}{killed}\n{child.stderr[-3000:]}", file=sys.stderr
        )
        return 1
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result.update(
        stack_mb=n * args.box * args.box * 4 / 2**20,
        limit_mb=args.limit_mb,
        cgroup=version,
        cgroup_peak_mb=None if peak is None else peak / 2**20,
        images_per_s=result["n_images"] / result["seconds"],
    )
    cgroup_peak = result["cgroup_peak_mb"] or float("nan")
    print(
        f"stack {result['stack_mb']:.0f} MB, limit {args.limit_mb} MB: preloaded {result['preloaded']}, "
        f"cgroup peak {cgroup_peak:.0f} MB, peak RSS {result['peak_rss_mb']:.0f} MB (counts the mapped "
        f"file's cached pages, which the kernel can drop), {result['images_per_s']:.0f} images/s"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
