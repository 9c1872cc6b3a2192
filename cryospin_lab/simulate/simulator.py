"""Simulated particle stacks with known ground truth (poses, shifts, CTF, map).

Image formation, as a chain of small steps (docs/method.md §1):

1. ``volume``: an atomic model's density (:mod:`cryospin_lab.simulate.atoms`), an MRC
   map resampled to the requested grid (:func:`load_source_volume`), or an array.
2. ``poses``: rotations uniform on SO(3) (``so3.random_rotations``); shifts
   ``t`` uniform in a disc of radius ``max_shift_angstrom`` (the particle centre
   moves by ``+t``; the STAR file gets ``rlnOriginX/YAngst = -t``), except an
   optional ``outlier_fraction`` of the images shifted within
   ``outlier_max_shift_angstrom`` instead, like badly picked particles.
3. ``CTF``: defocus drawn from the real EMPIAR-10028 distribution (the packaged
   ``empiar10028_ctf.npz``: defocus U/V/angle, 300 kV, Cs 2.0 mm, w 0.1, of
   105,247 real particles), or uniform in a range (no astigmatism; 300 kV,
   Cs 2.7 mm, w 0.1).
4. ``clean image = -CTF * projection``: the RELION convention of extracted
   particles (inverted contrast, protein bright; ``ctf.compute_ctf`` is the
   physical CTF, so the minus sign is applied here). Without CTF the image is
   ``+projection``. Projections come from ``projection.project_real``
   (band-limited to the disc ``|k| <= (D - 1) // 2``).
5. ``noise``: white Gaussian noise of one standard deviation ``sigma`` for the
   whole stack.

SNR definition: ``SNR = mean_i var(clean_i) / sigma^2``, where ``var`` is the
variance of the noiseless image ``i`` over all ``D x D`` pixels of the box
(mean subtracted) and the mean is over all images of the stack. ``sigma`` is
set from the clean images themselves (first pass), so the realised SNR of a
stack equals the requested one up to the sampling error of the noise.
``snr=inf`` writes noiseless images.

Output (in ``out_dir``): ``particles.mrcs`` (float32 stack, voxel size set),
``particles.star`` (RELION 3.1, written by ``star.write_relion31_star`` with
every ground-truth value), ``ground_truth.mrc`` (the exact map that was
projected, voxel size set) and ``summary.json`` (:class:`SimulationResult`).
Everything is written under temporary hidden names and renamed at the end
(``os.replace``), the STAR file last, so an interrupted run leaves no partial
``particles.*`` files. The same seed gives byte-identical files.

The draws and the clean images are :mod:`cryospin_lab.simulate.ground_truth`;
the physics lives in ``physics.projection``, ``physics.ctf`` and ``simulate.atoms``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import mrcfile
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from cryospin_lab._version import __version__
from cryospin_lab.simulate._source_volume import MAP_SUFFIXES, fitting_pixel_size, load_source_volume
from cryospin_lab.simulate.ground_truth import (
    GroundTruth,
    check_defocus,
    draw_ground_truth,
    load_empiar10028_ctf,
    random_streams,
    render_clean_images,
)

__all__ = [
    "SimulationResult",
    "GroundTruth",
    "simulate_particles",
    "draw_ground_truth",
    "render_clean_images",
    "load_source_volume",
    "fitting_pixel_size",
    "load_empiar10028_ctf",
    "MAP_SUFFIXES",
    "PARTICLES_NAME",
    "STAR_NAME",
    "GROUND_TRUTH_NAME",
    "SUMMARY_NAME",
]

PARTICLES_NAME = "particles.mrcs"
STAR_NAME = "particles.star"
GROUND_TRUTH_NAME = "ground_truth.mrc"
SUMMARY_NAME = "summary.json"

_SUMMARY_VERSION = 1
_LABEL = f"Simulated by cryospin-lab {__version__}"


@dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate_particles` wrote; also stored as ``summary.json`` in ``out_dir``.

    Attributes:
        out_dir, particles_path, star_path, ground_truth_path, summary_path: the files.
        source: the model/map path it was simulated from (``"array"`` for an array).
        n_particles, box_size, pixel_size_angstrom: the stack's shape and sampling.
        snr: requested SNR (see the module docstring; ``inf`` = noiseless).
        signal_variance: ``mean_i var(clean_i)`` over the box.
        noise_sigma: standard deviation of the added noise.
        max_shift_angstrom: radius of the disc the shifts were drawn from.
        ctf: whether images carry a CTF.
        defocus: ``"empiar10028"``, ``"<min>-<max> um"`` or ``"none"``.
        defocus_min_angstrom, defocus_max_angstrom: range of the drawn mean defocus (0 without CTF).
        seed: the random seed.
        seconds: wall time of the simulation.
        outlier_fraction, outlier_max_shift_angstrom: the share of images shifted within the
            larger disc instead (0 and 0 for none; summaries written before they existed read so).
    """

    out_dir: Path
    particles_path: Path
    star_path: Path
    ground_truth_path: Path
    summary_path: Path
    source: str
    n_particles: int
    box_size: int
    pixel_size_angstrom: float
    snr: float
    signal_variance: float
    noise_sigma: float
    max_shift_angstrom: float
    ctf: bool
    defocus: str
    defocus_min_angstrom: float
    defocus_max_angstrom: float
    seed: int
    seconds: float
    outlier_fraction: float = 0.0
    outlier_max_shift_angstrom: float = 0.0

    def describe(self, seconds: float) -> str:
        """The files and the set's figures as the CLI prints them (``seconds``: the time to show)."""
        snr = "inf (noiseless)" if math.isinf(self.snr) else f"{self.snr:g}"
        low, high = self.defocus_min_angstrom / 1e4, self.defocus_max_angstrom / 1e4
        defocus = f"{low:.2f}-{high:.2f} µm ({self.defocus})" if self.ctf else "no CTF"
        out = self.outlier_fraction
        outliers = f" ({100 * out:g} % within {self.outlier_max_shift_angstrom:g} Å)" if out else ""
        return (
            f"  particles:    {self.particles_path}\n  metadata:     {self.star_path}\n"
            f"  ground truth: {self.ground_truth_path}\n  {self.n_particles} images, box {self.box_size}, "
            f"{self.pixel_size_angstrom:g} Å/px, SNR {snr}, defocus {defocus}, max shift "
            f"{self.max_shift_angstrom:g} Å{outliers}\n  time: {seconds:.1f} s"
        )

    def to_json(self) -> str:
        """JSON text (paths relative to ``out_dir``, ``inf`` as the string ``"inf"``)."""
        values = asdict(self)
        values["out_dir"] = "."
        for key in ("particles_path", "star_path", "ground_truth_path", "summary_path"):
            values[key] = getattr(self, key).name
        values["snr"] = "inf" if math.isinf(self.snr) else self.snr
        values["format_version"] = _SUMMARY_VERSION
        return json.dumps(values, indent=2) + "\n"

    @classmethod
    def load(cls, out_dir: str | Path) -> SimulationResult:
        """Read ``out_dir/summary.json``; ``FileNotFoundError`` if it or any file it names is missing."""
        out_dir = Path(out_dir)
        summary_path = out_dir / SUMMARY_NAME
        if not summary_path.is_file():
            raise FileNotFoundError(f"no simulation summary in {out_dir} (missing {SUMMARY_NAME})")
        try:
            values = json.loads(summary_path.read_text())
            values.pop("format_version", None)
            values["out_dir"] = out_dir
            for key in ("particles_path", "star_path", "ground_truth_path", "summary_path"):
                values[key] = out_dir / values[key]
            values["snr"] = float(values["snr"])
            result = cls(**values)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"cannot read simulation summary {summary_path}: {exc}") from exc
        for path in (result.particles_path, result.star_path, result.ground_truth_path):
            if not path.is_file():
                raise FileNotFoundError(f"simulation in {out_dir} is incomplete: {path.name} is missing")
        return result


