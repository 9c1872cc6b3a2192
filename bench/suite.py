"""The molecule suite: every bundled molecule simulated and reconstructed with the shipped defaults.

Usage::

    python bench/suite.py --quick                               # 5,000 images, run seeds 0 1
    python bench/suite.py --seeds 0 1 2                         # 10,000 images, the whole suite
    python bench/suite.py --molecules hsp90 1u6g --parallel 2   # two runs side by side, one thread each
    python bench/suite.py --shifted --quick                     # particles off-centre, --estimate-shifts

For each molecule of ``simulate.molecules.MOLECULES`` (or ``--molecules``): a
stack simulated by the project's simulator at D=64 (``--box``), SNR 0.1, CTF,
the pixel size from ``--apix auto`` (the molecule spans two thirds of the
box), cached under ``--out``; with ``--shifted``, particles off-centre
uniformly within 3 pixels (the simulator draws in a disc), a tenth of them
within 6 pixels instead, and reconstructed with ``--estimate-shifts``. Then
``cryospin-lab reconstruct`` with the shipped defaults and only ``--seed``
(and ``--threads``, and ``--reconstruct-args`` for a setting under trial)
set, one process per run, ``--parallel`` at a time. Per molecule and seed:
the epoch it left the plateau (its map first reached 3x Nyquist, FSC 0.5
against the truth), the final FSC 0.5 in Å and as a multiple
of Nyquist, the pose error mean/median raw and modulo the molecule's symmetry,
the share of images more than 20° off (modulo symmetry), the switch epoch,
wall time, and whether it got stuck (never left the plateau). Writes
``suite_<label>_<date>.md`` (table, command, machine), ``.jsonl`` (one record
per run) and ``.png`` (resolution against epoch, one panel per molecule) to
``--results``. Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cryospin_lab.analysis import metrics
from cryospin_lab.app.event_file import read_events
from cryospin_lab.engine.events import PhaseChangeEvent, ResolutionEvent
from cryospin_lab.io.star import read_star
from cryospin_lab.simulate import MOLECULES, fitting_pixel_size, molecule, simulate_particles

ROOT = Path(__file__).resolve().parents[1]
PLATEAU_NYQUIST = 3.0  # a run has left the plateau once its map reaches this multiple of Nyquist
SHIFT_PIXELS = 3.0
OUTLIERS = (0.1, 6.0)  # --shifted: a tenth of the images within 6 pixels instead (badly picked)


def simulate(name: str, args, out: Path):
    """The molecule's stack (cached: a complete folder is reused)."""
    mol = molecule(name)
    apix = fitting_pixel_size(mol.path, args.box, map_pixel_size_angstrom=mol.map_pixel_size_angstrom)
    shift = SHIFT_PIXELS * apix if args.shifted else 0.0
    outliers = (OUTLIERS[0], OUTLIERS[1] * apix) if args.shifted else (0.0, 0.0)
    folder = out / "data" / f"{name}_n{args.n}_box{args.box}_snr{args.snr:g}_shift{shift:.3g}"
    folder = folder.with_name(folder.name + (f"_outliers{outliers[0]:g}" if args.shifted else ""))
    star = folder / "particles.star"
    if not star.is_file():
        simulate_particles(
            mol.path, out_dir=folder, box_size=args.box, pixel_size_angstrom=apix, n_particles=args.n,
            snr=args.snr, max_shift_angstrom=shift, seed=0, progress=False, outlier_fraction=outliers[0],
            outlier_max_shift_angstrom=outliers[1],
            map_pixel_size_angstrom=mol.map_pixel_size_angstrom,
        )  # fmt: skip
    return folder, apix


