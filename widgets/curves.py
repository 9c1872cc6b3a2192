"""Curves over a run: FSC and resolution (paper Fig. 3), pose error (Fig. 4), step losses.

* :class:`FSCPanel`: Fourier shell correlation curves, against the ground-truth
  map (threshold 0.5) and/or between half maps (0.143), one per epoch: the
  latest bold, older ones faded into one trace (so the figure keeps a fixed
  number of traces); the current resolution in Å as text; resolution against
  wall time for every (branch, kind).
* :class:`PoseErrorPanel`: mean (solid) and median (dashed) pose error per
  branch over epochs, with each switch to the direct stage as a vertical line
  (and each restart of a stuck start as a red one: "attempt 2 after a stuck
  start at epoch 4").
  After a fork the children's lines start at the parent's last point, so the
  divergence of the amortized and direct branches reads as in the paper.
* :class:`LossPanel`: the step losses per branch, bin-averaged down to at most
  ``max_points`` points so the figure stays light over long runs.

Every panel is drawn from the engine's events.
"""

from __future__ import annotations

import html
import math

import ipywidgets as w
import numpy as np
import plotly.graph_objects as go

from cryospin_lab.engine.events import (
    EpochEvent,
    ForkEvent,
    Phase,
    PhaseChangeEvent,
    PoseErrorEvent,
    ResolutionEvent,
    StepEvent,
)

from ._plotly import epoch_ticks, new_figure
from .heads import BranchSelector, head_color
from .pump import Panel

__all__ = ["FSCPanel", "PoseErrorPanel", "LossPanel", "decimate", "KIND_LABELS", "SWITCH_REASONS"]

KIND_LABELS = {"ground_truth": "vs ground truth", "half_maps": "half maps"}
KIND_DASH = {"ground_truth": "solid", "half_maps": "dot"}
SWITCH_REASONS = {"manual": "by hand", "epoch": "at the set epoch", "auto": "automatically"}


def _branch_color(index: int) -> str:
    return head_color(index)


# ----------------------------------------------------------------------------- FSC


class FSCPanel(Panel):
    """FSC curves over epochs (latest bold), the resolution in Å, and resolution vs wall time."""

    def __init__(self, reconstruction=None):
        super().__init__()
        self._handlers = {ResolutionEvent: self._on_resolution, ForkEvent: self._on_fork}
        self.events: dict[tuple[str, str], list[ResolutionEvent]] = {}  # (branch, kind) -> in order
        self.branch_select = BranchSelector(self.redraw)
        self.resolution_text = w.HTML("<i>no FSC yet (needs a ground-truth map or half maps)</i>")
        self.curves = new_figure(
            height=320,
            width=520,
            title=dict(text="Fourier shell correlation", font=dict(size=13)),
            xaxis=dict(title="spatial frequency (1/Å)"),
            yaxis=dict(title="FSC", range=[-0.1, 1.05]),
        )
        for kind, threshold in (("ground_truth", 0.5), ("half_maps", 0.143)):
            dash = KIND_DASH[kind]
            self.curves.add_trace(
                go.Scatter(
                    x=[], y=[], name=f"earlier epochs ({KIND_LABELS[kind]})", mode="lines",
                    line=dict(color="rgba(31,119,180,0.25)", width=1, dash=dash), hoverinfo="skip",
                )
            )  # fmt: skip
            self.curves.add_trace(
                go.Scatter(
                    x=[], y=[], name=f"latest ({KIND_LABELS[kind]})", mode="lines",
                    line=dict(color="#1f77b4", width=3, dash=dash),
                )
            )  # fmt: skip
            self.curves.add_hline(y=threshold, line=dict(color="grey", width=1, dash="dash"))
        self.timeline = new_figure(
            height=320,
            width=460,
            title=dict(text="resolution vs wall time", font=dict(size=13)),
            xaxis=dict(title="wall time (min)"),
            yaxis=dict(title="resolution (Å)", autorange="reversed"),
        )
        self._timeline_traces: dict[tuple[str, str], int] = {}
        self.widget = w.VBox(
            [
                w.HBox([self.branch_select.dropdown, self.resolution_text]),
                w.HBox([self.curves, self.timeline]),
            ]
        )

    def _on_resolution(self, event: ResolutionEvent) -> None:
        key = (event.branch, event.kind)
        self.events.setdefault(key, []).append(event)
        if event.branch not in self.branch_select.dropdown.options:
            self.branch_select.offer(event.branch)

    def _on_fork(self, event: ForkEvent) -> None:
        for kind in KIND_LABELS:
            past = self.events.get((event.parent, kind))
            if past:
                for child in event.children:
                    self.events.setdefault((child, kind), list(past))

    def latest(self, kind: str, branch: str | None = None) -> ResolutionEvent | None:
        events = self.events.get((branch or self.branch_select.value, kind))
        return events[-1] if events else None

    def redraw(self) -> None:
        self.branch_select.apply(list(dict.fromkeys(b for b, _ in self.events)))
        branch = self.branch_select.value
        lines = []
        with self.curves.batch_update():
            for k, kind in enumerate(KIND_LABELS):
                events = self.events.get((branch, kind), [])
                older, latest = self.curves.data[2 * k], self.curves.data[2 * k + 1]
                if not events:
                    older.x = older.y = latest.x = latest.y = []
                    continue
                xs, ys = [], []
                for event in events[:-1]:  # one trace, curves separated by None gaps
                    xs += [*event.frequencies_per_angstrom.tolist(), None]
                    ys += [*event.fsc.tolist(), None]
                older.x, older.y = xs, ys
                last = events[-1]
                latest.x, latest.y = last.frequencies_per_angstrom, last.fsc
                latest.name = f"epoch {last.epoch} ({KIND_LABELS[kind]})"
                lines.append(
                    f"<b>{last.resolution_angstrom:.2f} Å</b> {KIND_LABELS[kind]} "
                    f"(FSC = {last.threshold:g}), epoch {last.epoch}"
                )
        if lines:
            self.resolution_text.value = f"branch <b>{html.escape(branch)}</b>: " + "; ".join(lines)
        with self.timeline.batch_update():
            for (b, kind), events in self.events.items():
                index = self._timeline_traces.get((b, kind))
                if index is None:
                    index = len(self.timeline.data)
                    self._timeline_traces[(b, kind)] = index
                    color = _branch_color(len({key[0] for key in self._timeline_traces}) - 1)
                    self.timeline.add_trace(
                        go.Scatter(
                            x=[], y=[], name=f"{b} ({KIND_LABELS[kind]})", mode="lines+markers",
                            line=dict(color=color, dash=KIND_DASH[kind]),
                        )
                    )  # fmt: skip
                finite = [e for e in events if math.isfinite(e.resolution_angstrom)]
                self.timeline.data[index].x = [e.time_s / 60 for e in finite]
                self.timeline.data[index].y = [e.resolution_angstrom for e in finite]


