"""The particles as the training loop sees them: device batches, Hartley values, CTF, the disc schedule."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.physics import fourier
from cryospin_lab.physics.ctf import compute_ctf
from cryospin_lab.physics.projection import FourierDisc, max_disc_radius
from cryospin_lab.physics.render import images_to_hartley

__all__ = ["ParticleFeed", "available_memory_bytes"]


def _read_int(path: str) -> int | None:
    try:
        with open(path) as file:
            text = file.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (cgroup v2, no limit) -> None


def available_memory_bytes() -> float:
    """Memory this process may still use: the smaller of MemAvailable (/proc/meminfo) and the headroom
    of its memory cgroup (v2 ``memory.max - memory.current``, v1 ``limit_in_bytes - usage_in_bytes``);
    infinity where neither can be read (not Linux)."""
    limits = [math.inf]
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        with open("/proc/self/cgroup") as file:
            entries = [line.rstrip("\n").split(":", 2) for line in file]
    except OSError:
        entries = []
    for _, controllers, group in entries:
        if controllers == "":  # cgroup v2
            base = "/sys/fs/cgroup" + group
            limit, usage = _read_int(base + "/memory.max"), _read_int(base + "/memory.current")
        elif "memory" in controllers.split(","):
            base = "/sys/fs/cgroup/memory" + group
            limit = _read_int(base + "/memory.limit_in_bytes")
            usage = _read_int(base + "/memory.usage_in_bytes")
        else:
            continue
        if limit is not None and usage is not None and limit < 2**60:
            limits.append(max(limit - usage, 0))
    return float(min(limits))


class ParticleFeed:
    """Batches of one :class:`ParticleStack` for a run (shared by all its branches).

    Images are held in memory as one float32 tensor when they take less than
    2 GiB and less than a quarter of the memory available to the process (the
    smaller of the system's available memory and the memory cgroup's headroom);
    else each batch is read from the memory-mapped stack, so a stack larger than
    the process's memory streams (docs/decisions.md#stream-preload). Each batch comes
    with its Hartley values and CTF on the epoch's frequency disc, on the device.

    On the CPU, preloaded images also have their Hartley values and CTF on the full disc computed
    once, when both fit the same budget, and every batch reads its disc's columns of them:
    computing them again for each batch took about a tenth of a direct step and 40 % of a
    back-projection (docs/decisions.md#feed-disc-cache).
    """

    def __init__(
        self,
        stack: ParticleStack,
        config: TrainingConfig,
        device: torch.device,
        *,
        preload: bool = True,
        shard: tuple[int, int] = (0, 1),
    ):
        self.stack, self.config, self.device = stack, config, device
        # (rank, world): with several ranks this feed serves only images i with i % world == rank
        # (distributed.Comm.owns) and preloads only those: row i is self.images[i // world].
        self.rank, self.world = shard
        self.box_size = stack.box_size
        self.pixel_size_angstrom = float(stack.pixel_size_angstrom)
        meta = stack.metadata
        self.true_rotations = None if meta.rotations is None else torch.as_tensor(meta.rotations).float()
        self.true_shifts = (
            None if meta.shifts_angstrom is None else torch.as_tensor(meta.shifts_angstrom).float()
        )
        self._discs: dict[float, FourierDisc] = {}
        self._ctf32 = None if meta.ctf is None else meta.ctf.to(dtype=torch.float32)
        self.images = self._preload() if preload else None
        self._full_disc = FourierDisc.make(self.box_size, device=device)
        self._cached = self._cache_full_disc()
        self._columns: dict[float, Tensor] = {}
        self.signal_envelope = self._signal_envelope()

    def __len__(self) -> int:
        return len(self.stack)

    def _preload(self) -> Tensor | None:
        """All images as one float32 tensor when they fit (see the class doc), else None (read per batch)."""
        rows = np.arange(self.rank, len(self.stack), self.world)
        d = self.box_size
        if len(rows) * d * d * 4 > min(2 * 2**30, available_memory_bytes() / 4):
            return None
        chunks = [self.stack.get_batch(rows[i : i + 1024]).images for i in range(0, len(rows), 1024)]
        return torch.cat(chunks)

    @torch.no_grad()
    def _cache_full_disc(self) -> tuple[Tensor, Tensor | None] | None:
        """This shard's images' Hartley values and CTF ``(N, M)`` on the full disc, computed in fixed
        chunks (so a value never depends on the batches a run has seen), or None: not preloaded, not
        on the CPU, or over ``min(2 GiB, a quarter of the available memory)``."""
        if self.images is None or self.device.type != "cpu":
            return None
        n, m = len(self.images), self._full_disc.n_freqs
        if n * m * 4 * (1 if self._ctf32 is None else 2) > min(2 * 2**30, available_memory_bytes() / 4):
            return None
        hartley = torch.empty(n, m)
        ctf = None if self._ctf32 is None else torch.empty(n, m)
        freqs = self._full_disc.freqs_per_angstrom(self.pixel_size_angstrom, torch.float32)
        rows = torch.arange(self.rank, len(self.stack), self.world)
        for start in range(0, n, 1024):
            part = slice(start, start + 1024)
            hartley[part] = images_to_hartley(self.images[part], self._full_disc)
            if ctf is not None:
                ctf[part] = compute_ctf(self._ctf32[rows[part].numpy()], freqs)
        return hartley, ctf

    def _disc_columns(self, disc: FourierDisc) -> Tensor:
        """Where each of ``disc``'s frequencies sits in the full disc (both lists are in grid order)."""
        if disc.radius not in self._columns:
            full = self._full_disc.flat_index
            self._columns[disc.radius] = torch.searchsorted(full, disc.flat_index.to(full.device))
        return self._columns[disc.radius]

    @torch.no_grad()
    def _signal_envelope(self, n_images: int = 512) -> Tensor:
        """Expected magnitude ``(D, D, D)`` of the volume's Hartley values, by shell, from the data.

        Per shell ``r``: the observed power ``P(r)`` of the images' Hartley values
        (scaled as in the loss), minus the noise power (the median power of the
        outer quarter of shells, where signal is negligible at cryo-EM SNR), over
        the mean squared CTF. A volume of that magnitude renders images of the
        data's scale, so the decoder starts in range instead of spending
        thousands of steps moving its exponent (Adam moves it ~lr per step).
        """
        d = self.box_size
        disc = FourierDisc.make(d, device=torch.device("cpu"))
        idx = torch.linspace(0, len(self.stack) - 1, min(n_images, len(self.stack))).round().long()
        if self.images is not None and self.world == 1:
            images = self.images[idx]
        else:
            images = self.stack.get_batch(idx.numpy()).images
        observed = images_to_hartley(images.float(), disc)
        shells = disc.freqs.norm(dim=-1).round().long()
        n_shells = int(shells.max()) + 1
        count = torch.bincount(shells, minlength=n_shells).clamp(min=1)
        power = torch.bincount(shells, (observed**2).mean(0), minlength=n_shells) / count
        noise = power[int(0.75 * n_shells) :].median()
        signal = torch.maximum(power - noise, 0.01 * power)
        ctf_sq = torch.ones(n_shells)
        if self.stack.metadata.ctf is not None:
            ctf = compute_ctf(
                self.stack.metadata.ctf[idx.numpy()], disc.freqs_per_angstrom(self.pixel_size_angstrom)
            )
            ctf_sq = torch.bincount(shells, (ctf.float() ** 2).mean(0), minlength=n_shells) / count
        envelope = torch.sqrt(signal / ctf_sq.clamp(min=1e-2))
        radius = fourier.radial_index_3d(d).clamp(max=n_shells - 1)
        return envelope[radius].float()

    def batch(self, indices: Tensor, disc: FourierDisc) -> tuple[Tensor, Tensor, Tensor | None]:
        """Images ``(B, D, D)``, their Hartley values ``(B, M)`` and CTF ``(B, M)`` on the device."""
        mine = self.world == 1 or bool((indices % self.world == self.rank).all())
        if self.images is not None and mine:
            images = self.images[indices // self.world]  # this shard's images only (see __init__)
        else:  # not preloaded, or another rank's images (rank 0's tracked images for the UI)
            images = self.stack.get_batch(indices.numpy()).images
        images = images.to(self.device)
        if self._cached is not None and mine and disc.box_size == self.box_size:
            rows = indices // self.world
            hartley, ctf = (None if c is None else c.index_select(0, rows) for c in self._cached)
            if disc.n_freqs != self._full_disc.n_freqs:
                columns = self._disc_columns(disc)
                hartley, ctf = (None if c is None else c.index_select(1, columns) for c in (hartley, ctf))
            return images, hartley, ctf
        ctf = None
        if self._ctf32 is not None:
            # float32: a phase error under 1e-5 rad, at 2.5x the speed (docs/decisions.md#fused-adam)
            params = self._ctf32[indices.numpy()].to(self.device)
            ctf = compute_ctf(params, disc.freqs_per_angstrom(self.pixel_size_angstrom, torch.float32))
        return images, images_to_hartley(images, disc), ctf

    def disc(self, epoch: int) -> FourierDisc:
        """The frequencies fitted this epoch: low frequencies first, growing to the full disc."""
        cfg, r_max = self.config, max_disc_radius(self.box_size)
        if cfg.radius_ramp_epochs <= 0:
            fraction = 1.0
        else:
            t = min(1.0, epoch / cfg.radius_ramp_epochs)
            fraction = cfg.radius_start_fraction + (1 - cfg.radius_start_fraction) * t
        radius = max(2.0, round(r_max * fraction))
        # Called every step: build each radius's index tables once.
        if radius not in self._discs:
            self._discs[radius] = FourierDisc.make(self.box_size, radius, device=self.device)
        return self._discs[radius]

    def epoch_batches(self, epoch: int, subset: Tensor | None = None) -> Iterator[Tensor]:
        """Index batches of one epoch (of ``subset``'s rows, else all) in an order seeded by (seed, epoch).

        A run resumed at an epoch boundary therefore sees the same order.
        """
        gen = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        if subset is None:
            order = torch.randperm(len(self.stack), generator=gen)
        else:
            order = subset[torch.randperm(len(subset), generator=gen)]
        for start in range(0, len(order), self.config.batch_size):
            yield order[start : start + self.config.batch_size]
