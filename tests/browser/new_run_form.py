"""The browser check's step for the form "settings for a new run" (``check_workbench.py`` calls it,
in JupyterLab and in Voila).

After the first run has ended, as a user would:

1. types a particle file that does not exist and clicks **New run** (Start's label once a run
   has ended): the workbench must show
   a message that names the file, and no traceback;
2. chooses a bundled molecule to simulate (1S3X, 200 images) and clicks it again: the
   simulation's progress line must show, then the workbench must show the new run (its header
   names the 200-image set) and its first epoch in the status line.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from browser_kit import Checks, shot, status_text, wait_until
from playwright.sync_api import Locator, Page

from cryospin_lab._cache import default_cache_dir

MOLECULE = "1s3x"
N_SIMULATED = 200  # seconds to simulate; the form's lowest is 100
MISSING = "/nonexistent/cryospin_missing_particles.star"
# a MutationObserver keeps the first text that holds the phrase, however briefly it was shown
SEEN_JS = """(phrase) => { window.cryospinSeen = null;
  window.cryospinObserver = new MutationObserver((records) => { for (const r of records) {
    const text = r.target.textContent || '';
    if (window.cryospinSeen === null && text.includes(phrase)) {
      window.cryospinSeen = text.slice(text.indexOf(phrase), text.indexOf(phrase) + 120); } } });
  window.cryospinObserver.observe(document.body, {subtree: true, childList: true, characterData: true}); }"""


def _field(bench: Locator, label: str) -> Locator:
    """The input (or select) of the workbench's widget whose label reads ``label``."""
    labelled = bench.page.locator("label.widget-label", has_text=re.compile(f"^{re.escape(label)}$"))
    return bench.locator(".widget-inline-hbox").filter(has=labelled).locator("input, select")


def _forget_simulated_set() -> None:
    """Remove the cached set this step simulates, so that it is simulated (and its progress shown)
    on every check; the Jupyter server runs with this process's environment, hence its cache."""
    for folder in default_cache_dir().glob(f"{MOLECULE}_n{N_SIMULATED}_*"):
        shutil.rmtree(folder, ignore_errors=True)


def _start(bench: Locator) -> None:
    """Click Start, which reads "New run" once a run has ended."""
    start = re.compile(r"^\s*(Start|New run)\s*$")
    bench.locator("button.jupyter-button").filter(has_text=start).click(force=True)


def check_new_run_form(page: Page, bench: Locator, shots: Path, checks: Checks, where: str = "lab") -> None:
    """Drive the form of the workbench shown in ``bench`` (its output area, or Voila's page) after its
    run ended; ``where`` ("lab" or "voila") begins each check's name and screenshot's file name."""
    # the accordion's title (Voila's page also shows the notebook's text, which names it in italics)
    title = bench.get_by_text("settings for a new run", exact=True).and_(bench.locator("span"))
    title.scroll_into_view_if_needed()
    title.click()
    particles = _field(bench, "particles")
    ok = wait_until(page, "() => /simulate a molecule/.test(document.body.innerText)", 10)
    found = particles.count()
    checks(f"{where}: the new-run form opens", ok and found == 1, f"{found} particles field(s)")
    if found != 1:
        return

    particles.fill(MISSING)
    particles.press("Enter")
    _start(bench)
    shown = wait_until(page, "(path) => document.body.innerText.includes(path)", 20, MISSING)
    text = page.evaluate("() => document.body.innerText")
    named = [line for line in text.splitlines() if "not found" in line and MISSING in line]
    checks(
        f"{where}: a missing particle file is named in a message, no traceback",
        shown and bool(named) and "Traceback" not in text,
        named[0][:200] if named else "no message naming the file",
    )
    shot(bench, shots, f"{where}_05_form_missing_file")

    _forget_simulated_set()
    select = _field(bench, "simulate a molecule")
    label = next(o for o in select.locator("option").all_inner_texts() if o.startswith(f"{MOLECULE}:"))
    select.select_option(label=label)
    count = _field(bench, "images to simulate")
    count.fill(str(N_SIMULATED))
    count.press("Enter")
    page.wait_for_timeout(500)  # the kernel receives the fields before the click
    # the progress line shows for the simulation's few seconds only: record it when it appears
    page.evaluate(SEEN_JS, f"simulating {MOLECULE}")
    _start(bench)
    clicked = time.monotonic()
    progress = wait_until(page, "() => window.cryospinSeen !== null", 30)
    said = page.evaluate("() => { window.cryospinObserver.disconnect(); return window.cryospinSeen; }")
    checks(
        f"{where}: choosing a molecule shows the simulation's progress",
        progress,
        (said or "no progress line")[:200],
    )
    # the workbench binds the new run (its header names the simulated set; the run's own messages
    # replace the form's) and its status line counts the new run's epochs
    header = f"particles.star: {N_SIMULATED} particles"
    started = wait_until(
        page,
        "(h) => document.body.innerText.includes(h) && "
        "/(running|finished) ·.*epoch [1-9]\\d*\\/\\d+ done/.test(document.body.innerText)",
        180,
        header,
    )
    checks(
        f"{where}: the simulated molecule's run starts and finishes an epoch",
        started,
        f"{status_text(page)!r} {time.monotonic() - clicked:.1f} s after the click",
    )
    shot(bench, shots, f"{where}_05_form_simulated_molecule")
    _forget_simulated_set()
