"""The workbench under the full default run in JupyterLab: click latency and throughput against headless.

    .venv/bin/python tests/browser/check_full_run.py SHOTS_DIR [--epochs-before-switch 2] [--assert]

Opens an unmodified copy of ``notebooks/workbench.ipynb`` in JupyterLab (Debian's
Chromium, as ``check_workbench.py``) without the quick settings: the default set,
10,000 images, every panel live. Runs its cells up to ``launch()``, waits until
``--epochs-before-switch`` epochs are done, then clicks **Switch** and measures the
time until the button's label changes (polled every 50 ms), and until the engine
has switched. Then Stop. The run logs its events beside its checkpoints (in the
server's ``TMPDIR``, a folder of this check), so the images per second of each
amortized epoch with the workbench open come from the run's own ``EpochEvent``
(``n_images_seen / epoch_time_s``). The same epochs are run headless
(``cryospin-lab reconstruct`` on the same set, same seed, nothing else running)
before and after the browser run, and the browser's rate is compared epoch by
epoch with the mean of the two (this VM's speed drifts within minutes).

Prints the latencies and the throughput ratio; with ``--assert`` exits 1 when the
label took more than 1 s or the workbench kept under 90 % of the headless
throughput (issue "The workbench in a class hour", point 1); with
``--assert-latency`` only for the label. Not part of the test suite: under
its other worker's load the run is too slow for the check's time limits and
the throughput ratio means nothing (the suite's browser check,
``tests/widgets/test_browser.py``, asserts the latency on quick settings). About 5 minutes on
2 cores (the default set must be simulated already: ``make dataset``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from browser_kit import (
    CHROMIUM,
    CHROMIUM_ARGS,
    KERNEL_IDLE_JS,
    button_label,
    dismiss_news,
    shot,
    start_server,
    status_text,
    stop_server,
    wait_http,
    wait_until,
)
from check_workbench import LAUNCH_CELL, ROOT, SWITCH_LABEL, lab_argv
from playwright.sync_api import sync_playwright

from cryospin_lab.engine.distributed import free_port
from cryospin_lab.simulate import datasets


def epoch_rates(events_path: Path, phase: str = "amortized") -> dict[int, float]:
    """Images per second of each ``phase`` epoch of the main branch, from the run's event log."""
    rates = {}
    for line in events_path.read_text().splitlines():
        record = json.loads(line)
        fields = record["fields"]
        if record["type"] == "EpochEvent" and fields["branch"] == "main" and fields["phase"] == phase:
            rates[fields["epoch"]] = fields["n_images_seen"] / fields["epoch_time_s"]
    return rates


