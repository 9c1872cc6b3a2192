"""Page and server helpers of the real-browser checks (``check_workbench.py``, ``check_full_run.py``)."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page
from playwright.sync_api import TimeoutError as PlaywrightTimeout

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]

# Data held by every plotly figure under `root` (a CSS selector): per figure, its title and the
# length of x (or z) of each trace, read from plotly.js's own `el.data` (what is drawn).
PLOTS_JS = """(root) => Array.from(document.querySelectorAll(root + ' .js-plotly-plot')).map(el => ({
  title: (el.layout && el.layout.title && (el.layout.title.text || el.layout.title)) || '',
  visible: el.offsetParent !== null,
  traces: (el.data || []).map(t => ({name: t.name || t.type,
      n: ((t.z && t.z.length) || (t.x && t.x.length) || (t.y && t.y.length) || 0)}))
}))"""


class Checks:
    """Collects named pass/fail results and prints them as they come."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def __call__(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, bool(ok), detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""), flush=True)
        return bool(ok)

    @property
    def failed(self) -> list[str]:
        return [name for name, ok, _ in self.results if not ok]


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s") from None
            time.sleep(1)


def start_server(argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


KERNEL_IDLE_JS = """() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const k = w && w.context && w.context.sessionContext.session && w.context.sessionContext.session.kernel;
    return !!(k && k.status === 'idle'); }"""


def wait_until(page: Page, js: str, timeout_s: float, arg=None) -> bool:
    """Poll a JS predicate; True when it held within the timeout.

    A navigation while polling (JupyterLab may move a reloaded page to another workspace URL)
    destroys the page's JS context; the poll starts again in the new page until the deadline,
    so only the timeout makes it False.
    """
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            page.wait_for_function(js, arg=arg, timeout=left * 1000, polling=500)
            return True
        except PlaywrightTimeout:
            return False
        except PlaywrightError:  # context destroyed by a navigation: poll the new page
            time.sleep(0.5)
    return False


NOT_FOUND_JS = "/Error displaying widget: model not found/.test(document.body.innerText)"


def page_state(page: Page) -> str:
    """What the page shows, for a failed check's detail: URL, widget views, errors, dialogs."""
    try:
        return page.evaluate(
            """() => { const n = sel => document.querySelectorAll(sel).length;
            const text = document.body.innerText.replace(/\\s+/g, ' ');
            const errors = text.match(/(Error displaying widget[^.]*|Model not found[^.]*)/g) || [];
            return `url ${location.pathname}; ${n('.jp-Notebook')} notebook(s), `
                + `${n('.jupyter-widgets')} widget view(s), ${n('.lm-TabBar-tab')} tab(s), `
                + `${n('.jp-Dialog')} dialog(s); widget errors: ${errors.slice(0, 3).join(' | ') || 'none'}; `
                + `status bar: ${(document.querySelector('#jp-main-statusbar')?.innerText || '?')
                    .replace(/\\s+/g, ' ')}`; }"""
        )
    except PlaywrightError as err:
        return f"page not readable: {str(err).splitlines()[0]}"


# the workbench's status line ("running · main: amortized · epoch 1/3 done · ..."), '' if absent
STATUS_JS = """() => { const state = /^(created|running|paused|finished|stopped|failed)( ·|$)/;
    const hit = Array.from(document.querySelectorAll('.widget-html-content'))
        .find(el => state.test(el.innerText.trim()));
    return hit ? hit.innerText.trim() : ''; }"""
# whether that line says the run has ended
ENDED_JS = f"() => /^(finished|stopped)( ·|$)/.test(({STATUS_JS})())"


def status_text(page: Page) -> str:
    """The workbench's status line (:data:`STATUS_JS`)."""
    return page.evaluate(STATUS_JS)


def button_label(page: Page, prefix_re: str) -> str:
    return page.evaluate(
        """(re) => { const b = Array.from(document.querySelectorAll('button.jupyter-button'))
            .find(el => new RegExp(re).test(el.innerText.trim()));
            return b ? b.innerText.trim() + (b.disabled ? ' [disabled]' : '') : ''; }""",
        prefix_re,
    )


def dismiss_news(page: Page) -> None:
    try:
        page.get_by_role("button", name="No").click(timeout=3000)
    except Exception:
        pass


def shot(target, shots: Path, name: str, **kwargs) -> None:
    """Screenshot of a page or an element (a busy machine can time out: said, and the check goes on)."""
    path = shots / f"{name}.png"
    try:
        target.screenshot(path=str(path), timeout=60_000, **kwargs)
        print(f"       screenshot {path}", flush=True)
    except Exception as err:
        print(
            f"       screenshot {path} failed: {type(err).__name__}: {str(err).splitlines()[0]}", flush=True
        )


def plots(page: Page, root: str = "body") -> list[dict]:
    return page.evaluate(PLOTS_JS, root)


def has_data(figures: list[dict], title_part: str, min_points: int = 1) -> tuple[bool, str]:
    """Some figure whose title contains ``title_part`` has a trace with at least ``min_points``."""
    hits = [f for f in figures if title_part.lower() in str(f["title"]).lower()]
    best = max((t["n"] for f in hits for t in f["traces"]), default=0)
    return best >= min_points, f"{len(hits)} figure(s) titled ~'{title_part}', longest trace {best}"


# ----------------------------------------------------------------------------- JupyterLab
