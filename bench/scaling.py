"""How the time per epoch grows with the number of images N, the box size D and the number of heads H.

    .venv/bin/python bench/scaling.py                 # D = 32..128, H = 1..12, N = 250..2000
    .venv/bin/python bench/scaling.py --quick         # fewer points and repeats (a few minutes)
    .venv/bin/python bench/scaling.py --device cuda   # on a GPU (adds D = 192, 256)

Each point runs in its own process (so its peak memory is its own, from ``os.wait4``; on CUDA
``torch.cuda.max_memory_allocated``):

* **D and H**: median milliseconds per amortized step (encoder forward + backward, H heads
  rendered, winner-takes-all loss, Adam) and per direct step (5 pose steps + 1 volume step) of
  ``bench/throughput.py``, batch 32, on a simulated CTF stack, the full frequency disc; turned
  into minutes per 10,000-image epoch. Fits: ``t = a * D^p`` (log-log least squares) and
  ``t = a + b * H``.
* **N**: wall time of whole epochs of a real run (``Trainer.events()``, fully amortized, 2
  epochs, the second timed: steps plus the epoch-end work), D = 64, H = 7. Fit ``t = a + b * N``:
  ``a`` is the per-epoch overhead, ``b`` the time per image.
* **Memory**: peak resident memory (CPU) or allocated GPU memory of each D point; a fit
  ``m = m0 + c * D^3`` says at which D a step stops fitting in this machine's memory (an
  extrapolation, stated as such).

Writes ``bench/results/scaling_<device>_<date>.md`` and a ``.png`` of the three curves. Figures,
not pass/fail; a busy machine makes them slower, so the load average is printed with them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32


def _worker(args) -> dict:
    """One point, in this process: the step times at (D, H), or epoch time at N."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import throughput

    from cryospin_lab.engine.config import TrainingConfig
    from cryospin_lab.engine.events import EpochEvent
    from cryospin_lab.engine.trainer import Trainer
    from cryospin_lab.model.encoder import EncoderConfig

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="cryospin-scaling-") as tmp:
        if args.kind == "step":
            stack = throughput.synthetic_stack(args.d, max(4 * BATCH, 128), Path(tmp))
            throughput.N_HEADS = args.h  # make_trainer's head count
            trainer = throughput.make_trainer(stack, args.preset, device, BATCH)
            steps = throughput.stage_steps(trainer, BATCH)
            timings = throughput.time_interleaved(steps, device, args.repeats, n_warmup=1)
            out = {name: t.wall_s for name, t in timings.items()}
        else:
            stack = throughput.synthetic_stack(args.d, args.n, Path(tmp))
            config = TrainingConfig(
                encoder=EncoderConfig(box_size=args.d, n_heads=args.h, preset=args.preset),
                n_epochs=2,
                switch="never",
                batch_size=BATCH,
                checkpoint_every=0,
                device=device.type,
            )
            ends = [time.perf_counter()]
            for event in Trainer(stack, config).events():
                if isinstance(event, EpochEvent):
                    ends.append(time.perf_counter())
            out = {"epoch_s": ends[-1] - ends[-2]}
    if device.type == "cuda":
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_point(argv: list[str]) -> dict:
    """Run ``_worker`` in a fresh process; its result plus its peak RSS (MB)."""
    # stderr to a file, not a pipe: nothing reads a pipe while os.wait4 waits, so a chatty worker
    # would block on a full one
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result, tempfile.TemporaryFile("w+") as err:
        command = [sys.executable, __file__, "--worker", "--result", result.name, *argv]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise RuntimeError(f"point {' '.join(argv)} failed:\n{err.read()[-2000:]}")
        out = json.loads(Path(result.name).read_text())
    out["peak_rss_mb"] = usage.ru_maxrss / 1024
    return out


def fit_power(x, y) -> tuple[float, float]:
    """``y = a * x^p``: (a, p) by least squares on the logs."""
    p, log_a = np.polyfit(np.log(x), np.log(y), 1)
    return float(np.exp(log_a)), float(p)


def fit_line(x, y) -> tuple[float, float]:
    """``y = a + b * x``: (a, b)."""
    b, a = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(a), float(b)


