"""Rotations: the project's one place for SO(3) conventions.

Conventions (tested in ``tests/physics/test_so3.py``):

* A rotation is a ``(..., 3, 3)`` matrix ``R`` acting on column vectors
  ``(x, y, z)``. A projection image is ``image[y, x] = sum_z V(R^T (x, y, z))``
  with the volume indexed ``[z, y, x]`` and centred at ``D // 2``; in Fourier
  space the 2-D frequency ``k = (kx, ky)`` samples the 3-D transform at
  ``R^T (kx, ky, 0)``, i.e. row-vector coordinates are multiplied on the right,
  ``coords @ R`` (cryoDRGN's convention).
* RELION's ZYZ Euler angles (rlnAngleRot, rlnAngleTilt, rlnAnglePsi, degrees)
  map to ``R`` by RELION's ``Euler_angles2matrix``; with that ``R`` the
  projection above reproduces ``relion_project`` (tested on its output).
* The 6-D representation (Zhou et al.) maps two 3-vectors to the columns
  ``[c1, c2', c3]`` of a rotation matrix (docs/method.md §4).
* The exponential map ``exp([w]x)`` uses Rodrigues' formula with a Taylor branch
  near ``theta = 0`` so the derivative at ``w = 0`` is finite and exact.

Written in torch because the 6-D map and the exp map must be differentiable;
scipy's ``Rotation``, which is not, is the tests' independent reference.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "rotations_from_6d",
    "rotations_to_6d",
    "hat",
    "exp_so3",
    "log_so3",
    "random_rotations",
    "geodesic_angle_deg",
    "euler_relion_to_matrix",
    "matrix_to_euler_relion",
    "align_rotations",
    "RotationAlignment",
    "view_directions",
]

# Below this angle (radians) the Taylor series of A and B is used. At 1e-2 the
# first omitted term (theta^6/5040) is ~2e-16, below float64 round-off.
_TAYLOR_THRESHOLD = 1e-2


def rotations_from_6d(six_d: Tensor) -> Tensor:
    """Map ``(..., 6)`` vectors to ``(..., 3, 3)`` rotations (Gram-Schmidt).

    ``a1, a2 = six_d[..., :3], six_d[..., 3:]``; ``c1 = a1/|a1|``,
    ``c3 = (c1 x a2)/|c1 x a2|``, ``c2 = c3 x c1``; ``R = [c1, c2, c3]`` as
    columns, so ``det R = +1`` by construction.
    """
    if six_d.shape[-1] != 6:
        raise ValueError(f"six_d must have last dimension 6, got shape {tuple(six_d.shape)}")
    a1, a2 = six_d[..., :3], six_d[..., 3:]
    c1 = torch.nn.functional.normalize(a1, dim=-1)
    c3 = torch.nn.functional.normalize(torch.linalg.cross(c1, a2, dim=-1), dim=-1)
    c2 = torch.linalg.cross(c3, c1, dim=-1)
    return torch.stack([c1, c2, c3], dim=-1)


def rotations_to_6d(rotations: Tensor) -> Tensor:
    """Inverse of :func:`rotations_from_6d`: the first two columns, ``(..., 6)``."""
    return torch.cat([rotations[..., :, 0], rotations[..., :, 1]], dim=-1)


def hat(omega: Tensor) -> Tensor:
    """Skew-symmetric matrix ``[w]x`` of ``(..., 3)`` vectors: ``[w]x v = w x v``."""
    wx, wy, wz = omega.unbind(-1)
    zero = torch.zeros_like(wx)
    return torch.stack(
        [
            torch.stack([zero, -wz, wy], dim=-1),
            torch.stack([wz, zero, -wx], dim=-1),
            torch.stack([-wy, wx, zero], dim=-1),
        ],
        dim=-2,
    )


def exp_so3(omega: Tensor) -> Tensor:
    """Exponential map ``exp([w]x) = I + A [w]x + B [w]x^2`` for ``(..., 3)`` vectors.

    ``A = sin(t)/t`` and ``B = (1 - cos t)/t^2`` with ``t = |w|``; below
    ``t < 1e-2`` their Taylor series are used. ``t`` itself is computed as
    ``sqrt(t^2)`` only on the safe branch (``torch.where`` with a dummy value),
    because the derivative of ``|w|`` is undefined at 0 and a NaN there would
    poison the gradient even on the branch that is not selected.
    """
    theta_sq = (omega * omega).sum(-1)
    small = theta_sq < _TAYLOR_THRESHOLD**2
    safe_theta_sq = torch.where(small, torch.ones_like(theta_sq), theta_sq)
    theta = torch.sqrt(safe_theta_sq)
    a_exact = torch.sin(theta) / theta
    b_exact = (1.0 - torch.cos(theta)) / safe_theta_sq
    a_taylor = 1.0 - theta_sq / 6.0 + theta_sq * theta_sq / 120.0
    b_taylor = 0.5 - theta_sq / 24.0 + theta_sq * theta_sq / 720.0
    a = torch.where(small, a_taylor, a_exact)[..., None, None]
    b = torch.where(small, b_taylor, b_exact)[..., None, None]
    k = hat(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand(k.shape)
    return eye + a * k + b * (k @ k)


def log_so3(rotations: Tensor) -> Tensor:
    """Logarithm map: ``(..., 3, 3)`` rotations to rotation vectors ``(..., 3)``.

    Accurate for all angles, including ``theta`` near ``pi`` where the
    antisymmetric part vanishes and the axis is read off ``(R + I)/2``.
    Not meant to be differentiated near ``pi``.
    """
    trace = rotations[..., 0, 0] + rotations[..., 1, 1] + rotations[..., 2, 2]
    vee = torch.stack(
        [
            rotations[..., 2, 1] - rotations[..., 1, 2],
            rotations[..., 0, 2] - rotations[..., 2, 0],
            rotations[..., 1, 0] - rotations[..., 0, 1],
        ],
        dim=-1,
    )
    # atan2 is accurate at every angle (arccos loses digits near 0 and pi).
    cos_theta = (trace - 1.0) / 2.0
    sin_theta = vee.norm(dim=-1) / 2.0
    theta = torch.atan2(sin_theta, cos_theta)
    small = theta < 1e-6
    near_pi = theta > math.pi - 1e-3
    factor = torch.where(small, 0.5 + theta**2 / 12.0, theta / (2.0 * torch.where(small, 1.0, sin_theta)))
    omega = factor[..., None] * vee
    if near_pi.any():
        # Near pi the antisymmetric part vanishes; read the axis off the symmetric
        # part: (R + R^T)/2 = cos(t) I + (1 - cos t) n n^T.
        eye = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
        sym = (rotations + rotations.transpose(-1, -2)) / 2.0
        outer = (sym - cos_theta[..., None, None] * eye) / (1.0 - cos_theta)[..., None, None]
        idx = torch.diagonal(outer, dim1=-2, dim2=-1).argmax(-1)
        col = torch.gather(outer, -1, idx[..., None, None].expand(*outer.shape[:-1], 1))[..., 0]
        axis = col / col.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        # Pick the sign of the axis that agrees with the antisymmetric part.
        sign = torch.sign((axis * vee).sum(-1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        omega_pi = axis * (sign * theta)[..., None]
        omega = torch.where(near_pi[..., None], omega_pi, omega)
    return omega


def random_rotations(
    n: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` rotations drawn uniformly (Haar measure) from normalised Gaussian quaternions."""
    q = torch.randn(n, 4, generator=generator, dtype=dtype)
    q = q / q.norm(dim=-1, keepdim=True)
    return _quaternions_to_matrices(q).to(device=device)


