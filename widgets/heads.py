"""Head assignments: how often each encoder head wins, per epoch (cryoSPIN's multi-head encoder).

In the amortized stage every image is assigned to the head whose pose gives the
lowest loss (winner-takes-all, paper Eq. 5); ``EpochEvent.head_win_counts``
counts the winners of one epoch. A head that wins almost nothing has collapsed:
it no longer proposes useful poses, and the run effectively has fewer heads.
This panel shows, for one branch (a selector appears after a fork):

* the last epoch's winner share per head (bars, the shares sum to 1);
* the share history over epochs (stacked areas, each epoch's stack sums to 1);
* a warning naming every head under :data:`COLLAPSE_SHARE` in the last epoch.

Direct-stage epochs carry no head competition (all counts 0) and are skipped.
"""

from __future__ import annotations

import html

import ipywidgets as w
import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from cryospin_lab.engine.events import EpochEvent, ForkEvent

from ._plotly import epoch_ticks, new_figure
from .pump import Panel

__all__ = ["HeadAssignmentsPanel", "BranchSelector", "COLLAPSE_SHARE", "head_color"]

COLLAPSE_SHARE = 0.01  # a head winning under 1% of an epoch's images is flagged as collapsed
_PALETTE = qualitative.Plotly + qualitative.D3


def head_color(head: int) -> str:
    """The colour of head ``head`` in every workbench panel."""
    return _PALETTE[head % len(_PALETTE)]


class BranchSelector:
    """A branch dropdown, hidden until there are two branches to choose from.

    ``offer(branch)`` records a branch to add and select; ``apply()`` (in a
    redraw) updates the dropdown without calling ``on_change`` for its own edits.
    """

    def __init__(self, on_change):
        self.dropdown = w.Dropdown(options=["main"], value="main", description="branch")
        self.dropdown.layout.display = "none"
        self._on_change = on_change
        self._quiet = False
        self._pending: str | None = None
        self.dropdown.observe(self._changed, names="value")

    @property
    def value(self) -> str:
        return self._pending or self.dropdown.value

    def offer(self, branch: str) -> None:
        self._pending = branch

    def apply(self, known: list[str]) -> None:
        if self._pending is None:
            return
        options = list(dict.fromkeys([*known, self._pending]))
        self._quiet = True
        try:
            self.dropdown.options = options
            self.dropdown.value = self._pending
            self.dropdown.layout.display = None if len(options) > 1 else "none"
        finally:
            self._quiet = False
            self._pending = None

    def _changed(self, _change) -> None:
        if not self._quiet:
            self._on_change()


