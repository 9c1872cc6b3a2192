"""The bundled molecules: atomic models and maps to simulate from, each with its symmetry.

Six molecules chosen to differ where convergence does (``bench/suite.py``
reconstructs them all): HSP90 (the default, with a near two-fold), 1U6G
(elongated, asymmetric), 1S3X (small, low signal), 1BXN (C4), the 70S
ribosome map (large, asymmetric) and the TRPV1 map (C4). The files are in
``cryospin_lab/assets`` (provenance in its README). A molecule's
:meth:`Molecule.symmetry_rotations` are the rotations ``Q`` with
``V(Q x) ~ V(x)`` on the simulated map's axes, for
``metrics.pose_error(..., symmetry_rotations=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["MOLECULES", "Molecule", "molecule"]


@dataclass(frozen=True)
class Molecule:
    """One bundled molecule (see the module docstring)."""

    name: str
    description: str
    asset: str  # file name in cryospin_lab/assets
    map_pixel_size_angstrom: float | None = None  # for a map whose header has no voxel size
    symmetry: str = "none"  # "none", "C4" or "pseudo two-fold"
    # how the symmetry rotations are made: chain pairs to superpose (models) or an axis (maps)
    chain_pairs: tuple[tuple[str, str], ...] = ()
    cyclic_axis: tuple[float, float, float] | None = None
    cyclic_order: int = 1

    @property
    def path(self) -> Path:
        return Path(str(resources.files("cryospin_lab.assets").joinpath(self.asset)))

    def symmetry_rotations(self) -> Tensor | None:
        """``(K, 3, 3)`` float64 rotations of the (pseudo-)symmetry besides the identity, or None."""
        if self.chain_pairs:
            from cryospin_lab.simulate.atoms import chain_superposition_rotation

            return torch.stack([chain_superposition_rotation(self.path, a, b) for a, b in self.chain_pairs])
        if self.cyclic_axis is not None:
            from cryospin_lab.physics import so3

            axis = torch.tensor(self.cyclic_axis, dtype=torch.float64)
            axis = axis / axis.norm()
            turns = [2 * torch.pi * k / self.cyclic_order * axis for k in range(1, self.cyclic_order)]
            return torch.stack([so3.exp_so3(w) for w in turns])
        return None


MOLECULES = {
    m.name: m
    for m in (
        Molecule(
            "hsp90",
            "HSP90-Sba1 closed complex (PDB 2CG9), the cryoSPIN paper's HSP90; near two-fold",
            "2cg9.pdb.gz",
            symmetry="pseudo two-fold",
            chain_pairs=(("A", "B"),),
        ),
        Molecule("1u6g", "Cand1-Cul1-Roc1 complex (PDB 1U6G): elongated, asymmetric", "1u6g.pdb.gz"),
        Molecule("1s3x", "Hsp70 ATPase domain (PDB 1S3X): 42 kDa, small, low signal", "1s3x.pdb.gz"),
        Molecule(
            "1bxn",
            "RuBisCO (PDB 1BXN, L4S4): C4",
            "1bxn.pdb.gz",
            symmetry="C4",
            chain_pairs=(("A", "C"), ("A", "E"), ("A", "G")),
        ),
        Molecule(
            "ribosome",
            "70S ribosome map (ASPIRE, 65^3 at 5 Å/px): large, asymmetric",
            "clean70SRibosome_vol_65p.mrc",
            map_pixel_size_angstrom=5.0,
        ),
        Molecule(
            "trpv1",
            "TRPV1 channel map (cryojax, 48^3 at 4.88 Å/px): C4 about z",
            "trpv1_volume_48.mrc",
            symmetry="C4",
            cyclic_axis=(0.0, 0.0, 1.0),
            cyclic_order=4,
        ),
    )
}


def molecule(name: str) -> Molecule:
    """The bundled molecule ``name`` (ValueError listing the names otherwise)."""
    if name not in MOLECULES:
        raise ValueError(f"no bundled molecule {name!r}; bundled: {sorted(MOLECULES)}")
    return MOLECULES[name]
