"""The ambiguity of the whole set: every sampled particle's pose posterior, summarised, under the latest map.

For ``n_sample`` particles spread evenly over the set and the latest map of
the selected branch (:class:`~cryospin_lab.engine.events.VolumeEvent`),
:func:`cryospin_lab.analysis.ambiguity.set_ambiguity` computes each particle's
view posterior (the posterior panel's grid, loss and temperature) and its
summary: entropy, number of modes, the angle between the two heaviest modes
and, when the map has a near-symmetry (found in the map itself,
``analysis.symmetry``), the posterior mass on the best pose's mate. Shown: a
histogram of the entropy, the entropy against the pose error of the best grid
pose (simulated data; after the global alignment of ``metrics.pose_error``), a
line of totals, and buttons that open the most ambiguous particles in the
posterior panel (``on_select``).

Threads: as the posterior panel, a one-worker executor on a snapshot of the
map, latest wins; a new map alone starts a computation at most every
``volume_refresh_s`` seconds (default 60: the worker shares the CPU with
training), and nothing is computed while the panel is hidden.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import ipywidgets as w
import numpy as np
import plotly.graph_objects as go

from cryospin_lab.analysis import metrics
from cryospin_lab.analysis.ambiguity import SetAmbiguity, set_ambiguity
from cryospin_lab.analysis.symmetry import find_near_symmetry
from cryospin_lab.app.runner import one_torch_thread
from cryospin_lab.engine.events import ForkEvent, VolumeEvent

from ._plotly import new_figure
from .heads import BranchSelector
from .pump import Panel

__all__ = ["AmbiguityPanel", "compute_ambiguity"]

N_BUTTONS = 5  # the most ambiguous particles offered to open


def compute_ambiguity(volume, reconstruction, indices: np.ndarray, nside: int, n_psi: int):
    """Runs in the worker: the set's posteriors and, with true poses, each best pose's error (°)."""
    views = [reconstruction.particle(int(i)) for i in indices]
    images = np.stack([v.image for v in views])
    ctfs = None if views[0].ctf is None else np.stack([v.ctf for v in views])
    near = find_near_symmetry(np.array(volume))  # the map's own, detected without the truth
    symmetry = None if near is None else near.rotations
    found = set_ambiguity(
        volume, images, ctfs=ctfs, pixel_size_angstrom=views[0].pixel_size_angstrom, nside=nside, n_psi=n_psi,
        contrast=reconstruction.config.contrast, symmetry_rotations=symmetry,
    )  # fmt: skip
    errors = None
    if all(v.true_rotation is not None for v in views):
        truth = np.stack([v.true_rotation for v in views])
        errors = np.asarray(metrics.pose_error(truth, found.best_rotations).errors_deg)
    return found, errors


class AmbiguityPanel(Panel):
    """Entropy histogram and entropy-vs-error scatter of ``n_sample`` particles' posteriors.

    Args:
        reconstruction: gives the particles (and their true poses when simulated).
        n_sample: particles scored per map (default 500: a few seconds at nside 8 on 2 cores).
        nside, n_psi: the grid (default as the posterior panel).
        on_select: called with a particle index when a scatter point is clicked or one of the
            "most ambiguous" buttons is pressed (the workbench opens it in the posterior panel).
    """

    def __init__(
        self,
        reconstruction=None,
        *,
        n_sample: int = 500,
        nside: int = 8,
        n_psi: int = 24,
        volume_refresh_s: float = 60.0,
        on_select: Callable[[int], None] | None = None,
    ):
        super().__init__()
        self._handlers = {VolumeEvent: self._on_volume, ForkEvent: self._on_fork}
        self.reconstruction = reconstruction
        n = reconstruction.n_particles if reconstruction is not None else 0
        self.indices = np.unique(
            np.linspace(0, max(n - 1, 0), min(int(n_sample), max(n, 1))).round().astype(int)
        )
        self.nside, self.n_psi, self.volume_refresh_s = int(nside), int(n_psi), float(volume_refresh_s)
        self.on_select = on_select
        self.volumes: dict[str, VolumeEvent] = {}
        self.result: SetAmbiguity | None = None
        self.errors: np.ndarray | None = None
        self.error: str | None = None
        self._future: Future | None = None
        self._key: tuple | None = None
        self._done_key: tuple | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._started = 0.0
        self._closed = False
        self.branch_select = BranchSelector(self.redraw)
        self.status = w.HTML("<i>waiting for the first map</i>")
        # made once and relabelled at each result: new buttons per result would leave the old ones'
        # models in the kernel, which a reloaded page must fetch all of
        self._targets: list[int] = []
        self._open_buttons = [
            w.Button(layout=w.Layout(width="auto", display="none")) for _ in range(N_BUTTONS)
        ]
        for k, button in enumerate(self._open_buttons):
            button.on_click(lambda _, k=k: self._open_target(k))
        self.buttons = w.HBox(
            [w.HTML("most ambiguous: ", layout=w.Layout(display="none")), *self._open_buttons]
        )
        self.histogram = new_figure(
            height=260, width=420, title=dict(text="posterior entropy", font=dict(size=13)),
            xaxis=dict(title="entropy (bits)"), yaxis=dict(title="particles"), showlegend=False,
        )  # fmt: skip
        self.histogram.add_trace(go.Histogram(x=[], nbinsx=30, marker=dict(color="#4c72b0")))
        self.scatter = new_figure(
            height=260, width=520, title=dict(text="entropy against pose error", font=dict(size=13)),
            xaxis=dict(title="pose error of the best grid pose (°)"), yaxis=dict(title="entropy (bits)"),
            showlegend=False,
        )  # fmt: skip
        self.scatter.add_trace(
            go.Scatter(x=[], y=[], mode="markers", marker=dict(size=5, color=[], colorscale="Viridis",
                       colorbar=dict(title="modes", thickness=10)), hovertemplate="%{text}<extra></extra>")
        )  # fmt: skip
        self.scatter.data[0].on_click(self._on_point_click)
        self.widget = w.VBox(
            [w.HBox([self.branch_select.dropdown, self.status]), w.HBox([self.histogram, self.scatter]),
             self.buttons]
        )  # fmt: skip

    # ------------------------------------------------------------------ events (main thread)
    def _on_volume(self, event: VolumeEvent) -> None:
        self.volumes[event.branch] = event
        if event.branch not in self.branch_select.dropdown.options:
            self.branch_select.offer(event.branch)

    def _on_fork(self, event: ForkEvent) -> None:
        self.branch_select.offer(event.children[0])

    # ------------------------------------------------------------------ worker
    @property
    def busy(self) -> bool:
        return self._future is not None

    def poll(self) -> None:
        """Pump tick: apply a finished computation, then start the next one when the map changed."""
        super().poll()
        if not self.visible:
            return
        if self._future is not None and self._future.done() and not self.front_end_behind():
            future, self._future = self._future, None
            self._done_key = self._key
            err = future.exception()
            if err is not None:
                self.error = f"{type(err).__name__}: {err}"
                self.status.value = (
                    f"<b style='color:#b00020'>ambiguity failed: {html.escape(self.error)}</b>"
                )
            else:
                (self.result, self.errors), self.error = future.result(), None
                self._draw_result()
        volume = self.volumes.get(self.branch_select.value)
        if self._closed or self._future is not None or volume is None or self.reconstruction is None:
            return
        key = (id(volume), self.branch_select.value)
        if key == self._done_key:
            return
        same_branch = self._done_key is not None and key[1:] == self._done_key[1:]
        if same_branch and time.perf_counter() - self._started < self.volume_refresh_s:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, "ambiguity", one_torch_thread)  # decisions.md#one-omp-team
        self._started, self._key = time.perf_counter(), key
        self._future = self._executor.submit(
            compute_ambiguity, volume.volume, self.reconstruction, self.indices, self.nside, self.n_psi
        )
        self.status.value = (
            f"computing… {len(self.indices)} particles, nside {self.nside}, epoch {volume.epoch}"
        )

    def close(self) -> None:
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._future = None

    # ------------------------------------------------------------------ drawing (main thread)
    def redraw(self) -> None:
        self.branch_select.apply(list(self.volumes) or ["main"])

    def _on_point_click(self, trace, points, selector) -> None:
        """A click on a scatter point opens that particle (the point's index into the sample)."""
        if points.point_inds and self.on_select is not None and self.result is not None:
            self.on_select(int(self.indices[points.point_inds[0]]))

    def most_ambiguous(self, k: int = N_BUTTONS) -> list[int]:
        """The particle indices of the ``k`` highest entropies of the last computation."""
        if self.result is None:
            return []
        order = np.argsort(-self.result.entropy_bits)[:k]
        return [int(self.indices[i]) for i in order]

    def _draw_result(self) -> None:
        found, errors = self.result, self.errors
        entropy, modes = found.entropy_bits, found.n_modes
        with self.histogram.batch_update():
            self.histogram.data[0].x = entropy
        text = [f"particle {i}: {e:.2f} bits, {m} mode(s)" for i, e, m in zip(self.indices, entropy, modes,
                                                                             strict=True)]  # fmt: skip
        with self.scatter.batch_update():
            trace = self.scatter.data[0]
            trace.x = errors if errors is not None else modes
            trace.y, trace.marker.color, trace.text = entropy, modes, text
            self.scatter.layout.xaxis.title.text = (
                "pose error of the best grid pose (°)" if errors is not None else "number of modes"
            )
        uniform = np.log2(found.log_probabilities.shape[1])
        parts = [
            f"branch <b>{html.escape(self.branch_select.value or 'main')}</b>: {len(entropy)} particles",
            f"median entropy {np.median(entropy):.2f} bits (uniform: {uniform:.1f})",
            f"{100 * np.mean(modes >= 2):.0f} % with two modes or more",
        ]
        if found.mate_mass is not None:
            parts.append(f"mean mass on the mate {100 * np.mean(found.mate_mass):.0f} %")
        parts.append(f"{found.particles_per_s:.0f} particles/s")
        self.status.value = "; ".join(parts)
        self._targets = self.most_ambiguous()
        self.buttons.children[0].layout.display = None if self._targets else "none"
        for k, button in enumerate(self._open_buttons):
            shown = k < len(self._targets)
            button.description = f"open {self._targets[k]}" if shown else ""
            button.layout.display = None if shown else "none"

    def _open_target(self, k: int) -> None:
        """The ``k``-th "open" button: that particle of the last result, in the posterior panel."""
        if k < len(self._targets) and self.on_select is not None:
            self.on_select(self._targets[k])