def reconstruct(name: str, seed: int, folder: Path, args, out: Path) -> dict:
    """One ``cryospin-lab reconstruct`` run with the defaults; its record."""
    run_dir = out / "runs" / f"{name}_seed{seed}{'_shifted' if args.shifted else ''}"
    argv = [sys.executable, "-m", "cryospin_lab", "reconstruct", str(folder / "particles.star")]
    argv += ["--out", str(run_dir), "--seed", str(seed), "--threads", str(args.threads), "--no-progress"]
    argv += ["--ground-truth", str(folder / "ground_truth.mrc")]
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    if args.shifted:
        argv.append("--estimate-shifts")
    argv += shlex.split(args.reconstruct_args)  # e.g. a setting under trial
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - start
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (run_dir.parent / f"{run_dir.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"molecule": name, "seed": seed, "failed": done.stderr[-2000:], "wall_s": wall}
    return summarise(name, seed, folder, run_dir, wall)


def summarise(name: str, seed: int, folder: Path, run_dir: Path, wall: float) -> dict:
    events = read_events(run_dir / "events.jsonl")
    apix = read_star(folder / "particles.star").pixel_size_angstrom
    nyquist = 2 * float(apix)
    curve = [
        (e.epoch, e.resolution_angstrom)
        for e in events
        if isinstance(e, ResolutionEvent) and e.kind == "ground_truth" and e.branch == "main"
    ]
    left = next((epoch for epoch, res in curve if res <= PLATEAU_NYQUIST * nyquist), None)
    switch = [e.epoch for e in events if isinstance(e, PhaseChangeEvent) and e.new.value == "direct"]
    truth, estimate = read_star(folder / "particles.star"), read_star(run_dir / "poses.star")
    raw = metrics.pose_error(truth.rotations, estimate.rotations)
    symmetry = molecule(name).symmetry_rotations()
    modulo = raw if symmetry is None else metrics.pose_error(
        truth.rotations, estimate.rotations, symmetry_rotations=symmetry
    )  # fmt: skip
    record = {
        "molecule": name,
        "seed": seed,
        "pixel_size_angstrom": float(apix),
        "left_plateau_epoch": left,
        "stuck": left is None,
        "resolution_angstrom": curve[-1][1],
        "resolution_x_nyquist": curve[-1][1] / nyquist,
        "pose_error_mean_deg": raw.mean_deg,
        "pose_error_median_deg": raw.median_deg,
        "pose_error_mean_mod_sym_deg": modulo.mean_deg,
        "pose_error_median_mod_sym_deg": modulo.median_deg,
        "share_over_20_deg": float(np.mean(np.asarray(modulo.errors_deg) > 20.0)),
        "switch_epoch": switch[0] if switch else None,
        "wall_s": wall,
        "curve": curve,
    }
    if truth.shifts_angstrom is not None and float(truth.shifts_angstrom.abs().max()) > 0:
        error = metrics.shift_error_angstrom(
            truth.shifts_angstrom, estimate.shifts_angstrom, estimate.rotations
        )
        record["shift_error_median_px"] = error.median_angstrom / float(apix)
    return record


def write_results(records: list[dict], args, label: str) -> Path:
    today = datetime.date.today().isoformat()
    dated = label if re.search(r"\d{4}-\d{2}-\d{2}$", label) else f"{label}_{today}"  # one date, not two
    stem = Path(args.results) / f"suite_{dated}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".jsonl"), "w") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    lines = [
        f"# The molecule suite ({label}): {args.n} images, D={args.box}, SNR {args.snr:g}, shipped defaults",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in [sys.executable.split('/')[-1], *sys.argv])}`",
        f"Machine: {platform.node()}, {os.cpu_count()} cores, {args.parallel} run(s) at a time with "
        f"{args.threads} thread(s) each; torch {torch.__version__}; {today}.",
        "",
        "| molecule | seed | Å/px | left plateau (epoch) | FSC 0.5 (Å) | x Nyquist "
        "| pose error mean / median (°) | modulo symmetry (°) | > 20° off | switch | wall (s) | stuck |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "failed" in r:
            lines.append(f"| {r['molecule']} | {r['seed']} | failed: {r['failed'][-200:]!r} |")
            continue
        lines.append(
            f"| {r['molecule']} | {r['seed']} | {r['pixel_size_angstrom']:.2f} | {r['left_plateau_epoch']} | "
            f"{r['resolution_angstrom']:.1f} | {r['resolution_x_nyquist']:.2f} | "
            f"{r['pose_error_mean_deg']:.1f} / {r['pose_error_median_deg']:.1f} | "
            f"{r['pose_error_mean_mod_sym_deg']:.1f} / {r['pose_error_median_mod_sym_deg']:.1f} | "
            f"{100 * r['share_over_20_deg']:.0f} % | {r['switch_epoch']} | {r['wall_s']:.0f} | "
            f"{'**stuck**' if r['stuck'] else 'no'} |"
        )
    lines += ["", f"Plot: `{stem.name}.png`; raw records: `{stem.name}.jsonl`."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(records, stem.with_suffix(".png"))
    return stem.with_suffix(".md")


def plot(records: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    names = sorted({r["molecule"] for r in records})
    fig = Figure(figsize=(4 * len(names), 3.2))
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        nyquist = None  # stays None where every run of the molecule failed
        for r in records:
            if r["molecule"] == name and "curve" in r:
                epochs, res = zip(*r["curve"], strict=True)
                ax.plot(epochs, res, label=f"seed {r['seed']}")
                nyquist = 2 * r["pixel_size_angstrom"]
        if nyquist is not None:
            ax.axhline(nyquist, color="grey", lw=0.8, ls="--")
        ax.set(title=name, xlabel="epoch", ylabel="FSC 0.5 vs truth (Å)", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--molecules", nargs="+", default=sorted(MOLECULES), choices=sorted(MOLECULES))
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="run seeds (default 0 1 2; quick: 0 1)"
    )
    parser.add_argument("--quick", action="store_true", help="5,000 images instead of 10,000")
    parser.add_argument("--n", type=int, default=None, help="images per molecule (overrides --quick)")
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=None, help="default: the shipped default")
    parser.add_argument("--shifted", action="store_true", help="particles off-centre; --estimate-shifts")
    parser.add_argument(
        "--reconstruct-args", default="", help="more reconstruct options, e.g. '--rescue-extra-epochs 10'"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cryospin-suite"))
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--label",
        default=None,
        help="name in the result files, dated unless it ends with a date (default: quick/full)",
    )
    args = parser.parse_args()
    args.n = args.n or (5000 if args.quick else 10000)
    args.seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2])
    label = args.label or ("quick" if args.quick else "full") + ("_shifted" if args.shifted else "")
    folders = {name: simulate(name, args, args.out)[0] for name in args.molecules}
    jobs = [(name, seed) for name in args.molecules for seed in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(reconstruct, name, seed, folders[name], args, args.out) for name, seed in jobs]
        records = []
        for future in futures:
            records.append(future.result())
            print(json.dumps({k: v for k, v in records[-1].items() if k != "curve"}), flush=True)
    print(f"written {write_results(records, args, label)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