def _validate(
    n_particles, box_size, pixel_size_angstrom, snr, max_shift_angstrom, seed, batch_size, outliers=(0.0, 0.0)
) -> None:
    def is_int(value, minimum):
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum

    def is_real(value):
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)

    checks = (
        ("n_particles", n_particles, is_int(n_particles, 1), "an integer >= 1"),
        ("box_size", box_size, is_int(box_size, 4), "an integer >= 4"),
        (
            "pixel_size_angstrom",
            pixel_size_angstrom,
            is_real(pixel_size_angstrom) and 0 < pixel_size_angstrom < math.inf,
            "a positive finite number",
        ),
        ("snr", snr, is_real(snr) and snr > 0, "a positive number (inf for noiseless images)"),
        (
            "max_shift_angstrom",
            max_shift_angstrom,
            is_real(max_shift_angstrom) and 0 <= max_shift_angstrom < math.inf,
            "a finite number >= 0",
        ),
        (
            "outlier_fraction",
            outliers[0],
            is_real(outliers[0]) and 0 <= outliers[0] <= 1,
            "a number in [0, 1]",
        ),
        (
            "outlier_max_shift_angstrom",
            outliers[1],
            is_real(outliers[1]) and 0 <= outliers[1] < math.inf and (outliers[1] > 0 or not outliers[0]),
            "a finite number >= 0, and > 0 when outlier_fraction is",
        ),
        ("seed", seed, is_int(seed, 0), "an integer >= 0"),
        ("batch_size", batch_size, is_int(batch_size, 1), "an integer >= 1"),
    )
    for name, value, ok, rule in checks:
        if not ok:
            raise ValueError(f"simulate: {name} must be {rule}, got {value!r}")


