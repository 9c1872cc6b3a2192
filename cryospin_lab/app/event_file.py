"""A run's events in a file, to watch it from another process (a ``torchrun`` job, a cluster run).

``reconstruct`` writes ``DIR/events.jsonl`` (rank 0 of a distributed run): one JSON line per
event, ``{"type": "StepEvent", "fields": {...}}``. Small arrays are written inline
(``{"__array__": [...], "dtype": ...}``); the arrays of heavy events (the map, the candidates,
the assignments) go to ``events.<Type>.<branch>.npz`` beside the log, replaced atomically, so
the log stays small and a reader gets the latest (the event bus keeps only the latest heavy
event per kind and branch anyway). Nothing is pickled: ``np.load(allow_pickle=False)``.

:class:`EventLogFollower` tails such a file on a thread and publishes each event on an
:class:`~cryospin_lab.app.bus.EventBus`, which is what the notebook panels watch
(``cryospin_lab.widgets.watch``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from cryospin_lab.app.bus import EventBus
from cryospin_lab.engine import events as events_module
from cryospin_lab.engine.events import Event, Phase

__all__ = [
    "EventLogWriter",
    "EventLogFollower",
    "event_to_line",
    "event_from_line",
    "event_from_record",
    "event_type",
    "read_events",
]

_TYPES = {
    name: cls
    for name, cls in vars(events_module).items()
    if isinstance(cls, type) and issubclass(cls, Event) and cls is not Event
}


def _sidecar(log: Path, type_name: str, branch: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in branch)
    return log.with_name(f"{log.stem}.{type_name}.{safe}.npz")


def _plain(value: Any) -> Any:
    if isinstance(value, Phase):
        return value.value
    if isinstance(value, np.ndarray):
        return {"__array__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return list(value)
    return value


def event_to_line(event: Event, log: Path | None = None) -> str:
    """One JSON line for ``event``; a heavy event's arrays are written to its sidecar next to ``log``."""
    name = type(event).__name__
    fields = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    if event.heavy and log is not None:
        arrays = {k: v for k, v in fields.items() if isinstance(v, np.ndarray)}
        path = _sidecar(log, name, event.branch)
        partial = path.with_name(path.name + ".partial.npz")
        np.savez(partial, **arrays)
        os.replace(partial, path)
        fields = {k: ({"__npz__": path.name} if k in arrays else v) for k, v in fields.items()}
    return json.dumps({"type": name, "fields": {k: _plain(v) for k, v in fields.items()}})


def event_type(record: dict) -> type[Event]:
    """The event class of a parsed line of :func:`event_to_line` (ValueError if unknown)."""
    cls = _TYPES.get(record.get("type"))
    if cls is None:
        raise ValueError(f"unknown event type {record.get('type')!r}")
    return cls


def event_from_line(line: str, log: Path | None = None) -> Event:
    """The event of a line written by :func:`event_to_line` (ValueError naming what is wrong)."""
    return event_from_record(json.loads(line), log)


def event_from_record(record: dict, log: Path | None = None) -> Event:
    """The event of a parsed line (``json.loads``) of :func:`event_to_line`; heavy arrays from ``log``'s
    sidecars."""
    try:
        cls = event_type(record)
    except ValueError as err:
        raise ValueError(f"{log or 'event log'}: {err}") from None
    fields = {}
    for key, value in record["fields"].items():
        if isinstance(value, dict) and "__array__" in value:
            value = np.asarray(value["__array__"], dtype=value["dtype"])
        elif isinstance(value, dict) and "__npz__" in value:
            if log is None:
                raise ValueError(f"{record['type']}.{key} is in a sidecar file, but no log path was given")
            with np.load(log.with_name(value["__npz__"]), allow_pickle=False) as data:
                value = data[key]
        fields[key] = value
    return cls(**fields)


def read_events(path: str | os.PathLike) -> list[Event]:
    """Every event of a finished log."""
    path = Path(path)
    with open(path, encoding="utf-8") as file:
        return [event_from_line(line, path) for line in file if line.strip()]


class EventLogWriter:
    """Appends events to ``path`` (``append=False``: starts a new log); flushed after every line."""

    def __init__(self, path: str | os.PathLike, *, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115

    def write(self, event: Event) -> None:
        self._file.write(event_to_line(event, self.path) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class EventLogFollower:
    """Follows a log another process writes, publishing its events on :attr:`bus` from a thread.

    ``stop()`` ends the thread; a line that cannot be read is published as a ``LogEvent``
    saying so (the follower goes on).
    """

    def __init__(self, path: str | os.PathLike, bus: EventBus | None = None, *, poll_s: float = 0.2):
        self.path = Path(path)
        self.bus = bus if bus is not None else EventBus()
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.n_events = 0

    def start(self) -> EventLogFollower:
        self._thread = threading.Thread(target=self._follow, name="cryospin-event-log", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _follow(self) -> None:
        while not self.path.exists():
            if self._stop.wait(self.poll_s):
                return
        with open(self.path, encoding="utf-8") as file:
            pending = ""
            while not self._stop.is_set():
                chunk = file.readline()
                if not chunk:
                    time.sleep(self.poll_s)
                    continue
                pending += chunk
                if not pending.endswith("\n"):  # a line being written: wait for the rest
                    continue
                line, pending = pending, ""
                try:
                    event = event_from_line(line, self.path)
                except Exception as err:  # a damaged line must not end the watch
                    event = events_module.LogEvent(
                        message=f"{self.path}: unreadable event line ({type(err).__name__}: {err})",
                        step=0,
                        epoch=0,
                        phase=Phase.AMORTIZED,
                        time_s=0.0,
                    )
                self.bus.publish(event)
                self.n_events += 1
