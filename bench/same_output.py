"""Same results before and after a change: seeded short reconstructions by two versions of the code.

Usage::

    python bench/same_output.py                      # against BASELINE (the commit before the redesign)
    python bench/same_output.py --baseline HEAD~3    # against any git revision

A refactoring must not change what a run computes. This script checks out
``--baseline`` into a temporary git worktree and, for each case below, runs
the same commands with both versions, each in its own process on one thread
(torch's CPU kernels are deterministic at a fixed thread count):

1. ``simulate`` a small stack from the embedded HSP90 model (both versions
   must write the same ``particles.star`` and ``particles.mrcs``);
2. ``reconstruct`` it for 2 epochs with a fixed seed, switching after
   epoch 1 so that both stages run; then the same in gold-standard mode with
   shift estimation (two half sets, shift heads, the half-map alignment).

It compares ``map.mrc`` (and the half maps) voxel for voxel, ``poses.star``
byte for byte, and the numbers of ``metrics.csv`` except the wall-time
column, prints one line per file and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mrcfile
import numpy as np

REPO = Path(__file__).resolve().parents[1]
# The last commit before the redesign of issue 18 (layout, settings, trainer internals).
BASELINE = "88daf21"
MODEL = "cryospin_lab/assets/2cg9.pdb.gz"  # the same file under both revisions
CASES = {
    "two_stages": ["--switch", "1"],
    "gold_shifts": ["--switch", "1", "--gold-standard", "--estimate-shifts"],
}
TIME_COLUMNS = {"wall_time_s", "epoch_time_s"}


def cli(tree: Path) -> list[str]:
    """How to call a revision's command line: ``python -m cryospin_lab`` where it has one."""
    if (tree / "cryospin_lab" / "__main__.py").is_file():
        return [sys.executable, "-m", "cryospin_lab"]
    # revisions before the redesign (issue 18) had their command line in cryospin_lab/cli.py
    return [sys.executable, "-c", "import sys; from cryospin_lab.cli import main; sys.exit(main())"]


def run(tree: Path, args: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    done = subprocess.run([*cli(tree), *args], cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")


def produce(tree: Path, out: Path, n: int, box: int) -> None:
    """Simulate and reconstruct every case with the code in ``tree``, into ``out``."""
    data = out / "data"
    run(tree, ["simulate", str(tree / MODEL), "--out", str(data), "--box", str(box), "--apix", "4.0"]
        + ["--n", str(n), "--seed", "1", "--max-shift-angstrom", "4", "--no-progress"])  # fmt: skip
    for name, extra in CASES.items():
        run(tree, ["reconstruct", str(data / "particles.star"), "--out", str(out / name), "--epochs", "2"]
            + ["--seed", "3", "--threads", "1", "--device", "cpu", "--no-progress", "--heads", "3"]
            + ["--ground-truth", str(data / "ground_truth.mrc"), *extra])  # fmt: skip


def compare_maps(a: Path, b: Path) -> str | None:
    with mrcfile.open(a, permissive=True) as ma, mrcfile.open(b, permissive=True) as mb:
        if ma.data.shape != mb.data.shape:
            return f"shape {ma.data.shape} vs {mb.data.shape}"
        if float(ma.voxel_size.x) != float(mb.voxel_size.x):
            return f"voxel size {ma.voxel_size.x} vs {mb.voxel_size.x}"
        diff = np.abs(ma.data.astype(np.float64) - mb.data.astype(np.float64)).max()
        return None if diff == 0 else f"max |difference| {diff:.3g}"


def compare_metrics(a: Path, b: Path) -> str | None:
    rows = [list(csv.DictReader(p.open())) for p in (a, b)]
    if len(rows[0]) != len(rows[1]):
        return f"{len(rows[0])} vs {len(rows[1])} rows"
    for ra, rb in zip(*rows, strict=True):
        for key in ra:
            if key not in TIME_COLUMNS and ra[key] != rb.get(key):
                return f"epoch {ra.get('epoch')} {key}: {ra[key]} vs {rb.get(key)}"
    return None


def star_text(path: Path) -> list[str]:
    """The STAR file's lines without starfile's "# Created by ... at TIME" stamp."""
    return [line for line in path.read_text().splitlines() if not line.startswith("# Created by")]


def compare(base: Path, new: Path) -> int:
    files = [Path("data/particles.star"), Path("data/particles.mrcs")]
    for case in CASES:
        files += sorted(p.relative_to(base) for p in (base / case).glob("*") if p.is_file())
    failures = 0
    for rel in files:
        a, b = base / rel, new / rel
        if not b.exists():
            problem = "missing in the new version"
        elif rel.suffix in (".mrc", ".mrcs"):
            problem = compare_maps(a, b)
        elif rel.name == "metrics.csv":
            problem = compare_metrics(a, b)
        elif rel.suffix == ".star":
            problem = None if star_text(a) == star_text(b) else "text differs"
        else:
            continue  # plots and logs carry times
        failures += problem is not None
        print(f"{'DIFFERS' if problem else 'same   '}  {rel}" + (f": {problem}" if problem else ""))
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--baseline", default=BASELINE, help=f"git revision to compare with (default {BASELINE})"
    )
    parser.add_argument("--n", type=int, default=200, help="particles (default 200)")
    parser.add_argument("--box", type=int, default=32, help="box size (default 32)")
    parser.add_argument("--keep", type=Path, default=None, help="keep both versions' outputs here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="same-output-") as tmp:
        work = args.keep or Path(tmp)
        tree = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.baseline],
                       check=True, capture_output=True)  # fmt: skip
        try:
            print(f"baseline {args.baseline} in {tree}; this checkout {REPO}")
            produce(tree, work / "baseline_out", args.n, args.box)
            produce(REPO, work / "current_out", args.n, args.box)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        failures = compare(work / "baseline_out", work / "current_out")
    print("identical results" if not failures else f"{failures} file(s) differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
