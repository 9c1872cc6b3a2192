"""The workbench panels, headless: fed synthetic events, their figures and widgets show the right thing.

References are computed here from the injected numbers (shares = counts / total,
bin means by reshaping, a delta voxel's position in each plane, ETA by hand),
not read back from the panels' own helpers.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")
pytest.importorskip("anywidget")

from cryospin_lab.widgets import (  # noqa: E402
    ControlsPanel,
    FSCPanel,
    HeadAssignmentsPanel,
    LossPanel,
    PoseErrorPanel,
    VolumePanel,
)
from cryospin_lab.widgets.controls import format_duration  # noqa: E402

from cryospin_lab.engine.events import (
    EpochEvent,
    FailureEvent,
    FinishedEvent,
    ForkEvent,
    LogEvent,
    Phase,
    PhaseChangeEvent,
    PoseErrorEvent,
    ResolutionEvent,
    StepEvent,
    VolumeEvent,
)

A, D = Phase.AMORTIZED, Phase.DIRECT


def stamp(epoch=0, step=0, branch="main", phase=A, time_s=0.0) -> dict:
    return dict(epoch=epoch, step=step, branch=branch, phase=phase, time_s=time_s)


def epoch_event(counts, epoch=1, branch="main", epoch_time_s=10.0, phase=A) -> EpochEvent:
    counts = np.asarray(counts)
    return EpochEvent(
        mean_loss=1.0,
        head_win_counts=counts,
        n_images_seen=int(counts.sum()),
        epoch_time_s=epoch_time_s,
        **stamp(epoch=epoch, step=10 * epoch, branch=branch, phase=phase),
    )


def switch_event(reason, epoch=3, branch="main") -> PhaseChangeEvent:
    return PhaseChangeEvent(previous=A, new=D, reason=reason, **stamp(epoch=epoch, step=30, branch=branch))


# ----------------------------------------------------------------------------- head assignments


def test_head_shares_match_injected_counts_and_sum_to_one():
    counts = [[500, 300, 150, 50], [400, 400, 100, 100], [250, 250, 250, 250]]
    panel = HeadAssignmentsPanel(n_heads=4).feed(epoch_event(c, epoch=k + 1) for k, c in enumerate(counts))
    bars = np.asarray(panel.bars.data[0].y, dtype=float)
    np.testing.assert_allclose(bars, np.array(counts[-1]) / 1000)
    assert bars.sum() == pytest.approx(1.0)
    assert list(panel.bars.data[0].x) == [0, 1, 2, 3]
    np.testing.assert_array_equal(panel.bars.data[0].customdata, counts[-1])
    # history: one stacked area per head, each epoch's stack sums to 1
    assert len(panel.areas.data) == 4
    stacked = np.array([np.asarray(trace.y, dtype=float) for trace in panel.areas.data])  # (H, epochs)
    np.testing.assert_allclose(stacked.T, np.array(counts) / 1000)
    np.testing.assert_allclose(stacked.sum(axis=0), 1.0)
    assert list(panel.areas.data[0].x) == [1, 2, 3]
    assert panel.warning.value == ""
    assert panel.areas.layout.xaxis.dtick == 1 and "branch main" in panel.areas.layout.title.text


def test_collapse_warning_names_the_head_under_one_percent():
    panel = HeadAssignmentsPanel().feed([epoch_event([600, 300, 95, 5])])  # head 3: 0.5%
    assert panel.collapsed_heads() == [3]
    assert "head 3" in panel.warning.value and "0.5%" in panel.warning.value
    assert "head 2" not in panel.warning.value
    # exactly 1% is not "under 1%"; a later healthy epoch clears the warning
    panel.feed([epoch_event([600, 300, 90, 10], epoch=2)])
    assert panel.collapsed_heads() == [] and panel.warning.value == ""


def test_direct_epochs_without_head_competition_are_skipped():
    panel = HeadAssignmentsPanel().feed([epoch_event([3, 1]), epoch_event([0, 0], epoch=2, phase=D)])
    np.testing.assert_allclose(np.asarray(panel.bars.data[0].y, dtype=float), [0.75, 0.25])
    assert list(panel.areas.data[0].x) == [1]


def test_heads_branch_selector_appears_after_a_fork():
    panel = HeadAssignmentsPanel().feed(
        [
            epoch_event([3, 1], epoch=1),
            ForkEvent(parent="main", children=("amortized", "direct"), **stamp(epoch=1)),
            epoch_event([1, 1], epoch=2, branch="amortized"),
        ]
    )
    dropdown = panel.branch_select.dropdown
    assert dropdown.layout.display != "none"
    assert "amortized" in dropdown.options and dropdown.value == "amortized"
    assert list(panel.areas.data[0].x) == [1, 2]  # the child's history starts with the parent's
    np.testing.assert_allclose(np.asarray(panel.bars.data[0].y, dtype=float), [0.5, 0.5])
    dropdown.value = "main"
    np.testing.assert_allclose(np.asarray(panel.bars.data[0].y, dtype=float), [0.75, 0.25])


# ----------------------------------------------------------------------------- FSC


def resolution_event(kind, epoch, resolution, branch="main", time_s=60.0) -> ResolutionEvent:
    freqs = np.linspace(0, 0.2, 21)
    return ResolutionEvent(
        kind=kind,
        frequencies_per_angstrom=freqs,
        fsc=np.exp(-freqs * 40 / epoch),
        resolution_angstrom=resolution,
        threshold=0.5 if kind == "ground_truth" else 0.143,
        **stamp(epoch=epoch, branch=branch, time_s=time_s),
    )


def test_fsc_resolution_text_and_curves():
    events = [resolution_event("ground_truth", e, 30.0 / e, time_s=120.0 * e) for e in (1, 2, 3)]
    events.append(resolution_event("half_maps", 3, 7.25))
    panel = FSCPanel().feed(events)
    text = panel.resolution_text.value
    assert f"{events[2].resolution_angstrom:.2f} Å" in text and "10.00 Å" in text
    assert "7.25 Å" in text and "0.143" in text
    older, latest = panel.curves.data[0], panel.curves.data[1]
    np.testing.assert_allclose(np.asarray(latest.y, dtype=float), events[2].fsc)
    assert latest.line.width > older.line.width
    # the two earlier curves are in the faded trace, separated by a gap
    older_y = [y for y in older.y if y is not None]
    np.testing.assert_allclose(older_y, np.concatenate([events[0].fsc, events[1].fsc]))
    assert sorted(round(s.y0, 3) for s in panel.curves.layout.shapes) == [0.143, 0.5]
    # resolution vs wall time, in minutes
    trace = next(t for t in panel.timeline.data if t.name.startswith("main (vs ground truth)"))
    np.testing.assert_allclose(trace.x, [2.0, 4.0, 6.0])
    np.testing.assert_allclose(trace.y, [30.0, 15.0, 10.0])


# ----------------------------------------------------------------------------- pose error


def pose_event(epoch, mean, median, branch="main") -> PoseErrorEvent:
    return PoseErrorEvent(
        mean_deg=mean, median_deg=median, flipped=False, **stamp(epoch=epoch, branch=branch)
    )


def test_pose_error_has_both_branches_after_a_fork_and_marks_switches():
    events = [pose_event(1, 100, 90), pose_event(2, 80, 70), pose_event(3, 60, 50)]
    events += [
        ForkEvent(parent="main", children=("amortized", "direct"), **stamp(epoch=3)),
        switch_event("manual", epoch=3, branch="direct"),
        pose_event(4, 55, 45, "amortized"),
        pose_event(4, 20, 10, "direct"),
        pose_event(5, 50, 40, "amortized"),
        pose_event(5, 5, 3, "direct"),
    ]
    panel = PoseErrorPanel().feed(events)
    by_name = {trace.name: trace for trace in panel.figure.data}
    assert {"main mean", "amortized mean", "direct mean", "direct median"} <= set(by_name)
    # the children start at the parent's last point, then follow their own values
    assert list(by_name["amortized mean"].x) == [3, 4, 5]
    np.testing.assert_allclose(by_name["amortized mean"].y, [60, 55, 50])
    np.testing.assert_allclose(by_name["direct mean"].y, [60, 20, 5])
    np.testing.assert_allclose(by_name["direct median"].y, [50, 10, 3])
    np.testing.assert_allclose(by_name["main mean"].y, [100, 80, 60])
    (line,) = panel.figure.layout.shapes
    assert line.x0 == line.x1 == 3
    assert "by hand" in panel.figure.layout.annotations[0].text
    assert panel.figure.layout.xaxis.dtick == 1  # whole epochs, not 1.2, 1.4, ...
    panel.feed([pose_event(25, 5, 3, "direct")])
    assert panel.figure.layout.xaxis.dtick == 3


def test_pose_error_marks_the_restart_of_a_stuck_start():
    events = [pose_event(k, 100, 95) for k in (1, 2, 3, 4)]
    events.append(
        PhaseChangeEvent(
            previous=Phase.AMORTIZED, new=Phase.AMORTIZED, reason="restart",
            detail="attempt 2: stuck start: after epoch 4 of attempt 1 ...", **stamp(epoch=4),
        )
    )  # fmt: skip
    events += [pose_event(5, 90, 80), pose_event(6, 40, 20)]
    panel = PoseErrorPanel().feed(events)
    (line,) = panel.figure.layout.shapes
    assert line.x0 == 4 and line.line.color == "firebrick"
    assert "attempt 2 after a stuck start at epoch 4" in panel.figure.layout.annotations[0].text


def test_pose_error_shows_the_median_modulo_the_true_maps_symmetry_and_names_it():
    events = [
        PoseErrorEvent(
            mean_deg=95, median_deg=118, flipped=False, symmetry="its near 2-fold", mean_mod_sym_deg=12,
            median_mod_sym_deg=k, **stamp(epoch=k),
        )
        for k in (1, 2, 3)
    ]  # fmt: skip
    panel = PoseErrorPanel().feed(events)
    by_name = {trace.name: trace for trace in panel.figure.data}
    np.testing.assert_allclose(by_name["main median mod. symmetry"].y, [1, 2, 3])
    np.testing.assert_allclose(by_name["main median"].y, [118, 118, 118])
    assert "modulo its near 2-fold" in panel.note.value
    plain = PoseErrorPanel().feed([pose_event(1, 100, 90)])
    assert "modulo" not in plain.note.value


# ----------------------------------------------------------------------------- loss


def test_loss_is_decimated_to_bin_means():
    n, max_points = 6000, 1000
    losses = 1.0 / (1.0 + np.arange(n))
    panel = LossPanel(max_points=max_points).feed(
        StepEvent(loss=float(loss), images_per_s=1.0, n_images=8, **stamp(step=k + 1))
        for k, loss in enumerate(losses)
    )
    trace = panel.figure.data[0]
    assert len(trace.y) == max_points
    np.testing.assert_allclose(trace.y, losses.reshape(max_points, -1).mean(axis=1))
    np.testing.assert_allclose(trace.x, (1 + np.arange(n)).reshape(max_points, -1).mean(axis=1))
    few = LossPanel().feed([StepEvent(loss=2.0, images_per_s=1.0, n_images=8, **stamp(step=1))])
    assert list(few.figure.data[0].y) == [2.0]


# ----------------------------------------------------------------------------- volume


def delta_volume(d: int, z: int, y: int, x: int) -> np.ndarray:
    volume = np.zeros((d, d, d), dtype=np.float32)
    volume[z, y, x] = 1.0
    return volume


@pytest.mark.parametrize("plane", [0, 1, 2])
def test_slices_put_a_voxel_where_the_axes_say(plane):
    d, c = 16, 8
    # a voxel on the central plane `plane`, at distinct positions along the other two axes
    position = [3, 5, 11]
    position[plane] = c
    z, y, x = position
    panel = VolumePanel(use_nglview=False).feed(
        [VolumeEvent(volume=delta_volume(d, z, y, x), voxel_size_angstrom=2.0, **stamp())]
    )
    image = np.asarray(panel.slices.data[plane].z, dtype=float)
    row, col = np.unravel_index(np.argmax(image), image.shape)
    # heatmap rows run along the plot's vertical axis, columns along its horizontal one
    vertical, horizontal = [(y, x), (z, x), (z, y)][plane]
    assert (row, col) == (vertical, horizontal)
    assert image.sum() == 1.0


def test_volume_panel_without_nglview_shows_slices_and_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "nglview", None)  # makes `import nglview` raise ImportError
    panel = VolumePanel()
    assert panel.view is None and "nglview failed to import" in panel.message.value
    volume = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    panel.feed([VolumeEvent(volume=volume, voxel_size_angstrom=3.0, **stamp())])
    # sent rounded to 4 significant digits of the largest value (what a grey scale can show)
    shown = np.asarray(panel.slices.data[0].z, dtype=float)
    np.testing.assert_allclose(shown, volume[4], rtol=0, atol=5e-4 * np.abs(volume[4]).max())


def test_nglview_isosurface_at_the_sigma_level():
    nglview = pytest.importorskip("nglview", exc_type=ImportError)
    volume = np.random.default_rng(1).gamma(2.0, size=(12, 12, 12)).astype(np.float32)
    panel = VolumePanel(sigma=1.5, refresh_s=0.0)
    assert isinstance(panel.view, nglview.NGLWidget)
    panel.feed([VolumeEvent(volume=volume, voxel_size_angstrom=3.0, **stamp())])
    expected = float(volume.mean() + 1.5 * volume.std())

    def isolevels():
        return [
            m["kwargs"]["isolevel"]
            for m in panel.view._ngl_msg_archive
            if m.get("methodName") == "updateRepresentationsByName"
        ]

    assert isolevels()[-1] == pytest.approx(expected, rel=1e-5)
    panel.sigma.value = 3.0
    assert isolevels()[-1] == pytest.approx(float(volume.mean() + 3.0 * volume.std()), rel=1e-5)
    panel.close()


def test_nglview_waits_for_the_browser_to_load_the_previous_map():
    pytest.importorskip("nglview", exc_type=ImportError)
    volumes = [np.random.default_rng(k).gamma(2.0, size=(8, 8, 8)).astype(np.float32) for k in range(3)]
    panel = VolumePanel(refresh_s=0.0)
    try:
        panel.feed([VolumeEvent(volume=volumes[0], voxel_size_angstrom=3.0, **stamp(step=1))])
        assert panel._shown_event.step == 1
        panel.view._ngl_view_id = ["view-1"]  # a browser shows the viewer and has not loaded map 1 yet
        panel.feed([VolumeEvent(volume=volumes[1], voxel_size_angstrom=3.0, **stamp(step=2))])
        assert panel._shown_event.step == 1  # not sent: the browser would only queue it
        panel.view.n_components = 1  # what nglview's front end reports once the map is added
        panel.feed([VolumeEvent(volume=volumes[2], voxel_size_angstrom=3.0, **stamp(step=3))])
        assert panel._shown_event.step == 3  # the latest map, not the one that waited
        panel.ngl_ack_timeout_s = 0.0  # a browser that never answers: load anyway after the timeout
        panel.feed([VolumeEvent(volume=volumes[0], voxel_size_angstrom=3.0, **stamp(step=4))])
        assert panel._shown_event.step == 4
    finally:
        panel.close()


# ----------------------------------------------------------------------------- controls


@pytest.mark.parametrize(
    "reason, words", [("manual", "by hand"), ("epoch", "at the set epoch"), ("auto", "automatically")]
)
def test_switch_button_disables_after_the_phase_change_and_names_the_reason(reason, words):
    panel = ControlsPanel().feed([StepEvent(loss=1.0, images_per_s=50.0, n_images=8, **stamp(step=1))])
    assert panel.state == "running"
    assert panel.switch_button.description.startswith("Switch to direct")
    panel.feed([switch_event(reason, epoch=4)])
    assert panel.switch_button.disabled
    assert words in panel.switch_button.description and "epoch 4" in panel.switch_button.description
    assert words in panel.switch_info.value


def test_switch_button_says_switching_while_the_engine_scores_the_candidates():
    from types import SimpleNamespace

    panel = ControlsPanel().feed([StepEvent(loss=1.0, images_per_s=50.0, n_images=8, **stamp(step=1))])
    requests = []
    panel.reconstruction = SimpleNamespace(switch_now=lambda: requests.append("switch"), state="running")
    panel.switch_button.click()  # handled without a run's checks: only the label logic is under test
    panel.poll()
    assert requests == ["switch"] and panel.switch_button.description == "Switch requested…"
    panel.feed([LogEvent(message="switching: choosing the best of 7 candidates for 500 images", **stamp())])
    assert panel.switch_button.description == "Switching…"
    panel.feed([switch_event("manual", epoch=1)])
    assert panel.switch_button.description.startswith("Switched at epoch 1")


def test_switch_stays_available_for_the_amortized_child_after_a_fork():
    # without a reconstruction every command button stays disabled, so read the branch phases
    panel = ControlsPanel().feed(
        [
            StepEvent(loss=1.0, images_per_s=50.0, n_images=8, **stamp(step=1)),
            ForkEvent(parent="main", children=("amortized", "direct"), **stamp(epoch=2)),
            switch_event("manual", epoch=2, branch="direct"),
        ]
    )
    assert panel.phases == {"amortized": A, "direct": D}
    assert panel.switch_button.description.startswith("Switch to direct")  # amortized can still switch
    assert "direct</b> switched" in panel.switch_info.value


def test_status_line_eta_from_epoch_times():
    panel = ControlsPanel(n_epochs=5, n_particles=100)
    events = [epoch_event([1, 1], epoch=1, epoch_time_s=12.0), epoch_event([1, 1], epoch=2, epoch_time_s=8.0)]
    events += [
        StepEvent(loss=1.0, images_per_s=40.0, n_images=25, **stamp(epoch=2, step=s)) for s in (21, 22)
    ]
    panel.feed(events)
    # 2 epochs done and half of the third: 2.5 epochs left at the mean epoch time of 10 s
    assert panel.eta_s == pytest.approx(25.0)
    assert "ETA 25 s" in panel.status.value
    assert "epoch 2/5" in panel.status.value and "step 22" in panel.status.value
    assert "40 images/s" in panel.status.value
    panel.feed([FinishedEvent(reason="stopped", summary={}, **stamp(epoch=2, step=22))])
    assert panel.eta_s is None and "ended: stopped" in panel.status.value


def test_format_duration():
    assert format_duration(25) == "25 s"
    assert format_duration(125) == "2 min 05 s"
    assert format_duration(3720) == "1 h 02 min"


def test_engine_failure_is_shown_with_its_traceback():
    panel = ControlsPanel().feed(
        [
            LogEvent(message="paused", **stamp()),
            FailureEvent(
                exception_type="FloatingPointError",
                message="loss became nan at step 7",
                traceback='Traceback (most recent call last):\n  File "training.py"\nFloatingPointError',
                checkpoint_path="/tmp/run/failed.pt",
                **stamp(step=7),
            ),
        ]
    )
    assert "FloatingPointError: loss became nan at step 7" in panel.error_summary.value
    assert "Traceback (most recent call last)" in panel.error_detail.value
    assert "/tmp/run/failed.pt" in panel.error_detail.value
    assert panel.errors.layout.display != "none"
    assert "[main, epoch 0] paused" in panel.log.value


def test_a_warning_stays_in_view_after_later_messages():
    warning = LogEvent(
        message="stalled: the mean loss changed by 0.015 %", level="warning", **stamp(epoch=18)
    )
    later = [LogEvent(message=f"note {k}", **stamp(epoch=19)) for k in range(5)]
    panel = ControlsPanel().feed([warning, *later])
    assert "<b>warning</b> [main, epoch 18] stalled: the mean loss changed by 0.015 %" in panel.log.value
    assert "note 4" in panel.log.value and "note 0" not in panel.log.value  # the info lines scroll
    panel.bind(None)  # a new run forgets the old run's warnings
    assert "stalled" not in panel.log.value
    with pytest.raises(ValueError, match="level"):
        LogEvent(message="x", level="error", **stamp())
