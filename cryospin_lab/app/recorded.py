"""A finished run read back from its output folder, epoch by epoch, for replay and comparison.

``cryospin-lab reconstruct`` (and the workbench's runs) leave in their folder
``events.jsonl`` (every event; heavy ones only as the latest) and
``checkpoints/epoch_XXXX.pt`` (the whole state after each epoch). A
:class:`RecordedRun` gives the light events up to any epoch and, from that
epoch's checkpoint, each branch's map as a :class:`VolumeEvent`: what the
workbench's panels need to show the run as it was at that epoch
(``cryospin_lab.widgets.replay``). Checkpoints are read with
``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

import torch

from cryospin_lab.app.event_file import event_from_record, event_type
from cryospin_lab.engine.events import Event, Phase, StepEvent, VolumeEvent
from cryospin_lab.io.checkpoint import load_checkpoint
from cryospin_lab.physics import fourier

__all__ = ["RecordedRun"]

_CHECKPOINT = re.compile(r"epoch_(\d{4,})\.pt$")


class RecordedRun:
    """The run in ``run_dir`` (``events.jsonl`` and ``checkpoints/``), read once, maps on demand.

    Raises FileNotFoundError naming the folder when it holds no event log, and
    ValueError when it holds no per-epoch checkpoint (a run with
    ``checkpoint_every = 0`` cannot be replayed).
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
        if not self.checkpoints:
            raise ValueError(f"{self.run_dir}: no checkpoints/epoch_XXXX.pt, so no epoch can be shown")
        self._volume_events = lru_cache(maxsize=4)(self._read_volume_events)

    @property
    def epochs(self) -> list[int]:
        """The epochs that can be shown (those with a checkpoint), in order."""
        return sorted(self.checkpoints)

    def events_until(self, epoch: int, after: int = 0) -> list[Event]:
        """The light events of epochs ``after + 1 .. epoch`` in their order.

        An epoch-end event carries the number of epochs done (``EpochEvent(epoch=3)`` ends the
        third); a step event the number done before it (the third epoch's steps say 2).
        """

        def done(event: Event) -> int:
            return event.epoch + 1 if isinstance(event, StepEvent) else event.epoch

        return [e for e in self.events if after < done(e) <= epoch]

    def volume_events(self, epoch: int) -> list[VolumeEvent]:
        """Each branch's map after ``epoch``, from its checkpoint (the last four are cached)."""
        return self._volume_events(epoch)

    def _read_volume_events(self, epoch: int) -> list[VolumeEvent]:
        if epoch not in self.checkpoints:
            raise ValueError(f"{self.run_dir}: no checkpoint for epoch {epoch} (have {self.epochs})")
        payload = load_checkpoint(self.checkpoints[epoch])
        found = []
        for state in [*payload["branches"], *payload["finished"]]:
            volume = state["volume"]
            hartley = volume["mantissa"].double() * torch.exp(volume["exponent"].double())
            real = fourier.ifht_center(hartley, ndim=3).float().numpy()
            found.append(
                VolumeEvent(
                    volume=real,
                    voxel_size_angstrom=self.pixel_size_angstrom or 1.0,
                    step=int(state["step"]),
                    epoch=int(state["epoch"]),
                    phase=Phase(state["phase"]),
                    branch=state["name"],
                    time_s=float(payload["elapsed_s"]),
                )
            )
        return found
