"""cryospin-lab beside cryoDRGN on the same particles, same machine: time, peak memory, pose error, FSC.

cryoDRGN (4.3, its ``abinit`` with ``--zdim 0``: homogeneous ab-initio, cryoDRGN-AI) runs from its
own virtual environment, never this package's (it pins plotly<7)::

    python3 -m venv bench/.venv-cryodrgn
    bench/.venv-cryodrgn/bin/pip install torch==2.13.0        # the CPU build first
    bench/.venv-cryodrgn/bin/pip install "cryodrgn>=4.3,<4.4"
    .venv/bin/python bench/peer_cryodrgn.py --n 1000 --epochs 4 --threads 2
    .venv/bin/python bench/peer_cryodrgn.py --n 10000 --epochs 30 --heads-variants 1 2 --repeats 3
    .venv/bin/python bench/peer_cryodrgn.py --n 2000 --epochs 20 --heads-variants 1 2 --skip-drgn

cryoDRGN runs with ``--no-trans`` (the simulated particles are centred and ours searches no
shifts either), ``--checkpoint 1`` (a map per epoch, for the resolution-vs-time curve) and, by
default, ``--explicit-volume`` (a voxel array like ours; ``--drgn-volume implicit`` for its
default MLP), and is stopped after ``--drgn-timeout-min`` (default 120; the table is then written
with our rows). On CPU its hierarchical pose search is the bottleneck, slowest with the MLP and
the translation search (docs/decisions.md#peer-cryodrgn-settings); a GPU is what it is built for.

Both read the same simulated RELION 3.1 STAR + MRCS (D=64, SNR 0.1, CTF with EMPIAR-10028's defocus
values, centred): by default the HSP90 set (``simulate.datasets.hsp90``, 3 Å/px), or with ``--molecule
ribosome`` a set simulated from the 70S ribosome map in ``tests/data/maps`` (5 Å/px, no symmetry;
cached under ``--out``). cryoDRGN's CTF comes from its own ``parse_ctf_star``. Its outputs
(``pose.<E>.pkl``, ``reconstruct.<E>.mrc``) are converted by a script run *in its environment*
(its own ``utils.load_pkl`` on files it just wrote; nothing here unpickles). Its rotation
convention is found, not assumed: ``parse_pose_star`` on the STAR's true poses, converted the same
way, must give our true rotations or their transposes.

Measured per method (wall time and peak RSS of the process, from ``os.wait4``): mean/median pose
error after the best global rotation and hand (and, for HSP90, modulo its pseudo two-fold), FSC 0.5
resolution against the true map after alignment, the time to reach twice the Nyquist resolution
and a resolution-vs-time curve per run (paper Fig. 3); ``--repeats K`` runs each method K times
(seeds seed..seed+K-1) and reports medians with (min-max); ``--reuse`` keeps our runs already in
``--out`` that ran the same command line (each run's ``ours-*.run.json`` holds it with its wall
time and peak RSS), so ``--repeats 3 --reuse`` after a one-seed table runs only the new seeds.
``--heads-variants 1 2`` adds our fully amortized runs with 1 and 2 heads (cryoAI-like). Writes a
Markdown table with the machine, versions, seeds and command, and a plot, to ``--results``
(default ``bench/results/``). Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cryospin_lab.analysis import metrics
from cryospin_lab.io.maps import read_map
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.io.star import read_star
from cryospin_lab.simulate import datasets
from cryospin_lab.simulate.simulator import SimulationResult, simulate_particles

ROOT = Path(__file__).resolve().parents[1]
DRGN_VENV = ROOT / "bench" / ".venv-cryodrgn"
RIBOSOME_MAP = ROOT / "tests" / "data" / "maps" / "clean70SRibosome_vol_65p.mrc"
MOLECULES = {
    "hsp90": "HSP90 (2CG9, 3 Å/px)",
    "ribosome": "70S ribosome (ASPIRE's map, 5 Å/px)",
}

CONVERT = """
import sys, numpy as np
from cryodrgn import utils
poses = utils.load_pkl(sys.argv[1])
rot = poses[0] if isinstance(poses, tuple) else poses
np.save(sys.argv[2], np.asarray(rot, dtype=np.float64))
"""


def timed(argv: list[str], log: Path, env: dict | None = None, timeout_s: float | None = None) -> dict:
    """Run ``argv`` with its output in ``log``; wall seconds and peak RSS (MB) of the process.
    Past ``timeout_s`` the process is killed and TimeoutError raised."""
    started, started_epoch = time.perf_counter(), time.time()
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if timeout_s is not None and time.perf_counter() - started > timeout_s:
                process.kill()
                process.wait()
                raise TimeoutError(f"{shlex.join(argv[:2])} still running after {timeout_s:.0f} s: killed")
            time.sleep(0.5)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{shlex.join(argv)} failed with status {code}; end of {log}:\n{tail}")
    return {"wall_s": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "started_at": started_epoch}


def drgn(*args: str) -> list[str]:
    return [str(DRGN_VENV / "bin" / "cryodrgn"), *args]


def drgn_rotations(pkl: Path, out: Path) -> np.ndarray:
    subprocess.run([str(DRGN_VENV / "bin" / "python"), "-c", CONVERT, str(pkl), str(out)], check=True)
    return np.load(out, allow_pickle=False)


def convention(true_rotations: np.ndarray, parsed: np.ndarray) -> bool:
    """True if cryoDRGN's matrices are our rotations transposed, False if the same; else an error."""
    same = np.abs(parsed - true_rotations).max()
    transposed = np.abs(parsed.transpose(0, 2, 1) - true_rotations).max()
    if min(same, transposed) > 1e-3:
        raise RuntimeError(f"cryoDRGN's parse_pose_star rotations match ours neither as is ({same:.2g}) "
                           f"nor transposed ({transposed:.2g})")  # fmt: skip
    return transposed < same