def browser_run(workdir: Path, shots: Path, env: dict, epochs_before: int) -> dict:
    """The full run in JupyterLab: Switch after ``epochs_before`` epochs, then Stop; what was measured."""
    port = free_port()
    server = start_server(lab_argv(port, workdir), shots / "full_run_jupyterlab.log", env)
    measured: dict = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            wait_http(f"http://127.0.0.1:{port}/api/status", 90)
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.goto(f"http://127.0.0.1:{port}/lab/tree/workbench.ipynb?reset", timeout=120_000)
            if not wait_until(page, KERNEL_IDLE_JS, 120):
                raise RuntimeError("the notebook's kernel did not become idle")
            dismiss_news(page)
            page.evaluate(
                """(marker) => { const nb = window.jupyterapp.shell.currentWidget.content;
                const at = nb.widgets.findIndex(c => c.model.sharedModel.getSource().includes(marker));
                nb.activeCellIndex = at + 1;
                window.jupyterapp.commands.execute('notebook:run-all-above'); }""",
                LAUNCH_CELL,
            )
            done = f"() => /epoch {epochs_before}\\/\\d+ done/.test(document.body.innerText)"
            if not wait_until(page, done, 120 + 60 * epochs_before):
                raise RuntimeError(
                    f"no 'epoch {epochs_before}/N done' in the status line: {status_text(page)!r}"
                )
            shot(page, shots, "full_run_01_before_switch")
            page.locator("button.jupyter-button", has_text=SWITCH_LABEL).click(force=True)
            clicked = time.monotonic()
            page.wait_for_function(
                """() => Array.from(document.querySelectorAll('button.jupyter-button'))
                    .some(b => /^(Switch requested|Switching|Switched at epoch)/.test(b.innerText.trim()))""",
                timeout=30_000, polling=50,
            )  # fmt: skip
            measured["label_s"] = time.monotonic() - clicked
            page.wait_for_function(
                """() => Array.from(document.querySelectorAll('button.jupyter-button'))
                    .some(b => /^Switched at epoch \\d+ \\(by hand\\)/.test(b.innerText.trim()))""",
                timeout=120_000, polling=50,
            )  # fmt: skip
            measured["switched_s"] = time.monotonic() - clicked
            measured["label"] = button_label(page, "^Switch")
            shot(page, shots, "full_run_02_switched")
            page.locator("button.jupyter-button", has_text="Stop").click(force=True)
            wait_until(page, "() => /ended: stopped/.test(document.body.innerText)", 60)
            page.evaluate("() => window.jupyterapp.commands.execute('kernelmenu:shutdown')")
            page.wait_for_timeout(1500)
        finally:
            browser.close()
            stop_server(server)
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shots", type=Path, help="folder for screenshots and the server log (created)")
    parser.add_argument("--epochs-before-switch", type=int, default=2)
    parser.add_argument("--assert", dest="check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument(
        "--assert-latency", action="store_true", help="exit 1 only if the label took more than 1 s"
    )
    args = parser.parse_args()
    if not Path(CHROMIUM).is_file():
        print(f"{CHROMIUM} is missing: apt-get install -y chromium", file=sys.stderr)
        return 2
    args.shots.mkdir(parents=True, exist_ok=True)
    sim = datasets.hsp90(progress=False)  # simulated once and cached; the notebook finds it there
    workdir = Path(tempfile.mkdtemp(prefix="cryospin-full-run-"))
    (workdir / "tmp").mkdir()
    (workdir / "workbench.ipynb").write_text((ROOT / "notebooks" / "workbench.ipynb").read_text())
    env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(workdir / "tmp"))
    env.pop("CRYOSPIN_LAB_QUICK", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    run = [sys.executable, "-m", "cryospin_lab", "reconstruct", str(sim.star_path), "--no-progress"]
    run += ["--ground-truth", str(sim.ground_truth_path), "--epochs", str(args.epochs_before_switch)]

    def headless_rates(name: str) -> dict[int, float]:
        subprocess.run([*run, "--out", str(workdir / name)], check=True, env=env, capture_output=True)
        return epoch_rates(workdir / name / "events.jsonl")

    # Headless before and after the browser run, compared with their mean: this VM's speed drifts
    # by up to 10-20 % within minutes, and a single headless run after the browser's would carry that.
    before = headless_rates("headless_before")
    measured = browser_run(workdir, args.shots, env, args.epochs_before_switch)
    (log,) = (workdir / "tmp").glob("cryospin-lab-*/events.jsonl")
    with_ui = epoch_rates(log)
    after = headless_rates("headless_after")
    epochs = sorted(set(with_ui) & set(before) & set(after))
    headless = {e: (before[e] + after[e]) / 2 for e in epochs}
    print(f"# {' '.join(sys.argv)}; full default run, {len(epochs)} amortized epoch(s) compared")
    print(f"Switch label changed {measured['label_s']:.2f} s after the click; "
          f"switched ({measured['label']!r}) after {measured['switched_s']:.1f} s")  # fmt: skip
    for epoch in epochs:
        print(f"epoch {epoch}: {with_ui[epoch]:.0f} images/s with the workbench open, "
              f"{headless[epoch]:.0f} headless (mean of {before[epoch]:.0f} before and {after[epoch]:.0f} "
              f"after; {100 * with_ui[epoch] / headless[epoch]:.0f} %)")  # fmt: skip

    def ratio(chosen: list[int]) -> float:
        return sum(with_ui[e] for e in chosen) / sum(headless[e] for e in chosen) if chosen else 0.0

    total = ratio(epochs)
    print(f"throughput with the workbench open: {100 * total:.0f} % of headless")
    if len(epochs) > 1:  # the first epoch also carries the page's start (every panel's first draw)
        print(f"from epoch 2 on: {100 * ratio(epochs[1:]):.0f} % of headless")
    missed = []
    if measured["label_s"] > 1.0:
        missed.append(f"label after {measured['label_s']:.2f} s (target 1 s)")
    if total < 0.9:
        missed.append(f"throughput {100 * total:.0f} % of headless (target 90 %)")
    print("targets met" if not missed else "missed: " + "; ".join(missed))
    if args.assert_latency and measured["label_s"] > 1.0:
        return 1
    return 1 if (missed and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
