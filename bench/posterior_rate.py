"""Pose posteriors per second: the per-particle path against the whole-set path, side by side.

Usage::

    python bench/posterior_rate.py                       # HSP90, D=64, nside 8 x 24 angles, 2 threads
    python bench/posterior_rate.py --n 2000 --threads 1

The HSP90 set of ``simulate.datasets.bundled`` (D=64, SNR 0.1, CTF; simulated
once into the cache) and its true map. ``view_posterior`` (the per-particle
path the posterior panel used) on ``--n-single`` images, then
``analysis.ambiguity.set_ambiguity`` on ``--n`` images, with the same grid;
prints particles per second of each (the set path's rate includes rendering
the grid's slices once), their ratio, and the largest difference of the two
posteriors on the images both computed. Issue 20's target: 100 particles/s at
nside 8, D=64, on 2 cores.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np
import torch

from cryospin_lab.analysis.ambiguity import set_ambiguity
from cryospin_lab.analysis.pose_posterior import view_posterior
from cryospin_lab.io.maps import load_ground_truth
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.physics.ctf import compute_ctf, frequency_grid_per_angstrom
from cryospin_lab.simulate import datasets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="images for the set path")
    parser.add_argument("--n-single", type=int, default=5, help="images for the per-particle path")
    parser.add_argument("--nside", type=int, default=8)
    parser.add_argument("--n-psi", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sim = datasets.bundled("hsp90", n_particles=max(args.n, args.n_single), progress=False)
    stack = ParticleStack(sim.star_path)
    volume = load_ground_truth(sim.ground_truth_path, stack)
    batch = stack.get_batch(np.arange(args.n))
    freqs = frequency_grid_per_angstrom(stack.box_size, float(stack.pixel_size_angstrom))
    ctfs = compute_ctf(batch.ctf, freqs).float()
    apix = float(stack.pixel_size_angstrom)
    print(f"# {' '.join(sys.argv)}; {platform.node()}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"# HSP90 D={stack.box_size}, {apix:g} Å/px, nside {args.nside} x {args.n_psi} in-plane angles")
    start = time.perf_counter()
    singles = [
        view_posterior(volume, batch.images[i], ctf=ctfs[i], pixel_size_angstrom=apix, nside=args.nside,
                       n_psi=args.n_psi)
        for i in range(args.n_single)
    ]  # fmt: skip
    single_rate = args.n_single / (time.perf_counter() - start)
    found = set_ambiguity(volume, batch.images, ctfs=ctfs, pixel_size_angstrom=apix, nside=args.nside,
                          n_psi=args.n_psi)  # fmt: skip
    difference = max(
        float(np.abs(np.exp(found.log_probabilities[i]) - s.probabilities).max())
        for i, s in enumerate(singles)
    )
    print(f"per-particle path: {single_rate:.2f} particles/s ({args.n_single} images)")
    print(f"whole-set path:    {found.particles_per_s:.1f} particles/s ({args.n} images: slices "
          f"{found.slices_s:.1f} s, scoring {found.scoring_s:.1f} s, {args.n / found.scoring_s:.1f}/s "
          f"without the slices)")  # fmt: skip
    print(f"ratio: {found.particles_per_s / single_rate:.0f}x; largest posterior difference "
          f"{difference:.1e}; median entropy {np.median(found.entropy_bits):.2f} bits, "
          f"{np.mean(found.n_modes >= 2) * 100:.0f} % of the images with two modes or more")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
