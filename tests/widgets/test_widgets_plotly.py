"""A FigureWidget's stored state (what a view opened later is built from) follows in-place updates.

``get_state()`` is what ipywidgets sends when a front end asks for a widget's
state (a reload, Voila connecting); its ``_widget_data`` entries hold 1-D
numeric arrays as ``{"buffer": memoryview, "dtype", "shape"}``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

go = pytest.importorskip("plotly.graph_objects")
pytest.importorskip("anywidget")

from cryospin_lab.widgets._plotly import SyncedFigureWidget, new_figure, sync_state  # noqa: E402


def record_messages(fig, record) -> None:
    """Record what ``fig`` sends. ipywidgets sends only through a comm that has a kernel: once
    ipykernel is imported, widgets made outside a kernel get a comm without one and send nothing."""
    fig.comm.kernel = object()
    fig.comm.send = lambda data=None, buffers=None, **kwargs: record(data)


def stored(value) -> np.ndarray:
    """A value of the serialised state as a numpy array (a binary buffer or a plain list)."""
    if isinstance(value, dict) and "buffer" in value:
        return np.frombuffer(value["buffer"], dtype=value["dtype"]).reshape(value["shape"])
    return np.asarray(value, dtype=float)


def stored_trace(fig, index: int, key: str) -> np.ndarray:
    return stored(fig.get_state()["_widget_data"][index][key])


def test_plain_figurewidget_state_is_stale_in_this_plotly():
    """The problem being fixed; if this fails, plotly syncs by itself and sync_state is redundant."""
    fig = go.FigureWidget(data=[go.Scatter(x=np.arange(3.0), y=np.zeros(3))])
    fig.data[0].y = np.ones(3)
    np.testing.assert_array_equal(stored_trace(fig, 0, "y"), np.zeros(3))
    sync_state(fig)
    np.testing.assert_array_equal(stored_trace(fig, 0, "y"), np.ones(3))


def test_synced_figure_follows_assignment_batch_update_add_trace_and_layout():
    fig = new_figure()
    fig.add_trace(go.Scatter(x=[0.0, 1.0], y=[1.0, 2.0], name="a"))
    assert len(fig.get_state()["_widget_data"]) == 1
    fig.data[0].y = np.array([5.0, 6.0])  # a plain assignment (restyle message)
    np.testing.assert_array_equal(stored_trace(fig, 0, "y"), [5.0, 6.0])
    with fig.batch_update():  # one update message for traces and layout together
        fig.data[0].x = np.array([3.0, 4.0])
        fig.layout.title.text = "after"
    np.testing.assert_array_equal(stored_trace(fig, 0, "x"), [3.0, 4.0])
    assert fig.get_state()["_widget_layout"]["title"]["text"] == "after"
    fig.add_trace(go.Heatmap(z=np.arange(6.0).reshape(2, 3)))
    np.testing.assert_array_equal(stored_trace(fig, 1, "z"), np.arange(6.0).reshape(2, 3))
    fig.layout.shapes = [dict(type="line", x0=2, x1=2, y0=0, y1=1)]  # relayout message
    assert fig.get_state()["_widget_layout"]["shapes"][0]["x0"] == 2
    fig.data = [fig.data[1]]  # delete a trace
    assert [t["type"] for t in fig.get_state()["_widget_data"]] == ["heatmap"]


def test_a_copy_of_the_state_is_stored_not_the_live_dicts():
    """The stored state must not alias the figure's live dicts (a later update would change it unseen)."""
    fig = SyncedFigureWidget(data=[go.Scatter(y=[1.0])])
    fig.data[0].y = [2.0]
    fig.get_state()
    assert fig._widget_data[0] is not fig._data[0]
    assert fig._widget_layout is not fig._layout_obj._props


def test_an_update_sends_only_plotlys_message_not_the_whole_figure():
    """Each update goes out once, as plotly's small message; the full state is sent only when asked for."""
    fig = new_figure()
    fig.add_trace(go.Scatter(x=np.arange(1000.0), y=np.zeros(1000)))
    fig._view_count = 1  # a browser shows it (its front-end model applies plotly's messages)
    sent: list[set[str]] = []
    record_messages(fig, lambda msg: sent.append(set(msg.get("state", {}))))
    fig.data[0].y = np.ones(1000)
    with fig.batch_update():
        fig.data[0].x = np.arange(1000.0) + 1
        fig.layout.title.text = "t"
    assert sent and all(keys.isdisjoint({"_widget_data", "_widget_layout"}) for keys in sent), sent
    np.testing.assert_array_equal(stored_trace(fig, 0, "y"), np.ones(1000))  # and yet the state is current


def test_panel_figures_are_current_in_a_fresh_state():
    """A panel updated by events: a view created now would show the new data."""
    from cryospin_lab.widgets import HeadAssignmentsPanel

    from cryospin_lab.engine.events import EpochEvent, Phase

    panel = HeadAssignmentsPanel()
    counts = np.array([30, 10])
    panel.feed(
        [
            EpochEvent(
                mean_loss=1.0,
                head_win_counts=counts,
                n_images_seen=40,
                epoch_time_s=1.0,
                step=5,
                epoch=1,
                phase=Phase.AMORTIZED,
                time_s=1.0,
            )
        ]
    )
    np.testing.assert_allclose(stored_trace(panel.bars, 0, "y"), counts / counts.sum())


