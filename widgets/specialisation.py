"""Head specialisation: which encoder head wins which views, and how well (paper Sec. 5.3, Fig. 5).

From the latest :class:`~cryospin_lab.engine.events.HeadAssignmentEvent` (one per
amortized epoch: every image's winning head, its true view direction and the
winner's rotation error for simulated data), the images are binned by true
view direction on a HEALPix grid (:func:`cryospin_lab.analysis.pose_posterior.head_specialisation`)
and drawn as two Mollweide maps (longitude = RELION rot to the right,
latitude = 90 deg - tilt):

* "all heads": the dominant head of each pixel (the head winning most of its
  images, in the head's colour of the other panels) and the mean rotation error
  of all images there;
* "head k": the share of each pixel's images that head k wins, and the mean
  error of the images it wins.

Real data have no true views: the panel then says so and draws nothing. The
maps are cheap (one bincount over N images), so they are computed in
:meth:`redraw` on the main thread.
"""

from __future__ import annotations

import html

import ipywidgets as w
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cryospin_lab.analysis.pose_posterior import HeadSpecialisation, head_specialisation, mollweide_raster
from cryospin_lab.engine.events import ForkEvent, HeadAssignmentEvent

from ._plotly import SyncedFigureWidget, gaps_as_none
from .heads import BranchSelector, head_color
from .posterior import graticule_trace, mollweide_axes
from .pump import Panel

__all__ = ["HeadSpecialisationPanel"]

NSIDES = (2, 4, 8)
RASTER_WIDTH = 180  # Mollweide raster columns (90 rows): 2 deg, finer than the nside 8 bins (~7 deg)
ALL_HEADS = -1


def _dominant_colorscale(n_heads: int) -> list[list]:
    """A stepped colour scale mapping the integer head ``h`` (z in [0, H-1]) to ``head_color(h)``."""
    if n_heads == 1:
        return [[0.0, head_color(0)], [1.0, head_color(0)]]
    scale = []
    for h in range(n_heads):
        lo, hi = h / n_heads, (h + 1) / n_heads
        scale += [[lo, head_color(h)], [hi, head_color(h)]]
    return scale


