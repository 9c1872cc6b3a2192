"""The workbench: every panel of a reconstruction on one page, fed by one UI pump.

``Workbench(reconstruction)`` builds the controls and the panels (pose
posterior, the whole set's ambiguity, head assignments, head specialisation,
FSC, pose error, loss, map),
puts them in tabs (or stacked, ``layout="stack"``, for Voila and screenshots)
and starts one :class:`~cryospin_lab.widgets.pump.UIPump` on the kernel loop.
When the controls build a new reconstruction from their form, the pump is
pointed at its bus and the panels are rebuilt for it. :meth:`Workbench.close`
stops the pump and the run and waits for the run's thread.

``launch(**settings)`` builds a reconstruction (the embedded default set unless
``particles=`` is given) and returns its workbench.

The pose-posterior and head-specialisation panels live in their own modules;
a module that is not there yet leaves its tab out, and a panel that fails to
build shows its error in its tab (and the rest of the workbench works).
"""

from __future__ import annotations

import html
import importlib
import traceback
import weakref
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from ._plotly import set_image_format
from .controls import ControlsPanel
from .curves import FSCPanel, LossPanel, PoseErrorPanel
from .heads import HeadAssignmentsPanel
from .pump import UIPump
from .settings_form import FORM_KEYS
from .volume import VolumePanel

__all__ = ["Workbench", "launch"]

# Workbenches made by launch() in this kernel: re-running the launch cell stops the previous one's run
# (it would otherwise go on, unseen, sharing the CPU with the new one).
_LAUNCHED: weakref.WeakSet = weakref.WeakSet()


def _optional_panel_class(module: str, name: str) -> type | None:
    """``cryospin_lab.widgets.<module>.<name>``, None if that module does not exist (yet)."""
    full = f"{__package__}.{module}"
    try:
        return getattr(importlib.import_module(full), name)
    except ModuleNotFoundError as err:
        if err.name == full:
            return None
        raise


class _BrokenPanel:
    """Stands in for a panel whose constructor raised: shows the traceback in its tab."""

    def __init__(self, title: str, err: Exception):
        text = "".join(traceback.format_exception(err))
        self.widget = w.HTML(
            f"<b style='color:#b00020'>{html.escape(title)} could not be built: "
            f"{html.escape(type(err).__name__)}: {html.escape(str(err))}</b>"
            f"<pre style='font-size:11px'>{html.escape(text)}</pre>"
        )

    def handle(self, event) -> None:
        pass


