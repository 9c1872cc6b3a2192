"""Particle stacks: memory-mapped ``.mrcs`` images with their STAR/.cs metadata.

* ``ParticleStack`` opens every stack with ``mrcfile.mmap`` and reads only the
  images of a batch (nothing is loaded whole). Headers are checked up front
  (file exists, real pixel mode, square images of the metadata's box size, every
  index inside the stack); pixel values are checked for NaN/Inf when a batch is
  read, and for the whole stack by :meth:`ParticleStack.validate`.
* Downsampling: ``box_size=`` crops the centred spectrum (``fourier.fourier_crop``),
  and the pixel size grows by ``D_in / D_out``. Shifts stay in Å; CTF parameters
  do not change.
* Normalisation (``normalize=True``): from each (downsampled) image subtract the
  mean of its background, the pixels outside the inscribed circle (radius
  ``D // 2``) as RELION does, then divide by one global standard deviation,
  estimated once over at most ``n_normalization_images`` images at evenly spaced
  indices (deterministic) after the same background subtraction. The contrast
  is not changed (RELION stacks keep their inverted contrast).
* ``half_split(seed)`` is a seeded random permutation cut in two sorted halves.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import torch
from torch import Tensor

from cryospin_lab.io.cryosparc import read_cs
from cryospin_lab.io.metadata import REAL_MRC_MODES, ParticleMetadata, PathMap, peek_stack
from cryospin_lab.io.star import read_star
from cryospin_lab.physics.ctf import CTFParams
from cryospin_lab.physics.fourier import fourier_crop_images

__all__ = ["ParticleBatch", "ParticleStack"]

_MAX_OPEN_STACKS = 64


@dataclass(frozen=True)
class ParticleBatch:
    """Images of rows ``indices`` with their metadata subsets (None where the metadata has none).

    ``images`` are float32 ``(B, D, D)`` indexed ``[y, x]``; ``rotations`` and
    ``shifts_angstrom`` keep the metadata's dtype (float64).
    """

    indices: Tensor
    images: Tensor
    rotations: Tensor | None
    shifts_angstrom: Tensor | None
    ctf: CTFParams | None
    pixel_size_angstrom: float

    def __len__(self) -> int:
        return self.indices.shape[0]

    def to(self, device) -> ParticleBatch:
        def move(t):
            return None if t is None else t.to(device)

        return ParticleBatch(
            indices=self.indices.to(device),
            images=self.images.to(device),
            rotations=move(self.rotations),
            shifts_angstrom=move(self.shifts_angstrom),
            ctf=move(self.ctf),
            pixel_size_angstrom=self.pixel_size_angstrom,
        )


def _peek_checked(stack_path: str, source: str) -> tuple[int, int, int]:
    """``(nz, ny, nx)`` of a stack after checking it exists and holds real pixels; warns on a lenient read."""
    if not os.path.isfile(stack_path):
        raise FileNotFoundError(
            f"{source}: image stack {stack_path} does not exist (if the stacks moved, pass "
            "mrcs_path_map= a folder or {old: new} dict; on the command line --stack-dir DIR)"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            shape, _, mode = peek_stack(stack_path)  # its ValueErrors name the file and the field
        except OSError as err:
            raise ValueError(f"{stack_path}: not a readable MRC stack ({err})") from err
    if any("map id" in str(w.message).lower() for w in caught):
        warnings.warn(f"{stack_path}: MRC header lacks the 'MAP ' id; reading it leniently", stacklevel=3)
    if mode not in REAL_MRC_MODES:
        kind = "complex" if mode in (3, 4) else "unsupported"
        raise ValueError(f"{stack_path}: MRC mode {mode} ({kind}) is not a real-valued image stack")
    nz, ny, nx = shape
    if nx != ny:
        raise ValueError(f"{stack_path}: images are {nx} x {ny} (nx x ny); square images are required")
    return nz, ny, nx


class ParticleStack:
    """A particle data set: a STAR (.star), cryoSPARC (.cs) or bare stack (.mrcs/.mrc) file.

    ``mrcs_path_map`` renames stacks that moved (see ``star.read_star``);
    ``pixel_size_angstrom`` overrides the file's pixel size (needed for a bare stack
    whose header has none); ``box_size`` Fourier-downsamples on load.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        mrcs_path_map: PathMap = None,
        box_size: int | None = None,
        normalize: bool = True,
        pixel_size_angstrom: float | None = None,
        n_normalization_images: int = 256,
    ):
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".star":
            metadata = read_star(path, path_map=mrcs_path_map, pixel_size_angstrom=pixel_size_angstrom)
        elif suffix == ".cs":
            metadata = read_cs(path, path_map=mrcs_path_map, pixel_size_angstrom=pixel_size_angstrom)
        elif suffix in (".mrcs", ".mrc", ".st"):
            metadata = _metadata_from_stack(path, pixel_size_angstrom)
        else:
            raise ValueError(f"{path}: unknown particle file type {suffix!r} (expected .star, .cs or .mrcs)")
        self.path = path
        self.metadata = metadata
        self._check_stacks()
        self.original_box_size = metadata.box_size
        self.box_size = metadata.box_size if box_size is None else int(box_size)
        if not 0 < self.box_size <= metadata.box_size or (box_size is not None and box_size != self.box_size):
            raise ValueError(
                f"{path}: box_size {box_size} must be between 1 and the stack's {metadata.box_size}"
            )
        self.pixel_size_angstrom = metadata.pixel_size_angstrom * metadata.box_size / self.box_size
        self._mmaps: OrderedDict[str, np.ndarray] = OrderedDict()
        self.normalize = normalize
        self.normalization_std = 1.0  # the estimate below reads images with this value
        if normalize:
            self.normalization_std = self._estimate_std(n_normalization_images)

    # ------------------------------------------------------------------ checks and file access

    def _check_stacks(self) -> None:
        meta, source = self.metadata, str(self.path)
        # One id per distinct stack file; rows are grouped by it when reading.
        self._stack_paths, self._stack_ids = np.unique(
            np.asarray(meta.image_paths, dtype=object), return_inverse=True
        )
        last_index = np.full(len(self._stack_paths), -1, dtype=np.int64)
        np.maximum.at(last_index, self._stack_ids, meta.image_indices)
        for stack_id, stack_path in enumerate(self._stack_paths):
            nz, _, nx = _peek_checked(str(stack_path), source)
            if nx != meta.box_size:
                raise ValueError(
                    f"{source}: image size {meta.box_size} (rlnImageSize / blob/shape) differs from {nx} "
                    f"in {stack_path}"
                )
            if last_index[stack_id] >= nz:
                row = np.flatnonzero(
                    (self._stack_ids == stack_id) & (meta.image_indices == last_index[stack_id])
                )[0]
                raise ValueError(
                    f"{source}: row {row + 1} asks for image {last_index[stack_id] + 1} (rlnImageName / "
                    f"blob/idx) but {stack_path} holds {nz} images"
                )

    def _stack(self, stack_path: str) -> np.ndarray:
        data = self._mmaps.get(stack_path)
        if data is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # already reported by _peek_checked
                try:
                    with mrcfile.mmap(stack_path, mode="r", permissive=True) as mrc:
                        data = mrc.data
                except Exception as err:  # the header was checked; the file may have changed since
                    raise ValueError(f"{stack_path}: cannot map the image data ({err})") from err
            if data is None or data.ndim not in (2, 3):
                raise ValueError(f"{stack_path}: mrcfile could not map the image data as a 2-D stack")
            if data.ndim == 2:
                data = data[None]
            if len(self._mmaps) >= _MAX_OPEN_STACKS:
                self._mmaps.popitem(last=False)
            self._mmaps[stack_path] = data
        else:
            self._mmaps.move_to_end(stack_path)
        return data

    def _read_raw(self, rows: np.ndarray) -> np.ndarray:
        """float32 ``(B, D0, D0)`` images of ``rows`` read from the memory maps, checked for NaN/Inf."""
        meta = self.metadata
        out = np.empty((len(rows), meta.box_size, meta.box_size), dtype=np.float32)
        ids = self._stack_ids[rows]
        for stack_id in np.unique(ids):
            stack_path = str(self._stack_paths[stack_id])
            where = np.flatnonzero(ids == stack_id)
            stack_indices = meta.image_indices[rows[where]]
            order = np.argsort(stack_indices, kind="stable")  # sequential reads
            images = np.asarray(self._stack(stack_path)[stack_indices[order]], dtype=np.float32)
            finite = np.isfinite(images).all(axis=(1, 2))
            if not finite.all():
                bad = where[order][np.flatnonzero(~finite)[0]]
                raise ValueError(
                    f"{stack_path}: particle {rows[bad]} (image {meta.image_indices[rows[bad]] + 1} of the "
                    "stack) has NaN or Inf pixels"
                )
            out[where[order]] = images
        return out

    def _process(self, raw: np.ndarray) -> Tensor:
        images = torch.from_numpy(raw)
        if self.box_size != self.original_box_size:
            images = fourier_crop_images(images, self.box_size)
        if self.normalize:
            images = _subtract_background(images.double())  # float64: means over many pixels
            images = images / self.normalization_std
        return images.float().contiguous()

    def _estimate_std(self, n_images: int) -> float:
        n = len(self)
        rows = np.unique(np.linspace(0, n - 1, min(n, max(1, n_images))).round().astype(np.int64))
        chunks = [self._process(self._read_raw(rows[i : i + 64])) for i in range(0, len(rows), 64)]
        std = float(torch.cat(chunks).double().std(correction=0))
        if not std > 0:
            warnings.warn(f"{self.path}: images are constant; normalisation uses std 1", stacklevel=3)
            return 1.0
        return std

    # ------------------------------------------------------------------ public API

    def __len__(self) -> int:
        return len(self.metadata)

    def get_batch(self, indices) -> ParticleBatch:
        """Images and metadata of rows ``indices`` (int, sequence, numpy array or tensor), in that order."""
        rows = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(
                f"{self.path}: particle index out of range 0..{len(self) - 1}: {rows.tolist()[:10]}"
            )
        rows = rows % len(self)
        t = torch.from_numpy(rows)
        meta = self.metadata
        return ParticleBatch(
            indices=t,
            images=self._process(self._read_raw(rows)),
            rotations=None if meta.rotations is None else meta.rotations[t],
            shifts_angstrom=None if meta.shifts_angstrom is None else meta.shifts_angstrom[t],
            ctf=None if meta.ctf is None else meta.ctf[t],
            pixel_size_angstrom=self.pixel_size_angstrom,
        )

    def batches(
        self, batch_size: int, *, indices=None, shuffle_seed: int | None = None
    ) -> Iterator[ParticleBatch]:
        """Consecutive batches over ``indices`` (default all), shuffled once by ``shuffle_seed`` if given."""
        rows = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        if shuffle_seed is not None:
            rows = np.random.default_rng(shuffle_seed).permutation(rows)
        for start in range(0, len(rows), batch_size):
            yield self.get_batch(rows[start : start + batch_size])

    def half_split(self, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Two disjoint sorted halves covering all rows (sizes ceil(N/2), floor(N/2)), fixed by ``seed``."""
        permutation = np.random.default_rng(seed).permutation(len(self))
        half = (len(self) + 1) // 2
        return np.sort(permutation[:half]), np.sort(permutation[half:])

    def validate(self, chunk_size: int = 256, progress: bool = True) -> None:
        """Read every image once (tqdm bar); raise ValueError naming the first file/particle with NaN/Inf."""
        from tqdm.auto import tqdm

        with tqdm(
            total=len(self), desc=f"checking {self.path.name}", unit="img", disable=not progress
        ) as bar:
            for start in range(0, len(self), chunk_size):
                rows = np.arange(start, min(start + chunk_size, len(self)))
                self._read_raw(rows)
                bar.update(len(rows))

    def __getstate__(self):  # memory maps are reopened lazily after unpickling (e.g. DataLoader workers)
        state = self.__dict__.copy()
        state["_mmaps"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return (
            f"ParticleStack({str(self.path)!r}, n={len(self)}, box_size={self.box_size}, "
            f"pixel_size_angstrom={self.pixel_size_angstrom:.4g}, normalize={self.normalize})"
        )


def _subtract_background(images: Tensor) -> Tensor:
    d = images.shape[-1]
    k = torch.arange(d, dtype=torch.float64) - d // 2
    outside = (k[:, None] ** 2 + k[None, :] ** 2) >= (d // 2) ** 2
    return images - images[..., outside].mean(-1)[..., None, None]


def _metadata_from_stack(path: Path, pixel_size_angstrom: float | None) -> ParticleMetadata:
    nz, _, nx = _peek_checked(str(path.absolute()), str(path))
    if nz == 0:
        raise ValueError(f"{path}: the stack holds 0 images (header nz = 0)")
    if pixel_size_angstrom is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixel_size_angstrom = peek_stack(str(path))[1]
        if not 0 < pixel_size_angstrom < math.inf:
            raise ValueError(
                f"{path}: header voxel size is {pixel_size_angstrom}; pass pixel_size_angstrom= explicitly"
            )
    elif not 0 < pixel_size_angstrom < math.inf:
        raise ValueError(f"{path}: pixel_size_angstrom={pixel_size_angstrom} must be a positive number")
    return ParticleMetadata(
        image_paths=[os.path.abspath(path)] * nz,
        image_indices=np.arange(nz),
        rotations=None,
        shifts_angstrom=None,
        ctf=None,
        pixel_size_angstrom=float(pixel_size_angstrom),
        box_size=nx,
        optics_groups=np.ones(nz, dtype=np.int64),
        source_path=str(path),
    )
