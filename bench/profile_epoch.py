"""Where an epoch's time goes: the training steps by kind of work, and the epoch-end report.

Usage::

    python bench/profile_epoch.py                 # the default set (HSP90, 10,000 images, D=64)
    python bench/profile_epoch.py --steps 40 --threads 1

The default set (``datasets.hsp90``) with the shipped defaults, on the full
frequency disc (the ramp's last epochs and the direct stage, the steady
state): ``--steps`` amortized steps, then (after a switch) as many direct
steps, each under ``torch.profiler``; every operation's own CPU time is
put in a category by its name (slicing forward/backward, the encoder's
convolutions forward/backward, its other layers, matrix products, FFTs,
element-wise work such as CTF, shifts and losses, optimiser updates, copies
and indexing, other). Then one whole epoch end, timed piece by piece
(pose error, FSC against the truth with its alignment, the tracked
candidates, head assignments, the structure gain, the checkpoint), and one
direct epoch end (its re-search of every pose too). Prints the
table with the wall time per step and per 10,000-image epoch, and the
epoch end as a share of that epoch. CPU time is summed over threads, so the
shares, not the milliseconds, compare with wall time.
"""

from __future__ import annotations

import argparse
import inspect
import math
import platform
import re
import sys
import tempfile
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from cryospin_lab.engine import epoch_report
from cryospin_lab.engine import trainer as trainer_module
from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.engine.events import Phase
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.maps import load_ground_truth
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.simulate import datasets

CATEGORIES = (  # first match wins; names are torch's operator names
    ("slicing forward", r"grid_sampler_3d$|grid_sampler$|^_SlicePlanes$"),
    ("slicing backward", r"grid_sampler_3d_backward|GridSampler|_SlicePlanesBackward"),
    ("encoder conv forward", r"mkldnn_convolution$|^aten::_convolution$|thnn_conv|slow_conv"),
    ("encoder conv backward", r"convolution_backward|ConvolutionBackward"),
    ("encoder norm/pool/relu", r"batch_norm|max_pool|relu|threshold_backward|BatchNorm|MaxPool|Relu"),
    ("matrix products", r"addmm|^aten::mm$|bmm|matmul|linear|baddbmm"),
    ("FFTs", r"fft"),
    ("optimiser updates", r"_foreach|addcdiv|lerp|Adam"),
    ("copies, indexing", r"copy|index|gather|scatter|cat$|stack|clone|^aten::to$|_to_copy|empty|zeros|fill"),
    (
        "element-wise (CTF, shifts, losses)",
        r"mul|add|sub|div|exp|sin|cos|sum|mean|pow|sqrt|abs|neg|where|min|max",
    ),
)


def categorise(events) -> dict[str, float]:
    """Self CPU time (ms) per category over the profiled operations."""
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        name = event.key
        if name.startswith("ProfilerStep") or name.startswith("## "):
            continue
        label = next((cat for cat, pattern in CATEGORIES if re.search(pattern, name)), "other")
        totals[label] += event.self_cpu_time_total / 1000
    return dict(totals)


def timed_steps(trainer: Trainer, branch, n_steps: int) -> tuple[dict[str, float], float]:
    """Profile ``n_steps`` steps of ``branch``: CPU ms per category and wall seconds per step."""
    batches = trainer.feed.epoch_batches(branch.epoch, branch.subset)
    indices = [next(batches) for _ in range(n_steps + 2)]
    for idx in indices[:2]:  # warm-up (allocators, first-call dispatch)
        list(trainer._step(branch, idx))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for idx in indices[2:]:
            list(trainer._step(branch, idx))
        wall = (time.perf_counter() - start) / n_steps
    return categorise(prof.key_averages()), wall


