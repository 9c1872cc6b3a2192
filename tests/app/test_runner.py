"""Events, the event bus and the background runner, driven by a fake trainer (no model, fast)."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cryospin_lab.app.bus import EventBus
from cryospin_lab.app.runner import Runner, Steppable
from cryospin_lab.engine import steps as _steps
from cryospin_lab.engine.commands import Command, CommandError
from cryospin_lab.engine.events import (
    CheckpointEvent,
    EpochEvent,
    Event,
    FailureEvent,
    FinishedEvent,
    ForkEvent,
    LogEvent,
    Phase,
    PhaseChangeEvent,
    PoseCandidatesEvent,
    ResolutionEvent,
    StepEvent,
    VolumeEvent,
)
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.checkpoint import load_checkpoint

from helpers import STEPS_PER_EPOCH, of_type, switches, tiny_config

STAMP = {"epoch": 0, "phase": Phase.AMORTIZED, "time_s": 0.0}


def step_event(step: int, branch: str = "main") -> StepEvent:
    return StepEvent(step=step, branch=branch, loss=1.0, images_per_s=10.0, n_images=4, **STAMP)


def volume_event(step: int, branch: str = "main", value: float = 0.0) -> VolumeEvent:
    return VolumeEvent(
        step=step, branch=branch, volume=np.full((4, 4, 4), value), voxel_size_angstrom=2.0, **STAMP
    )


class FakeTrainer:
    """Yields one StepEvent per step of ``step_s`` seconds; records what the runner asks of it."""

    def __init__(self, n_steps: int = 100_000, step_s: float = 0.0, fail_at: int | None = None):
        self.n_steps, self.step_s, self.fail_at = n_steps, step_s, fail_at
        self.phase = Phase.AMORTIZED
        self.step = -1
        self.finally_ran = threading.Event()
        self.applied: list[tuple[Command, dict, int]] = []
        self.checkpoint_error: Exception | None = None
        self.command_error: Exception | None = None
        self.t0 = time.monotonic()

    def events(self):
        try:
            for step in range(self.n_steps):
                self.step = step
                if step == self.fail_at:
                    raise FloatingPointError(f"loss is NaN at step {step}")
                time.sleep(self.step_s)
                yield StepEvent(
                    step=step,
                    epoch=step // 10,
                    phase=self.phase,
                    time_s=time.monotonic() - self.t0,
                    loss=1.0 / (step + 1),
                    images_per_s=100.0,
                    n_images=8,
                )
        finally:
            self.finally_ran.set()

    def apply_command(self, command: Command, **kwargs) -> list[Event]:
        self.applied.append((command, kwargs, self.step))
        if self.command_error is not None:
            raise self.command_error
        stamp = {"step": self.step, "epoch": self.step // 10, "time_s": time.monotonic() - self.t0}
        if command is Command.SWITCH_NOW:
            if self.phase is Phase.DIRECT:
                raise CommandError("already in the direct phase")
            self.phase = Phase.DIRECT
            return [
                PhaseChangeEvent(
                    phase=self.phase, previous=Phase.AMORTIZED, new=Phase.DIRECT, reason="manual", **stamp
                )
            ]
        if command is Command.FORK:
            return [ForkEvent(phase=self.phase, parent="main", children=kwargs["children"], **stamp)]
        raise AssertionError(f"the runner passed {command} to the trainer")

    def save_checkpoint(self) -> str | None:
        if self.checkpoint_error is not None:
            raise self.checkpoint_error
        return "/runs/x/checkpoints/failure.pt"


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def thread_cpu_ticks(runner: Runner) -> int | None:
    """User + system CPU time of the runner's thread in clock ticks (Linux /proc), None elsewhere."""
    try:
        stat = Path(f"/proc/self/task/{runner._thread.native_id}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def n_steps_published(bus: EventBus) -> int:
    return len(bus.history(StepEvent))


# ----------------------------------------------------------------------------- events


def test_events_copy_arrays_read_only_and_validate_shapes():
    source = torch.arange(64, dtype=torch.float64).reshape(4, 4, 4).requires_grad_()
    event = VolumeEvent(step=3, volume=source, voxel_size_angstrom=1.5, **STAMP)
    assert isinstance(event.volume, np.ndarray) and event.volume.dtype == np.float32
    assert not event.volume.flags.writeable
    with torch.no_grad():
        source += 1  # the event holds a copy, not a view of training state
    assert event.volume[0, 0, 0] == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.step = 4
    assert VolumeEvent.heavy and not StepEvent.heavy and not EpochEvent.heavy
    counts = np.array([3, 1])
    epoch = EpochEvent(
        step=1, mean_loss=0.5, head_win_counts=counts, n_images_seen=4, epoch_time_s=1.0, **STAMP
    )
    counts[0] = 99
    assert epoch.head_win_counts.tolist() == [3, 1]

    with pytest.raises(ValueError, match=r"VolumeEvent.volume.*\(4, 4, 3\)"):
        VolumeEvent(step=0, volume=np.zeros((4, 4, 3)), voxel_size_angstrom=1.0, **STAMP)
    with pytest.raises(ValueError, match=r"PoseCandidatesEvent.losses must have shape \(2, 3\)"):
        PoseCandidatesEvent(
            step=0, indices=[1, 2], rotations=np.zeros((2, 3, 3, 3)), losses=np.zeros((2, 4)), **STAMP
        )
    with pytest.raises(ValueError, match="ResolutionEvent.kind"):
        ResolutionEvent(
            step=0,
            kind="gt",
            frequencies_per_angstrom=[0.1],
            fsc=[1.0],
            resolution_angstrom=5,
            threshold=0.5,
            **STAMP,
        )
    with pytest.raises(ValueError, match="PhaseChangeEvent.reason"):
        PhaseChangeEvent(step=0, previous=Phase.AMORTIZED, new=Phase.DIRECT, reason="because", **STAMP)
    with pytest.raises(ValueError, match="phase must be a Phase"):
        StepEvent(step=0, epoch=0, phase="warmup", time_s=0, loss=1, images_per_s=1, n_images=1)
    # plain numbers are normalised: a 0-d tensor loss becomes a float
    assert type(StepEvent(step=0, loss=torch.tensor(2.0), images_per_s=1, n_images=1, **STAMP).loss) is float


# ----------------------------------------------------------------------------- event bus


def test_bus_keeps_small_events_in_order_and_only_the_latest_heavy_per_branch():
    bus = EventBus()
    sub = bus.subscribe()
    for step in range(5):
        bus.publish(step_event(step))
        bus.publish(volume_event(step, value=step))
    bus.publish(volume_event(7, branch="switched"))
    drained = sub.drain()
    assert [e.step for e in drained if isinstance(e, StepEvent)] == [0, 1, 2, 3, 4]
    volumes = [e for e in drained if isinstance(e, VolumeEvent)]
    assert [(v.branch, v.step) for v in volumes] == [("main", 4), ("switched", 7)]
    assert drained[:5] == [e for e in drained if isinstance(e, StepEvent)]  # small first, then heavy
    assert sub.drain() == []  # nothing new

    bus.publish(volume_event(8, branch="switched"))
    assert [(e.branch, e.step) for e in sub.drain()] == [("switched", 8)]  # only what changed
    assert bus.latest(VolumeEvent).step == 4 and bus.latest(VolumeEvent, "switched").step == 8
    assert bus.latest(StepEvent).step == 4 and bus.latest(FinishedEvent) is None
    assert [e.step for e in bus.history(StepEvent)] == [0, 1, 2, 3, 4]
    assert bus.history(VolumeEvent) == []  # heavy events are not in the history
    with pytest.raises(TypeError, match="expects an Event"):
        bus.publish("step")


def test_late_subscriber_gets_history_and_current_state_and_max_events_pages():
    bus = EventBus()
    for step in range(10):
        bus.publish(step_event(step))
        bus.publish(volume_event(step))
    late = bus.subscribe()
    page = late.drain(max_events=4)
    assert [e.step for e in page] == [0, 1, 2, 3, 9]  # heavy state always comes along
    assert [e.step for e in late.drain()] == [4, 5, 6, 7, 8, 9]
    assert late.drain() == []


def test_bounded_history_drops_the_oldest_and_counts_what_a_slow_reader_missed():
    bus = EventBus(max_history=5)
    slow = bus.subscribe()
    for step in range(12):
        bus.publish(step_event(step))
    assert [e.step for e in bus.history()] == [7, 8, 9, 10, 11]
    assert [e.step for e in slow.drain()] == [7, 8, 9, 10, 11]
    assert slow.n_dropped == 7


def test_bus_is_thread_safe_with_four_publishers_and_a_concurrent_reader():
    bus = EventBus()
    n_per_thread, n_threads = 2000, 4
    reader = bus.subscribe()
    received: list[Event] = []
    done = threading.Event()

    def publish(thread: int) -> None:
        for step in range(n_per_thread):
            bus.publish(step_event(step, branch=f"t{thread}"))
            if step % 100 == 0:
                bus.publish(volume_event(step, branch=f"t{thread}"))

    def read() -> None:
        while not done.is_set():
            reader.wait(0.01)
            received.extend(reader.drain(max_events=500))
        received.extend(reader.drain())

    reader_thread = threading.Thread(target=read)
    reader_thread.start()
    publishers = [threading.Thread(target=publish, args=(i,)) for i in range(n_threads)]
    for t in publishers:
        t.start()
    for t in publishers:
        t.join()
    done.set()
    reader_thread.join()

    steps = [e for e in received if isinstance(e, StepEvent)]
    assert len(steps) == n_threads * n_per_thread == len(bus.history())
    for thread in range(n_threads):
        assert [e.step for e in steps if e.branch == f"t{thread}"] == list(range(n_per_thread))
        assert bus.latest(VolumeEvent, f"t{thread}").step == 1900
    last_volume_seen = {e.branch: e.step for e in received if isinstance(e, VolumeEvent)}
    assert last_volume_seen == {f"t{i}": 1900 for i in range(n_threads)}


# ----------------------------------------------------------------------------- runner


def test_runner_runs_to_completion_and_ends_with_one_finished_event():
    trainer = FakeTrainer(n_steps=30)
    assert isinstance(trainer, Steppable)
    runner = Runner(trainer).start()
    assert runner.join(timeout=5) is True
    assert runner.state == "finished" and not runner.is_running
    events = runner.bus.history()
    assert [e.step for e in events if isinstance(e, StepEvent)] == list(range(30))
    assert isinstance(events[-1], FinishedEvent) and events[-1].reason == "completed"
    assert events[-1].phase is Phase.FINISHED
    assert len(runner.bus.history(FinishedEvent)) == 1
    with pytest.raises(RuntimeError, match="already ended"):
        runner.switch_now()


def test_commands_before_start_raise_and_start_twice_raises():
    runner = Runner(FakeTrainer(n_steps=3))
    for command in (runner.switch_now, runner.pause, runner.resume, runner.stop, runner.fork):
        with pytest.raises(RuntimeError, match="not been started"):
            command()
    with pytest.raises(RuntimeError, match="never started"):
        runner.join()
    assert runner.state == "created"
    runner.start()
    with pytest.raises(RuntimeError, match="already started"):
        runner.start()
    runner.join(5)
    with pytest.raises(TypeError, match="lacks"):
        Runner(object())


def test_pause_blocks_progress_and_resume_continues():
    trainer = FakeTrainer(step_s=0.002)
    runner = Runner(trainer).start()
    runner.wait_for(StepEvent, 5, lambda e: e.step >= 5)
    runner.pause()
    wait_until(lambda: runner.is_paused)
    assert runner.state == "paused" and runner.is_running
    n_paused = n_steps_published(runner.bus)
    cpu_before = thread_cpu_ticks(runner)
    time.sleep(0.3)
    assert n_steps_published(runner.bus) == n_paused  # no step while paused
    if cpu_before is not None:  # Linux: the paused thread waits on the queue, it does not spin
        assert thread_cpu_ticks(runner) - cpu_before <= 3
    runner.resume()
    runner.wait_for(StepEvent, 5, lambda e: e.step >= n_paused + 5)
    assert runner.state == "running"
    messages = [e.message for e in runner.bus.history(LogEvent)]
    assert messages == ["paused", "resumed"]
    runner.stop()
    runner.join(5)


def test_stop_runs_the_generators_finally_and_publishes_finished_stopped():
    trainer = FakeTrainer(step_s=0.001)
    runner = Runner(trainer).start()
    runner.wait_for(StepEvent, 5, lambda e: e.step >= 3)
    runner.stop()
    assert runner.join(timeout=5)
    assert trainer.finally_ran.is_set()
    assert runner.state == "stopped"
    last = runner.bus.history()[-1]
    assert isinstance(last, FinishedEvent) and last.reason == "stopped"
    with pytest.raises(RuntimeError, match="already ended"):
        runner.resume()


def test_stop_while_paused_ends_the_run():
    trainer = FakeTrainer(step_s=0.001)
    runner = Runner(trainer).start()
    runner.pause()
    wait_until(lambda: runner.is_paused)
    runner.stop()
    assert runner.join(timeout=5)
    assert runner.state == "stopped" and trainer.finally_ran.is_set()


def test_switch_now_is_applied_within_half_a_second_with_10_ms_steps():
    trainer = FakeTrainer(step_s=0.010)
    runner = Runner(trainer).start()
    runner.wait_for(StepEvent, 5, lambda e: e.step >= 3)
    sent = time.monotonic()
    runner.switch_now()
    change = runner.wait_for(PhaseChangeEvent, 5)
    latency = time.monotonic() - sent
    assert latency < 0.5, f"switch_now took {latency:.3f} s"
    assert change.new is Phase.DIRECT and change.reason == "manual"
    assert [c for c, _, _ in trainer.applied] == [Command.SWITCH_NOW]
    runner.wait_for(StepEvent, 5, lambda e: e.phase is Phase.DIRECT)

    runner.switch_now()  # rejected by the trainer: logged, the run goes on
    rejected = runner.wait_for(LogEvent, 5, lambda e: "rejected" in e.message)
    assert "already in the direct phase" in rejected.message
    runner.wait_for(StepEvent, 5, lambda e: e.step >= rejected.step + 3)
    assert runner.is_running

    runner.fork(children=("amortized", "switched"))
    fork = runner.wait_for(ForkEvent, 5)
    assert fork.children == ("amortized", "switched")
    assert trainer.applied[-1][1] == {"children": ("amortized", "switched")}
    runner.stop()
    runner.join(5)


def test_an_exception_mid_run_becomes_failure_events_and_is_reraised_on_join():
    trainer = FakeTrainer(fail_at=20)
    runner = Runner(trainer).start()
    with pytest.raises(FloatingPointError, match="NaN at step 20") as info:
        runner.join(timeout=5)
    assert info.value is runner.exception
    assert runner.state == "failed" and not runner.is_running
    assert trainer.finally_ran.is_set()
    *_, failure, finished = runner.bus.history()
    assert isinstance(failure, FailureEvent) and failure.exception_type == "FloatingPointError"
    assert "NaN at step 20" in failure.message
    assert "in events" in failure.traceback and "FloatingPointError" in failure.traceback
    assert failure.checkpoint_path == "/runs/x/checkpoints/failure.pt"
    assert failure.step == 19  # stamped with the last step the trainer reported
    assert isinstance(finished, FinishedEvent) and finished.reason == "failed"
    with pytest.raises(FloatingPointError):  # every join re-raises
        runner.join()
    with pytest.raises(RuntimeError, match="already ended"):
        runner.pause()


def test_failure_in_a_command_and_in_the_failure_checkpoint_are_both_reported():
    trainer = FakeTrainer(step_s=0.001)
    trainer.command_error = KeyError("pose_table")
    trainer.checkpoint_error = OSError("disk full")
    runner = Runner(trainer).start()
    runner.wait_for(StepEvent, 5)
    runner.fork(children=("a", "b"))
    with pytest.raises(KeyError):
        runner.join(timeout=5)
    failure = runner.bus.latest(FailureEvent)
    assert failure.exception_type == "KeyError" and failure.checkpoint_path is None
    assert "disk full" in failure.message
    assert trainer.finally_ran.is_set()  # the suspended generator was closed
    assert runner.bus.history()[-1].reason == "failed"


def test_wait_for_gives_up_when_the_run_ends_without_the_event():
    runner = Runner(FakeTrainer(n_steps=5)).start()
    with pytest.raises(RuntimeError, match="without publishing a matching PhaseChangeEvent"):
        runner.wait_for(PhaseChangeEvent, timeout=5)
    with pytest.raises(TimeoutError):
        EventBus().wait_for(StepEvent, timeout=0.05)
    # a subscriber made after the run still sees all of it
    late = runner.bus.subscribe().drain()
    assert [type(e) for e in late] == [StepEvent] * 5 + [FinishedEvent]


@pytest.mark.usefixtures("one_torch_thread")
def test_runner_pause_resume_switch_stop_from_another_thread(tiny_stack):
    runner = Runner(Trainer(tiny_stack, tiny_config(n_epochs=1000, switch="never"))).start()
    try:
        runner.wait_for(StepEvent, timeout=60)
        runner.pause()
        wait_until(lambda: runner.is_paused, timeout=30.0)  # a real trainer: a step takes a while
        n_steps = len(runner.bus.history(StepEvent))
        time.sleep(0.5)
        assert runner.is_paused and len(runner.bus.history(StepEvent)) == n_steps  # no progress
        runner.resume()
        runner.wait_for(StepEvent, timeout=30, predicate=lambda e: e.step > n_steps)
        assert runner.state == "running"

        runner.switch_now()
        t0 = time.monotonic()
        change = runner.wait_for(PhaseChangeEvent, timeout=30, predicate=lambda e: e.new is Phase.DIRECT)
        assert time.monotonic() - t0 < 1.0
        assert change.reason == "manual"
        runner.wait_for(StepEvent, timeout=30, predicate=lambda e: e.phase is Phase.DIRECT)
    finally:
        if runner.is_running:
            runner.stop()
    finished = runner.wait_for(FinishedEvent, timeout=30)
    assert finished.reason == "stopped"
    assert runner.join(timeout=30) is True
    assert runner.state == "stopped" and runner.exception is None
    history = runner.bus.history()
    assert len(of_type(history, FinishedEvent)) == 1 and history[-1] is finished
    assert len(switches(history)) == 1
    assert [e.message for e in of_type(history, LogEvent)][:2] == ["paused", "resumed"]


@pytest.mark.usefixtures("one_torch_thread")
def test_failure_mid_run_surfaces_and_keeps_last_good_checkpoint(tiny_stack, tmp_path, monkeypatch):
    """NaN loss at the 6th step (epoch 2, after epoch_0001.pt was written)."""
    fail_at = STEPS_PER_EPOCH + 1
    calls = {"n": 0}
    good_checkpoint = tmp_path / "checkpoints" / "epoch_0001.pt"
    digest_before = {}
    original = _steps.amortized_step

    def failing_step(ctx, branch, indices):
        if calls["n"] == fail_at:
            digest_before["sha"] = hashlib.sha256(good_checkpoint.read_bytes()).hexdigest()
            return float("nan")
        calls["n"] += 1
        return original(ctx, branch, indices)

    monkeypatch.setattr(_steps, "amortized_step", failing_step)
    trainer = Trainer(tiny_stack, tiny_config(n_epochs=3, switch="never"), out_dir=tmp_path)
    runner = Runner(trainer).start()
    with pytest.raises(FloatingPointError, match="loss became nan"):
        runner.join(timeout=60)
    assert runner.state == "failed" and isinstance(runner.exception, FloatingPointError)
    history = runner.bus.history()
    (failure,) = of_type(history, FailureEvent)
    assert failure.exception_type == "FloatingPointError" and "nan" in failure.message
    assert "FloatingPointError" in failure.traceback
    interrupted = tmp_path / "checkpoints" / "interrupted.pt"
    assert failure.checkpoint_path == str(interrupted) and interrupted.exists()
    assert isinstance(history[-1], FinishedEvent) and history[-1].reason == "failed"
    assert len(of_type(history, FinishedEvent)) == 1
    # The last good epoch checkpoint is untouched; the failing state went to interrupted.pt.
    assert [Path(e.path).name for e in of_type(history, CheckpointEvent)] == ["epoch_0001.pt"]
    assert hashlib.sha256(good_checkpoint.read_bytes()).hexdigest() == digest_before["sha"]
    assert not (tmp_path / "checkpoints" / "epoch_0002.pt").exists()
    good = load_checkpoint(good_checkpoint)["branches"][0]
    assert (good["epoch"], good["step"]) == (1, STEPS_PER_EPOCH)
    failed = load_checkpoint(interrupted)["branches"][0]
    assert (failed["epoch"], failed["step"]) == (1, fail_at)


def test_the_training_thread_takes_the_runners_torch_threads_and_the_caller_keeps_its_own():
    """torch's intra-op thread count belongs to each thread (OpenMP): the runner sets its own."""
    import torch

    class CountingTrainer(FakeTrainer):
        def events(self):
            self.threads_seen = torch.get_num_threads()
            yield from super().events()

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        trainer = CountingTrainer(n_steps=3)
        runner = Runner(trainer, threads=2).start()
        assert runner.join(timeout=5) is True
        assert trainer.threads_seen == 2 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def test_a_reconstruction_hands_the_main_threads_torch_threads_to_its_run(tiny_simulation):
    """Made on the main thread, a Reconstruction leaves it one torch thread and gives its run the rest
    (two OpenMP teams on two cores made a notebook run 1.6x slower: docs/decisions.md#one-omp-team)."""
    import torch

    from cryospin_lab.app.reconstruction import Reconstruction

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        rec = Reconstruction(tiny_simulation.star_path, n_epochs=1, n_heads=2, device="cpu")
        assert torch.get_num_threads() == 1 and rec.runner.threads == 2
    finally:
        torch.set_num_threads(previous)
