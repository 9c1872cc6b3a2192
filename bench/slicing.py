"""Throughput of central-slice extraction, forward + backward, ours vs a naive ``grid_sample``.

Usage::

    python bench/slicing.py            # D = 32, 64, 128 (about a minute on 2 CPU cores)
    python bench/slicing.py --quick    # D = 32, 64, fewer repeats
    python bench/slicing.py --sizes 64 --device cuda

One step = ``B`` images x 7 heads (rotations ``(B, 7, 3, 3)``, with
gradients), the loss ``sum(w * slices)`` and its backward pass to the volume
parameters and the rotations:

* ours: ``H = m * exp(e)`` on the ``D^3`` grid once, then
  :func:`cryospin_lab.physics.projection.slice_volume` at the frequencies of the
  default :class:`~cryospin_lab.physics.projection.FourierDisc` (``|k| <= D/2 - 1``):
  on the CPU the compiled kernel of :mod:`cryospin_lab.physics.slice_kernel`;
* previous: the same through
  :func:`~cryospin_lab.physics.projection.grid_sample_slices` (the slicer
  before the kernel, and still the GPU's and the fallback's path);
* baseline (as in the cryoSPIN reference code): trilinear
  ``torch.nn.functional.grid_sample(align_corners=True)`` of a
  ``(2, D+1, D+1, D+1)`` mantissa/exponent volume on the full
  ``(D+1) x (D+1)`` slice lattice, then ``m * exp(e)`` per sample.

``samples/s`` counts the samples each method reads (the baseline reads more
per image: a square instead of a disc); ``images/s`` (an image = 7 slices)
compares the two on the same work.
"""

from __future__ import annotations

import argparse
import time

import torch

from cryospin_lab.physics import slice_kernel, so3
from cryospin_lab.physics.projection import FourierDisc, grid_sample_slices, slice_volume

N_HEADS = 7


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_interleaved(steps: dict, device: torch.device, n_repeats: int) -> dict:
    """Median seconds per call of each step, after one warm-up call each.

    The steps take turns, so that load from other processes on a shared
    machine hits all of them alike.
    """
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(n_repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def make_ours(d: int, n_images: int, device: torch.device, slicer=slice_volume):
    """A fwd+bwd step of ``slicer`` (default :func:`slice_volume`) and its number of samples."""
    disc = FourierDisc.make(d, device=device)
    mantissa = torch.randn(d, d, d, device=device, requires_grad=True)
    exponent = (0.1 * torch.randn(d, d, d, device=device)).requires_grad_(True)
    rotations = so3.random_rotations(n_images * N_HEADS, dtype=torch.float32, device=device)
    rotations = rotations.reshape(n_images, N_HEADS, 3, 3).requires_grad_(True)
    weights = torch.randn(n_images, N_HEADS, disc.n_freqs, device=device)

    def step():
        volume_ht = mantissa * torch.exp(exponent)
        slices = slicer(volume_ht, rotations, disc.freqs)
        (slices * weights).sum().backward()

    return step, n_images * N_HEADS * disc.n_freqs


def make_grid_sample(d: int, n_images: int, device: torch.device):
    """A fwd+bwd step of the naive ``grid_sample`` baseline and its number of samples."""
    n = d + 1
    volume = torch.randn(1, 2, n, n, n, device=device)
    volume[:, 1] *= 0.1
    volume.requires_grad_(True)
    rotations = so3.random_rotations(n_images * N_HEADS, dtype=torch.float32, device=device)
    rotations.requires_grad_(True)
    k = torch.arange(n, device=device, dtype=torch.float32) - d // 2
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    lattice = torch.stack([kx, ky], -1).reshape(-1, 2)  # (n*n, 2) as (kx, ky)
    weights = torch.randn(n_images * N_HEADS, n, n, device=device)

    def step():
        coords = lattice @ rotations[:, :2, :]  # (N, n*n, 3) as (x, y, z)
        grid = (coords / (d / 2)).reshape(1, -1, n, n, 3)  # align_corners=True: -1..1 spans D+1 voxels
        out = torch.nn.functional.grid_sample(volume, grid, mode="bilinear", align_corners=True)
        slices = out[0, 0] * torch.exp(out[0, 1])
        (slices * weights).sum().backward()

    return step, n_images * N_HEADS * n * n


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="box sizes D (default 32 64 128)")
    parser.add_argument("--device", default=None, help="cpu, cuda, or both available (default)")
    parser.add_argument("--quick", action="store_true", help="D = 32, 64 and fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([32, 64] if args.quick else [32, 64, 128])
    repeats = args.repeats or (2 if args.quick else 5)
    if args.device:
        devices = [torch.device(args.device)]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    # Images per step: about 1-2 M samples per step on CPU, more on GPU.
    images_cpu = {32: 64, 64: 32, 128: 16}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {N_HEADS} heads, fwd+bwd")
    if not slice_kernel.available():
        print(f"the C kernel is not used ({slice_kernel.unavailable_reason()}): ours = previous")
    for device in devices:
        if device.type == "cuda":
            print(f"cuda device: {torch.cuda.get_device_name(device)}")
    print(
        f"{'device':6} {'D':>4} {'images':>6} {'method':12} {'ms/step':>9} {'Msamples/s':>11} {'images/s':>9}"
    )
    for device in devices:
        for d in sizes:
            n_images = images_cpu.get(d, max(1, 2**18 // (d * d)))
            if device.type == "cuda":
                n_images *= 16
            made = {
                "ours": make_ours(d, n_images, device),
                "previous": make_ours(d, n_images, device, slicer=grid_sample_slices),
                "grid_sample": make_grid_sample(d, n_images, device),
            }
            seconds = _time_interleaved({name: m[0] for name, m in made.items()}, device, repeats)
            for name, (_, n_samples) in made.items():
                print(
                    f"{device.type:6} {d:>4} {n_images:>6} {name:12} {1e3 * seconds[name]:>9.1f} "
                    f"{n_samples / seconds[name] / 1e6:>11.2f} {n_images / seconds[name]:>9.1f}"
                )
            print(
                f"{'':6} {d:>4} speed-up in images/s: {seconds['previous'] / seconds['ours']:.2f}x over "
                f"previous, {seconds['grid_sample'] / seconds['ours']:.2f}x over grid_sample"
            )


if __name__ == "__main__":
    main()
