"""What a reconstruction run writes: per-epoch records gathered from events, maps, poses, metrics, plots.

Used by ``cryospin-lab reconstruct`` (:mod:`cryospin_lab.app.headless`); nothing
here drives training, everything reads events or the trainer's current state.

Files in the output folder ``DIR`` (:class:`ResultWriter`):

* ``map.mrc`` (branch ``main``, or the first branch) and, when the run holds
  several branches, ``map_<branch>.mrc`` for each; voxel size = the (possibly
  downsampled) pixel size; rewritten at every epoch end, so a killed run
  leaves the map of its last finished epoch.
* ``poses.star`` (and ``poses_<branch>.star`` with several branches): RELION
  3.1, the estimated rlnAngleRot/Tilt/Psi and rlnOriginX/YAngst (= -shift; 0
  when shifts are not estimated: the reconstruction assumed centred particles)
  of every particle in input order, written by ``star.write_relion31_star``
  with the input's optics and CTF. rlnImageName is copied verbatim from the
  input STAR (RELION resolves it relative to its project directory, as it did
  for the input; our reader needs ``--stack-dir`` / ``path_map`` when the
  stacks are not beside the file), and the input's other per-particle columns
  (micrograph name, coordinates, ...) are kept. For a .cs/.mrcs input the
  names point to the stacks relative to ``DIR``. The rows describe the
  original images (original pixel and box size) even when ``--box``
  downsampled them.
* ``metrics.csv``: one row per branch and epoch (:data:`METRICS_COLUMNS`, with
  one ``head_<i>_share_pct`` column per head after ``mean_loss``).
* ``fsc.png`` (FSC vs the ground-truth map at the last epoch, with the
  threshold line and the resolution) when a ground truth is given, else
  ``loss.png`` (mean loss per epoch). matplotlib's object API (``Figure``,
  which renders PNG with Agg): no pyplot, no global backend (``_result_plots``).

Every file is written to a temporary name in ``DIR`` and renamed, so an
interrupted write leaves the previous version.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryospin_lab.app._result_plots import plot_fsc, plot_loss
from cryospin_lab.app.epoch_records import METRICS_COLUMNS, FinishedEpoch
from cryospin_lab.engine.events import (
    ResolutionEvent,
)
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.atomic import atomic_path
from cryospin_lab.io.maps import write_map
from cryospin_lab.io.particles import ParticleStack

__all__ = ["ResultWriter", "write_poses_star"]

# Per-particle STAR columns that describe poses or optics: never copied from the input to poses.star.
_POSE_OR_OPTICS_COLUMNS = frozenset(
    "rlnAngleRot rlnAngleTilt rlnAnglePsi rlnOriginX rlnOriginY rlnOriginZ rlnOriginXAngst rlnOriginYAngst "
    "rlnOriginZAngst rlnVoltage rlnSphericalAberration rlnAmplitudeContrast rlnMagnification "
    "rlnDetectorPixelSize rlnImagePixelSize rlnPixelSize rlnImageSize rlnImageDimensionality "
    "rlnOpticsGroupName".split()
)


_HALF_MAPS = "half maps"  # key of the half-map FSC curve in ResultWriter.last_fsc


def _safe_name(branch: str) -> str:
    return re.sub(r"[^\w.-]", "_", branch)


def _atomic_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        handle.write(text)


class ResultWriter:
    """Writes maps, poses, metrics and the plot of a run into ``out_dir`` (see the module docstring)."""

    def __init__(self, trainer: Trainer, out_dir: Path, branch_names: list[str]):
        self.trainer = trainer
        self.out_dir = Path(out_dir)
        self.n_heads = trainer.config.encoder.n_heads
        self.branch_names = list(branch_names)
        self.fieldnames = list(METRICS_COLUMNS[:4])
        self.fieldnames += [f"head_{i}_share_pct" for i in range(self.n_heads)] + list(METRICS_COLUMNS[4:])
        self.rows: list[dict[str, str]] = []
        self.last_fsc: dict[str, ResolutionEvent] = {}

    def live_branches(self) -> list[str]:
        """Branches the trainer holds now (a forked parent is gone), in order of first appearance."""
        live = {b.name for b in self.trainer.branches + self.trainer.finished}
        self.add_branches(sorted(live))
        return [n for n in self.branch_names if n in live]

    @property
    def primary(self) -> str:
        """The branch written to map.mrc / poses.star: ``main``, else the first live one."""
        live = self.live_branches()
        return "main" if "main" in live else live[0]

    def add_branches(self, names) -> None:
        self.branch_names += [n for n in names if n not in self.branch_names]

    def keep_rows_until(self, epochs: dict[str, int]) -> None:
        """On resume: keep the metrics.csv rows up to each branch's checkpointed epoch."""
        path = self.out_dir / "metrics.csv"
        if not path.is_file():
            return
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                # A branch absent from the checkpoint is a forked parent: keep its rows before the fork.
                limit = epochs.get(row.get("branch", ""), max(epochs.values()))
                try:
                    keep = int(row.get("epoch", "")) <= limit
                except ValueError:
                    keep = False
                if keep:
                    self.rows.append({name: row.get(name) or "" for name in self.fieldnames})

    def _path(self, stem: str, branch: str, suffix: str) -> list[Path]:
        paths = [self.out_dir / f"{stem}{suffix}"] if branch == self.primary else []
        if len(self.live_branches()) > 1:
            paths.append(self.out_dir / f"{stem}_{_safe_name(branch)}{suffix}")
        return paths

    def epoch_done(self, done: FinishedEpoch) -> None:
        record = done.record
        self.add_branches([record.branch])
        self.rows.append(record.csv_row(self.n_heads))
        self.write_metrics()
        if done.resolution is not None:
            self.last_fsc[record.branch] = done.resolution
        if done.half_maps is not None:
            self.last_fsc[_HALF_MAPS] = done.half_maps
        if done.volume is not None:
            for path in self._path("map", record.branch, ".mrc"):
                write_map(path, done.volume.volume, done.volume.voxel_size_angstrom)

    def write_metrics(self) -> None:
        lines = io.StringIO()
        writer = csv.DictWriter(lines, fieldnames=self.fieldnames, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        _atomic_text(self.out_dir / "metrics.csv", lines.getvalue())

    def write_final(self) -> list[Path]:
        """Maps and poses of every branch from the trainer's current state, and the plot."""
        if self.trainer.config.gold_standard:
            written = self._write_gold_standard()
        else:
            written = self._write_branches()
        written.append(self.out_dir / "metrics.csv")
        plot = self.write_plot()
        if plot is not None:
            written += [plot, plot.with_suffix(".svg")]
        return written

    def _write_gold_standard(self) -> list[Path]:
        """``map.mrc`` = mean of the aligned halves, ``map_half1/2.mrc`` (half 2 aligned onto half 1),
        ``poses.star``: every particle's pose from its own half, in half 1's frame, with rlnRandomSubset."""
        result = self.trainer.gold_standard_result()
        apix = self.trainer.pixel_size_angstrom
        maps = {
            "map.mrc": result.average_map,
            "map_half1.mrc": result.half1_map,
            "map_half2.mrc": result.half2_map,
        }
        written = []
        for name, volume in maps.items():
            write_map(self.out_dir / name, volume, apix)
            written.append(self.out_dir / name)
        path = self.out_dir / "poses.star"
        write_poses_star(
            path,
            self.trainer,
            poses=(result.rotations, result.shifts_angstrom),
            extra_columns={"rlnRandomSubset": result.subset_of_row},
        )
        return written + [path]

    def _write_branches(self) -> list[Path]:
        written = []
        for branch in self.live_branches():
            for path in self._path("map", branch, ".mrc"):
                write_map(path, self.trainer.volume_real(branch), self.trainer.pixel_size_angstrom)
                written.append(path)
            for path in self._path("poses", branch, ".star"):
                write_poses_star(path, self.trainer, branch)
                written.append(path)
        return written

    def write_plot(self) -> Path | None:
        if self.trainer.ground_truth_map is not None or self.trainer.config.gold_standard:
            if not self.last_fsc:
                return None
            path = self.out_dir / "fsc.png"
            plot_fsc(path, self.last_fsc)
            return path
        if not self.rows:
            return None
        path = self.out_dir / "loss.png"
        plot_loss(path, self.rows)
        return path


def write_poses_star(
    path: Path,
    trainer: Trainer,
    branch: str = "main",
    *,
    poses: tuple[Tensor, Tensor | None] | None = None,
    extra_columns: dict[str, np.ndarray] | None = None,
) -> None:
    """The branch's poses (or ``poses``) as a RELION 3.1 STAR for the input images (module docstring).

    ``extra_columns`` are added per particle (e.g. ``rlnRandomSubset`` in gold-standard mode).
    """
    import pandas as pd
    import starfile

    from cryospin_lab.io.star import write_relion31_star

    stack = trainer.stack
    meta = stack.metadata
    rotations, shifts = trainer.poses(branch) if poses is None else poses
    if shifts is None:
        shifts = torch.zeros(len(meta), 2, dtype=torch.float64)
    estimated = dataclasses.replace(meta, rotations=rotations.double(), shifts_angstrom=shifts.double())
    with atomic_path(path, ".star") as tmp:
        write_relion31_star(tmp, estimated, "placeholder.mrcs")
        blocks = starfile.read(tmp, always_dict=True)
        particles = blocks["particles"]
        names, extra = _input_image_names(stack, path.parent)
        particles["rlnImageName"] = names
        for column in ("rlnOriginXAngst", "rlnOriginYAngst"):
            particles[column] = particles[column] + 0.0  # -0.0 (= -shift of 0) written as 0.000000
        if extra is not None:
            extra = extra[[c for c in extra.columns if c not in particles.columns]]
            extra = extra[[c for c in extra.columns if c not in (extra_columns or {})]]
            particles = pd.concat([particles, extra.reset_index(drop=True)], axis=1)
        for column, values in (extra_columns or {}).items():
            particles[column] = np.asarray(values)
        starfile.write(
            {"optics": blocks["optics"], "particles": particles}, tmp, overwrite=True, float_format="%.6f"
        )


def _input_image_names(stack: ParticleStack, out_dir: Path):
    """rlnImageName per row (verbatim from an input STAR) and the input's other particle columns."""
    import starfile

    if stack.path.suffix.lower() == ".star":
        blocks = starfile.read(stack.path, always_dict=True)
        particles = blocks.get("particles")
        if particles is None:  # RELION 3.0: one unnamed block
            particles = next(iter(blocks.values()))
        keep = [c for c in particles.columns if c not in _POSE_OR_OPTICS_COLUMNS and c != "rlnImageName"]
        return particles["rlnImageName"].astype(str).to_list(), particles[keep]
    meta = stack.metadata
    relative = {p: os.path.relpath(p, out_dir.resolve()) for p in set(meta.image_paths)}
    names = [f"{i + 1:06d}@{relative[p]}" for p, i in zip(meta.image_paths, meta.image_indices, strict=True)]
    return names, None
