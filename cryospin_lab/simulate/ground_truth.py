"""The truth of a simulated stack: random poses, shifts and CTF, and the noiseless images they give.

Poses are Haar-uniform on SO(3); shifts ``t`` uniform in a disc of radius
``max_shift_angstrom`` (the particle centre moves by ``+t``; a STAR file
stores ``rlnOriginX/YAngst = -t``). The CTF's defocus comes from the real
EMPIAR-10028 distribution (the packaged ``empiar10028_ctf.npz``: defocus
U/V/angle, 300 kV, Cs 2.0 mm, w 0.1, of 105,247 real particles) or uniformly
from a range (no astigmatism; 300 kV, Cs 2.7 mm, w 0.1). A clean image is
``-CTF * projection``: the RELION convention of extracted particles (inverted
contrast, protein bright); ``+projection`` without a CTF (docs/method.md §2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from torch import Tensor

from cryospin_lab.physics import so3
from cryospin_lab.physics.ctf import CTFParams
from cryospin_lab.physics.projection import project_real

__all__ = [
    "GroundTruth",
    "draw_ground_truth",
    "load_empiar10028_ctf",
    "random_streams",
    "render_clean_images",
]

# CTF constants for a defocus *range* (the EMPIAR-10028 draw brings its own).
RANGE_VOLTAGE_KV = 300.0
RANGE_CS_MM = 2.7
RANGE_AMPLITUDE_CONTRAST = 0.1


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


def load_empiar10028_ctf() -> dict[str, np.ndarray]:
    """CTF parameters of the 105,247 EMPIAR-10028 particles shipped in ``cryospin_lab/assets``."""
    with resources.files("cryospin_lab.assets").joinpath("empiar10028_ctf.npz").open("rb") as handle:
        with np.load(handle) as npz:
            return {key: npz[key].astype(np.float64) for key in npz.files}


def random_streams(
    seed: int,
) -> tuple[torch.Generator, np.random.Generator, np.random.Generator, np.random.Generator]:
    """Independent streams for rotations, shifts, CTF and noise (changing one option leaves the rest)."""
    rot_seq, shift_seq, ctf_seq, noise_seq = np.random.SeedSequence(seed).spawn(4)
    rotation_generator = torch.Generator().manual_seed(int(rot_seq.generate_state(1, np.uint32)[0]))
    return (
        rotation_generator,
        np.random.default_rng(shift_seq),
        np.random.default_rng(ctf_seq),
        np.random.default_rng(noise_seq),
    )


def check_defocus(defocus) -> str:
    """The defocus option's label (``"empiar10028"`` or ``"MIN-MAX um"``); ValueError if it is neither."""
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
    outlier_fraction: float = 0.0,
    outlier_max_shift_angstrom: float = 0.0,
) -> GroundTruth:
    """Random poses, shifts and CTF of ``n_particles`` images (deterministic for a seed).

    Rotations are Haar-uniform; shifts uniform in the disc ``|t| <= max_shift_angstrom``
    (radius ``R sqrt(u)``, angle uniform), except a random ``outlier_fraction`` of the
    images (default none: badly picked particles), uniform in the disc of
    ``outlier_max_shift_angstrom``; the CTF as described in the module docstring.
    """
    check_defocus(defocus)
    rotation_generator, shift_rng, ctf_rng, _ = random_streams(seed)
    rotations = so3.random_rotations(n_particles, generator=rotation_generator)
    radius = max_shift_angstrom * np.sqrt(shift_rng.random(n_particles))
    angle = 2 * np.pi * shift_rng.random(n_particles)
    n_outliers = int(round(outlier_fraction * n_particles))
    if n_outliers:  # drawn after the others, so the other images keep the shifts of a set without outliers
        rows = shift_rng.choice(n_particles, n_outliers, replace=False)
        radius[rows] = outlier_max_shift_angstrom * np.sqrt(shift_rng.random(n_outliers))
        angle[rows] = 2 * np.pi * shift_rng.random(n_outliers)
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
