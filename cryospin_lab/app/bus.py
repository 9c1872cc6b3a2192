"""The event bus: the one channel from a running reconstruction to its consumers (UI pump, CLI, tests).

Small events are kept in order (bounded history), heavy ones (volumes,
candidates, assignments) only the latest per ``(type, branch)``; a
:class:`Subscription` drains what is new since its last drain, and one made
late still starts with the retained history and the current heavy state.
Thread-safe: the runner's thread publishes, the UI pump drains on the main
thread. The bus never touches widgets.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from cryospin_lab.engine.events import Event

__all__ = ["EventBus", "Subscription"]

E = TypeVar("E", bound=Event)


class EventBus:
    """Thread-safe store of published events.

    Small events are kept in order, the oldest dropped beyond ``max_history``;
    for every type (small or heavy) the latest event per ``(type, branch)`` is kept.
    """

    def __init__(self, max_history: int = 200_000):
        if max_history < 1:
            raise ValueError(f"EventBus.max_history must be >= 1, got {max_history}")
        self.max_history = int(max_history)
        self._changed = threading.Condition(threading.Lock())
        self._history: deque[tuple[int, Event]] = deque(maxlen=self.max_history)  # (sequence number, event)
        self._next_seq = 0
        self._latest: dict[tuple[type, str], tuple[int, Event]] = {}  # (type, branch) -> (version, event)
        self._versions = itertools.count(1)

    def publish(self, event: Event) -> None:
        if not isinstance(event, Event):
            raise TypeError(f"EventBus.publish expects an Event, got {type(event).__name__}")
        with self._changed:
            self._latest[(type(event), event.branch)] = (next(self._versions), event)
            if not event.heavy:
                self._history.append((self._next_seq, event))
                self._next_seq += 1
            self._changed.notify_all()

    def subscribe(self) -> Subscription:
        """A reader that first gets the retained history and the current heavy events."""
        return Subscription(self)

    def latest(self, event_type: type[E], branch: str = "main") -> E | None:
        """The most recent event of exactly ``event_type`` on ``branch``, None if there is none."""
        with self._changed:
            entry = self._latest.get((event_type, branch))
        return None if entry is None else entry[1]

    def history(self, event_type: type[E] | None = None) -> list[E]:
        """Retained small events in publication order (only ``event_type`` instances if given)."""
        with self._changed:
            events = [event for _, event in self._history]
        if event_type is not None:
            events = [event for event in events if isinstance(event, event_type)]
        return events

    def wait_for(
        self,
        event_type: type[E],
        timeout: float = 10.0,
        predicate: Callable[[E], bool] | None = None,
        *,
        include_past: bool = True,
        give_up: Callable[[], bool] | None = None,
    ) -> E:
        """The first event of ``event_type`` (and ``predicate``) published, waiting up to ``timeout`` s.

        ``include_past=True`` also looks at the retained history and current heavy
        events. ``give_up()`` (checked while waiting) ends the wait early with a
        RuntimeError. Raises TimeoutError if nothing matches in time.
        """
        subscription = Subscription(self, from_now=not include_past)
        deadline = time.monotonic() + timeout
        while True:
            for event in subscription.drain():
                if isinstance(event, event_type) and (predicate is None or predicate(event)):
                    return event
            remaining = deadline - time.monotonic()
            if give_up is not None and give_up() and not subscription.pending():
                raise RuntimeError(f"the run ended without publishing a matching {event_type.__name__}")
            if remaining <= 0:
                raise TimeoutError(f"no matching {event_type.__name__} within {timeout} s")
            subscription.wait(min(remaining, 0.1))


class Subscription:
    """A reader of an :class:`EventBus` with its own position; cheap, needs no unsubscribing."""

    def __init__(self, bus: EventBus, *, from_now: bool = False):
        self._bus = bus
        with bus._changed:
            if from_now:
                self._next_seq = bus._next_seq
                self._seen = {key: version for key, (version, _) in bus._latest.items()}
            else:
                self._next_seq = bus._history[0][0] if bus._history else bus._next_seq
                self._seen = {}
        self.n_dropped = 0  # small events lost because this reader fell more than max_history behind

    def _pending_locked(self) -> bool:
        bus = self._bus
        if self._next_seq < bus._next_seq:
            return True
        return any(
            version > self._seen.get(key, 0) for key, (version, event) in bus._latest.items() if event.heavy
        )

    def pending(self) -> bool:
        """Whether a drain would return something now."""
        with self._bus._changed:
            return self._pending_locked()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until there is something to drain (True) or ``timeout`` s pass (False)."""
        with self._bus._changed:
            return self._bus._changed.wait_for(self._pending_locked, timeout)

    def drain(self, max_events: int | None = None) -> list[Event]:
        """New events since the last drain: small ones in order, then the changed heavy ones.

        ``max_events`` caps the small events returned (the rest wait for the next
        drain); the changed heavy events, at most one per ``(type, branch)``, are
        always included so that a reader never starves for the current state.
        """
        bus = self._bus
        with bus._changed:
            first_seq = bus._history[0][0] if bus._history else bus._next_seq
            if self._next_seq < first_seq:
                self.n_dropped += first_seq - self._next_seq
                self._next_seq = first_seq
            start = self._next_seq - first_seq
            stop = len(bus._history) if max_events is None else min(len(bus._history), start + max_events)
            small = [event for _, event in itertools.islice(bus._history, start, stop)]
            self._next_seq += len(small)
            heavy = []
            for key, (version, event) in bus._latest.items():
                if event.heavy and version > self._seen.get(key, 0):
                    heavy.append((version, event))
                    self._seen[key] = version
        return small + [event for _, event in sorted(heavy, key=lambda item: item[0])]