def particle_set(molecule: str, n: int, cache: Path) -> tuple[SimulationResult, torch.Tensor | None]:
    """The simulated set (D=64, SNR 0.1, CTF, centred, seed 0) and the rotations that count as the
    same pose for the pose error (HSP90's pseudo two-fold; None for the ribosome)."""
    if molecule == "hsp90":
        return datasets.hsp90(n_particles=n, progress=False), datasets.hsp90_pseudo_symmetry()
    out = cache / f"ribosome_n{n}_box64_apix5_snr0.1_seed0"
    try:
        sim = SimulationResult.load(out)
        if sim.n_particles == n:
            return sim, None
    except (FileNotFoundError, ValueError):
        pass
    # the map's header has no voxel size; RELION projected it at 5 Å/px (tests/data/MANIFEST.md)
    sim = simulate_particles(
        RIBOSOME_MAP, out_dir=out, box_size=64, pixel_size_angstrom=5.0, n_particles=n, snr=0.1,
        ctf=True, defocus="empiar10028", seed=0, map_pixel_size_angstrom=5.0, progress=False,
    )  # fmt: skip
    return sim, None


def evaluate(volume_path: Path, rotations: np.ndarray, sim, pixel_size: float, symmetry) -> dict:
    truth_map, _ = read_map(sim.ground_truth_path)
    volume, _ = read_map(volume_path)
    curve, _ = metrics.fsc_vs_ground_truth(volume, truth_map, pixel_size)
    stack = ParticleStack(sim.star_path)
    true = torch.as_tensor(stack.metadata.rotations, dtype=torch.float64)
    est = torch.as_tensor(rotations, dtype=torch.float64)
    plain = metrics.pose_error(true, est)
    mate = plain if symmetry is None else metrics.pose_error(true, est, symmetry_rotations=symmetry)
    return {
        "resolution_angstrom": curve.resolution_at_0_5,
        "pose_mean_deg": plain.mean_deg,
        "pose_median_deg": plain.median_deg,
        "pose_mean_mate_deg": mate.mean_deg,
        "pose_median_mate_deg": mate.median_deg,
    }


def resolution_curve_ours(events_path: Path) -> list[tuple[float, float]]:
    """(training-clock seconds, FSC-0.5 resolution vs the true map) of every epoch of branch main,
    from the run's ``events.jsonl`` (its ResolutionEvents, aligned to the truth by the trainer)."""
    curve = []
    for line in events_path.read_text().splitlines():
        record = json.loads(line)
        fields = record["fields"]
        if (
            record["type"] == "ResolutionEvent"
            and fields["kind"] == "ground_truth"
            and fields["branch"] == "main"
        ):
            curve.append((float(fields["time_s"]), float(fields["resolution_angstrom"])))
    return curve