# ----------------------------------------------------------------------------- pose error


class PoseErrorPanel(Panel):
    """Mean and median pose error per branch over epochs, and the median modulo the true map's
    near-symmetry when it has one; switches as vertical lines (paper Fig. 4)."""

    def __init__(self, reconstruction=None):
        super().__init__()
        self._handlers = {
            PoseErrorEvent: self._on_pose_error,
            PhaseChangeEvent: self._on_phase,
            ForkEvent: self._on_fork,
        }
        # branch -> [(epoch, mean, median, median modulo the symmetry or None)]
        self.points: dict[str, list[tuple[int, float, float, float | None]]] = {}
        self.symmetry = ""  # the true map's near-symmetry, once an event names one
        self.switches: list[PhaseChangeEvent] = []
        # branch -> index of its mean trace (median: index + 1, median modulo the symmetry: index + 2)
        self._trace_of: dict[str, int] = {}
        self.figure = new_figure(
            height=340,
            width=640,
            title=dict(text="pose error vs ground truth", font=dict(size=13)),
            xaxis=dict(title="epochs done"),
            yaxis=dict(title="pose error (°)", rangemode="tozero"),
        )
        self.note = w.HTML(
            "<small>solid: mean, dashed: median (after global alignment and hand flip)</small>"
            if reconstruction is None or reconstruction.has_ground_truth_poses
            else "<i>no true poses in this particle set: pose error is not available</i>"
        )
        self.widget = w.VBox([self.note, self.figure])

    def _on_pose_error(self, event: PoseErrorEvent) -> None:
        point = (event.epoch, event.mean_deg, event.median_deg, event.median_mod_sym_deg)
        self.points.setdefault(event.branch, []).append(point)
        if event.symmetry and not self.symmetry:
            self.symmetry = event.symmetry
            self.note.value = (
                "<small>solid: mean, dashed: median (after global alignment and hand flip); dotted: "
                f"median modulo {html.escape(event.symmetry)}, across which a pose and its mate explain "
                "an image almost alike</small>"
            )

    def _on_fork(self, event: ForkEvent) -> None:
        parent = self.points.get(event.parent, [])
        for child in event.children:  # start at the parent's last point: the lines fork there
            self.points.setdefault(child, parent[-1:])

    def _on_phase(self, event: PhaseChangeEvent) -> None:
        if event.new is Phase.DIRECT or event.reason == "restart":
            self.switches.append(event)

    def redraw(self) -> None:
        with self.figure.batch_update():
            for branch, points in self.points.items():
                if branch not in self._trace_of:
                    self._add_branch(branch)
                index = self._trace_of[branch]
                epochs = [p[0] for p in points]
                self.figure.data[index].x = epochs
                self.figure.data[index].y = [p[1] for p in points]
                self.figure.data[index + 1].x = epochs
                self.figure.data[index + 1].y = [p[2] for p in points]
                self.figure.data[index + 2].x = epochs
                self.figure.data[index + 2].y = [p[3] for p in points]  # None: no symmetry, no line
            last = max((p[0] for points in self.points.values() for p in points), default=1)
            self.figure.layout.xaxis.update(epoch_ticks(last))
            shapes, notes = [], []
            for k, event in enumerate(self.switches):
                restart = event.reason == "restart"  # a stuck start begun again (engine/stuck.py)
                shapes.append(
                    dict(
                        type="line", xref="x", yref="paper", x0=event.epoch, x1=event.epoch, y0=0, y1=1,
                        line=dict(color="firebrick" if restart else "black", width=1.5, dash="dot"),
                    )
                )  # fmt: skip
                what = f"switch {SWITCH_REASONS.get(event.reason, event.reason)}"
                if restart:
                    what = event.detail.split(":")[0] + f" after a stuck start at epoch {event.epoch}"
                notes.append(
                    dict(
                        x=event.epoch, y=1 - 0.07 * k, xref="x", yref="paper", showarrow=False,
                        xanchor="left", font=dict(size=10), text=f" {what} ({event.branch})",
                    )
                )  # fmt: skip
            self.figure.layout.shapes = shapes
            self.figure.layout.annotations = notes

    def _add_branch(self, branch: str) -> None:
        color = _branch_color(len(self._trace_of))
        self._trace_of[branch] = len(self.figure.data)
        self.figure.add_trace(
            go.Scatter(x=[], y=[], name=f"{branch} mean", mode="lines+markers", line=dict(color=color))
        )
        self.figure.add_trace(
            go.Scatter(x=[], y=[], name=f"{branch} median", mode="lines", line=dict(color=color, dash="dash"))
        )
        self.figure.add_trace(
            go.Scatter(
                x=[],
                y=[],
                name=f"{branch} median mod. symmetry",
                mode="lines",
                line=dict(color=color, dash="dot"),
            )
        )


