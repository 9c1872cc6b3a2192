"""Where a new run's particles come from: a particle file, a bundled molecule, or a model or map to simulate.

The settings form's choice (``molecule`` and ``particles``) becomes a :class:`DataSource`.
A particle file (STAR or cryoSPARC ``.cs``) or the embedded HSP90 set is used as it is.
A bundled molecule (``simulate.MOLECULES``), or an atomic model (PDB/mmCIF) or MRC map
typed as the particles, is simulated first: D=64, SNR 0.1, CTF, ``n_simulated`` images,
the pixel size at which it spans two thirds of the box, cached like the default set so
that a second run starts at once. The simulation runs on a worker thread, because it
takes tens of seconds and the notebook must stay responsive; :attr:`DataSource.progress`
says how far it is, and the controls poll it and start the run when it is done.
"""

from __future__ import annotations

import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

__all__ = ["DataSource", "MODEL_SUFFIXES"]

MODEL_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".mrc", ".map")  # also with .gz: simulated first
BOX, SNR = 64, 0.1  # a simulated set: the suite's size and noise


def _is_model(path: str) -> bool:
    name = path.lower().removesuffix(".gz")
    return name.endswith(MODEL_SUFFIXES)


class DataSource:
    """The particles of a new run, from the form's ``molecule`` (a bundled name, or "" for none) and
    ``particles`` (a path, or None for the embedded set); a chosen molecule wins over the path."""

    def __init__(self, molecule: str = "", particles: str | None = None, n_simulated: int = 10000):
        self.molecule, self.n_simulated = molecule or "", int(n_simulated)
        self.particles = None if self.molecule else particles
        if self.particles and not Path(self.particles).expanduser().is_file():
            raise FileNotFoundError(f"particle file not found: {self.particles}")
        self.stage, self.done_images = "waiting", 0
        self._future: Future | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def needs_simulation(self) -> bool:
        return bool(self.molecule) or (self.particles is not None and _is_model(self.particles))

    @property
    def what(self) -> str:
        return self.molecule or Path(self.particles or "").name

    def start(self) -> DataSource:
        """Begin the simulation on a worker thread."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="simulate")
        self._future = self._executor.submit(self._simulate)
        self._executor.shutdown(wait=False)
        return self

    @property
    def finished(self) -> bool:
        return self._future is not None and self._future.done()

    def result(self):
        """The simulated set (a ``SimulationResult``); re-raises the simulation's error."""
        return self._future.result()

    @property
    def progress(self) -> str:
        if self.stage == "waiting":
            return f"simulating {self.what}: reading the model…"
        share = self.done_images / max(self.n_simulated, 1)
        return (
            f"simulating {self.what}: {self.stage} {self.done_images}/{self.n_simulated} images ({share:.0%})"
        )

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        self.stage, self.done_images = stage, done

    def _simulate(self):
        from cryospin_lab.simulate import datasets, fitting_pixel_size, simulate_particles
        from cryospin_lab.simulate.simulator import SimulationResult

        if self.molecule:
            return datasets.bundled(
                self.molecule, n_particles=self.n_simulated, progress=False, on_progress=self._on_progress
            )
        model = Path(self.particles).expanduser()
        apix = fitting_pixel_size(model, BOX)
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", model.name)
        out_dir = (
            datasets.default_cache_dir() / f"{stem}_n{self.n_simulated}_box{BOX}_apix{apix:g}_snr{SNR:g}"
        )
        try:
            cached = SimulationResult.load(out_dir)
            if cached.n_particles == self.n_simulated and cached.source == str(model):
                return cached
        except (FileNotFoundError, ValueError):
            pass
        return simulate_particles(
            model, out_dir=out_dir, box_size=BOX, pixel_size_angstrom=apix, n_particles=self.n_simulated,
            snr=SNR, progress=False, on_progress=self._on_progress,
        )  # fmt: skip