def _quaternions_to_matrices(q: Tensor) -> Tensor:
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        dim=-2,
    )


def geodesic_angle_deg(rotations_a: Tensor, rotations_b: Tensor) -> Tensor:
    """Geodesic distance ``arccos((tr(A^T B) - 1)/2)`` in degrees, batched."""
    relative = rotations_a.transpose(-1, -2) @ rotations_b
    trace = relative[..., 0, 0] + relative[..., 1, 1] + relative[..., 2, 2]
    return torch.rad2deg(torch.arccos(((trace - 1.0) / 2.0).clamp(-1.0, 1.0)))


def euler_relion_to_matrix(rot_deg, tilt_deg, psi_deg) -> Tensor:
    """RELION ZYZ Euler angles (degrees) to rotation matrices ``(..., 3, 3)`` (float64).

    RELION's ``Euler_angles2matrix(alpha=rot, beta=tilt, gamma=psi)``::

        [[cg cb ca - sg sa,   cg cb sa + sg ca,  -cg sb],
         [-sg cb ca - cg sa, -sg cb sa + cg ca,   sg sb],
         [sb ca,              sb sa,              cb   ]]
    """
    a, b, g = (torch.deg2rad(torch.as_tensor(v, dtype=torch.float64)) for v in (rot_deg, tilt_deg, psi_deg))
    a, b, g = torch.broadcast_tensors(a, b, g)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    return torch.stack(
        [
            torch.stack([cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb], -1),
            torch.stack([-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb], -1),
            torch.stack([sb * ca, sb * sa, cb], -1),
        ],
        dim=-2,
    )


