"""The browser check's Voila part (``check_workbench.py`` calls it): the workbench as a standalone page.

Voila (``--preheat_kernel``) runs the notebook before any page is requested; after
``CHECK_VOILA_WAIT_S`` (60 s) the page is opened, which builds every view from the stored state;
the panels must show the run so far, the 3-D view a canvas, and once the run has ended the
new-run form step (``new_run_form.py``) runs as in JupyterLab.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from browser_kit import (
    CHROMIUM,
    CHROMIUM_ARGS,
    ENDED_JS,
    Checks,
    has_data,
    plots,
    shot,
    start_server,
    status_text,
    stop_server,
    wait_http,
    wait_until,
)
from new_run_form import check_new_run_form

from cryospin_lab.engine.distributed import free_port


def check_voila(pw, workdir: Path, shots: Path, env: dict[str, str], checks: Checks) -> None:
    port = free_port()
    argv = [
        str(Path(sys.executable).with_name("voila")),
        str(workdir / "workbench.ipynb"),
        "--no-browser",
        f"--port={port}",
        "--Voila.ip=127.0.0.1",
        "--preheat_kernel=True",
        "--pool_size=1",
    ]
    server = start_server(argv, shots / "voila.log", env)
    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    try:
        wait_http(f"http://127.0.0.1:{port}/", 90)
        # The preheated kernel runs the notebook (and starts the run) before any page is asked for.
        # Wait until the run has progressed: 3 epochs of 500 images take ~30 s on 2 busy cores
        # (the first one ends ~25 s after the server is up).
        wait_s = float(os.environ.get("CHECK_VOILA_WAIT_S", "60"))
        print(f"       waiting {wait_s:.0f} s for the preheated run before opening the page", flush=True)
        time.sleep(wait_s)
        # Tall: Voila scrolls inside its own container, which a full-page screenshot does not unroll.
        page = browser.new_page(viewport={"width": 1400, "height": 5200})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        opened = time.monotonic()
        page.goto(f"http://127.0.0.1:{port}/", timeout=180_000)
        ok = wait_until(
            page,
            """() => Array.from(document.querySelectorAll('button.jupyter-button'))
                .some(b => /^(New run|Start)$/.test(b.innerText.trim()))""",
            180,
        )
        checks("voila: workbench rendered", ok, f"{time.monotonic() - opened:.1f} s after opening")
        page.wait_for_timeout(4000)
        status = status_text(page)
        progressed = re.search(r"epoch [1-9]\d*/3 done", status) is not None
        checks("voila: status line shows the run's progress (an epoch done)", progressed, status)
        figures = plots(page)
        for part in ("training loss", "Fourier shell", "pose error", "winner share"):
            ok, detail = has_data(figures, part)
            checks(f"voila: a figure titled ~{part!r} shows the run's data on first view", ok, detail)
        titles = [str(f["title"]) for f in figures]
        print(f"       figure titles: {titles}", flush=True)
        canvases = page.evaluate("() => document.querySelectorAll('canvas').length")
        checks("voila: the 3-D view has a canvas", canvases > 0, f"{canvases} canvas(es)")
        shot(page, shots, "voila_01_page")
        print(
            f"       browser console errors: {len(errors)}"
            + (f", first: {errors[0][:300]}" if errors else "")
        )
        ended = wait_until(page, ENDED_JS, 120)
        checks("voila: the preheated run ends", ended, status_text(page))
        if ended:
            check_new_run_form(page, page.locator("body"), shots, checks, where="voila")
        (shots / "voila_console_errors.json").write_text(json.dumps(errors, indent=1))
    finally:
        browser.close()
        stop_server(server)
