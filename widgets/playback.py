"""A finished run, or several side by side, replayed with one epoch slider and a play button.

:func:`replay` opens a run folder written by ``cryospin-lab reconstruct`` or
``Reconstruction.export`` (its ``events.jsonl`` and per-epoch checkpoints,
read by :class:`~cryospin_lab.app.recorded.RecordedRun`) in read-only
workbenches: at the slider's epoch every panel shows the run as it was after
that epoch, the map (and the posterior of the chosen particle under it) from
that epoch's checkpoint. ``replay(a, b)`` puts two runs side by side on the
same slider, e.g. two switch epochs, for a lecture without waiting for a run.
Moving forward feeds only the new epochs' events; moving back rebuilds the
panels from the first epoch.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence

import ipywidgets as w

from cryospin_lab.app.bus import EventBus
from cryospin_lab.app.recorded import RecordedRun

from ._plotly import set_image_format
from .workbench import Workbench

__all__ = ["Replay", "replay"]


class Replay:
    """Read-only workbenches over recorded runs, all at the epoch of one slider.

    Args:
        runs: run folders (one or more; two compare side by side).
        particles: the runs' particle file (STAR/.cs); needed for the pose-posterior and
            ambiguity panels, which score the images under each epoch's map. Without it those
            tabs say so.
        ground_truth: the true map of simulated particles (for the posterior panel's truth).
        interval_ms: the play button's time per epoch.
        Other arguments as :class:`~cryospin_lab.widgets.workbench.Workbench`.
    """

    def __init__(
        self,
        runs: Sequence[str | os.PathLike],
        *,
        particles: str | os.PathLike | None = None,
        ground_truth: str | os.PathLike | None = None,
        layout: str = "tabs",
        use_nglview: bool = True,
        posterior_nside: int = 8,
        specialisation_nside: int = 4,
        interval_ms: int = 1500,
    ):
        if not runs:
            raise ValueError("replay: give at least one run folder")
        self.runs = [RecordedRun(run) for run in runs]
        self.reconstruction = None
        if particles is not None:
            from cryospin_lab.app.reconstruction import Reconstruction
            from cryospin_lab.engine.run_state import read_run

            config = read_run(self.runs[0].last_checkpoint).config
            self.reconstruction = Reconstruction(particles, ground_truth=ground_truth, config=config)
        self.benches = []
        for _ in self.runs:
            bench = Workbench(
                self.reconstruction,
                layout=layout,
                use_nglview=use_nglview,
                posterior_nside=posterior_nside,
                specialisation_nside=specialisation_nside,
            )
            self.benches.append(bench)
        self.titles = [
            f"<h3>{html.escape(str(run.run_dir))}</h3>"
            f"<small>recorded run, epochs {run.epochs[0]}-{run.epochs[-1]}</small>"
            for run in self.runs
        ]
        self._shown = [0] * len(self.runs)
        epochs = sorted({e for run in self.runs for e in run.epochs})
        self.slider = w.IntSlider(
            value=epochs[-1], min=epochs[0], max=epochs[-1], description="epoch",
            continuous_update=False, layout=w.Layout(width="420px"),
        )  # fmt: skip
        self.play = w.Play(value=epochs[-1], min=epochs[0], max=epochs[-1], interval=int(interval_ms))
        w.jslink((self.play, "value"), (self.slider, "value"))
        self.slider.observe(lambda change: self.show(change["new"]), names="value")
        self.status = w.HTML()
        self.widget = w.VBox(
            [
                w.HBox([self.play, self.slider, self.status]),
                w.HBox([bench.widget for bench in self.benches]),
            ]
        )
        self.show(epochs[-1])

    def show(self, epoch: int) -> None:
        """Every workbench at ``epoch`` (a run that ended earlier stays at its last epoch)."""
        shown = []
        for i, (run, bench) in enumerate(zip(self.runs, self.benches, strict=True)):
            target = max((e for e in run.epochs if e <= epoch), default=run.epochs[0])
            after = self._shown[i]
            if target < after or after == 0:  # back in time (or the first time): from the start
                if after:  # the panels Workbench() built are still empty the first time
                    bench._build_panels(self.reconstruction)
                bench.pump.set_bus(EventBus())
                bench.controls.widget.layout.display = "none"  # nothing to start or switch in a recording
                bench.title.value = self.titles[i]
                if self.reconstruction is None and bench.layout == "tabs" and "FSC" in bench.panels:
                    bench.container.selected_index = list(bench.panels).index("FSC")  # no images to score
                after = 0
            bus = bench.pump.bus
            for event in run.events_until(target, after=after):
                bus.publish(event)
            for event in run.volume_events(target):
                bus.publish(event)
            bench.tick()
            self._shown[i] = target
            shown.append(target)
        self.status.value = " · ".join(f"after epoch {e}" for e in shown)

    def close(self) -> None:
        """Stop the pumps and release the panels (and the particles' reconstruction)."""
        for bench in self.benches:
            bench.close()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def replay(*runs: str | os.PathLike, image_format: str = "png", **kwargs) -> Replay:
    """Open finished run folders with an epoch slider: ``replay(run)``, or ``replay(a, b)`` to compare.

    ``image_format`` as in :func:`~cryospin_lab.widgets.workbench.launch`; other keyword arguments
    go to :class:`Replay` (``particles=``, ``ground_truth=`` for the posterior panels).
    """
    set_image_format(image_format)
    return Replay(list(runs), **kwargs)