def test_gaps_as_none_rounds_to_significant_digits_and_marks_gaps():
    from cryospin_lab.widgets._plotly import gaps_as_none

    values = np.array([[123.456789, -0.000123456], [np.nan, np.inf]])
    out = gaps_as_none(values)
    assert out[1, 0] is None and out[1, 1] is None
    assert out[0, 0] == 123.5 and out[0, 1] == 0.0  # 4 digits of the largest magnitude (0.1)
    assert len(json.dumps(gaps_as_none(np.random.default_rng(0).random((50, 50))).tolist())) < 9 * 2500
    np.testing.assert_array_equal(gaps_as_none(values, digits=None)[0].astype(float), values[0])


def browser_ack(fig) -> None:
    """What a browser view sends after drawing the figure's latest update (plotly 7.1's front end)."""
    fig.set_state({"_js2py_traceDeltas": {"trace_deltas": [], "trace_edit_id": fig._last_trace_edit_id}})
    fig.set_state(
        {"_js2py_widget_layoutDelta": {"layout_delta": {}, "layout_edit_id": fig._last_layout_edit_id}}
    )


def test_front_end_behind_until_the_browser_acknowledges_the_update():
    fig = new_figure()
    fig.add_trace(go.Scatter(y=[1.0]))
    assert not fig.front_end_behind  # no browser view: nothing to wait for
    fig._view_count = 1
    fig.data[0].y = [2.0]
    assert fig.front_end_behind
    fig.set_state({"_js2py_traceDeltas": {"trace_deltas": [], "trace_edit_id": fig._last_trace_edit_id}})
    # plotly's own Python side never clears the layout flag (its front end names the message differently)
    assert fig._layout_edit_in_process and fig.front_end_behind
    browser_ack(fig)
    assert not fig.front_end_behind
    fig.layout.title.text = "again"
    assert fig.front_end_behind
    fig.ack_timeout_s = 0.0  # a view that went away without saying so: draw anyway after the timeout
    assert not fig.front_end_behind


def test_acknowledgements_are_not_echoed_back_to_the_browser():
    fig = new_figure()
    fig.add_trace(go.Scatter(y=[1.0]))
    fig._view_count = 1
    fig.data[0].y = [2.0]
    sent: list[dict] = []
    record_messages(fig, sent.append)
    browser_ack(fig)
    assert not [m for m in sent if m.get("method") == "echo_update"], sent


def test_a_panel_defers_its_redraw_while_the_browser_is_behind_then_draws_the_latest():
    from cryospin_lab.widgets import LossPanel

    from cryospin_lab.engine.events import Phase, StepEvent

    def step(k: int) -> StepEvent:
        return StepEvent(
            loss=float(k), images_per_s=1.0, n_images=8, step=k, epoch=0, phase=Phase.AMORTIZED, time_s=k
        )

    panel = LossPanel().feed([step(1)])
    panel.figure._view_count = 1  # a browser shows it
    browser_ack(panel.figure)
    panel.feed([step(2)])  # drawn: the browser had caught up
    assert list(panel.figure.data[0].x) == [1, 2]
    panel.feed([step(3)])
    panel.feed([step(4)])  # the browser has not drawn step 2 yet: both wait
    assert list(panel.figure.data[0].x) == [1, 2] and panel.n_deferred == 2
    browser_ack(panel.figure)
    panel.poll()
    assert list(panel.figure.data[0].x) == [1, 2, 3, 4]


def test_without_a_view_the_state_itself_is_sent():
    """Before any view exists the front-end model may miss plotly's messages: the state goes out."""
    fig = new_figure()
    sent: list[set[str]] = []
    record_messages(fig, lambda msg: sent.append(set(msg.get("state", {}))))
    fig.add_trace(go.Scatter(x=np.arange(3.0), y=np.zeros(3)))
    assert any("_widget_data" in keys for keys in sent)


def test_camera_button_downloads_png_or_svg_named_after_the_title():
    """The modebar's download reads ``_config`` (synced to the browser) when a figure is drawn."""
    from cryospin_lab.widgets import _plotly

    fig = new_figure(title=dict(text="FSC vs truth, main"))
    options = fig.get_state()["_config"]["toImageButtonOptions"]
    assert options == {"format": "png", "scale": 2, "filename": "cryospin-lab-fsc-vs-truth-main"}
    try:
        _plotly.set_image_format("svg")
        assert new_figure(title="loss")._config["toImageButtonOptions"]["format"] == "svg"
        assert fig._config["toImageButtonOptions"]["format"] == "png"  # figures already made keep theirs
        with pytest.raises(ValueError, match="image_format must be one of"):
            _plotly.set_image_format("jpeg")
    finally:
        _plotly.set_image_format("png")
