"""A one-page HTML report of a run: its figures, settings, switch and outcome, for slides and notes.

``write_report(out_dir, ...)`` writes ``report.html`` beside the files of
``Reconstruction.export`` (or ``cryospin-lab reconstruct``): the data set, the
switch to direct optimisation (when, by what rule, and the rule's reason), any
restart of a stuck start, the last epoch's figures (resolution, pose error,
loss), the settings that differ from the defaults (then all of them), and the
figures written beside it (``fsc.png``, ``loss.png``), embedded as base64 so
that the page is one file that can be mailed or opened offline.
"""

from __future__ import annotations

import base64
import datetime
import html
from collections.abc import Iterable
from pathlib import Path

from cryospin_lab._version import __version__
from cryospin_lab.engine.config import SETTINGS, TrainingConfig, setting_value
from cryospin_lab.engine.events import Event, Phase, PhaseChangeEvent
from cryospin_lab.io.atomic import atomic_path

__all__ = ["write_report"]

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:900px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    ".changed{background:#fff3cd}img{max-width:100%;border:1px solid #eee}h2{margin-top:1.5em}"
)


def _switch_lines(events: Iterable[Event]) -> list[str]:
    reasons = {"manual": "by hand", "epoch": "at the set epoch", "auto": "by the auto rule"}
    lines = []
    for event in events:
        if isinstance(event, PhaseChangeEvent) and event.new is Phase.DIRECT:
            why = f" ({html.escape(event.detail)})" if event.detail else ""
            lines.append(
                f"<b>{html.escape(event.branch)}</b> switched to direct optimisation "
                f"{reasons.get(event.reason, event.reason)} after epoch {event.epoch}{why}"
            )
        elif isinstance(event, PhaseChangeEvent) and event.reason == "restart":
            lines.append(f"<b>{html.escape(event.branch)}</b> restarted: {html.escape(event.detail)}")
    return lines


def write_report(
    out_dir: Path,
    *,
    config: TrainingConfig,
    particles: str,
    n_particles: int,
    box_size: int,
    pixel_size_angstrom: float,
    events: Iterable[Event],
    rows: list[dict[str, str]],
    figures: Iterable[Path],
) -> Path:
    """``out_dir/report.html`` (see the module); ``rows`` are ``metrics.csv``'s."""
    events = list(events)
    out = [
        f"<!doctype html><meta charset='utf-8'><title>cryospin-lab run report</title><style>{_STYLE}</style>"
    ]
    out.append("<h1>cryospin-lab reconstruction</h1>")
    out.append(
        f"<p>{html.escape(str(particles))}: {n_particles} particles, box {box_size}, "
        f"{pixel_size_angstrom:g} Å/px. cryospin-lab {__version__}, "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}.</p>"
    )
    out.append(
        "<h2>Switch</h2><p>" + ("<br>".join(_switch_lines(events)) or "no switch: amortized only") + "</p>"
    )
    if rows:
        heads = ["branch", "epoch", "phase", "FSC 0.5 vs truth (Å)", "pose error median (°)", "mean loss"]
        ths = "".join(f"<th>{h}</th>" for h in heads)
        out.append(f"<h2>Last epoch per branch</h2><table><tr>{ths}</tr>")
        last = {row["branch"]: row for row in rows}
        for branch, row in last.items():
            cells = [branch, row["epoch"], row["phase"], row.get("resolution_angstrom") or "–",
                     row.get("pose_error_median_deg") or "–", row.get("mean_loss") or "–"]  # fmt: skip
            out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        out.append("</table>")
    for figure in figures:
        figure = Path(figure)
        if figure.suffix == ".png" and figure.is_file():
            data = base64.b64encode(figure.read_bytes()).decode()
            image = f"<img alt='{html.escape(figure.name)}' src='data:image/png;base64,{data}'>"
            out.append(f"<h2>{html.escape(figure.stem)}</h2>{image}")
    out.append("<h2>Settings</h2><p>Highlighted: changed from the default.</p><table>")
    out.append("<tr><th>setting</th><th>value</th><th>default</th><th>meaning</th></tr>")
    for name, item in sorted(
        SETTINGS.items(), key=lambda kv: setting_value(config, kv[1].path) == kv[1].default
    ):
        value = setting_value(config, item.path)
        changed = " class='changed'" if value != item.default else ""
        cells = [name, value, item.default, item.help]
        out.append(f"<tr{changed}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    path = Path(out_dir) / "report.html"
    with atomic_path(path, ".html") as tmp:
        Path(tmp).write_text("\n".join(out), encoding="utf-8")
    return path
