"""Run controls: start / pause / resume / stop, switch now, fork, a settings form, a status line, errors.

Every button calls a :class:`~cryospin_lab.app.reconstruction.Reconstruction` method, which
only queues a command for the runner's thread and returns at once; the effect
comes back as events (``PhaseChangeEvent``, ``ForkEvent``, ``LogEvent("paused")``,
``FinishedEvent`` ...) through the UI pump, and only then does the panel change
(e.g. the Switch button is disabled when the ``PhaseChangeEvent`` arrives, not
when it is clicked: it shows "Switch requested…" in between).

The settings form builds a *new* reconstruction when Start is pressed and the
form differs from the current run's settings (or there is no run, or the
current one has ended); listeners registered with :meth:`ControlsPanel.on_new_reconstruction`
(the workbench) then point the pump and the other panels at it.

The status line's ETA comes from epoch times: for every running branch,
``(n_epochs - epochs done - fraction of the current epoch) * mean of its last 3
epoch times``; the largest over branches (forked branches run interleaved, and
each epoch time already includes the others' steps). See :func:`estimate_eta_s`.
"""

from __future__ import annotations

import html
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from cryospin_lab.engine.events import (
    EpochEvent,
    FailureEvent,
    FinishedEvent,
    ForkEvent,
    LogEvent,
    Phase,
    PhaseChangeEvent,
    StepEvent,
)

from .curves import SWITCH_REASONS
from .data_source import DataSource
from .pump import Panel
from .settings_form import SettingsForm

__all__ = ["ControlsPanel", "estimate_eta_s", "format_duration"]

_ENDED = ("finished", "stopped", "failed")
SWITCH_LABEL = "Switch to direct optimisation now"


