"""Can a map centre shifted particles? A matched filter against the true projection and a blob.

Usage::

    python bench/experiments/matched_filter_centring.py DATA_DIR [N]

For the first N (400) images of DATA_DIR (a ``bench/suite.py --shifted`` set): the cross-correlation
of each image with a template, both low-passed to a radius r (frequency pixels), searched within
7.5 px on a half-pixel grid; the template is each image's CTF times the projection of (a) the true
map at the true pose (what a map with the right structure gives) and (b) the true map's spherical
average (the plateau's blob: no pose needed). Prints the median distance of the found shift from
the true one against zero shifts'. The contrast sign is tried both ways; the better is printed
first. One thread.
"""

from __future__ import annotations

import sys

import mrcfile
import numpy as np
import torch

from cryospin_lab.engine.stuck import spherical_average
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.physics.ctf import ctf_images
from cryospin_lab.physics.fourier import fft_center, ifft_center
from cryospin_lab.physics.projection import project_real

UPSAMPLE = 2
SEARCH_PX = 7.5


def found_shifts(images_f: torch.Tensor, template_f: torch.Tensor, radius: int, sign: int) -> np.ndarray:
    """``(N, 2)`` pixels (x, y): the argmax of ``sign`` times the cross-correlation within SEARCH_PX."""
    n, d = images_f.shape[0], images_f.shape[-1]
    g = torch.arange(d) - d // 2
    k = (g[:, None] ** 2 + g[None, :] ** 2).float().sqrt()
    product = images_f * template_f.conj() * (k <= radius)
    big = d * UPSAMPLE
    padded = torch.zeros(n, big, big, dtype=product.dtype)
    o = big // 2 - d // 2
    padded[:, o : o + d, o : o + d] = product
    cc = sign * ifft_center(padded).real
    grid = (torch.arange(big) - big // 2) / UPSAMPLE
    outside = (grid[:, None] ** 2 + grid[None, :] ** 2) > SEARCH_PX**2
    best = cc.masked_fill(outside, -torch.inf).flatten(1).argmax(1)
    return np.stack([grid[best % big].numpy(), grid[best // big].numpy()], axis=1)


def main(data: str, n: int) -> None:
    torch.set_num_threads(1)
    stack = ParticleStack(f"{data}/particles.star")
    batch, meta = stack.get_batch(np.arange(n)), stack.metadata
    apix, d = float(meta.pixel_size_angstrom), batch.images.shape[-1]
    truth = torch.from_numpy(mrcfile.read(f"{data}/ground_truth.mrc").astype(np.float32))
    blob = spherical_average(truth)  # shells of integer radius, as for a Hartley volume
    true_px = meta.shifts_angstrom[:n].numpy() / apix
    zero = np.median(np.linalg.norm(true_px, axis=1))
    ctf = ctf_images(batch.ctf, d, apix).float()
    images_f = fft_center(batch.images)
    for name, volume in (("true projection", truth), ("spherical average", blob)):
        projections = project_real(volume, meta.rotations[:n].float(), pixel_size_angstrom=apix)
        template_f = fft_center(projections) * ctf
        for radius in (6, 10, 13, 20, 31):
            errors = sorted(
                np.median(np.linalg.norm(found_shifts(images_f, template_f, radius, s) - true_px, axis=1))
                for s in (1, -1)
            )
            print(
                f"{data.rstrip('/').split('/')[-1]}  {name:17s}  r <= {radius:2d}: median error "
                f"{errors[0]:.2f} px (other sign {errors[1]:.2f}; zero shifts {zero:.2f})",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 400)
