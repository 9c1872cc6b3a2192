"""Pose posterior of one particle on the viewing sphere (paper Sec. 5.3), with the heads' candidates.

For the selected particle and the latest map (:class:`~cryospin_lab.engine.events.VolumeEvent`
of the selected branch), :func:`cryospin_lab.analysis.pose_posterior.view_posterior` evaluates
the training loss on a HEALPix grid of view directions x in-plane angles; the
map shows ``log10 p(view)`` (or ``p``) in a Mollweide projection (longitude =
RELION rot to the right, latitude = 90 deg - tilt). Marked on it: the best grid
pose (star), every head's candidate from the latest
:class:`~cryospin_lab.engine.events.PoseCandidatesEvent` when the particle is one of the
tracked ones (one colour per head, as in the head-assignment panel), and the
true view for simulated data. A map learned ab initio is defined up to a global
rotation (and hand): the true view is drawn in the learned map's frame, moved by
the alignment of the branch's latest :class:`~cryospin_lab.engine.events.PoseErrorEvent`
(``F(R_true @ G)``); before the first one it is in the simulation's frame, and its
hover text says which. Beside the map:
the particle image, the image the trainer predicts at the best pose, and the CTF.

Threads: the posterior takes seconds per particle, so it runs in a one-worker
:class:`~concurrent.futures.ThreadPoolExecutor` on a snapshot (the event's
read-only arrays); :meth:`PosteriorPanel.poll`, called by the UI pump on the
main thread, starts a computation when the map, particle or nside changed and
none is running, and applies a finished one. A new map alone starts one at most
every ``volume_refresh_s`` seconds (default 20), because the worker shares the
CPU with training (docs/decisions.md#posterior-refresh). Worker exceptions are
shown in the status line.
"""

from __future__ import annotations

import html
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ipywidgets as w
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cryospin_lab.analysis.pose_posterior import (
    ViewPosterior,
    mollweide_raster,
    mollweide_xy,
    render_image,
    view_posterior,
)
from cryospin_lab.app.runner import one_torch_thread
from cryospin_lab.engine.events import ForkEvent, PoseCandidatesEvent, PoseErrorEvent, VolumeEvent

from ._plotly import LEGEND_MARGIN, SyncedFigureWidget, gaps_as_none, new_figure
from .heads import BranchSelector, head_color
from .pump import Panel

__all__ = ["PosteriorPanel", "PosteriorResult", "mollweide_axes", "graticule_trace"]

NSIDES = (4, 8, 16)
RASTER_WIDTH = 320  # Mollweide raster columns (160 rows): finer than nside 16 pixels (~3.7 deg)
LOG_DECADES = 6.0  # the log map shows the top 6 decades of probability


def mollweide_axes() -> dict[str, Any]:
    """Hidden, equal-scale axes spanning the Mollweide ellipse (x in [-180, 180], y in [-90, 90])."""
    axis = dict(visible=False, showgrid=False, zeroline=False)
    return dict(xaxis=dict(range=[-182, 182], **axis), yaxis=dict(range=[-92, 92], scaleanchor="x", **axis))


def graticule_trace(**kwargs: Any) -> go.Scatter:
    """The ellipse outline, meridians every 60 deg and parallels every 30 deg, as one line trace."""
    xs: list[float | None] = []
    ys: list[float | None] = []
    t = np.radians(np.linspace(-90, 90, 91))
    for lon in (-180, -120, -60, 0, 60, 120, 180):
        p = np.radians(lon)
        x, y = mollweide_xy(np.stack([np.cos(t) * np.cos(p), np.cos(t) * np.sin(p), np.sin(t)], -1))
        xs += [*x, None]
        ys += [*y, None]
    lons = np.radians(np.linspace(-180, 180, 121))
    for lat in (-60, -30, 0, 30, 60):
        q = np.radians(lat)
        d = np.stack([np.cos(q) * np.cos(lons), np.cos(q) * np.sin(lons), np.full_like(lons, np.sin(q))], -1)
        x, y = mollweide_xy(d)
        xs += [*x, None]
        ys += [*y, None]
    style = dict(mode="lines", line=dict(color="rgba(255,255,255,0.45)", width=1), hoverinfo="skip")
    return go.Scatter(x=xs, y=ys, showlegend=False, **{**style, **kwargs})


