"""Simulated particle stacks with known ground truth (poses, shifts, CTF, map).

Image formation, as a chain of small steps (METHOD.md section 1):

1. ``volume``: an atomic model's density (:mod:`cryospin_lab.atoms`), an MRC
   map resampled to the requested grid (:func:`load_source_volume`), or an array.
2. ``poses``: rotations uniform on SO(3) (``so3.random_rotations``); shifts
   ``t`` uniform in a disc of radius ``max_shift_angstrom`` (the particle centre
   moves by ``+t``; the STAR file gets ``rlnOriginX/YAngst = -t``).
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

Hand-written: the sampling and file handling (a few lines each); the physics
lives in ``projection``, ``ctf`` and ``atoms``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import mrcfile
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from cryospin_lab import __version__, so3
from cryospin_lab._source_volume import MAP_SUFFIXES, load_source_volume
from cryospin_lab.ctf import CTFParams
from cryospin_lab.projection import project_real

__all__ = [
    "SimulationResult",
    "GroundTruth",
    "simulate_particles",
    "draw_ground_truth",
    "render_clean_images",
    "load_source_volume",
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

# CTF constants for a defocus *range* (the EMPIAR-10028 draw brings its own).
RANGE_VOLTAGE_KV = 300.0
RANGE_CS_MM = 2.7
RANGE_AMPLITUDE_CONTRAST = 0.1

_SUMMARY_VERSION = 1
_LABEL = f"Simulated by cryospin-lab {__version__}"


@dataclass(frozen=True)
class GroundTruth:
    """Per-particle ground truth of a simulated stack (``N`` rows).

    Attributes:
        rotations: ``(N, 3, 3)`` float64 rotations (project convention, see ``so3``).
        shifts_angstrom: ``(N, 2)`` float64 ``(x, y)`` displacement of the particle
            centre from the box centre, in Å.
        ctf: the CTF of every image, or ``None`` for CTF-free images.
    """

    rotations: Tensor
    shifts_angstrom: Tensor
    ctf: CTFParams | None

    def __len__(self) -> int:
        return self.rotations.shape[0]


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


def load_empiar10028_ctf() -> dict[str, np.ndarray]:
    """CTF parameters of the 105,247 EMPIAR-10028 particles shipped in ``cryospin_lab/assets``."""
    with resources.files("cryospin_lab.assets").joinpath("empiar10028_ctf.npz").open("rb") as handle:
        with np.load(handle) as npz:
            return {key: npz[key].astype(np.float64) for key in npz.files}


def _rngs(seed: int) -> tuple[torch.Generator, np.random.Generator, np.random.Generator, np.random.Generator]:
    """Independent streams for rotations, shifts, CTF and noise (changing one option leaves the rest)."""
    rot_seq, shift_seq, ctf_seq, noise_seq = np.random.SeedSequence(seed).spawn(4)
    rotation_generator = torch.Generator().manual_seed(int(rot_seq.generate_state(1, np.uint32)[0]))
    return (
        rotation_generator,
        np.random.default_rng(shift_seq),
        np.random.default_rng(ctf_seq),
        np.random.default_rng(noise_seq),
    )


def _check_defocus(defocus) -> str:
    if isinstance(defocus, str):
        if defocus != "empiar10028":
            raise ValueError(f"defocus must be 'empiar10028' or a (min_um, max_um) range, got {defocus!r}")
        return defocus
    try:
        low, high = (float(v) for v in defocus)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"defocus must be 'empiar10028' or a (min_um, max_um) range, got {defocus!r}"
        ) from exc
    if not (0 < low <= high and math.isfinite(high)):
        raise ValueError(f"defocus range must satisfy 0 < min_um <= max_um, got {defocus!r}")
    return f"{low:g}-{high:g} um"


def draw_ground_truth(
    n_particles: int,
    *,
    seed: int = 0,
    max_shift_angstrom: float = 0.0,
    ctf: bool = True,
    defocus: str | tuple[float, float] = "empiar10028",
) -> GroundTruth:
    """Random poses, shifts and CTF of ``n_particles`` images (deterministic for a seed).

    Rotations are Haar-uniform; shifts uniform in the disc ``|t| <= max_shift_angstrom``
    (radius ``R sqrt(u)``, angle uniform); the CTF as described in the module docstring.
    """
    _check_defocus(defocus)
    rotation_generator, shift_rng, ctf_rng, _ = _rngs(seed)
    rotations = so3.random_rotations(n_particles, generator=rotation_generator)
    radius = max_shift_angstrom * np.sqrt(shift_rng.random(n_particles))
    angle = 2 * np.pi * shift_rng.random(n_particles)
    shifts = torch.from_numpy(np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1))
    ctf_params = None
    if ctf:
        if isinstance(defocus, str):
            table = load_empiar10028_ctf()
            rows = ctf_rng.integers(0, table["defocus_u_angstrom"].shape[0], n_particles)
            ctf_params = CTFParams(
                **{
                    key: torch.from_numpy(table[key][rows])
                    for key in (
                        "defocus_u_angstrom",
                        "defocus_v_angstrom",
                        "defocus_angle_deg",
                        "voltage_kv",
                        "cs_mm",
                        "amplitude_contrast",
                        "phase_shift_deg",
                    )
                }
            )
        else:
            low, high = (float(v) * 1e4 for v in defocus)  # µm -> Å
            defocus_u = torch.from_numpy(ctf_rng.uniform(low, high, n_particles))
            zeros = torch.zeros(n_particles, dtype=torch.float64)
            ctf_params = CTFParams(
                defocus_u_angstrom=defocus_u,
                defocus_v_angstrom=defocus_u.clone(),
                defocus_angle_deg=zeros,
                voltage_kv=zeros + RANGE_VOLTAGE_KV,
                cs_mm=zeros + RANGE_CS_MM,
                amplitude_contrast=zeros + RANGE_AMPLITUDE_CONTRAST,
                phase_shift_deg=zeros.clone(),
            )
    return GroundTruth(rotations=rotations, shifts_angstrom=shifts, ctf=ctf_params)


def render_clean_images(
    volume_real: Tensor,
    truth: GroundTruth,
    pixel_size_angstrom: float,
    start: int = 0,
    stop: int | None = None,
) -> Tensor:
    """Noiseless images ``start:stop`` of the stack, ``(B, D, D)`` float32 on the volume's device.

    ``image = -CTF * projection`` (RELION's inverted contrast; ``+projection`` without CTF).
    """
    stop = len(truth) if stop is None else stop
    shifts = truth.shifts_angstrom[start:stop]
    images = project_real(
        volume_real,
        truth.rotations[start:stop],
        pixel_size_angstrom=pixel_size_angstrom,
        shifts_angstrom=shifts.to(volume_real.device) if bool(shifts.any()) else None,  # skip a zero phase
        ctf=None if truth.ctf is None else truth.ctf[start:stop],
        batch_size=max(stop - start, 1),
    )
    # RELION convention: extracted particles are -CTF * projection (protein bright).
    sign = -1.0 if truth.ctf is not None else 1.0
    return (sign * images).to(torch.float32)


def _validate(n_particles, box_size, pixel_size_angstrom, snr, max_shift_angstrom, seed, batch_size) -> None:
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
        ctf: apply a CTF (``image = -CTF * projection``); without it ``image = projection``.
        defocus: ``"empiar10028"`` (the real distribution) or a ``(min_um, max_um)`` range.
        seed: random seed; the same seed gives identical files.
        progress: show tqdm progress bars.
        map_pixel_size_angstrom: voxel size of an MRC ``source`` whose header lacks one.
        b_factor_angstrom2: extra B-factor for an atomic model (``atoms.density_from_model``).
        batch_size: images rendered per step.
        device: where to project. Noise is always drawn on the CPU, so it is the same on any
            device; the projections themselves may differ by float rounding between devices.
    """
    start_time = time.perf_counter()
    _validate(n_particles, box_size, pixel_size_angstrom, snr, max_shift_angstrom, seed, batch_size)
    defocus_label = _check_defocus(defocus) if ctf else "none"
    n_particles, box_size, seed = int(n_particles), int(box_size), int(seed)
    volume = load_source_volume(
        source,
        box_size,
        pixel_size_angstrom,
        map_pixel_size_angstrom=map_pixel_size_angstrom,
        b_factor_angstrom2=b_factor_angstrom2,
    )
    truth = draw_ground_truth(
        n_particles, seed=seed, max_shift_angstrom=max_shift_angstrom, ctf=ctf, defocus=defocus
    )
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
            tmp["particles"], volume, truth, pixel_size_angstrom, snr, seed, batch_size, progress, device
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
) -> tuple[float, float]:
    """Two passes over a memory-mapped stack: clean images (and their variance), then noise in place."""
    n, d = len(truth), volume.shape[0]
    volume_on_device = volume.to(device) if device is not None else volume
    _, _, _, noise_rng = _rngs(seed)
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
        signal_variance = variance_sum / n
        noise_sigma = 0.0 if math.isinf(snr) else math.sqrt(signal_variance / snr)
        if noise_sigma > 0:
            with tqdm(total=n, desc="adding noise", unit="img", disable=not progress, leave=False) as bar:
                for start in range(0, n, batch_size):
                    stop = min(start + batch_size, n)
                    noise = noise_rng.standard_normal((stop - start, d, d), dtype=np.float32)
                    mrc.data[start:stop] += np.float32(noise_sigma) * noise
                    bar.update(stop - start)
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
    from cryospin_lab.star import ParticleMetadata, write_relion31_star

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
