"""Pose posterior over view directions on a HEALPix grid, and head specialisation (docs/method.md §7).

For one image ``Y`` and a volume, every HEALPix pixel centre (a view direction,
RING ordering) is combined with ``n_psi`` in-plane angles; the *training* loss
``L`` is evaluated at each of these rotations (the same
:func:`~cryospin_lab.physics.render.render_hartley` / :func:`~cryospin_lab.physics.render.image_losses`,
CTF and contrast as the trainer, full disc by default), and

    p(pixel) = sum_psi exp(-(L - L_min) / T) / Z.

Temperature: ``L`` ("l2") is the mean over the ``M`` Hartley coefficients of
the disc of the squared difference, and those coefficients carry independent
Gaussian noise of the per-pixel variance ``s^2`` (``render.images_to_hartley``
is orthonormal; ``H(k)`` and ``H(-k)`` are independent), so the negative
log-likelihood of Eq. 3 is ``M L / (2 s^2)`` and ``T = 2 s^2 / M`` makes the
weights exact likelihood ratios. ``s^2`` is not part of the model; by default
it is estimated from the image itself, as the variance of the pixels outside
the inscribed circle (the background RELION normalises with, see
``io.particles.ParticleStack``). That over-estimates ``s^2`` when CTF-delocalised
signal reaches the corners, which widens the posterior (the safe direction),
and it assumes white noise. For "l1" (mean residual modulus ``|dF|``, no
likelihood) the default reads ``L`` as the NLL of a radial Laplace model
``exp(-|dF| / b)`` whose mean modulus ``2 b`` matches the noise's
``s sqrt(pi) / 2``: ``T = 2 b / M = s sqrt(pi) / (2 M)``, a heuristic. Pass
``temperature=`` to override (and for noiseless images, where the estimate is 0).

Rotations of the grid: pixel ``(theta, phi) = healpy.pix2ang`` and angle
``psi`` give ``R = euler_relion_to_matrix(rot=phi, tilt=theta, psi)``, whose
``so3.view_directions`` (third row) is the pixel centre; ``psi`` turns the
image in-plane. The Mollweide helpers are textbook formulas (tested against
``healpy.projector.MollweideProj``), so that the UI can raster maps and place
markers without healpy's plotting state.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryospin_lab.physics import fourier, so3
from cryospin_lab.physics.projection import FourierDisc
from cryospin_lab.physics.render import LossKind, image_losses, images_to_hartley, render_hartley

__all__ = [
    "ViewPosterior",
    "HeadSpecialisation",
    "healpix_view_directions",
    "healpix_rotations",
    "estimate_noise_variance",
    "noise_variances",
    "default_temperature",
    "view_posterior",
    "render_image",
    "head_specialisation",
    "mollweide_xy",
    "mollweide_raster",
]

_NSIDES = (1, 2, 4, 8, 16, 32)


def _check_nside(nside: int) -> int:
    if int(nside) != nside or int(nside) not in _NSIDES:
        raise ValueError(f"nside must be one of {_NSIDES}, got {nside!r}")
    return int(nside)


def healpix_view_directions(nside: int) -> np.ndarray:
    """Unit vectors ``(12 nside^2, 3)`` of the HEALPix pixel centres, RING ordering (``healpy.pix2vec``)."""
    import healpy

    nside = _check_nside(nside)
    return np.stack(healpy.pix2vec(nside, np.arange(12 * nside * nside)), axis=-1)


def healpix_rotations(nside: int, n_psi: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Rotations ``(npix, n_psi, 3, 3)``: ``view_directions(R[p, j])`` = centre of pixel ``p``.

    RELION angles ``rot = phi``, ``tilt = theta`` of the pixel centre and
    ``psi = 360 j / n_psi`` degrees (see the module docstring).
    """
    import healpy

    nside = _check_nside(nside)
    if int(n_psi) < 1:
        raise ValueError(f"n_psi must be >= 1, got {n_psi}")
    theta, phi = healpy.pix2ang(nside, np.arange(12 * nside * nside))
    psi = np.arange(int(n_psi)) * (360.0 / int(n_psi))
    rotations = so3.euler_relion_to_matrix(np.degrees(phi)[:, None], np.degrees(theta)[:, None], psi[None, :])
    return rotations.to(dtype)


