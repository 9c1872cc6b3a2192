"""The pose ambiguity of a whole particle set under one map: every particle's view posterior, summarised.

For each image, the view posterior of :func:`~cryospin_lab.analysis.pose_posterior.view_posterior`
(the same HEALPix grid, training loss, CTF, contrast and temperature rule, docs/method.md §7),
computed for the whole set at once: the slices of the grid are rendered once
(:func:`~cryospin_lab.analysis.pose_grid.grid_slices`) and each batch of images is scored
against all of them as two matrix products (:func:`~cryospin_lab.analysis.pose_grid.grid_losses`).
Per image it keeps:

* ``entropy_bits``: the posterior's entropy over view directions, from 0 (one direction) to
  ``log2(npix)`` (no information);
* ``n_modes``: its local maxima (against the 8 HEALPix neighbours) whose pixel and neighbours
  hold at least ``MODE_MIN_MASS`` of the probability;
* ``mode_angle_deg``: the angle between the view directions of the two heaviest modes (NaN with
  one mode);
* ``mate_mass`` (with ``symmetry_rotations``): the probability within ``MATE_RADIUS_DEG`` of the
  view direction of the best rotation's mate ``R Q^T`` across a (near-)symmetry ``Q`` of the map.

Only the "l2" loss expands into matrix products; the per-particle path stays the reference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import healpy
import numpy as np
import torch
from torch import Tensor

from cryospin_lab.analysis.pose_grid import grid_losses, grid_slices
from cryospin_lab.analysis.pose_posterior import healpix_rotations, healpix_view_directions, noise_variances
from cryospin_lab.physics import fourier, so3
from cryospin_lab.physics.projection import FourierDisc
from cryospin_lab.physics.render import images_to_hartley

__all__ = ["MATE_RADIUS_DEG", "MODE_MIN_MASS", "SetAmbiguity", "set_ambiguity", "summarise_posteriors"]

MODE_MIN_MASS = 0.05  # a mode holds at least this much probability (pixel + neighbours): not noise
MATE_RADIUS_DEG = 15.0  # "on the mate": within about two pixels at nside 8 (spacing 7.3°)


@dataclass(frozen=True, eq=False)
class SetAmbiguity:
    """Result of :func:`set_ambiguity` (numpy arrays, one row per image)."""

    nside: int
    n_psi: int
    log_probabilities: np.ndarray  # (N, npix) float32, natural log, each row normalised
    entropy_bits: np.ndarray  # (N,)
    n_modes: np.ndarray  # (N,) int
    mode_angle_deg: np.ndarray  # (N,) NaN where one mode
    mate_mass: np.ndarray | None  # (N,) with symmetry_rotations, else None
    best_rotations: np.ndarray  # (N, 3, 3) the grid rotation of lowest loss
    temperatures: np.ndarray  # (N,) in loss units
    slices_s: float  # rendering the grid's slices (once per map)
    scoring_s: float  # scoring every image against them

    @property
    def particles_per_s(self) -> float:
        """Images scored per second, the slices included."""
        return len(self.entropy_bits) / max(self.slices_s + self.scoring_s, 1e-9)


def summarise_posteriors(
    log_probabilities: np.ndarray, nside: int, mates: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Entropy (bits), mode count, angle between the two heaviest modes (°) and, given the mates'
    ``(N, 3)`` view directions, the mass within ``MATE_RADIUS_DEG`` of them, of ``(N, npix)`` log
    posteriors over HEALPix pixels (RING)."""
    log_p = np.asarray(log_probabilities, dtype=np.float64)
    p = np.exp(log_p)
    entropy = -(p * np.where(p > 0, log_p, 0.0)).sum(1) / math.log(2)
    npix = p.shape[1]
    neighbours = healpy.get_all_neighbours(nside, np.arange(npix)).T  # (npix, 8), -1 where none
    valid = neighbours >= 0
    neighbour_p = np.where(valid[None], p[:, np.where(valid, neighbours, 0)], 0.0)  # (N, npix, 8)
    # a peak beats every neighbour; of equal neighbours (a bump between pixels) the lower index wins
    earlier = neighbours < np.arange(npix)[:, None]
    peak = ((p[:, :, None] > neighbour_p) | ((p[:, :, None] == neighbour_p) & ~earlier[None])).all(-1)
    mass = p + neighbour_p.sum(-1)
    modes = peak & (mass >= MODE_MIN_MASS)
    n_modes = modes.sum(1)
    directions = healpix_view_directions(nside)
    angle = np.full(len(p), np.nan)
    for i in np.flatnonzero(n_modes >= 2):
        top = np.flatnonzero(modes[i])[np.argsort(-mass[i, modes[i]])[:2]]
        cosine = np.clip(directions[top[0]] @ directions[top[1]], -1.0, 1.0)
        angle[i] = math.degrees(math.acos(cosine))
    mate_mass = None
    if mates is not None:
        near = np.asarray(mates, dtype=np.float64) @ directions.T >= math.cos(math.radians(MATE_RADIUS_DEG))
        mate_mass = (p * near).sum(1)
    return entropy, n_modes, angle, mate_mass


