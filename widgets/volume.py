"""The current map: central orthogonal slices (plotly, always available) and an nglview isosurface.

Volumes arrive as :class:`~cryospin_lab.engine.events.VolumeEvent` (real space,
``[z, y, x]``, centre at ``D // 2``). The slices are the three central planes:
``z = D//2`` (an ``x``-``y`` image), ``y = D//2`` (``x``-``z``) and ``x = D//2``
(``y``-``z``), drawn as heatmaps with the first array axis vertical, so a voxel
at ``[z, y, x]`` appears at column ``x``, row ``y`` in the first plane.

The isosurface uses nglview 3.1.4 (the ``lab`` extra's pin): the map is
written to a temporary ``.mrc`` (``cryospin_lab.io.maps.write_map``),
loaded with ``view.add_component(path)`` (the previous map component is
removed first) and drawn with ``component.update_surface(isolevelType="value",
isolevel=..., color=...)``. The threshold slider is in standard deviations above
the map's mean (the usual way to pick a density contour; it keeps its meaning
while the map changes), converted to a value per map. The 3-D view reloads the
map at most every ``refresh_s`` seconds (default 5) and only when a newer map
arrived, because nglview sends the whole map to the browser
(docs/decisions.md#nglview-pin). If nglview fails to import (nglview 3.1.4
imports ``pkg_resources``, missing from setuptools >= 81), the panel shows the
slices and says why.
"""

from __future__ import annotations

import html
import shutil
import tempfile
import time
from pathlib import Path

import ipywidgets as w
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cryospin_lab.engine.events import VolumeEvent
from cryospin_lab.io.maps import write_map

from ._plotly import SyncedFigureWidget, gaps_as_none
from .heads import BranchSelector
from .pump import Panel

__all__ = ["VolumePanel", "central_slices", "isolevel_value"]

PLANES = (("z = D/2 (x–y)", "x", "y"), ("y = D/2 (x–z)", "x", "z"), ("x = D/2 (y–z)", "y", "z"))


