"""A map's near-symmetry found by aligning it onto itself, against independent references.

HSP90 (PDB 2CG9): the superposition of chain A onto chain B by gemmi (on the
atoms, not the map). TRPV1: the quarter turn about z its C4 map is built on
(checked by a 0.99999 self-correlation in tests/simulate/test_molecules.py).
RuBisCO 1BXN: gemmi's superposition of its large chains (A onto C: 90°).
Asymmetric maps (1U6G, the ribosome): none.
"""

from __future__ import annotations

import pytest
import torch

from cryospin_lab.analysis.symmetry import find_near_symmetry
from cryospin_lab.physics import so3
from cryospin_lab.simulate import fitting_pixel_size, load_source_volume, molecule
from cryospin_lab.simulate.atoms import chain_superposition_rotation

BOX = 40


def simulated_map(name: str) -> torch.Tensor:
    mol = molecule(name)
    apix = fitting_pixel_size(mol.path, BOX, map_pixel_size_angstrom=mol.map_pixel_size_angstrom)
    return load_source_volume(mol.path, BOX, apix, map_pixel_size_angstrom=mol.map_pixel_size_angstrom)


def closest_deg(rotation: torch.Tensor, references: list[torch.Tensor]) -> float:
    return min(float(so3.geodesic_angle_deg(rotation[None], r[None].double())) for r in references)


@pytest.mark.parametrize(
    ("name", "order", "reference"),
    [
        ("hsp90", 2, lambda: [chain_superposition_rotation(molecule("hsp90").path, "A", "B")]),
        ("trpv1", 4, lambda: [so3.exp_so3(torch.tensor([0.0, 0.0, s * torch.pi / 2])) for s in (1, -1)]),
        ("1bxn", 4, lambda: [chain_superposition_rotation(molecule("1bxn").path, "A", b) for b in "CG"]),
    ],
)
def test_the_symmetry_is_found_with_its_order_and_axis(name, order, reference):
    found = find_near_symmetry(simulated_map(name))
    assert found is not None and found.order == order
    assert found.rotations.shape == (order - 1, 3, 3)
    assert closest_deg(found.rotations[0], reference()) < 5.0  # the generator: a 1/order turn
    assert found.describe().endswith(f"{order}-fold")


@pytest.mark.parametrize("name", ["1u6g", "ribosome"])
def test_an_asymmetric_map_has_none(name):
    assert find_near_symmetry(simulated_map(name)) is None
