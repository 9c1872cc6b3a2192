"""How long the workbench's UI pump holds the kernel's main thread, per panel, during a live run.

A click in the browser is handled only between two pump ticks, so the longest
tick bounds how long a click waits. This script starts a reconstruction on a
small simulated HSP90 set (the workbench notebook's quick settings), builds the
workbench exactly as ``launch()`` does, ticks its pump by hand at the pump's
period for ``--seconds``, and times every panel's ``handle`` (summed over a
tick's events) and ``poll``. After ``--switch-after`` seconds it clicks
Switch and reports the time until the button shows the switch (the engine's
answer, which arrives as a PhaseChangeEvent through the pump).

Usage (prints a table; nothing is asserted)::

    .venv/bin/python bench/ui_latency.py --seconds 90
    .venv/bin/python bench/ui_latency.py --seconds 90 --particles 2000 --nside 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict

import ipywidgets as w
import torch
from jupyter_client.jsonutil import json_default  # what the kernel serialises messages with


def _timed(method, bucket: list[float]):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            bucket.append(time.perf_counter() - t0)

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--particles", type=int, default=500)
    parser.add_argument("--nside", type=int, default=4, help="posterior panel nside")
    parser.add_argument("--switch-after", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the run")
    parser.add_argument("--nglview", action="store_true", help="include the nglview viewer")
    args = parser.parse_args()

    from cryospin_lab.widgets import launch

    from cryospin_lab.simulate import datasets

    data = datasets.hsp90(n_particles=args.particles, progress=False)
    bench = launch(
        particles=data.star_path,
        ground_truth=data.ground_truth_path,
        n_epochs=1000,
        threads=args.threads,
        posterior_nside=args.nside,
        use_nglview=args.nglview,
        switch="never",
    )
    handle_times: dict[str, list[float]] = defaultdict(list)
    poll_times: dict[str, list[float]] = defaultdict(list)
    for panel in bench.pump.panels:
        name = type(panel).__name__
        panel.handle = _timed(panel.handle, handle_times[name])
        if hasattr(panel, "poll"):
            panel.poll = _timed(panel.poll, poll_times[name])
    sent_bytes: dict[str, int] = defaultdict(int)
    sent_messages: dict[str, int] = defaultdict(int)
    send = w.Widget._send

    owners = {
        id(value): f"{type(panel).__name__}.{attr}"
        for panel in bench.pump.panels
        for attr, value in vars(panel).items()
        if isinstance(value, w.Widget)
    }

    def counting_send(widget, msg, buffers=None):
        # What the kernel would put on the wire: the JSON of the message plus its binary buffers.
        name = owners.get(id(widget), type(widget).__name__)
        sent_bytes[name] += len(json.dumps(msg, default=json_default)) + sum(len(b) for b in buffers or ())
        sent_messages[name] += 1
        return send(widget, msg, buffers)

    w.Widget._send = counting_send
    ticks: list[float] = []
    bench.reconstruction.start()
    t_start = time.monotonic()
    clicked_at = None
    switch_latency = None
    try:
        while time.monotonic() - t_start < args.seconds:
            t0 = time.perf_counter()
            bench.tick()
            ticks.append(time.perf_counter() - t0)
            now = time.monotonic()
            if clicked_at is None and now - t_start > args.switch_after:
                bench.controls.switch_button.click()
                clicked_at = now
            if clicked_at and switch_latency is None:
                if bench.controls.switch_button.description.startswith("Switched"):
                    switch_latency = now - clicked_at
            time.sleep(bench.pump.interval_s)
    finally:
        bench.close()

    def row(name: str, values: list[float]) -> str:
        if not values:
            return f"| {name} | 0 | | | |"
        ms = sorted(v * 1000 for v in values)
        p95 = ms[min(len(ms) - 1, int(0.95 * len(ms)))]
        return f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | {p95:.1f} | {ms[-1]:.1f} |"

    print(
        f"# UI pump latency: {args.particles} particles, posterior nside {args.nside}, "
        f"{args.seconds:.0f} s, torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print("\n| what | calls | median ms | p95 ms | max ms |\n|---|---|---|---|---|")
    print(row("whole tick", ticks))
    for name in poll_times:
        print(row(f"{name}.poll", poll_times[name]))
    for name in handle_times:
        per_tick = handle_times[name]
        print(row(f"{name}.handle (per event)", per_tick))
    print("\n| widget | messages sent | MB sent | MB/s |\n|---|---|---|---|")
    for name in sorted(sent_bytes, key=sent_bytes.get, reverse=True):
        mb = sent_bytes[name] / 1e6
        print(f"| {name} | {sent_messages[name]} | {mb:.2f} | {mb / args.seconds:.3f} |")
    if clicked_at is None:
        print("\nSwitch was not clicked (run shorter than --switch-after)")
    elif switch_latency is None:
        print("\nSwitch clicked; the switch did not show before the end")
    else:
        print(f"\nSwitch: {switch_latency:.2f} s from click to 'Switched' on the button")


if __name__ == "__main__":
    main()