class HeadAssignmentsPanel(Panel):
    """Per-head winner share of the last epoch and its history, with a collapse warning.

    Args:
        reconstruction: optional; only its ``n_heads`` is read (to draw empty bars before epoch 1).
    """

    def __init__(self, reconstruction=None, *, n_heads: int | None = None):
        super().__init__()
        self._handlers = {EpochEvent: self._on_epoch, ForkEvent: self._on_fork}
        if n_heads is None and reconstruction is not None:
            n_heads = reconstruction.n_heads
        self.n_heads = n_heads
        self.history: dict[str, list[tuple[int, np.ndarray]]] = {}  # branch -> [(epoch, shares (H,))]
        self.counts: dict[str, np.ndarray] = {}  # branch -> last epoch's counts
        self.branch_select = BranchSelector(self.redraw)
        self.warning = w.HTML()
        self.bars = new_figure(
            height=280,
            width=420,
            title=dict(text="winner share, last epoch", font=dict(size=13)),
            xaxis=dict(title="head", dtick=1),
            yaxis=dict(title="share of images", range=[0, 1]),
            showlegend=False,
        )
        self.bars.add_trace(go.Bar(x=[], y=[], marker=dict(color=[])))
        self.areas = new_figure(
            height=280,
            width=520,
            title=dict(text="winner share over epochs", font=dict(size=13)),
            xaxis=dict(title="epochs done"),
            yaxis=dict(title="share", range=[0, 1]),
        )
        self.status = w.HTML("<i>waiting for the first epoch</i>")
        self.widget = w.VBox(
            [
                w.HBox([self.branch_select.dropdown, self.status]),
                self.warning,
                w.HBox([self.bars, self.areas]),
            ]
        )
        if self.n_heads:
            self._ensure_area_traces(self.n_heads)

    # ------------------------------------------------------------------ events
    def _on_epoch(self, event: EpochEvent) -> None:
        counts = np.asarray(event.head_win_counts, dtype=np.int64)
        total = int(counts.sum())
        if total == 0:  # direct stage: no head competition
            return
        self.counts[event.branch] = counts
        self.history.setdefault(event.branch, []).append((event.epoch, counts / total))
        if event.branch not in self.branch_select.dropdown.options:
            self.branch_select.offer(event.branch)

    def _on_fork(self, event: ForkEvent) -> None:
        parent = self.history.get(event.parent, [])
        for child in event.children:  # the children share the parent's past
            self.history.setdefault(child, list(parent))
            if event.parent in self.counts:
                self.counts.setdefault(child, self.counts[event.parent])
        self.branch_select.offer(event.children[0])  # the amortized child: the one whose heads go on

    # ------------------------------------------------------------------ state for the view
    def shares(self, branch: str | None = None) -> np.ndarray | None:
        """The last epoch's winner share per head on ``branch`` (default: the selected one)."""
        history = self.history.get(branch or self.branch_select.value)
        return None if not history else history[-1][1]

    def collapsed_heads(self, branch: str | None = None) -> list[int]:
        """Heads that won under :data:`COLLAPSE_SHARE` of the images in the last epoch."""
        shares = self.shares(branch)
        return [] if shares is None else [int(h) for h in np.flatnonzero(shares < COLLAPSE_SHARE)]

    # ------------------------------------------------------------------ drawing
    def _ensure_area_traces(self, n_heads: int) -> None:
        for head in range(len(self.areas.data), n_heads):
            self.areas.add_trace(
                go.Scatter(
                    x=[],
                    y=[],
                    name=f"head {head}",
                    stackgroup="heads",
                    mode="lines",
                    line=dict(width=0.5, color=head_color(head)),
                )
            )

    def redraw(self) -> None:
        self.branch_select.apply([b for b in self.history if self.history[b]])
        branch = self.branch_select.value
        history = self.history.get(branch, [])
        if not history:
            return
        epochs = [epoch for epoch, _ in history]
        shares = np.stack([s for _, s in history])  # (epochs, H)
        n_heads = shares.shape[1]
        last = shares[-1]
        counts = self.counts[branch]
        with self.bars.batch_update():
            bar = self.bars.data[0]
            bar.x = list(range(n_heads))
            bar.y = last
            bar.marker.color = [head_color(h) for h in range(n_heads)]
            bar.customdata = counts
            bar.hovertemplate = "head %{x}: %{y:.1%} (%{customdata} images)<extra></extra>"
        self._ensure_area_traces(n_heads)
        with self.areas.batch_update():
            for head in range(n_heads):
                self.areas.data[head].x = epochs
                self.areas.data[head].y = shares[:, head]
            self.areas.layout.xaxis.update(epoch_ticks(epochs[-1]))
            self.areas.layout.title.text = f"winner share over epochs, branch {branch}"
        self.status.value = (
            f"branch <b>{html.escape(branch)}</b>, epoch {epochs[-1]}: {int(counts.sum())} images, "
            f"{n_heads} heads"
        )
        collapsed = self.collapsed_heads(branch)
        if collapsed:
            names = ", ".join(f"head {h} ({last[h]:.1%})" for h in collapsed)
            self.warning.value = (
                "<div style='background:#fff3cd;color:#664d03;padding:4px 8px;border-radius:4px'>"
                f"&#9888; collapsed: {names} won under {COLLAPSE_SHARE:.0%} of the images in epoch "
                f"{epochs[-1]}; these heads no longer propose useful poses.</div>"
            )
        else:
            self.warning.value = ""