class Workbench:
    """All panels for ``reconstruction`` (or None: the controls' form builds one), one pump.

    Args:
        reconstruction: a :class:`~cryospin_lab.app.reconstruction.Reconstruction`.
        layout: "tabs" (default) or "stack" (every panel visible, one below the other).
        interval_s: the pump's period.
        use_nglview: False to show the map as slices only.
        factory, extra_settings: passed to :class:`ControlsPanel` for runs built from the form.
        posterior_nside, specialisation_nside: HEALPix resolution of those panels.
    """

    def __init__(
        self,
        reconstruction=None,
        *,
        layout: str = "tabs",
        interval_s: float = 0.25,
        use_nglview: bool = True,
        factory: Callable[..., Any] | None = None,
        extra_settings: dict[str, Any] | None = None,
        posterior_nside: int = 8,
        specialisation_nside: int = 4,
    ):
        if layout not in ("tabs", "stack"):
            raise ValueError(f"Workbench.layout must be 'tabs' or 'stack', got {layout!r}")
        self.layout = layout
        self.reconstruction = reconstruction
        self._specs: list[tuple[str, Callable[[Any], Any]]] = []
        posterior = _optional_panel_class("posterior", "PosteriorPanel")
        if posterior is not None:
            self._specs.append(("Pose posterior", lambda rec: posterior(rec, nside=posterior_nside)))
        ambiguity = _optional_panel_class("ambiguity", "AmbiguityPanel")
        if ambiguity is not None:
            self._specs.append(("Ambiguity", lambda rec: ambiguity(rec, nside=posterior_nside)))
        self._specs.append(("Head assignments", HeadAssignmentsPanel))
        specialisation = _optional_panel_class("specialisation", "HeadSpecialisationPanel")
        if specialisation is not None:
            self._specs.append(
                ("Head specialisation", lambda rec: specialisation(rec, nside=specialisation_nside))
            )
        self._specs += [
            ("FSC", FSCPanel),
            ("Pose error", PoseErrorPanel),
            ("Loss", LossPanel),
            ("3-D map", lambda rec: VolumePanel(rec, use_nglview=use_nglview)),
        ]
        self.controls = ControlsPanel(reconstruction, factory=factory, extra_settings=extra_settings)
        self.controls.on_new_reconstruction(self._bind)
        self.panels: dict[str, Any] = {}
        self.title = w.HTML()
        self.container = w.Tab() if layout == "tabs" else w.VBox()
        if layout == "tabs":
            self.container.observe(self._tab_selected, names="selected_index")
        bus = reconstruction.bus if reconstruction is not None else None
        self.pump = UIPump(bus if bus is not None else _EmptyBus(), [], interval_s=interval_s)
        self._build_panels(reconstruction)
        self.widget = w.VBox([self.title, self.controls.widget, self.container, self.pump.widget])
        self.pump.start()

    # ------------------------------------------------------------------ panels
    def _build_panels(self, reconstruction) -> None:
        for panel in self.panels.values():
            close = getattr(panel, "close", None)
            if close is not None:
                close()
        self.panels = {}
        for title, factory in self._specs:
            try:
                self.panels[title] = factory(reconstruction)
            except Exception as err:
                self.panels[title] = _BrokenPanel(title, err)
        self.pump.panels = [self.controls, *self.panels.values()]
        if hasattr(self.panels.get("Ambiguity"), "on_select"):  # its buttons open a particle's posterior
            self.panels["Ambiguity"].on_select = self._open_particle
        if self.layout == "tabs":
            self.container.children = [panel.widget for panel in self.panels.values()]
            for index, title in enumerate(self.panels):
                self.container.set_title(index, title)
            if self.container.selected_index is None:
                self.container.selected_index = 0
            self._show_selected(self.container.selected_index)
        else:
            self.container.children = [
                w.VBox([w.HTML(f"<h3>{html.escape(title)}</h3>"), panel.widget])
                for title, panel in self.panels.items()
            ]
        self.title.value = (
            f"<h2>cryospin-lab workbench</h2><small>{html.escape(reconstruction.describe())}</small>"
            if reconstruction is not None
            else "<h2>cryospin-lab workbench</h2><small>no run yet: choose settings and press Start</small>"
        )

    def _open_particle(self, index: int) -> None:
        """Show particle ``index`` in the pose-posterior panel (and its tab)."""
        posterior = self.panels.get("Pose posterior")
        if posterior is None or not hasattr(posterior, "index"):
            return
        posterior.index = index
        if self.layout == "tabs":
            self.container.selected_index = list(self.panels).index("Pose posterior")

    def _bind(self, reconstruction) -> None:
        """Follow a new reconstruction (built by the controls' form)."""
        self.reconstruction = reconstruction
        self.pump.set_bus(reconstruction.bus)
        self._build_panels(reconstruction)

    def _tab_selected(self, change) -> None:
        titles = list(self.panels)
        index = change["new"]
        self._show_selected(index)
        if index is not None and 0 <= index < len(titles):
            resize = getattr(self.panels[titles[index]], "handle_resize", None)
            if resize is not None:
                resize()

    def _show_selected(self, index: int | None) -> None:
        """Only the shown tab's panel redraws (and computes): hidden figures cost the browser as much
        as shown ones (docs/decisions.md#ui-back-pressure)."""
        for i, panel in enumerate(self.panels.values()):
            show = getattr(panel, "show", None)
            if show is not None:
                show(i == index)

    # ------------------------------------------------------------------ lifecycle
    def tick(self) -> int:
        """One pump tick by hand (scripts and tests, where no kernel loop runs the pump)."""
        return self.pump.tick()

    def close(self) -> None:
        """Stop the pump, stop the run and wait for its thread, release the panels' resources."""
        if getattr(self, "follower", None) is not None:  # a watched run (see watch())
            self.follower.stop()
        self.pump.stop()
        if self.reconstruction is not None:
            self.reconstruction.close()
        self.pump.tick()  # show the last events (FinishedEvent "stopped"), before the panels close
        for panel in self.panels.values():
            close = getattr(panel, "close", None)
            if close is not None:
                close()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def __getitem__(self, title: str) -> Any:
        """A panel by its tab title (``"FSC"``, ``"Loss"`` ...) or ``"Controls"``."""
        return self.controls if title == "Controls" else self.panels[title]