def _markers(name: str, *, mode: str = "markers", textposition: str | None = None, **marker) -> go.Scatter:
    marker = dict(line=dict(width=1, color="black"), **marker)
    return go.Scatter(
        x=[], y=[], name=name, mode=mode, textposition=textposition, hoverinfo="text", marker=marker
    )


@dataclass(frozen=True, eq=False)
class PosteriorResult:
    """What the worker computed for one (map, particle, nside)."""

    key: tuple
    index: int
    posterior: ViewPosterior
    image: np.ndarray  # (D, D) the particle
    predicted: np.ndarray  # (D, D) the trainer's image at the best grid pose
    ctf: np.ndarray | None  # (D, D) centred
    true_rotation: np.ndarray | None  # (3, 3), the simulation's frame
    raster: tuple[np.ndarray, np.ndarray, np.ndarray]  # Mollweide (x, y, log10 p)


def _compute(key, volume, reconstruction, index: int, nside: int, n_psi: int) -> PosteriorResult:
    """Runs in the worker thread: no widget is touched here."""
    particle = reconstruction.particle(index)
    config = reconstruction.config
    kwargs = dict(
        ctf=particle.ctf, pixel_size_angstrom=particle.pixel_size_angstrom, contrast=config.contrast
    )
    post = view_posterior(volume, particle.image, nside=nside, n_psi=n_psi, loss=config.loss, **kwargs)
    predicted = render_image(volume, post.best_rotation, **kwargs)
    log10_p = post.log_probabilities / np.log(10.0)
    return PosteriorResult(
        key,
        index,
        post,
        particle.image,
        predicted,
        particle.ctf,
        particle.true_rotation,
        mollweide_raster(log10_p, width=RASTER_WIDTH),
    )