def timed_epoch_end(trainer: Trainer, branch) -> dict[str, float]:
    """Wall seconds of each piece of one epoch end (the report, the re-search, the checkpoint)."""
    times: dict[str, float] = defaultdict(float)
    wrapped = []
    pieces = [(epoch_report, name) for name in ("pose_error_event", "resolution_event", "candidates_event")]
    pieces += [(epoch_report, "assignment_event")]
    pieces += [(trainer_module, name) for name in ("structure_gain", "pose_change", "rescue_events")]
    for module, name in pieces:
        original = getattr(module, name)
        label = "re-search (direct stage)" if name == "rescue_events" else name.removesuffix("_event")
        label = label.replace("_", " ")

        def timer(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                result = _original(*args, **kwargs)
                if inspect.isgenerator(result):  # time the generator's work too
                    result = list(result)
                return result
            finally:
                times[_label] += time.perf_counter() - start

        wrapped.append((module, name, original))
        setattr(module, name, timer)
    save = trainer.save_checkpoint

    def timed_save(*args, **kwargs):
        start = time.perf_counter()
        try:
            return save(*args, **kwargs)
        finally:
            times["checkpoint"] += time.perf_counter() - start

    trainer.save_checkpoint = timed_save
    symmetry = trainer.reporter._truth_symmetry

    def timed_symmetry():
        start = time.perf_counter()
        try:
            return symmetry()
        finally:
            times["true map's near-symmetry (once per run)"] += time.perf_counter() - start

    trainer.reporter._truth_symmetry = timed_symmetry
    try:
        start = time.perf_counter()
        list(trainer._end_epoch(branch, 0.0))
        times["whole epoch end"] = time.perf_counter() - start
    finally:
        for module, name, original in wrapped:
            setattr(module, name, original)
        trainer.save_checkpoint = save
        trainer.reporter._truth_symmetry = symmetry
    return dict(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="steps profiled per stage (default 30)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=10000, help="images in the set (default 10000)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sim = datasets.hsp90(n_particles=args.n, progress=False)
    stack = ParticleStack(sim.star_path)
    truth = load_ground_truth(sim.ground_truth_path, stack)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(stack, TrainingConfig(device="cpu"), ground_truth_map=truth, out_dir=out)
        branch = trainer.branches[0]
        branch.epoch = trainer.config.radius_ramp_epochs  # the full disc, the steady state
        steps_per_epoch = math.ceil(len(stack) / trainer.config.batch_size)
        print(f"# {' '.join(sys.argv)}; {platform.node()}, torch {torch.__version__}, {args.threads} threads")
        print(f"# {len(stack)} images, D={stack.box_size}, {trainer.config.encoder.n_heads} heads, "
              f"batch {trainer.config.batch_size}, full disc; CPU ms summed over threads")  # fmt: skip
        rows = {}
        amortized, wall_a = timed_steps(trainer, branch, args.steps)
        rows["amortized"] = (amortized, wall_a)
        end = timed_epoch_end(trainer, branch)
        list(trainer._switch(branch, "manual"))
        assert branch.phase is Phase.DIRECT
        direct, wall_d = timed_steps(trainer, branch, args.steps)
        rows["direct"] = (direct, wall_d)
        end_direct = timed_epoch_end(trainer, branch)
        for stage, (cats, wall) in rows.items():
            total = sum(cats.values())
            epoch_s = wall * steps_per_epoch
            print(
                f"\n{stage}: {1000 * wall:.1f} ms per step (wall), {epoch_s:.1f} s per epoch of {len(stack)}"
            )
            for name, ms in sorted(cats.items(), key=lambda item: -item[1]):
                print(f"  {name:<38} {ms / args.steps:8.2f} ms/step CPU  {100 * ms / total:5.1f} %")
        epoch_s = wall_a * steps_per_epoch
        whole = end.pop("whole epoch end")
        once = end.pop("true map's near-symmetry (once per run)", 0.0)
        share = 100 * (whole - once) / epoch_s
        print(f"\nepoch end (amortized branch): {whole - once:.2f} s, {share:.1f} % of an amortized epoch "
              f"(and once per run, the true map's near-symmetry: {once:.2f} s)")  # fmt: skip
        for name, seconds in sorted(end.items(), key=lambda item: -item[1]):
            print(f"  {name:<38} {seconds:6.2f} s")
        whole = end_direct.pop("whole epoch end") - end_direct.pop(
            "true map's near-symmetry (once per run)", 0.0
        )
        share = 100 * whole / (wall_d * steps_per_epoch)
        print(f"\nepoch end (direct branch): {whole:.2f} s, {share:.1f} % of a direct epoch")
        for name, seconds in sorted(end_direct.items(), key=lambda item: -item[1]):
            print(f"  {name:<38} {seconds:6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
