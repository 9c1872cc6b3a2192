"""Image formation: rotations, Fourier/Hartley transforms, the CTF, central slices, rendering and losses.

One idea per module: ``so3`` (the rotation conventions), ``fourier`` (centred
transforms, Hartley = Re - Im, DC at ``D // 2``), ``ctf``, ``projection``
(central slices of a Hartley volume inside a frequency disc) and ``render``
(the one render and loss both stages call). docs/method.md §1-§3 states the
conventions; every one is tested.
"""

from cryospin_lab._lazy import lazy_exports

_EXPORTS = {
    "CTFParams": ".ctf",
    "compute_ctf": ".ctf",
    "ctf_images": ".ctf",
    "FourierDisc": ".projection",
    "slice_volume": ".projection",
    "project_real": ".projection",
    "project_hartley": ".projection",
    "LossKind": ".render",
    "render_hartley": ".render",
    "image_losses": ".render",
    "winner_losses": ".render",
    "fft_center": ".fourier",
    "ifft_center": ".fourier",
    "fht_center": ".fourier",
    "ifht_center": ".fourier",
    "fourier_crop": ".fourier",
    "exp_so3": ".so3",
    "log_so3": ".so3",
    "random_rotations": ".so3",
    "geodesic_angle_deg": ".so3",
    "euler_relion_to_matrix": ".so3",
    "matrix_to_euler_relion": ".so3",
    "rotations_from_6d": ".so3",
    "view_directions": ".so3",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
