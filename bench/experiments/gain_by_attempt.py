"""The structure gain and the resolution against the truth at each epoch of each attempt of kept runs.

Usage::

    python bench/experiments/gain_by_attempt.py RUN_DIR [RUN_DIR ...]

For each run (a suite run's directory, with its ``metrics.csv`` and ``events.jsonl``): one line
per amortized attempt with, for each of its epochs, the structure gain (%) the stuck-start check
reads and the FSC-vs-truth resolution (Å), and how the attempt ended (restarted, switched). Shows
which attempts the check restarted and whether they had already left the plateau, which the
suite's end-of-run table hides. Reads files only; no torch.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def attempts(run: Path) -> list[tuple[list[str], str]]:
    """``(cells, ending)`` per amortized attempt of the run's main branch: cells "gain/Å" per epoch."""
    restarts = set()
    for line in (run / "events.jsonl").read_text().splitlines():
        fields = json.loads(line).get("fields", {})
        if fields.get("reason") == "restart" and fields.get("branch") == "main":
            restarts.add(int(fields["epoch"]))
    out: list[tuple[list[str], str]] = []
    cells: list[str] = []
    for row in csv.DictReader((run / "metrics.csv").open()):
        if row["branch"] != "main":
            continue
        if row["phase"] != "amortized":
            out.append((cells, f"switched after epoch {int(row['epoch']) - 1}"))
            return out
        gain = float(row["structure_gain_pct"]) if row["structure_gain_pct"] else float("nan")
        cells.append(f"{gain:.1f}/{float(row['resolution_angstrom']):.0f}")
        if int(row["epoch"]) in restarts:
            out.append((cells, f"restarted after epoch {row['epoch']}"))
            cells = []
    out.append((cells, "still amortized at the end"))
    return out


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    print(f"# {' '.join(sys.argv)}")
    print("# per attempt: structure gain (%) / FSC-vs-truth 0.5 (Å) at each of its epochs")
    for run in map(Path, sys.argv[1:]):
        for number, (cells, ending) in enumerate(attempts(run), 1):
            print(f"{run.parent.parent.name}/{run.name} attempt {number}: {' '.join(cells)} | {ending}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
