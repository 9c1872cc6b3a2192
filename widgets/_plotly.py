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

The fix: while no browser view of the figure exists (``_view_count`` 0), every
update also assigns the two traits (:func:`sync_state`): the front-end model
(created when the widget opens, and initialised asynchronously by anywidget)
then holds the current figure whatever messages it missed (update messages sent
before it listens are lost). Once a view exists, :class:`SyncedFigureWidget`
copies ``_data`` and the layout's props into the two traits only *when its
state is read* (``get_state``, which ipywidgets calls when a front end asks for
the state), after an update made it stale. That copy is written into the
traits' values without a change notification, so it sends nothing: a live view
has applied the update message, and plotly's front-end *model* applies those
messages to its own copy of ``_widget_data``/``_widget_layout`` too. Why:
assigning the traits after every update would send the whole figure again with
every small change (docs/decisions.md#widget-lazy-state).

:func:`sync_state` assigns the traits (a notified change) on any FigureWidget;
``tests/widgets/test_widgets_plotly.py`` checks the lazy sync for property assignment,
``batch_update``, ``add_trace`` and layout shapes, and that an update sends
only plotly's own message.
"""

from __future__ import annotations

import math
import time
from copy import deepcopy
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.serializers import custom_serializers
from traitlets import Dict, observe

from ._plotly_module import figure_module

__all__ = [
    "sync_state",
    "SyncedFigureWidget",
    "new_figure",
    "gaps_as_none",
    "epoch_ticks",
    "set_image_format",
    "IMAGE_FORMATS",
]

IMAGE_FORMATS = ("png", "svg")
# The modebar's camera button: PNG at twice the screen size (sharp on a projector) unless set
# to SVG (vector, for slides) by launch(image_format=...). Read when a figure is first drawn.
_image_options = {"format": "png", "scale": 2}


def set_image_format(image_format: str) -> None:
    """What the camera button of figures made from now on downloads: ``"png"`` (default) or ``"svg"``."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    _image_options["format"] = image_format


def _state_copies(fig: go.FigureWidget) -> tuple[list, dict]:
    """Deep copies of ``fig``'s current traces and layout: the values of its two synced traits."""
    return deepcopy(fig._data), deepcopy(fig._layout_obj._props)


def sync_state(fig: go.FigureWidget) -> None:
    """Copy ``fig``'s current traces and layout into its synced widget traits (see the module doc)."""
    fig._widget_data, fig._widget_layout = _state_copies(fig)


class SyncedFigureWidget(go.FigureWidget):
    """A ``go.FigureWidget`` whose ``get_state()`` reflects every update, and that knows when a
    browser has not yet drawn its last update (:attr:`front_end_behind`).

    The ``_send_*_msg`` methods of plotly 7.1's ``BaseFigureWidget`` mark the
    stored state stale; if a release renames them, the state tests in
    ``tests/widgets/test_widgets_plotly.py`` fail.

    Acknowledgements: after drawing an update, each browser view of the figure
    sends back "deltas" carrying the update's edit id; plotly's Python side then
    clears ``_trace_edit_in_process`` / ``_layout_edit_in_process``. plotly 7.1's
    front end sends the layout one as ``_js2py_widget_layoutDelta``, a trait the
    Python side does not have (so ``_layout_edit_in_process`` never clears); this
    class adds that trait and clears the flag. The delta traits are not echoed
    back to the browser (``echo_update=False``), which saves a round of messages
    per update. The panels skip a redraw while their figure's previous update is
    not acknowledged (back-pressure: a slow browser gets fewer, not queued, updates).
    """

    _SYNCED = ("_widget_data", "_widget_layout")
    ack_timeout_s = 5.0  # after this, draw anyway (a view that closed without saying so never answers)

    _js2py_traceDeltas = Dict(allow_none=True).tag(sync=True, echo_update=False, **custom_serializers)
    _js2py_layoutDelta = Dict(allow_none=True).tag(sync=True, echo_update=False, **custom_serializers)
    _js2py_widget_layoutDelta = Dict(allow_none=True).tag(sync=True, echo_update=False, **custom_serializers)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._state_stale = False
        self._sent_at = -np.inf
        module = figure_module()
        if module is not None:  # else plotly's own (class attribute): see _plotly_module
            self._esm = module
        super().__init__(*args, **kwargs)

    @property
    def front_end_behind(self) -> bool:
        """A browser shows this figure and has not acknowledged its last update (for ``ack_timeout_s``)."""
        if not self._view_count:
            return False
        pending = self._trace_edit_in_process or self._layout_edit_in_process
        return pending and time.monotonic() - self._sent_at < self.ack_timeout_s

    @observe("_js2py_widget_layoutDelta")
    def _on_layout_ack(self, change) -> None:
        message = change["new"]
        if message and message.get("layout_edit_id") == self._last_layout_edit_id:
            self._layout_edit_in_process = False

    def _mark_stale(self) -> None:
        self._sent_at = time.monotonic()
        if not self._view_count:  # None while plotly's __init__ runs
            # No browser view yet: its front-end model may not be listening (anywidget initialises
            # it asynchronously, and update messages that arrive before are lost), so send the
            # state itself (docs/decisions.md#widget-lazy-state).
            sync_state(self)
            self._state_stale = False
        else:
            self._state_stale = True

    def get_state(self, key=None, drop_defaults=False):
        keys = None if key is None else {key} if isinstance(key, str) else set(key)
        if self._state_stale and (keys is None or keys & set(self._SYNCED)):
            self._state_stale = False
            # Written into the trait values directly: no change notification, so nothing is sent.
            data, layout = _state_copies(self)
            self._trait_values["_widget_data"], self._trait_values["_widget_layout"] = data, layout
        return super().get_state(key=key, drop_defaults=drop_defaults)

    def _send_restyle_msg(self, *args: Any, **kwargs: Any) -> None:
        super()._send_restyle_msg(*args, **kwargs)
        self._mark_stale()

    def _send_relayout_msg(self, *args: Any, **kwargs: Any) -> None:
        super()._send_relayout_msg(*args, **kwargs)
        self._mark_stale()

    def _send_update_msg(self, *args: Any, **kwargs: Any) -> None:
        super()._send_update_msg(*args, **kwargs)
        self._mark_stale()

    def _send_addTraces_msg(self, *args: Any, **kwargs: Any) -> None:  # noqa: N802 - plotly's name
        super()._send_addTraces_msg(*args, **kwargs)
        self._mark_stale()

    def _send_deleteTraces_msg(self, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        super()._send_deleteTraces_msg(*args, **kwargs)
        self._mark_stale()

    def _send_moveTraces_msg(self, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        super()._send_moveTraces_msg(*args, **kwargs)
        self._mark_stale()

    def _send_animate_msg(self, *args: Any, **kwargs: Any) -> None:
        super()._send_animate_msg(*args, **kwargs)
        self._mark_stale()


LEGEND_MARGIN = 40


def new_figure(*, height: int = 320, width: int | None = None, **layout: Any) -> SyncedFigureWidget:
    """An empty :class:`SyncedFigureWidget` with the workbench's compact defaults.

    A fixed ``height`` (and ``width`` when given) avoids plotly sizing a figure
    to zero when it is first drawn inside a hidden tab. The legend sits in a row
    under the x-axis title (``LEGEND_MARGIN`` pixels are added to the height for
    it): above the plot it covered the figure's title. The camera button downloads
    the format of :func:`set_image_format`, named after the title.
    """
    defaults = dict(
        template="plotly_white",
        height=height + LEGEND_MARGIN,
        margin=dict(l=55, r=15, t=35, b=45 + LEGEND_MARGIN),
        legend=dict(orientation="h", yanchor="top", y=-0.2, x=0, yref="paper"),
    )
    if width is not None:
        defaults["width"] = width
    defaults.update(layout)
    fig = SyncedFigureWidget(layout=defaults)
    title = layout.get("title")
    title = title.get("text") if isinstance(title, dict) else title
    name = "-".join("".join(c if c.isalnum() else " " for c in str(title or "figure")).lower().split())
    fig._config = {"toImageButtonOptions": {**_image_options, "filename": f"cryospin-lab-{name}"[:80]}}
    return fig


def gaps_as_none(values, digits: int | None = 4) -> np.ndarray:
    """Heatmap data for the wire: NaN/Inf as None (plotly's gap), values rounded to ``digits`` significant
    digits of the largest magnitude (default 4; None: not rounded).

    plotly sends a 2-D array as JSON text (only 1-D arrays go as binary buffers), and digits beyond
    what a colour scale can show only lengthen that text (docs/decisions.md#widget-lazy-state). JSON
    has no NaN: jupyter_client would otherwise warn and send each NaN as the string 'nan'.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if digits is not None and finite.any():
        top = float(np.abs(values[finite]).max())
        if top > 0:
            values = np.round(values, digits - 1 - int(np.floor(np.log10(top))))
    return np.where(finite, values, None)


def epoch_ticks(last_epoch: float) -> dict:
    """Whole-epoch ticks for an "epochs done" axis (plotly's own pick gives 1.2, 1.4, ... on a short
    run): a tick every epoch up to 10, then every ``ceil(last / 10)``."""
    return dict(tickmode="linear", tick0=0, dtick=max(1, math.ceil(last_epoch / 10)))