def matrix_to_euler_relion(rotations: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`euler_relion_to_matrix`: ``(rot, tilt, psi)`` in degrees.

    Follows RELION's ``Euler_matrix2angles``: tilt in [0, 180]; at the gimbal
    lock (``sin(tilt) ~ 0``) psi is set to 0 and the in-plane angle goes to rot.
    """
    r = rotations.to(torch.float64)
    sb = torch.sqrt(r[..., 0, 2] ** 2 + r[..., 1, 2] ** 2)
    tilt = torch.atan2(sb, r[..., 2, 2])
    regular = sb > 16 * torch.finfo(torch.float32).eps
    rot_reg = torch.atan2(r[..., 2, 1], r[..., 2, 0])
    psi_reg = torch.atan2(r[..., 1, 2], -r[..., 0, 2])
    # Gimbal lock: R = Rz(psi) Ry(tilt) Rz(rot) collapses to one z rotation.
    # With psi = 0: R[0,0] = cb ca, R[0,1] = cb sa  => rot = atan2(cb*R01, cb*R00)
    cb = torch.sign(r[..., 2, 2])
    rot_lock = torch.atan2(cb * r[..., 0, 1], cb * r[..., 0, 0])
    rot = torch.where(regular, rot_reg, rot_lock)
    psi = torch.where(regular, psi_reg, torch.zeros_like(psi_reg))
    return torch.rad2deg(rot), torch.rad2deg(tilt), torch.rad2deg(psi)


def view_directions(rotations: Tensor) -> Tensor:
    """Unit viewing directions ``R^T e_z`` (the volume axis projected along), ``(..., 3)``.

    For RELION angles this is ``(sin tilt cos rot, sin tilt sin rot, cos tilt)``,
    so ``(tilt, rot)`` are the colatitude and longitude of the view.
    """
    return rotations[..., 2, :]


class RotationAlignment:
    """Result of :func:`align_rotations`: ``R_ref ~ G @ F(R_est)``.

    ``F`` is the identity, or for ``flipped=True`` the handedness change
    ``F(R) = J R J`` with ``J = diag(1, 1, -1)`` (a mirrored map seen through
    mirrored poses gives the same projections up to an image flip, so this is
    the other hand of the same reconstruction).
    """

    def __init__(self, global_rotation: Tensor, flipped: bool, errors_deg: Tensor):
        self.global_rotation = global_rotation
        self.flipped = flipped
        self.errors_deg = errors_deg

    def apply(self, rotations: Tensor) -> Tensor:
        """Map estimated rotations into the reference frame."""
        rotations = rotations.to(self.global_rotation.dtype)
        if self.flipped:
            rotations = flip_handedness(rotations)
        return self.global_rotation @ rotations

    def __repr__(self) -> str:
        return (
            f"RotationAlignment(flipped={self.flipped}, mean={self.errors_deg.mean():.3f} deg, "
            f"median={self.errors_deg.median():.3f} deg)"
        )


_J = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


def flip_handedness(rotations: Tensor) -> Tensor:
    """``J R J`` with ``J = diag(1, 1, -1)``: the same views of the mirrored volume."""
    j = _J.to(rotations.dtype).to(rotations.device)
    return j @ rotations @ j


def _procrustes(reference: Tensor, estimate: Tensor) -> Tensor:
    """Rotation ``G`` minimising ``sum ||R_ref - G R_est||_F^2`` (SVD of ``sum R_ref R_est^T``)."""
    m = (reference @ estimate.transpose(-1, -2)).sum(0)
    u, _, vt = torch.linalg.svd(m)
    d = torch.sign(torch.linalg.det(u @ vt))
    fix = torch.diag(torch.stack([torch.ones_like(d), torch.ones_like(d), d]))
    return u @ fix @ vt


def align_rotations(reference: Tensor, estimate: Tensor, n_refine: int = 2) -> RotationAlignment:
    """Best global rotation (and hand) taking ``estimate`` onto ``reference``: ``R_ref ~ G F(R_est)``.

    ``G`` multiplies on the *left*. The gauge freedom of a reconstruction in
    this project's convention (a map rotated by ``Q``, ``V'(x) = V(Q^T x)``,
    seen at poses ``R Q^T``) acts on the *right*, so for pose errors call this
    on transposed rotations, as :func:`cryospin_lab.analysis.metrics.pose_error` does
    (``F`` commutes with the transpose).

    Tries both hands; for each, Procrustes on all pairs, then ``n_refine``
    rounds of Procrustes restricted to the better-aligned half (robust to the
    outliers a pose search leaves, e.g. pseudo-symmetric flips). Returns the
    hand with the smaller median geodesic error.
    """
    reference = torch.as_tensor(reference, dtype=torch.float64)
    estimate = torch.as_tensor(estimate, dtype=torch.float64)
    if reference.shape != estimate.shape or reference.shape[-2:] != (3, 3) or reference.ndim != 3:
        raise ValueError(
            f"align_rotations needs two (N, 3, 3) arrays of equal shape, got {tuple(reference.shape)} "
            f"and {tuple(estimate.shape)}"
        )
    best: RotationAlignment | None = None
    for flipped in (False, True):
        est = flip_handedness(estimate) if flipped else estimate
        g = _procrustes(reference, est)
        for _ in range(n_refine):
            err = geodesic_angle_deg(reference, g @ est)
            keep = err <= err.median()
            g = _procrustes(reference[keep], est[keep])
        errors = geodesic_angle_deg(reference, g @ est)
        candidate = RotationAlignment(g, flipped, errors)
        if best is None or errors.median() < best.errors_deg.median():
            best = candidate
    assert best is not None
    return best


def as_numpy(x) -> np.ndarray:
    """Small helper for callers that pass numpy or torch."""
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
