"""The pseudo-two-fold of HSP90 (2CG9) from its chains, checked on its simulated density."""

import torch

from cryospin_lab.analysis import metrics
from cryospin_lab.physics import so3
from cryospin_lab.simulate.atoms import chain_superposition_rotation, density_from_model
from cryospin_lab.simulate.datasets import default_model_path


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_hsp90_two_fold_maps_the_density_onto_itself():
    q = chain_superposition_rotation(default_model_path(), "A", "B")
    assert abs(so3.geodesic_angle_deg(torch.eye(3, dtype=torch.float64), q).item() - 180) < 5
    volume = density_from_model(default_model_path(), 40, 5.0).double()

    def rotated(r: torch.Tensor) -> torch.Tensor:  # volume(r x): aligned(x) = volume(R^T x) with R = r^T
        alignment = metrics.MapAlignment(
            rotation=r.T, flipped=False, shift_voxels=torch.zeros(3), correlation=0.0
        )
        return metrics.apply_map_alignment(volume, alignment)

    assert _correlation(volume, rotated(q)) > 0.9
    random = so3.random_rotations(3, generator=torch.Generator().manual_seed(0))
    assert max(_correlation(volume, rotated(r)) for r in random) < 0.8
