"""cryospin-lab beside cryoDRGN on the same particles, same machine: time, peak memory, pose error, FSC.

cryoDRGN (4.3, its ``abinit`` with ``--zdim 0``: homogeneous ab-initio, cryoDRGN-AI) runs from its
own virtual environment, never this package's (it pins plotly<7)::

    python3 -m venv bench/.venv-cryodrgn
    bench/.venv-cryodrgn/bin/pip install torch==2.13.0        # the CPU build first
    bench/.venv-cryodrgn/bin/pip install "cryodrgn>=4.3,<4.4"
    .venv/bin/python bench/peer_cryodrgn.py --n 1000 --epochs 4 --threads 2

Both read the simulated HSP90 set's RELION 3.1 STAR + MRCS (``datasets.hsp90``); cryoDRGN's CTF
comes from its own ``parse_ctf_star``. Its outputs (``pose.<E>.pkl``, ``reconstruct.<E>.mrc``) are
converted by a script run *in its environment* (its own ``utils.load_pkl`` on files it just wrote;
nothing here unpickles). Its rotation convention is found, not assumed: ``parse_pose_star`` on the
STAR's true poses, converted the same way, must give our true rotations or their transposes.

Measured per method (wall time and peak RSS of the process, from ``os.wait4``): mean/median pose
error after the best global rotation and hand (and modulo HSP90's pseudo two-fold), FSC 0.5
resolution against the true map after alignment. Writes a Markdown table with the machine,
versions, seed and command to ``--results`` (default ``bench/results/``). Figures, not pass/fail.
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

from cryospin_lab import datasets, metrics
from cryospin_lab.data import ParticleStack, read_map
from cryospin_lab.star import read_star

ROOT = Path(__file__).resolve().parents[1]
DRGN_VENV = ROOT / "bench" / ".venv-cryodrgn"

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
    started = time.perf_counter()
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
    return {"wall_s": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


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


def evaluate(volume_path: Path, rotations: np.ndarray, sim, pixel_size: float) -> dict:
    truth_map, _ = read_map(sim.ground_truth_path)
    volume, _ = read_map(volume_path)
    curve, _ = metrics.fsc_vs_ground_truth(volume, truth_map, pixel_size)
    stack = ParticleStack(sim.star_path)
    true = torch.as_tensor(stack.metadata.rotations, dtype=torch.float64)
    est = torch.as_tensor(rotations, dtype=torch.float64)
    plain = metrics.pose_error(true, est)
    mate = metrics.pose_error(true, est, symmetry_rotations=datasets.hsp90_pseudo_symmetry())
    return {
        "resolution_angstrom": curve.resolution_at_0_5,
        "pose_mean_deg": plain.mean_deg,
        "pose_median_deg": plain.median_deg,
        "pose_mean_mate_deg": mate.mean_deg,
        "pose_median_mate_deg": mate.median_deg,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images of the simulated HSP90 set (D=64)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cryospin-peer-cryodrgn"))
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--drgn-timeout-min", type=float, default=120.0, help="stop cryoDRGN after this")
    args = parser.parse_args()
    if not (DRGN_VENV / "bin" / "cryodrgn").exists():
        print(f"cryoDRGN is not installed in {DRGN_VENV}: see this script's docstring", file=sys.stderr)
        return 2
    sim = datasets.hsp90(n_particles=args.n, progress=False)
    star, data_dir = Path(sim.star_path), Path(sim.star_path).parent
    pixel_size = float(ParticleStack(star).pixel_size_angstrom)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}

    # ours: the semi-amortized default (auto switch) and fully amortized
    for name, switch in (("cryospin-lab semi-amortized", "auto"), ("cryospin-lab fully amortized", "never")):
        out = args.out / ("ours-" + switch)
        argv = [sys.executable, "-m", "cryospin_lab.cli", "reconstruct", str(star), "--out", str(out)]
        argv += ["--epochs", str(args.epochs), "--switch", switch, "--threads", str(args.threads)]
        argv += ["--seed", str(args.seed), "--no-progress"]
        subprocess.run(["rm", "-rf", str(out)], check=True)
        run = timed(argv, args.out / f"ours-{switch}.log")
        rotations = _our_rotations(out / "poses.star")
        rows[name] = {**run, **evaluate(out / "map.mrc", rotations, sim, pixel_size)}
        print(name, json.dumps(rows[name]), flush=True)

    # cryoDRGN: CTF and (to learn its convention) the true poses, parsed by its own tools
    ctf = args.out / "ctf.pkl"
    timed(drgn("parse_ctf_star", str(star), "-o", str(ctf)), args.out / "parse_ctf.log")
    true_pkl = args.out / "true_poses.pkl"
    timed(drgn("parse_pose_star", str(star), "-o", str(true_pkl)), args.out / "parse_pose.log")
    true_rot = np.asarray(ParticleStack(star).metadata.rotations, dtype=np.float64)
    transposed = convention(true_rot, drgn_rotations(true_pkl, args.out / "true_poses.npy"))
    out = args.out / "cryodrgn"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    argv = drgn(
        "abinit", str(star), "--ctf", str(ctf), "-o", str(out), "--zdim", "0", "--datadir", str(data_dir)
    )
    argv += ["--num-epochs", str(args.epochs), "--max-threads", str(args.threads), "--seed", str(args.seed)]
    argv += ["--no-analysis"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    name = "cryoDRGN 4.3 abinit (zdim 0)"
    try:
        run = timed(argv, args.out / "cryodrgn.log", env=env, timeout_s=60 * args.drgn_timeout_min)
    except (TimeoutError, RuntimeError) as err:  # our rows are still written
        print(f"{name}: {err}", file=sys.stderr)
        rows[name] = {"failed": str(err).splitlines()[0]}
        write_table(rows, args)
        return 1
    last = args.epochs - 1
    rot = drgn_rotations(out / f"pose.{last}.pkl", args.out / "cryodrgn_poses.npy")
    if transposed:
        rot = rot.transpose(0, 2, 1)
    rows[name] = {**run, **evaluate(out / f"reconstruct.{last}.mrc", rot, sim, pixel_size)}
    print(name, json.dumps(rows[name]), flush=True)

    write_table(rows, args)
    return 0


def _our_rotations(poses_star: Path) -> np.ndarray:
    """Our output poses.star read back with our own STAR reader (the same convention as the input)."""
    return np.asarray(read_star(poses_star).rotations, dtype=np.float64)


def write_table(rows: dict, args) -> Path:
    drgn_version = subprocess.run(
        [str(DRGN_VENV / "bin" / "python"), "-c", "import cryodrgn; print(cryodrgn.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    stamp = datetime.date.today().isoformat()
    path = args.results / f"peer_cryodrgn_cpu_{stamp}.md"
    lines = [
        f"# cryospin-lab vs cryoDRGN, {args.n} HSP90 images (D=64, SNR 0.1, CTF), {args.epochs} epochs",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} cores, {args.threads} threads per run; torch "
        f"{torch.__version__}; cryoDRGN {drgn_version}; seed {args.seed}.",
        f"Command: `.venv/bin/python bench/peer_cryodrgn.py --n {args.n} --epochs {args.epochs} "
        f"--threads {args.threads} --seed {args.seed}`",
        "",
        "| method | wall (s) | peak RSS (MB) | FSC 0.5 vs truth (Å) | pose error mean / median (°) "
        "| same, pseudo-two-fold mate counted right (°) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if "failed" in r:
            lines.append(f"| {name} | {r['failed']} | | | | |")
            continue
        lines.append(
            f"| {name} | {r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['resolution_angstrom']:.1f} | "
            f"{r['pose_mean_deg']:.1f} / {r['pose_median_deg']:.1f} | "
            f"{r['pose_mean_mate_deg']:.1f} / {r['pose_median_mate_deg']:.1f} |"
        )
    lines += ["", "One run per method (no spread yet); times include start-up and, for cryoDRGN, its",
              "pretraining pass and its end-of-run outputs."]  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


if __name__ == "__main__":
    sys.exit(main())
