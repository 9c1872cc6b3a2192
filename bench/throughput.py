"""Training throughput: images per second of the amortized and the direct stage, on this machine.

Usage::

    python bench/throughput.py                  # D = 64 and 128 (a few minutes on 2 CPU cores)
    python bench/throughput.py --quick          # D = 64 only, fewer repeats
    python bench/throughput.py --threads 1 2    # compare intra-op thread counts
    python bench/throughput.py --breakdown      # also time the parts of each step
    python bench/throughput.py --quick --slicers c grid_sample   # the C slicer against the previous

It simulates a small CTF-modulated stack (Gaussian blobs, SNR 0.1, ``--images``
particles) in a temporary folder and times the real engine: one
``engine.steps.amortized_step`` (encoder forward + backward, ``H`` heads rendered,
winner-takes-all loss, Adam on encoder and volume) and one
``engine.steps.direct_step`` (``n_pose_steps`` pose steps, then one volume step)
on batches of ``--batch`` images, at the full frequency disc (the radius ramp
off: the steady state). The encoder preset is ``light``, except ``paper``
on CUDA from D=128 on (``--presets`` overrides). The two stages take turns
and the median of ``--repeats`` steps is reported, so that load from other
processes on a shared machine hits both alike.

Columns: milliseconds per step (wall), images per second, the process's CPU
seconds per wall second during the steps (about the number of busy threads:
well above 1 on a machine whose other processes use the cores means threads
spinning at barriers), and the minutes one 10,000-image epoch would take.

``--breakdown`` times the parts of a step, among them all heads rendered with
autograd against ``render.winner_losses``, which the amortized step uses: the
losing heads are rendered forward only, since a minimum's gradient reaches only
its argmin (docs/decisions.md#throughput-winner-losses). ``--threads`` compares
intra-op thread counts; the engine keeps torch's default, and one thread can be
faster when other processes share the cores (docs/decisions.md#cpu-threads).
The ``light`` preset's first conv has stride 2 from D=64 on: every stage then
runs at half the resolution, and the direct stage refines the poses
(docs/decisions.md#encoder-stride2). After the steps of each box size it prints
the seconds per image of the workbench's pose posterior at each ``--nsides``
(default 8 16).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cryospin_lab.engine import steps
from cryospin_lab.engine.config import TrainingConfig
from cryospin_lab.engine.trainer import Trainer
from cryospin_lab.io.particles import ParticleStack
from cryospin_lab.model.encoder import EncoderConfig
from cryospin_lab.physics import slice_kernel
from cryospin_lab.physics.projection import FourierDisc
from cryospin_lab.physics.render import LossKind, image_losses, render_hartley, winner_losses
from cryospin_lab.simulate.simulator import simulate_particles

N_HEADS = 7


def machine_description() -> str:
    """CPU model, cores, load, torch version and threads (and the GPU, if any)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = "n/a"
    if hasattr(os, "getloadavg"):
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"machine: {model}, {cores} usable cores, load average {load}",
        f"python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads, {torch.get_num_interop_threads()} inter-op threads",
    ]
    if torch.cuda.is_available():
        lines.append(f"cuda: {torch.cuda.get_device_name(0)}")
    return "\n".join(lines)