@torch.no_grad()
def set_ambiguity(
    volume_real: np.ndarray | Tensor,
    images: np.ndarray | Tensor,
    *,
    ctfs: np.ndarray | Tensor | None,
    pixel_size_angstrom: float,
    nside: int = 8,
    n_psi: int = 24,
    contrast: float = -1.0,
    radius: float | None = None,
    symmetry_rotations: np.ndarray | Tensor | None = None,
    batch: int = 256,
    device: str | torch.device = "cpu",
) -> SetAmbiguity:
    """Every image's view posterior under ``volume_real`` and its summary (see the module).

    Args:
        volume_real: ``(D, D, D)`` map in the trainer's units (``VolumeEvent.volume``).
        images: ``(N, D, D)`` particle images as the trainer sees them.
        ctfs: ``(N, D, D)`` CTFs on the centred grid, or None.
        nside, n_psi: the grid (default as the posterior panel: 768 directions x 24 angles).
        radius: Fourier disc radius (default the full disc).
        symmetry_rotations: ``(K, 3, 3)`` near-symmetries of the map (``analysis.symmetry``); the
            first gives ``mate_mass``.
        batch: images scored at once (memory ~``batch * npix * n_psi * 4`` bytes).
    """
    images = torch.as_tensor(np.asarray(so3.as_numpy(images), dtype=np.float32)).to(device)
    n, d = images.shape[0], images.shape[-1]
    volume = torch.as_tensor(np.asarray(so3.as_numpy(volume_real), dtype=np.float32)).to(device)
    if images.ndim != 3 or images.shape[1] != d or volume.shape != (d, d, d):
        raise ValueError(f"images must be (N, D, D) and the volume (D, D, D); got {tuple(images.shape)}, "
                         f"{tuple(volume.shape)}")  # fmt: skip
    start = time.perf_counter()
    disc = FourierDisc.make(d, radius, device=device)
    rotations = healpix_rotations(nside, n_psi, dtype=torch.float32).to(device)  # (npix, n_psi, 3, 3)
    npix = rotations.shape[0]
    slices = grid_slices(fourier.fht_center(volume, ndim=3), rotations, disc)
    squared = slices * slices  # once for every batch
    slices_s = time.perf_counter() - start
    temperatures = 2.0 * noise_variances(images.cpu()) / disc.n_freqs  # default_temperature, "l2"
    log_p = np.empty((n, npix), dtype=np.float32)
    best = np.empty((n, 3, 3))
    for lo in range(0, n, batch):
        chunk = images[lo : lo + batch]
        ctf = None
        if ctfs is not None:
            ctf = disc.gather(torch.as_tensor(np.asarray(so3.as_numpy(ctfs[lo : lo + batch]), np.float32)))
            ctf = ctf.to(device)
        losses = grid_losses(slices, images_to_hartley(chunk, disc), disc, ctf_values=ctf, contrast=contrast,
                             pixel_size_angstrom=pixel_size_angstrom, squared_slices=squared)  # fmt: skip
        grid = losses.double().cpu().reshape(len(chunk), npix, n_psi)
        lowest = grid.reshape(len(chunk), -1).min(1)
        weights = torch.logsumexp(
            -(grid - lowest.values[:, None, None]) / temperatures[lo : lo + batch, None, None], 2
        )
        log_p[lo : lo + batch] = (weights - torch.logsumexp(weights, 1, keepdim=True)).numpy()
        best[lo : lo + batch] = rotations.reshape(-1, 3, 3)[lowest.indices.to(device)].double().cpu().numpy()
    mates = None
    if symmetry_rotations is not None:
        q = np.asarray(so3.as_numpy(symmetry_rotations), dtype=np.float64).reshape(-1, 3, 3)[0]
        mates = (best @ q.T)[:, 2, :]  # the third row of R Q^T is its view direction
    entropy, n_modes, angle, mate_mass = summarise_posteriors(log_p, nside, mates)
    return SetAmbiguity(
        nside=int(nside), n_psi=int(n_psi), log_probabilities=log_p, entropy_bits=entropy, n_modes=n_modes,
        mode_angle_deg=angle, mate_mass=mate_mass, best_rotations=best, temperatures=temperatures.numpy(),
        slices_s=slices_s, scoring_s=time.perf_counter() - start - slices_s,
    )  # fmt: skip