def format_duration(seconds: float) -> str:
    """``25 s``, ``2 min 05 s``, ``1 h 02 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def estimate_eta_s(
    epochs_done: dict[str, int],
    images_in_epoch: dict[str, int],
    epoch_times_s: dict[str, list[float]],
    n_epochs: int,
    n_particles: int,
) -> float | None:
    """Seconds left: max over branches of remaining epochs times the mean of the last 3 epoch times.

    None while some running branch has no finished epoch yet.
    """
    etas = []
    for branch, done in epochs_done.items():
        times = epoch_times_s.get(branch, [])[-3:]
        if not times:
            return None
        remaining = n_epochs - done - images_in_epoch.get(branch, 0) / n_particles
        etas.append(max(remaining, 0.0) * sum(times) / len(times))
    return max(etas) if etas else None


def _button(description: str, icon: str, style: str = "") -> w.Button:
    return w.Button(description=description, icon=icon, button_style=style, layout=w.Layout(width="auto"))


class ControlsPanel(Panel):
    """Buttons, settings form and status for one reconstruction (or for the events alone).

    Args:
        reconstruction: the run to control; None: Start builds one from the form.
        factory: builds a reconstruction from the form's keywords (default
            ``cryospin_lab.app.reconstruction.Reconstruction``).
        extra_settings: keywords passed to ``factory`` besides the form's
            (``device``, ``threads``, ``batch_size``, ``out_dir`` ...).
        n_epochs, n_particles: for the ETA when there is no reconstruction.
    """

    def __init__(
        self,
        reconstruction=None,
        *,
        factory: Callable[..., Any] | None = None,
        extra_settings: dict[str, Any] | None = None,
        n_epochs: int | None = None,
        n_particles: int | None = None,
    ):
        super().__init__()
        self._handlers = {
            StepEvent: self._on_step,
            EpochEvent: self._on_epoch,
            PhaseChangeEvent: self._on_phase,
            ForkEvent: self._on_fork,
            LogEvent: self._on_log,
            FailureEvent: self._on_failure,
            FinishedEvent: self._on_finished,
        }
        self.factory = factory
        self.extra_settings = dict(extra_settings or {})
        self._listeners: list[Callable[[Any], None]] = []
        self.start_button = _button("Start", "play", "success")
        self.pause_button = _button("Pause", "pause")
        self.resume_button = _button("Resume", "play")
        self.stop_button = _button("Stop", "stop", "danger")
        self.switch_button = _button(SWITCH_LABEL, "exchange", "warning")
        self.fork_button = _button("Fork (one branch switches, one stays amortized)", "code-fork")
        for button, action in (
            (self.start_button, self._start),
            (self.pause_button, lambda: self.reconstruction.pause()),
            (self.resume_button, lambda: self.reconstruction.resume()),
            (self.stop_button, lambda: self.reconstruction.stop()),
            (self.switch_button, self._switch),
            (self.fork_button, lambda: self.reconstruction.fork()),
        ):
            button.on_click(lambda _b, action=action: self._run_action(action))
        self.switch_info = w.HTML()
        self.status = w.HTML()
        self.log = w.HTML()
        self.settings = SettingsForm()
        self.preparing: DataSource | None = None  # a new run's data being simulated
        self._form_baseline = self.form_settings()
        self.error_summary = w.HTML()
        self.error_detail = w.HTML()
        self.errors = w.Accordion(children=[self.error_detail], layout=w.Layout(display="none"))
        self.errors.set_title(0, "traceback")
        self.widget = w.VBox(
            [
                w.HBox([self.start_button, self.pause_button, self.resume_button, self.stop_button]),
                w.HBox([self.switch_button, self.fork_button]),
                self.switch_info,
                self.status,
                self.log,
                self.error_summary,
                self.errors,
                self.settings.widget,
            ]
        )
        self.bind(reconstruction, n_epochs=n_epochs, n_particles=n_particles)

    # ------------------------------------------------------------------ binding
    def bind(self, reconstruction, *, n_epochs: int | None = None, n_particles: int | None = None) -> None:
        """Control ``reconstruction`` from now on and forget the previous run's events."""
        self.reconstruction = reconstruction
        self.n_epochs = n_epochs if reconstruction is None else reconstruction.config.n_epochs
        self.run_epochs = self.n_epochs  # as set; n_epochs moves on when a stuck start restarts
        self.n_particles = n_particles if reconstruction is None else reconstruction.n_particles
        self.phases: dict[str, Phase] = {"main": Phase.AMORTIZED}
        self.epochs_done: dict[str, int] = {"main": 0}
        self.images_in_epoch: dict[str, int] = {"main": 0}
        self.epoch_times_s: dict[str, list[float]] = {}
        self.switches: list[PhaseChangeEvent] = []
        self.last_step: StepEvent | None = None
        self.last_epoch = 0  # the most epochs any branch has done
        self.speeds: deque[float] = deque(maxlen=20)
        self.failure: FailureEvent | None = None
        self.finished: FinishedEvent | None = None
        self.messages: deque[str] = deque(maxlen=3)
        self.warnings: list[str] = []  # LogEvents of level "warning": kept in view, not scrolled away
        self._event_state = "created"
        self._switch_requested = False
        self._switching = False  # the engine said it is switching (scoring candidates)
        self._drawn_state: str | None = None
        self.error_summary.value = self.error_detail.value = ""
        self.errors.layout.display = "none"
        if reconstruction is not None:
            self.settings.fill(reconstruction)
            self._form_baseline = self.form_settings()
        self._dirty = True
        self.poll()

    def on_new_reconstruction(self, callback: Callable[[Any], None]) -> None:
        """Call ``callback(reconstruction)`` when Start builds a new reconstruction from the form."""
        self._listeners.append(callback)

    @property
    def state(self) -> str:
        """The run's state (the reconstruction's, or as far as the events tell without one)."""
        if self.reconstruction is None:
            return self._event_state
        state = self.reconstruction.state
        if self.finished is not None and state not in _ENDED:  # the runner sets it just after publishing
            return self._event_state
        return state

    # ------------------------------------------------------------------ form
    def form_settings(self) -> dict[str, Any]:
        """The form as keywords for ``Reconstruction``."""
        settings = self.settings.values()
        rec = self.reconstruction if hasattr(self, "reconstruction") else None
        if rec is not None and self.settings.dataset.value.strip() == str(rec.particles_path):
            if rec.ground_truth_path is not None:
                settings["ground_truth"] = str(rec.ground_truth_path)  # keep the default set's true map
        return settings

    def _new_reconstruction(self, particles=None):
        """A run from the form; ``particles`` replaces the form's (a simulated set, data_source.py)."""
        factory = self.factory
        if factory is None:
            from cryospin_lab.app.reconstruction import Reconstruction as factory
        settings = self.form_settings()
        settings.pop("molecule", None), settings.pop("n_simulated", None)
        if particles is not None:  # a simulated set brings its own true map
            settings["particles"] = particles
            settings.pop("ground_truth", None)
        rec = factory(**{**settings, **self.extra_settings})
        self.bind(rec)
        for callback in self._listeners:
            callback(rec)
        return rec

    # ------------------------------------------------------------------ actions
    def _run_action(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except (
            Exception
        ) as err:  # a bad setting, a command on an ended run: shown, never raised into ipywidgets
            self._show_error(f"{type(err).__name__}: {err}", None)
        self._dirty = True
        self.poll()

    def _start(self) -> None:
        rec = self.reconstruction
        if rec is None or rec.state != "created" or self.form_settings() != self._form_baseline:
            settings = self.form_settings()
            source = DataSource(settings["molecule"], settings["particles"], settings["n_simulated"])
            if source.needs_simulation:  # tens of seconds: on a worker; poll() starts the run after it
                self.preparing = source.start()
                self.messages.append(source.progress)
                return
            self.messages.append("building a new run from the settings…")
            rec = self._new_reconstruction()
        rec.start()

    def _poll_preparation(self) -> None:
        """The simulation of a new run's data: its progress, then the run (or its error)."""
        source = self.preparing
        if source is None:
            return
        if not source.finished:
            self.messages[-1] = source.progress
            self._dirty = True
            return
        self.preparing = None
        self._run_action(lambda: self._start_simulated(source))

    def _start_simulated(self, source: DataSource) -> None:
        simulated = source.result()  # the simulation's error, if any, is shown by _run_action
        self.messages.append(f"simulated {source.what}: {simulated.n_particles} images; starting the run")
        self._new_reconstruction(simulated).start()

    def _switch(self) -> None:
        self.reconstruction.switch_now()
        self._switch_requested = True

    # ------------------------------------------------------------------ events
    def _on_step(self, event: StepEvent) -> None:
        self.last_step = event
        self.speeds.append(event.images_per_s)
        self.images_in_epoch[event.branch] = self.images_in_epoch.get(event.branch, 0) + event.n_images
        self.phases.setdefault(event.branch, event.phase)
        if self._event_state == "created":
            self._event_state = "running"

    def _on_epoch(self, event: EpochEvent) -> None:
        self.epochs_done[event.branch] = event.epoch
        self.last_epoch = max(self.last_epoch, event.epoch)
        self.images_in_epoch[event.branch] = 0
        self.epoch_times_s.setdefault(event.branch, []).append(event.epoch_time_s)

    def _on_phase(self, event: PhaseChangeEvent) -> None:
        self.phases[event.branch] = event.new
        if event.reason == "restart" and self.n_epochs:  # a stuck start began again: the end moves on
            self.n_epochs = max(self.n_epochs, self.run_epochs + event.epoch)
        if event.new is Phase.DIRECT:
            self.switches.append(event)
            if not any(phase is Phase.AMORTIZED for phase in self.phases.values()):
                # the request (all amortized branches) is done; a forked `direct` child switching
                # on its own leaves the request of its amortized sibling pending
                self._switch_requested = self._switching = False
        if event.new is Phase.FINISHED:
            self.epochs_done.pop(event.branch, None)  # no time left for it

    def _on_fork(self, event: ForkEvent) -> None:
        phase = self.phases.pop(event.parent, Phase.AMORTIZED)
        done = self.epochs_done.pop(event.parent, 0)
        images = self.images_in_epoch.pop(event.parent, 0)
        times = self.epoch_times_s.get(event.parent, [])
        for child in event.children:
            self.phases[child] = phase
            self.epochs_done[child] = done
            self.images_in_epoch[child] = images
            self.epoch_times_s[child] = list(times)
        self.messages.append(f"forked {event.parent} into {', '.join(event.children)} at epoch {event.epoch}")

    def _on_log(self, event: LogEvent) -> None:
        line = f"[{event.branch}, epoch {event.epoch}] {event.message}"
        if event.level == "warning":
            self.warnings.append(line)
            return
        if event.message.startswith("re-search:") and self.messages and "re-search:" in self.messages[-1]:
            self.messages[-1] = line  # one line for the direct stage's per-epoch re-search, the latest
            return
        self.messages.append(line)
        if event.message == "paused":
            self._event_state = "paused"
        elif event.message == "resumed":
            self._event_state = "running"
        elif "switch_now" in event.message or "already" in event.message:
            self._switch_requested = False  # rejected or moot
        elif event.message.startswith("switching:"):
            self._switching = self._switch_requested  # scoring candidates for the requested switch

    def _on_failure(self, event: FailureEvent) -> None:
        self.failure = event
        where = f"\n\nlast state saved to {event.checkpoint_path}" if event.checkpoint_path else ""
        self._show_error(f"the run failed: {event.exception_type}: {event.message}", event.traceback + where)

    def _on_finished(self, event: FinishedEvent) -> None:
        self.finished = event
        self._event_state = {"completed": "finished"}.get(event.reason, event.reason)
        self._switch_requested = False
        self.epochs_done.clear()

    # ------------------------------------------------------------------ drawing
    @property
    def eta_s(self) -> float | None:
        if not self.n_epochs or not self.n_particles or self.state in _ENDED:
            return None
        return estimate_eta_s(
            self.epochs_done, self.images_in_epoch, self.epoch_times_s, self.n_epochs, self.n_particles
        )

    def poll(self) -> None:
        self._poll_preparation()
        if self.state != self._drawn_state:  # e.g. the runner blocked on a pause: redraw without an event
            self._dirty = True
        super().poll()

    def redraw(self) -> None:
        state = self.state
        self._drawn_state = state
        active = state in ("running", "paused")
        amortized = any(phase is Phase.AMORTIZED for phase in self.phases.values())
        has_run = self.reconstruction is not None
        self.start_button.disabled = state in ("running", "paused") or self.preparing is not None
        self.start_button.description = "New run" if state in _ENDED else "Start"
        self.pause_button.disabled = not (has_run and state == "running")
        self.resume_button.disabled = not (has_run and state == "paused")
        self.stop_button.disabled = not (has_run and active)
        self.fork_button.disabled = not (has_run and active and amortized)
        self.switch_button.disabled = not (has_run and active and amortized) or self._switch_requested
        if self._switch_requested:
            self.switch_button.description = "Switching…" if self._switching else "Switch requested…"
        elif self.switches and not amortized:
            last = self.switches[-1]
            self.switch_button.description = (
                f"Switched at epoch {last.epoch} ({SWITCH_REASONS.get(last.reason, last.reason)})"
            )
        else:
            self.switch_button.description = SWITCH_LABEL
        self.switch_info.value = "<br>".join(
            f"<b>{html.escape(e.branch)}</b> switched to direct optimisation "
            f"{SWITCH_REASONS.get(e.reason, e.reason)} at epoch {e.epoch}, step {e.step}, "
            f"{format_duration(e.time_s)} into the run" + (f" ({html.escape(e.detail)})" if e.detail else "")
            for e in self.switches
        )
        self.status.value = self._status_text(state)
        warned = [
            f'<span style="color:#b45309"><b>warning</b> {html.escape(m)}</span>' for m in self.warnings
        ]
        self.log.value = "<br>".join(warned + [f"<small>{html.escape(m)}</small>" for m in self.messages])

    def _status_text(self, state: str) -> str:
        parts = [f"<b>{state}</b>"]
        if self.phases:
            parts.append(", ".join(f"{html.escape(b)}: {p.value}" for b, p in self.phases.items()))
        if self.last_epoch or self.last_step is not None:
            parts.append(
                # past n_epochs while the re-search still moves images (engine/rescue.py)
                f"epoch {self.last_epoch}"
                + (f"/{max(self.n_epochs, self.last_epoch)}" if self.n_epochs else "")
                + " done"
            )
        if self.last_step is not None:
            parts.append(f"step {self.last_step.step}")
        if self.speeds:
            parts.append(f"{sum(self.speeds) / len(self.speeds):.0f} images/s")
        eta = self.eta_s
        if eta is not None and math.isfinite(eta):
            parts.append(f"ETA {format_duration(eta)}")
        elif state == "running":
            parts.append("ETA after the first epoch")
        if self.finished is not None:
            parts.append(f"ended: {self.finished.reason}")
        return " · ".join(parts)

    def _show_error(self, summary: str, detail: str | None) -> None:
        self.error_summary.value = (
            f"<span style='color:#b00020'><b>&#10006; {html.escape(summary)}</b></span>"
        )
        if detail:
            self.error_detail.value = f"<pre style='font-size:11px'>{html.escape(detail)}</pre>"
            self.errors.layout.display = None