# ----------------------------------------------------------------------------- loss


def decimate(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin-average ``(x, y)`` into at most ``max_points`` bins of equal size (the last may be shorter)."""
    n = len(x)
    if n <= max_points:
        return np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    size = math.ceil(n / max_points)
    starts = np.arange(0, n, size)
    counts = np.diff(np.append(starts, n))
    xs = np.add.reduceat(np.asarray(x, dtype=float), starts) / counts
    ys = np.add.reduceat(np.asarray(y, dtype=float), starts) / counts
    return xs, ys


class LossPanel(Panel):
    """Step losses per branch (bin-averaged to ``max_points``) and the epoch means, log scale."""

    def __init__(self, reconstruction=None, *, max_points: int = 1500):
        super().__init__()
        self._handlers = {StepEvent: self._on_step, EpochEvent: self._on_epoch}
        self.max_points = int(max_points)
        self.steps: dict[str, tuple[list[int], list[float]]] = {}
        self.epochs: dict[str, tuple[list[int], list[float]]] = {}
        self._trace_of: dict[str, int] = {}
        self.figure = new_figure(
            height=320,
            width=640,
            title=dict(text="training loss", font=dict(size=13)),
            xaxis=dict(title="step"),
            yaxis=dict(title="loss", type="log"),
        )
        self.widget = w.VBox([self.figure])

    def _on_step(self, event: StepEvent) -> None:
        steps, losses = self.steps.setdefault(event.branch, ([], []))
        steps.append(event.step)
        losses.append(event.loss)

    def _on_epoch(self, event: EpochEvent) -> None:
        steps, losses = self.epochs.setdefault(event.branch, ([], []))
        steps.append(event.step)
        losses.append(event.mean_loss)

    def redraw(self) -> None:
        with self.figure.batch_update():
            for branch in dict.fromkeys([*self.steps, *self.epochs]):
                if branch not in self._trace_of:
                    color = _branch_color(len(self._trace_of))
                    self._trace_of[branch] = len(self.figure.data)
                    self.figure.add_trace(
                        go.Scatter(x=[], y=[], name=f"{branch} step", mode="lines", line=dict(color=color))
                    )
                    self.figure.add_trace(
                        go.Scatter(
                            x=[], y=[], name=f"{branch} epoch mean", mode="markers",
                            marker=dict(color=color, size=8, symbol="diamond"),
                        )
                    )  # fmt: skip
                index = self._trace_of[branch]
                steps, losses = self.steps.get(branch, ([], []))
                xs, ys = decimate(np.asarray(steps), np.asarray(losses), self.max_points)
                self.figure.data[index].x, self.figure.data[index].y = xs, ys
                steps, losses = self.epochs.get(branch, ([], []))
                self.figure.data[index + 1].x, self.figure.data[index + 1].y = steps, losses