def blob_volume(box_size: int, n_blobs: int = 12, seed: int = 0) -> torch.Tensor:
    """A ``(D, D, D)`` map of Gaussian blobs (an asymmetric particle-like test object)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.arange(box_size, dtype=torch.float32) - box_size // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    volume = torch.zeros(box_size, box_size, box_size)
    width = box_size / 16
    for _ in range(n_blobs):
        c = (torch.rand(3, generator=gen) - 0.5) * box_size / 2.5
        volume += torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * width**2))
    return volume


def synthetic_stack(box_size: int, n_images: int, folder: Path) -> ParticleStack:
    """A simulated CTF stack at 3 Å x 64/D per pixel (the HSP90 default's sampling at D=64)."""
    result = simulate_particles(
        blob_volume(box_size),
        out_dir=folder / f"box{box_size}",
        box_size=box_size,
        pixel_size_angstrom=3.0 * 64 / box_size,
        n_particles=n_images,
        snr=0.1,
        progress=False,
    )
    return ParticleStack(result.star_path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    wall_s: float  # median seconds per call
    cpu_per_wall: float  # process CPU seconds per wall second over all timed calls
    min_s: float  # the spread of the timed calls
    max_s: float


def time_interleaved(steps: dict, device: torch.device, n_repeats: int, n_warmup: int = 2) -> dict:
    """Median wall time per call of each step (they take turns), and CPU use, after warm-up calls."""
    for _ in range(n_warmup):
        for step in steps.values():
            step()
    walls = {name: [] for name in steps}
    cpus = {name: 0.0 for name in steps}
    for _ in range(n_repeats):
        for name, step in steps.items():
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            walls[name].append(time.perf_counter() - w0)
            cpus[name] += time.process_time() - c0
    return {
        name: Timing(statistics.median(w), cpus[name] / sum(w), min(w), max(w)) for name, w in walls.items()
    }


def make_trainer(
    stack: ParticleStack, preset: str, device: torch.device, batch_size: int, autocast: str = "off"
) -> Trainer:
    config = TrainingConfig(
        encoder=EncoderConfig(box_size=stack.box_size, n_heads=N_HEADS, preset=preset, autocast=autocast),
        switch="never",
        batch_size=batch_size,
        radius_ramp_epochs=0,
        checkpoint_every=0,
        n_tracked=0,
        device=device.type,
    )
    return Trainer(stack, config)


def stage_steps(trainer: Trainer, batch_size: int, seed: int = 0) -> dict:
    """``{"amortized": step, "direct": step}`` on two branches of one trainer, fresh random batches."""
    amortized = trainer.branches[0]
    direct = amortized.copy("direct")
    for _ in trainer._switch(direct, "manual"):
        pass
    gen = torch.Generator().manual_seed(seed)
    n = len(trainer.stack)

    def batch() -> torch.Tensor:
        return torch.randperm(n, generator=gen)[:batch_size]

    return {
        "amortized": lambda: steps.amortized_step(trainer.step_context, amortized, batch()),
        "direct": lambda: steps.direct_step(trainer.step_context, direct, batch()),
    }


def with_slicers(stage_fns: dict, slicers: list[str]) -> dict:
    """Each stage once per slicer (``c``: the compiled kernel; ``grid_sample``: the previous slicer).

    One stage's runs with both slicers take turns in the same timing loop, so that the ratio is
    measured side by side; a ``grid_sample`` run hides the kernel for the duration of its step.
    """
    if slicers == ["c"]:
        return stage_fns

    def hidden(step):
        def run():
            available = slice_kernel.available
            slice_kernel.available = lambda: False
            try:
                return step()
            finally:
                slice_kernel.available = available

        return run

    return {
        f"{stage}/{slicer}": (hidden(step) if slicer == "grid_sample" else step)
        for stage, step in stage_fns.items()
        for slicer in slicers
    }


def breakdown_steps(trainer: Trainer, batch_size: int) -> dict:
    """The parts of a step, each with its backward pass, on one fixed batch."""
    branch = trainer.branches[0]
    encoder, volume = branch.encoder.train(), branch.volume
    disc: FourierDisc = trainer.feed.disc(0)
    indices = torch.arange(batch_size)
    images, observed, ctf = trainer.feed.batch(indices, disc)
    apix, kind = trainer.pixel_size_angstrom, LossKind.L2
    with torch.no_grad():
        rotations = encoder(images).rotations.detach()
    kwargs = dict(pixel_size_angstrom=apix, ctf_values=ctf, contrast=trainer.config.contrast)

    def encoder_step():
        encoder.zero_grad(set_to_none=True)
        encoder(images).rotations.sum().backward()

    def pyramid():
        with torch.no_grad():
            encoder.pyramid(images)

    def all_heads():
        r = rotations.clone().requires_grad_(True)
        losses = image_losses(render_hartley(volume.hartley(), r, disc, **kwargs), observed, disc, kind)
        losses.min(dim=1).values.mean().backward()

    def winner():
        r = rotations.clone().requires_grad_(True)
        best, _, _ = winner_losses(volume.hartley(), r, disc, observed, kind, **kwargs)
        best.mean().backward()

    def pose_step():
        r = rotations[:, 0].clone().requires_grad_(True)
        predicted = render_hartley(volume.hartley().detach(), r, disc, **kwargs)
        image_losses(predicted, observed, disc, kind).sum().backward()

    def batch():
        trainer.feed.batch(indices, disc)

    return {
        "encoder fwd+bwd": encoder_step,
        "  of which pyramid": pyramid,
        f"render {N_HEADS} heads, min, bwd": all_heads,
        "winner_losses + bwd": winner,
        "one pose step (1 head)": pose_step,
        "batch: images, FHT, CTF": batch,
    }


def time_posteriors(stack: ParticleStack, nsides: list[int], device: torch.device, repeats: int) -> None:
    """Seconds per image of :func:`cryospin_lab.analysis.pose_posterior.view_posterior` (the workbench's pose
    posterior panel: every HEALPix direction x 24 in-plane angles rendered and scored)."""
    from cryospin_lab.analysis.pose_posterior import view_posterior

    d = stack.box_size
    volume = blob_volume(d)
    image = stack.get_batch([0]).images[0]  # CTF ignored: the timing is the same with it
    for nside in nsides:
        kwargs = dict(ctf=None, pixel_size_angstrom=3.0 * 64 / d, nside=nside, device=device)
        view_posterior(volume, image, **kwargs)  # warm-up
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            view_posterior(volume, image, **kwargs)
            _sync(device)
            times.append(time.perf_counter() - t0)
        n_rot = 12 * nside**2 * 24
        median = statistics.median(times)
        print(
            f"{device.type:6} posterior D={d} nside={nside:<3} ({n_rot} rotations): "
            f"{median:.2f} s per image ({n_rot / median:,.0f} rotations/s; "
            f"min-max {min(times):.2f}-{max(times):.2f} s over {len(times)} runs)",
            flush=True,
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="box sizes D (default 64 128)")
    parser.add_argument("--quick", action="store_true", help="D = 64 only and fewer repeats")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed steps per stage (default 7, quick 3)"
    )
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--images", type=int, default=256, help="particles simulated per box size")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="intra-op thread counts to try")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu, and cuda if available)")
    parser.add_argument(
        "--presets",
        nargs="+",
        default=None,
        help="encoder presets (default light; paper on CUDA at D >= 128)",
    )
    parser.add_argument(
        "--autocast",
        nargs="+",
        default=["off"],
        choices=["off", "bf16"],
        help="encoder mixed precision settings to compare (default off)",
    )
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of a step")
    parser.add_argument(
        "--slicers",
        nargs="+",
        default=["c"],
        choices=["c", "grid_sample"],
        help="CPU slicers to time side by side (default c; 'c grid_sample' compares with the previous)",
    )
    parser.add_argument(
        "--nsides",
        type=int,
        nargs="*",
        default=[8, 16],
        help="HEALPix nsides at which to time the pose posterior of one image (default 8 16; none: skip)",
    )
    args = parser.parse_args(argv)
    sizes = args.sizes or ([64] if args.quick else [64, 128])
    repeats = args.repeats or (3 if args.quick else 7)
    if args.device:
        devices = [torch.device(args.device)]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    thread_counts = args.threads or [torch.get_num_threads()]

    print(machine_description())
    print(
        f"batch {args.batch}, {N_HEADS} heads, full disc, median (and min-max) of {repeats} steps per stage"
    )
    header = f"{'device':6} {'preset':6} {'amp':4} {'D':>4} {'thr':>3} {'stage':21} "
    print(header + f"{'ms/step':>9} {'min-max ms':>13} {'images/s':>9} {'cpu/wall':>8} {'min/10k':>8}")
    with tempfile.TemporaryDirectory(prefix="cryospin-throughput-") as tmp:
        stacks = {d: synthetic_stack(d, args.images, Path(tmp)) for d in sizes}
        for device in devices:
            for d in sizes:
                # The paper preset's six pooling stages need D >= 128.
                default = ["paper"] if device.type == "cuda" and d >= 128 else ["light"]
                for preset, threads, amp in itertools.product(
                    args.presets or default, thread_counts, args.autocast
                ):
                    torch.set_num_threads(threads)
                    try:
                        trainer = make_trainer(stacks[d], preset, device, args.batch, amp)
                    except ValueError as error:
                        print(f"{device.type:6} {preset:6} {d:>4} skipped: {error}")
                        continue
                    stage_fns = with_slicers(stage_steps(trainer, args.batch), args.slicers)
                    timings = time_interleaved(stage_fns, device, repeats)
                    for stage, t in timings.items():
                        rate = args.batch / t.wall_s
                        print(
                            f"{device.type:6} {preset:6} {amp:4} {d:>4} {threads:>3} {stage:21} "
                            f"{1e3 * t.wall_s:>9.1f} {f'{1e3 * t.min_s:.0f}-{1e3 * t.max_s:.0f}':>13} "
                            f"{rate:>9.1f} {t.cpu_per_wall:>8.2f} "
                            f"{10_000 / rate / 60:>8.2f}",
                            flush=True,
                        )
                    if args.breakdown:
                        parts = time_interleaved(breakdown_steps(trainer, args.batch), device, repeats)
                        for name, t in parts.items():
                            print(f"{'':29} {name:32} {1e3 * t.wall_s:>9.1f} ms", flush=True)
                if args.nsides:
                    time_posteriors(stacks[d], args.nsides, device, max(1, repeats // 2))


if __name__ == "__main__":
    main()