def central_slices(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The planes ``volume[c]``, ``volume[:, c]``, ``volume[:, :, c]`` with ``c = D // 2``."""
    c = volume.shape[0] // 2
    return volume[c], volume[:, c], volume[:, :, c]


def isolevel_value(volume: np.ndarray, sigma: float) -> float:
    """The density value ``mean + sigma * std`` of ``volume``."""
    return float(volume.mean() + sigma * volume.std())


def _import_nglview():
    """nglview, or the reason it is not available (an error message)."""
    try:
        import nglview
    except Exception as err:  # ImportError, or pkg_resources' own errors at import time
        hint = ""
        if "pkg_resources" in str(err):
            hint = " (nglview 3.1.4 needs pkg_resources: pip install 'setuptools>=77.0.3,<81')"
        return None, f"3-D view unavailable: nglview failed to import: {type(err).__name__}: {err}{hint}"
    return nglview, None


class VolumePanel(Panel):
    """Central slices of the latest map, and an isosurface with a threshold slider.

    Args:
        reconstruction: optional, unused except for symmetry with the other panels.
        refresh_s: the 3-D view reloads the map at most this often.
        sigma: initial contour level in standard deviations above the mean.
        use_nglview: False to show only the slices.
    """

    def __init__(
        self, reconstruction=None, *, refresh_s: float = 5.0, sigma: float = 2.0, use_nglview: bool = True
    ):
        super().__init__()
        self._handlers = {VolumeEvent: self._on_volume}
        self.refresh_s = float(refresh_s)
        self.ngl_ack_timeout_s = 30.0
        self._ngl_acknowledged = True
        self.latest: dict[str, VolumeEvent] = {}
        self.branch_select = BranchSelector(self._branch_changed)
        self.info = w.HTML("<i>waiting for the first map</i>")
        self.slices = SyncedFigureWidget(
            make_subplots(rows=1, cols=3, subplot_titles=[p[0] for p in PLANES], horizontal_spacing=0.06)
        )
        self.slices.update_layout(
            template="plotly_white", height=300, width=820, margin=dict(l=30, r=10, t=40, b=30)
        )
        for col, (_, xlabel, ylabel) in enumerate(PLANES, start=1):
            self.slices.add_trace(
                go.Heatmap(
                    z=[[0.0]], colorscale="gray", showscale=False, hovertemplate="%{z:.3g}<extra></extra>"
                ),
                row=1,
                col=col,
            )
            self.slices.update_xaxes(title_text=xlabel, row=1, col=col, constrain="domain")
            self.slices.update_yaxes(
                title_text=ylabel, row=1, col=col, scaleanchor=f"x{col if col > 1 else ''}"
            )
        self.sigma = w.FloatSlider(
            value=sigma, min=-2.0, max=8.0, step=0.1, description="contour (σ)", continuous_update=False
        )
        self.sigma.observe(self._sigma_changed, names="value")
        self.message = w.HTML()
        self.view = None
        self._component = None
        self._shown_event: VolumeEvent | None = None
        self._last_load = -np.inf
        self._tmpdir: Path | None = None
        children_3d: list[w.Widget] = [self.sigma, self.message]
        if use_nglview:
            nglview, error = _import_nglview()
            if nglview is None:
                self.message.value = f"<span style='color:#a33'>{html.escape(error)}</span>"
            else:
                self.view = nglview.NGLWidget()
                self.view.layout = w.Layout(width="420px", height="360px")
                self._tmpdir = Path(tempfile.mkdtemp(prefix="cryospin-lab-maps-"))
                self.view.observe(self._on_ngl_components, names="n_components")
                children_3d.insert(0, self.view)
        else:
            self.message.value = "<i>3-D view off (use_nglview=False)</i>"
        self.widget = w.VBox(
            [w.HBox([self.branch_select.dropdown, self.info]), self.slices, w.VBox(children_3d)]
        )

    # ------------------------------------------------------------------ events
    def _on_volume(self, event: VolumeEvent) -> None:
        self.latest[event.branch] = event
        if event.branch not in self.branch_select.dropdown.options:
            self.branch_select.offer(event.branch)

    def current(self) -> VolumeEvent | None:
        return self.latest.get(self.branch_select.value)

    # ------------------------------------------------------------------ drawing
    def redraw(self) -> None:
        self.branch_select.apply(list(self.latest))
        event = self.current()
        if event is None:
            return
        volume = np.asarray(event.volume, dtype=np.float32)
        with self.slices.batch_update():
            for trace, plane in zip(self.slices.data, central_slices(volume), strict=True):
                trace.z = gaps_as_none(plane)
        self.info.value = (
            f"branch <b>{html.escape(event.branch)}</b>: map of step {event.step} (epoch {event.epoch}), "
            f"{volume.shape[0]}³ voxels of {event.voxel_size_angstrom:g} Å, "
            f"{event.time_s / 60:.1f} min into the run"
        )

    def poll(self) -> None:
        super().poll()
        self._refresh_3d()

    def _branch_changed(self) -> None:
        self.redraw()
        self._refresh_3d(force=True)

    def _refresh_3d(self, force: bool = False) -> None:
        """Reload the map into nglview if a newer one arrived and ``refresh_s`` has passed."""
        event = self.current()
        if self.view is None or event is None or event is self._shown_event or not self.visible:
            return
        if not force and time.monotonic() - self._last_load < self.refresh_s:
            return
        if not force and self._ngl_behind():
            return
        path = self._tmpdir / f"map_{event.branch}_{event.step}.mrc"
        write_map(path, event.volume, event.voxel_size_angstrom)
        if self._component is not None:
            self.view.remove_component(self._component)
        self._component = self.view.add_component(str(path))
        path.unlink()  # nglview read the file into its message already
        self._shown_event = event
        self._last_load = time.monotonic()
        self._ngl_acknowledged = False
        self._apply_isolevel()

    def _ngl_behind(self) -> bool:
        """A browser shows the 3-D view and has not yet reported loading the last map.

        nglview's front end sets ``n_components`` when a component has been added
        (parsed, surfaced, drawn): that is the acknowledgement. Without a view
        (``_ngl_view_id`` empty) or after ``ngl_ack_timeout_s`` (30 s), nothing is awaited.
        A browser drawing surfaces slowly (software WebGL) then gets fewer maps
        instead of a growing queue of them (docs/decisions.md#ui-back-pressure).
        """
        if self._ngl_acknowledged or not self.view._ngl_view_id:
            return False
        return time.monotonic() - self._last_load < self.ngl_ack_timeout_s

    def _on_ngl_components(self, _change) -> None:
        self._ngl_acknowledged = True

    def _sigma_changed(self, _change) -> None:
        self._apply_isolevel()

    def _apply_isolevel(self) -> None:
        if self._component is None or self._shown_event is None:
            return
        value = isolevel_value(np.asarray(self._shown_event.volume), self.sigma.value)
        self._component.update_surface(isolevelType="value", isolevel=value, color="#4682b4")
        self.message.value = f"<small>contour {self.sigma.value:+.1f} σ = {value:.4g}</small>"

    def handle_resize(self) -> None:
        """Ask nglview to re-measure (after its tab becomes visible; a hidden stage has zero size)."""
        if self.view is not None:
            self.view.handle_resize()

    def close(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
