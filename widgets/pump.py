"""The UI pump: the one piece of code that moves engine events into widgets.

Why a pump: the reconstruction runs on a background thread (``app.runner.Runner``),
but widgets must only be touched from the kernel's main thread (some ipykernel
releases broke cross-thread comm messages, and a button click is only handled
while the main thread is idle). So the engine only *publishes* events on its
:class:`~cryospin_lab.app.bus.EventBus`, and :class:`UIPump` drains one
:class:`~cryospin_lab.app.bus.Subscription` a few times a second *on the main
thread*, between cell executions, by scheduling itself with ``loop.call_later``
on the kernel's asyncio loop (ipykernel >= 6 runs cells inside that loop, so
``asyncio.get_running_loop()`` in a cell returns it; checked with ipykernel 7.4).
Each tick is short and returns to the loop, so comm messages (button clicks)
are handled between ticks.

Without a running loop (plain Python, pytest) ``start()`` schedules nothing and
says so in :attr:`UIPump.scheduled`; call :meth:`UIPump.tick` (or
:meth:`UIPump.run_until`) by hand.

A panel is anything with ``handle(event)`` and, optionally, ``poll()``; the
:class:`Panel` base class gives the convention used by the panels in this
package: ``handle`` only records (cheap, so a late subscriber's backlog of
thousands of step events costs little) and marks the panel dirty; ``poll``
redraws the figures and labels once per tick when something changed. Used
alone, a panel is fed with :meth:`Panel.feed` (``handle`` each event, then
``poll``).
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import ipywidgets as w

from cryospin_lab.app.bus import EventBus
from cryospin_lab.engine.events import Event

from ._plotly import SyncedFigureWidget

__all__ = ["Panel", "PanelError", "UIPump", "kernel_loop"]


class Panel:
    """Base of the panels: ``handle`` routes events to ``self._handlers`` and marks the panel dirty.

    Subclasses fill ``self._handlers`` (event type -> method), build ``self.widget``
    and implement :meth:`redraw`, which :meth:`poll` calls at most once per tick.
    """

    widget: w.Widget

    def __init__(self) -> None:
        self._handlers: dict[type[Event], Callable[[Any], None]] = {}
        self._dirty = False
        self.n_deferred = 0  # redraws put off because a browser was behind
        self.visible = True  # False: in a tab not shown; redraws wait (see show())

    def handle(self, event: Event) -> None:
        """Record ``event`` (no widget is touched here: drawing waits for :meth:`poll`)."""
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)
            self._dirty = True

    def poll(self) -> None:
        """Redraw once if events arrived since the last poll (called by the pump every tick).

        Not while a browser is still drawing this panel's previous update
        (:meth:`front_end_behind`): the panel stays dirty and redraws, with the
        latest data, on a later tick. So a slow browser gets fewer updates
        instead of a growing queue of them (docs/decisions.md#ui-back-pressure).
        Nor while the panel is hidden (:attr:`visible` False: the workbench hides
        the panels of the tabs not shown); it catches up when shown again.
        """
        if self._dirty and self.visible:
            if self.front_end_behind():
                self.n_deferred += 1
                return
            self._dirty = False
            self.redraw()

    def show(self, visible: bool = True) -> None:
        """Mark the panel shown or hidden (by the workbench, when its tab is selected or left)."""
        self.visible = bool(visible)

    def front_end_behind(self) -> bool:
        """Some figure of this panel has an update that a browser showing it has not yet drawn."""
        return any(figure.front_end_behind for figure in self.figures())

    def figures(self) -> list[Any]:
        """The panel's plotly figures (its :class:`~._plotly.SyncedFigureWidget` attributes)."""
        return [value for value in vars(self).values() if isinstance(value, SyncedFigureWidget)]

    def redraw(self) -> None:  # pragma: no cover - overridden
        """Apply the recorded state to the widgets (main thread only)."""

    def feed(self, events: Iterable[Event]) -> Panel:
        """Handle ``events`` in order, then redraw: a panel used without a pump (tests, scripts)."""
        for event in events:
            self.handle(event)
        self.poll()
        return self

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


@dataclass(frozen=True)
class PanelError:
    """An exception raised by a panel; the pump records it and goes on."""

    panel: str
    where: str  # "handle(StepEvent)" or "poll()"
    message: str
    traceback: str


def kernel_loop() -> asyncio.AbstractEventLoop | None:
    """The asyncio loop running on this (the kernel's main) thread, None outside a running loop.

    In an ipykernel >= 6 cell the kernel's loop is the running loop. Called from
    outside a cell (an ``IPython.embed``, a script), fall back on the kernel
    application's tornado loop if there is one.
    """
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        pass
    try:
        from ipykernel.kernelapp import IPKernelApp
    except ImportError:
        return None
    if not IPKernelApp.initialized():
        return None
    io_loop = getattr(IPKernelApp.instance().kernel, "io_loop", None)
    return getattr(io_loop, "asyncio_loop", None)


def _panel_name(panel: Any) -> str:
    return type(panel).__name__


class UIPump:
    """Drain ``bus`` every ``interval_s`` on the kernel's main thread and feed the ``panels``.

    Per tick: at most ``max_events_per_tick`` small events (in order, then the
    changed heavy ones: ``Subscription.drain``) go to every panel's ``handle``,
    then every panel's ``poll`` is called once. An exception in a panel is
    recorded in :attr:`errors` and shown in :attr:`widget`; the other panels and
    the following ticks go on.
    """

    def __init__(
        self,
        bus: EventBus,
        panels: Iterable[Any] = (),
        interval_s: float = 0.25,
        *,
        max_events_per_tick: int = 20_000,
    ):
        if not interval_s > 0:
            raise ValueError(f"UIPump.interval_s must be > 0, got {interval_s}")
        self.interval_s = float(interval_s)
        self.max_events_per_tick = int(max_events_per_tick)
        self.panels: list[Any] = list(panels)
        self._subscription = bus.subscribe()
        self.bus = bus
        self.errors: deque[PanelError] = deque(maxlen=20)  # the latest ones, for the log
        self.n_errors = 0
        self.n_ticks = 0
        self.n_events = 0
        self.running = False  # between start() and stop()
        self.scheduled = False  # ticks come from the kernel loop (False: call tick() by hand)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._in_tick = False
        self._errors_changed = False
        self._error_text = w.HTML()
        self.widget = w.Accordion(children=[self._error_text], layout=w.Layout(display="none"))
        self.widget.set_title(0, "UI errors")

    # ------------------------------------------------------------------ wiring
    def add_panel(self, panel: Any) -> None:
        self.panels.append(panel)

    def set_bus(self, bus: EventBus) -> None:
        """Read from another bus from now on (a new reconstruction); its retained history comes first."""
        self.bus = bus
        self._subscription = bus.subscribe()

    # ------------------------------------------------------------------ scheduling
    def start(self) -> UIPump:
        """Tick every ``interval_s`` on the kernel loop; without a running loop, tick() stays manual."""
        if self.running:
            return self
        self.running = True
        self._loop = kernel_loop()
        self.scheduled = self._loop is not None
        if self.scheduled:
            self._timer = self._loop.call_later(self.interval_s, self._on_timer)
        return self

    def stop(self) -> None:
        """Stop ticking (a tick in progress finishes). Safe to call twice."""
        self.running = False
        self.scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if not self.running:
            return
        try:
            self.tick()
        finally:  # tick() contains panel errors; this is for anything else (keep pumping regardless)
            if self.running and self._loop is not None and not self._loop.is_closed():
                self._timer = self._loop.call_later(self.interval_s, self._on_timer)

    # ------------------------------------------------------------------ work
    def tick(self) -> int:
        """Deliver the new events to every panel, then poll them; returns the number of events."""
        if self._in_tick:  # re-entered from a panel (e.g. a nested display): skip, the next tick catches up
            return 0
        self._in_tick = True
        try:
            events = self._subscription.drain(max_events=self.max_events_per_tick)
            for event in events:
                for panel in self.panels:
                    try:
                        panel.handle(event)
                    except Exception as err:
                        self._record(panel, f"handle({type(event).__name__})", err)
            for panel in self.panels:
                poll = getattr(panel, "poll", None)
                if poll is None:
                    continue
                try:
                    poll()
                except Exception as err:
                    self._record(panel, "poll()", err)
            self.n_ticks += 1
            self.n_events += len(events)
            return len(events)
        finally:
            self._in_tick = False
            if self._errors_changed:  # once per tick: a panel failing on every event must not flood
                self._errors_changed = False
                self._show_errors()

    def run_until(
        self, predicate: Callable[[], bool], timeout_s: float = 60.0, interval_s: float | None = None
    ) -> bool:
        """Tick by hand until ``predicate()`` is true (True) or ``timeout_s`` passes (False).

        For scripts and tests, where no kernel loop ticks the pump. Never call it
        from a notebook cell while the pump is scheduled: the cell would block
        the loop that handles button clicks.
        """
        deadline = time.monotonic() + timeout_s
        interval_s = self.interval_s if interval_s is None else interval_s
        while True:
            self.tick()
            if predicate():
                return True
            if time.monotonic() > deadline:
                return False
            self._subscription.wait(interval_s)

    # ------------------------------------------------------------------ errors
    def _record(self, panel: Any, where: str, err: Exception) -> None:
        error = PanelError(
            panel=_panel_name(panel),
            where=where,
            message=f"{type(err).__name__}: {err}",
            traceback="".join(traceback.format_exception(err)),
        )
        self.errors.append(error)
        self.n_errors += 1
        self._errors_changed = True

    def _show_errors(self) -> None:
        import html

        blocks = [
            f"<b>{html.escape(e.panel)}.{html.escape(e.where)}</b>: {html.escape(e.message)}"
            f"<pre style='font-size:11px'>{html.escape(e.traceback)}</pre>"
            for e in reversed(self.errors)
        ]
        self._error_text.value = "".join(blocks)
        self.widget.set_title(0, f"UI errors ({self.n_errors}; the run is not affected)")
        self.widget.layout.display = None
