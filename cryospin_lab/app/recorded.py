"""A finished run read back from its output folder, epoch by epoch, for replay and comparison.

``cryospin-lab reconstruct`` (and the workbench's runs) leave in their folder
``events.jsonl`` (every event; heavy ones only as the latest) and
``checkpoints/epoch_XXXX.pt`` (the whole state after each epoch). A
:class:`RecordedRun` gives the light events up to any epoch and, from that
epoch's checkpoint, each branch's map as a :class:`VolumeEvent`: what the
workbench's panels need to show the run as it was at that epoch
(``cryospin_lab.widgets.replay``). Checkpoints are read with
``weights_only=True``.

:func:`compact_run` (``cryospin-lab compact RUN_DIR``) keeps only what a
replay needs: each epoch's maps in ``maps.npz`` (float16 scaled by each map's
largest value: 0.5 MB per map at D=64, against ~10 MB per checkpoint) and the
last checkpoint (the run's settings, and a resume or fork from its end).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from cryospin_lab.app.event_file import event_from_record, event_type
from cryospin_lab.engine.events import Event, Phase, StepEvent, VolumeEvent
from cryospin_lab.io.checkpoint import load_checkpoint
from cryospin_lab.physics import fourier

__all__ = ["CompactResult", "RecordedRun", "compact_run"]

_CHECKPOINT = re.compile(r"epoch_(\d{4,})\.pt$")
MAPS_FILE = "maps.npz"


class RecordedRun:
    """The run in ``run_dir`` (``events.jsonl``, ``checkpoints/``, ``maps.npz``), read once, maps on demand.

    Raises FileNotFoundError naming the folder when it holds no event log, and
    ValueError when it holds neither per-epoch checkpoints nor ``maps.npz`` (a
    run with ``checkpoint_every = 0`` cannot be replayed).
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        log = self.run_dir / "events.jsonl"
        if not log.is_file():
            raise FileNotFoundError(f"{self.run_dir}: no events.jsonl (not a cryospin-lab run folder)")
        self.events: list[Event] = []
        self.pixel_size_angstrom: float | None = None
        with open(log, encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    kind = event_type(record)
                    if kind is VolumeEvent and self.pixel_size_angstrom is None:
                        self.pixel_size_angstrom = float(record["fields"]["voxel_size_angstrom"])
                    if kind.heavy:  # only the latest is on disk; the maps come from checkpoints
                        continue
                    self.events.append(event_from_record(record, log))
                except ValueError as err:  # json.JSONDecodeError is one
                    raise ValueError(f"{log}, line {number}: {err}") from err
        self.checkpoints = {
            int(m.group(1)): path
            for path in sorted((self.run_dir / "checkpoints").glob("epoch_*.pt"))
            if (m := _CHECKPOINT.search(path.name))
        }
        self.maps: dict[int, list[dict]] = _read_map_index(self.run_dir / MAPS_FILE)
        if not self.checkpoints and not self.maps:
            raise ValueError(
                f"{self.run_dir}: no checkpoints/epoch_XXXX.pt nor {MAPS_FILE}, so no epoch can be shown"
            )
        self._volume_events = lru_cache(maxsize=4)(self._read_volume_events)

    @property
    def epochs(self) -> list[int]:
        """The epochs that can be shown (those with a checkpoint or stored maps), in order."""
        return sorted(set(self.checkpoints) | set(self.maps))

    @property
    def last_checkpoint(self) -> Path:
        """The latest checkpoint (the run's settings); FileNotFoundError naming the folder if none."""
        if not self.checkpoints:
            raise FileNotFoundError(f"{self.run_dir}: no checkpoints/epoch_XXXX.pt left")
        return self.checkpoints[max(self.checkpoints)]

    def events_until(self, epoch: int, after: int = 0) -> list[Event]:
        """The light events of epochs ``after + 1 .. epoch`` in their order.

        An epoch-end event carries the number of epochs done (``EpochEvent(epoch=3)`` ends the
        third); a step event the number done before it (the third epoch's steps say 2).
        """

        def done(event: Event) -> int:
            return event.epoch + 1 if isinstance(event, StepEvent) else event.epoch

        return [e for e in self.events if after < done(e) <= epoch]

    def volume_events(self, epoch: int) -> list[VolumeEvent]:
        """Each branch's map after ``epoch``, from the map store or its checkpoint (the last four cached)."""
        return self._volume_events(epoch)

    def _read_volume_events(self, epoch: int) -> list[VolumeEvent]:
        if epoch in self.maps:
            with np.load(self.run_dir / MAPS_FILE) as stored:
                maps = [
                    (entry, stored[entry["key"]].astype(np.float32) * entry["scale"])
                    for entry in self.maps[epoch]
                ]
        elif epoch in self.checkpoints:
            maps = _checkpoint_maps(self.checkpoints[epoch])
        else:
            raise ValueError(f"{self.run_dir}: no map stored for epoch {epoch} (have {self.epochs})")
        voxel = self.pixel_size_angstrom or 1.0
        return [
            VolumeEvent(
                volume=volume,
                voxel_size_angstrom=voxel,
                step=entry["step"],
                epoch=entry["epoch"],
                phase=Phase(entry["phase"]),
                branch=entry["branch"],
                time_s=entry["time_s"],
            )  # fmt: skip
            for entry, volume in maps
        ]


def _checkpoint_maps(path: Path) -> list[tuple[dict, np.ndarray]]:
    """Each branch's real-space map in the checkpoint at ``path``, with its stamp."""
    payload = load_checkpoint(path)
    found = []
    for state in [*payload["branches"], *payload["finished"]]:
        volume = state["volume"]
        hartley = volume["mantissa"].double() * torch.exp(volume["exponent"].double())
        real = fourier.ifht_center(hartley, ndim=3).float().numpy()
        stamp = {
            "step": int(state["step"]), "epoch": int(state["epoch"]), "branch": str(state["name"]),
            "phase": Phase(state["phase"]).value, "time_s": float(payload["elapsed_s"]),
        }  # fmt: skip
        found.append((stamp, real))
    return found


def _read_map_index(path: Path) -> dict[int, list[dict]]:
    """``maps.npz``'s index: the stored maps by the epoch after which they were saved."""
    if not path.is_file():
        return {}
    try:
        with np.load(path) as stored:
            entries = json.loads(str(stored["index.json"]))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: not a map store written by compact_run ({err})") from err
    by_epoch: dict[int, list[dict]] = {}
    for entry in entries:
        by_epoch.setdefault(int(entry["saved_after"]), []).append(entry)
    return by_epoch


@dataclass(frozen=True)
class CompactResult:
    """What :func:`compact_run` did: the map store, the epochs in it, bytes before and after."""

    maps_path: Path
    epochs: list[int]
    bytes_before: int
    bytes_after: int


def compact_run(run_dir: str | os.PathLike) -> CompactResult:
    """Store each epoch's maps in ``run_dir/maps.npz`` and delete every checkpoint but the last.

    Maps are float16 divided by their largest absolute value (kept as float32): a relative
    error below 1e-3 of the peak, invisible in slices, surfaces and posteriors. The store is
    written and read back before any checkpoint is deleted, so a failure loses nothing; the
    last checkpoint stays for the settings, a resume or a fork. Run again after more epochs,
    it adds the new ones.
    """
    run = RecordedRun(run_dir)
    path = run.run_dir / MAPS_FILE
    before = _folder_bytes(run.run_dir)
    arrays: dict[str, np.ndarray] = {}
    entries: list[dict] = []
    if path.is_file():  # keep what an earlier compaction stored
        with np.load(path) as stored:
            arrays = {key: stored[key] for key in stored.files if key != "index.json"}
        entries = [entry for epoch in sorted(run.maps) for entry in run.maps[epoch]]
    for epoch in sorted(set(run.checkpoints) - set(run.maps)):
        for i, (stamp, volume) in enumerate(_checkpoint_maps(run.checkpoints[epoch])):
            scale = float(np.abs(volume).max()) or 1.0
            key = f"epoch_{epoch:04d}_{i}"
            arrays[key] = (volume / scale).astype(np.float16)
            entries.append({"key": key, "saved_after": epoch, "scale": scale, **stamp})
    temporary = path.with_name(path.name + ".partial.npz")
    np.savez(temporary, **{"index.json": np.array(json.dumps(entries))}, **arrays)
    if sorted(_read_map_index(temporary)) != run.epochs:
        temporary.unlink()
        raise OSError(f"{temporary}: the map store read back differs from what was written")
    os.replace(temporary, path)
    for epoch, checkpoint in run.checkpoints.items():
        if epoch != max(run.checkpoints):
            checkpoint.unlink()
    return CompactResult(path, run.epochs, before, _folder_bytes(run.run_dir))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
