"""SO(3) conventions against scipy's Rotation (an independent implementation)."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryospin_lab.physics import so3


def test_exp_matches_scipy_rotvec():
    omegas = torch.randn(200, 3, dtype=torch.float64) * 1.5
    omegas[:10] *= 1e-4  # Taylor branch
    omegas[10:20] *= 1e-9
    ours = so3.exp_so3(omegas).numpy()
    ref = Rotation.from_rotvec(omegas.numpy()).as_matrix()
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_exp_zero_is_identity_with_finite_analytic_gradient():
    omega = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    r = so3.exp_so3(omega)
    assert torch.equal(r.detach(), torch.eye(3, dtype=torch.float64))
    # d exp([w]x) / d w_i at 0 is the generator [e_i]x (analytic).
    for i in range(3):
        for a in range(3):
            for b in range(3):
                (g,) = torch.autograd.grad(r[a, b], omega, retain_graph=True)
                assert torch.isfinite(g).all()
                expected = so3.hat(torch.eye(3, dtype=torch.float64)[i])[a, b]
                assert g[i].item() == pytest.approx(expected.item(), abs=1e-12)


@pytest.mark.parametrize("scale", [0.0, 1e-6, 5e-3, 0.3, 2.5])
def test_exp_gradcheck(scale):
    torch.manual_seed(1)
    omega = (torch.randn(4, 3, dtype=torch.float64) * scale).requires_grad_(True)
    if scale == 0.0:
        omega = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(so3.exp_so3, (omega,), eps=1e-7, atol=1e-6)


def test_exp_branches_are_continuous_at_threshold():
    axis = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
    axis = axis / axis.norm()
    below = so3.exp_so3(axis * (1e-2 * (1 - 1e-9)))
    above = so3.exp_so3(axis * (1e-2 * (1 + 1e-9)))
    assert torch.allclose(below, above, atol=1e-13)


def test_log_inverts_exp_including_near_pi():
    omegas = torch.randn(300, 3, dtype=torch.float64)
    omegas = omegas / omegas.norm(dim=-1, keepdim=True)
    angles = torch.rand(300, dtype=torch.float64) * math.pi
    angles[:20] = math.pi - torch.rand(20, dtype=torch.float64) * 1e-5
    angles[20:40] = torch.rand(20, dtype=torch.float64) * 1e-8
    omegas = omegas * angles[:, None]
    rot = so3.exp_so3(omegas)
    back = so3.exp_so3(so3.log_so3(rot))
    assert torch.allclose(back, rot, atol=1e-9)
    ref = Rotation.from_matrix(rot.numpy()).as_rotvec()
    ours = so3.log_so3(rot).numpy()
    regular = angles.numpy() < math.pi - 1e-3
    np.testing.assert_allclose(ours[regular], ref[regular], atol=1e-9)


def test_6d_gives_proper_rotations_and_roundtrips():
    six = torch.randn(500, 6, dtype=torch.float64)
    r = so3.rotations_from_6d(six)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(r.transpose(-1, -2) @ r, eye.expand_as(r), atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.ones(500, dtype=torch.float64), atol=1e-12)
    # the first column is the normalised first vector (Zhou et al.)
    assert torch.allclose(r[..., :, 0], six[:, :3] / six[:, :3].norm(dim=-1, keepdim=True))
    assert torch.allclose(so3.rotations_from_6d(so3.rotations_to_6d(r)), r, atol=1e-12)


def test_6d_rejects_wrong_shape():
    with pytest.raises(ValueError, match="last dimension 6"):
        so3.rotations_from_6d(torch.zeros(3, 5))


def test_random_rotations_are_uniform():
    g = torch.Generator().manual_seed(0)
    r = so3.random_rotations(20000, generator=g)
    # Haar measure: the rotation angle has density (1 - cos t)/pi, mean pi/2 + 2/pi.
    angles = torch.deg2rad(so3.geodesic_angle_deg(torch.eye(3, dtype=torch.float64), r))
    assert angles.mean().item() == pytest.approx(math.pi / 2 + 2 / math.pi, abs=0.02)
    # every matrix entry has mean 0 and variance 1/3
    assert r.mean(0).abs().max() < 0.02
    assert (r.var(0) - 1 / 3).abs().max() < 0.02


def test_relion_euler_matches_scipy_zyz():
    """RELION's A(rot, tilt, psi) is the passive ZYZ matrix: inverse of scipy's intrinsic ZYZ."""
    rng = np.random.default_rng(0)
    angles = rng.uniform([-180, 0, -180], [180, 180, 180], size=(100, 3))
    ours = so3.euler_relion_to_matrix(*torch.from_numpy(angles).T).numpy()
    ref = Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_relion_euler_known_direction():
    """tilt = 90, rot = 0: the view direction R^T e_z is +x (projection along x)."""
    r = so3.euler_relion_to_matrix(0.0, 90.0, 0.0)
    np.testing.assert_allclose(so3.view_directions(r).numpy(), [1.0, 0.0, 0.0], atol=1e-12)
    r = so3.euler_relion_to_matrix(90.0, 90.0, 0.0)
    np.testing.assert_allclose(so3.view_directions(r).numpy(), [0.0, 1.0, 0.0], atol=1e-12)


def test_euler_roundtrip_including_gimbal_lock():
    rot = so3.random_rotations(500, generator=torch.Generator().manual_seed(3))
    back = so3.euler_relion_to_matrix(*so3.matrix_to_euler_relion(rot))
    assert torch.allclose(back, rot, atol=1e-10)
    for tilt in (0.0, 180.0):
        r = so3.euler_relion_to_matrix(torch.tensor([30.0]), torch.tensor([tilt]), torch.tensor([40.0]))
        back = so3.euler_relion_to_matrix(*so3.matrix_to_euler_relion(r))
        assert torch.allclose(back, r, atol=1e-10)
    _, tilt, _ = so3.matrix_to_euler_relion(rot)
    assert (tilt >= 0).all() and (tilt <= 180).all()


def test_align_rotations_recovers_global_rotation_and_hand():
    g = torch.Generator().manual_seed(5)
    truth = so3.random_rotations(400, generator=g)
    global_rot = so3.random_rotations(1, generator=g)[0]
    noise = so3.exp_so3(torch.randn(400, 3, generator=g, dtype=torch.float64) * math.radians(1.0))
    for flip in (False, True):
        est = noise @ global_rot.T @ truth  # so that global_rot @ est ~ truth
        if flip:
            est = so3.flip_handedness(est)
        result = so3.align_rotations(truth, est)
        assert result.flipped is flip
        assert torch.allclose(result.global_rotation, global_rot, atol=0.01)
        assert result.errors_deg.median() < 2.0
        assert torch.allclose(result.apply(est), truth, atol=0.1)


def test_flipped_poses_of_mirrored_volume_give_same_projection():
    """J R J viewing the z-mirrored volume gives the same image (why hand is ambiguous)."""
    rng = np.random.default_rng(0)
    points = rng.normal(size=(50, 3))  # point "atoms"
    r = so3.random_rotations(1, generator=torch.Generator().manual_seed(1))[0].numpy()
    rf = so3.flip_handedness(torch.from_numpy(r)).numpy()
    mirrored = points * np.array([1, 1, -1])
    # a point p of the volume lands at image position (R p)_{x,y}
    img = (points @ r.T)[:, :2]
    img_mirror = (mirrored @ rf.T)[:, :2]
    np.testing.assert_allclose(img, img_mirror, atol=1e-12)
