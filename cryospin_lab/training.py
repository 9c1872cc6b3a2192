"""The cryoSPIN run: amortized stage, switch, direct stage, as a generator of events.

:class:`Trainer` implements the runner's ``Steppable`` protocol: ``events()`` is
a generator that yields after every optimisation step, so a test can drive it
synchronously and :class:`~cryospin_lab.runner.Runner` can put it on a thread;
``apply_command`` is called only between two steps.

A run holds one or more :class:`Branch` es (one, until ``fork``). A branch is a
whole reconstruction state: volume, encoder (amortized) or pose table
(direct), optimisers, phase. Branches advance round-robin, one step each.

Per step (METHOD.md sections 4 and 5): :mod:`cryospin_lab._steps` (amortized
winner-takes-all, direct coordinate descent, the NaN guard).

The switch (Eq. 6) is one no-grad pass of the encoder over every image; each
image keeps its lowest-loss candidate as the base of its pose-table row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from cryospin_lab import gold_standard, metrics
from cryospin_lab._epoch_report import assignment_event, resolution_event
from cryospin_lab._steps import StepsMixin
from cryospin_lab._switch_rule import pose_change, stall_message, switch_due
from cryospin_lab.branch import Branch
from cryospin_lab.checkpoint import (
    check_output_dir,
    config_from_dict,
    config_to_dict,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    tensor_bytes,
)
from cryospin_lab.config import TrainingConfig
from cryospin_lab.data import ParticleStack
from cryospin_lab.distributed import Comm, convert_batchnorm
from cryospin_lab.events import (
    CheckpointEvent,
    EpochEvent,
    Event,
    FinishedEvent,
    ForkEvent,
    LogEvent,
    Phase,
    PhaseChangeEvent,
    PoseCandidatesEvent,
    PoseErrorEvent,
    StepEvent,
    VolumeEvent,
)
from cryospin_lab.feed import ParticleFeed
from cryospin_lab.pose_table import PoseTable
from cryospin_lab.projection import FourierDisc
from cryospin_lab.render import LossKind
from cryospin_lab.runner import Command, CommandError

__all__ = ["Branch", "Trainer", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch.cuda.is_available() is False")
    return torch.device(name)


class Trainer(StepsMixin):
    """A cryoSPIN reconstruction of one particle stack, stepped by :meth:`events`.

    Args:
        stack: the particles (with true poses in its metadata when simulated).
        config: the run's :class:`TrainingConfig`.
        ground_truth_map: optional ``(D, D, D)`` real map (same box and pixel
            size as the stack) for FSC-vs-truth reports.
        out_dir: where checkpoints go (``out_dir/checkpoints``); None for none.
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
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.box_size = stack.box_size
        self.pixel_size_angstrom = float(stack.pixel_size_angstrom)
        self.loss_kind = LossKind(config.loss)
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
        n_tracked = min(config.n_tracked, len(stack))
        self.tracked = torch.linspace(0, len(stack) - 1, n_tracked).round().long() if n_tracked else None
        if config.gold_standard:
            half_a, half_b = stack.half_split(config.seed)
            self.branches: list[Branch] = [
                Branch("half1", config, self.feed, self.device, subset=torch.from_numpy(half_a)),
                Branch(
                    "half2", config, self.feed, self.device, subset=torch.from_numpy(half_b), seed_offset=1
                ),
            ]
        else:
            self.branches = [Branch("main", config, self.feed, self.device)]
        self._half_map_epoch = 0  # last epoch whose half-map FSC was reported
        self.finished: list[Branch] = []
        self._t0 = time.perf_counter()
        self._last_volume_time = -math.inf
        self._fork_count = 0
        self._bad_in_a_row: dict[str, int] = {}  # NaN guard: consecutive skipped batches per branch
        self._skipped_batch = False  # the last step was skipped by the NaN guard
        for branch in self.branches:
            convert_batchnorm(branch.encoder, self.comm)
        if self.out_dir is not None:
            check_output_dir(self.out_dir / "checkpoints", self.checkpoint_bytes_needed())

    def checkpoint_bytes_needed(self) -> int:
        """Disk space the run's checkpoints will take, estimated before it starts: one per saved epoch
        plus the one being written (each: the parameters with their two Adam moments, and the pose
        table after the switch), plus the failure checkpoint."""
        per_branch = 3 * sum(tensor_bytes(b.state_dict()) for b in self.branches)
        per_branch += len(self.stack) * 4 * 24 * len(self.branches)  # pose table rows and their moments
        every = self.config.checkpoint_every
        n_saved = self.config.n_epochs // every if every else 0
        return (n_saved + 2) * per_branch

    # ------------------------------------------------------------------ data
    def _batch(self, indices: Tensor, disc: FourierDisc) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.feed.batch(indices, disc)

    def _disc(self, epoch: int) -> FourierDisc:
        return self.feed.disc(epoch)

    def _batches(self, branch: Branch) -> Iterator[Tensor]:
        return self.feed.epoch_batches(branch.epoch, branch.subset)

    def _stamp(self, branch: Branch) -> dict:
        return {
            "step": branch.step,
            "epoch": branch.epoch,
            "phase": branch.phase,
            "branch": branch.name,
            "time_s": time.perf_counter() - self._t0,
        }

    def _switch(self, branch: Branch, reason: str) -> Iterator[Event]:
        """Eq. 6: every image keeps its lowest-loss candidate; the encoder is replaced by a pose table."""
        disc = self._disc(branch.epoch)
        n = len(self.stack)
        own_rows = branch.rows(torch.arange(n))
        # Sent before the pass (seconds for 10^4 images on a CPU) so that a waiting UI can say so.
        yield LogEvent(
            message=f"switching: choosing the best of {self.config.encoder.n_heads} candidates for "
            f"{len(own_rows)} images",
            **self._stamp(branch),
        )
        own_rows = self.comm.local(own_rows)  # each rank its own images (the rows it will update)
        # Rows outside a gold-standard half keep the identity; they are never trained or reported.
        rotations = torch.eye(3, device=self.device).repeat(n, 1, 1)
        shifts = torch.zeros(n, 2, device=self.device)
        chunk = max(self.config.batch_size, 256)
        for start in range(0, len(own_rows), chunk):
            idx = own_rows[start : start + chunk]
            cand_rot, cand_shift, losses = self._candidates(branch, idx, disc)
            best = losses.argmin(dim=1)
            rows = torch.arange(len(idx), device=best.device)
            rotations[idx] = cand_rot[rows, best].float()
            if cand_shift is not None:
                shifts[idx] = cand_shift[rows, best].float()
        cfg = self.config
        branch.pose_table = PoseTable(
            rotations,
            shifts,
            lr=cfg.pose_lr,
            betas=cfg.pose_betas,
            shift_lr_angstrom=cfg.shift_lr_angstrom,
            estimate_shifts=cfg.encoder.estimate_shifts,
        )
        previous = branch.phase
        branch.phase = Phase.DIRECT
        branch.encoder, branch.encoder_opt = None, None  # dropped: poses are free parameters now
        for group in branch.decoder_opt.param_groups:
            group["lr"] = cfg.decoder_lr_direct
        branch.pending_switch = None
        yield PhaseChangeEvent(
            previous=previous,
            new=Phase.DIRECT,
            reason=reason,
            detail=f"after epoch {branch.epoch}",
            **self._stamp(branch),
        )

    # ------------------------------------------------------------------ epoch end
    def _current_rotations(self, branch: Branch) -> Tensor:
        if branch.pose_table is not None:
            return branch.pose_table.rotations.cpu()
        return branch.best_rotations

    def _end_epoch(self, branch: Branch, epoch_time_s: float) -> Iterator[Event]:
        cfg = self.config
        if self.comm.active:
            branch.merge_ranks(self.comm)
        branch.epoch += 1
        change_deg = pose_change(branch)  # for the switch rule and the EpochEvent
        # Decided before the epoch's events go out, so that a listener (UI, benchmark) seeing
        # EpochEvent already knows whether the branch will switch before its next step.
        if branch.phase is Phase.AMORTIZED:
            branch.gap_history.append(branch.epoch_gap_sum / max(branch.epoch_images, 1))
            branch.loss_history.append(branch.epoch_loss_sum / max(branch.epoch_images, 1))
            reason = self._switch_due(branch, change_deg)
            if reason is not None:  # also after the last epoch: a resumed, longer run switches as planned
                branch.pending_switch = reason
        stamp = self._stamp(branch)
        mean_loss = branch.epoch_loss_sum / max(branch.epoch_images, 1)
        if branch.phase is Phase.DIRECT and branch.pose_table is not None:
            change_deg = float("nan")
        yield EpochEvent(
            head_loss_gap=branch.epoch_gap_sum / max(branch.epoch_images, 1)
            if branch.phase is Phase.AMORTIZED
            else float("nan"),
            median_pose_change_deg=change_deg,
            mean_loss=mean_loss,
            head_win_counts=branch.head_wins.numpy().copy(),
            n_images_seen=branch.epoch_images,
            epoch_time_s=epoch_time_s,
            **stamp,
        )
        if branch.phase is Phase.AMORTIZED and branch.pending_switch is None and self.comm.is_main:
            stalled = stall_message(branch.loss_history, cfg)
            if stalled is not None:
                yield LogEvent(message=stalled, level="warning", **stamp)
        rotations = self._current_rotations(branch)
        pose = None
        if self.true_rotations is not None and self.comm.is_main:
            pose = metrics.pose_error(branch.rows(self.true_rotations), branch.rows(rotations))
            shift_err = None
            if cfg.encoder.estimate_shifts and self.true_shifts is not None and branch.pose_table is not None:
                shift_err = metrics.shift_error_angstrom(
                    branch.rows(self.true_shifts), branch.rows(branch.pose_table.shifts_angstrom.cpu())
                ).mean_angstrom
            yield PoseErrorEvent(
                mean_deg=pose.mean_deg,
                median_deg=pose.median_deg,
                flipped=pose.flipped,
                shift_error_angstrom=shift_err,
                global_rotation=pose.global_rotation.numpy(),
                **stamp,
            )
        volume_real = branch.volume.to_real().detach().float().cpu()
        if self.comm.is_main:  # the metrics (FSC alignment: seconds) once, on rank 0
            if self.ground_truth_map is not None:
                yield resolution_event(
                    volume_real, self.ground_truth_map, self.pixel_size_angstrom, pose, stamp
                )
            if self.tracked is not None and branch.encoder is not None:
                yield self._candidates_event(branch, stamp)
            if branch.phase is Phase.AMORTIZED:
                yield assignment_event(branch, self.true_rotations, pose, stamp)
            yield VolumeEvent(
                volume=volume_real.numpy(), voxel_size_angstrom=self.pixel_size_angstrom, **stamp
            )
        self._last_volume_time = time.perf_counter()
        if cfg.gold_standard:
            yield from self._half_map_event()
        branch.previous_best = branch.best_rotations.clone()
        branch.head_wins.zero_()
        branch.epoch_loss_sum, branch.epoch_images, branch.epoch_gap_sum = 0.0, 0, 0.0
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

    def _half_map_event(self) -> Iterator[Event]:
        yield from gold_standard.half_map_events(self)

    def half_maps(self) -> tuple[Tensor, Tensor, metrics.MapAlignment, metrics.FSCCurve]:
        """Gold standard: half 1's map, half 2's aligned onto it, the alignment, their FSC."""
        return gold_standard.half_maps(self)

    def gold_standard_result(self) -> gold_standard.GoldStandardResult:
        """Gold standard: both halves' maps in half 1's frame, their mean and every particle's pose."""
        return gold_standard.gold_standard_result(self)

    def _switch_due(self, branch: Branch, pose_change_deg: float | None = None) -> str | None:
        """The switch rule after an amortized epoch (:func:`~cryospin_lab._switch_rule.switch_due`)."""
        if pose_change_deg is None:
            pose_change_deg = pose_change(branch)
        return switch_due(branch, self.config, pose_change_deg)

    def _candidates_event(self, branch: Branch, stamp: dict) -> PoseCandidatesEvent:
        rotations, _, losses = self._candidates(branch, self.tracked, self._disc(branch.epoch))
        truth = None if self.true_rotations is None else self.true_rotations[self.tracked].numpy()
        return PoseCandidatesEvent(
            indices=self.tracked.numpy(),
            rotations=rotations.cpu().numpy(),
            losses=losses.cpu().numpy(),
            true_rotations=truth,
            **stamp,
        )

    # ------------------------------------------------------------------ protocol
    def events(self) -> Iterator[Event]:
        """Run to the end, yielding after each step (and at epoch ends, switches, forks)."""
        self._t0 = time.perf_counter() - getattr(self, "_elapsed_before_resume", 0.0)
        epoch_start = {b.name: time.perf_counter() for b in self.branches}
        for branch in [b for b in self.branches if b.epoch >= self.config.n_epochs]:
            self.branches.remove(branch)  # a resumed run that has nothing left to do
            self.finished.append(branch)
        while self.branches:
            for branch in list(self.branches):
                if branch.pending_switch is not None and branch.phase is Phase.AMORTIZED:
                    yield from self._switch(branch, branch.pending_switch)
                if branch.batch_iter is None:
                    branch.batch_iter = self._batches(branch)
                    epoch_start[branch.name] = time.perf_counter()
                indices = next(branch.batch_iter, None)
                if indices is None:
                    branch.batch_iter = None
                    yield from self._end_epoch(branch, time.perf_counter() - epoch_start[branch.name])
                    if branch not in self.branches:  # forked while its epoch-end events were out
                        continue
                    if branch.epoch >= self.config.n_epochs:
                        self.branches.remove(branch)
                        self.finished.append(branch)
                        yield PhaseChangeEvent(
                            previous=branch.phase,
                            new=Phase.FINISHED,
                            reason="finished",
                            **self._stamp(branch),
                        )
                    continue
                t_step = time.perf_counter()
                if branch.phase is Phase.AMORTIZED:
                    loss = self._amortized_step(branch, indices)
                else:
                    loss = self._direct_step(branch, indices)
                if self._skipped_batch:  # by the NaN guard (see _finite): no update was applied
                    self._skipped_batch = False
                    count = self._bad_in_a_row[branch.name]
                    yield LogEvent(
                        message=f"NaN guard: skipped a batch of {len(indices)} images with a non-finite "
                        f"loss or gradient ({count} in a row, at most {self.config.nan_guard})",
                        **self._stamp(branch),
                    )
                    continue
                if not math.isfinite(loss):  # a step that bypassed _finite
                    raise FloatingPointError(
                        f"loss became {loss} at step {branch.step} "
                        f"(epoch {branch.epoch}, branch {branch.name!r})"
                    )
                self._bad_in_a_row[branch.name] = 0
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
                    with torch.no_grad():
                        volume = branch.volume.to_real().float().cpu().numpy()
                    yield VolumeEvent(
                        volume=volume, voxel_size_angstrom=self.pixel_size_angstrom, **self._stamp(branch)
                    )
        last = self.finished[-1] if self.finished else None
        stamp = self._stamp(last) if last else {"step": 0, "epoch": 0, "time_s": 0.0}
        stamp["phase"] = Phase.FINISHED
        yield FinishedEvent(reason="completed", summary=self.summary(), **stamp)

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
            done = [b.name for b in targets if b.epoch >= self.config.n_epochs]
            if done:
                raise CommandError(f"cannot fork branch(es) {done}: their last epoch is over")
            return [event for b in targets if b.phase is Phase.AMORTIZED for event in self._fork(b)]
        raise CommandError(f"Trainer.apply_command does not handle {command}")

    def _fork(self, parent: Branch) -> list[Event]:
        """Paper Fig. 4: from the same state, one child stays amortized, the other switches now."""
        self._fork_count += 1
        suffix = "" if self._fork_count == 1 else f"-{self._fork_count}"
        amortized = parent.copy(f"amortized{suffix}")
        direct = parent.copy(f"direct{suffix}")
        amortized.switch_rule = "never"
        amortized.pending_switch = None
        direct.pending_switch = "manual"
        position = self.branches.index(parent)
        self.branches[position : position + 1] = [amortized, direct]
        return [ForkEvent(parent=parent.name, children=(amortized.name, direct.name), **self._stamp(parent))]

    # ------------------------------------------------------------------ results
    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for branch in self.finished + self.branches:
            prefix = "" if branch.name == "main" else f"{branch.name}/"
            out[f"{prefix}epochs"] = float(branch.epoch)
            if self.true_rotations is not None:
                pose = metrics.pose_error(
                    branch.rows(self.true_rotations), branch.rows(self._current_rotations(branch))
                )
                out[f"{prefix}pose_error_mean_deg"] = pose.mean_deg
                out[f"{prefix}pose_error_median_deg"] = pose.median_deg
        out["wall_time_s"] = time.perf_counter() - self._t0
        return out

    def poses(self, name: str = "main") -> tuple[Tensor, Tensor | None]:
        """Current rotations ``(N, 3, 3)`` and shifts ``(N, 2)`` Å (None if not estimated) of a branch.

        Amortized: each image's best candidate when it was last seen in training;
        direct: the pose table.
        """
        branch = self.branch(name)
        rotations = self._current_rotations(branch).clone()
        shifts = None
        if branch.pose_table is not None and self.config.encoder.estimate_shifts:
            shifts = branch.pose_table.shifts_angstrom.cpu().clone()
        return rotations, shifts

    @torch.no_grad()
    def volume_real(self, name: str = "main") -> Tensor:
        """The branch's current real-space map ``(D, D, D)`` (float32, CPU), voxel size = pixel size."""
        return self.branch(name).volume.to_real().float().cpu()

    def branch(self, name: str = "main") -> Branch:
        for b in self.branches + self.finished:
            if b.name == name:
                return b
        raise KeyError(f"no branch named {name!r}")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, name: str = "interrupted.pt") -> str | None:
        """All branches, config and RNG state to ``out_dir/checkpoints/NAME`` (atomic).

        Epoch ends save ``epoch_XXXX.pt``; the runner calls this without a name
        after a failure, so the failing state goes to ``interrupted.pt`` and never
        replaces the last good epoch (which ``latest_checkpoint`` resumes from).
        """
        if self.out_dir is None:
            return None
        path = self.out_dir / "checkpoints" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": config_to_dict(self.config),
            "branches": [b.state_dict() for b in self.branches],
            "finished": [b.state_dict() for b in self.finished],
            "rng": rng_state(),
            "elapsed_s": time.perf_counter() - self._t0,
            "fork_count": self._fork_count,
        }
        save_checkpoint(path, payload)
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
        payload = load_checkpoint(checkpoint)
        config = config_from_dict(TrainingConfig, payload["config"])
        overrides = {k: v for k, v in (("n_epochs", n_epochs), ("device", device)) if v is not None}
        config = replace(config, **overrides)
        trainer = cls(stack, config, ground_truth_map=ground_truth_map, out_dir=out_dir, comm=comm)
        trainer.load_state(checkpoint)
        return trainer

    def load_state(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (``weights_only=True``)."""
        payload = load_checkpoint(path)
        self.branches = [
            Branch.from_state(s, self.config, self.feed, self.device) for s in payload["branches"]
        ]
        self.finished = [
            Branch.from_state(s, self.config, self.feed, self.device) for s in payload["finished"]
        ]
        # With a larger n_epochs than the checkpoint's run, finished branches go on.
        self.branches += [b for b in self.finished if b.epoch < self.config.n_epochs]
        self.finished = [b for b in self.finished if b.epoch >= self.config.n_epochs]
        for branch in self.branches:
            if branch.encoder is not None:
                convert_batchnorm(branch.encoder, self.comm)
        self._fork_count = int(payload["fork_count"])
        halves = [b.epoch for b in self.branches + self.finished if b.name in ("half1", "half2")]
        self._half_map_epoch = min(halves) if len(halves) == 2 else 0  # reported before the checkpoint
        self._elapsed_before_resume = float(payload["elapsed_s"])
        set_rng_state(payload["rng"])
