"""The ``cryospin-lab reconstruct`` command: load the particles, run a :class:`Trainer`, write results.

The trainer's event generator is driven synchronously on the calling thread (no
:class:`~cryospin_lab.app.runner.Runner`: the command sends no commands). Ctrl-C
arrives as a ``KeyboardInterrupt`` inside the step; the state then goes to
``DIR/checkpoints/interrupted.pt`` and the current map and poses are written.
Events become one :class:`~cryospin_lab.app.epoch_records.EpochRecord` per branch and
epoch, printed as one line and written by :class:`~cryospin_lab.app.results.ResultWriter`
(the files are listed in :mod:`cryospin_lab.app.results`).

Inputs are checked before training starts; a bad one raises ValueError or
FileNotFoundError naming the file and the problem (the CLI prints it as one
line). ``--box`` Fourier-downsamples the images on load, and a ground-truth map
on the original grid is cropped the same way (``fourier.fourier_crop``); any
other mismatch of box or voxel size is an error, never a silent resample.
``--resume`` continues from the highest ``DIR/checkpoints/epoch_XXXX.pt`` with
the checkpoint's settings (only ``--epochs`` and ``--device`` may change).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
from tqdm import tqdm  # the terminal bar (tqdm.auto would pick the notebook one under IPython)

from cryospin_lab.app.epoch_records import EpochCollector, FinishedEpoch
from cryospin_lab.app.event_file import EventLogWriter
from cryospin_lab.app.report import write_report
from cryospin_lab.app.results import ResultWriter
from cryospin_lab.engine.config import (
    SETTINGS,
    TrainingConfig,
    apply_settings,
    check_resume,
    parse_switch_rule,
    resolve_device,
)
from cryospin_lab.engine.distributed import Comm, init_from_env
from cryospin_lab.engine.events import (
    EpochEvent,
    Event,
    ForkEvent,
    LogEvent,
    Phase,
    PhaseChangeEvent,
    StepEvent,
)
from cryospin_lab.engine.run_state import read_run
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.checkpoint import latest_checkpoint
from cryospin_lab.io.maps import load_ground_truth
from cryospin_lab.io.particles import ParticleStack

__all__ = ["ReconstructSettings", "run_reconstruction", "run_settings", "settings_from_args"]


@dataclass(frozen=True)
class ReconstructSettings:
    """What ``cryospin-lab reconstruct`` was asked to do.

    ``run`` holds the run settings that were given (``engine.config.SETTINGS``
    names): the others take their default in a new run and the checkpoint's
    value with ``resume`` (``engine.config.check_resume``: a setting a resumed
    run keeps must equal the checkpoint's if given again).
    """

    particles_path: Path  # STAR (or .cs / .mrcs) file
    out_dir: Path
    run: dict[str, Any] = field(default_factory=dict)  # run settings given, by name
    box_size: int | None = None  # Fourier-downsample the images to this box on load
    ground_truth_path: Path | None = None
    resume: bool = False
    stack_dir: Path | None = None  # look image stacks up here by file name
    progress: bool = True  # tqdm bar per epoch (the per-epoch lines are printed anyway)
    replace_checkpoints: bool = False  # delete old epoch checkpoints in out_dir first (the demo's rerun)
    distributed: bool = False  # one rank of a torchrun job (also when WORLD_SIZE > 1)


def _prepare(settings: ReconstructSettings, comm: Comm | None = None) -> tuple[Trainer, Path | None]:
    """The trainer (new or restored) and the checkpoint it was restored from."""
    comm = comm if comm is not None else Comm()
    particles = Path(settings.particles_path)
    if not particles.is_file():
        raise FileNotFoundError(f"particle file not found: {particles}")
    if settings.ground_truth_path is not None and not Path(settings.ground_truth_path).is_file():
        raise FileNotFoundError(f"--ground-truth map not found: {settings.ground_truth_path}")
    device = settings.run.get("device", SETTINGS["device"].default)
    try:
        resolve_device(device)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"--device {device}: {err}") from None
    if settings.stack_dir is not None and not Path(settings.stack_dir).is_dir():
        raise FileNotFoundError(f"--stack-dir folder not found: {settings.stack_dir}")
    out_dir = Path(settings.out_dir)
    checkpoints = out_dir / "checkpoints"
    latest = latest_checkpoint(checkpoints)
    config, saved = None, None
    if settings.resume:
        if latest is None:
            raise FileNotFoundError(f"--resume: no checkpoint epoch_XXXX.pt in {checkpoints}")
        saved = read_run(latest)
        stored_box = saved.config.encoder.box_size
        if settings.box_size is not None and settings.box_size != stored_box:
            raise ValueError(
                f"{latest}: --box {settings.box_size} differs from the checkpoint's {stored_box}; a resumed "
                "run keeps its settings"
            )
        config = check_resume(saved.config, settings.run, latest)
    elif latest is not None and not settings.replace_checkpoints:
        raise ValueError(
            f"{checkpoints} already holds a run (up to {latest.name}); pass --resume to continue it "
            "or choose another --out"
        )
    box = settings.box_size if config is None else config.encoder.box_size
    stack = ParticleStack(particles, mrcs_path_map=settings.stack_dir, box_size=box)
    if config is None:
        config = apply_settings(
            TrainingConfig(),
            settings.run,
            box_size=stack.box_size,
            pixel_size_angstrom=stack.pixel_size_angstrom,
        )
        rule = parse_switch_rule(config.switch)
        if isinstance(rule, int) and rule >= config.n_epochs:
            warnings.warn(
                f"--switch {rule} is not before --epochs {config.n_epochs}: the run stays amortized",
                stacklevel=2,
            )
        elif rule == "auto" and 0 < config.n_epochs <= config.auto_max_epochs:
            warnings.warn(
                f"--switch auto with --epochs {config.n_epochs}: its latest switch (after epoch "
                f"{config.auto_max_epochs}) is not before the end, so the run switches only if the head "
                "loss gap rises first; pass --switch EPOCH to be sure of a direct stage",
                stacklevel=2,
            )
    ground_truth = None
    if settings.ground_truth_path is not None:
        ground_truth = load_ground_truth(Path(settings.ground_truth_path), stack)
    try:
        trainer = Trainer(stack, config, ground_truth_map=ground_truth, out_dir=out_dir, comm=comm)
    except ValueError as err:  # e.g. a box too small for the encoder's poolings
        raise ValueError(
            f"{particles} (box {stack.box_size}, --preset {config.encoder.preset}): {err}"
        ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    comm.barrier()  # every rank has read the checkpoint before rank 0 may delete it below
    if latest is not None and not settings.resume and comm.is_main:  # replace_checkpoints: start over
        for old in checkpoints.glob("epoch_*.pt"):
            old.unlink()
        (checkpoints / "interrupted.pt").unlink(missing_ok=True)
    if settings.resume:
        trainer.restore(saved)  # branches finished at a smaller --epochs go on
        return trainer, latest
    return trainer, None


# ----------------------------------------------------------------------------- the run


class _Progress:
    """A tqdm bar per epoch (all running branches together), updated from step events."""

    def __init__(self, trainer: Trainer, enabled: bool):
        self.trainer = trainer
        self.enabled = enabled
        self.steps_per_epoch = math.ceil(len(trainer.stack) / trainer.config.batch_size)
        self.bar = None
        self.expected_ends = 0
        self.rate: float | None = None  # images/s, smoothed
        self.last_time_s: float | None = None

    def update(self, event: Event) -> None:
        if isinstance(event, StepEvent):
            if self.bar is None:
                n_branches = max(1, len(self.trainer.branches))
                self.expected_ends = n_branches
                self.bar = tqdm(
                    total=self.steps_per_epoch * n_branches,
                    desc=f"epoch {event.epoch + 1}/{_last_epoch(self.trainer)}",
                    unit="step",
                    disable=not self.enabled,
                    leave=False,
                    dynamic_ncols=True,
                )
            # Wall-clock throughput between two steps (the event's images_per_s times the step
            # alone, without epoch-end reports and snapshots), smoothed over ~5 steps.
            elapsed = None if self.last_time_s is None else event.time_s - self.last_time_s
            r = event.images_per_s if not elapsed or elapsed <= 0 else event.n_images / elapsed
            self.rate = r if self.rate is None else 0.8 * self.rate + 0.2 * r
            self.last_time_s = event.time_s
            self.bar.set_postfix_str(
                f"{event.phase.value}, loss {event.loss:.4g}, {self.rate:.0f} img/s", refresh=False
            )
            self.bar.update(1)
        elif isinstance(event, EpochEvent) and self.bar is not None:
            self.expected_ends -= 1
            if self.expected_ends <= 0:
                self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stdout)


def _event_message(event: Event) -> str | None:
    if isinstance(event, PhaseChangeEvent) and event.new is Phase.DIRECT:
        why = {"epoch": "--switch EPOCH", "auto": "auto criterion", "manual": "by hand"}.get(event.reason)
        detail = f": {event.detail}" if event.detail and not event.detail.startswith("after epoch") else ""
        where = "" if event.branch == "main" else f" [{event.branch}]"
        return f"switch{where} to direct pose optimisation after epoch {event.epoch} ({why}{detail})"
    if isinstance(event, ForkEvent):
        return f"fork: {event.parent} -> {', '.join(event.children)}"
    if isinstance(event, LogEvent):
        if event.level != "warning":
            return event.message
        where = "" if event.branch == "main" else f" [{event.branch}]"
        # printed before the epoch's own line, which waits for the epoch's last event
        return f"warning{where} after epoch {event.epoch}: {event.message}"
    return None


def run_reconstruction(settings: ReconstructSettings) -> int:
    """Run (or resume) a reconstruction, writing results as it goes; the exit status.

    Ctrl-C saves ``checkpoints/interrupted.pt`` and the current map and poses,
    prints one line on stderr and returns 130. Bad input raises ValueError /
    FileNotFoundError naming the file and the problem.
    """
    comm = init_from_env() if settings.distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1 else Comm()
    try:
        trainer, resumed_from = _prepare(settings, comm)
        if not comm.is_main:  # rank 0 prints and writes the results; the others train
            for _ in _events(trainer):
                pass
            status = 0
        else:
            status = _run_main(settings, trainer, resumed_from)
        if status == 0:
            # All ranks tear gloo down together: a rank that left while rank 0 still wrote results
            # could abort in the process group's teardown ("terminate called without an active
            # exception"). Not after Ctrl-C or an error, when the others may be gone.
            comm.barrier()
        return status
    finally:
        if comm.active and dist.is_initialized():
            dist.destroy_process_group()


def _run_main(settings: ReconstructSettings, trainer: Trainer, resumed_from: Path | None) -> int:
    out_dir = Path(settings.out_dir)
    names = [b.name for b in trainer.branches + trainer.finished]
    writer = ResultWriter(trainer, out_dir, names)
    n_epochs = trainer.config.n_epochs
    epochs_done = {b.name: b.epoch for b in trainer.branches + trainer.finished}
    _say(_run_header(trainer, settings, resumed_from))
    if resumed_from is not None:
        writer.keep_rows_until(epochs_done)
        if all(b.finished(n_epochs) for b in trainer.branches + trainer.finished):
            _say(
                f"{resumed_from.name} is at epoch {max(epochs_done.values())} >= --epochs {n_epochs}: "
                "nothing to run"
            )
            _report(writer.write_final(), writer)
            return 0
    collector = EpochCollector()
    progress = _Progress(trainer, settings.progress)
    # For watching from another process (cryospin_lab.widgets.watch): a resumed run appends.
    log = EventLogWriter(out_dir / "events.jsonl", append=resumed_from is not None)
    phases = []  # for report.html: the switch and any restart (of this process's part of the run)
    try:
        for event in _events(trainer):
            log.write(event)
            if isinstance(event, PhaseChangeEvent):
                phases.append(event)
            if isinstance(event, ForkEvent):
                writer.add_branches(event.children)
            for done in collector.feed(event):  # before the bar: an epoch's line precedes the next bar
                _epoch_done(done, writer, _last_epoch(trainer))
            progress.update(event)
            message = _event_message(event)
            if message is not None:
                _say(message)
    except KeyboardInterrupt:
        progress.close()
        return _interrupted(trainer, writer, collector)
    finally:
        log.close()
    progress.close()
    for done in collector.flush():
        _epoch_done(done, writer, _last_epoch(trainer))
    written = writer.write_final()
    written.append(
        write_report(
            out_dir, config=trainer.config, particles=str(settings.particles_path), rows=writer.rows,
            n_particles=len(trainer.stack), box_size=trainer.box_size, events=phases, figures=written,
            pixel_size_angstrom=trainer.pixel_size_angstrom,
        )
    )  # fmt: skip
    _report(written, writer)
    return 0


def _last_epoch(trainer: Trainer) -> int:
    """The run's last epoch: ``n_epochs``, moved on by a restarted stuck start (engine/stuck.py) and by
    the epochs a still-moving re-search added (engine/rescue.py)."""
    return max(b.last_epoch(trainer.config.n_epochs) for b in trainer.branches + trainer.finished)


def _epoch_done(done: FinishedEpoch, writer: ResultWriter, n_epochs: int) -> None:
    writer.epoch_done(done)
    _say(done.record.summary_line(n_epochs))


def _events(trainer: Trainer) -> Iterator[Event]:
    """The trainer's events; a non-finite loss becomes a ValueError (one line) after saving the state."""
    try:
        yield from trainer.events()
    except FloatingPointError as err:
        saved = trainer.save_checkpoint("interrupted.pt")
        raise ValueError(f"the run failed: {err}; its state is in {saved}") from None


def _interrupted(trainer: Trainer, writer: ResultWriter, collector: EpochCollector) -> int:
    """Ctrl-C: save the state and the current results (a second Ctrl-C skips what is left)."""
    saved = None
    try:
        for done in collector.flush():
            _epoch_done(done, writer, _last_epoch(trainer))
        saved = trainer.save_checkpoint("interrupted.pt")
        writer.write_final()
    except KeyboardInterrupt:
        pass
    epoch = max(b.epoch for b in trainer.branches + trainer.finished)
    latest = latest_checkpoint(Path(writer.out_dir) / "checkpoints")
    resume = f"; --resume continues from {latest.name}" if latest is not None else ""
    state = f"state saved to {saved}" if saved else "state not saved"
    sys.stderr.write(f"cryospin-lab: interrupted during epoch {epoch + 1}: {state}{resume}\n")
    return 130


def _run_header(trainer: Trainer, settings: ReconstructSettings, resumed_from: Path | None) -> str:
    cfg, stack = trainer.config, trainer.stack
    size = f"box {stack.box_size}"
    if stack.box_size != stack.original_box_size:
        size += f" (downsampled from {stack.original_box_size})"
    what = f"resuming {resumed_from}" if resumed_from is not None else "reconstructing"
    return (
        f"{what}: {len(stack)} images from {settings.particles_path}, {size}, "
        f"{trainer.pixel_size_angstrom:g} Å/px; {cfg.encoder.n_heads} heads ({cfg.encoder.preset}), "
        f"switch {cfg.switch}, {cfg.n_epochs} epochs, batch {cfg.batch_size}, device {trainer.device}"
    )


def _report(written: list[Path], writer: ResultWriter) -> None:
    rows = [r for r in writer.rows if r["branch"] == writer.primary]
    lines = [f"results in {writer.out_dir}:"]
    lines += [f"  {path}" for path in written]
    lines.append(f"  {writer.out_dir / 'checkpoints'}/ (--resume continues from the latest)")
    if rows:
        last = rows[-1]
        final = []
        if last["resolution_angstrom"]:
            final.append(f"resolution {float(last['resolution_angstrom']):.1f} Å (FSC 0.5 vs ground truth)")
        if last["pose_error_mean_deg"]:
            final.append(
                f"pose error {float(last['pose_error_mean_deg']):.2f}° mean, "
                f"{float(last['pose_error_median_deg']):.2f}° median"
            )
        final.append(f"wall time {float(last['wall_time_s']):.0f} s")
        lines.append(f"final ({writer.primary}, epoch {last['epoch']}, {last['phase']}): " + "; ".join(final))
    _say("\n".join(lines))


def run_settings(args) -> dict[str, Any]:
    """The run settings given on the command line (the options left None were not given)."""
    return {name: getattr(args, name) for name in SETTINGS if getattr(args, name, None) is not None}


def settings_from_args(args) -> ReconstructSettings:
    """:class:`ReconstructSettings` from the parsed ``reconstruct`` options."""
    return ReconstructSettings(
        particles_path=Path(args.particles),
        out_dir=Path(args.out),
        run=run_settings(args),
        box_size=args.box,
        ground_truth_path=None if args.ground_truth is None else Path(args.ground_truth),
        resume=args.resume,
        stack_dir=None if args.stack_dir is None else Path(args.stack_dir),
        progress=not args.no_progress,
        distributed=args.distributed,
    )
