"""End to end in a real browser: JupyterLab and Voila driven by Playwright in Debian's Chromium.

Runs ``tests/browser/check_workbench.py`` (what it checks is in its docstring: the
workbench renders, Switch takes effect within seconds, every tab shows data, Stop,
a reload and a Voila page opened mid-run show the run's data). Screenshots, server
logs and the check's output go to ``test-artifacts/browser/`` (kept for inspection).
About 4 minutes on 2 cores. ``make test`` installs ``/usr/bin/chromium`` with apt-get
when it is missing; without it this test is skipped (listed by ``-ra``).
``CRYOSPIN_LAB_SKIP_BROWSER=1`` skips it on purpose (quick local runs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts" / "browser"
TIMEOUT_S = 900

pytest.importorskip("playwright")
pytest.importorskip("jupyterlab")
pytest.importorskip("voila")


@pytest.mark.slow
@pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="needs /usr/bin/chromium (make test installs it with apt-get)"
)
@pytest.mark.skipif(os.environ.get("CRYOSPIN_LAB_SKIP_BROWSER") == "1", reason="CRYOSPIN_LAB_SKIP_BROWSER=1")
def test_workbench_in_jupyterlab_and_voila():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*"):
        if old.is_file():
            old.unlink()
    # Its own process group: on a timeout, the browser and servers it started go with it.
    check = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "browser" / "check_workbench.py"), str(ARTIFACTS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        output, _ = check.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(check.pid, signal.SIGKILL)
        output, _ = check.communicate()
        output += f"\n[FAIL] the check did not end within {TIMEOUT_S} s"
    finally:
        try:
            os.killpg(check.pid, signal.SIGKILL)  # anything it left running
        except ProcessLookupError:
            pass
    (ARTIFACTS / "check_workbench.log").write_text(output)
    failed = [line for line in output.splitlines() if line.startswith("[FAIL]")]
    assert check.returncode == 0, (
        f"browser check failed (exit {check.returncode}); log and screenshots in {ARTIFACTS}\n"
        + "\n".join(failed or output.splitlines()[-30:])
    )
