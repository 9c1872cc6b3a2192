"""A stack larger than the memory given to the process streams from its memory-mapped file (issue 6).

Runs ``bench/stream_memory.py``: the reader, confined to a memory cgroup smaller than the stack,
reads one epoch the way training does. Were the images loaded whole (as the feed does for a stack
that fits), the kernel would kill it (no swap here). Skipped where no memory cgroup can be created.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_stack_larger_than_the_memory_limit_streams():
    limit_mb, stack_mb = 800, 1100  # the reader alone (python, torch, page cache) takes ~450 MB
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "stream_memory.py"),
            f"--limit-mb={limit_mb}",
            f"--stack-mb={stack_mb}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if run.returncode == 2:
        pytest.skip(run.stderr.strip())
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["n_images"] == stack_mb * 2**20 // (128 * 128 * 4)
    assert result["preloaded"] is False
    if result["cgroup_peak_mb"] is not None:
        assert result["cgroup_peak_mb"] <= limit_mb
