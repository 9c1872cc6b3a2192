"""Plotly ``FigureWidget`` whose stored widget state follows in-place updates.

The problem (plotly 7.1, ``plotly/basewidget.py``): a ``FigureWidget`` syncs its
figure to the front end through two traits, ``_widget_data`` (list of trace
dicts) and ``_widget_layout`` (layout dict). They are assigned only in
``__init__`` and in ``_repr_mimebundle_`` (i.e. when the figure is displayed).
Every later change (``fig.data[0].y = ...``, ``batch_update``, ``add_trace``,
``update_layout``) goes out as a one-off message (``_py2js_restyle``,
``_py2js_update``, ``_py2js_relayout``, ``_py2js_addTraces`` ..., each set and
immediately reset to None) and mutates the figure's private ``_data`` and
``_layout``, not the two traits. A browser that is already showing the figure
applies the message; but a view created later (Voila connecting, a page reload,
the figure put in a new box) is built from the traits (``get_state()`` on the
kernel side), so it shows the figure as it was when first displayed.

The fix: after an update, assign deep copies of ``_data`` and of the layout's
props to the two traits (:func:`sync_state`). Assignment is what traitlets and
ipywidgets watch, so the kernel-side state (what ``get_state()`` serialises for
new views) is current, and the front-end model receives the same value; plotly's
front end ignores changes of these two traits on a live view (its handlers
``do_data``/``do_layout`` are empty), so nothing is redrawn twice. traitlets
skips the message when the value is unchanged (layout most of the time).

:class:`SyncedFigureWidget` calls :func:`sync_state` after every message plotly
sends (it overrides the ``_send_*_msg`` methods of ``BaseFigureWidget``), so any
update path keeps the state current; ``tests/test_widgets_plotly.py`` checks it
for property assignment, ``batch_update``, ``add_trace`` and layout shapes.

Hand-written: plotly has no option for this (FigureWidget's stored state is
documented as "only synced on construction").
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import numpy as np
import plotly.graph_objects as go

__all__ = ["sync_state", "SyncedFigureWidget", "new_figure", "gaps_as_none"]


def sync_state(fig: go.FigureWidget) -> None:
    """Copy ``fig``'s current traces and layout into its synced widget traits (see the module doc)."""
    fig._widget_data = deepcopy(fig._data)
    fig._widget_layout = deepcopy(fig._layout_obj._props)


class SyncedFigureWidget(go.FigureWidget):
    """A ``go.FigureWidget`` that calls :func:`sync_state` after each update message it sends.

    These are the private ``BaseFigureWidget._send_*_msg`` methods of plotly 7.1;
    if a release renames them, the overrides stop being called and the state
    tests in ``tests/test_widgets_plotly.py`` fail.
    """

    def _send_restyle_msg(self, *args: Any, **kwargs: Any) -> None:
        super()._send_restyle_msg(*args, **kwargs)
        sync_state(self)

    def _send_relayout_msg(self, *args: Any, **kwargs: Any) -> None:
        super()._send_relayout_msg(*args, **kwargs)
        sync_state(self)

    def _send_update_msg(self, *args: Any, **kwargs: Any) -> None:
        super()._send_update_msg(*args, **kwargs)
        sync_state(self)

    def _send_addTraces_msg(self, *args: Any, **kwargs: Any) -> None:  # noqa: N802 - plotly's name
        super()._send_addTraces_msg(*args, **kwargs)
        sync_state(self)

    def _send_deleteTraces_msg(self, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        super()._send_deleteTraces_msg(*args, **kwargs)
        sync_state(self)

    def _send_moveTraces_msg(self, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        super()._send_moveTraces_msg(*args, **kwargs)
        sync_state(self)

    def _send_animate_msg(self, *args: Any, **kwargs: Any) -> None:
        super()._send_animate_msg(*args, **kwargs)
        sync_state(self)


def new_figure(*, height: int = 320, width: int | None = None, **layout: Any) -> SyncedFigureWidget:
    """An empty :class:`SyncedFigureWidget` with the workbench's compact defaults.

    A fixed ``height`` (and ``width`` when given) avoids plotly sizing a figure
    to zero when it is first drawn inside a hidden tab.
    """
    defaults = dict(
        template="plotly_white",
        height=height,
        margin=dict(l=55, r=15, t=35, b=45),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0),
    )
    if width is not None:
        defaults["width"] = width
    defaults.update(layout)
    return SyncedFigureWidget(layout=defaults)


def gaps_as_none(values) -> np.ndarray:
    """Heatmap data with NaN/Inf replaced by None (plotly's gap): JSON has no NaN, and jupyter_client
    otherwise warns and converts each NaN to the string 'nan' (twice as slow for a 160 x 320 raster)."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, None)