class HeadSpecialisationPanel(Panel):
    """Per head, win share and mean rotation error as maps over the true view direction.

    Args:
        reconstruction: optional; its ``n_heads`` fixes the head list before the first event.
        nside: HEALPix resolution of the bins (2, 4 or 8; 4 gives 192 bins, ~50 images
            each for the default 10,000-image set).
    """

    def __init__(self, reconstruction=None, *, nside: int = 4):
        super().__init__()
        if nside not in NSIDES:
            raise ValueError(f"HeadSpecialisationPanel.nside must be one of {NSIDES}, got {nside}")
        self._handlers = {HeadAssignmentEvent: self._on_assignment, ForkEvent: self._on_fork}
        self.n_heads = reconstruction.n_heads if reconstruction is not None else 0
        self.events: dict[str, HeadAssignmentEvent] = {}
        self.maps: HeadSpecialisation | None = None  # what is drawn now
        self.branch_select = BranchSelector(self.redraw)
        self.nside_select = w.Dropdown(options=list(NSIDES), value=nside, description="nside")
        self.head_select = w.Dropdown(description="show")
        self._set_head_options(self.n_heads)
        self.nside_select.observe(lambda _: self.redraw(), names="value")
        self.head_select.observe(lambda _: self.redraw(), names="value")
        self.status = w.HTML("<i>waiting for the first amortized epoch</i>")
        titles = ["dominant head", "mean rotation error (deg)"]
        self.figure = SyncedFigureWidget(make_subplots(rows=1, cols=2, subplot_titles=titles))
        axes = mollweide_axes()
        self.figure.update_layout(height=300, width=900, margin=dict(l=5, r=5, t=30, b=5), showlegend=False)
        for col, (x, y) in enumerate(((0.45, "left"), (1.0, "right")), start=1):
            bar = dict(thickness=10, x=x, len=0.9)
            self.figure.add_trace(go.Heatmap(z=[], colorbar=bar, hoverinfo="z", name=y), row=1, col=col)
            self.figure.add_trace(
                graticule_trace(line=dict(color="rgba(0,0,0,0.3)", width=1)), row=1, col=col
            )
            self.figure.update_xaxes(**axes["xaxis"], row=1, col=col)
            anchor = "x" if col == 1 else "x2"
            self.figure.update_yaxes(**{**axes["yaxis"], "scaleanchor": anchor}, row=1, col=col)
        controls = w.HBox([self.branch_select.dropdown, self.head_select, self.nside_select])
        self.widget = w.VBox([controls, self.status, self.figure])

    # ------------------------------------------------------------------ events
    def _on_assignment(self, event: HeadAssignmentEvent) -> None:
        self.events[event.branch] = event
        if len(event.winning_heads):
            self.n_heads = max(self.n_heads, int(event.winning_heads.max()) + 1)
        if event.branch not in self.branch_select.dropdown.options:
            self.branch_select.offer(event.branch)

    def _on_fork(self, event: ForkEvent) -> None:
        self.branch_select.offer(event.children[0])  # the amortized child keeps its heads

    def _set_head_options(self, n_heads: int) -> None:
        options = [("all heads (dominant)", ALL_HEADS)] + [(f"head {h}", h) for h in range(n_heads)]
        if [o[1] for o in options] != [o[1] for o in self.head_select.options]:
            value = self.head_select.value
            self.head_select.options = options
            self.head_select.value = value if value in [o[1] for o in options] else ALL_HEADS

    # ------------------------------------------------------------------ drawing
    def redraw(self) -> None:
        self.branch_select.apply(list(self.events) or ["main"])
        self._set_head_options(self.n_heads)
        event = self.events.get(self.branch_select.value)
        if event is None:
            return
        if event.true_view_directions is None:
            self.maps = None
            self._draw(None, None, "", "")
            self._set_status(
                "<b>true view directions are unknown (real data)</b>: head specialisation maps need "
                "simulated particles, whose true poses say where each image was seen from."
            )
            return
        maps = head_specialisation(
            event.true_view_directions,
            event.winning_heads,
            event.errors_deg,
            self.n_heads,
            self.nside_select.value,
        )
        self.maps = maps
        head = self.head_select.value
        if head == ALL_HEADS:
            occupied = maps.counts > 0
            dominant = np.where(occupied, np.argmax(np.nan_to_num(maps.shares, nan=-1.0), axis=0), np.nan)
            left, errors = dominant, maps.pixel_mean_errors_deg
            titles = ("dominant head", "mean rotation error, all images (deg)")
        else:
            left = maps.shares[head]
            errors = None if maps.mean_errors_deg is None else maps.mean_errors_deg[head]
            titles = (f"share of images won by head {head}", f"mean rotation error, head {head} (deg)")
        self._draw(left, errors, *titles, dominant=head == ALL_HEADS)
        wins = maps.wins.sum(1)
        summary = ", ".join(f"h{h}: {wins[h]}" for h in range(len(wins)))
        note = "" if event.errors_deg is not None else "; rotation errors unknown"
        self._set_status(
            f"branch <b>{html.escape(event.branch)}</b>, epoch {event.epoch}: {len(event.winning_heads)} "
            f"images in {int((maps.counts > 0).sum())}/{len(maps.counts)} pixels; wins {summary}{note}"
        )

    def _draw(self, left, errors, left_title: str, right_title: str, *, dominant: bool = False) -> None:
        heat_left, heat_right = self.figure.data[0], self.figure.data[2]
        with self.figure.batch_update():
            for heat, values in ((heat_left, left), (heat_right, errors)):
                if values is None:
                    heat.x, heat.y, heat.z = [], [], []
                else:
                    x, y, z = mollweide_raster(values, width=RASTER_WIDTH)
                    heat.x, heat.y, heat.z = x, y, gaps_as_none(z)
            if dominant:
                heat_left.colorscale = _dominant_colorscale(max(self.n_heads, 1))
                heat_left.zmin, heat_left.zmax = -0.5, max(self.n_heads, 1) - 0.5
                heat_left.colorbar.tickvals = list(range(self.n_heads))
                heat_left.colorbar.title = "head"
            else:
                heat_left.colorscale = "Viridis"
                heat_left.zmin, heat_left.zmax = 0.0, 1.0
                heat_left.colorbar.tickvals = None
                heat_left.colorbar.title = "share"
            heat_right.colorscale = "Magma"
            top = np.nanmax(errors) if errors is not None and np.isfinite(errors).any() else 1.0
            heat_right.zmin, heat_right.zmax = 0.0, max(float(top), 1.0)  # degrees: 0 is perfect
            heat_right.colorbar.title = "deg"
            for annotation, title in zip(
                self.figure.layout.annotations, (left_title, right_title), strict=True
            ):
                annotation.text = title

    def _set_status(self, text: str) -> None:
        self.status.value = text