class _EmptyBus:
    """The bus of a workbench without a reconstruction yet: nothing to read."""

    def subscribe(self):
        return self

    def drain(self, max_events=None):
        return []

    def wait(self, timeout=None):
        return False


def launch(
    particles=None,
    *,
    start: bool = False,
    layout: str = "tabs",
    use_nglview: bool = True,
    posterior_nside: int = 8,
    specialisation_nside: int = 4,
    keep_previous: bool = False,
    image_format: str = "png",
    **settings,
):
    """Build a reconstruction (default: the embedded HSP90 set) and return its :class:`Workbench`.

    ``settings`` go to :class:`~cryospin_lab.app.reconstruction.Reconstruction` (``n_heads``,
    ``n_epochs``, ``switch``, ``box_size``, ``device`` ...); the ones the form does
    not show are kept for the runs the form builds later. ``start=True`` starts it.
    ``posterior_nside`` / ``specialisation_nside``: HEALPix resolution of those panels.
    ``image_format``: what each figure's camera button downloads, ``"png"`` or ``"svg"`` (slides).

    A workbench launched before in this kernel whose run is still going is closed first (its run
    stopped, its pump ended), with a message: re-running the launch cell must not leave a run
    going that no panel shows. ``keep_previous=True`` leaves it running.
    """
    from cryospin_lab.app.reconstruction import Reconstruction

    set_image_format(image_format)
    reconstruction = Reconstruction(particles, **settings)
    if not keep_previous:
        for previous in list(_LAUNCHED):
            running = previous.reconstruction is not None and previous.reconstruction.runner.is_running
            previous.close()
            _LAUNCHED.discard(previous)
            if running:
                print("cryospin-lab: stopped the run of the workbench launched before in this kernel")
    # the form shows every setting (filled from this run); it does not show these
    extra = {key: value for key, value in settings.items() if key not in FORM_KEYS | {"ground_truth"}}
    bench = Workbench(
        reconstruction,
        layout=layout,
        use_nglview=use_nglview,
        extra_settings=extra,
        posterior_nside=posterior_nside,
        specialisation_nside=specialisation_nside,
    )
    _LAUNCHED.add(bench)
    if start:
        reconstruction.start()
    return bench


def watch(
    events_path,
    *,
    layout: str = "tabs",
    use_nglview: bool = True,
    n_epochs: int | None = None,
    posterior_nside: int = 8,
    specialisation_nside: int = 4,
    image_format: str = "png",
) -> Workbench:
    """A read-only workbench following a run in another process through its event log.

    ``events_path``: the ``events.jsonl`` that ``cryospin-lab reconstruct`` writes in its output
    folder (rank 0 of a ``torchrun`` job, a run on a cluster node with a shared file system). The
    panels show the run as it goes; the buttons and the form are hidden (the run is controlled
    where it runs). ``n_epochs`` lets the status line show progress out of the total;
    ``image_format`` as in :func:`launch`.
    """
    from pathlib import Path

    from cryospin_lab.app.event_file import EventLogFollower

    path = Path(events_path)
    set_image_format(image_format)
    bench = Workbench(
        None,
        layout=layout,
        use_nglview=use_nglview,
        posterior_nside=posterior_nside,
        specialisation_nside=specialisation_nside,
    )
    bench.follower = EventLogFollower(path).start()
    bench.pump.set_bus(bench.follower.bus)
    controls = bench.controls
    controls.n_epochs = n_epochs
    for child in (*controls.widget.children[:2], controls.settings.widget):
        child.layout.display = "none"
    exists = "" if path.exists() else " (not there yet: waiting for it)"
    bench.title.value = (
        f"<h2>cryospin-lab workbench</h2><small>watching {html.escape(str(path))}{exists}: read-only, "
        "the run is controlled where it runs</small>"
    )
    return bench