def simulate_particles(
    source: str | Path | Tensor | np.ndarray,
    *,
    out_dir: str | Path,
    box_size: int = 64,
    pixel_size_angstrom: float = 3.0,
    n_particles: int = 10000,
    snr: float = 0.1,
    max_shift_angstrom: float = 0.0,
    ctf: bool = True,
    defocus: str | tuple[float, float] = "empiar10028",
    seed: int = 0,
    progress: bool = True,
    outlier_fraction: float = 0.0,
    outlier_max_shift_angstrom: float = 0.0,
    on_progress: Callable[[str, int, int], None] | None = None,
    map_pixel_size_angstrom: float | None = None,
    b_factor_angstrom2: float | None = None,
    batch_size: int = 500,
    device: str | torch.device | None = None,
) -> SimulationResult:
    """Simulate a particle stack and write it to ``out_dir`` (see the module docstring).

    Args:
        source: atomic model (PDB/mmCIF, ``.gz`` ok), MRC map, or a ``(D, D, D)`` array
            at ``pixel_size_angstrom`` (see :func:`load_source_volume`).
        out_dir: output folder (created). Existing ``particles.*`` files are replaced
            only when the new set is complete.
        box_size, pixel_size_angstrom: image size ``D`` and pixel size in Å.
        n_particles: number of images.
        snr: signal-to-noise ratio ``mean_i var(clean_i) / sigma^2`` over the whole box; ``inf`` = no noise.
        max_shift_angstrom: shifts are uniform in a disc of this radius (0 = centred particles).
        outlier_fraction, outlier_max_shift_angstrom: a random share of the images (default none)
            shifted uniformly in a larger disc instead, like badly picked particles.
        ctf: apply a CTF (``image = -CTF * projection``); without it ``image = projection``.
        defocus: ``"empiar10028"`` (the real distribution) or a ``(min_um, max_um)`` range.
        seed: random seed; the same seed gives identical files.
        progress: show tqdm progress bars.
        on_progress: called as ``(stage, images done, images)`` after each batch (e.g. by a UI that
            cannot show tqdm: the workbench simulates on a thread).
        map_pixel_size_angstrom: voxel size of an MRC ``source`` whose header lacks one.
        b_factor_angstrom2: extra B-factor for an atomic model (``atoms.density_from_model``).
        batch_size: images rendered per step.
        device: where to project. Noise is always drawn on the CPU, so it is the same on any
            device; the projections themselves may differ by float rounding between devices.
    """
    start_time = time.perf_counter()
    outliers = (outlier_fraction, outlier_max_shift_angstrom)
    _validate(n_particles, box_size, pixel_size_angstrom, snr, max_shift_angstrom, seed, batch_size, outliers)
    defocus_label = check_defocus(defocus) if ctf else "none"
    n_particles, box_size, seed = int(n_particles), int(box_size), int(seed)
    volume = load_source_volume(
        source,
        box_size,
        pixel_size_angstrom,
        map_pixel_size_angstrom=map_pixel_size_angstrom,
        b_factor_angstrom2=b_factor_angstrom2,
    )
    truth = draw_ground_truth(
        n_particles, seed=seed, max_shift_angstrom=max_shift_angstrom, ctf=ctf, defocus=defocus,
        outlier_fraction=outlier_fraction, outlier_max_shift_angstrom=outlier_max_shift_angstrom,
    )  # fmt: skip
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = {
        "particles": out_dir / PARTICLES_NAME,
        "ground_truth": out_dir / GROUND_TRUTH_NAME,
        "summary": out_dir / SUMMARY_NAME,
        "star": out_dir / STAR_NAME,  # last: its presence marks a complete set
    }
    tmp = {key: out_dir / f".{path.stem}.tmp{os.getpid()}{path.suffix}" for key, path in final.items()}
    try:
        noise_sigma, signal_variance = _write_stack(
            tmp["particles"],
            volume,
            truth,
            pixel_size_angstrom,
            snr,
            seed,
            batch_size,
            progress,
            device,
            on_progress,
        )
        with mrcfile.new(tmp["ground_truth"], overwrite=True) as mrc:
            mrc.set_data(volume.numpy())
            mrc.voxel_size = pixel_size_angstrom
            _set_label(mrc)
        _write_star(tmp["star"], truth, final["particles"], pixel_size_angstrom, box_size)
        mean_defocus = (
            (truth.ctf.defocus_u_angstrom + truth.ctf.defocus_v_angstrom) / 2
            if truth.ctf is not None
            else None
        )
        result = SimulationResult(
            out_dir=out_dir,
            particles_path=final["particles"],
            star_path=final["star"],
            ground_truth_path=final["ground_truth"],
            summary_path=final["summary"],
            source="array" if isinstance(source, (Tensor, np.ndarray)) else str(source),
            n_particles=n_particles,
            box_size=box_size,
            pixel_size_angstrom=float(pixel_size_angstrom),
            snr=float(snr),
            signal_variance=signal_variance,
            noise_sigma=noise_sigma,
            max_shift_angstrom=float(max_shift_angstrom),
            ctf=bool(ctf),
            defocus=defocus_label,
            defocus_min_angstrom=0.0 if mean_defocus is None else float(mean_defocus.min()),
            defocus_max_angstrom=0.0 if mean_defocus is None else float(mean_defocus.max()),
            seed=seed,
            seconds=round(time.perf_counter() - start_time, 3),
            outlier_fraction=float(outlier_fraction),
            outlier_max_shift_angstrom=float(outlier_max_shift_angstrom),
        )
        tmp["summary"].write_text(result.to_json())
        for key in final:
            os.replace(tmp[key], final[key])
    except BaseException:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    return result