class PosteriorPanel(Panel):
    """The view posterior of one particle under the latest map, with the heads' candidates.

    Args:
        reconstruction: gives the particle images, CTFs, true poses and the run's
            contrast and loss; without it only the candidates can be shown.
        nside: HEALPix resolution (4, 8 or 16).
        index: the particle shown first.
        n_psi: in-plane angles per view direction.
    """

    def __init__(
        self,
        reconstruction=None,
        *,
        nside: int = 8,
        index: int = 0,
        n_psi: int = 24,
        volume_refresh_s: float = 20.0,
    ):
        super().__init__()
        # A new map alone starts a computation at most this often (the worker shares the CPU with
        # training: docs/decisions.md#posterior-refresh); a new particle, nside or branch starts
        # one at once.
        self.volume_refresh_s = float(volume_refresh_s)
        self._closed = False
        if nside not in NSIDES:
            raise ValueError(f"PosteriorPanel.nside must be one of {NSIDES}, got {nside}")
        self._handlers = {
            VolumeEvent: self._on_volume,
            PoseCandidatesEvent: self._on_candidates,
            ForkEvent: self._on_fork,
            PoseErrorEvent: self._on_pose_error,
        }
        self.reconstruction = reconstruction
        self.n_psi = int(n_psi)
        self.volumes: dict[str, VolumeEvent] = {}
        self.candidates: dict[str, PoseCandidatesEvent] = {}
        self.alignments: dict[str, PoseErrorEvent] = {}  # latest with a global rotation, per branch
        self.result: PosteriorResult | None = None
        self.error: str | None = None
        self._future: Future | None = None
        self._future_key: tuple | None = None
        self._done_key: tuple | None = None  # the (map, particle, nside, branch) last computed or failed
        self._executor: ThreadPoolExecutor | None = None
        self._started = 0.0
        self._quiet = False

        n = reconstruction.n_particles if reconstruction is not None else 1
        self.branch_select = BranchSelector(self.redraw)
        self.nside_select = w.Dropdown(options=list(NSIDES), value=nside, description="nside")
        self.index_slider = w.IntSlider(
            value=int(index), min=0, max=max(n - 1, 0), description="particle", continuous_update=False
        )
        self.tracked = w.Dropdown(options=[], value=None, description="tracked")
        self.ambiguous = w.Button(description="most ambiguous", disabled=True)
        self.ambiguous.tooltip = "the tracked particle whose two best heads' losses are closest"
        self.log_scale = w.Checkbox(value=True, description="log10 p", indent=False)
        self.status = w.HTML()
        self.tracked.observe(self._tracked_changed, names="value")
        self.index_slider.observe(lambda _: self.redraw(), names="value")
        self.log_scale.observe(lambda _: self._draw_result(), names="value")
        self.ambiguous.on_click(lambda _: self.select_most_ambiguous())

        self.sphere = new_figure(
            height=330,
            width=560,
            margin=dict(l=5, r=5, t=30, b=5 + LEGEND_MARGIN),
            legend=dict(orientation="h", yanchor="top", y=-0.01, x=0),
            **mollweide_axes(),
        )
        self.sphere.add_trace(
            go.Heatmap(z=[], colorscale="Viridis", colorbar=dict(thickness=10), hoverinfo="z")
        )
        self.sphere.add_trace(graticule_trace())
        self.sphere.add_trace(_markers("best grid pose", symbol="star", size=14, color="white"))
        self.sphere.add_trace(_markers("true view", symbol="x", size=12, color="red"))
        self.sphere.add_trace(
            _markers("head candidates", size=11, mode="markers+text", textposition="top center")
        )
        grid = make_subplots(rows=1, cols=3, subplot_titles=["particle", "best-pose prediction", "CTF"])
        self.images = SyncedFigureWidget(grid)
        self.images.update_layout(height=230, width=560, margin=dict(l=5, r=5, t=30, b=5), showlegend=False)
        for col in (1, 2, 3):
            self.images.add_trace(go.Heatmap(z=[], colorscale="Greys_r", showscale=False), row=1, col=col)
            self.images.update_xaxes(visible=False, row=1, col=col)
            self.images.update_yaxes(visible=False, scaleanchor=f"x{'' if col == 1 else col}", row=1, col=col)
        controls = w.HBox([self.branch_select.dropdown, self.nside_select, self.tracked, self.ambiguous])
        self.widget = w.VBox(
            [controls, w.HBox([self.index_slider, self.log_scale]), self.status, self.sphere, self.images]
        )
        self.redraw()

    # ------------------------------------------------------------------ events (main thread)
    def _on_volume(self, event: VolumeEvent) -> None:
        self.volumes[event.branch] = event
        if event.branch not in self.branch_select.dropdown.options:
            self.branch_select.offer(event.branch)

    def _on_candidates(self, event: PoseCandidatesEvent) -> None:
        self.candidates[event.branch] = event

    def _on_fork(self, event: ForkEvent) -> None:
        self.branch_select.offer(event.children[0])

    def _on_pose_error(self, event: PoseErrorEvent) -> None:
        if event.global_rotation is not None:
            self.alignments[event.branch] = event

    # ------------------------------------------------------------------ selection
    @property
    def index(self) -> int:
        return int(self.index_slider.value)

    @index.setter
    def index(self, value: int) -> None:
        self.index_slider.value = int(value)

    @property
    def nside(self) -> int:
        return int(self.nside_select.value)

    def _tracked_changed(self, change) -> None:
        if not self._quiet and change["new"] is not None:
            self.index = change["new"]

    def current_candidates(self, index: int | None = None):
        """``(rotations (H, 3, 3), losses (H,), true rotation or None)`` of a tracked particle, else None."""
        event = self.candidates.get(self.branch_select.value)
        index = self.index if index is None else index
        if event is None:
            return None
        rows = np.flatnonzero(event.indices == index)
        if len(rows) == 0:
            return None
        r = int(rows[0])
        truth = None if event.true_rotations is None else event.true_rotations[r]
        return event.rotations[r], event.losses[r], truth

    def select_most_ambiguous(self) -> int | None:
        """Show the tracked particle whose two lowest head losses are closest (relative gap)."""
        event = self.candidates.get(self.branch_select.value)
        if event is None or event.losses.shape[1] < 2:
            return None
        two = np.sort(event.losses.astype(np.float64), axis=1)[:, :2]
        gaps = (two[:, 1] - two[:, 0]) / np.maximum(np.abs(two[:, 0]), 1e-30)
        choice = int(event.indices[int(np.argmin(gaps))])
        self.index = choice
        return choice

    # ------------------------------------------------------------------ worker
    def _wanted_key(self) -> tuple | None:
        volume = self.volumes.get(self.branch_select.value)
        if volume is None or self.reconstruction is None:
            return None
        return (id(volume), self.index, self.nside, self.branch_select.value)

    @property
    def busy(self) -> bool:
        """A computation is running."""
        return self._future is not None

    def poll(self) -> None:
        """Pump tick: redraw markers if events came, apply a finished result, start the next one.

        Hidden (another tab shown): nothing is drawn or started, so no CPU goes to a posterior
        nobody sees; the latest map's posterior is computed when the panel is shown again.
        """
        super().poll()
        if not self.visible:
            return
        if self._future is not None and self._future.done() and not self.front_end_behind():
            future, self._future = self._future, None
            err = future.exception()
            if err is not None:
                self.error = f"{type(err).__name__}: {err}"
                self._done_key = self._future_key
                self._set_status(f"<b style='color:#b00020'>posterior failed: {html.escape(self.error)}</b>")
            else:
                self.result, self.error = future.result(), None
                self._done_key = self.result.key
                self._draw_result()
        key = self._wanted_key()
        if self._closed or self._future is not None or key is None or key == self._done_key:
            return
        only_the_map_changed = self._done_key is not None and key[1:] == self._done_key[1:]
        if only_the_map_changed and time.perf_counter() - self._started < self.volume_refresh_s:
            return
        volume = self.volumes[self.branch_select.value].volume
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, "posterior", one_torch_thread)  # decisions.md#one-omp-team
        self._started = time.perf_counter()
        self._future = self._executor.submit(
            _compute, key, volume, self.reconstruction, self.index, self.nside, self.n_psi
        )
        self._future_key = key
        self._set_status(f"computing… particle {self.index}, nside {self.nside}")

    def close(self) -> None:
        """Stop the worker (a running computation finishes in the background and is dropped)."""
        self._closed = True  # a later poll() must not start a new worker
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._future = None

    # ------------------------------------------------------------------ drawing (main thread)
    def _set_status(self, text: str) -> None:
        self.status.value = text

    def redraw(self) -> None:
        """Branch list, tracked-particle list and the candidate / true-view markers."""
        self.branch_select.apply(list(self.volumes) or ["main"])
        event = self.candidates.get(self.branch_select.value)
        self._quiet = True
        try:
            options = []
            if event is not None:
                for row, idx in enumerate(event.indices):
                    best = np.sort(event.losses[row])
                    gap = "" if len(best) < 2 else f", gap {best[1] - best[0]:.3g}"
                    options.append((f"{int(idx)}{gap}", int(idx)))
                if self.reconstruction is None and len(event.indices):
                    self.index_slider.max = max(self.index_slider.max, int(event.indices.max()))
            if [o[1] for o in options] != [o[1] for o in self.tracked.options]:
                self.tracked.options = options
            values = [o[1] for o in options]
            self.tracked.value = self.index if self.index in values else None
        finally:
            self._quiet = False
        self.ambiguous.disabled = event is None or event.losses.shape[1] < 2
        self._draw_markers()
        if self.reconstruction is None:
            self._set_status(
                "<i>no particle images: pass a Reconstruction to compute the posterior; "
                "showing the heads' candidates of tracked particles only</i>"
            )
        elif self.branch_select.value not in self.volumes and not self.busy:
            self._set_status("<i>waiting for the first map</i>")

    def _draw_markers(self) -> None:
        index = self.result.index if self.result is not None else self.index
        found = self.current_candidates(index)
        cand = self.sphere.data[4]
        true = self.sphere.data[3]
        with self.sphere.batch_update():
            if found is None:
                cand.x, cand.y, cand.text = [], [], []
            else:
                rotations, losses, _ = found
                x, y = mollweide_xy(np.asarray(rotations)[:, 2, :])  # so3.view_directions: R^T e_z
                best = int(np.argmin(losses))
                cand.x, cand.y = x, y
                cand.text = [f"h{h}" for h in range(len(losses))]
                cand.hovertext = [f"head {h}: loss {loss:.5g}" for h, loss in enumerate(losses)]
                cand.marker.color = [head_color(h) for h in range(len(losses))]
                cand.marker.size = [15 if h == best else 10 for h in range(len(losses))]
            direction, where = self.true_view(index, found)
            if direction is None:
                true.x, true.y = [], []
            else:
                true.x, true.y = mollweide_xy(direction[None])
                true.hovertext = [f"true view ({where})"]

    def true_view(self, index: int | None = None, found=None) -> tuple[np.ndarray | None, str]:
        """The particle's true view direction as drawn (``R[2, :]``, in the learned map's frame once
        the branch has an alignment) and a few words on the frame; ``(None, "")`` if unknown."""
        index = self.index if index is None else index
        truth = None
        if self.result is not None and self.result.index == index:
            truth = self.result.true_rotation
        else:
            found = self.current_candidates(index) if found is None else found
            if found is not None:
                truth = found[2]
        if truth is None:
            return None, ""
        truth = np.asarray(truth, dtype=np.float64)
        alignment = self.alignments.get(self.branch_select.value)
        if alignment is None:
            return truth[2, :], "simulation frame: no alignment to the learned map yet"
        hand = ", mirrored hand" if alignment.flipped else ""
        where = f"aligned to the learned map at epoch {alignment.epoch}{hand}"
        return alignment.true_pose_in_map_frame(truth)[2, :], where

    def _draw_result(self) -> None:
        result = self.result
        if result is None:
            return
        post = result.posterior
        x, y, log10_p = result.raster
        z = log10_p if self.log_scale.value else 10.0**log10_p
        top = float(np.nanmax(log10_p))
        heat, best = self.sphere.data[0], self.sphere.data[2]
        with self.sphere.batch_update():
            heat.x, heat.y, heat.z = x, y, gaps_as_none(z)
            heat.zmin, heat.zmax = (top - LOG_DECADES, top) if self.log_scale.value else (0.0, 10.0**top)
            heat.colorbar.title = "log10 p" if self.log_scale.value else "p"
            bx, by = mollweide_xy(post.view_directions[post.best_pixel][None])
            best.x, best.y = bx, by
            best.hovertext = [
                f"best grid pose: pixel {post.best_pixel}, psi {post.best_psi_deg:.0f} deg, "
                f"p = {post.probabilities[post.best_pixel]:.3g}"
            ]
            self.sphere.layout.title = dict(
                text=f"particle {result.index}: view posterior", font=dict(size=13)
            )
        ctf = np.zeros_like(result.image) if result.ctf is None else result.ctf
        with self.images.batch_update():
            for trace, z_img in zip(self.images.data, (result.image, result.predicted, ctf), strict=True):
                trace.z = gaps_as_none(z_img)
        self._draw_markers()
        noise = "" if post.noise_variance is None else f", noise variance {post.noise_variance:.3g}"
        self._set_status(
            f"particle {result.index}, nside {post.nside} x {post.n_psi} psi: {post.wall_time_s:.1f} s; "
            f"T = {post.temperature:.3g}{noise}; max p = {post.probabilities.max():.3g}"
        )
