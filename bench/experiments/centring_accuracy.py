"""Can each particle's centre be found before any pose is known, at SNR 0.1? Two truth-free rules.

    python bench/experiments/centring_accuracy.py DATA_DIR [DATA_DIR ...]
    python bench/experiments/centring_accuracy.py --self-check

Each DATA_DIR holds a simulated ``particles.star`` whose origins are the truth
(``bench/suite.py --quick --shifted`` writes them under ``--out``/data). Printed
per set: the median and 90th-percentile distance (pixels) between the true
shift and the estimated centre, for no centring (the centre taken as zero) and
for two rules:

* ``rotavg``: alignment to a rotational average. The reference is the
  rotational average of the stack's phase-flipped mean; each image is
  cross-correlated with the reference times its own CTF (a matched filter,
  low-passed to ``lowpass_index``), the peak within the search radius, refined
  by a parabola, is its centre; the mean of the images moved back gives the
  next reference (``iterations`` times).
* ``com``: the centre of mass of the phase-flipped image, low-passed by a
  Gaussian of ``kc`` frequency pixels and clipped at zero.

``--self-check``: round blobs with a CTF, moved by known shifts, must come back
to within 0.01 pixel by ``rotavg`` (the machinery is right; the error on real
molecules is their shape and the noise).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.physics.ctf import CTFParams, ctf_images
from cryospin_lab.physics.fourier import fft_center, frequency_grid_2d, ifft_center, phase_shift


def rotational_average(image: Tensor) -> Tensor:
    """The ``(D, D)`` image averaged over rotations about pixel ``(D // 2, D // 2)``.

    Radial profile by linear binning of each pixel's radius, read back by linear
    interpolation; pixels beyond radius ``D // 2`` are set to zero.
    """
    d = image.shape[-1]
    r = frequency_grid_2d(d, image.device, torch.float64).norm(dim=-1)  # radius in pixels from D // 2
    low = r.floor().long()
    frac = r - low
    n_bins = int(low.max()) + 2
    values = image.to(torch.float64)
    sums = torch.zeros(n_bins, dtype=torch.float64, device=image.device)
    weights = torch.zeros_like(sums)
    for offset, w in ((0, 1 - frac), (1, frac)):
        sums.index_add_(0, (low + offset).reshape(-1), (w * values).reshape(-1))
        weights.index_add_(0, (low + offset).reshape(-1), w.reshape(-1))
    profile = sums / weights.clamp_min(1e-12)
    out = profile[low] * (1 - frac) + profile[low + 1] * frac
    return torch.where(r <= d // 2, out, torch.zeros_like(out)).to(image.dtype)


def shift_images(images: Tensor, shifts_angstrom: Tensor, pixel_size_angstrom: float) -> Tensor:
    """``(B, D, D)`` images with their content moved by ``shifts_angstrom`` ``(B, 2)`` (x, y)."""
    spectra = fft_center(images.to(torch.float64))
    moved = spectra * phase_shift(images.shape[-1], shifts_angstrom.to(torch.float64), pixel_size_angstrom)
    return ifft_center(moved).real.to(images.dtype)


def _peaks(scores: Tensor, radius_px: float) -> Tensor:
    """Sub-pixel ``(B, 2)`` (x, y) offsets from ``D // 2`` of each map's maximum within ``radius_px``."""
    b, d, _ = scores.shape
    offsets = frequency_grid_2d(d, scores.device, scores.dtype)  # (D, D, 2) = (x, y) - D // 2
    inside = offsets.norm(dim=-1) <= radius_px
    masked = torch.where(inside, scores, torch.full_like(scores, -torch.inf))
    flat = masked.reshape(b, -1).argmax(dim=1)
    y, x = flat // d, flat % d
    rows = torch.arange(b, device=scores.device)

    def vertex(minus: Tensor, mid: Tensor, plus: Tensor) -> Tensor:
        curvature = minus - 2 * mid + plus
        step = 0.5 * (minus - plus) / torch.where(curvature < 0, curvature, torch.full_like(curvature, -1.0))
        return torch.where(curvature < 0, step.clamp(-0.5, 0.5), torch.zeros_like(step))

    dx = vertex(scores[rows, y, (x - 1) % d], scores[rows, y, x], scores[rows, y, (x + 1) % d])
    dy = vertex(scores[rows, (y - 1) % d, x], scores[rows, y, x], scores[rows, (y + 1) % d, x])
    return torch.stack([x - d // 2 + dx, y - d // 2 + dy], dim=-1)


def estimate_centres(
    stack,
    *,
    max_shift_angstrom: float,
    iterations: int = 3,
    lowpass_index: float = 16.0,
    batch_size: int = 512,
    progress: bool = False,
) -> Tensor:
    """``(N, 2)`` float64 centres (x, y) in Å of every particle of ``stack`` (a ``ParticleStack``).

    A particle drawn at ``t`` from the box centre gets a centre near ``t``;
    ``shift_images(images, -centres, apix)`` moves it back. See the module
    docstring for the rule; ``max_shift_angstrom`` bounds the search.
    """
    if iterations < 1:
        raise ValueError(f"estimate_centres needs iterations >= 1, got {iterations}")
    if not max_shift_angstrom > 0:
        raise ValueError(f"estimate_centres needs max_shift_angstrom > 0, got {max_shift_angstrom}")
    d, apix, n = stack.box_size, float(stack.pixel_size_angstrom), len(stack)
    lowpass = (frequency_grid_2d(d, dtype=torch.float64).norm(dim=-1) <= lowpass_index).to(torch.float64)
    centres = torch.zeros(n, 2, dtype=torch.float64)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=(iterations + 1) * n, desc="centring particles", unit="img")
    reference = None
    for _ in range(iterations + 1):  # the first pass only builds the first reference
        mean = torch.zeros(d, d, dtype=torch.complex128)
        for batch in stack.batches(batch_size):
            rows = batch.indices
            spectra = fft_center(batch.images.to(torch.float64))
            ctf = (
                torch.ones(1, d, d, dtype=torch.float64)
                if batch.ctf is None
                else ctf_images(batch.ctf, d, apix).to(torch.float64)
            )
            if reference is not None:
                scores = ifft_center(spectra * ctf * reference.conj() * lowpass).real
                centres[rows] = _peaks(scores, max_shift_angstrom / apix) * apix
            back = phase_shift(d, -centres[rows], apix)
            mean += (spectra * torch.sign(ctf) * back).sum(dim=0)
            if bar is not None:
                bar.update(len(rows))
        reference = fft_center(rotational_average(ifft_center(mean / n).real))
    if bar is not None:
        bar.close()
    return centres


def centre_of_mass(stack, kc: float) -> Tensor:
    """``(N, 2)`` centres (x, y) in Å: the centre of mass of each phase-flipped, low-passed image."""
    d, apix = stack.box_size, float(stack.pixel_size_angstrom)
    grid = frequency_grid_2d(d, dtype=torch.float64)  # (x, y) offsets from D // 2 in pixels
    lowpass = torch.exp(-((grid.norm(dim=-1) / kc) ** 2) / 2)
    inside = grid.norm(dim=-1) <= d // 2 - 2
    out = []
    for batch in stack.batches(1000):
        flipped = fft_center(batch.images.double()) * torch.sign(ctf_images(batch.ctf, d, apix).double())
        image = ifft_center(flipped * lowpass).real
        image = image * torch.sign(image.sum(dim=(-1, -2), keepdim=True))  # density positive
        weight = torch.where(inside, image.clamp_min(0), torch.zeros_like(image))
        out.append((weight[..., None] * grid).sum(dim=(1, 2)) / weight.sum(dim=(1, 2))[:, None] * apix)
    return torch.cat(out)


def self_check() -> None:
    d, apix, n = 64, 3.0, 200
    g = torch.Generator().manual_seed(0)
    grid = frequency_grid_2d(d, dtype=torch.float64)
    blob = torch.exp(-(grid.norm(dim=-1) ** 2) / (2 * 8.0**2))
    truth = (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 6 * apix
    full = lambda value: torch.full((n,), value, dtype=torch.float64)  # noqa: E731
    defocus = torch.linspace(8000, 25000, n, dtype=torch.float64)
    ctf = CTFParams(defocus, defocus, full(0.0), full(300.0), full(2.7), full(0.1), full(0.0))
    images = shift_images(
        ifft_center(fft_center(blob.expand(n, d, d)) * ctf_images(ctf, d, apix)).real, truth, apix
    )

    def batches(size):
        for start in range(0, n, size):
            rows = torch.arange(start, min(n, start + size))
            part = CTFParams(*(getattr(ctf, f)[rows] for f in ctf.__dataclass_fields__))
            yield SimpleNamespace(indices=rows, images=images[rows].float(), ctf=part)

    class Blobs(SimpleNamespace):
        def __len__(self) -> int:
            return n

    stack = Blobs(box_size=d, pixel_size_angstrom=apix, batches=batches)
    error = ((estimate_centres(stack, max_shift_angstrom=8 * apix) - truth).norm(dim=1) / apix).max()
    print(f"self-check: largest error {error:.4f} px over {n} round blobs")
    assert error < 0.01


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="*")
    parser.add_argument("--search-px", type=float, default=8.0)
    parser.add_argument("--self-check", action="store_true")
    args = parser.parse_args()
    if args.self_check:
        self_check()
    q = torch.tensor([0.5, 0.9], dtype=torch.float64)
    print(f"{'data':<50} {'rule':<22} {'median px':>9} {'p90 px':>7} {'s':>5}")
    for folder in args.data:
        stack = ParticleStack(folder / "particles.star")
        truth = stack.metadata.shifts_angstrom.to(torch.float64)
        apix = float(stack.pixel_size_angstrom)
        rules: list[tuple[str, str, float, int]] = [("none", "none", 0, 0)]
        rules += [
            ("rotavg lp5 it1", "rotavg", 5, 1),
            ("rotavg lp8 it1", "rotavg", 8, 1),
            ("rotavg lp8 it3", "rotavg", 8, 3),
        ]
        rules += [("com kc5", "com", 5, 0)]
        for label, rule, width, iterations in rules:
            start = time.perf_counter()
            if rule == "none":
                centres = torch.zeros_like(truth)
            elif rule == "rotavg":
                search = args.search_px * apix
                centres = estimate_centres(
                    stack, max_shift_angstrom=search, iterations=iterations, lowpass_index=width
                )
            else:
                centres = centre_of_mass(stack, width)
            error = ((truth - centres).norm(dim=1) / apix).quantile(q).tolist()
            wall = time.perf_counter() - start
            print(
                f"{folder.name[:50]:<50} {label:<22} {error[0]:>9.2f} {error[1]:>7.2f} {wall:>5.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