def _write_stack(
    path: Path,
    volume: Tensor,
    truth: GroundTruth,
    pixel_size_angstrom: float,
    snr: float,
    seed: int,
    batch_size: int,
    progress: bool,
    device,
    on_progress=None,
) -> tuple[float, float]:
    """Two passes over a memory-mapped stack: clean images (and their variance), then noise in place."""
    n, d = len(truth), volume.shape[0]
    volume_on_device = volume.to(device) if device is not None else volume
    _, _, _, noise_rng = random_streams(seed)
    variance_sum = 0.0
    with mrcfile.new_mmap(path, shape=(n, d, d), mrc_mode=2, overwrite=True) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = pixel_size_angstrom
        with tqdm(total=n, desc="projecting", unit="img", disable=not progress, leave=False) as bar:
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                clean = _render_batch(volume_on_device, truth, pixel_size_angstrom, start, stop).cpu()
                variance_sum += float(clean.to(torch.float64).var(dim=(-2, -1), unbiased=False).sum())
                mrc.data[start:stop] = clean.numpy()
                bar.update(stop - start)
                if on_progress is not None:
                    on_progress("projecting", stop, n)
        signal_variance = variance_sum / n
        noise_sigma = 0.0 if math.isinf(snr) else math.sqrt(signal_variance / snr)
        if noise_sigma > 0:
            with tqdm(total=n, desc="adding noise", unit="img", disable=not progress, leave=False) as bar:
                for start in range(0, n, batch_size):
                    stop = min(start + batch_size, n)
                    noise = noise_rng.standard_normal((stop - start, d, d), dtype=np.float32)
                    mrc.data[start:stop] += np.float32(noise_sigma) * noise
                    bar.update(stop - start)
                    if on_progress is not None:
                        on_progress("adding noise", stop, n)
        mrc.update_header_stats()
        _set_label(mrc)
    return noise_sigma, signal_variance


def _set_label(mrc) -> None:
    """Replace mrcfile's time-stamped creation label by a fixed one (same seed, same bytes)."""
    mrc.header.label[0] = _LABEL.encode()
    mrc.header.nlabl = 1


def _render_batch(
    volume: Tensor, truth: GroundTruth, pixel_size_angstrom: float, start: int, stop: int
) -> Tensor:
    """One batch of clean images (a seam for tests that interrupt a run)."""
    return render_clean_images(volume, truth, pixel_size_angstrom, start, stop)


def _write_star(
    path: Path, truth: GroundTruth, stack_path: Path, pixel_size_angstrom: float, box_size: int
) -> None:
    from cryospin_lab.io.star import ParticleMetadata, write_relion31_star

    n = len(truth)
    metadata = ParticleMetadata(
        image_paths=[str(stack_path.resolve())] * n,
        image_indices=np.arange(n),
        rotations=truth.rotations,
        shifts_angstrom=truth.shifts_angstrom,
        ctf=truth.ctf,  # None for CTF-free stacks: no CTF columns, so readers apply none
        pixel_size_angstrom=float(pixel_size_angstrom),
        box_size=int(box_size),
        optics_groups=np.ones(n, dtype=np.int64),
    )
    write_relion31_star(path, metadata, image_name_stack=stack_path.name)
    # starfile stamps the time in its first comment line; a fixed comment keeps the bytes reproducible.
    lines = path.read_text().splitlines(keepends=True)
    if lines and lines[0].startswith("#"):
        lines[0] = f"# {_LABEL}\n"
    path.unlink()  # a fresh file gets the usual permissions (the writer's temp file is private, 0600)
    path.write_text("".join(lines))
