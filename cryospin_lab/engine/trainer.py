"""The cryoSPIN run: amortized stage, switch, direct stage, as a generator of events.

:meth:`Trainer.events` is a generator that yields after every optimisation
step, so a test can drive it synchronously and
:class:`~cryospin_lab.app.runner.Runner` can put it on a thread;
:meth:`Trainer.apply_command` is called only between two steps.

A run holds one or more :class:`~cryospin_lab.engine.branch.Branch` es (one,
until ``fork``; two independent halves in gold-standard mode). A branch is a
whole reconstruction state: volume, encoder (amortized) or pose table
(direct), optimisers, phase. Branches advance round-robin, one step each:

* a step is :func:`~cryospin_lab.engine.steps.amortized_step` or
  :func:`~cryospin_lab.engine.steps.direct_step` (docs/method.md §4, §5);
* after the last batch of an epoch the branch reports
  (:mod:`~cryospin_lab.engine.epoch_report`), the switch rule decides
  (:mod:`~cryospin_lab.engine.switch_rule`) and a checkpoint is saved;
* the switch (Eq. 6) is one no-grad pass of the encoder over every image;
  each image keeps its lowest-loss candidate as its pose-table row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from cryospin_lab.analysis import metrics
from cryospin_lab.engine import steps
from cryospin_lab.engine.branch import Branch
from cryospin_lab.engine.commands import Command, CommandError
from cryospin_lab.engine.config import TrainingConfig, resolve_device
from cryospin_lab.engine.distributed import Comm, convert_batchnorm
from cryospin_lab.engine.epoch_report import EpochReporter
from cryospin_lab.engine.events import (
    CheckpointEvent,
    EpochEvent,
    Event,
    FinishedEvent,
    ForkEvent,
    LogEvent,
    Phase,
    PhaseChangeEvent,
    StepEvent,
    VolumeEvent,
)
from cryospin_lab.engine.feed import ParticleFeed
from cryospin_lab.engine.gold_standard import HALF_NAMES, GoldStandard, GoldStandardResult
from cryospin_lab.engine.rebuild import rebuild_due, rebuild_map
from cryospin_lab.engine.rescue import rescue_events
from cryospin_lab.engine.run_state import SavedRun, bytes_needed, read_run, run_payload
from cryospin_lab.engine.steps import NanGuard, StepContext
from cryospin_lab.engine.stuck import restart, restart_reason, structure_gain
from cryospin_lab.engine.switch_rule import pose_change, stall_message, switch_due
from cryospin_lab.io.checkpoint import check_output_dir, save_checkpoint, set_rng_state
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.physics.render import LossKind

__all__ = ["Trainer"]


class Trainer:
    """A cryoSPIN reconstruction of one particle stack, stepped by :meth:`events`.

    Args:
        stack: the particles (with true poses in its metadata when simulated).
        config: the run's :class:`TrainingConfig`.
        ground_truth_map: optional ``(D, D, D)`` real map (same box and pixel
            size as the stack) for FSC-vs-truth reports.
        out_dir: where checkpoints go (``out_dir/checkpoints``); None for none.
        comm: the ranks of a data-parallel run (default: one process).
    """

    def __init__(
        self,
        stack: ParticleStack,
        config: TrainingConfig,
        *,
        ground_truth_map: Tensor | None = None,
        out_dir: str | Path | None = None,
        comm: Comm | None = None,
    ):
        self.comm = comm if comm is not None else Comm()
        if self.comm.active and config.gold_standard:
            raise ValueError("gold-standard mode does not run on several ranks (run it in one process)")
        if config.encoder.box_size != stack.box_size:
            config = replace(config, encoder=replace(config.encoder, box_size=stack.box_size))
        self.config = config
        self.stack = stack
        self.device = resolve_device(config.device)
        self.box_size = stack.box_size
        self.pixel_size_angstrom = float(stack.pixel_size_angstrom)
        self.out_dir = None if out_dir is None else Path(out_dir)
        if ground_truth_map is not None and tuple(ground_truth_map.shape) != (self.box_size,) * 3:
            raise ValueError(
                f"ground_truth_map has shape {tuple(ground_truth_map.shape)}, "
                f"the particles' box is {self.box_size}"
            )
        self.ground_truth_map = ground_truth_map
        # Several ranks: each holds (or reads per batch) only its own images, never the whole stack.
        self.feed = ParticleFeed(stack, config, self.device, shard=(self.comm.rank, self.comm.world))
        self.true_rotations, self.true_shifts = self.feed.true_rotations, self.feed.true_shifts
        self.nan_guard = NanGuard(config.nan_guard)
        self.step_context = StepContext(
            feed=self.feed,
            comm=self.comm,
            config=config,
            loss_kind=LossKind(config.loss),
            pixel_size_angstrom=self.pixel_size_angstrom,
            guard=self.nan_guard,
        )
        n_tracked = min(config.n_tracked, len(stack))
        self.reporter = EpochReporter(
            self.step_context,
            true_rotations=self.true_rotations,
            true_shifts=self.true_shifts,
            ground_truth_map=ground_truth_map,
            tracked=torch.linspace(0, len(stack) - 1, n_tracked).round().long() if n_tracked else None,
        )
        self.gold_standard: GoldStandard | None = None
        if config.gold_standard:
            self.gold_standard = GoldStandard(self.pixel_size_angstrom)
            halves = [torch.from_numpy(half) for half in stack.half_split(config.seed)]
            self.branches: list[Branch] = [
                Branch(name, config, self.feed, self.device, subset=half, seed_offset=offset)
                for offset, (name, half) in enumerate(zip(HALF_NAMES, halves, strict=True))
            ]
        else:
            self.branches = [Branch("main", config, self.feed, self.device)]
        self.finished: list[Branch] = []
        self._t0 = time.perf_counter()
        self._elapsed_before_resume = 0.0
        self._last_volume_time = -math.inf
        self._fork_count = 0
        for branch in self.branches:
            convert_batchnorm(branch.encoder, self.comm)
        if self.out_dir is not None:
            check_output_dir(self.out_dir / "checkpoints", self.checkpoint_bytes_needed())

    def checkpoint_bytes_needed(self) -> int:
        """Disk space the run's checkpoints will take (``run_state.bytes_needed``)."""
        return bytes_needed(self.branches, len(self.stack), self.config)

    def _stamp(self, branch: Branch) -> dict:
        t = time.perf_counter() - self._t0
        return dict(step=branch.step, epoch=branch.epoch, phase=branch.phase, branch=branch.name, time_s=t)

    def events(self) -> Iterator[Event]:
        """Run to the end, yielding after each step (and epoch ends, switches, forks); ``config.threads``
        applies here, in the training thread (counts are per thread: decisions.md#one-omp-team)."""
        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
        self._t0 = time.perf_counter() - self._elapsed_before_resume
        epoch_start = {b.name: time.perf_counter() for b in self.branches}
        for branch in [b for b in self.branches if b.finished(self.config.n_epochs)]:
            self.branches.remove(branch)  # a resumed run that has nothing left to do
            self.finished.append(branch)
        while self.branches:
            for branch in list(self.branches):
                if branch.pending_switch is not None and branch.phase is Phase.AMORTIZED:
                    yield from self._switch(branch, branch.pending_switch)
                if branch.batch_iter is None:
                    branch.batch_iter = self.feed.epoch_batches(branch.epoch, branch.subset)
                    epoch_start[branch.name] = time.perf_counter()
                indices = next(branch.batch_iter, None)
                if indices is None:
                    branch.batch_iter = None
                    yield from self._end_epoch(branch, time.perf_counter() - epoch_start[branch.name])
                    if branch not in self.branches:  # forked while its epoch-end events were out
                        continue
                    if branch.finished(self.config.n_epochs):
                        self.branches.remove(branch)
                        self.finished.append(branch)
                        done = dict(previous=branch.phase, new=Phase.FINISHED, reason="finished")
                        yield PhaseChangeEvent(**done, **self._stamp(branch))
                    continue
                yield from self._step(branch, indices)
        last = self.finished[-1] if self.finished else None
        stamp = self._stamp(last) if last else {"step": 0, "epoch": 0, "time_s": 0.0}
        stamp["phase"] = Phase.FINISHED
        yield FinishedEvent(reason="completed", summary=self.summary(), **stamp)

    def _step(self, branch: Branch, indices: Tensor) -> Iterator[Event]:
        """One optimisation step of ``branch`` on the images ``indices``, and its event."""
        t_step = time.perf_counter()
        step = steps.amortized_step if branch.phase is Phase.AMORTIZED else steps.direct_step
        loss = step(self.step_context, branch, indices)
        if self.nan_guard.skipped:  # no update was applied
            self.nan_guard.skipped = False
            yield LogEvent(
                message=f"NaN guard: skipped a batch of {len(indices)} images with a non-finite loss or "
                f"gradient ({self.nan_guard.in_a_row[branch.name]} in a row, at most {self.nan_guard.limit})",
                **self._stamp(branch),
            )
            return
        if not math.isfinite(loss):  # a step that bypassed the guard
            raise FloatingPointError(
                f"loss became {loss} at step {branch.step} (epoch {branch.epoch}, branch {branch.name!r})"
            )
        self.nan_guard.passed(branch)
        branch.step += 1
        branch.epoch_loss_sum += loss * len(indices)
        branch.epoch_images += len(indices)
        yield StepEvent(
            loss=loss,
            images_per_s=len(indices) / max(time.perf_counter() - t_step, 1e-9),
            n_images=len(indices),
            **self._stamp(branch),
        )
        if time.perf_counter() - self._last_volume_time > self.config.volume_interval_s:
            self._last_volume_time = time.perf_counter()
            volume = branch.volume_real().numpy()
            yield VolumeEvent(
                volume=volume, voxel_size_angstrom=self.pixel_size_angstrom, **self._stamp(branch)
            )

    def _switch(self, branch: Branch, reason: str) -> Iterator[Event]:
        """Eq. 6: every image keeps its lowest-loss candidate; the encoder is replaced by a pose table."""
        disc = self.feed.disc(branch.schedule_epoch)
        n = len(self.stack)
        own_rows = branch.rows(torch.arange(n))
        # Sent before the pass (seconds for 10^4 images on a CPU) so that a waiting UI can say so.
        yield LogEvent(
            message=f"switching: choosing the best of {self.config.encoder.n_heads} candidates for "
            f"{len(own_rows)} images",
            **self._stamp(branch),
        )
        rotations, shifts = steps.best_candidates(
            self.step_context, branch, self.comm.local(own_rows), n, disc
        )
        previous = branch.phase
        branch.start_direct(rotations, shifts, self.config)
        yield PhaseChangeEvent(
            previous=previous,
            new=Phase.DIRECT,
            reason=reason,
            detail=f"after epoch {branch.epoch}",
            **self._stamp(branch),
        )

    def _end_epoch(self, branch: Branch, epoch_time_s: float) -> Iterator[Event]:
        """The epoch's report, the switch decision, the resets and the checkpoint, in that order."""
        cfg = self.config
        if self.comm.active:
            branch.merge_ranks(self.comm)
        branch.epoch += 1
        change_deg = pose_change(branch)  # for the switch rule and the EpochEvent
        amortized = branch.phase is Phase.AMORTIZED
        gain = structure_gain(self.step_context, branch) if amortized else math.nan
        mean_gap = branch.epoch_gap_sum / max(branch.epoch_images, 1)
        mean_loss = branch.epoch_loss_sum / max(branch.epoch_images, 1)
        # Decided before the epoch's events go out, so that a listener (UI, benchmark) seeing
        # EpochEvent already knows whether the branch will switch before its next step.
        if branch.phase is Phase.AMORTIZED:
            branch.gap_history.append(mean_gap)
            branch.loss_history.append(mean_loss)
            reason = self._switch_due(branch, change_deg)
            if reason is not None:  # also after the last epoch: a resumed, longer run switches as planned
                branch.pending_switch = reason
        stamp = self._stamp(branch)
        yield EpochEvent(
            structure_gain=gain,
            head_loss_gap=mean_gap if amortized else math.nan,
            median_pose_change_deg=change_deg if amortized or branch.pose_table is None else math.nan,
            mean_loss=mean_loss,
            head_win_counts=branch.head_wins.numpy().copy(),
            n_images_seen=branch.epoch_images,
            epoch_time_s=epoch_time_s,
            **stamp,
        )
        if amortized and branch.pending_switch is None and self.comm.is_main:
            stalled = stall_message(branch.loss_history, cfg)
            if stalled is not None:
                yield LogEvent(message=stalled, level="warning", **stamp)
        if rebuild_due(branch, cfg):  # the map from the poses, before the report and the re-search
            rebuild_map(self.step_context, branch)
        yield from self.reporter.events(branch, stamp)
        self._last_volume_time = time.perf_counter()
        if amortized and (why := restart_reason(branch, gain, cfg)) is not None:
            yield from restart(
                branch, why, stamp, self.step_context, self.device, self.gold_standard is not None
            )
        yield from rescue_events(self.step_context, branch, stamp, extend=self.gold_standard is None)
        if self.gold_standard is not None:
            halves = [self.branch(name) for name in HALF_NAMES]
            yield from self.gold_standard.epoch_events(*halves, self._stamp(halves[0]))
        branch.start_epoch()
        # Saved last, after the switch decision and the resets, so that a run resumed
        # from this file continues exactly as the uninterrupted one.
        if (
            cfg.checkpoint_every
            and self.out_dir is not None
            and self.comm.is_main  # merged above: rank 0 holds every row
            and branch.epoch % cfg.checkpoint_every == 0
        ):
            epoch = max(b.epoch for b in self.branches + self.finished)
            path = self.save_checkpoint(f"epoch_{epoch:04d}.pt")
            yield CheckpointEvent(path=path, **stamp)

    def _switch_due(self, branch: Branch, pose_change_deg: float | None = None) -> str | None:
        """The switch rule after an amortized epoch (:func:`~cryospin_lab.engine.switch_rule.switch_due`)."""
        if pose_change_deg is None:
            pose_change_deg = pose_change(branch)
        return switch_due(branch, self.config, pose_change_deg)

    # ------------------------------------------------------------------ commands
    def apply_command(self, command: Command, branch: str | None = None, **kwargs) -> list[Event]:
        """SWITCH_NOW (next step of ``branch``, default all amortized) or FORK (amortized branches)."""
        targets = [b for b in self.branches if branch is None or b.name == branch]
        if branch is not None and not targets:  # a typo from the UI: rejected, the run goes on
            raise CommandError(
                f"no running branch named {branch!r}; running: {[b.name for b in self.branches]}"
            )
        if command is Command.SWITCH_NOW:
            events = []
            for b in targets:
                if b.phase is Phase.AMORTIZED:
                    b.pending_switch = "manual"
                else:
                    events.append(
                        LogEvent(message=f"branch {b.name!r} is already {b.phase.value}", **self._stamp(b))
                    )
            return events
        if command is Command.FORK and self.comm.active:
            raise CommandError("a run on several ranks cannot fork (fork it in a one-process run)")
        if command is Command.FORK:
            if self.config.gold_standard:
                raise CommandError("fork is not available in gold-standard mode (two independent halves)")
            done = [b.name for b in targets if b.finished(self.config.n_epochs)]
            if done:
                raise CommandError(f"cannot fork branch(es) {done}: their last epoch is over")
            return [event for b in targets if b.phase is Phase.AMORTIZED for event in self._fork(b)]
        raise CommandError(f"Trainer.apply_command does not handle {command}")

    def _fork(self, parent: Branch) -> list[Event]:
        """Paper Fig. 4: from the same state, one child stays amortized, the other switches now."""
        self._fork_count += 1
        amortized, direct = parent.fork("" if self._fork_count == 1 else f"-{self._fork_count}")
        position = self.branches.index(parent)
        self.branches[position : position + 1] = [amortized, direct]
        return [ForkEvent(parent=parent.name, children=(amortized.name, direct.name), **self._stamp(parent))]

    # ------------------------------------------------------------------ results
    def summary(self) -> dict[str, float]:
        """Epochs done and pose error per branch (``branch/`` prefixed but for ``main``), wall time."""
        out = self.reporter.summary(self.finished + self.branches)
        out["wall_time_s"] = time.perf_counter() - self._t0
        return out

    def poses(self, name: str = "main") -> tuple[Tensor, Tensor | None]:
        """Current rotations ``(N, 3, 3)`` and shifts ``(N, 2)`` Å (None if not estimated) of a branch.

        Amortized: each image's best candidate when it was last seen in training;
        direct: the pose table.
        """
        branch = self.branch(name)
        shifts = branch.current_shifts()
        return branch.current_rotations().clone(), None if shifts is None else shifts.clone()

    def volume_real(self, name: str = "main") -> Tensor:
        """The branch's current real-space map ``(D, D, D)`` (float32, CPU), voxel size = pixel size."""
        return self.branch(name).volume_real()

    def branch(self, name: str = "main") -> Branch:
        for b in self.branches + self.finished:
            if b.name == name:
                return b
        raise KeyError(f"no branch named {name!r}")

    def half_maps(self) -> tuple[Tensor, Tensor, metrics.MapAlignment, metrics.FSCCurve]:
        """Gold standard: half 1's map, half 2's aligned onto it, the alignment, their FSC."""
        return self._gold_standard().half_maps(*[self.branch(name) for name in HALF_NAMES])

    def gold_standard_result(self) -> GoldStandardResult:
        """Gold standard: both halves' maps in half 1's frame, their mean and every particle's pose."""
        halves = [self.branch(name) for name in HALF_NAMES]
        return self._gold_standard().result(
            *halves, len(self.stack), estimate_shifts=self.config.encoder.estimate_shifts
        )

    def _gold_standard(self) -> GoldStandard:
        if self.gold_standard is None:
            raise RuntimeError("half_maps() needs a gold-standard run (TrainingConfig.gold_standard=True)")
        return self.gold_standard

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, name: str = "interrupted.pt") -> str | None:
        """The run's state (:func:`~cryospin_lab.engine.run_state.run_payload`) to
        ``out_dir/checkpoints/NAME``, atomically; its path, None without ``out_dir``.

        Epoch ends save ``epoch_XXXX.pt``; the runner calls this without a name
        after a failure, so the failing state goes to ``interrupted.pt`` and never
        replaces the last good epoch (which ``latest_checkpoint`` resumes from).
        """
        if self.out_dir is None:
            return None
        path = self.out_dir / "checkpoints" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        elapsed_s = time.perf_counter() - self._t0
        save_checkpoint(
            path, run_payload(self.config, self.branches, self.finished, elapsed_s, self._fork_count)
        )
        return str(path)

    @classmethod
    def resume(
        cls,
        stack: ParticleStack,
        checkpoint: str | Path,
        *,
        ground_truth_map: Tensor | None = None,
        out_dir: str | Path | None = None,
        n_epochs: int | None = None,
        device: str | None = None,
        comm: Comm | None = None,
    ) -> Trainer:
        """A trainer restored from a checkpoint: it continues exactly where the checkpoint left off.

        ``n_epochs`` and ``device`` may differ from the checkpoint's config (run
        longer, move to another device); everything else is the checkpoint's.
        """
        saved = read_run(checkpoint)
        overrides = {k: v for k, v in (("n_epochs", n_epochs), ("device", device)) if v is not None}
        config = replace(saved.config, **overrides)
        trainer = cls(stack, config, ground_truth_map=ground_truth_map, out_dir=out_dir, comm=comm)
        trainer.restore(saved)
        return trainer

    def restore(self, saved: SavedRun) -> None:
        """Take the branches, RNG state, time and forks of a :class:`~cryospin_lab.engine.run_state.SavedRun`
        (:func:`~cryospin_lab.engine.run_state.read_run`); this trainer's settings stay."""
        running = [Branch.from_state(s, self.config, self.feed, self.device) for s in saved.branches]
        finished = [Branch.from_state(s, self.config, self.feed, self.device) for s in saved.finished]
        # With a larger n_epochs than the checkpoint's run, finished branches go on.
        self.branches = running + [b for b in finished if not b.finished(self.config.n_epochs)]
        self.finished = [b for b in finished if b.finished(self.config.n_epochs)]
        for branch in self.branches:
            if branch.encoder is not None:
                convert_batchnorm(branch.encoder, self.comm)
        self._fork_count = saved.fork_count
        if self.gold_standard is not None:  # the half-map FSC of the epochs both halves finished went out
            self.gold_standard.reported_epoch = min(self.branch(name).epoch for name in HALF_NAMES)
        self._elapsed_before_resume = saved.elapsed_s
        set_rng_state(saved.rng)