def estimate_noise_variance(image: np.ndarray | Tensor) -> float:
    """Per-pixel noise variance of a ``(D, D)`` image: variance of the pixels outside the inscribed circle."""
    image = torch.from_numpy(np.array(so3.as_numpy(image), dtype=np.float64))
    d = image.shape[-1]
    if image.ndim != 2 or image.shape[0] != d:
        raise ValueError(f"estimate_noise_variance expects a square (D, D) image, got {tuple(image.shape)}")
    return float(noise_variances(image[None])[0])


def noise_variances(images: Tensor) -> Tensor:
    """:func:`estimate_noise_variance` of each of ``(N, D, D)`` images, as a float64 ``(N,)`` tensor."""
    d = images.shape[-1]
    k = torch.arange(d, dtype=torch.float64) - d // 2
    outside = (k[:, None] ** 2 + k[None, :] ** 2) > (d // 2) ** 2
    return images.double()[:, outside].var(dim=1, correction=1)


def default_temperature(noise_variance: float, n_freqs: int, loss: str = "l2") -> float:
    """``T`` that turns loss differences into log-likelihood ratios (module docstring)."""
    if not noise_variance > 0:
        raise ValueError(
            f"the estimated noise variance is {noise_variance} (a noiseless image?); pass temperature="
        )
    if LossKind(loss) is LossKind.L2:
        return 2.0 * noise_variance / n_freqs
    return math.sqrt(noise_variance * math.pi) / (2.0 * n_freqs)


@dataclass(frozen=True, eq=False)
class ViewPosterior:
    """Result of :func:`view_posterior` (numpy arrays, float64)."""

    nside: int
    n_psi: int
    temperature: float  # in loss units
    noise_variance: float | None  # the estimate behind the default temperature; None when T was given
    view_directions: np.ndarray  # (npix, 3) pixel centres (RING)
    probabilities: np.ndarray  # (npix,) summing to 1
    log_probabilities: np.ndarray  # (npix,) natural log
    losses: np.ndarray  # (npix, n_psi) training loss at every grid rotation
    best_pixel: int
    best_psi_deg: float
    best_rotation: np.ndarray  # (3, 3) the grid rotation of lowest loss
    best_loss: float
    wall_time_s: float


def _float32(x, device) -> Tensor:
    """A float32 copy on ``device`` (events hold read-only arrays, which torch will not wrap)."""
    return torch.from_numpy(np.array(so3.as_numpy(x), dtype=np.float32)).to(device)


def _setup(volume_real, ctf, box_size: int, radius: float | None, device):
    volume = _float32(volume_real, device)
    if volume.ndim != 3 or set(volume.shape) != {box_size}:
        raise ValueError(f"volume_real must be ({box_size},)*3 to match the image, got {tuple(volume.shape)}")
    disc = FourierDisc.make(box_size, radius, device=device)
    ctf_values = None
    if ctf is not None:
        ctf = _float32(ctf, device)
        if ctf.shape != (box_size, box_size):
            raise ValueError(f"ctf must be ({box_size}, {box_size}) like the image, got {tuple(ctf.shape)}")
        ctf_values = disc.gather(ctf)[None]  # (1, M)
    # The trainer renders volume.hartley(); a VolumeEvent holds ifht_center of it, so this is exact.
    return fourier.fht_center(volume, ndim=3), disc, ctf_values


@torch.no_grad()
def view_posterior(
    volume_real: np.ndarray | Tensor,
    image: np.ndarray | Tensor,
    *,
    ctf: np.ndarray | Tensor | None,
    pixel_size_angstrom: float,
    nside: int = 8,
    n_psi: int = 24,
    temperature: float | None = None,
    contrast: float = -1.0,
    loss: str = "l2",
    radius: float | None = None,
    device: str | torch.device = "cpu",
    batch: int = 1024,
) -> ViewPosterior:
    """Posterior over HEALPix view directions of one image under one volume.

    Args:
        volume_real: ``(D, D, D)`` map in the trainer's units (``VolumeEvent.volume``).
        image: ``(D, D)`` particle image as the trainer sees it (``ParticleView.image``).
        ctf: ``(D, D)`` CTF on the centred grid (``ParticleView.ctf``), or None.
        nside: HEALPix resolution (4, 8 or 16 are sensible: 192 to 3072 directions).
        n_psi: in-plane angles per direction.
        temperature: ``T`` in loss units; None: :func:`default_temperature` of
            :func:`estimate_noise_variance` of the image.
        contrast, loss: as in the run's ``TrainingConfig``.
        radius: Fourier disc radius (default the full disc ``(D - 1) // 2``).
        batch: rotations rendered per chunk (bounds memory: ~``batch * M * 24`` bytes).
    """
    start = time.perf_counter()
    image = _float32(image, device)
    d = image.shape[-1]
    if image.ndim != 2 or image.shape[0] != d:
        raise ValueError(f"image must be a square (D, D) array, got {tuple(image.shape)}")
    volume_ht, disc, ctf_values = _setup(volume_real, ctf, d, radius, device)
    noise_variance = None
    if temperature is None:
        noise_variance = estimate_noise_variance(image.cpu())
        temperature = default_temperature(noise_variance, disc.n_freqs, loss)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    kind = LossKind(loss)
    observed = images_to_hartley(image[None], disc)  # (1, M)
    rotations = healpix_rotations(nside, n_psi, dtype=torch.float32).to(device)
    npix = rotations.shape[0]
    flat = rotations.reshape(-1, 3, 3)
    losses = torch.empty(flat.shape[0], dtype=torch.float32, device=device)
    for lo in range(0, flat.shape[0], max(1, int(batch))):
        chunk = flat[lo : lo + int(batch)][None]  # (1, C, 3, 3): one image, C "heads"
        predicted = render_hartley(
            volume_ht,
            chunk,
            disc,
            pixel_size_angstrom=pixel_size_angstrom,
            ctf_values=ctf_values,
            contrast=contrast,
        )
        losses[lo : lo + chunk.shape[1]] = image_losses(predicted, observed, disc, kind)[0]
    grid = losses.double().cpu().reshape(npix, int(n_psi))
    best = int(torch.argmin(grid))
    best_loss = float(grid.reshape(-1)[best])
    log_weights = torch.logsumexp(-(grid - best_loss) / temperature, dim=1)  # (npix,)
    log_p = log_weights - torch.logsumexp(log_weights, dim=0)
    pixel, psi_index = divmod(best, int(n_psi))
    return ViewPosterior(
        nside=int(nside),
        n_psi=int(n_psi),
        temperature=float(temperature),
        noise_variance=noise_variance,
        view_directions=healpix_view_directions(nside),
        probabilities=log_p.exp().numpy(),
        log_probabilities=log_p.numpy(),
        losses=grid.numpy(),
        best_pixel=pixel,
        best_psi_deg=psi_index * 360.0 / int(n_psi),
        best_rotation=rotations[pixel, psi_index].double().cpu().numpy(),
        best_loss=best_loss,
        wall_time_s=time.perf_counter() - start,
    )


@torch.no_grad()
def render_image(
    volume_real: np.ndarray | Tensor,
    rotation: np.ndarray | Tensor,
    *,
    ctf: np.ndarray | Tensor | None,
    pixel_size_angstrom: float,
    contrast: float = -1.0,
    radius: float | None = None,
) -> np.ndarray:
    """The ``(D, D)`` image the trainer predicts at ``rotation``, in the units of the particle images.

    ``images_to_hartley`` divides an image's transform by ``D``, so the image
    whose Hartley values are the rendered slice ``s`` is ``D * ifht_center(s)``.
    """
    d = np.shape(volume_real)[-1]
    volume_ht, disc, ctf_values = _setup(volume_real, ctf, d, radius, "cpu")
    rot = _float32(rotation, "cpu").reshape(1, 3, 3)
    slices = render_hartley(
        volume_ht,
        rot,
        disc,
        pixel_size_angstrom=pixel_size_angstrom,
        ctf_values=ctf_values,
        contrast=contrast,
    )
    return (d * fourier.ifht_center(disc.scatter(slices), ndim=2))[0].numpy()


@dataclass(frozen=True, eq=False)
class HeadSpecialisation:
    """Per head and HEALPix pixel (RING) of the true view: win share and mean error (NaN where empty)."""

    nside: int
    counts: np.ndarray  # (npix,) images whose true view falls in the pixel
    wins: np.ndarray  # (H, npix) images won by each head there
    shares: np.ndarray  # (H, npix) wins / counts; NaN where counts == 0
    mean_errors_deg: np.ndarray | None  # (H, npix) mean error of the images the head wins; NaN if none
    pixel_mean_errors_deg: np.ndarray | None  # (npix,) mean error over all images in the pixel


def head_specialisation(
    view_directions: np.ndarray,
    winning_heads: np.ndarray,
    errors_deg: np.ndarray | None,
    n_heads: int,
    nside: int = 4,
) -> HeadSpecialisation:
    """Bin images by (true) view direction and count, per pixel, how often each head wins."""
    import healpy

    nside = _check_nside(nside)
    dirs = np.asarray(view_directions, dtype=np.float64)
    heads = np.asarray(winning_heads, dtype=np.int64)
    n = len(heads)
    if dirs.shape != (n, 3) or heads.ndim != 1:
        raise ValueError(
            f"view_directions must be (N, 3) with N = len(winning_heads) = {n}, got {dirs.shape}"
        )
    if n and (heads.min() < 0 or heads.max() >= n_heads):
        raise ValueError(f"winning_heads must be in [0, {n_heads}), got range {heads.min()}..{heads.max()}")
    npix = 12 * nside * nside
    pixels = healpy.vec2pix(nside, dirs[:, 0], dirs[:, 1], dirs[:, 2]) if n else np.zeros(0, np.int64)
    flat = heads * npix + pixels  # one bincount over (head, pixel) pairs
    wins = np.bincount(flat, minlength=n_heads * npix).reshape(n_heads, npix)
    counts = wins.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(counts > 0, wins / np.maximum(counts, 1), np.nan)
        mean_errors = pixel_errors = None
        if errors_deg is not None:
            err = np.asarray(errors_deg, dtype=np.float64)
            if err.shape != (n,):
                raise ValueError(f"errors_deg must be ({n},), got {err.shape}")
            sums = np.bincount(flat, weights=err, minlength=n_heads * npix).reshape(n_heads, npix)
            mean_errors = np.where(wins > 0, sums / np.maximum(wins, 1), np.nan)
            pixel_errors = np.where(counts > 0, sums.sum(0) / np.maximum(counts, 1), np.nan)
    return HeadSpecialisation(nside, counts, wins, shares, mean_errors, pixel_errors)


def _longitude_latitude_deg(directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    return np.degrees(np.arctan2(v[:, 1], v[:, 0])), np.degrees(np.arcsin(np.clip(v[:, 2], -1, 1)))


def mollweide_xy(directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mollweide ``(x, y)`` of unit vectors ``(N, 3)``: longitude ``atan2(y, x)`` to the right.

    Scaled so that ``x`` spans [-180, 180] on the equator and ``y`` [-90, 90]:
    ``x = lon cos(a)``, ``y = 90 sin(a)`` with ``2a + sin 2a = pi sin(lat)``
    (solved by Newton's method). Equals 90 x ``MollweideProj(flipconv="geo").vec2xy``.
    """
    lon, lat = _longitude_latitude_deg(directions)
    target = math.pi * np.sin(np.radians(lat))
    a = np.radians(lat)
    for _ in range(50):  # converges in a few steps except near the poles, where the step -> 0/0
        denom = 2.0 + 2.0 * np.cos(2 * a)
        step = np.where(denom > 1e-12, (2 * a + np.sin(2 * a) - target) / np.maximum(denom, 1e-12), 0.0)
        a = a - step
        if np.all(np.abs(step) < 1e-12):
            break
    return lon * np.cos(a), 90.0 * np.sin(a)


def mollweide_raster(values: np.ndarray, width: int = 360) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A HEALPix map (RING) as a Mollweide image: ``(x (W,), y (H,), image (H, W))``, NaN outside.

    ``H = W // 2``; pixel centres of the raster are inverted in closed form
    (``a = asin(y / 90)``, ``lon = x / cos a``, ``sin(lat) = (2a + sin 2a) / pi``).
    """
    import healpy

    values = np.asarray(values, dtype=np.float64)
    nside = healpy.npix2nside(values.shape[-1])
    height = width // 2
    x = (np.arange(width) + 0.5) / width * 360.0 - 180.0
    y = (np.arange(height) + 0.5) / height * 180.0 - 90.0
    a = np.arcsin(y / 90.0)[:, None]
    lon = x[None, :] / np.cos(a)
    inside = np.abs(lon) <= 180.0
    lat = np.arcsin(np.clip((2 * a + np.sin(2 * a)) / math.pi, -1, 1)) * np.ones_like(lon)  # radians
    pix = healpy.ang2pix(nside, math.pi / 2 - lat, np.radians(np.where(inside, lon, 0.0)) % (2 * math.pi))
    return x, y, np.where(inside, values[..., pix], np.nan)
