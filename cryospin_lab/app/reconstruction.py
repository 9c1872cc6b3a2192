"""A reconstruction as a notebook (or a script) drives it: one object, a background run, read-only views.

:class:`Reconstruction` bundles what the workbench needs and nothing of the UI:

* building a :class:`~cryospin_lab.engine.trainer.Trainer` from a particle file (or the
  embedded default HSP90 set) and a few settings;
* running it on a :class:`~cryospin_lab.app.runner.Runner` thread, with its
  :class:`~cryospin_lab.app.bus.EventBus` (``reconstruction.bus``) as the only
  channel out, and the commands (start, pause, resume, stop, switch_now, fork)
  as the only channel in;
* read-only views that are safe from another thread while the run goes on: a
  particle's image and CTF as the trainer sees them (:meth:`particle`), the true
  poses when the data are simulated, the box and pixel size.

The panels in ``cryospin_lab.widgets`` take a ``Reconstruction`` (or only its
bus) and never reach into the trainer.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryospin_lab.app.bus import EventBus
from cryospin_lab.app.event_file import EventLogWriter
from cryospin_lab.app.runner import Runner
from cryospin_lab.engine.config import SETTINGS, TrainingConfig, apply_settings
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.physics import so3
from cryospin_lab.physics.ctf import ctf_images
from cryospin_lab.simulate.simulator import SimulationResult

__all__ = ["ParticleView", "Reconstruction"]


@dataclass(frozen=True, eq=False)
class ParticleView:
    """One particle as the trainer sees it (numpy copies, read-only).

    ``image`` is the normalised real-space image ``(D, D)``; ``ctf`` the CTF on the
    centred Fourier grid ``(D, D)`` (DC at ``[D // 2, D // 2]``, the layout of
    ``fourier.fft2_centered``), None when the data carry no CTF. ``true_rotation``
    ``(3, 3)`` and ``true_view_direction`` ``(3,)`` are None unless the particle
    file holds poses (simulated data).
    """

    index: int
    image: np.ndarray
    ctf: np.ndarray | None
    pixel_size_angstrom: float
    true_rotation: np.ndarray | None
    true_view_direction: np.ndarray | None
    defocus_angstrom: float | None


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.array(array, copy=True)
    array.setflags(write=False)
    return array


class Reconstruction:
    """A cryoSPIN reconstruction of one particle set, run on a background thread.

    Args:
        particles: a STAR / cryoSPARC ``.cs`` / ``.mrcs`` file; a simulated set
            (``SimulationResult``, e.g. ``datasets.bundled("1u6g")``), whose
            true map becomes the ground truth; or None for the embedded
            default (HSP90 2CG9, simulated once and cached).
        out_dir: where checkpoints go; None: a fresh temporary folder.
        ground_truth: a map on the particles' grid for FSC-vs-truth (optional).
        box_size: Fourier-downsample the particles to this box on load.
        config: a full :class:`TrainingConfig`; keywords below override it.
        **settings: any run setting by name (``engine.config.SETTINGS``:
            ``n_heads``, ``n_epochs``, ``switch`` ("auto", "never" or an epoch),
            ``seed``, ``estimate_shifts``, the learning rates, ...), checked as
            the command line checks its options.

    Raises ValueError naming the setting for an unknown or bad one, and the
    file for unreadable particles, before anything runs.
    """

    def __init__(
        self,
        particles: str | os.PathLike | SimulationResult | None = None,
        *,
        out_dir: str | os.PathLike | None = None,
        ground_truth: str | os.PathLike | None = None,
        box_size: int | None = None,
        config: TrainingConfig | None = None,
        bus: EventBus | None = None,
        **settings: Any,
    ):
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:  # before the default set is simulated
            raise ValueError(f"Reconstruction: unknown setting(s) {unknown}; known: {sorted(SETTINGS)}")
        # The run trains on a background thread with the threads this thread has now; this thread
        # keeps one from here on (docs/decisions.md#one-omp-team).
        train_threads = _hand_threads_to_the_run()
        if particles is None:
            from cryospin_lab.simulate.datasets import hsp90

            particles = hsp90()
        if isinstance(particles, SimulationResult):  # a simulated set: its true map is the truth
            if ground_truth is None:
                ground_truth = particles.ground_truth_path
            particles = particles.star_path
        particles = Path(particles)
        if not particles.is_file():
            raise FileNotFoundError(f"particle file not found: {particles}")
        self.particles_path = particles
        self.stack = ParticleStack(particles, box_size=box_size)
        self.config = apply_settings(
            TrainingConfig() if config is None else config,
            settings,
            box_size=self.stack.box_size,
            pixel_size_angstrom=self.stack.pixel_size_angstrom,
            prefix="Reconstruction: ",
        )
        truth = None
        if ground_truth is not None:
            from cryospin_lab.io.maps import load_ground_truth

            truth = load_ground_truth(Path(ground_truth), self.stack)
        self.ground_truth_path = None if ground_truth is None else Path(ground_truth)
        if out_dir is None:
            out_dir = tempfile.mkdtemp(prefix="cryospin-lab-")
        self.out_dir = Path(out_dir)
        self.trainer = Trainer(self.stack, self.config, ground_truth_map=truth, out_dir=self.out_dir)
        self.bus = bus if bus is not None else EventBus()
        # events.jsonl beside the checkpoints, so that widgets.replay(rec.out_dir) can replay the run
        self.runner = Runner(
            self.trainer, self.bus, log=EventLogWriter(self.out_dir / "events.jsonl"), threads=train_threads
        )
        self._true_rotations = self.trainer.true_rotations  # CPU tensor (N, 3, 3) or None
        self._ground_truth = None if truth is None else _read_only(truth.numpy())

    # ------------------------------------------------------------------ commands
    def start(self) -> Reconstruction:
        """Start the run on its background thread (once); returns self."""
        self.runner.start()
        return self

    def pause(self) -> None:
        self.runner.pause()

    def resume(self) -> None:
        self.runner.resume()

    def stop(self) -> None:
        self.runner.stop()

    def switch_now(self, branch: str | None = None) -> None:
        """Switch to direct optimisation before the next step (all amortized branches, or one)."""
        self.runner.switch_now(**({} if branch is None else {"branch": branch}))

    def fork(self, branch: str | None = None) -> None:
        """Split amortized branch(es) in two: one stays amortized, one switches now (paper Fig. 4)."""
        self.runner.fork(**({} if branch is None else {"branch": branch}))

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the run to end; re-raises the run's exception if it failed."""
        return self.runner.join(timeout)

    def export(self, out_dir: str | os.PathLike, *, timeout_s: float = 300.0) -> list[Path]:
        """Write the results so far into ``out_dir``, as ``cryospin-lab reconstruct`` does.

        ``map.mrc`` and ``poses.star`` (per branch after a fork; half maps in
        gold-standard mode), ``metrics.csv`` from the events so far, and
        ``fsc.png`` or ``loss.png`` (and ``.svg``), and ``report.html`` (all of it on one page:
        ``app/report.py``). A running run is paused between two steps
        while its state is read, then resumed (this call waits for the pause,
        up to ``timeout_s``). Returns the paths written.
        """
        from cryospin_lab.app.epoch_records import EpochCollector
        from cryospin_lab.app.report import write_report
        from cryospin_lab.app.results import ResultWriter
        from cryospin_lab.engine.events import ForkEvent

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paused_here = False
        if self.runner.is_running and not self.runner.is_paused:
            self.pause()
            paused_here = True
            deadline = time.monotonic() + timeout_s
            while self.runner.is_running and not self.runner.is_paused:
                if time.monotonic() > deadline:
                    self.resume()
                    raise TimeoutError(f"export: the run did not pause within {timeout_s} s")
                time.sleep(0.02)
        try:
            writer = ResultWriter(self.trainer, out_dir, [])
            epochs = EpochCollector()  # gathers each epoch's events into one metrics.csv row
            for event in self.bus.history():
                if isinstance(event, ForkEvent):
                    writer.add_branches(event.children)
                for done in epochs.feed(event):
                    writer.epoch_done(done)
            for done in epochs.flush():
                writer.epoch_done(done)
            written = writer.write_final()
            report = write_report(
                out_dir, config=self.config, particles=str(self.particles_path), n_particles=self.n_particles,
                box_size=self.box_size, pixel_size_angstrom=self.pixel_size_angstrom, rows=writer.rows,
                events=self.bus.history(), figures=written,
            )  # fmt: skip
            return [*written, report]
        finally:
            if paused_here and self.runner.is_paused:
                self.resume()

    @property
    def state(self) -> str:
        """The runner's state: created, running, paused, stopped, finished or failed."""
        return self.runner.state

    def close(self) -> None:
        """Stop a running run and wait for its thread (used when a notebook closes the workbench)."""
        if self.runner.is_running:
            self.runner.stop()
            try:
                self.runner.join(timeout=30)
            except Exception as err:  # the failure was already published as an event
                warnings.warn(f"the run had failed: {err}", stacklevel=2)

    # ------------------------------------------------------------------ read-only views
    @property
    def n_particles(self) -> int:
        return len(self.stack)

    @property
    def box_size(self) -> int:
        return self.stack.box_size

    @property
    def pixel_size_angstrom(self) -> float:
        return float(self.stack.pixel_size_angstrom)

    @property
    def n_heads(self) -> int:
        return int(self.config.encoder.n_heads)

    @property
    def has_ground_truth_poses(self) -> bool:
        return self._true_rotations is not None

    @property
    def ground_truth_map(self) -> np.ndarray | None:
        """The true map ``(D, D, D)`` on the particles' grid when one was given (read-only)."""
        return self._ground_truth

    def true_rotations(self) -> np.ndarray | None:
        """True rotations ``(N, 3, 3)`` from the particle file (simulated data), else None."""
        return None if self._true_rotations is None else _read_only(self._true_rotations.numpy())

    def true_view_directions(self) -> np.ndarray | None:
        """Unit view directions ``(N, 3)`` of the true poses (``so3.view_directions``), else None."""
        if self._true_rotations is None:
            return None
        return _read_only(so3.view_directions(self._true_rotations).numpy())

    def particle(self, index: int) -> ParticleView:
        """Particle ``index``'s image and CTF as the trainer sees them (any thread)."""
        n = len(self.stack)
        index = int(index)
        if not 0 <= index < n:
            raise IndexError(f"particle index {index} out of range: the set has {n} particles (0..{n - 1})")
        image = self.stack.get_batch(np.array([index])).images[0].float()
        ctf = None
        defocus = None
        params = self.stack.metadata.ctf
        if params is not None:
            row = params[np.array([index])]
            ctf = ctf_images(row, self.box_size, self.pixel_size_angstrom)[0].float().numpy()
            defocus = float((row.defocus_u_angstrom[0] + row.defocus_v_angstrom[0]) / 2)
        truth = direction = None
        if self._true_rotations is not None:
            rot = self._true_rotations[index]
            truth = rot.numpy()
            direction = so3.view_directions(rot[None])[0].numpy()
        return ParticleView(
            index=index,
            image=_read_only(image.numpy()),
            ctf=None if ctf is None else _read_only(ctf),
            pixel_size_angstrom=self.pixel_size_angstrom,
            true_rotation=None if truth is None else _read_only(truth),
            true_view_direction=None if direction is None else _read_only(direction),
            defocus_angstrom=defocus,
        )

    def describe(self) -> str:
        """The data and settings in one line (what does not change while the run goes on)."""
        return (
            f"{self.particles_path.name}: {self.n_particles} particles, box {self.box_size}, "
            f"{self.pixel_size_angstrom:g} Å/px, {self.n_heads} heads, switch {self.config.switch!r}, "
            f"{self.config.n_epochs} epochs"
        )

    def __repr__(self) -> str:
        return f"Reconstruction({self.describe()}, state {self.state!r})"


def _hand_threads_to_the_run() -> int:
    """The calling thread's torch intra-op threads, for the run's thread; the caller keeps one.

    Rule: a :class:`Reconstruction` made on the main thread sets it to one torch thread (before
    it loads anything), and its run's thread takes the count the main thread had. Why: libgomp
    (torch's OpenMP on Linux) barely spins once more OpenMP threads exist than cores, so a
    second thread team (the kernel's, beside the run's) made every step of a notebook run 1.6x
    slower on 2 cores (docs/decisions.md#one-omp-team). Other threads are left alone.
    """
    import threading

    import torch

    threads = torch.get_num_threads()
    if threading.current_thread() is threading.main_thread():
        torch.set_num_threads(1)
    return threads
