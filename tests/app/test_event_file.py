"""A run's event log (``events.jsonl``) carries every event to another process: round trip of a real
run's events, a follower reading a log while it is written, and the read-only workbench on it."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from cryospin_lab.app.event_file import EventLogFollower, EventLogWriter, read_events
from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.engine.events import EpochEvent, StepEvent
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.model.encoder import EncoderConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_events(tiny_stack, tiny_ground_truth_module):
    config = TrainingConfig(
        encoder=EncoderConfig(box_size=32, n_heads=3), batch_size=16, n_epochs=2, switch="1",
        n_tracked=2, volume_interval_s=1e9, device="cpu",
    )  # fmt: skip
    return list(Trainer(tiny_stack, config, ground_truth_map=tiny_ground_truth_module).events())


@pytest.fixture(scope="module")
def tiny_ground_truth_module(tiny_simulation):
    import mrcfile
    import torch

    with mrcfile.open(tiny_simulation.ground_truth_path, permissive=True) as mrc:
        return torch.from_numpy(np.array(mrc.data, dtype=np.float32))


def same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
            and np.asarray(a).dtype == np.asarray(b).dtype
        )
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return a == b


def test_every_event_of_a_run_comes_back(run_events, tmp_path):
    log = tmp_path / "events.jsonl"
    writer = EventLogWriter(log)
    for event in run_events:
        writer.write(event)
    writer.close()
    back = read_events(log)
    assert [type(e) for e in back] == [type(e) for e in run_events]
    types = {type(e).__name__ for e in run_events}
    assert {"StepEvent", "EpochEvent", "PoseErrorEvent", "ResolutionEvent", "VolumeEvent"} <= types
    latest_heavy = {}
    for event in run_events:
        if event.heavy:
            latest_heavy[(type(event), event.branch)] = event
    for original, copy in zip(run_events, back, strict=True):
        # heavy events' arrays are kept once per kind and branch: they read back as the latest
        reference = latest_heavy[(type(original), original.branch)] if original.heavy else original
        for field in dataclasses.fields(original):
            source = reference if isinstance(getattr(original, field.name), np.ndarray) else original
            assert same(getattr(source, field.name), getattr(copy, field.name)), (type(original), field.name)
    sidecars = sorted(p.name for p in tmp_path.glob("events.*.npz"))
    assert "events.VolumeEvent.main.npz" in sidecars
    assert log.stat().st_size < 200_000, "the maps are not in the log itself"


def test_a_follower_reads_a_log_while_it_is_written(run_events, tmp_path):
    log = tmp_path / "events.jsonl"
    follower = EventLogFollower(log, poll_s=0.01).start()  # before the file exists
    small = [e for e in run_events if not e.heavy]

    def write():
        writer = EventLogWriter(log)
        for event in run_events:
            writer.write(event)
            time.sleep(0.001)
        writer.close()

    writer = threading.Thread(target=write)
    writer.start()
    writer.join(timeout=60)
    deadline = time.monotonic() + 30
    while follower.n_events < len(run_events) and time.monotonic() < deadline:
        time.sleep(0.02)
    follower.stop()
    history = follower.bus.history()
    assert [type(e) for e in history] == [type(e) for e in small]
    assert [e.step for e in history] == [e.step for e in small]


def test_watch_shows_a_run_from_its_log(run_events, tmp_path):
    pytest.importorskip("ipywidgets")
    pytest.importorskip("plotly")
    from cryospin_lab.widgets import watch

    log = tmp_path / "events.jsonl"
    writer = EventLogWriter(log)
    for event in run_events:
        writer.write(event)
    writer.close()
    bench = watch(log, use_nglview=False, n_epochs=2)
    try:
        loss = bench["Loss"]
        bench.container.selected_index = list(bench.panels).index("Loss")  # hidden tabs do not draw
        steps = len([e for e in run_events if isinstance(e, StepEvent)])
        assert bench.pump.run_until(
            lambda: len(loss.figure.data) > 0 and len(loss.figure.data[0].x) >= steps, timeout_s=60
        )
        epochs = [e for e in run_events if isinstance(e, EpochEvent)]
        assert list(loss.figure.data[1].y) == pytest.approx([e.mean_loss for e in epochs])
        assert "watching" in bench.title.value and "read-only" in bench.title.value
        assert bench.controls.start_button.layout.display is None  # the row around it is hidden
        assert bench.controls.widget.children[0].layout.display == "none"
        assert "epoch 2/2" in bench.controls.status.value
    finally:
        bench.close()
    assert not bench.follower._thread.is_alive()
