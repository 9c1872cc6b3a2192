"""Run a training generator on one background thread; commands in through a queue, events out on a bus.

The pattern is napari/superqt's generator worker: the trainer's ``events()`` is a
generator that yields between optimisation steps, and everything the outside
world does to the run happens between two ``next()`` calls on the runner's thread:

* ``Runner.switch_now()``, ``pause()``, ``resume()``, ``stop()``, ``fork(**kwargs)``
  put a :class:`Command` on a ``queue.Queue`` and return at once.
* Before each ``next()`` the runner drains the queue. ``PAUSE`` blocks the thread on
  the queue (no busy loop) until ``RESUME`` or ``STOP``; ``STOP`` closes the
  generator (``gen.close()``: its ``finally`` blocks run, and must not yield) and
  publishes ``FinishedEvent(reason="stopped")``; ``SWITCH_NOW`` and ``FORK`` are
  passed to ``trainer.apply_command`` and the events it returns are published.
* A command therefore takes effect after the event being computed is yielded:
  within one step when the trainer yields at least once per step (tested: 10 ms
  steps, ``switch_now`` applied well within 0.5 s). A command that arrives as the
  run ends is dropped; a command before ``start()`` or after the end raises.
* An exception in the generator (or in ``apply_command``, other than
  :class:`CommandError`) is published as ``FailureEvent`` (type, message,
  traceback text, and the path returned by ``trainer.save_checkpoint()``), then
  ``FinishedEvent(reason="failed")``; the thread ends and ``join()`` re-raises the
  original exception object. A trainer rejects a command it cannot apply now by
  raising :class:`CommandError`; that becomes a ``LogEvent`` and the run goes on.
* Every run ends with exactly one ``FinishedEvent`` published (if the generator
  returns without yielding one, the runner publishes ``reason="completed"``).

Events go out on the run's :class:`~cryospin_lab.app.bus.EventBus`, the only
link to consumers (UI pump, CLI, tests); the bus never touches widgets.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from cryospin_lab.app.bus import EventBus
from cryospin_lab.engine.commands import Command, CommandError
from cryospin_lab.engine.events import Event, FailureEvent, FinishedEvent, LogEvent, Phase

__all__ = ["Runner", "Steppable", "one_torch_thread"]

E = TypeVar("E", bound=Event)


@runtime_checkable
class Steppable(Protocol):
    """What a trainer offers the runner (``engine.trainer.Trainer`` implements it)."""

    def events(self) -> Iterator[Event]:
        """A generator yielding events, at least once per optimisation step; commands run between yields."""
        ...

    def apply_command(self, command: Command, **kwargs: Any) -> list[Event]:
        """Apply SWITCH_NOW or FORK between steps; return the events to publish (e.g. PhaseChangeEvent)."""
        ...

    def save_checkpoint(self) -> str | None:
        """Save the current state after a failure; return its path (None if nothing was saved)."""
        ...


_ENDED = ("finished", "stopped", "failed")


# Runners whose thread was started: stopped when the interpreter exits (a kernel restart, the end of a
# script). A daemon thread still inside torch when the interpreter tears down aborts the process
# ("terminate called without an active exception", SIGABRT); stopping it first ends cleanly.
_STARTED: weakref.WeakSet = weakref.WeakSet()
EXIT_JOIN_TIMEOUT_S = 30.0


@atexit.register
def _stop_running_runners() -> None:
    for runner in list(_STARTED):
        if runner.is_running:
            try:
                runner.stop()
            except RuntimeError:  # it ended meanwhile
                continue
    for runner in list(_STARTED):
        if runner._thread is not None:
            runner._thread.join(EXIT_JOIN_TIMEOUT_S)


class Runner:
    """Runs ``trainer.events()`` on one daemon thread and publishes every event on ``bus``.

    ``state`` is one of "created", "running", "paused", "finished" (the generator
    returned), "stopped" or "failed".
    """

    def __init__(self, trainer: Steppable, bus: EventBus | None = None, *, log: Any = None, threads: int = 0):
        missing = [
            name for name in ("events", "apply_command", "save_checkpoint") if not hasattr(trainer, name)
        ]
        if missing:
            raise TypeError(f"Runner: {type(trainer).__name__} lacks {missing} (see runner.Steppable)")
        self.trainer = trainer
        self.bus = bus if bus is not None else EventBus()
        self.threads = threads  # torch intra-op threads of the training thread; 0: as it inherits
        self._commands: queue.Queue[tuple[Command, dict[str, Any]]] = queue.Queue()
        self._state = "created"
        self._state_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._exception: BaseException | None = None
        self._start_time = 0.0
        self._stamp: dict[str, Any] = {"step": 0, "epoch": 0, "phase": Phase.AMORTIZED}
        self._finished_published = False
        # An EventLogWriter (``events.jsonl`` beside the checkpoints, for replay); dropped with a
        # warning event if writing fails (a full disk must not end the run).
        self._log = log

    # --------------------------------------------------------------- public API

    @property
    def state(self) -> str:
        return self._state

    @property
    def is_running(self) -> bool:
        """True from ``start()`` until the run has ended (also while paused)."""
        return self._state in ("running", "paused")

    @property
    def is_paused(self) -> bool:
        """True once the thread is actually blocked by a pause (a requested pause waits for the step)."""
        return self._state == "paused"

    @property
    def exception(self) -> BaseException | None:
        """The exception that failed the run, None otherwise."""
        return self._exception

    def start(self) -> Runner:
        with self._state_lock:
            if self._state != "created":
                raise RuntimeError(f"Runner.start: the run was already started (state {self._state!r})")
            self._state = "running"
        self._start_time = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="cryospin-runner", daemon=True)
        self._thread.start()
        _STARTED.add(self)
        return self

    def switch_now(self, **kwargs: Any) -> None:
        """Switch to the direct phase after the current step (``kwargs`` go to the trainer)."""
        self._send(Command.SWITCH_NOW, **kwargs)

    def pause(self) -> None:
        self._send(Command.PAUSE)

    def resume(self) -> None:
        self._send(Command.RESUME)

    def stop(self) -> None:
        """End the run after the current step (the generator's ``finally`` runs)."""
        self._send(Command.STOP)

    def fork(self, **kwargs: Any) -> None:
        """Fork the run (``kwargs`` go to ``trainer.apply_command(Command.FORK, **kwargs)``)."""
        self._send(Command.FORK, **kwargs)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True if it ended. Re-raises the exception that failed the run."""
        if self._thread is None:
            raise RuntimeError("Runner.join: the run was never started (call start() first)")
        self._thread.join(timeout)
        if self._exception is not None:
            raise self._exception
        return not self._thread.is_alive()

    def wait_for(
        self,
        event_type: type[E],
        timeout: float = 10.0,
        predicate: Callable[[E], bool] | None = None,
        *,
        include_past: bool = True,
    ) -> E:
        """The first matching event (``EventBus.wait_for``); RuntimeError early if the run ends without it."""
        return self.bus.wait_for(
            event_type,
            timeout,
            predicate,
            include_past=include_past,
            give_up=lambda: self._thread is not None and not self._thread.is_alive(),
        )

    # --------------------------------------------------------------- thread

    def _send(self, command: Command, **kwargs: Any) -> None:
        state = self._state
        if state == "created":
            raise RuntimeError(f"Runner.{command.value}: the run has not been started (call start() first)")
        if state in _ENDED:
            raise RuntimeError(f"Runner.{command.value}: the run has already ended (state {state!r})")
        self._commands.put((command, kwargs))

    def _set_state(self, state: str) -> None:
        with self._state_lock:
            self._state = state

    def _publish(self, event: Event) -> None:
        self._stamp = {"step": event.step, "epoch": event.epoch, "phase": event.phase}
        if isinstance(event, FinishedEvent):
            self._finished_published = True
        self.bus.publish(event)
        if self._log is not None:
            try:
                self._log.write(event)
            except OSError as err:
                self._log = None
                message = f"event log not written any more ({err}): this run cannot be replayed"
                self.bus.publish(self._runner_event(LogEvent, message=message, level="warning"))

    def _runner_event(self, cls: type[E], **fields: Any) -> E:
        """An event stamped like the trainer's last one (a FinishedEvent gets Phase.FINISHED)."""
        stamp = dict(self._stamp, time_s=time.monotonic() - self._start_time)
        if cls is FinishedEvent:
            stamp["phase"] = Phase.FINISHED
        stamp.update(fields)
        return cls(**stamp)

    def _apply(self, command: Command, kwargs: dict[str, Any]) -> None:
        try:
            events = self.trainer.apply_command(command, **kwargs)
        except CommandError as err:
            self._publish(self._runner_event(LogEvent, message=f"{command.value} rejected: {err}"))
            return
        for event in events or ():
            self._publish(event)

    def _handle_commands(self) -> bool:
        """Apply queued commands; return True when the run must stop. Blocks while paused."""
        paused = False
        while True:
            try:
                command, kwargs = self._commands.get(block=paused)
            except queue.Empty:
                return False
            if command is Command.STOP:
                return True
            if command is Command.PAUSE and not paused:
                paused = True
                self._set_state("paused")
                self._publish(self._runner_event(LogEvent, message="paused"))
            elif command is Command.RESUME and paused:
                paused = False
                self._set_state("running")
                self._publish(self._runner_event(LogEvent, message="resumed"))
            elif command in (Command.SWITCH_NOW, Command.FORK):
                self._apply(command, kwargs)

    def _run(self) -> None:
        generator = None
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        try:
            generator = iter(self.trainer.events())
            while True:
                if self._handle_commands():
                    generator.close()  # raises GeneratorExit at the yield: the finally blocks run
                    if self._finished_published:  # the Stop came after the run's own last event
                        self._set_state("finished")
                        return
                    self._publish(self._runner_event(FinishedEvent, reason="stopped", summary={}))
                    self._set_state("stopped")  # after the last event: not running => all events published
                    return
                try:
                    event = next(generator)
                except StopIteration:
                    break
                self._publish(event)
            if not self._finished_published:
                self._publish(self._runner_event(FinishedEvent, reason="completed", summary={}))
            self._set_state("finished")
        except BaseException as exc:  # every failure must surface as an event and on join()
            self._fail(exc, generator)
        finally:
            self._drop_queued_commands()

    def _fail(self, exc: BaseException, generator) -> None:
        self._exception = exc
        checkpoint_path, note = None, ""
        try:
            checkpoint_path = self.trainer.save_checkpoint()
        except Exception as err:  # report, the original failure matters more
            note = f"\n(saving a checkpoint after the failure also failed: {type(err).__name__}: {err})"
        if generator is not None:
            try:
                generator.close()  # a generator suspended at a yield (failure in apply_command) cleans up
            except Exception:  # already failing; the first exception is the one reported
                pass
        try:
            self._publish(
                self._runner_event(
                    FailureEvent,
                    exception_type=type(exc).__name__,
                    message=str(exc) + note,
                    traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                    checkpoint_path=None if checkpoint_path is None else str(checkpoint_path),
                )
            )
            self._publish(self._runner_event(FinishedEvent, reason="failed", summary={}))
        except Exception:  # the bus itself failed; join() still re-raises
            pass
        finally:
            self._set_state("failed")

    def _drop_queued_commands(self) -> None:
        while True:
            try:
                self._commands.get_nowait()
            except queue.Empty:
                return


def one_torch_thread() -> None:
    """Set the calling thread to one torch intra-op thread (a worker beside a run: no second
    OpenMP team, docs/decisions.md#one-omp-team)."""
    torch.set_num_threads(1)
