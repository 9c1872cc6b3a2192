"""The bundled molecules load, and a symmetric one's map is unchanged by its symmetry rotations.

The rotated maps are made with scipy's ``ndimage.affine_transform`` (an
independent resampler): ``V(Q x)`` on the map's ``(x, y, z)`` axes, centred at
``D // 2``, for each ``Q`` of :meth:`Molecule.symmetry_rotations`.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cryospin_lab.simulate import MOLECULES, fitting_pixel_size, load_source_volume, molecule

BOX = 40


def symmetric_copy(volume: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``V(Q x)`` with ``x = (x, y, z)`` from the centre; scipy indexes ``[z, y, x]``."""
    p = np.eye(3)[::-1]  # (x, y, z) <-> (z, y, x)
    matrix = p @ q @ p
    centre = np.array(volume.shape) // 2
    return ndimage.affine_transform(volume, matrix, offset=centre - matrix @ centre, order=3)


@pytest.mark.parametrize("name", sorted(MOLECULES))
def test_bundled_molecule_loads_and_its_symmetry_holds(name):
    mol = molecule(name)
    assert mol.path.is_file()
    apix = fitting_pixel_size(mol.path, BOX, map_pixel_size_angstrom=mol.map_pixel_size_angstrom)
    volume = load_source_volume(mol.path, BOX, apix, map_pixel_size_angstrom=mol.map_pixel_size_angstrom)
    volume = volume.double().numpy()
    assert volume.shape == (BOX,) * 3 and np.isfinite(volume).all() and volume.max() > 0
    rotations = mol.symmetry_rotations()
    assert (rotations is None) == (mol.symmetry == "none")
    if rotations is None:
        # an asymmetric molecule is changed by a quarter turn about each axis
        for q in (
            np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]),
            np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]),
        ):
            assert np.corrcoef(symmetric_copy(volume, q).ravel(), volume.ravel())[0, 1] < 0.9
        return
    for q in rotations.numpy():
        np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-6)
        corr = np.corrcoef(symmetric_copy(volume, q).ravel(), volume.ravel())[0, 1]
        assert corr > 0.95, (name, corr)


def test_an_unknown_molecule_is_named():
    with pytest.raises(ValueError, match="no bundled molecule 'lysozyme'.*hsp90"):
        molecule("lysozyme")


def test_a_bundled_set_is_simulated_once_then_read_from_the_cache(tmp_path):
    from cryospin_lab.simulate.datasets import bundled

    first = bundled("1s3x", cache_dir=tmp_path, n_particles=12, box_size=24, progress=False)
    assert first.n_particles == 12 and first.box_size == 24
    expected = fitting_pixel_size(molecule("1s3x").path, 24)
    assert first.pixel_size_angstrom == pytest.approx(expected)
    stamp = first.star_path.stat().st_mtime_ns
    again = bundled("1s3x", cache_dir=tmp_path, n_particles=12, box_size=24, progress=False)
    assert again.star_path == first.star_path and again.star_path.stat().st_mtime_ns == stamp
    other = bundled("1s3x", cache_dir=tmp_path, n_particles=12, box_size=24, seed=1, progress=False)
    assert other.out_dir != first.out_dir