def resolution_curve_drgn(out: Path, started_at: float, sim, pixel_size: float) -> list[tuple[float, float]]:
    """(seconds since cryoDRGN's process started, FSC-0.5 resolution vs the true map after alignment)
    of each ``reconstruct.<E>.mrc`` it wrote (one per epoch with ``--checkpoint 1``), by file time."""
    truth_map, _ = read_map(sim.ground_truth_path)
    maps = sorted(out.glob("reconstruct.*.mrc"), key=lambda p: int(p.stem.split(".")[1]))
    curve = []
    for path in maps:
        volume, _ = read_map(path, voxel_size_angstrom=pixel_size)
        fsc, _ = metrics.fsc_vs_ground_truth(volume, truth_map, pixel_size)
        curve.append((path.stat().st_mtime - started_at, fsc.resolution_at_0_5))
    return curve


def time_to(curve: list[tuple[float, float]], angstrom: float) -> float | None:
    """First time the curve reaches ``angstrom`` or better; None if it never does."""
    return next((t for t, r in curve if r <= angstrom), None)


def run_ours(args, star: Path, truth: Path, name: str, switch: str, heads: int, seed: int, sim, apix):
    out = args.out / f"ours-{switch}-h{heads}-s{seed}"
    argv = [sys.executable, "-m", "cryospin_lab", "reconstruct", str(star), "--out", str(out)]
    argv += ["--epochs", str(args.epochs), "--switch", switch, "--threads", str(args.threads)]
    argv += ["--heads", str(heads), "--seed", str(seed), "--ground-truth", str(truth), "--no-progress"]
    record = args.out / f"{out.name}.run.json"
    run = reused_run(record, argv, out) if args.reuse else None
    if run is None:
        subprocess.run(["rm", "-rf", str(out), str(record)], check=True)
        run = timed(argv, args.out / f"{out.name}.log")
        record.write_text(json.dumps({"argv": argv[1:], **run}, indent=1))
    else:
        print(f"{name}: seed {seed} reused from {out} ({record.name})", flush=True)
    curve = resolution_curve_ours(out / "events.jsonl")
    row = {
        **run,
        **evaluate(out / "map.mrc", _our_rotations(out / "poses.star"), sim, apix, args.symmetry),
        "curve": curve,
    }
    print(name, json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    return row


def reused_run(record: Path, argv: list[str], out: Path) -> dict | None:
    """``--reuse``: the timing of the finished run ``record`` describes, if it ran this command line
    (the interpreter aside) and its outputs are in ``out``; else None (it runs again)."""
    if not record.is_file():
        return None
    saved = json.loads(record.read_text())
    done = all((out / name).is_file() for name in ("map.mrc", "poses.star", "events.jsonl"))
    if saved.get("argv") != argv[1:] or not done:
        return None
    return {key: saved[key] for key in ("wall_s", "peak_rss_mb", "started_at")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images of the simulated set (D=64)")
    parser.add_argument("--molecule", choices=sorted(MOLECULES), default="hsp90", help="default hsp90")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--drgn-epochs", type=int, default=None, help="cryoDRGN's epochs (default --epochs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per method (seeds seed, seed+1, ...)")
    parser.add_argument(
        "--heads-variants", type=int, nargs="*", default=[], help="ours fully amortized with H heads, too"
    )
    parser.add_argument("--skip-drgn", action="store_true", help="our rows only")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep our runs already in --out that ran the same command (their OUT/ours-*.run.json), "
        "e.g. to add seeds to a table; the others run",
    )
    parser.add_argument(
        "--drgn-volume",
        choices=["explicit", "implicit"],
        default="explicit",
        help="cryoDRGN's volume: a voxel array (--explicit-volume, like ours; default) or its default MLP",
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/cryospin-peer-cryodrgn"))
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--drgn-timeout-min", type=float, default=120.0, help="stop cryoDRGN after this")
    args = parser.parse_args()
    if not args.skip_drgn and not (DRGN_VENV / "bin" / "cryodrgn").exists():
        print(f"cryoDRGN is not installed in {DRGN_VENV}: see this script's docstring", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    sim, args.symmetry = particle_set(args.molecule, args.n, args.out)
    star, data_dir = Path(sim.star_path), Path(sim.star_path).parent
    truth = Path(sim.ground_truth_path)
    pixel_size = float(ParticleStack(star).pixel_size_angstrom)
    runs: dict[str, list[dict]] = {}
    seeds = [args.seed + k for k in range(args.repeats)]

    # ours: the semi-amortized default (auto switch), fully amortized, and fewer heads
    methods = [
        ("cryospin-lab semi-amortized (H=7)", "auto", 7),
        ("cryospin-lab fully amortized (H=7)", "never", 7),
    ]
    methods += [(f"cryospin-lab fully amortized (H={h})", "never", h) for h in args.heads_variants]
    for name, switch, heads in methods:
        runs[name] = [
            run_ours(args, star, truth, name, switch, heads, seed, sim, pixel_size) for seed in seeds
        ]

    if not args.skip_drgn:
        name = f"cryoDRGN 4.3 abinit (zdim 0, {args.drgn_volume} volume)"
        try:
            ctf, transposed = drgn_inputs(args, star)
            runs[name] = [
                run_drgn(args, star, data_dir, sim, pixel_size, seed, ctf, transposed) for seed in seeds
            ]
        except (TimeoutError, RuntimeError) as err:  # our rows are still written
            print(f"{name}: {err}", file=sys.stderr)
            runs[name] = [{"failed": str(err).splitlines()[0]}]
            write_table(runs, args, pixel_size)
            return 1
    write_table(runs, args, pixel_size)
    return 0


def drgn_inputs(args, star: Path) -> tuple[Path, bool]:
    """cryoDRGN's CTF file and whether its rotations are our transposes, both from its own parsers
    (the true poses of the STAR, parsed by ``parse_pose_star``, show its convention)."""
    ctf = args.out / "ctf.pkl"
    timed(drgn("parse_ctf_star", str(star), "-o", str(ctf)), args.out / "parse_ctf.log")
    true_pkl = args.out / "true_poses.pkl"
    timed(drgn("parse_pose_star", str(star), "-o", str(true_pkl)), args.out / "parse_pose.log")
    true_rot = np.asarray(ParticleStack(star).metadata.rotations, dtype=np.float64)
    return ctf, convention(true_rot, drgn_rotations(true_pkl, args.out / "true_poses.npy"))


def run_drgn(
    args, star: Path, data_dir: Path, sim, pixel_size: float, seed: int, ctf: Path, transposed: bool
):
    out = args.out / f"cryodrgn-s{seed}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    epochs = args.drgn_epochs or args.epochs
    argv = drgn(
        "abinit", str(star), "--ctf", str(ctf), "-o", str(out), "--zdim", "0", "--datadir", str(data_dir)
    )
    argv += ["--num-epochs", str(epochs), "--max-threads", str(args.threads), "--seed", str(seed)]
    argv += ["--checkpoint", "1", "--no-analysis"]
    if args.drgn_volume == "explicit":
        argv.append("--explicit-volume")
    if sim.max_shift_angstrom == 0:
        argv.append("--no-trans")  # the particles are centred: no translation search (as ours)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    run = timed(argv, args.out / f"cryodrgn-s{seed}.log", env=env, timeout_s=60 * args.drgn_timeout_min)
    last = epochs - 1
    rot = drgn_rotations(out / f"pose.{last}.pkl", args.out / "cryodrgn_poses.npy")
    if transposed:
        rot = rot.transpose(0, 2, 1)
    curve = resolution_curve_drgn(out, run["started_at"], sim, pixel_size)
    row = {
        **run,
        **evaluate(out / f"reconstruct.{last}.mrc", rot, sim, pixel_size, args.symmetry),
        "curve": curve,
    }
    print("cryoDRGN", json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    return row


def _our_rotations(poses_star: Path) -> np.ndarray:
    """Our output poses.star read back with our own STAR reader (the same convention as the input)."""
    return np.asarray(read_star(poses_star).rotations, dtype=np.float64)


def _median_spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.median(values)), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def write_table(runs: dict, args, pixel_size: float) -> Path:
    drgn_version = "not run"
    if (DRGN_VENV / "bin" / "python").exists():
        drgn_version = subprocess.run(
            [str(DRGN_VENV / "bin" / "python"), "-c", "import cryodrgn; print(cryodrgn.__version__)"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    stamp = datetime.date.today().isoformat()
    seeds = ", ".join(str(args.seed + k) for k in range(args.repeats))
    tag = "" if args.molecule == "hsp90" else f"{args.molecule}_"
    if args.repeats > 1:
        tag += f"r{args.repeats}_"
    if args.seed != 0:
        tag += f"s{args.seed}_"  # another seed's run keeps its own file
    path = args.results / f"peer_cryodrgn_cpu_{tag}n{args.n}_e{args.epochs}_{stamp}.md"
    target = 2 * 2 * pixel_size  # twice the Nyquist resolution (2 * apix)
    command = " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        f"# cryospin-lab vs cryoDRGN, {args.n} {MOLECULES[args.molecule]} images (D=64, SNR 0.1, CTF), "
        f"{args.epochs} epochs" + (f" (cryoDRGN {args.drgn_epochs})" if args.drgn_epochs else ""),
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} cores, {args.threads} threads per run, one run at a "
        f"time; torch {torch.__version__}; cryoDRGN {drgn_version}; seeds {seeds}.",
        f"Command: `.venv/bin/python bench/peer_cryodrgn.py {command}`",
        "",
        f"Values: median over {args.repeats} run(s), (min-max) when more than one. Time to 2x Nyquist: first "
        f"epoch whose map reaches {target:.0f} Å (FSC 0.5 vs the true map).",
        "",
        "| method | wall (s) | time to 2x Nyquist (s) | peak RSS (MB) | FSC 0.5 vs truth (Å) | "
        "pose error mean / median (°) | same, pseudo-two-fold mate counted right (°) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in runs.items():
        if any("failed" in r for r in rows):
            lines.append(f"| {name} | {rows[0]['failed']} | | | | | |")
            continue
        reach = [time_to(r["curve"], target) for r in rows]
        reached = [t for t in reach if t is not None]
        reach_text = _median_spread(reached, ".0f") if reached else "not reached"
        if reached and len(reached) < len(reach):
            reach_text += f" ({len(reached)}/{len(reach)} runs)"

        def col(key: str, fmt: str, rows=rows) -> str:
            if key.endswith("_mate_deg") and args.symmetry is None:
                return "n/a"  # no pseudo-symmetry: the plain pose error is the whole story
            return _median_spread([r[key] for r in rows], fmt)

        lines.append(
            f"| {name} | {col('wall_s', '.0f')} | {reach_text} | {col('peak_rss_mb', '.0f')} | "
            f"{col('resolution_angstrom', '.1f')} | {col('pose_mean_deg', '.1f')} / "
            f"{col('pose_median_deg', '.1f')} | {col('pose_mean_mate_deg', '.1f')} / "
            f"{col('pose_median_mate_deg', '.1f')} |"
        )
    lines += peer_speedup_lines(runs)
    lines += [
        "",
        "Wall time: the whole process (start-up, cryoDRGN's pretraining pass, end-of-run outputs). Curve",
        "times: ours from the run's training clock (events.jsonl; start-up of a few seconds not counted),",
        "cryoDRGN's from its process start to each epoch's `reconstruct.<E>.mrc`. cryoDRGN runs with",
        "`--no-trans` (the particles are centred; ours does not search shifts either) and `--checkpoint 1`.",
        f"Plot: `{path.with_suffix('.png').name}` (resolution vs time, every run).",
    ]
    args.results.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    plot_curves(runs, target, path.with_suffix(".png"))
    print("\n".join(lines))
    return path


def peer_speedup_lines(runs: dict) -> list[str]:
    """The target "ours reaches cryoDRGN's final resolution at least 5x sooner": per method of ours,
    the time its curve first reaches cryoDRGN's final resolution, against the time cryoDRGN's own
    curve first reached it (medians over runs). Empty when cryoDRGN did not run."""
    peer = next((rows for name, rows in runs.items() if name.startswith("cryoDRGN")), None)
    if not peer or any("failed" in r or not r["curve"] for r in peer):
        return []
    final = float(np.median([r["curve"][-1][1] for r in peer]))
    peer_time = float(np.median([time_to(r["curve"], final) for r in peer]))
    lines = ["", f"Time to cryoDRGN's final resolution ({final:.1f} Å; cryoDRGN itself: {peer_time:.0f} s):"]
    for name, rows in runs.items():
        if rows is peer or any("failed" in r for r in rows):
            continue
        times = [time_to(r["curve"], final) for r in rows]
        if any(t is None for t in times):
            lines.append(f"- {name}: not reached in {sum(t is not None for t in times)}/{len(times)} runs")
            continue
        ours = float(np.median(times))
        lines.append(f"- {name}: {ours:.0f} s, {peer_time / max(ours, 1e-9):.0f}x sooner")
    return lines


def plot_curves(runs: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, (name, rows) in enumerate(runs.items()):
        for j, row in enumerate(rows):
            if "curve" not in row or not row["curve"]:
                continue
            t, r = zip(*row["curve"], strict=True)
            ax.plot(np.asarray(t) / 60, r, "o-", ms=3, color=f"C{k}", alpha=0.9 if j == 0 else 0.4,
                    label=name if j == 0 else None)  # fmt: skip
    ax.axhline(target, color="grey", lw=0.8, ls="--", label=f"2x Nyquist ({target:.0f} Å)")
    ax.set_xlabel("wall time (min)")
    ax.set_ylabel("FSC 0.5 resolution vs truth (Å)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
