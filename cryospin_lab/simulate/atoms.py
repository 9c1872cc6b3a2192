"""Density maps from atomic models (PDB / mmCIF, optionally gzipped).

The map is the electrostatic potential seen by electrons, computed by gemmi's
``DensityCalculatorE`` (a sum of 5-Gaussian electron scattering factors per
atom, International Tables Vol. C table 4.3.2.2, with each atom's B-factor and
occupancy). gemmi does the reading and the per-atom sums; the rest is here
because gemmi works on periodic crystallographic cells indexed ``[x, y, z]``,
while we need a cubic cryo-EM box:

* Axis order: the returned volume is indexed ``[z, y, x]`` (the project's
  convention), with ``x`` the first atomic coordinate. gemmi's grid is
  ``[x, y, z]``, so it is transposed.
* Centre: the molecule's centre of mass is placed on voxel ``D // 2`` along
  every axis. The gemmi cell is set to the box itself (P1), so an atom outside
  the box would wrap around: :func:`density_from_model` warns when the molecule
  does not fit in the sphere inscribed in the box (rotated projections of
  anything beyond it are cut or wrap).
* Aliasing: atoms are much sharper than a 3 Å voxel, so sampling their
  density directly on the output grid would alias. The density is computed on
  a grid ``oversampling`` times finer, with gemmi's extra blur ``B_blur``
  chosen (as in gemmi's ``set_refmac_compatible_blur``) so the fine grid is
  alias-free to ~1%; then it is Fourier-cropped to the output box (an ideal
  low-pass at the output Nyquist frequency) and the blur is divided out again
  inside the kept band (``exp(+B_blur |s|^2 / 4)``, gemmi's
  ``reciprocal_space_multiplier``). The result does not depend on the
  oversampling (tested: 2x and 4x agree to ~1e-3).
* Extra B-factor: the band-limited atomic density has truncation ripples at
  the box's Nyquist frequency. By default an extra B of ``16 apix^2`` (the
  Gaussian falls to ``1/e`` at Nyquist) tames them; set ``b_factor_angstrom2=0``
  for the sharpest map.

Units: gemmi's (scattering-factor sum per Å^3, for voxel samples). Simulation
only uses relative values (noise is set by an SNR), so no scale is applied.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np
import torch
from torch import Tensor

from cryospin_lab.physics import fourier

__all__ = [
    "chain_superposition_rotation",
    "AtomicModel",
    "read_model",
    "density_from_model",
    "default_b_factor_angstrom2",
    "ATOMIC_MODEL_SUFFIXES",
]

ATOMIC_MODEL_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")

# gemmi's blur rule (dencalc.hpp, set_refmac_compatible_blur): a total B of at
# least 8 pi^2 / 1.1 * spacing^2 keeps each Gaussian's Fourier amplitude at the
# grid's Nyquist frequency below exp(-8 pi^2 / (1.1 * 16)) ~ 1.1%.
_ALIAS_FREE_B_PER_SPACING2 = 8.0 * math.pi**2 / 1.1


@dataclass(frozen=True)
class AtomicModel:
    """An atomic model read by :func:`read_model` (first model only, waters removed).

    Attributes:
        path: the file it came from.
        structure: the gemmi ``Structure`` (one model).
        n_atoms: number of atom sites.
        center_of_mass_angstrom: ``(3,)`` ``(x, y, z)`` in the file's frame.
        extent_angstrom: ``(3,)`` ``max - min`` of the atom coordinates per axis.
        max_radius_angstrom: largest distance of an atom centre from the centre of mass.
    """

    path: Path
    structure: gemmi.Structure
    n_atoms: int
    center_of_mass_angstrom: np.ndarray
    extent_angstrom: np.ndarray
    max_radius_angstrom: float

    def positions_angstrom(self) -> np.ndarray:
        """``(n_atoms, 3)`` atom coordinates ``(x, y, z)`` in Å."""
        return np.array([cra.atom.pos.tolist() for cra in self.structure[0].all()], dtype=np.float64)


def read_model(path: str | Path) -> AtomicModel:
    """Read a PDB or mmCIF file (``.gz`` allowed) with gemmi.

    Keeps the first model, removes waters. Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` naming the file when it cannot be parsed,
    holds no atoms, has non-finite coordinates, or is named ``.gz`` but is not
    gzip-compressed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"atomic model file not found: {path}")
    if path.suffix.lower() == ".gz":
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic != b"\x1f\x8b":  # gemmi would read such a file as an empty PDB
            raise ValueError(
                f"atomic model {path}: named .gz but not gzip-compressed (starts with {magic!r})"
            )
    try:
        structure = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot read atomic model {path}: {exc}") from exc
    if len(structure) > 1:
        for index in range(len(structure) - 1, 0, -1):
            del structure[index]
    structure.remove_waters()
    n_atoms = structure[0].count_atom_sites() if len(structure) else 0
    if n_atoms == 0:
        raise ValueError(f"atomic model {path} contains no atoms (n_atoms = 0)")
    model = structure[0]
    positions = np.array([cra.atom.pos.tolist() for cra in model.all()], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        cra = list(model.all())[bad[0]]
        raise ValueError(
            f"atomic model {path}: atom {cra} has coordinates {positions[bad[0]].tolist()} (x, y, z); "
            f"{bad.size} atoms are not finite"
        )
    com = np.array(model.calculate_center_of_mass().tolist(), dtype=np.float64)
    return AtomicModel(
        path=path,
        structure=structure,
        n_atoms=n_atoms,
        center_of_mass_angstrom=com,
        extent_angstrom=positions.max(0) - positions.min(0),
        max_radius_angstrom=float(np.linalg.norm(positions - com, axis=1).max()),
    )


def default_b_factor_angstrom2(pixel_size_angstrom: float) -> float:
    """``16 apix^2``: an extra B-factor whose Gaussian ``exp(-B s^2/4)`` is ``1/e`` at Nyquist."""
    return 16.0 * pixel_size_angstrom**2


def density_from_model(
    model: AtomicModel | str | Path,
    box_size: int,
    pixel_size_angstrom: float,
    *,
    b_factor_angstrom2: float | None = None,
    oversampling: int = 2,
) -> Tensor:
    """``(D, D, D)`` float32 density ``[z, y, x]`` of an atomic model, centre of mass at ``D // 2``.

    Args:
        model: an :class:`AtomicModel` or a path to read.
        box_size: ``D``.
        pixel_size_angstrom: voxel size of the output.
        b_factor_angstrom2: extra isotropic B-factor on top of the atoms' own
            (default :func:`default_b_factor_angstrom2`; 0 for none).
        oversampling: fine-grid factor used before the Fourier crop (>= 2).
    """
    if not isinstance(model, AtomicModel):
        model = read_model(model)
    if int(box_size) != box_size or box_size < 2:
        raise ValueError(f"density_from_model box_size must be an integer >= 2, got {box_size}")
    if not pixel_size_angstrom > 0 or not math.isfinite(pixel_size_angstrom):
        raise ValueError(f"density_from_model pixel_size_angstrom must be > 0, got {pixel_size_angstrom}")
    if int(oversampling) != oversampling or oversampling < 2:
        raise ValueError(f"density_from_model oversampling must be an integer >= 2, got {oversampling}")
    if b_factor_angstrom2 is None:
        b_factor_angstrom2 = default_b_factor_angstrom2(pixel_size_angstrom)
    d, s = int(box_size), int(oversampling)
    half_box = d * pixel_size_angstrom / 2
    if model.max_radius_angstrom > half_box:
        warnings.warn(
            f"atomic model {model.path} does not fit in the box: atoms reach "
            f"{model.max_radius_angstrom:.1f} Å from the centre of mass, the box ({d} x "
            f"{pixel_size_angstrom:g} Å) has radius {half_box:.1f} Å; parts of the map will be cut or wrap",
            stacklevel=2,
        )

    n_fine, spacing = s * d, pixel_size_angstrom / s
    structure = model.structure.clone()
    gemmi_model = structure[0]
    # The fine-grid voxel n_fine // 2 becomes the output voxel D // 2 after the
    # centred Fourier crop, so the centre of mass goes to its position.
    shift = (n_fine // 2) * spacing - model.center_of_mass_angstrom
    transform = gemmi.Transform()
    transform.vec.fromlist(shift.tolist())
    gemmi_model.transform_pos_and_adp(transform)

    calculator = gemmi.DensityCalculatorE()
    cell = n_fine * spacing
    calculator.grid.set_unit_cell(gemmi.UnitCell(cell, cell, cell, 90, 90, 90))
    calculator.grid.spacegroup = gemmi.SpaceGroup("P1")
    calculator.grid.set_size(n_fine, n_fine, n_fine)
    calculator.d_min = 0.0  # keep the grid size set above (gemmi only resizes when d_min > 0)
    b_min = min(_smallest_b(cra.atom) for cra in gemmi_model.all())
    calculator.blur = max(_ALIAS_FREE_B_PER_SPACING2 * spacing**2 - b_min, 0.0)
    unknown = sorted(
        {cra.atom.element.name for cra in gemmi_model.all() if cra.atom.element.atomic_number == 0}
    )
    if unknown:
        warnings.warn(
            f"atomic model {model.path}: atoms of unknown element {unknown} add no density", stacklevel=2
        )
    calculator.put_model_density_on_grid(gemmi_model)

    fine = torch.from_numpy(np.array(calculator.grid.array, dtype=np.float32).transpose(2, 1, 0).copy())
    return _crop_and_deblur(fine, d, pixel_size_angstrom, calculator.blur - b_factor_angstrom2)


def _smallest_b(atom: gemmi.Atom) -> float:
    """Smallest B of an atom (the smallest eigenvalue of its anisotropic B if it has one)."""
    if atom.aniso.nonzero():
        return float(min(atom.aniso.calculate_eigenvalues())) * 8 * math.pi**2
    return float(atom.b_iso)


def _crop_and_deblur(fine: Tensor, box_size: int, pixel_size_angstrom: float, unblur: float) -> Tensor:
    """Fourier-crop a fine ``[z, y, x]`` grid to ``box_size`` and multiply by ``exp(unblur |s|^2 / 4)``."""
    n_fine = fine.shape[0]
    spectrum = fourier.fft_center(fine, ndim=3)
    start = n_fine // 2 - box_size // 2
    crop = slice(start, start + box_size)
    spectrum = spectrum[crop, crop, crop].clone()
    if box_size % 2 == 0:
        # The Nyquist planes hold one half of a +/- pair only: zero them so the map stays real.
        spectrum[0] = 0
        spectrum[:, 0] = 0
        spectrum[:, :, 0] = 0
    k = (torch.arange(box_size, dtype=torch.float64) - box_size // 2) / (box_size * pixel_size_angstrom)
    s2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    spectrum = spectrum * torch.exp(unblur * s2 / 4.0).to(spectrum.real.dtype)
    # Values are samples of the same continuous density: scale by the ratio of sample counts.
    volume = fourier.ifft_center(spectrum, ndim=3).real * (box_size / n_fine) ** 3
    return volume.to(torch.float32).contiguous()


def chain_superposition_rotation(model_or_path, chain_a: str, chain_b: str) -> Tensor:
    """Rotation ``Q`` (3, 3) superposing chain ``a`` onto chain ``b`` (matching CA atoms by residue number).

    For a homodimer this is its (pseudo-)two-fold: ``p_b ~ Q p_a + t``. Maps from
    :func:`density_from_model` only translate the model, so with the two-fold
    through the centre of mass, ``V(Q x) ~ V(x)`` on the map's ``(x, y, z)``
    axes -- what :func:`cryospin_lab.analysis.metrics.pose_error` takes as
    ``symmetry_rotations`` (HSP90 2CG9: chains A and B).
    """
    model = model_or_path if isinstance(model_or_path, AtomicModel) else read_model(model_or_path)
    chains = {ch.name: ch for ch in model.structure[0]}
    for name in (chain_a, chain_b):
        if name not in chains:
            raise ValueError(f"{model.path}: no chain {name!r} (chains: {sorted(chains)})")

    def ca_positions(chain) -> dict[int, gemmi.Position]:
        return {res.seqid.num: res["CA"][0].pos for res in chain if res.find_atom("CA", "*")}

    pos_a, pos_b = ca_positions(chains[chain_a]), ca_positions(chains[chain_b])
    common = sorted(set(pos_a) & set(pos_b))
    if len(common) < 3:
        raise ValueError(
            f"{model.path}: chains {chain_a} and {chain_b} share {len(common)} CA residues, need 3"
        )
    result = gemmi.superpose_positions([pos_b[i] for i in common], [pos_a[i] for i in common])
    return torch.tensor(result.transform.mat.tolist(), dtype=torch.float64)