def _table(title: str, header: list[str], rows: list[list]) -> list[str]:
    """A Markdown section: a blank line, the "## title" heading, a blank line, the table."""
    return [
        "",
        f"## {title}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def total_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory / 2**20
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    # the worker's own options
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=["step", "epoch"], default="step", help=argparse.SUPPRESS)
    parser.add_argument("--d", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--h", type=int, default=7, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=500, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="light", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.result.write_text(json.dumps(_worker(args)))
        return 0

    gpu = args.device == "cuda"
    sizes = [32, 64, 128] if args.quick else [32, 48, 64, 96, 128] + ([192, 256] if gpu else [])
    heads = [1, 2, 7] if args.quick else [1, 2, 4, 7, 12]
    counts = [250, 1000] if args.quick else [250, 500, 1000, 2000] + ([8000] if gpu else [])
    repeats = "3" if args.quick else "5"
    common = ["--device", args.device, "--threads", str(args.threads), "--repeats", repeats]
    started = time.perf_counter()
    load_before = os.getloadavg()

    by_d, by_h, by_n = {}, {}, {}
    for d in sizes:
        preset = "paper" if gpu and d >= 128 else "light"
        by_d[d] = run_point([*common, "--kind", "step", "--d", str(d), "--preset", preset])
        print(f"D={d:4d} H=7: {json.dumps(by_d[d])}", flush=True)
    for h in heads:
        by_h[h] = by_d[64] if h == 7 else run_point([*common, "--kind", "step", "--d", "64", "--h", str(h)])
        print(f"D=  64 H={h}: {json.dumps(by_h[h])}", flush=True)
    for n in counts:
        by_n[n] = run_point([*common, "--kind", "epoch", "--n", str(n)])
        print(f"N={n}: {json.dumps(by_n[n])}", flush=True)

    d_arr = np.array(sizes, float)
    fits = {}
    for stage in ("amortized", "direct"):
        fits[f"D {stage}"] = fit_power(d_arr, [by_d[d][stage] for d in sizes])
    fits["H amortized"] = fit_line(heads, [by_h[h]["amortized"] for h in heads])
    fits["N"] = fit_line(counts, [by_n[n]["epoch_s"] for n in counts])
    memory_key = "gpu_peak_mb" if gpu else "peak_rss_mb"
    mem = [by_d[d][memory_key] for d in sizes]
    m0, c = fit_line(d_arr**3, mem)
    limit = total_memory_mb(args.device)
    d_limit = ((limit - m0) / c) ** (1 / 3) if c > 0 else float("inf")

    def per_epoch_min(seconds_per_step: float) -> float:
        return 10_000 / BATCH * seconds_per_step / 60

    stamp = datetime.date.today().isoformat()
    command = f"`.venv/bin/python bench/scaling.py --device {args.device}" + (
        " --quick`" if args.quick else "`"
    )
    import torch

    lines = [
        f"# Scaling of the time per epoch with D, H and N ({args.device}), {stamp}",
        "",
        f"Command: {command}. Machine: {os.cpu_count()} cores, load average {load_before[0]:.1f} at start; "
        f"torch {torch.__version__}, {args.threads or 'default'} threads; batch {BATCH}; each point in its "
        f"own process; took {time.perf_counter() - started:.0f} s.",
    ]
    lines += _table(
        "Box size D (H = 7)",
        [
            "D",
            "amortized ms/step",
            "direct ms/step",
            "min per 10k-image epoch (amortized / direct)",
            f"peak {'GPU' if gpu else 'RSS'} MB",
        ],
        [
            [
                d,
                f"{1e3 * by_d[d]['amortized']:.0f}",
                f"{1e3 * by_d[d]['direct']:.0f}",
                f"{per_epoch_min(by_d[d]['amortized']):.1f} / {per_epoch_min(by_d[d]['direct']):.1f}",
                f"{by_d[d][memory_key]:.0f}",
            ]
            for d in sizes
        ],
    )
    for stage in ("amortized", "direct"):
        a, p = fits[f"D {stage}"]
        lines.append(f"\nFit, {stage}: t = {1e3 * a:.3g} ms x D^{p:.2f}.")
    lines += [
        f"Memory fit: {m0:.0f} MB + {c * 64**3:.0f} MB x (D/64)^3; this machine's {limit / 1024:.0f} GiB "
        f"would run out near D = {d_limit:.0f} (an extrapolation).",
    ]
    lines += _table(
        "Heads H (D = 64)",
        ["H", "amortized ms/step", "direct ms/step"],
        [[h, f"{1e3 * by_h[h]['amortized']:.0f}", f"{1e3 * by_h[h]['direct']:.0f}"] for h in heads],
    )
    a, b = fits["H amortized"]
    lines.append(f"\nFit, amortized: t = {1e3 * a:.0f} ms + {1e3 * b:.1f} ms x H (the direct step renders "
                 "one pose whatever H is).")  # fmt: skip
    lines += _table(
        "Images N (D = 64, H = 7, whole epochs, fully amortized)",
        ["N", "s per epoch"],
        [[n, f"{by_n[n]['epoch_s']:.1f}"] for n in counts],
    )
    a, b = fits["N"]
    lines.append(f"\nFit: t = {a:.1f} s + {1e3 * b:.2f} ms x N (epoch-end work + per image); 50,000 images: "
                 f"{(a + b * 50_000) / 60:.1f} min per epoch.")  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"scaling_{args.device}_{stamp}.md"
    path.write_text("\n".join(lines) + "\n")
    plot(by_d, by_h, by_n, fits, path.with_suffix(".png"))
    print("\n".join(lines))
    return 0


def plot(by_d, by_h, by_n, fits, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    d = np.array(sorted(by_d), float)
    for stage, style in (("amortized", "o-"), ("direct", "s-")):
        axes[0].loglog(d, [1e3 * by_d[k][stage] for k in sorted(by_d)], style, label=stage)
        a, p = fits[f"D {stage}"]
        axes[0].loglog(d, 1e3 * a * d**p, "k:", lw=0.8)
    axes[0].set_xlabel("box size D")
    axes[0].set_ylabel("ms per step (batch 32)")
    axes[0].legend()
    h = sorted(by_h)
    for stage, style in (("amortized", "o-"), ("direct", "s-")):
        axes[1].plot(h, [1e3 * by_h[k][stage] for k in h], style, label=stage)
    axes[1].set_xlabel("heads H (D = 64)")
    axes[1].set_ylabel("ms per step")
    n = sorted(by_n)
    axes[2].plot(n, [by_n[k]["epoch_s"] for k in n], "o-")
    a, b = fits["N"]
    axes[2].plot(n, [a + b * k for k in n], "k:", lw=0.8)
    axes[2].set_xlabel("images N (D = 64, H = 7)")
    axes[2].set_ylabel("s per epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
