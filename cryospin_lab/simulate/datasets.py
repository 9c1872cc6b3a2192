"""Simulated particle sets of the bundled molecules, made once and cached on disk.

``bundled(name)`` simulates any molecule of ``simulate.molecules.MOLECULES``
(at the pixel size that makes it span two thirds of the box unless given).
``hsp90()``, the embedded default set, simulates deterministically the
cryoSPIN paper's HSP90 test case from the atomic model shipped in ``cryospin_lab/assets/2cg9.pdb.gz`` (centred
particles, CTF with the real EMPIAR-10028 defocus distribution, SNR 0.1; the
paper used D = 128 at 1.5 Å, the default here is D = 64 at 3.0 Å so that it
runs on a laptop CPU). 2CG9 spans about 99 x 128 x 102 Å and every atom lies
within 73 Å of its centre of mass, inside the 96 Å radius of a 64 x 3.0 Å box.

The set is cached in ``$CRYOSPIN_LAB_CACHE`` (or ``$XDG_CACHE_HOME/cryospin-lab``,
default ``~/.cache/cryospin-lab``) under a folder named after its parameters,
and reused when that folder holds a complete set with the same parameters
(``simulate`` writes ``particles.star`` last, by rename, so a complete set is
one whose summary and files are all present).
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import torch

from cryospin_lab._cache import default_cache_dir
from cryospin_lab.simulate.simulator import SimulationResult, simulate_particles

__all__ = ["bundled", "hsp90", "default_cache_dir", "hsp90_cache_key", "HSP90_MODEL"]

HSP90_MODEL = "2cg9.pdb.gz"
# Bump when the simulation changes in a way that makes old caches wrong.
_DATASET_VERSION = 1


def hsp90_cache_key(
    n_particles: int, box_size: int, pixel_size_angstrom: float, snr: float, seed: int
) -> str:
    """Folder name of a cached HSP90 set, e.g. ``hsp90_n10000_box64_apix3_snr0.1_seed0_v1``."""
    return _cache_key("hsp90", n_particles, box_size, pixel_size_angstrom, snr, 0.0, seed)


def _cache_key(name, n_particles, box_size, pixel_size_angstrom, snr, max_shift_angstrom, seed) -> str:
    shift = f"_shift{max_shift_angstrom:g}" if max_shift_angstrom else ""
    return (
        f"{name}_n{n_particles}_box{box_size}_apix{pixel_size_angstrom:g}_snr{snr:g}{shift}_seed{seed}"
        f"_v{_DATASET_VERSION}"
    )


def _matches(
    result: SimulationResult, n_particles, box_size, pixel_size_angstrom, snr, seed, max_shift_angstrom=0.0
) -> bool:
    return (
        result.n_particles == n_particles
        and result.box_size == box_size
        and math.isclose(result.pixel_size_angstrom, pixel_size_angstrom)
        and (result.snr == snr or math.isclose(result.snr, snr))
        and result.seed == seed
        and result.ctf
        and result.defocus == "empiar10028"
        and math.isclose(result.max_shift_angstrom, max_shift_angstrom)
    )


def hsp90_pseudo_symmetry() -> torch.Tensor:
    """``(1, 3, 3)``: the near two-fold of 2CG9 (chain A onto chain B, about 178 degrees).

    At the default 3 Å/px the two halves of the dimer are nearly identical, so a
    pose and its copy across this axis explain an image almost equally well;
    pass it to :func:`cryospin_lab.analysis.metrics.pose_error` as ``symmetry_rotations``
    to count such poses as right.
    """
    from cryospin_lab.simulate.atoms import chain_superposition_rotation

    return chain_superposition_rotation(default_model_path(), "A", "B")[None]


def default_model_path() -> Path:
    """Path of the packaged 2CG9 model (inside the installed package)."""
    return Path(str(resources.files("cryospin_lab.assets").joinpath(HSP90_MODEL)))


def hsp90(
    cache_dir: str | Path | None = None,
    n_particles: int = 10000,
    box_size: int = 64,
    pixel_size_angstrom: float = 3.0,
    snr: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> SimulationResult:
    """The default HSP90 particle set: simulated once, then read from the cache.

    Returns the :class:`~cryospin_lab.simulate.simulator.SimulationResult` of the cached
    folder (``result.out_dir``, ``result.star_path``, ``result.particles_path``,
    ``result.ground_truth_path``).
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    out_dir = cache_dir / hsp90_cache_key(n_particles, box_size, pixel_size_angstrom, snr, seed)
    try:
        cached = SimulationResult.load(out_dir)
    except (FileNotFoundError, ValueError):
        cached = None
    if cached is not None and _matches(cached, n_particles, box_size, pixel_size_angstrom, snr, seed):
        return cached
    with resources.as_file(resources.files("cryospin_lab.assets").joinpath(HSP90_MODEL)) as model_path:
        return simulate_particles(
            model_path,
            out_dir=out_dir,
            box_size=box_size,
            pixel_size_angstrom=pixel_size_angstrom,
            n_particles=n_particles,
            snr=snr,
            max_shift_angstrom=0.0,
            ctf=True,
            defocus="empiar10028",
            seed=seed,
            progress=progress,
        )


def bundled(
    name: str,
    cache_dir: str | Path | None = None,
    n_particles: int = 10000,
    box_size: int = 64,
    pixel_size_angstrom: float | None = None,
    snr: float = 0.1,
    max_shift_angstrom: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    on_progress=None,
) -> SimulationResult:
    """A bundled molecule's particle set (CTF with EMPIAR-10028's defocus values): simulated once,
    then read from the cache. ``pixel_size_angstrom=None`` (default) makes the molecule span two
    thirds of the box (``fitting_pixel_size``). Pass the result to ``Reconstruction`` as its
    particles (its true map then becomes the ground truth)."""
    from cryospin_lab.simulate._source_volume import fitting_pixel_size
    from cryospin_lab.simulate.molecules import molecule

    mol = molecule(name)
    if pixel_size_angstrom is None:
        pixel_size_angstrom = fitting_pixel_size(
            mol.path, box_size, map_pixel_size_angstrom=mol.map_pixel_size_angstrom
        )
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    key = _cache_key(name, n_particles, box_size, pixel_size_angstrom, snr, max_shift_angstrom, seed)
    out_dir = cache_dir / key
    try:
        cached = SimulationResult.load(out_dir)
    except (FileNotFoundError, ValueError):
        cached = None
    if cached is not None and _matches(
        cached, n_particles, box_size, pixel_size_angstrom, snr, seed, max_shift_angstrom
    ):
        return cached
    return simulate_particles(
        mol.path,
        out_dir=out_dir,
        box_size=box_size,
        pixel_size_angstrom=pixel_size_angstrom,
        n_particles=n_particles,
        snr=snr,
        max_shift_angstrom=max_shift_angstrom,
        ctf=True,
        defocus="empiar10028",
        seed=seed,
        progress=progress,
        on_progress=on_progress,
        map_pixel_size_angstrom=mol.map_pixel_size_angstrom,
    )
